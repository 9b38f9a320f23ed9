"""Checkpoints in the workdir: orbax for the train state and run metadata, tf.train.Checkpoint
for each process's data-stream position, so a resumed run continues exactly where it stopped.

Layout:  <workdir>/checkpoints/<step>/{state,meta}          (orbax, async, atomic per step)
         <workdir>/data_state/<step>/<task>/process_<i>      (written before the orbax save)
"""
import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

# Keys that only change how a run reports or saves, not what it computes: a resumed run may
# change them. Any other difference from the checkpoint's config is refused.
RUN_CONTROL_KEYS = ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                    "data.data_dir")


class Checkpointer:

  def __init__(self, workdir, keep):
    self.workdir = epath.Path(workdir)
    self.manager = ocp.CheckpointManager(
        self.workdir / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state, meta, streams):
    """Saves the data positions synchronously, then the state asynchronously."""
    for task, stream in streams.items():
      stream.save(str(self._data_prefix(step, task)))
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)))
    self._remove_stale_data_state()

  def read_meta(self, step):
    """The run metadata of a step (its config among it), without touching the arrays."""
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def restore(self, step, abstract_state, streams):
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    for task, stream in streams.items():
      prefix = self._data_prefix(step, task)
      if not prefix.parent.exists():
        raise FileNotFoundError(
            f"Checkpoint step {step} in {self.workdir} has no data-stream position for task "
            f"{task!r} (expected {prefix.parent}); the run cannot resume exactly. "
            f"Start it in a new workdir.")
      stream.restore(str(prefix))
    return restored.state

  def close(self):
    """Finishes pending asynchronous saves; call on every exit path."""
    self.manager.wait_until_finished()
    self.manager.close()

  def _data_prefix(self, step, task):
    return (self.workdir / "data_state" / str(step) / task / f"process_{jax.process_index()}"
            / "position")

  def _remove_stale_data_state(self):
    kept = set(self.manager.all_steps())
    if not kept:
      return
    for step_dir in (self.workdir / "data_state").iterdir():
      if int(step_dir.name) < min(kept):
        step_dir.rmtree(missing_ok=True)


def config_conflicts(saved_config, config):
  """Differences between a checkpoint's config and the new one, except run-control keys."""
  saved = traverse_util.flatten_dict(saved_config, sep=".")
  new = traverse_util.flatten_dict(_jsonable(config.to_dict()), sep=".")
  keys = sorted(set(saved) | set(new))
  return [f"{key}: checkpoint has {saved.get(key)!r}, new config has {new.get(key)!r}"
          for key in keys if key not in RUN_CONTROL_KEYS and saved.get(key) != new.get(key)]


def _jsonable(value):
  """The config as JSON would give it back (tuples become lists)."""
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  return value
