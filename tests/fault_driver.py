"""Runs `python -m compmod_jax.main` with fault-injection hooks (tests/test_reliability.py).

  python tests/fault_driver.py [announce] [slow_commit=STEP] -- <compmod_jax.main flags>

announce        prints "STEP <n>" at every step boundary and "SAVING <n>" once a save has been
                handed to orbax, so a test can send a signal at a known moment.
slow_commit=N   holds orbax's commit of step N for a minute (a slow filesystem), so a SIGKILL
                lands in the middle of that asynchronous save.
stuck_startup   blocks the start-up inside native code (libc's sleep, over and over) once the
                run has decided to use its workdir, printing "STUCK": a compile or an input
                pipeline that never returns, where Python runs no signal handler.

The hooks live here, not in the library: they wrap library functions before main runs.
"""
import asyncio
import ctypes
import sys

from orbax.checkpoint._src.path import atomicity

from compmod_jax import main as compmod_main
from compmod_jax.train import checkpoint, loop, start


def announce_steps_and_saves():
  stop_requested, save = loop.stop_requested, checkpoint.Checkpointer.save

  def announcing_stop_requested(watcher, step):
    print(f"STEP {step}", flush=True)
    return stop_requested(watcher, step)

  def announcing_save(self, step, *args):
    save(self, step, *args)
    print(f"SAVING {step}", flush=True)

  loop.stop_requested = announcing_stop_requested
  checkpoint.Checkpointer.save = announcing_save


def slow_commit(step):
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def slow_finalize(self, *args, **kwargs):
    # Both the step directory and its items (state, meta) are committed by a rename.
    if f"/checkpoints/{step}." in str(self.get()):
      await asyncio.sleep(60)
    return await finalize(self, *args, **kwargs)

  atomicity.AtomicRenameTemporaryPath.finalize = slow_finalize


def stuck_startup():
  def never_returns(*args, **kwargs):
    del args, kwargs
    print("STUCK", flush=True)
    libc = ctypes.CDLL(None)
    while True:
      libc.sleep(600)

  start.make_context = never_returns


def main():
  separator = sys.argv.index("--")
  for hook in sys.argv[1:separator]:
    name, _, value = hook.partition("=")
    if name == "announce":
      announce_steps_and_saves()
    elif name == "slow_commit":
      slow_commit(int(value))
    elif name == "stuck_startup":
      stuck_startup()
    else:
      raise SystemExit(f"Unknown hook {hook!r}")
  sys.argv = [sys.argv[0]] + sys.argv[separator + 1:]
  compmod_main.run()


if __name__ == "__main__":
  main()
