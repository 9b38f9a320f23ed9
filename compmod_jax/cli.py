"""What the command-line entry points (main, plan, surgery) share."""
import logging as python_logging
import os
import sys

from absl import logging


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
