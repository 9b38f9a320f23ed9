"""The command layer every command shares (main, plan, surgery, analysis.perturb,
analysis.tables): `run_command` parses the flags and runs the command so that a user's
mistake is one last line, `<command>: <error>`, and exit code 1; --traceback adds where it
was raised. Also the config folder on the import path, quiet library logs and the
compilation cache."""
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
# checkpoint, an argument) or what happened to it (NaNs, corruption): reported as one line,
# the message that says what to change, unless --traceback asks where it was raised. Anything
# else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError,
               nonfinite.NonFiniteError, checkpoint.CorruptCheckpointError,
               checkpoint.SaveFailedError)

flags.DEFINE_bool("traceback", False, "On an error, also show where it was raised.")


class CommandError(ValueError):
  """A command line the command cannot run: wrong positional arguments or flag values."""


def run_command(command, main):
  """Runs `main(argv)` as `command` (its `python -m` name) under absl, with the flags parsed
  by `parse_flags` and the run by `report_user_errors`."""
  make_config_folder_importable(sys.argv)

  def run_main(argv):
    quiet_library_logs()
    return report_user_errors(command, lambda: main(argv))

  app.run(run_main, flags_parser=lambda argv: parse_flags(command, argv))


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
    exit_with_one_line(command, f"{type(error).__name__}: {error}")


def exit_with_one_line(command, message):
  """Ends the process at once with `<command>: <message>` as its last line, exit code 1."""
  logging.flush()
  sys.stdout.flush()
  sys.stderr.write(f"{command}: {message}\n")
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
  """Keeps a command's log readable: see _QuietLibraries and _drop_closed_loop_callbacks."""
  logging.get_absl_handler().addFilter(_QuietLibraries())
  sys.unraisablehook = _drop_closed_loop_callbacks


def _drop_closed_loop_callbacks(unraisable, report=sys.unraisablehook):
  """Drops tensorstore's callbacks into an asyncio loop that orbax has already closed: after a
  failed read of a damaged checkpoint, each pending read reports "Event loop is closed" with a
  traceback (about 190 of them for three damaged steps), burying the one error that matters.
  Every other unraisable exception is reported as before."""
  if not (isinstance(unraisable.exc_value, RuntimeError)
          and str(unraisable.exc_value) == "Event loop is closed"):
    report(unraisable)


def parse_flags(command, argv):
  """absl's flag parsing (app.run's flags_parser), except that a mistake is one line: an
  unknown flag, a bad value, a missing required flag, a config file that cannot load, and a
  config override naming no field of the config (`--config.optimizer.lr=0.1`: named with the
  fields that are there, instead of a traceback from inside ml_collections)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    lines = [line for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1:  # a config file that raised: the flag, then its own error's last line
      lines = [lines[0], lines[-1]]
    exit_with_one_line(command, " ".join(lines) + " (--helpfull lists the flags)")
  except (AttributeError, KeyError) as error:
    exit_with_one_line(command, str(unknown_override(argv) or error))


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
