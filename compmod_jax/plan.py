r"""What a config costs, before anyone spends pod time on it.

  python -m compmod_jax.plan --config=configs/natural5.py:setup=mixture --num_devices=8
  python -m compmod_jax.plan --config=configs/imagenet_table1.py:K=16,L=48 \
      --num_devices=8 --device_memory_gb=16

Builds the model and the sharded train step of the config at its real image size and batch on
--num_devices devices (simulated CPU devices where the machine has no such accelerators; set
JAX_PLATFORMS=cpu on a GPU machine to simulate), reads no data (class counts and image shapes
come from the TFDS builders' code), lowers and compiles the step ahead of time and prints one
JSON object:

  parameters                  {"total": n, "per_group": {group: n}}
  source_tasks                the tasks of the checkpoint config.init_from names, when it
                              exists here (read from it): a transfer run's model holds them
  per_device_batch            {task: examples per device and step}
  flops_per_step              XLA's operation count of one step, all devices together (of
                              the step with every layer unrolled: XLA counts a loop's body
                              once, which would make a scanned model read as one layer)
  flops_per_step_per_device   the same, divided by the devices
  bytes_per_device            memory of the compiled step per device: arguments + outputs +
                              temporaries - buffers the step updates in place (donated state)
  compile_seconds             lowering + compiling, on this machine

XLA:CPU's counts stand in for the accelerator's: a TPU or GPU compiler fuses differently, so
memory there can differ by tens of percent; the parameter count and batch are exact.
"""
import json
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from compmod_jax import cli
from compmod_jax.data import pipeline
from compmod_jax.methods import multitask, registry
from compmod_jax.train import context, optim, start, steps, validation

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:arg]).",
                                lock_config=True)
flags.DEFINE_integer("num_devices", 8, "Devices the step is sharded over.")
flags.DEFINE_float("device_memory_gb", None, "Refuse a step that needs more memory per device.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


class PlanError(ValueError):
  """The config cannot run as planned (batch, memory); the message says what to change."""


def task_classes(config):
  """{task: classes the model predicts}, from the builders' code: no data is read."""
  classes = {}
  for task in config.tasks:
    data_config = context.task_data_config(config, task)
    builder = pipeline.dataset_builder(data_config.name, data_config.data_dir)
    classes[task] = pipeline.num_classes(builder, data_config)
  return classes


def source_tasks(config):
  """{task: classes} of the checkpoint config.init_from names, when it exists here: a transfer
  run's model holds those tasks too (frozen). {} otherwise: the plan then covers the new
  tasks' part of the model only."""
  if not config.init_from or not epath.Path(config.init_from).exists():
    return {}
  return start.pretrained_source(config).tasks  # with config.deltas, as the trainer reads it


def image_shape(config):
  """(side, side, channels) of the model's input: config.data.image_size, else the stored size
  of the first task's images when it is fixed."""
  side = config.data.image_size
  if not side:
    task = sorted(config.tasks)[0]
    stored = pipeline.dataset_builder(config.tasks[task].dataset).info.features["image"].shape
    if stored[0] is None or stored[0] != stored[1]:
      raise PlanError(f"Task {task!r} has images of varying or non-square size {stored}: set "
                      f"config.data.image_size.")
    side = stored[0]
  return (side, side, config.data.channels)


def lower(config):
  """(the train step lowered for the config's real shapes on this process's devices, the
  abstract train state). Validates the config first; reads no data."""
  try:
    validation.validate(config, check_memory=False)  # XLA's estimate below is the check
  except ValueError as error:
    raise PlanError(f"{error}") from error
  model = start.model_for(config, {**source_tasks(config), **task_classes(config)})
  ctx = context.RunContext(config=config, workdir="", mesh=context.make_mesh(config),
                           model=model, method=registry.get(config.method), train_streams={},
                           eval_streams={}, eval_steps={})
  shape = image_shape(config)
  init, optimization = start.state_initializer(ctx, jnp.zeros((1,) + shape, jnp.float32))
  replicated, split = NamedSharding(ctx.mesh, P()), NamedSharding(ctx.mesh, P("data"))
  state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                       jax.eval_shape(init, jax.random.key(0)))
  batch = {task: {"image": jax.ShapeDtypeStruct((n,) + shape, jnp.float32, sharding=split),
                  "label": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=split),
                  "mask": jax.ShapeDtypeStruct((n,), jnp.float32, sharding=split)}
           for task, n in multitask.task_batch_sizes(config, jax.device_count()).items()}
  step = steps.jit_train_step(jax.tree.map(lambda a: a.sharding, state), model=model,
                              optimization=optimization,
                              loss_fn=ctx.method.make_loss(config, model.spec), config=config)
  return step.lower(state, batch), state, ctx


def plan(config, device_memory_gb=None):
  """The JSON-able cost of one train step of `config` on this process's devices."""
  started = time.perf_counter()
  lowered, state, ctx = lower(config)
  compiled = lowered.compile()
  compile_seconds = time.perf_counter() - started
  devices = jax.device_count()
  flops = step_flops(lowered if not ctx.model.spec.uses_scan else unrolled_lowering(config))
  memory = compiled.memory_analysis()
  bytes_per_device = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                      + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  groups = optim.group_labels(state.params, optim.parameter_groups(ctx.method))
  per_group = {}
  for label, leaf in zip(jax.tree.leaves(groups), jax.tree.leaves(state.params)):
    per_group[label] = per_group.get(label, 0) + int(leaf.size)
  result = {
      "devices": devices, "parameters": {"total": sum(per_group.values()),
                                         "per_group": dict(sorted(per_group.items()))},
      "source_tasks": sorted(source_tasks(ctx.config)),
      "per_device_batch": {task: n // devices for task, n in
                           multitask.task_batch_sizes(ctx.config, devices).items()},
      "image_shape": list(image_shape(ctx.config)),
      "flops_per_step_per_device": flops / devices,
      "flops_per_step": flops,
      "bytes_per_device": int(bytes_per_device),
      "compile_seconds": round(compile_seconds, 1)}
  if device_memory_gb and bytes_per_device > device_memory_gb * 2**30:
    raise PlanError(
        f"One train step needs {bytes_per_device / 2**30:.1f} GiB per device (XLA's estimate), "
        f"more than --device_memory_gb={device_memory_gb}: lower config.batch_size (now "
        f"{ctx.config.batch_size}) or use more devices.\n{json.dumps(result)}")
  return result


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
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  jax.config.update("jax_num_cpu_devices", FLAGS.num_devices)  # before any backend starts
  if jax.device_count() != FLAGS.num_devices:
    raise app.UsageError(f"--num_devices={FLAGS.num_devices}, but this process sees "
                         f"{jax.device_count()} {jax.default_backend()} devices; set "
                         f"JAX_PLATFORMS=cpu to simulate {FLAGS.num_devices} devices.")
  try:
    result = plan(FLAGS.config, FLAGS.device_memory_gb)
  except PlanError as error:
    sys.exit(f"compmod_jax.plan: {error}")
  print(json.dumps(result, indent=2))


def run():
  cli.make_config_folder_importable(sys.argv)
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  run()
