"""NaN/Inf policy of the training loop (docs/reliability.md).

The train step itself skips an update whose loss, gradient norm or new parameter norm is not
finite: the state stays as it was, only the step counter moves on (the batch is consumed). The
loop then applies `config.max_nonfinite_skips` on the host with `NonFiniteGuard`, and the
checkpointer refuses to save a state holding a non-finite value.
"""
import jax
import numpy as np
from absl import logging

# The quantities the train step checks, in the order a message names the first bad one.
CHECKED_METRICS = ("total_loss", "grad_norm", "param_norm")


class NonFiniteError(FloatingPointError):
  """Training met more non-finite values than the config allows, or a state to save has one."""


class NonFiniteGuard:
  """Counts skipped updates and stops the run when there are more than `max_skips`.

  It reads each step's flag one step late (after the next step is dispatched), so the check
  never stalls the device; `flush` checks the newest step, before a save or an evaluation.
  """

  def __init__(self, max_skips):
    self.max_skips = max_skips
    self.skipped = 0
    self._unchecked = None

  def observe(self, step, metrics):
    """Records `step`'s metrics and checks the previous step's."""
    previous, self._unchecked = self._unchecked, (step, metrics)
    if previous is not None:
      self._check(*previous)

  def flush(self):
    if self._unchecked is not None:
      self._check(*self._unchecked)
      self._unchecked = None

  def _check(self, step, metrics):
    if not bool(metrics["update_skipped"]):
      return
    self.skipped += 1
    name, value = first_nonfinite_metric(metrics)
    if self.skipped > self.max_skips:
      raise NonFiniteError(
          f"Step {step}: {name} is {value}, not finite; {self.skipped} updates skipped in "
          f"this run, more than config.max_nonfinite_skips={self.max_skips}. Stopped without "
          f"saving: the last checkpoint holds the last good state. Lower "
          f"config.optimizer.learning_rate, set config.optimizer.grad_clip_norm, or raise "
          f"config.max_nonfinite_skips, then rerun to resume.")
    logging.warning("Step %d: %s is %s, not finite; update skipped (%d of at most %d in this "
                    "run).", step, name, value, self.skipped, self.max_skips)


def first_nonfinite_metric(metrics):
  """(name, value) of the first checked metric that is NaN or infinite."""
  for name in CHECKED_METRICS:
    value = float(metrics[name])
    if not np.isfinite(value):
      return name, value
  raise ValueError(f"The step was skipped but {CHECKED_METRICS} are all finite: {metrics}")


def first_nonfinite_leaf(tree):
  """The path of the first floating-point array of `tree` (numpy) with a NaN or Inf, or None."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    leaf = np.asarray(leaf)
    if np.issubdtype(leaf.dtype, np.floating) and not np.isfinite(leaf).all():
      return jax.tree_util.keystr(path)
  return None
