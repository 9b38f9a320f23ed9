#!/usr/bin/env bash
# Trains one experiment on a Cloud TPU pod slice: the same command runs on every worker, and
# --distributed makes each call jax.distributed.initialize() (Cloud TPU finds the coordinator
# by itself). Each worker reads its own share of the data; the workdir and the TFDS data_dir
# must be on storage all workers see (a gs:// bucket).
#
#   TPU_NAME=my-pod ZONE=us-central2-b launch/tpu_pod.sh install
#   TPU_NAME=my-pod ZONE=us-central2-b launch/tpu_pod.sh run configs/natural5.py \
#       gs://bucket/workdirs/natural5 --config.data.data_dir=gs://bucket/tensorflow_datasets
#
# "install" copies this checkout to every worker and installs it with JAX's TPU wheels.
# Preemption: workers get SIGTERM; the run saves a checkpoint at the next step and exits 0;
# run the same "run" command again to resume.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
repo=$(cd "$(dirname "$0")/.." && pwd)
ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"
}
case "${1:-}" in
  install)
    gcloud compute tpus tpu-vm scp --recurse "$repo" "$TPU_NAME":~/compmod_jax --zone="$ZONE" \
      --worker=all
    ssh_all 'cd ~/compmod_jax && pip install -e . "jax[tpu]<0.11"'
    ;;
  run)
    shift
    [ $# -ge 2 ] || { echo "usage: $0 run CONFIG[:ARG] WORKDIR [--config.key=value ...]" >&2; exit 2; }
    config=$1 workdir=$2
    shift 2
    ssh_all "cd ~/compmod_jax && python3 -m compmod_jax.main --distributed --config=$config --workdir=$workdir $*"
    ;;
  *)
    echo "usage: $0 install | run CONFIG[:ARG] WORKDIR [--config.key=value ...]" >&2
    exit 2
    ;;
esac
