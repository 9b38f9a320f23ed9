"""A fine-tuning run shipped as a delta, and a run that starts from a base plus deltas.

config.save_delta=True, on a run from config.init_from: once the run is finished it also
writes <workdir>/delta/ (through a temporary directory and a rename: a delta is whole or
absent), holding what the run added to or trained in the model it started from (the base):
  - every variable of the run's tasks (config.tasks): their rows of the per-task arrays (mixture
    logits, per-task BN and its moving statistics) and their heads;
  - the rows it appended to a shared array (the templates it added, finetune/growth.py);
  - any other shared array it changed, whole (a run that trains shared parameters makes a
    delta as large as they are).
delta.npz holds these arrays as evaluated (EMA parameters, BN moving statistics); delta.json
says where each goes, the base's fingerprint (the sha256 of every variable all tasks share,
which is all the delta's tasks compute with besides their own rows), the tasks {name:
classes}, the number of added templates, the sha256 of delta.npz and the sizes.

config.deltas=("<dir>", ...) with config.init_from=<base>: the base checkpoint, then each delta
in order, refusing one whose fingerprint is not that of the model so far. Deltas of different
tasks trained against one base apply together (each task's rows are its own); a delta made on
a model another delta grew needs that one first. Every task then holds exactly the variables of
the run that trained it: the same predictions, bit for bit.
"""
import dataclasses
import hashlib
import io
import json

import jax
import numpy as np
from etils import epath
from flax import traverse_util

from compmod_jax.finetune import growth, pretrained
from compmod_jax.models import network_spec, templates
from compmod_jax.train import checkpoint
from compmod_jax.workdir import Workdir, write_json

MIXTURE_PATHS = tuple(f"params/{name}" for name in templates.MIXTURE_PARAMS)


def check_config(config):
  """Errors for config.save_delta and config.deltas, raised before any heavy work."""
  if config.save_delta and not (config.init_from or config.get("pretrain")):
    raise ValueError("config.save_delta=True writes what a run changed in the model it started "
                     "from: set config.init_from=<that model's workdir>.")
  if not all(isinstance(d, str) for d in config.deltas):
    raise ValueError(f"config.deltas must be a tuple of delta directories, e.g. "
                     f"--config.deltas='(\"<workdir>/delta\",)', got {config.deltas!r}")
  if config.deltas and not config.init_from:
    raise ValueError("config.deltas apply to a base checkpoint: set config.init_from=<the base "
                     "run's workdir>.")


def shared_checksums(variables, spec):
  """{path: sha256} of every variable all of `spec`'s tasks share."""
  flat = traverse_util.flatten_dict(variables, sep="/")
  return {path: _checksum(value) for path, value in sorted(flat.items())
          if network_spec.task_owners(spec, path) is None}


def _checksum(array):
  return checkpoint.array_checksums(np.asarray(array))[""]  # one array: its tree path is ""


def fingerprint(checksums):
  return hashlib.sha256(json.dumps(checksums, sort_keys=True).encode()).hexdigest()


def written(workdir):
  """Whether the run in `workdir` has written its delta."""
  return (Workdir(workdir).delta / "delta.json").exists()


def save(ctx, state, base):
  """Writes ctx.workdir/delta for the finished run's `state` against `base` (the
  pretrained.Pretrained it started from); process 0 writes, the others return."""
  out = Workdir(ctx.workdir).delta
  if jax.process_index() != 0:
    return
  own = ctx.method.own_params
  params = {k: v for k, v in jax.device_get(state.ema_params).items() if k != own}
  final = {"params": params, "batch_stats": jax.device_get(state.batch_stats)}
  arrays, index = _delta_arrays(final, base, ctx.model.spec, sorted(ctx.config.tasks))
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  payload = buffer.getvalue()
  base_checksums = shared_checksums(base.variables, ctx.model.spec)
  model_bytes = sum(np.asarray(v).nbytes for v in jax.tree.leaves(final))
  base_templates = growth.bank_size(base.variables)
  info = {
      "base": {"checkpoint": str(base.step_dir), "step": base.step,
               "num_templates": base_templates},
      "fingerprint": fingerprint(base_checksums), "fingerprint_paths": sorted(base_checksums),
      "tasks": {task: classes for task, classes in ctx.model.spec.tasks
                if task in ctx.config.tasks},
      "added_templates": growth.bank_size(final) - base_templates,
      "arrays": index, "npz_sha256": hashlib.sha256(payload).hexdigest(),
      "bytes": len(payload), "model_bytes": int(model_bytes)}
  temporary = epath.Path(str(out) + ".tmp")
  if temporary.exists():
    temporary.rmtree()
  temporary.mkdir(parents=True)
  (temporary / "delta.npz").write_bytes(payload)
  write_json(temporary / "delta.json", info)
  temporary.rename(out)


