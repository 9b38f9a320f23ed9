#!/usr/bin/env bash
# Trains one experiment on this machine (CPU or one GPU).
#
#   launch/local.sh configs/digits.py workdirs/digits [--config.key=value ...]
#
# The same as `python -m compmod_jax.main --config=CONFIG --workdir=WORKDIR ...`, which sets
# glibc's faster allocator settings by itself (compmod_jax/fast_malloc.py).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG[:ARG] WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
exec python -m compmod_jax.main --config="$config" --workdir="$workdir" "$@"
