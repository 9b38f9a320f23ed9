"""Stopping at a step boundary on a preemption notice (SIGTERM), at the same step everywhere.

Every process must stop after the same step, or the next collective or checkpoint barrier
deadlocks. Three cases (docs/reliability.md):

- jax.distributed initialised with its preemption service (the default; also one process with
  --distributed): the service catches SIGTERM itself, tells every process, and
  `reached_preemption_sync_point` turns true on all of them at the same step.
- several processes without the service (jax_enable_preemption_service=False): our own SIGTERM
  flag, OR-ed over the processes with a one-element allgather at every step.
- one process without a coordinator: our own SIGTERM flag.
"""
import signal

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


class PreemptionWatcher:
  """Turns SIGTERM into a request to save and stop at the next step boundary, instead of dying
  mid-step. Use as a context manager around the run; ask `stop_at(step)` after every step."""

  def __init__(self):
    self.requested = False
    self._previous_handler = None
    self._service = _preemption_service_running()

  def __enter__(self):
    if self._service:  # its own handler is installed; replacing it would blind the service
      return self
    try:
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_signal)
    except ValueError:  # not the main thread: leave signals alone
      self._previous_handler = None
    return self

  def _on_signal(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint at the next step boundary.")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)

  def stop_at(self, step):
    """Whether every process should save and stop after `step`. Call it at every step, on
    every process (the sync protocol counts on it)."""
    if self._service:
      return multihost_utils.reached_preemption_sync_point(step)
    if jax.process_count() > 1:
      return bool(multihost_utils.process_allgather(np.int32(self.requested)).any())
    return self.requested


def _preemption_service_running():
  return (jax.distributed.is_initialized()
          and jax.config.jax_enable_preemption_service)
