"""The input pipeline's batch rate against the training step's rate, for configs/digits.py.

The pipeline is the trainer's own (`train/context.make_streams` over the embedded digits: the
share decoded once and held in memory, random crop, normalise, batch); the step is the
trainer's model at the config's shape (benchmarks/common.TrainStep, RMSProp). Rounds
alternate: a round takes `--batches` batches from the stream, waits for tf.data's background
prefetching to finish, then times `--steps` steps.
The pipeline must deliver batches several times faster than the step consumes them, or the
accelerator waits.

  python -m benchmarks.input_pipeline [--config configs/digits.py] [--data_dir DIR]
"""
import time


from benchmarks import common

SETTLE_S = 3.0


def parse_args(argv=None):
  ap = common.argument_parser(__doc__, rounds=5, steps=5)
  ap.add_argument("--config", default="configs/digits.py")
  ap.add_argument("--data_dir", default=None, help="TFDS data_dir (default: the config's)")
  ap.add_argument("--batches", type=int, default=50, help="batches per timed round")
  return ap.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  from compmod_jax.models.network_spec import NetworkSpec
  from compmod_jax.train import context

  config = common.load_config(args.config)
  if args.data_dir:
    config.data.data_dir = args.data_dir
  common.print_header()
  context.check_and_prepare_datasets(config)
  streams = context.make_streams(config, train=True)
  iterators = {task: iter(stream) for task, stream in streams.items()}
  batch_size = sum(next(it)["image"].shape[0] for it in iterators.values())

  def take(n):
    start = time.perf_counter()
    for _ in range(n):
      for it in iterators.values():
        next(it)
    return (time.perf_counter() - start) / n

  task, = config.tasks  # the digits config: one task
  first = next(iterators[task])
  model = config.model
  spec = NetworkSpec(tasks=((task, 10),), input_channels=first["image"].shape[-1],
                     num_layers=model.num_layers, num_templates=model.num_templates,
                     depth_multiplier=model.depth_multiplier, patch_size=model.patch_size)
  step = common.TrainStep(spec, batch=batch_size, hw=first["image"].shape[1])
  step.compile()
  times = {"pipeline": [], "step": []}
  take(args.batches)  # warm-up: fills the shuffle buffer and the prefetch queue
  step.run(1)
  for _ in range(args.rounds):
    times["pipeline"].append(take(args.batches))
    # tf.data refills its prefetch buffers in the background after a round; let it finish, so
    # the steps are not timed against it.
    time.sleep(SETTLE_S)
    times["step"].append(step.run(args.steps))
  batch_s, step_s = common.median(times["pipeline"]), common.median(times["step"])
  print(f"config {args.config}: batch {batch_size} of {first['image'].shape[1:]} images, "
        f"model L={spec.num_layers} K={spec.num_templates} patch={spec.patch_size}")
  print(f"input pipeline: {1 / batch_s:.1f} batches/s ({batch_s * 1e3:.2f} ms per batch, "
        f"median of {args.rounds} rounds of {args.batches})")
  print(f"training step:  {1 / step_s:.2f} steps/s ({step_s * 1e3:.1f} ms per step, median of "
        f"{args.rounds} rounds of {args.steps})")
  print(f"pipeline rate / step rate: {step_s / batch_s:.1f}x")


if __name__ == "__main__":
  main()
