"""Checkpoints in the workdir: orbax for the train state and run metadata, tf.train.Checkpoint
for each process's data-stream position, so a resumed run continues exactly where it stopped.

Layout:  <workdir>/checkpoints/<step>/{state,meta}          (orbax, async, atomic per step)
         <workdir>/data_state/<step>/<task>/process_<i>      (written before the orbax save)
         <workdir>/corrupt_checkpoints/<step>                (bad steps, moved aside at resume)

Integrity (docs/reliability.md): each step's meta holds a sha256 of every array of the state,
computed on the host from the arrays being saved, because orbax does not notice a flipped byte
in array data; a restore recomputes and compares them. The data-stream files carry TF's own
CRC32C. A step is *verified* once it has been read back and matched its checksums, and old
steps are deleted only when `keep` newer verified ones exist: the last good checkpoint is never
deleted before a newer one is known to be good. A save interrupted by a crash leaves an orbax
temporary directory, which the next run ignores and removes.
"""
import contextlib
import hashlib

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from compmod_jax.train import nonfinite
from compmod_jax.workdir import Workdir

# Keys that only change how a run reports, saves, compiles or guards itself, or the precision
# and memory of its step, not the model it learns: a resumed run may change them (in a
# pretraining config too). Any other difference from the checkpoint's config is refused.
RUN_CONTROL_KEYS = ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                    "data.data_dir", "max_nonfinite_skips", "on_corrupt_checkpoint",
                    "compilation_cache_dir", "model.compute_dtype", "model.remat")
# What orbax appends to the directory of a step while it is being written.
HALF_WRITTEN_MARK = ".orbax-checkpoint-tmp"


class CorruptCheckpointError(RuntimeError):
  """A checkpoint that cannot be read back exactly as it was written."""


class SaveFailedError(RuntimeError):
  """A checkpoint that could not be written (a full disk, a workdir that cannot be written any
  more, a checkpoints directory removed during the run)."""


def corrupt(step, path, reason):
  return CorruptCheckpointError(f"Checkpoint step {step} at {path} is corrupt: {reason}")

# What a failed write says, and what the user should do about it.
SAVE_FAILURES = (
    (("No space left on device", "RESOURCE_EXHAUSTED", "Disk quota exceeded"),
     "the disk is full; free space on it"),
    (("Read-only file system", "Permission denied", "PERMISSION_DENIED",
      "Operation not permitted"),
     "the workdir cannot be written any more; make it writable again"),
)


