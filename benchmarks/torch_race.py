"""Races the JAX training step against the PyTorch reference network on this CPU.

Both sides run the shape of configs/digits.py by default (L=8, K=4, batch 128, 28x28x1 input,
patch/stride 4, so 7x7x24 activations, SE, RMSProp; `--layers 16 --patch 2` is the larger
14x14x24 shape) in one process; rounds alternate JAX, torch eager[, torch compile] and
the script prints each median and the ratio JAX/torch. Use the same allocator for both sides,
e.g.

  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python benchmarks/torch_race.py

The PyTorch side is benchmarks/torch_reference.py (`pip install torch` first; torch is not a
dependency of the package).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--templates", type=int, default=4)
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--hw", type=int, default=28)
  ap.add_argument("--patch", type=int, default=4, help="patch size = torch stride")
  ap.add_argument("--depth-multiplier", type=float, default=0.6, help="0.6 -> 24 channels")
  ap.add_argument("--plain", action="store_true", help="race the plain (per-layer) networks")
  ap.add_argument("--torch-compile", action="store_true", help="also race torch.compile")
  ap.add_argument("--layer-iteration", default="auto", choices=["auto", "loop", "scan"])
  ap.add_argument("--scan-unroll", type=int, default=None)
  ap.add_argument("--conv-impl", default="auto", choices=["auto", "shifted", "native"])
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--steps", type=int, default=3, help="steps per timed round")
  ap.add_argument("--quick", action="store_true", help="3 rounds of 2 steps, L=8 (< 1 minute)")
  args = ap.parse_args(argv)
  if args.quick:
    args.rounds, args.steps, args.layers = 3, 2, 8
  return args


def main(argv=None):
  args = parse_args(argv)
  import torch

  from benchmarks import torch_reference

  print(common.machine_header() + f", torch {torch.__version__} threads={torch.get_num_threads()}")
  warning = common.allocator_warning()
  if warning:
    print(warning)
  overrides = dict(num_layers=args.layers, num_templates=args.templates,
                   depth_multiplier=args.depth_multiplier, patch_size=args.patch,
                   layer_iteration=args.layer_iteration, conv_impl=args.conv_impl)
  if args.scan_unroll is not None:
    overrides["scan_unroll"] = args.scan_unroll
  if args.plain:
    overrides["signature"] = "plain"
  spec = common.digits_spec(**overrides)
  jax_step = common.TrainStep(spec, batch=args.batch, hw=args.hw)
  compile_s = jax_step.compile()
  torch_kw = dict(batch=args.batch, hw=args.hw, num_layers=args.layers,
                  num_templates=args.templates, width=spec.width, patch_size=args.patch,
                  mix="plain" if args.plain else "templates")
  runners = {"jax": jax_step.run}
  eager = torch_reference.TorchTrainStep(**torch_kw)
  runners["torch_eager"] = eager.run
  if args.torch_compile:
    compiled = torch_reference.TorchTrainStep(compile=True, **torch_kw)
    runners["torch_compile"] = compiled.run
    print(f"torch.compile first two steps: {compiled.warmup_s:.1f}s")
  print(f"shape: L={args.layers} K={args.templates} batch={args.batch} {args.hw}x{args.hw}x1 "
        f"patch={args.patch} channels={spec.width} plain={args.plain}; jax "
        f"layer_iteration={args.layer_iteration} (scan={spec.uses_scan}, "
        f"unroll={spec.scan_unroll}) conv_impl={args.conv_impl}; jax compile {compile_s:.1f}s")
  times = common.alternate(runners, args.rounds, args.steps)
  for name, values in times.items():
    print(f"{name:14s} median {common.median(values):.4f}s/step  "
          f"(min {min(values):.4f}, max {max(values):.4f}, {len(values)} rounds x {args.steps})")
  for name in runners:
    if name != "jax":
      r_med, r_min, r_pair = common.ratios(times["jax"], times[name])
      print(f"ratio jax/{name}: {r_med:.3f} (of medians), {r_min:.3f} (of minimums), "
            f"{r_pair:.3f} (median of per-round ratios)")
  return times


if __name__ == "__main__":
  main()
