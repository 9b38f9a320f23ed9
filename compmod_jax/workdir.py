"""A run's workdir, local or on GCS (gs://...), through etils.epath: `Workdir` owns the names
of the files in it, and `RunStart` is how the run started (a checkpoint it grew from, the new
tasks it built), saved in every checkpoint and in results.json. Below every other layer: the
trainer writes a workdir, the fine-tuning package and the tables read it."""
import dataclasses
import json
import uuid
from typing import Optional

from etils import epath


class Workdir:
  """The files of one run's workdir (README, "What lands in the workdir")."""

  def __init__(self, path):
    self.path = epath.Path(path)
    self.config_json = self.path / "config.json"
    self.results_json = self.path / "results.json"
    self.accuracy_table = self.path / "accuracy_table.md"
    self.checkpoints = self.path / "checkpoints"
    # data_state/<step>/<task>/process_<i>/: each process's input position at a checkpoint.
    self.data_state = self.path / "data_state"
    self.corrupt_checkpoints = self.path / "corrupt_checkpoints"
    self.delta = self.path / "delta"
    # Where a config with a `pretrain` section and no init_from pretrains first.
    self.pretrained = self.path / "pretrained"
    # Where `surgery prune --refit_steps` re-fits the pruned model.
    self.refit = self.path / "refit"

  def checkpoint(self, step):
    return self.checkpoints / str(step)

  def picture(self, name):
    return self.path / f"{name}.png"

  def perturbation(self, suffix):
    """perturbation.{json,md,png}, written by `python -m compmod_jax.analysis.perturb`."""
    return self.path / f"perturbation.{suffix}"

  def read_results(self):
    """results.json, or None before the run's first evaluation."""
    return read_json(self.results_json)

  def write_results(self, payload):
    write_json(self.results_json, payload)

  def write_config(self, config):
    self.config_json.write_text(config.to_json_best_effort(indent=2, sort_keys=True))


@dataclasses.dataclass
class RunStart:
  """How a run started, when not from scratch: saved as "run_info" in every checkpoint's meta
  and as "init_from" in results.json (a fresh run has neither)."""
  # {task: classes} of the tasks the model holds beyond config.tasks (frozen sources).
  source_tasks: dict = dataclasses.field(default_factory=dict)
  checkpoint: str = ""          # the checkpoint step directory config.init_from named
  step: int = 0                 # its step
  xi_init: str = ""
  trainable: str = ""           # config.trainable, or "lr_multipliers"
  trainable_parameters: int = 0
  # {task: how its variables were built}: finetune/transfer.py initialise_new_task's record
  # (xi_init, coefficients, initial_xi, added_parameters, ...) plus accuracy_before_finetune.
  new_tasks: dict = dataclasses.field(default_factory=dict)
  added_templates: Optional[dict] = None   # finetune/growth.py's record, when it added some
  surgery: Optional[dict] = None           # a workdir written by `surgery`: what it did

  def __bool__(self):
    return bool(self.checkpoint or self.surgery or self.source_tasks)

  def to_dict(self):
    """The JSON form; {} for a run started from scratch."""
    return dataclasses.asdict(self) if self else {}

  # Keys older versions wrote that no longer mean anything (the target domain's name, written
  # from 2026-11-22 to 11-30, is config.adaptation.target): read and dropped.
  OBSOLETE_KEYS = ("adaptation_target",)

  @classmethod
  def from_dict(cls, record):
    """From the JSON form (any older checkpoint's "run_info"); an unknown key is an error."""
    record = {key: value for key, value in (record or {}).items()
              if key not in cls.OBSOLETE_KEYS}
    fields = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(record) - fields)
    if unknown:
      raise ValueError(f"A run record with unknown field(s) {unknown} (known: {sorted(fields)}); "
                       f"was the checkpoint written by a newer compmod_jax?")
    return cls(**record)


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
