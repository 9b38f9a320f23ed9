"""Starting a run from another run's checkpoint (transfer learning, paper §4.3).

`config.init_from` names a workdir (its newest checkpoint that reads back intact is used) or one
step directory `<workdir>/checkpoints/<step>`. That checkpoint is only read, never changed. Its
arrays come back as host numpy arrays, checked against the checksums saved with them, so a
checkpoint written on N devices loads on any number of devices. The evaluated weights (the EMA)
are what is loaded, with the BN moving statistics.

Loading is strict (`merge`): every variable of the new model comes from the checkpoint, except
 - rows and heads of tasks the checkpoint does not have (the new tasks; finetune/transfer.py
   initialises them), and
 - variables a `config.transfer.dont_load` rule (a regex over paths such as
   "params/output_adapter/dense_kernel") names: they keep their fresh initialisation.
A variable the checkpoint shares among its tasks and the new model keeps per task (a per-task
input adapter) is loaded into every task's row.
Anything else present on one side only, or with another shape, is an error naming it.
"""
import dataclasses
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import traverse_util

from compmod_jax.models import network_spec
from compmod_jax.train import checkpoint
from compmod_jax.workdir import Workdir

LOADED_COLLECTIONS = {"params": "ema_params", "batch_stats": "batch_stats"}


class PretrainedCheckpointError(ValueError):
  """config.init_from names no usable checkpoint, or one that does not fit the model."""


@dataclasses.dataclass(frozen=True)
class Pretrained:
  step_dir: epath.Path
  step: int
  config: dict      # the pretrained run's config, from its checkpoint
  variables: dict   # {"params": EMA params, "batch_stats": ...}, numpy

  @property
  def tasks(self):
    """{task: number of classes} of the checkpoint's model."""
    return {task: int(head["bias"].shape[0])
            for task, head in self.variables["params"]["heads"].items()}


