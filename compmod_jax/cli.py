"""What the command-line entry points (main, plan) share before their flags are parsed."""
import os
import sys


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