class Checkpointer:

  def __init__(self, workdir, keep):
    self.workdir = epath.Path(workdir)
    self.files = Workdir(workdir)
    self.keep = keep
    self._report_half_written()
    self.manager = ocp.CheckpointManager(
        self.files.checkpoints,
        # No max_to_keep: orbax would delete old steps right after a save, before the new one
        # is verified. _prune deletes them later.
        options=ocp.CheckpointManagerOptions(create=True, cleanup_tmp_directories=True))
    self._verified = []   # steps read back and matched their checksums, oldest first
    self._unverified = None  # (step, abstract state) of the last save
    self._failed = False  # a save failed: closing orbax raises that error again
    self._remove_data_state(lambda step: step not in self.manager.all_steps())

  def save(self, step, state, meta, streams):
    """Saves the data positions synchronously, then the state asynchronously, with the
    checksums of its arrays in the meta. Refuses a state holding a NaN or Inf."""
    host_state = jax.device_get(state)
    bad_array = nonfinite.first_nonfinite_leaf(host_state)
    if bad_array:
      raise nonfinite.NonFiniteError(
          f"Refusing to save step {step}: {bad_array} holds NaN or Inf. The checkpoints "
          f"already written (steps {list(self.manager.all_steps())}) are kept.")
    self._verify_last_save()
    with self._writing(step):
      if self.manager.all_steps() and not self.files.checkpoints.exists():
        raise FileNotFoundError(f"{self.files.checkpoints} held steps "
                                f"{list(self.manager.all_steps())} and is gone")
      for task, stream in streams.items():
        stream.save(str(self._position(step, task, jax.process_index())))
      # The host copy is saved, not the device arrays: the state is replicated, so process 0
      # writes it alone, and orbax compiles no slicing program per array and device (measured:
      # 149 programs compiled in a tiny 2-save run before, 29 after; each save 4x faster).
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(host_state),
          meta=ocp.args.JsonSave(dict(meta, checksums=array_checksums(host_state)))))
    self._unverified = (step, abstract_state(state))

  @contextlib.contextmanager
  def _writing(self, step):
    """Turns a failed write of `step` into one SaveFailedError saying why and what to do; the
    steps already committed are left as they are (the failed one stays half-written, which
    the next run removes)."""
    try:
      yield
    except Exception as error:  # noqa: BLE001 (TF, tensorstore and the OS each have their own)
      self._failed = True
      raise SaveFailedError(self._why_not_saved(step, error)) from error

  def _why_not_saved(self, step, error):
    text = str(error)
    kept = committed_steps(self.files.checkpoints)
    gone = sorted(set(self.manager.all_steps()) - set(kept))
    if gone:  # orbax may have made the directory again for the step it was writing
      why = (f"{self.files.checkpoints} was removed during the run (steps {gone} are gone; not "
             f"by this run)")
    else:
      why = next((advice for signs, advice in SAVE_FAILURES
                  if any(sign in text for sign in signs)), "the error in parentheses says why")
    resume = (f"the checkpoints already written (steps {kept}) are intact: rerun the same "
              f"command to resume from step {kept[-1]}" if kept else
              "no checkpoint is left: rerun the same command to start over")
    return (f"Saving checkpoint step {step} in {self.workdir} failed ({_first_line(error)}): "
            f"{why}; {resume}.")

  def newest_meta(self):
    """The run metadata of the newest step whose meta is readable, or None."""
    for step in reversed(self.manager.all_steps()):
      try:
        return self.read_meta(step)
      except CorruptCheckpointError:
        continue
    return None

  def read_meta(self, step):
    """The run metadata of a step (its config among it), without touching the arrays."""
    return read_meta(self.manager, step, self._step_dir(step))

  def restore_newest_good(self, abstract, streams, on_corrupt):
    """(state, meta) of the newest step that reads back exactly, with the streams moved to its
    position; (None, None) without checkpoints.

    A corrupt newer step is reported; with on_corrupt="fall_back" it is moved to
    <workdir>/corrupt_checkpoints once an older good step is found (nothing moves if none is),
    with "refuse" the error is raised and nothing changes.
    """
    bad_steps = []
    for step in reversed(self.manager.all_steps()):
      try:
        state, meta = self._restore_step(step, abstract, streams)
      except CorruptCheckpointError as error:
        if on_corrupt == "refuse":
          raise CorruptCheckpointError(
              f"{error}\nconfig.on_corrupt_checkpoint='refuse', so nothing was changed. Set it "
              f"to 'fall_back' to resume from the newest good checkpoint.") from error
        logging.error("%s\nTrying the checkpoint before it.", error)
        bad_steps.append(step)
        continue
      self._set_aside(bad_steps)
      self._verified = [step]
      return state, meta
    if bad_steps:
      raise CorruptCheckpointError(
          f"No checkpoint in {self.workdir / 'checkpoints'} reads back intact (steps "
          f"{sorted(bad_steps)}; see the errors above); nothing was moved. Move them away to "
          f"start over, or use a new --workdir.")
    return None, None

  def close(self):
    """Finishes and verifies the pending asynchronous save; call on every exit path."""
    try:
      self._verify_last_save()
    finally:
      try:
        self.manager.close()
      except Exception:  # noqa: BLE001
        if not self._failed:
          raise
        # else orbax raises the failed save's error again; SaveFailedError has said it

  def _restore_step(self, step, abstract, streams):
    meta = self.read_meta(step)
    state = self._read_state(step, abstract, meta)
    for task, stream in streams.items():
      prefix = self._data_prefix(step, task, stream)
      if prefix is None:
        continue
      try:
        stream.restore(str(prefix))
      except Exception as error:  # TF raises NotFound, DataLoss (CRC32C), OutOfRange, ...
        raise corrupt(step, prefix.parent, f"the data-stream position of task {task!r} cannot "
                      f"be read ({_first_line(error)})") from error
    return state, meta

  def _data_prefix(self, step, task, stream):
    """Where this process reads `task`'s stream position at `step`. On another number of
    processes than the one that saved it: process 0's, when the stream is the same on every
    layout (every process saved the same position); else None, and the input starts over."""
    folder = self._position(step, task, 0).parent.parent
    saved_by = len(list(folder.glob("process_*"))) if folder.exists() else 0
    if saved_by in (0, jax.process_count()):  # missing altogether: corrupt, when read
      return self._position(step, task, jax.process_index())
    if stream.same_on_every_layout:
      return self._position(step, task, 0)
    logging.warning("The input position of task %r at step %d was saved by %d processes; this "
                    "run has %d, and a split this large is read in one share per process, so "
                    "its input starts over (the train state resumes).", task, step, saved_by,
                    jax.process_count())
    return None

  def _read_state(self, step, abstract, meta):
    """The state of `step`, checked against the checksums in its meta."""
    try:
      state = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract))).state
    except Exception as error:  # tensorstore/orbax raise many types for truncated files
      raise corrupt(step, self._step_dir(step), f"its state cannot be read "
                    f"({_first_line(error)})") from error
    problems = checksum_problems(meta["checksums"], array_checksums(jax.device_get(state)))
    if problems:
      more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
      raise corrupt(step, self._step_dir(step), problems[0] + more)
    return state

  def _verify_last_save(self):
    """Waits for the last save, reads it back and checks it; then prunes older steps."""
    if self._unverified is None:
      return
    step, abstract = self._unverified
    self._unverified = None
    with self._writing(step):
      self.manager.wait_until_finished()
    try:
      self._read_state(step, abstract, self.read_meta(step))
    except CorruptCheckpointError as error:
      raise CorruptCheckpointError(
          f"{error}\nFound when reading it back right after the save. The older checkpoints are "
          f"kept; rerun to resume from the newest good one.") from error
    self._verified.append(step)
    self._prune()

  def _prune(self):
    """Deletes the steps older than the `keep` newest verified ones."""
    if len(self._verified) < self.keep:
      return
    self._verified = self._verified[-self.keep:]
    oldest_kept = self._verified[0]
    with self._writing(self._verified[-1]):
      for step in self.manager.all_steps():
        if step < oldest_kept:
          self.manager.delete(step)
      self._remove_data_state(lambda step: step < oldest_kept)

  def _set_aside(self, bad_steps):
    """Moves corrupt steps to <workdir>/corrupt_checkpoints (kept for inspection)."""
    if not bad_steps:
      return
    if jax.process_index() == 0:
      corrupt_dir = self.files.corrupt_checkpoints
      corrupt_dir.mkdir(parents=True, exist_ok=True)
      for step in bad_steps:
        target = corrupt_dir / str(step)
        suffix = 1
        while target.exists():
          target, suffix = corrupt_dir / f"{step}.{suffix}", suffix + 1
        self._step_dir(step).rename(target)
        logging.warning("Moved corrupt checkpoint step %d to %s.", step, target)
    self._remove_data_state(lambda step: step in bad_steps)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("compmod_jax: corrupt checkpoints set aside")
    self.manager.reload()

  def _report_half_written(self):
    checkpoints = self.files.checkpoints
    half_written = sorted(p.name for p in checkpoints.iterdir()
                          if HALF_WRITTEN_MARK in p.name) if checkpoints.exists() else []
    if half_written:
      logging.warning("Ignoring and removing half-written checkpoint(s) %s in %s: a run was "
                      "interrupted while saving.", half_written, checkpoints)

  def _remove_data_state(self, should_remove):
    """Removes data_state/<step> for the steps `should_remove` picks (process 0 only: the
    directories are shared)."""
    root = self.files.data_state
    if jax.process_index() != 0 or not root.exists():
      return
    for step_dir in root.iterdir():
      if step_dir.name.isdigit() and should_remove(int(step_dir.name)):
        step_dir.rmtree(missing_ok=True)

  def _step_dir(self, step):
    return self.files.checkpoint(step)

  def _position(self, step, task, process_index):
    """The prefix of the stream position of `task` at `step` that process `process_index`
    writes."""
    return self.files.data_state / str(step) / task / f"process_{process_index}" / "position"


