r"""What a config costs, before anyone spends pod time on it.

  python -m compmod_jax.plan --config=configs/natural5.py:setup=mixture --num_devices=8
  python -m compmod_jax.plan --config=configs/imagenet_table1.py:K=16,L=48 \
      --num_devices=8 --device_memory_gb=16

Builds the model and the sharded train step of the config at its real image size and batch on
--num_devices devices (simulated CPU devices where the machine has no such accelerators; set
JAX_PLATFORMS=cpu on a GPU machine to simulate), reads no data (class counts and image shapes
come from the TFDS builders' code), lowers and compiles the step ahead of time and prints one
JSON object:

  compute_dtype, remat        the config's config.model.compute_dtype and config.model.remat
  parameters                  {"total": n, "per_group": {group: n}}
  source_tasks                the tasks of the checkpoint config.init_from names, when it
                              exists here (read from it): a transfer run's model holds them
  without_checkpoint          (a transfer config whose checkpoint is not here) what the plan
                              leaves out: it plans the new tasks' part of the model
  per_device_batch            {task: examples per device and step}
  flops_per_step              XLA's operation count of one step, all devices together (of
                              the step with every layer unrolled: XLA counts a loop's body
                              once, which would make a scanned model read as one layer;
                              recomputation under remat included)
  flops_per_step_per_device   the same, divided by the devices
  bytes_per_device            memory of the compiled step per device: arguments + outputs +
                              temporaries - buffers the step updates in place (donated state)
  saved_activation_bytes_per_device
                              what the forward pass keeps for the backward pass, in the
                              program's dtypes, before XLA's optimisations (an upper bound):
                              XLA:CPU converts bfloat16 to float32 around its operations, so
                              this, not bytes_per_device, shows what bfloat16 saves on a TPU
  compile_seconds             lowering + compiling, on this machine
  variants                    (--variants) the three figures above for the step in float32,
                              in bfloat16 and in bfloat16 with remat=full, each compiled

With --device_memory_gb, a step whose bytes_per_device is more is refused with what would make
it fit: which of float32/bfloat16 with remat none/dots/full fit at the config's own batch, and
the largest batch per device that fits as configured (each compiled, not extrapolated).

XLA:CPU's counts stand in for the accelerator's: a TPU or GPU compiler fuses differently, so
memory there can differ by tens of percent; the parameter count and batch are exact.
"""
import dataclasses
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from compmod_jax import cli
from compmod_jax.finetune import init_from
from compmod_jax.methods import registry
from compmod_jax.train import context, multitask, optim, start, validation

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:arg]).",
                                lock_config=True)
flags.DEFINE_integer("num_devices", 8, "Devices the step is sharded over.")
flags.DEFINE_float("device_memory_gb", None, "Refuse a step that needs more memory per device, "
                   "saying what would make it fit.")
