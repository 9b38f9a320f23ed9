"""The processes of one run: joining them, and stopping all of them when one fails.

- `initialize`: jax.distributed.initialize with two time limits of our own, each ending with
  one line: how long to wait for every process to join (--initialization_timeout), and how long
  a silent process counts as alive (--heartbeat_timeout; JAX's default is 100 s).
- A process that fails (its data missing, a bad checkpoint, a bug) posts its last line in the
  coordinator's key-value store before it exits, and every other process, which watches that
  store from a thread, ends with that line naming the failed process, instead of waiting in the
  next collective until the heartbeats time out.
- A process that was killed posts nothing: the coordination service notices its missing
  heartbeats and ends the others from C++; the parent process of compmod_jax/supervisor.py
  turns that into one line. A collective whose peer went away fails at once without naming it
  (gloo on the CPU), so the process waits for the service's verdict, which names it.
"""
import threading
import time

import jax
from absl import logging
from jax._src import distributed as jax_distributed

from compmod_jax import cli, supervisor

ERRORS = "compmod_jax/error/"  # <process index> -> the failed process's last line
SEEN = "compmod_jax/seen/"  # <process index> -> that process read a peer's error
LEAVING = "compmod_jax/leaving/"  # <process index> -> the failed process is exiting now
POLL_SECONDS = 1
ACKNOWLEDGE_SECONDS = 10  # how long a failed process waits for the others to read its error


def initialize(flags):
  """jax.distributed.initialize from the command line's flags, giving up after
  --initialization_timeout seconds with one line when not every process joins (a peer that
  never started, a wrong address). JAX's own time limit aborts the process from C++ with a
  stack dump, so ours fires first and JAX's is set later. Then starts watching for failed
  peers."""
  timeout = flags.initialization_timeout
  where = flags.coordinator_address or "the address Cloud TPU's metadata gives"
  who = (f"process {flags.process_id} of {flags.num_processes}" if flags.coordinator_address
         else "this process")
  logging.info("%s: joining the coordinator at %s; waiting up to %d s for every process "
               "(--initialization_timeout).", who, where, timeout)
  start = (f"start the same command with --process_id 0 to {flags.num_processes - 1}"
           if flags.coordinator_address else "start the same command on every worker")
  give_up = threading.Timer(timeout, lambda: cli.exit_with_one_line(
      supervisor.COMMAND, f"{who} waited {timeout} s at {where} and not every process joined; "
      f"{start}, check the address, or wait longer with --initialization_timeout."))
  give_up.daemon = True
  give_up.start()
  jax.distributed.initialize(flags.coordinator_address, flags.num_processes, flags.process_id,
                             initialization_timeout=timeout + 60,
                             heartbeat_timeout_seconds=flags.heartbeat_timeout)
  give_up.cancel()
  threading.Thread(target=_watch_for_failed_peers, daemon=True, name="peer-watcher").start()


def _client():
  """The coordination service's client (JAX keeps it private; orbax reads it the same way)."""
  return jax_distributed.global_state.client


def _who():
  return f"process {jax.process_index()} of {jax.process_count()}"


_failed_here = threading.Event()  # this process is ending with an error of its own


def tell_peers_and_wait(message):
  """Posts this process's last line for the others, and waits (up to ACKNOWLEDGE_SECONDS) until
  each has read it: when this process is the coordinator, its exit takes the store down (and
  with it every process still connected, from C++)."""
  if not jax.distributed.is_initialized() or jax.process_count() == 1:
    return
  _failed_here.set()
  client = _client()
  try:
    client.key_value_set(f"{ERRORS}{jax.process_index()}", message)
    deadline = time.monotonic() + ACKNOWLEDGE_SECONDS
    while (len(client.key_value_dir_get(SEEN)) < jax.process_count() - 1
           and time.monotonic() < deadline):
      time.sleep(0.1)
    client.key_value_set(f"{LEAVING}{jax.process_index()}", "1")
  except Exception:  # noqa: BLE001 (the service is gone: nobody is left to tell)
    pass


def _watch_for_failed_peers():
  client, me = _client(), jax.process_index()
  while True:
    time.sleep(POLL_SECONDS)
    try:
      failed = [(int(key.rpartition("/")[2]), line) for key, line in
                client.key_value_dir_get(ERRORS) if not key.endswith(f"/{me}")]
      if failed:
        client.key_value_set(f"{SEEN}{me}", "1", allow_overwrite=True)
    except Exception:  # noqa: BLE001 (shut down at the end of the run, or the service is gone)
      return
    if failed and not _failed_here.is_set():
      index, line = min(failed)
      if me == 0:
        _outlive(client, [index for index, _ in failed])
      cli.exit_with_one_line(supervisor.COMMAND,
                             f"{_who()} stops because process {index} failed: {line}")


def _outlive(client, failed):
  """In the coordinator: waits until the failed processes are exiting, so that the store they
  are still connected to stays up until they are gone."""
  deadline = time.monotonic() + ACKNOWLEDGE_SECONDS
  try:
    while (len(client.key_value_dir_get(LEAVING)) < len(failed)
           and time.monotonic() < deadline):
      time.sleep(0.1)
  except Exception:  # noqa: BLE001 (the service is gone)
    return
  time.sleep(1)  # from posting that key to os._exit, in the failed process


def lost_a_peer(error):
  """Whether `error` is a collective failing because a peer went away (gloo, on the CPU)."""
  text = str(error)
  return "Gloo" in text and ("Connection closed by peer" in text
                             or "Connection reset by peer" in text)


def await_verdict(error, heartbeat_timeout):
  """After a collective lost its peer: waits for the coordination service to name the lost
  process (it ends this process then, see compmod_jax/supervisor.py), and re-raises `error`
  should it not within the heartbeat time limit."""
  logging.warning("%s: a collective lost its peer (%s); waiting up to %d s for the "
                  "coordinator to say which process was lost.", _who(),
                  str(error).splitlines()[0], heartbeat_timeout)
  logging.flush()
  time.sleep(heartbeat_timeout + 15)
  raise error
