"""What the command-line entry points (main, plan, surgery) share."""
import difflib
import logging as python_logging
import os
import sys

import jax
import ml_collections
from absl import app, flags, logging
from etils import epath

from compmod_jax.train import checkpoint, nonfinite


# What a run can fail with because of what the user gave it (a config, a workdir, a dataset, a
# checkpoint) or what happened to it (NaNs, corruption): reported as one line, the message
# that says what to change, unless --traceback asks where it was raised. Anything else is a
# bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError,
               nonfinite.NonFiniteError, checkpoint.CorruptCheckpointError)

flags.DEFINE_bool("traceback", False, "On an error, also show where it was raised.")


def report_user_errors(command, run):
  """Calls run(); a USER_ERRORS exception ends the process with one line naming `command` and
  the message (exit code 1), and Ctrl-C during training with exit code 130.

  After a user error the process ends at once (os._exit), once the line and the logs are
  flushed: the run has already closed its checkpoints, and interpreter shutdown would let
  libraries' background threads print after the line (orbax's asyncio loop, after a failed
  read, raised "Event loop is closed" twice in the process the allocator restart started)."""
  try:
    return run()
  except KeyboardInterrupt:
    sys.exit(130)
  except USER_ERRORS as error:
    if flags.FLAGS.traceback:
      raise
    logging.flush()
    sys.stdout.flush()
    sys.stderr.write(f"{command}: {type(error).__name__}: {error}\n")
    sys.stderr.flush()
    os._exit(1)


def use_compilation_cache(directory):
  """Keeps every compiled program in `directory` (config.compilation_cache_dir) and reuses it
  when the same program is compiled again, in this run or a later one; "" leaves the cache
  off. Every program is kept, however quick to compile: a run compiles dozens of small ones
  besides its train step, and together they take seconds at every start."""
  if not directory:
    return
  if "://" not in directory:
    try:
      epath.Path(directory).mkdir(parents=True, exist_ok=True)
    except OSError as error:
      raise ValueError(f"config.compilation_cache_dir={directory!r} cannot be created "
                       f"({error.strerror or error}); give a writable folder, or '' to compile "
                       f"without a cache.") from None
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  logging.info("Compiled programs are kept in and reused from %s "
               "(config.compilation_cache_dir).", directory)


def make_config_folder_importable(argv):
  """Config files import their shared recipes as `configs.common`: puts the folder that holds
  the config file's folder (the repository root for configs/<file>.py) on the import path, so
  a command works from any working directory."""
  for index, arg in enumerate(argv):
    path = arg.partition("=")[2] if arg.startswith("--config=") else None
    if arg == "--config" and index + 1 < len(argv):
      path = argv[index + 1]
    if path:
      folder = os.path.dirname(os.path.dirname(os.path.abspath(path.split(":")[0])))
      sys.path.insert(0, folder)


class _QuietLibraries(python_logging.Filter):
  """Drops INFO lines of libraries that log every file they touch (orbax, TFDS); their
  warnings and errors still show."""
  NOISY = ("/orbax/", "/tensorflow_datasets/")

  def filter(self, record):
    return (record.levelno >= python_logging.WARNING
            or not any(part in record.pathname for part in self.NOISY))


def quiet_library_logs():
  """Keeps a command's log readable: see _QuietLibraries."""
  logging.get_absl_handler().addFilter(_QuietLibraries())


def parse_flags(argv):
  """absl's flag parsing (app.run's flags_parser), except that a config override naming no
  field of the config (`--config.optimizer.lr=0.1`) is one line naming the field and the
  fields that are there, instead of a traceback from inside ml_collections."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as error:
    sys.exit(f"FATAL Flags parsing error: {unknown_override(argv) or error}")


def unknown_override(argv):
  """What is wrong with the first `--config.<path>=` argument whose path the loaded config
  lacks, or None."""
  config_file = next((arg.partition("=")[2] for arg in argv if arg.startswith("--config=")),
                     None)
  if not config_file:
    return None
  config = flags.FLAGS["config"].parser.parse(config_file)  # the file's config, unchanged
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].partition("=")[0]
    node, walked = config, "config"
    for part in path.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        fields = sorted(node) if isinstance(node, ml_collections.ConfigDict) else []
        close = difflib.get_close_matches(part, fields, n=1)
        return (f"--config.{path}: {walked} has no field {part!r}"
                + (f"; did you mean {walked}.{close[0]}?" if close else
                   f"; its fields are {fields}."))
      node, walked = node[part], f"{walked}.{part}"
  return None