flags.DEFINE_bool("variants", False, "Also compile the step in float32, bfloat16 and bfloat16 "
                  "with remat=full and report each one's memory and FLOPs.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


class PlanError(ValueError):
  """The config cannot run as planned (batch, memory); the message says what to change."""


def source_tasks(config):
  """{task: classes} of the checkpoint config.init_from names, when it exists here: a transfer
  run's model holds those tasks too (frozen). {} otherwise: the plan then covers the new
  tasks' part of the model only."""
  if not config.init_from or not epath.Path(config.init_from).exists():
    return {}
  return init_from.pretrained_source(config).tasks  # with config.deltas, as the trainer reads it


@dataclasses.dataclass
class PlannedStep:
  """The config's jitted train step with abstract (shape-only) inputs at its real shapes."""
  step: Any
  state: Any
  batch: dict
  loss_fn: Any
  ctx: context.RunContext

  def lower(self):
    return self.step.lower(self.state, self.batch)

  def saved_activation_bytes(self):
    """Bytes per device of what the forward pass keeps for the backward pass: the residuals
    of the loss's VJP (activations, and the parameters they multiply) in the dtypes the
    program asks for, counted leaf by leaf before XLA shares, fuses or drops any of them, so
    an upper bound. Unlike XLA:CPU's memory figure, which converts bfloat16 to float32 around
    its operations, it shows what bfloat16 halves on an accelerator and what remat trims."""
    def residuals(params, batch_stats, batch):
      loss = lambda p: self.loss_fn(self.ctx.model, p, batch_stats, batch,
                                    jax.random.key(0))[0]
      return jax.vjp(loss, params)[1]

    leaves = jax.tree.leaves(jax.eval_shape(residuals, self.state.params,
                                            self.state.batch_stats, self.batch))
    return int(sum(leaf.size * leaf.dtype.itemsize for leaf in leaves) // jax.device_count())


def lower(config):
  """(the train step lowered for the config's real shapes on this process's devices, the
  abstract train state, the run context). Validates the config first; reads no data."""
  planned = planned_step(config)
  return planned.lower(), planned.state, planned.ctx


def planned_step(config):
  """The config's PlannedStep. Validates the config first; reads no data."""
  try:
    validation.validate(config, planning=True)
  except ValueError as error:
    raise PlanError(f"{error}") from error
  model = start.model_for(config, {**source_tasks(config), **context.task_classes(config)})
  ctx = context.RunContext(config=config, workdir="", mesh=context.make_mesh(config),
                           model=model, method=registry.get(config.method), train_streams={},
                           eval_streams={}, eval_steps={})
  shape = context.input_shape(config)
  init, optimization = start.state_initializer(ctx, start.example_images(config))
  replicated, split = NamedSharding(ctx.mesh, P()), NamedSharding(ctx.mesh, P("data"))
  state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                       jax.eval_shape(init, jax.random.key(0)))
  batch = {task: {"image": jax.ShapeDtypeStruct((n,) + shape, jnp.float32, sharding=split),
                  "label": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=split),
                  "mask": jax.ShapeDtypeStruct((n,), jnp.float32, sharding=split)}
           for task, n in multitask.task_batch_sizes(config, jax.device_count()).items()}
  return PlannedStep(step=start.train_step(ctx, state, optimization), state=state, batch=batch,
                     loss_fn=ctx.method.make_loss(config, model.spec), ctx=ctx)


def step_cost(config):
  """{bytes_per_device, saved_activation_bytes_per_device, flops_per_step}, the seconds to
  lower and compile, the abstract state and the run context of the config's train step."""
  started = time.perf_counter()
  planned = planned_step(config)
  lowered, state, ctx = planned.lower(), planned.state, planned.ctx
  memory = lowered.compile().memory_analysis()
  seconds = time.perf_counter() - started
  flops = step_flops(lowered if not ctx.model.spec.uses_scan else unrolled_lowering(config))
  bytes_per_device = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                      + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  cost = {"bytes_per_device": int(bytes_per_device),
          "saved_activation_bytes_per_device": planned.saved_activation_bytes(),
          "flops_per_step": flops}
  return cost, seconds, state, ctx