def load(init_from):
  """The checkpoint `init_from` names, read and verified."""
  path = epath.Path(init_from).absolute()
  if Workdir(path).checkpoints.is_dir():
    checkpoints_dir, step = Workdir(path).checkpoints, None
  elif path.name.isdigit() and Workdir(path.parent.parent).checkpoints == path.parent and (
      path.is_dir()):
    checkpoints_dir, step = path.parent, int(path.name)
  else:
    raise PretrainedCheckpointError(
        f"config.init_from={init_from!r} is neither a workdir with a checkpoints/ directory nor "
        f"a step directory <workdir>/checkpoints/<step>. Point it at the pretraining run's "
        f"--workdir.")
  manager = ocp.CheckpointManager(checkpoints_dir,
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    if step is not None:
      return _read(manager, checkpoints_dir, step)
    return _newest_intact(manager, checkpoints_dir)
  finally:
    manager.close()


def _newest_intact(manager, checkpoints_dir):
  steps = manager.all_steps()
  if not steps:
    raise PretrainedCheckpointError(f"config.init_from: {checkpoints_dir} holds no finished "
                                    f"checkpoint. Has the pretraining run saved one yet?")
  for step in sorted(steps, reverse=True):
    try:
      return _read(manager, checkpoints_dir, step)
    except checkpoint.CorruptCheckpointError as error:
      logging.error("%s\nTrying the checkpoint before it.", error)
  raise PretrainedCheckpointError(f"config.init_from: no checkpoint in {checkpoints_dir} reads "
                                  f"back intact (steps {sorted(steps)}; errors above).")


def _read(manager, checkpoints_dir, step):
  step_dir = checkpoints_dir / str(step)
  meta = checkpoint.read_meta(manager, step, step_dir)
  state_dir = step_dir / "state"
  try:
    tree = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = ocp.PyTreeCheckpointer().restore(
        state_dir, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
  except Exception as error:  # orbax/tensorstore raise many types for unreadable files
    raise checkpoint.corrupt(step, step_dir, f"its state cannot be read ({error})") from error
  variables = {name: state[field] for name, field in LOADED_COLLECTIONS.items()}
  _verify(step, step_dir, meta["checksums"], variables)
  logging.info("Loaded pretrained checkpoint %s (step %d).", step_dir, step)
  return Pretrained(step_dir=step_dir, step=step, config=meta["config"], variables=variables)


def _verify(step, step_dir, saved_checksums, variables):
  """Checks the loaded arrays against the checksums saved with the train state, whose paths
  read ".ema_params['heads']..." where the restored dict reads "['ema_params']['heads']..."."""
  state_fields = {LOADED_COLLECTIONS[name]: tree for name, tree in variables.items()}
  actual = {re.sub(r"^\['(\w+)'\]", r".\1", path): digest
            for path, digest in checkpoint.array_checksums(state_fields).items()}
  expected = {path: saved_checksums.get(path) for path in actual}
  problems = checkpoint.checksum_problems(expected, actual)
  if problems:
    raise checkpoint.corrupt(step, step_dir, problems[0])


@dataclasses.dataclass
class MergeReport:
  loaded: list           # paths taken from the checkpoint (task rows counted per path)
  new: list              # paths of new tasks' heads, or arrays with new tasks' rows
  not_loaded: dict       # {path: the dont_load rule that kept it fresh}


def merge(fresh, pretrained_variables, spec, source_tasks, dont_load=()):
  """The new model's variables {"params", "batch_stats"} (numpy) with everything the checkpoint
  holds loaded into them; `fresh` gives the shapes and the initial values of what is new.

  `spec` is the new model's NetworkSpec; `source_tasks` the checkpoint's task names in the
  order of its task axis (sorted, as every model orders its tasks). Raises
  PretrainedCheckpointError listing every mismatch by path.
  """
  rules = [(rule, re.compile(rule)) for rule in dont_load]
  fresh_flat = traverse_util.flatten_dict(fresh, sep="/")
  old_flat = traverse_util.flatten_dict(pretrained_variables, sep="/")
  merged, problems = {}, []
  report = MergeReport(loaded=[], new=[], not_loaded={})
  used_rules = set()
  for path in sorted(set(fresh_flat) | set(old_flat)):
    rule = next((text for text, pattern in rules if pattern.search(path)), None)
    if rule is not None:
      used_rules.add(rule)
      if path in fresh_flat:
        merged[path] = np.asarray(fresh_flat[path])
        report.not_loaded[path] = rule
      continue
    if path not in old_flat:
      if _new_task_head(path, source_tasks):
        merged[path] = np.asarray(fresh_flat[path])
        report.new.append(path)
      else:
        problems.append(f"{path} {tuple(fresh_flat[path].shape)} is in the model but not in "
                        f"the checkpoint")
      continue
    if path not in fresh_flat:
      problems.append(f"{path} {tuple(old_flat[path].shape)} is in the checkpoint but not in "
                      f"the model")
      continue
    value, problem = _load_one(path, np.asarray(fresh_flat[path]), np.asarray(old_flat[path]),
                               spec, source_tasks)
    if problem:
      problems.append(problem)
      continue
    merged[path] = value
    partly_new = network_spec.task_owners(spec, path) is not None and any(
        task not in source_tasks for task in network_spec.task_owners(spec, path))
    (report.new if partly_new else report.loaded).append(path)
  unused = [text for text, _ in rules if text not in used_rules]
  if unused:
    problems.append(f"config.transfer.dont_load rule(s) {unused} match no variable")
  if problems:
    raise PretrainedCheckpointError(
        "The pretrained checkpoint does not fit this model:\n  " + "\n  ".join(problems) +
        "\nIf a difference is intended, add a regex for it to config.transfer.dont_load (those "
        "variables keep their fresh initialisation); otherwise give the model the pretraining "
        "run's config.model.")
  return traverse_util.unflatten_dict(merged, sep="/"), report


def _new_task_head(path, source_tasks):
  return path.startswith("params/heads/") and path.split("/")[2] not in source_tasks


def _load_one(path, fresh, old, spec, source_tasks):
  """(value, None) or (None, problem) for a variable both sides have."""
  owners = network_spec.task_owners(spec, path)
  if owners is None or len(owners) == 1:
    if fresh.shape != old.shape:
      return None, (f"{path} has shape {tuple(old.shape)} in the checkpoint and "
                    f"{tuple(fresh.shape)} in the model")
    return old, None
  if old.shape == fresh.shape[1:]:
    # Shared in the checkpoint, one row per task here (e.g. config.model.input_adapter =
    # "per_task" started from a shared adapter): every task starts from the shared value.
    return np.broadcast_to(old, fresh.shape).copy(), None
  # One row per task: the checkpoint's rows go to the same tasks by name.
  if fresh.shape[1:] != old.shape[1:] or old.shape[0] != len(source_tasks):
    return None, (f"{path} has shape {tuple(old.shape)} in the checkpoint (tasks "
                  f"{list(source_tasks)}) and {tuple(fresh.shape)} in the model (tasks "
                  f"{list(owners)}); beyond the task axis they must agree")
  value = fresh.copy()
  for row, task in enumerate(owners):
    if task in source_tasks:
      value[row] = old[source_tasks.index(task)]
  return value, None
