"""Compile time and step time against depth for each layer-iteration mode.

For every L in --layers and every mode (loop: a Python loop over layers; scan-uN: lax.scan with
unroll N) the script times `.lower(...).compile()` of the training step, then times the steps of
all compiled variants of one L in alternating rounds (medians). Shape as in step_time.py
(digits default: batch 128, 28x28x1, patch 2, width 24, K=4).

  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python -m benchmarks.depth
"""


from benchmarks import common


def parse_args(argv=None):
  ap = common.argument_parser(__doc__, rounds=5, steps=2)
  ap.add_argument("--layers", default="8,16,48", help="comma-separated L values")
  ap.add_argument("--modes", default="loop,scan-u1,scan-u2,scan-u4",
                  help="comma-separated: loop, scan-uN")
  ap.add_argument("--templates", type=int, default=4)
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--no-steps", action="store_true", help="only measure compile time")
  ap.add_argument("--quick", action="store_true",
                  help="L in {2, 4}, loop and scan-u1, batch 32, 2 rounds (< 1 minute)")
  args = ap.parse_args(argv)
  if args.quick:
    args.layers, args.modes, args.batch, args.rounds = "2,4", "loop,scan-u1", 32, 2
  return args


def mode_overrides(mode):
  if mode == "loop":
    return dict(layer_iteration="loop")
  if mode.startswith("scan-u"):
    return dict(layer_iteration="scan", scan_unroll=int(mode[len("scan-u"):]))
  raise ValueError(f"unknown mode {mode!r}; use loop or scan-uN")


def main(argv=None):
  args = parse_args(argv)
  common.print_header()
  modes = args.modes.split(",")
  rows = []
  for num_layers in [int(v) for v in args.layers.split(",")]:
    runners, compile_s = {}, {}
    for mode in modes:
      spec = common.digits_spec(num_layers=num_layers, num_templates=args.templates,
                                **mode_overrides(mode))
      step = common.TrainStep(spec, batch=args.batch)
      compile_s[mode] = step.compile()
      print(f"L={num_layers:3d} {mode:8s} compile {compile_s[mode]:6.1f}s", flush=True)
      runners[mode] = step.run
    times = ({m: [float("nan")] for m in modes} if args.no_steps
             else common.alternate(runners, args.rounds, args.steps))
    for mode in modes:
      r_med, r_min, r_pair = common.ratios(times[mode], times[modes[0]])
      rows.append((num_layers, mode, compile_s[mode], common.median(times[mode]),
                   min(times[mode]), r_pair))
    del runners
  print(f"\nK={args.templates} batch={args.batch}; step medians of {args.rounds} alternating "
        f"rounds x {args.steps} steps; ratio: median of per-round ratios vs {modes[0]} at the same L")
  print(f"{'L':>3s} {'mode':8s} {'compile s':>9s} {'s/step':>8s} {'min':>8s} {'ratio':>6s}")
  for num_layers, mode, c, m, lo, r in rows:
    print(f"{num_layers:3d} {mode:8s} {c:9.1f} {m:8.4f} {lo:8.4f} {r:6.3f}")
  return rows


if __name__ == "__main__":
  main()
