"""The trainer's own digits step under glibc allocator settings, in alternating rounds.

glibc reads its tunables only when a process starts, so each setting runs in a process of its
own: every round starts one child per setting, in turn, and each child compiles (from the
compilation cache after the first round) the trainer's train step for `--config` and times
`--steps` steps on batches from the trainer's own input stream, after `--warmup` steps. The
script prints each setting's median s/step and its per-round (paired) ratio to the first.

Settings: glibc's defaults; the tunables `python -m compmod_jax.main` sets before
compmod_jax/fast_malloc.py kept XLA's per-step temporary buffer (huge pages and thresholds
only); and what it sets now (compmod_jax.fast_malloc.TUNABLES).

  python -m benchmarks.allocator [--config configs/digits.py] [--rounds 4] [--steps 40]

(from the repository root).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from compmod_jax import fast_malloc

# What the command set before arena_max and mmap_max joined: huge pages and the thresholds.
THRESHOLDS_ONLY = tuple(tunable for tunable in fast_malloc.TUNABLES
                        if not tunable.startswith(("glibc.malloc.arena_max",
                                                   "glibc.malloc.mmap_max")))


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="configs/digits.py")
  ap.add_argument("--rounds", type=int, default=4)
  ap.add_argument("--steps", type=int, default=40, help="timed steps per child")
  ap.add_argument("--warmup", type=int, default=10, help="untimed steps per child first")
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  return ap.parse_args(argv)


def settings():
  return {"glibc defaults": None, "thresholds only": ":".join(THRESHOLDS_ONLY),
          "fast_malloc now": ":".join(fast_malloc.TUNABLES)}


def child(args):
  """Times the trainer's step in this process; prints {"s_per_step": ...} as JSON."""
  import jax
  from benchmarks import common
  from compmod_jax import cli
  from compmod_jax.train import context, start
  config = common.load_config(args.config)
  cli.use_compilation_cache(config.compilation_cache_dir)
  context.check_and_prepare_datasets(config)
  ctx = start.make_context(config, "/nonexistent", {})
  state, optimization = start.create_train_state(ctx, start.example_images(config))
  train_step = start.train_step(ctx, state, optimization)
  iterators = {task: iter(stream) for task, stream in ctx.train_streams.items()}

  def run(n):
    nonlocal state
    for _ in range(n):
      state, metrics = train_step(state, ctx.global_batch(
          {task: next(it) for task, it in iterators.items()}))
    jax.block_until_ready(metrics)

  run(args.warmup)
  started = time.perf_counter()
  run(args.steps)
  print(json.dumps({"s_per_step": (time.perf_counter() - started) / args.steps}))


def main(argv=None):
  args = parse_args(argv)
  if args.child:
    return child(args)
  from benchmarks import common
  print(common.machine_header())
  times = {name: [] for name in settings()}
  for _ in range(args.rounds):
    for name, tunables in settings().items():
      environ = dict(os.environ, COMPMOD_KEEP_MALLOC="1")
      environ.pop("GLIBC_TUNABLES", None)
      if tunables:
        environ["GLIBC_TUNABLES"] = tunables
      output = subprocess.run(
          [sys.executable, "-m", "benchmarks.allocator", "--child", "--config", args.config,
           "--steps", str(args.steps), "--warmup", str(args.warmup)],
          env=environ, check=True, capture_output=True, text=True).stdout
      times[name].append(json.loads(output.strip().splitlines()[-1])["s_per_step"])
      print(f"  {name}: {times[name][-1]:.4f} s/step", flush=True)
  base = list(times.values())[0]
  print(f"{args.config}: {args.rounds} alternating rounds of {args.steps} steps per setting")
  print(f"{'setting':16s} {'median s/step':>13s} {'min':>7s} {'paired ratio to first':>22s}")
  for name, values in times.items():
    paired = statistics.median(v / b for v, b in zip(values, base))
    print(f"{name:16s} {statistics.median(values):13.4f} {min(values):7.4f} {paired:22.3f}")


if __name__ == "__main__":
  main()
