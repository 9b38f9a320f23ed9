"""A parent process that turns a lost peer into one line, for runs of several processes.

When one process of a multi-process run dies (SIGKILL, the out-of-memory killer, its host
going down), JAX's coordination service notices the missing heartbeats and every other process
ends *from C++*: a fatal log, SIGABRT, a Python fatal-error dump, exit 134. No Python code of
ours runs then (jaxlib 0.10.2's `missed_heartbeat_callback` aborts with `std::bad_cast` when
given a Python function, tried 2026-12-03), so nothing in the process can say what happened.

So `python -m compmod_jax.main` with `--coordinator_address` or `--distributed` starts the same
command again as a child and stays as its parent (this module imports nothing heavy): it
passes the child's stdout and stderr through, forwards SIGTERM and SIGINT to it, and when the
child ends because a peer was lost, reads the lost process from the last lines of the child's
stderr and ends with one line naming it and saying that rerunning resumes, exit code 1. The
child dies with its parent (PR_SET_PDEATHSIG), so killing the visible process kills the
worker. docs/reliability.md tables what each fault prints.
"""
import collections
import ctypes
import os
import re
import signal
import subprocess
import sys

# The parent's pid, set in the child, so that it trains instead of supervising again.
CHILD = "COMPMOD_SUPERVISOR"
COMMAND = "compmod_jax.main"
TAIL_LINES = 2000  # of the child's stderr: the coordination service's error precedes the dump
PR_SET_PDEATHSIG = 1

# What the child's stderr says when a peer was lost, from jaxlib 0.10.2's coordination service
# and gloo (tried 2026-12-07): the coordinator lists the processes whose heartbeats stopped, a
# process that cannot reach the coordinator (process 0) says so, and a collective whose peer
# went away fails at once without naming it.
HEARTBEATS_STOPPED = re.compile(
    r"tasks are unhealthy \(stopped sending heartbeats\):\s*\n((?:[\s,]*\d+)+)")
COORDINATOR_UNREACHABLE = "Failed to send RPC to coordination service"
PEER_CONNECTION_CLOSED = re.compile(r"Gloo \w+ failed.*(Connection closed by peer|"
                                    r"Connection reset by peer)")


def distributed(argv):
  """Whether the command line asks for several processes (--coordinator_address or
  --distributed)."""
  for arg in argv[1:]:
    if arg == "--":
      break
    name, _, value = arg.partition("=")
    if name == "--coordinator_address" or (
        name == "--distributed" and value.lower() not in ("false", "0")):
      return True
  return False


def flag_value(argv, name):
  """The value of --name in argv (`--name=value` or `--name value`), or None."""
  for index, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.partition("=")[2]
    if arg == f"--{name}" and index + 1 < len(argv):
      return argv[index + 1]
  return None


def supervise_if_distributed():
  """In a multi-process run's first process: runs the command as a child, ends this process
  with the child's exit code (or one line about a lost peer), and never returns. Otherwise
  (one process, or already the child) returns at once."""
  if os.environ.get(CHILD):
    _die_with_parent(int(os.environ[CHILD]))
    return
  if not distributed(sys.argv):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  # sys.orig_argv keeps the interpreter's options and a driver script in front of main.
  child = subprocess.Popen([sys.executable, *sys.orig_argv[1:]], env=dict(os.environ, **{
      CHILD: str(os.getpid())}), stderr=subprocess.PIPE, process_group=0)
  # The child has a process group of its own, so a signal to this one (Ctrl-C in a terminal,
  # a scheduler's kill) reaches it once, forwarded.
  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, lambda number, frame: child.send_signal(number))
  tail = collections.deque(maxlen=TAIL_LINES)
  for line in iter(child.stderr.readline, b""):
    sys.stderr.buffer.write(line)
    sys.stderr.buffer.flush()
    tail.append(line.decode(errors="replace"))
  code = child.wait()
  lost = lost_peer("".join(tail)) if code else None  # a finished run is not read
  if lost is None and code >= 0:
    sys.exit(code)  # the child's own ending: success, or its own last line
  sys.stderr.write(f"{COMMAND}: {ending(sys.argv, lost, code)}\n")
  sys.stderr.flush()
  sys.exit(1)


def _die_with_parent(parent):
  """Has the kernel SIGKILL this process when its parent dies; exits if it already has."""
  ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
  if os.getppid() != parent:
    os._exit(1)


def lost_peer(stderr_tail):
  """Which peer the child's stderr says was lost: a list of process indices, "coordinator",
  "unknown" (a connection closed without a name) or None (no peer was lost)."""
  found = HEARTBEATS_STOPPED.search(stderr_tail)
  if found:
    return [int(index) for index in re.findall(r"\d+", found.group(1))]
  if COORDINATOR_UNREACHABLE in stderr_tail:
    return "coordinator"
  if PEER_CONNECTION_CLOSED.search(stderr_tail):
    return "unknown"
  return None


def ending(argv, lost, code):
  """The last line of a run that ended because of `lost` (see lost_peer) or, with lost None,
  by a signal (`code` negative)."""
  process_id, num_processes = flag_value(argv, "process_id"), flag_value(argv, "num_processes")
  me = (f"process {process_id} of {num_processes}" if process_id is not None
        else "this process")
  resume = (f"rerun the same command on every process to resume from the last complete "
            f"checkpoint{last_checkpoint(flag_value(argv, 'workdir'))}.")
  if lost is None:
    name = signal.Signals(-code).name
    return (f"{me} was ended by {name}" + (" (the out-of-memory killer sends it)"
                                           if name == "SIGKILL" else "") + f"; {resume}")
  if lost == "coordinator":
    who = "process 0 (the coordinator) cannot be reached"
  elif lost == "unknown":
    who = "a peer process closed its connection"
  else:
    who = " and ".join(f"process {index}" for index in lost) + " stopped responding"
  return (f"{me} stops: {who} (killed, out of memory, or its host went down), and every "
          f"process stops with it; {resume}")


def last_checkpoint(workdir):
  """' (step N in <workdir>/checkpoints)' for a local workdir with checkpoints, else ''. (Not
  checkpoint.committed_steps: this parent process imports neither JAX nor etils.)"""
  folder = os.path.join(workdir or "", "checkpoints")
  try:
    steps = sorted(int(name) for name in os.listdir(folder) if name.isdigit())
  except OSError:  # a cloud workdir, or none yet
    return ""
  return f" (step {steps[-1]} in {folder})" if steps else " (none was saved: it starts over)"
