"""Mixing overhead: training-step time of the template-mixture network vs the plain network,
and of routing by content (routing='example') vs routing by task.

For each K in --templates, the mixture model (learned signature, K templates, L layers) and the
plain isometric network (every layer its own block, same L, batch and shape) are compiled in one
process and timed in alternating rounds; the script prints medians and the ratio mixture/plain.
With --routing=task,example each K also gets a model that mixes the bank per example, and a
second table gives its ratios to the same K routed by task.
Shape: batch 128 of 28x28x1 images, 10 classes, patch 2, width 24 (depth_multiplier 0.6), SE,
dropout 0.2, RMSProp(0.02, decay=0.9, eps=1e-8), BN in training mode.

  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python -m benchmarks.step_time
"""


from benchmarks import common


def parse_args(argv=None):
  ap = common.argument_parser(__doc__, rounds=7, steps=3)
  ap.add_argument("--templates", default="1,4,16,32", help="comma-separated K values")
  ap.add_argument("--layers", type=int, default=16)
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--routing", default="task",
                  help="comma-separated config.model.routing values to time for each K")
  common.add_step_arguments(ap)
  ap.add_argument("--quick", action="store_true",
                  help="K in {1, 4}, L=4, 3 rounds of 2 steps (< 1 minute)")
  args = ap.parse_args(argv)
  if args.quick:
    args.templates, args.layers, args.rounds, args.steps = "1,4", 4, 3, 2
  return args


def main(argv=None):
  args = parse_args(argv)
  common.print_header()
  ks = [int(k) for k in args.templates.split(",")]
  base = dict(num_layers=args.layers, layer_iteration=args.layer_iteration,
              conv_impl=args.conv_impl)
  routings = args.routing.split(",")
  models = [("plain", common.digits_spec(signature="plain", **base))]
  for k in ks:
    models += [(model_name(k, routing), common.digits_spec(num_templates=k, routing=routing,
                                                          **base)) for routing in routings]
  runners, compile_s = {}, {}
  for name, spec in models:
    step = common.TrainStep(spec, batch=args.batch)
    compile_s[name] = step.compile()
    runners[name] = step.run
  times = common.alternate(runners, args.rounds, args.steps)
  print(f"L={args.layers} batch={args.batch} width=24 14x14, {args.rounds} alternating rounds "
        f"x {args.steps} steps")
  print("ratios vs plain: of medians / of minimums / median of per-round (paired) ratios")
  print(f"{'model':12s} {'compile s':>9s} {'median s/step':>13s} {'min':>7s} {'r(median)':>9s} "
        f"{'r(min)':>7s} {'r(paired)':>9s}")
  for name, values in times.items():
    r_med, r_min, r_pair = common.ratios(values, times["plain"])
    print(f"{name:12s} {compile_s[name]:9.1f} {common.median(values):13.4f} "
          f"{min(values):7.4f} {r_med:9.3f} {r_min:7.3f} {r_pair:9.3f}")
  for routing in routings[1:]:
    print(f"routing={routing} vs routing={routings[0]} at the same K: r(median) r(min) r(paired)")
    for k in ks:
      ratios = common.ratios(times[model_name(k, routing)], times[model_name(k, routings[0])])
      print(f"K={k:<8d} " + " ".join(f"{r:9.3f}" for r in ratios))
  return times


def model_name(num_templates, routing):
  return f"K={num_templates}" + ("" if routing == "task" else f" {routing}")


if __name__ == "__main__":
  main()
