"""Stopping at a step boundary on a preemption notice (SIGTERM), at the same step everywhere.

Every process must stop after the same step, or the next collective or checkpoint barrier
deadlocks. Three cases (docs/reliability.md):

- jax.distributed initialised with its preemption service (the default; also one process with
  --distributed): the service catches SIGTERM itself, tells every process, and
  `reached_preemption_sync_point` turns true on all of them at the same step.
- several processes without the service (jax_enable_preemption_service=False): our own SIGTERM
  flag, OR-ed over the processes with a one-element allgather at every step.
- one process without a coordinator: our own SIGTERM flag.

A notice must also be able to stop a run that is stuck: Python runs signal handlers only in
the main thread between bytecodes, and a run blocked in native code (compiling, an input
pipeline that cannot fill a batch) would run them never. So the signals are also written to a
wakeup socket (signal.set_wakeup_fd), and a thread that reads it stops the process at once
(os._exit) for SIGINT before the first step boundary and for a second SIGTERM; nothing is being
written then that a rerun cannot clean up (checkpoints commit atomically, as for SIGKILL).
During training, SIGINT raises KeyboardInterrupt in the main thread at the next step boundary,
so an asynchronous save in flight is finished before the process ends. Not at once, wherever
the main thread is: tf.data's C++ runs Python's signal handlers while it waits for a batch, and
a KeyboardInterrupt raised there cancels the read half-way, which corrupted the heap (glibc's
`free(): invalid next size`, an abort instead of exit 130, in 4 of 8 tries).
"""
import os
import signal
import socket
import threading
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


UNWIND_SECONDS = 10  # after SIGINT during training, how long the main thread gets to unwind
# SIGTERMs this close together are one notice: a container's or a VM's shutdown signals every
# process, so a worker under compmod_jax/supervisor.py gets it directly and forwarded.
SAME_NOTICE_SECONDS = 0.25


class PreemptionWatcher:
  """Turns SIGTERM into a request to save and stop at the next step boundary, instead of dying
  mid-step; makes SIGINT before the first step boundary and a second SIGTERM stop at once. Use
  as a context manager around the run; ask `stop_at(step)` after every step."""

  def __init__(self):
    self.requested = False
    self.training = False  # a step boundary was reached: a notice can be honoured by a save
    self._sigterms = self._sigints = 0
    self._last_sigterm = -SAME_NOTICE_SECONDS
    self._interrupted = False  # SIGINT during training: raise KeyboardInterrupt at stop_at
    self._service = _preemption_service_running()
    self._previous_handlers = {}
    self._previous_wakeup_fd = None
    self._sockets = None

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      return self  # signals belong to the main thread's owner
    handled = (signal.SIGINT,) if self._service else (signal.SIGINT, signal.SIGTERM)
    # The service's own SIGTERM handler stays: replacing it would blind the other processes.
    for signum in handled:
      self._previous_handlers[signum] = signal.signal(signum, self._in_main_thread)
    self._sockets = socket.socketpair()
    self._sockets[1].setblocking(False)
    self._previous_wakeup_fd = signal.set_wakeup_fd(self._sockets[1].fileno(),
                                                    warn_on_full_buffer=False)
    threading.Thread(target=self._watch, args=(self._sockets[0],), daemon=True,
                     name="signal-watcher").start()
    return self

  def _in_main_thread(self, signum, frame):
    """The Python-level handler: the watcher thread decides; SIGINT during training marks the
    main thread for unwinding at the next step boundary (the checkpointer then finishes any
    save in flight)."""
    del frame
    if signum == signal.SIGINT and self.training:
      logging.warning("SIGINT: stopping now; rerun the same command to resume from the last "
                      "checkpoint.")
      self._interrupted = True

  def _watch(self, reader):
    while True:
      data = reader.recv(64)
      if not data:  # the writing end was closed by __exit__
        reader.close()
        return
      for signum in data:
        self._on_signal(signum)

  def _on_signal(self, signum):
    if signum == signal.SIGINT:
      self._sigints += 1
      if not self.training or self._sigints > 1:
        _stop_now(f"SIGINT {'again' if self.training else 'before the first training step'}: "
                  f"stopping now.", 128 + signum)
      # The main thread unwinds (above); should it be stuck in native code, stop anyway.
      timer = threading.Timer(UNWIND_SECONDS, _stop_now, args=(
          f"SIGINT: the run did not stop within {UNWIND_SECONDS} s; stopping now.",
          128 + signum))
      timer.daemon = True  # a run that unwound in time exits without waiting for it
      timer.start()
    if signum == signal.SIGTERM:
      if time.monotonic() - self._last_sigterm < SAME_NOTICE_SECONDS:
        return  # one notice sent to every process of a group or container, twice
      self._last_sigterm = time.monotonic()
      self._sigterms += 1
      if self._sigterms > 1:
        _stop_now("Second SIGTERM: stopping now without saving; rerun the same command to "
                  "resume from the last checkpoint.", 128 + signum)
      self.requested = True
      logging.warning("SIGTERM received: saving a checkpoint at the next step boundary%s (a "
                      "second SIGTERM stops at once).",
                      "" if self.training else ", after the first training step")

  def __exit__(self, *exc):
    for signum, handler in self._previous_handlers.items():
      if handler is not None:
        signal.signal(signum, handler)
    if self._sockets:
      signal.set_wakeup_fd(self._previous_wakeup_fd)
      self._sockets[1].close()  # the watcher thread reads the end of the stream and returns

  def stop_at(self, step):
    """Whether every process should save and stop after `step`. Call it at every step, on
    every process (the sync protocol counts on it). Raises KeyboardInterrupt after SIGINT."""
    if self._interrupted:
      raise KeyboardInterrupt
    self.training = True
    if self._service:
      return multihost_utils.reached_preemption_sync_point(step)
    if jax.process_count() > 1:
      return bool(multihost_utils.process_allgather(np.int32(self.requested)).any())
    return self.requested


def _stop_now(message, exit_code):
  logging.warning(message)
  logging.flush()
  os._exit(exit_code)


def _preemption_service_running():
  return (jax.distributed.is_initialized()
          and jax.config.jax_enable_preemption_service)
