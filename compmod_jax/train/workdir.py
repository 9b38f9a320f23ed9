"""Files in the run's workdir, local or on GCS (gs://...), through etils.epath."""
import json
import uuid

from etils import epath


def prepare(workdir):
  """Creates the workdir and checks it is writable, before any heavy work.

  Returns it as an absolute path (orbax refuses relative checkpoint paths, and a relative path
  would change meaning if anything changed the working directory).
  """
  if not str(workdir or "").strip():
    raise ValueError("--workdir is empty (an unset shell variable?); pass --workdir=<a directory "
                     "for this run's checkpoints and results>. The current directory is never "
                     "used by default.")
  path = epath.Path(workdir)
  if "://" not in str(workdir):
    path = path.absolute()
  try:
    path.mkdir(parents=True, exist_ok=True)
    # One probe per process: the processes of a multi-host run probe the same workdir at once.
    probe = path / f".write_probe.{uuid.uuid4().hex}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as error:
    raise ValueError(f"The workdir {workdir!r} cannot be created or written: {error}. Pass "
                     f"--workdir=<a writable directory>.") from error
  return str(path)


def write_json(path, payload):
  """Writes JSON through a temporary file and a rename, so readers never see half a file."""
  path = epath.Path(path)
  temporary = path.with_name(path.name + ".tmp")
  temporary.write_text(json.dumps(payload, indent=2, sort_keys=True))
  temporary.replace(path)


def read_json(path):
  path = epath.Path(path)
  return json.loads(path.read_text()) if path.exists() else None
