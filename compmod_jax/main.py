"""Trains and evaluates one experiment config.

  python -m compmod_jax.main --config=configs/digits.py --workdir=/tmp/digits
  python -m compmod_jax.main --config=configs/digits.py:tiny --workdir=/tmp/t --config.seed=1

Rerunning the same command resumes from the workdir's last checkpoint. On a TPU pod, run the
same command on every worker (see launch/tpu_pod.sh); --distributed initialises
jax.distributed first.
"""
import os

if __name__ == "__main__":  # before JAX and TensorFlow load, which a restart would load twice
  from compmod_jax import fast_malloc, supervisor
  fast_malloc.restart_with_fast_malloc()
  supervisor.supervise_if_distributed()

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from compmod_jax import cli, peers  # noqa: E402
from compmod_jax.train import loop  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, pictures and results.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-host; "
                  "on Cloud TPU it finds the coordinator by itself).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process "
                    "runs outside Cloud TPU (implies --distributed).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.DEFINE_integer("initialization_timeout", 300, "With --distributed or "
                     "--coordinator_address: seconds to wait for every process to join before "
                     "giving up with one line.", lower_bound=1)
flags.DEFINE_integer("heartbeat_timeout", 30, "With several processes: seconds after which a "
                     "process that sends no heartbeat counts as lost, and every process stops "
                     "with one line naming it.", lower_bound=1)
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise cli.CommandError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.coordinator_address and (FLAGS.num_processes is not None
                                        or FLAGS.process_id is not None):
    raise cli.CommandError("--num_processes and --process_id need "
                           "--coordinator_address=host:port (process 0's); without it this "
                           "would run as a single process.")
  if FLAGS.coordinator_address or FLAGS.distributed:
    peers.initialize(FLAGS)
  logging.info("JAX process %d/%d, local devices %s", jax.process_index(), jax.process_count(),
               jax.local_devices())
  cli.use_compilation_cache(FLAGS.config.compilation_cache_dir)
  try:
    results = loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except Exception as error:
    if peers.lost_a_peer(error):
      peers.await_verdict(error, FLAGS.heartbeat_timeout)
    peers.tell_peers_and_wait(f"{type(error).__name__}: {error}".splitlines()[0])
    raise
  if results:
    for task, values in sorted(results["tasks"].items()):
      logging.info("final %s test accuracy: %.4f", task, values["test_accuracy"])


def run():
  """Console-script entry point (`compmod`)."""
  from compmod_jax import fast_malloc, supervisor
  fast_malloc.restart_with_fast_malloc()
  supervisor.supervise_if_distributed()
  cli.run_command("compmod_jax.main", main)


if __name__ == "__main__":
  run()