def read_meta(manager, step, step_dir):
  """The run metadata of `step` in an orbax CheckpointManager (its config and the checksums of
  its arrays); CorruptCheckpointError when it cannot be read or has no checksums."""
  try:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  except Exception as error:  # orbax raises many types for missing or garbled files
    raise corrupt(step, step_dir, f"its meta cannot be read ({_first_line(error)})") from error
  if not isinstance(meta, dict) or "checksums" not in meta:
    raise corrupt(step, step_dir, "its meta has no array checksums")
  return meta


def abstract_state(state):
  """Shapes, dtypes and shardings of `state`, the target of a restore."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                      state)


def array_checksums(tree):
  """{tree path: sha256 of dtype, shape and bytes} for every array of a host (numpy) tree."""
  return {jax.tree_util.keystr(path): _sha256(np.asarray(leaf))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _sha256(array):
  digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
  digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


def checksum_problems(expected, actual):
  """What differs between the saved checksums and those of the arrays read back."""
  missing = [f"array {path} is missing" for path in sorted(set(expected) - set(actual))]
  unexpected = [f"array {path} has no checksum" for path in sorted(set(actual) - set(expected))]
  changed = [f"checksum mismatch in {path}" for path in sorted(set(expected) & set(actual))
             if expected[path] != actual[path]]
  return changed + missing + unexpected


def _first_line(error):
  text = str(error).strip()
  return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def config_conflicts(saved_config, config):
  """Differences between a checkpoint's config and the new one, except run-control keys."""
  saved = traverse_util.flatten_dict(saved_config, sep=".")
  new = traverse_util.flatten_dict(_jsonable(config.to_dict()), sep=".")
  keys = sorted(set(saved) | set(new))
  return [f"{key}: checkpoint has {saved.get(key)!r}, new config has {new.get(key)!r}"
          for key in keys if not _run_control(key) and saved.get(key) != new.get(key)]


def _run_control(key):
  return any(key == name or key.endswith("." + name) for name in RUN_CONTROL_KEYS)


def _jsonable(value):
  """The config as JSON would give it back (tuples become lists)."""
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  return value


def committed_steps(checkpoints):
  """The steps whose orbax directories are complete in `checkpoints`, read from the disk."""
  if not checkpoints.exists():
    return []
  return sorted(int(path.name) for path in checkpoints.iterdir() if path.name.isdigit())