def plan(config, device_memory_gb=None, variants=False):
  """The JSON-able cost of one train step of `config` on this process's devices."""
  cost, compile_seconds, state, ctx = step_cost(config)
  bytes_per_device, flops = cost["bytes_per_device"], cost["flops_per_step"]
  devices = jax.device_count()
  groups = optim.group_labels(state.params, optim.parameter_groups(ctx.method))
  per_group = {}
  for label, leaf in zip(jax.tree.leaves(groups), jax.tree.leaves(state.params)):
    per_group[label] = per_group.get(label, 0) + int(leaf.size)
  result = {
      "devices": devices, "compute_dtype": config.model.compute_dtype,
      "remat": config.model.remat,
      "parameters": {"total": sum(per_group.values()),
                     "per_group": dict(sorted(per_group.items()))},
      "source_tasks": sorted(source_tasks(ctx.config)),
      "per_device_batch": per_device_batch(config),
      "image_shape": list(context.input_shape(ctx.config)),
      "flops_per_step_per_device": flops / devices,
      "flops_per_step": flops,
      "bytes_per_device": bytes_per_device,
      "saved_activation_bytes_per_device": cost["saved_activation_bytes_per_device"],
      "compile_seconds": round(compile_seconds, 1)}
  if planned_without_checkpoint(config):
    result["without_checkpoint"] = (
        f"config.init_from ({config.init_from or 'unset'}) is not here: planned the new "
        f"tasks' part of the model; the checkpoint's tasks (their xi and BN rows and heads, "
        f"frozen) come on top. Give --config.init_from=<its workdir> to plan the whole model.")
  if variants:
    result["variants"] = {name: step_cost(variant)[0]
                          for name, variant in precision_variants(config).items()}
  if device_memory_gb and bytes_per_device > device_memory_gb * 2**30:
    raise PlanError(
        f"One train step needs {bytes_per_device / 2**30:.3g} GiB per device (XLA's estimate), "
        f"more than --device_memory_gb={device_memory_gb}. "
        f"{fitting_alternatives(config, device_memory_gb * 2**30, bytes_per_device)}"
        f"\n{json.dumps(result)}")
  return result


