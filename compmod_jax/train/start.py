"""How a run starts: its context (model, method, data), a fresh train state, then either its
own newest good checkpoint (resume) or another run's checkpoint (config.init_from:
compmod_jax/finetune/init_from.py)."""
import jax
import jax.numpy as jnp
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from compmod_jax.methods import registry
from compmod_jax.models.network import CompositionalIsometricNet
from compmod_jax.models.network_spec import NetworkSpec
from compmod_jax.train import checkpoint, context, optim, steps


def model_for(config, num_classes):
  """The network of `config` for tasks with these {task: number of classes}."""
  spec = NetworkSpec.from_config(config.model, sorted(num_classes.items()),
                                 config.data.channels)
  return CompositionalIsometricNet(spec)


def make_context(config, workdir, source_tasks):
  """The run context: the mesh, this process's data streams, the network for the tasks of
  config.tasks plus the tasks {name: classes} of a pretrained checkpoint the run starts from
  (their rows stay frozen: optim.trainable_mask), the method and the eval steps."""
  train_streams = context.make_streams(config, train=True)
  eval_streams = context.make_streams(config, train=False)
  model = model_for(config, {**source_tasks, **context.task_classes(config)})
  return context.RunContext(
      config=config, workdir=workdir, mesh=context.make_mesh(config), model=model,
      method=registry.get(config.method), train_streams=train_streams,
      eval_streams=eval_streams,
      eval_steps={task: steps.jit_eval_step(model, task) for task in eval_streams})


def example_images(config):
  """One all-zero image shaped like the model's input (context.input_shape: metadata only)."""
  return jnp.zeros((1,) + context.input_shape(config), jnp.float32)


def train_step(ctx, state, optimization):
  """The run's jitted train step (steps.jit_train_step), sharded like `state` (concrete or
  abstract arrays): the one way the loop, `plan`, the benchmarks and the tests build it."""
  return steps.jit_train_step(
      jax.tree.map(lambda a: a.sharding, state), model=ctx.model, optimization=optimization,
      loss_fn=ctx.method.make_loss(ctx.config, ctx.model.spec), config=ctx.config)


def create_train_state(ctx, images):
  """The fresh state and the run's optim.Optimization. Parameters are created already
  replicated on the mesh (jit with out_shardings)."""
  init, optimization = state_initializer(ctx, images)
  state = jax.jit(init, out_shardings=NamedSharding(ctx.mesh, P()))(
      jax.random.key(ctx.config.seed))
  return state, optimization


def state_initializer(ctx, images):
  """(init(rng) -> TrainState, the run's optim.Optimization) for inputs shaped like `images`.
  The method's own variables live beside the model's, under params[method.own_params], in
  their own optimizer group."""
  config, model, method = ctx.config, ctx.model, ctx.method

  def init_variables(rng):
    variables = dict(model.init(rng, images))
    if method.own_params:
      own = method.init_params(config, model, variables, jax.random.fold_in(rng, 1), images)
      variables["params"] = dict(variables["params"], **{method.own_params: own})
    return variables

  params_shapes = jax.eval_shape(init_variables, jax.random.key(0))["params"]
  tx, schedule = optim.make_optimizer(config, params_shapes, optim.parameter_groups(method))
  trainable = optim.trainable_mask(params_shapes, config, model.spec, method)

  def init(rng):
    variables = init_variables(rng)
    params = variables["params"]
    return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                            batch_stats=variables["batch_stats"], opt_state=tx.init(params),
                            ema_params=params)

  return init, optim.Optimization(tx=tx, schedule=schedule, trainable=trainable)


def refuse_other_config(config, workdir, checkpointer):
  """The run's newest checkpoint meta (None without one); refuses a conflicting config."""
  meta = checkpointer.newest_meta()
  conflicts = checkpoint.config_conflicts(meta["config"], config) if meta else []
  if conflicts:
    raise ValueError(
        f"The checkpoint in {workdir} was made with another config; refusing to resume:\n  "
        + "\n  ".join(conflicts) + "\nUse a new --workdir, or the checkpoint's config "
        f"(saved in {epath.Path(workdir) / 'config.json'}).")
  return meta


def resume(ctx, checkpointer, state):
  """The newest good checkpoint's state and meta (corrupt newer ones are handled as
  config.on_corrupt_checkpoint says), or the fresh state and {}."""
  restored, meta = checkpointer.restore_newest_good(
      checkpoint.abstract_state(state), ctx.train_streams, ctx.config.on_corrupt_checkpoint)
  if restored is None:
    return state, {}
  logging.info("Resumed from %s at step %d.", checkpointer.workdir, meta["step"])
  return restored, meta
