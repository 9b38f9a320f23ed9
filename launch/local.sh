#!/usr/bin/env bash
# Trains one experiment on this machine (CPU or one GPU).
#
#   launch/local.sh configs/digits.py workdirs/digits [--config.key=value ...]
#
# On CPU the allocator matters (docs/design.md: the same step ran ~1.7x slower with glibc's
# default malloc): tcmalloc is preloaded when installed (Debian: libtcmalloc-minimal4), else
# glibc is asked for huge pages, which recovers most of the loss.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG[:ARG] WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
tcmalloc=$(ls /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib/*/libtcmalloc.so.4 2>/dev/null | head -n 1 || true)
if [ -n "$tcmalloc" ]; then
  export LD_PRELOAD="$tcmalloc${LD_PRELOAD:+:$LD_PRELOAD}"
else
  export GLIBC_TUNABLES="${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}"
fi
exec python -m compmod_jax.main --config="$config" --workdir="$workdir" "$@"