def per_device_batch(config):
  """{task: examples per device and step}."""
  devices = jax.device_count()
  return {task: n // devices for task, n in multitask.task_batch_sizes(config, devices).items()}


def planned_without_checkpoint(config):
  """Whether the config starts from a checkpoint (init_from, or a trainable preset that needs
  one) that is not here, so that the plan holds the new tasks' part of the model only."""
  starts_trained = bool(config.init_from) or config.trainable not in ("", "all")
  return starts_trained and not config.get("pretrain") and not source_tasks(config)


def precision_variants(config, choices=(("float32", "none"), ("bfloat16", "none"),
                                        ("bfloat16", "full"))):
  """{name: a copy of `config` computing in that precision and remat}: what --variants and the
  memory advice compile."""
  variants = {}
  for compute_dtype, remat in choices:
    variant = ml_collections.ConfigDict(config.to_dict())
    variant.model.update(compute_dtype=compute_dtype, remat=remat)
    variants[compute_dtype + ("" if remat == "none" else f"+remat={remat}")] = variant
  return variants


def with_batch_scaled(config, factor):
  """A copy of `config` whose batch (config.batch_size and every task's own batch_size) is
  `factor` times as large, each rounded down to a multiple of the devices (at least one per
  device). The 1e-9 keeps an exact multiple from rounding down."""
  devices = jax.device_count()
  scaled = ml_collections.ConfigDict(config.to_dict())
  resize = lambda n: max(devices, int(n * factor + 1e-9) // devices * devices)
  scaled.batch_size = resize(config.batch_size)
  for task in scaled.tasks.values():
    if task.get("batch_size"):
      task.batch_size = resize(task.batch_size)
  return scaled


def batch_flags(config):
  """The flags that set `config`'s batch, as a user would type them."""
  named = [f"--config.tasks.{task}.batch_size={config.tasks[task].batch_size}"
           for task in sorted(config.tasks) if config.tasks[task].get("batch_size")]
  if len(named) < len(config.tasks):
    named.insert(0, f"--config.batch_size={config.batch_size}")
  return " ".join(named)


def fitting_alternatives(config, limit_bytes, bytes_per_device):
  """What makes the step fit `limit_bytes` per device: the precision variants that fit at the
  config's own batch, and the largest batch that fits as configured (both compiled)."""
  fits = []
  choices = [(dtype, remat) for dtype in ("float32", "bfloat16") for remat in ("none", "dots",
                                                                                 "full")]
  for variant in precision_variants(config, choices).values():
    same = (variant.model.compute_dtype, variant.model.remat) == (
        config.model.compute_dtype, config.model.remat)
    needed = bytes_per_device if same else step_cost(variant)[0]["bytes_per_device"]
    if needed <= limit_bytes:
      flags_text = (f"--config.model.compute_dtype={variant.model.compute_dtype} "
                    f"--config.model.remat={variant.model.remat}")
      fits.append(f"{flags_text} ({needed / 2**30:.3g} GiB)")
  advice = (f"At this batch it fits with {' or '.join(fits)}. " if fits else
            "At this batch neither bfloat16 nor remat makes it fit. ")
  largest = largest_fitting_batch(config, limit_bytes, bytes_per_device)
  if largest is None:
    return advice + "No batch fits as configured: use more devices or a smaller model."
  per_device = sum(per_device_batch(largest).values())
  return (advice + f"As configured, the largest batch that fits is {per_device} examples per "
          f"device: {batch_flags(largest)}.")


def largest_fitting_batch(config, limit_bytes, bytes_per_device):
  """The config with the largest batch (examples per device, every task scaled alike) whose
  compiled step fits `limit_bytes` per device, or None if one example per device does not.
  Memory is nearly affine in the batch, so each guess interpolates the two nearest compiled
  sizes; the search compiles until the batch that fits and the next larger one that does not
  are one example per device apart (at most 8 compilations)."""
  examples = sum(per_device_batch(config).values())
  compiled = {examples: (config, bytes_per_device)}  # examples per device -> (config, bytes)

  def compile_at(target):
    scaled = with_batch_scaled(config, target / examples)
    size = sum(per_device_batch(scaled).values())
    if size not in compiled:
      compiled[size] = (scaled, step_cost(scaled)[0]["bytes_per_device"])
    return size

  compile_at(max(1, examples // 2))
  for _ in range(8):
    fitting = [n for n, (_, needed) in compiled.items() if needed <= limit_bytes]
    low = max(fitting, default=0)
    high = min(n for n, (_, needed) in compiled.items() if needed > limit_bytes)
    if high - low <= 1:
      break
    (small, small_bytes), (large, large_bytes) = sorted(
        (n, needed) for n, (_, needed) in compiled.items())[:2] if not low else (
        (low, compiled[low][1]), (high, compiled[high][1]))
    per_example = (large_bytes - small_bytes) / (large - small)
    guess = int(small + (limit_bytes - small_bytes) // max(per_example, 1.0))
    if compile_at(min(max(guess, low + 1, 1), high - 1)) in (low, high):
      break  # the devices' rounding leaves no size in between
  fitting = [n for n, (_, needed) in compiled.items() if needed <= limit_bytes]
  return compiled[max(fitting)][0] if fitting else None


def unrolled_lowering(config):
  """The step of `config` lowered with a Python loop over the layers instead of lax.scan."""
  unrolled = ml_collections.ConfigDict(config.to_dict())
  unrolled.model.layer_iteration = "loop"
  return lower(unrolled)[0]


def step_flops(lowered):
  """XLA's operation count of a lowered step (the whole batch, before partitioning)."""
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def main(argv):
  if len(argv) > 1:
    raise cli.CommandError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.num_devices < 1:
    raise cli.CommandError(f"--num_devices={FLAGS.num_devices}: give the number of devices "
                           f"the step is sharded over (1 or more).")
  jax.config.update("jax_num_cpu_devices", FLAGS.num_devices)  # before any backend starts
  if jax.device_count() != FLAGS.num_devices:
    raise cli.CommandError(f"--num_devices={FLAGS.num_devices}, but this process sees "
                           f"{jax.device_count()} {jax.default_backend()} devices; set "
                           f"JAX_PLATFORMS=cpu to simulate {FLAGS.num_devices} devices.")
  cli.use_compilation_cache(FLAGS.config.compilation_cache_dir)
  print(json.dumps(plan(FLAGS.config, FLAGS.device_memory_gb, FLAGS.variants), indent=2))


def run():
  cli.run_command("compmod_jax.plan", main)


if __name__ == "__main__":
  run()
