"""Races the JAX training step against the PyTorch reference network on this CPU.

One run races both shapes: `digits` (configs/digits.py: L=8, K=4, batch 128, 28x28x1 input,
patch/stride 4, so 7x7x24 activations) and `large` (L=16, patch/stride 2, 14x14x24), SE,
RMSProp. Per shape, rounds alternate JAX, torch eager and torch.compile in one process; the
script prints each side's median and minimum and the ratios JAX/torch, then one summary line
per shape. Use the same allocator for both sides, e.g.

  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python -m benchmarks.torch_race

The PyTorch side is benchmarks/torch_reference.py (`pip install torch` first; torch is not a
dependency of the package). torch.compile's first steps take a minute or more on 2 cores;
`--no-torch-compile` races eager only.
"""

from benchmarks import common

# name -> (layers, patch size); both at 28x28 input and depth multiplier 0.6 (24 channels).
SHAPES = {"digits": (8, 4), "large": (16, 2)}


def parse_args(argv=None):
  ap = common.argument_parser(__doc__, rounds=7, steps=3)
  ap.add_argument("--shapes", default="digits,large", help=f"comma-separated, of {list(SHAPES)}")
  ap.add_argument("--templates", type=int, default=4)
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--hw", type=int, default=28)
  ap.add_argument("--depth-multiplier", type=float, default=0.6, help="0.6 -> 24 channels")
  ap.add_argument("--plain", action="store_true", help="race the plain (per-layer) networks")
  ap.add_argument("--no-torch-compile", action="store_true", help="race torch eager only")
  common.add_step_arguments(ap)
  ap.add_argument("--quick", action="store_true",
                  help="the digits shape, eager only, 3 rounds of 2 steps (< 1 minute)")
  args = ap.parse_args(argv)
  if args.quick:
    args.rounds, args.steps, args.shapes, args.no_torch_compile = 3, 2, "digits", True
  args.shapes = args.shapes.split(",")
  unknown = [s for s in args.shapes if s not in SHAPES]
  if unknown:
    ap.error(f"--shapes: unknown {unknown}; choose from {list(SHAPES)}")
  return args


def race(args, shape):
  """Alternated rounds of every side at one shape; returns {side: [s/step]}."""
  from benchmarks import torch_reference
  from compmod_jax.models import ops

  layers, patch = SHAPES[shape]
  overrides = dict(num_layers=layers, num_templates=args.templates,
                   depth_multiplier=args.depth_multiplier, patch_size=patch,
                   layer_iteration=args.layer_iteration, conv_impl=args.conv_impl)
  if args.plain:
    overrides["signature"] = "plain"
  spec = common.digits_spec(**overrides)
  jax_step = common.TrainStep(spec, batch=args.batch, hw=args.hw)
  compile_s = jax_step.compile()
  torch_kw = dict(batch=args.batch, hw=args.hw, num_layers=layers,
                  num_templates=args.templates, width=spec.width, patch_size=patch,
                  mix="plain" if args.plain else "templates")
  runners = {"jax": jax_step.run,
             "torch_eager": torch_reference.TorchTrainStep(**torch_kw).run}
  print(f"\n[{shape}] L={layers} K={args.templates} batch={args.batch} {args.hw}x{args.hw}x1 "
        f"patch={patch} -> {args.hw // patch}x{args.hw // patch}x{spec.width}, "
        f"plain={args.plain}; jax layer_iteration={args.layer_iteration} "
        f"(scan={spec.uses_scan}) conv_impl={args.conv_impl} "
        f"(-> {ops.resolve_conv_impl(args.conv_impl)}); jax compile {compile_s:.1f}s")
  if not args.no_torch_compile:
    compiled = torch_reference.TorchTrainStep(compile=True, **torch_kw)
    runners["torch_compile"] = compiled.run
    print(f"[{shape}] torch.compile first two steps: {compiled.warmup_s:.1f}s")
  times = common.alternate(runners, args.rounds, args.steps)
  for name, values in times.items():
    print(f"[{shape}] {name:14s} median {common.median(values):.4f}s/step  "
          f"(min {min(values):.4f}, max {max(values):.4f}, {len(values)} rounds x {args.steps})")
  for name in runners:
    if name != "jax":
      r_med, r_min, r_pair = common.ratios(times["jax"], times[name])
      print(f"[{shape}] ratio jax/{name}: {r_med:.3f} (of medians), {r_min:.3f} (of minimums), "
            f"{r_pair:.3f} (median of per-round ratios)")
  return times


def main(argv=None):
  args = parse_args(argv)
  import torch

  common.print_header(f", torch {torch.__version__} threads={torch.get_num_threads()}")
  results = {shape: race(args, shape) for shape in args.shapes}
  print("\nsummary (ratio of median step times, JAX / torch):")
  for shape, times in results.items():
    ratios = ", ".join(f"{name} {common.median(times['jax']) / common.median(values):.3f}"
                       for name, values in times.items() if name != "jax")
    print(f"  {shape}: {ratios}")
  return results


if __name__ == "__main__":
  main()
