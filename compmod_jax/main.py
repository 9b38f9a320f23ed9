"""Trains and evaluates one experiment config.

  python -m compmod_jax.main --config=configs/digits.py --workdir=/tmp/digits
  python -m compmod_jax.main --config=configs/digits.py:tiny --workdir=/tmp/t --config.seed=1

Rerunning the same command resumes from the workdir's last checkpoint. On a TPU pod, run the
same command on every worker (see launch/tpu_pod.sh); --distributed initialises
jax.distributed first.
"""
import os
import threading

if __name__ == "__main__":  # before JAX and TensorFlow load, which a restart would load twice
  from compmod_jax import fast_malloc
  fast_malloc.restart_with_fast_malloc()

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from compmod_jax import cli  # noqa: E402
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
    initialize_distributed(FLAGS.initialization_timeout)
  logging.info("JAX process %d/%d, local devices %s", jax.process_index(), jax.process_count(),
               jax.local_devices())
  cli.use_compilation_cache(FLAGS.config.compilation_cache_dir)
  results = loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if results:
    for task, values in sorted(results["tasks"].items()):
      logging.info("final %s test accuracy: %.4f", task, values["test_accuracy"])


def initialize_distributed(timeout):
  """jax.distributed.initialize, giving up after `timeout` seconds with one line when not every
  process joins (a peer that never started, a wrong address). JAX's own time limit aborts the
  process from C++ with a stack dump, so ours fires first and JAX's is set later."""
  where = FLAGS.coordinator_address or "the address Cloud TPU's metadata gives"
  who = (f"process {FLAGS.process_id} of {FLAGS.num_processes}" if FLAGS.coordinator_address
         else "this process")
  logging.info("%s: joining the coordinator at %s; waiting up to %d s for every process "
               "(--initialization_timeout).", who, where, timeout)
  start = (f"start the same command with --process_id 0 to {FLAGS.num_processes - 1}"
           if FLAGS.coordinator_address else "start the same command on every worker")
  give_up = threading.Timer(timeout, lambda: cli.exit_with_one_line(
      "compmod_jax.main", f"{who} waited {timeout} s at {where} and not every process joined; "
      f"{start}, check the address, or wait longer with --initialization_timeout."))
  give_up.daemon = True
  give_up.start()
  jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                             initialization_timeout=timeout + 60)
  give_up.cancel()


def run():
  """Console-script entry point (`compmod`)."""
  from compmod_jax import fast_malloc
  fast_malloc.restart_with_fast_malloc()
  cli.run_command("compmod_jax.main", main)


if __name__ == "__main__":
  run()