def _delta_arrays(final, base, spec, run_tasks):
  """({key: array}, [where each goes]) of the delta of `final` against `base`."""
  flat = traverse_util.flatten_dict(final, sep="/")
  old = traverse_util.flatten_dict(base.variables, sep="/")
  arrays, index = {}, []

  def put(kind, path, value, task=None):
    key = f"a{len(arrays)}"
    arrays[key] = np.asarray(value)
    index.append({"kind": kind, "path": path, "task": task, "key": key})

  for path, value in sorted(flat.items()):
    owners = network_spec.task_owners(spec, path)
    value = np.asarray(value)
    if owners is not None:
      for task in run_tasks:
        if task in owners:
          put("task_row" if len(owners) > 1 else "task_head", path,
              value[owners.index(task)] if len(owners) > 1 else value, task)
      continue
    before = old.get(path)
    if before is not None and before.shape == value.shape and np.array_equal(before, value):
      continue
    if (before is not None and before.shape[1:] == value.shape[1:]
        and np.array_equal(before, value[:before.shape[0]])):
      put("added_rows", path, value[before.shape[0]:])
    else:
      put("replaced", path, value)
  return arrays, index


@dataclasses.dataclass(frozen=True)
class Delta:
  directory: str
  info: dict
  arrays: dict


def read(directory):
  """The delta in `directory`, its arrays checked against the recorded sha256."""
  path = epath.Path(directory)
  if not (path / "delta.json").exists() or not (path / "delta.npz").exists():
    raise pretrained.PretrainedCheckpointError(
        f"config.deltas: {directory} holds no delta.json and delta.npz; name the delta/ "
        f"directory a run with config.save_delta=True wrote.")
  info = json.loads((path / "delta.json").read_text())
  payload = (path / "delta.npz").read_bytes()
  if hashlib.sha256(payload).hexdigest() != info["npz_sha256"]:
    raise pretrained.PretrainedCheckpointError(
        f"config.deltas: {directory}/delta.npz does not match the checksum in its delta.json "
        f"(damaged or changed); copy it again from the run that wrote it.")
  with np.load(io.BytesIO(payload)) as npz:
    arrays = {key: npz[key] for key in npz.files}
  return Delta(directory=str(directory), info=info, arrays=arrays)


def with_deltas(source, directories):
  """The pretrained.Pretrained `source` with the deltas in `directories` applied in order."""
  variables, tasks = source.variables, dict(source.tasks)
  for directory in directories:
    delta = read(directory)
    _check_fingerprint(delta, variables, source.step_dir)
    variables = _apply(delta, variables, tasks)
    tasks.update(delta.info["tasks"])
  return dataclasses.replace(source, variables=variables)


def _check_fingerprint(delta, variables, base_dir):
  flat = traverse_util.flatten_dict(variables, sep="/")
  paths = delta.info["fingerprint_paths"]
  checksums = {path: _checksum(flat[path]) for path in paths if path in flat}
  if len(checksums) != len(paths) or fingerprint(checksums) != delta.info["fingerprint"]:
    raise pretrained.PretrainedCheckpointError(
        f"config.deltas: {delta.directory} was trained against another model than "
        f"{base_dir} plus the deltas before it (its fingerprint differs). It was made on "
        f"{delta.info['base']['checkpoint']} (step {delta.info['base']['step']}); apply deltas "
        f"to that base, in the order they were made.")


def _apply(delta, variables, tasks):
  """`variables` of the model with `tasks` {name: classes}, with `delta` applied."""
  flat = {path: np.asarray(value)
          for path, value in traverse_util.flatten_dict(variables, sep="/").items()}
  names = sorted(tasks)
  merged = sorted(set(names) | set(delta.info["tasks"]))
  rows = {}  # path -> {task: row} for the per-task arrays the delta has rows of
  for entry in delta.info["arrays"]:
    value, path = delta.arrays[entry["key"]], entry["path"]
    if entry["kind"] == "task_head":
      flat[path] = value
    elif entry["kind"] == "task_row":
      rows.setdefault(path, {})[entry["task"]] = value
    elif entry["kind"] == "added_rows":
      flat[path] = np.concatenate([flat[path], value])
    else:
      flat[path] = value
  added = delta.info["added_templates"]
  for path, new_rows in rows.items():
    old = growth.padded_logits(flat[path], added) if path in MIXTURE_PATHS else flat[path]
    flat[path] = np.stack([new_rows[task] if task in new_rows else old[names.index(task)]
                           for task in merged])
  return traverse_util.unflatten_dict(flat, sep="/")
