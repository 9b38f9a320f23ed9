"""How a run starts: its context (model, method, data), a fresh train state, then either its
own newest good checkpoint (resume) or another run's checkpoint (config.init_from, plus the
config.deltas of train/deltas.py: grown by methods/growth.py, loaded strictly by
train/pretrained.py, new tasks built by methods/transfer.py)."""
import jax
import jax.numpy as jnp
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from compmod_jax.data import classes
from compmod_jax.methods import growth, registry, transfer
from compmod_jax.models.network import CompositionalIsometricNet
from compmod_jax.models.network_spec import NetworkSpec
from compmod_jax.train import checkpoint, context, deltas, optim, pretrained, steps


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
  num_classes = dict(source_tasks)
  num_classes.update({task: classes.num_classes(stream.builder, stream.data_config)
                      for task, stream in train_streams.items()})
  model = model_for(config, num_classes)
  return context.RunContext(
      config=config, workdir=workdir, mesh=context.make_mesh(config), model=model,
      method=registry.get(config.method), train_streams=train_streams,
      eval_streams=eval_streams,
      eval_steps={task: steps.jit_eval_step(model, task) for task in eval_streams})


def example_images(ctx):
  """One all-zero image batch shaped like the data (the first eval batch tells the shape)."""
  stream = next(iter(ctx.eval_streams.values()))
  shape = next(iter(stream))["image"].shape[1:]
  iter(stream)  # restart the pass consumed for the shape
  return jnp.zeros((1,) + tuple(shape), jnp.float32)


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


def pretrained_source(config):
  """The checkpoint config.init_from names with config.deltas applied (train/deltas.py), read
  and checked against config.xi_init and config.model.num_templates."""
  source = pretrained.load(config.init_from)
  if config.deltas:
    source = deltas.with_deltas(source, config.deltas)
  growth.check_source(config, source.variables)
  if set(config.tasks) - set(source.tasks):  # xi_init applies to new tasks only
    transfer.check_xi_init(config.xi_init, source.tasks)
  return source


def from_pretrained(ctx, state, source, trainable):
  """Loads the pretrained checkpoint into the fresh state (strictly: pretrained.merge), builds
  each new task's variables from the source tasks (methods/transfer.py) and evaluates the
  result. Sets ctx.run_info (what every checkpoint and results.json of the run carry) and
  returns the state and that evaluation."""
  config, spec, own = ctx.config, ctx.model.spec, ctx.method.own_params
  sources = sorted(source.tasks)
  _check_kept_tasks(ctx, trainable, state.params, sorted(set(sources) - set(config.tasks)))
  fresh = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
  method_params = fresh["params"].pop(own) if own else None  # the pretraining had no such
  source_variables, added_templates = source.variables, None
  if config.transfer.add_templates:
    source_variables, added_templates = growth.grown(config, source.variables,
                                                     fresh["params"]["templates"])
  variables, report = pretrained.merge(fresh, source_variables, spec, sources,
                                       tuple(config.transfer.dont_load))
  logging.info("From %s: loaded %d variables; new-task rows or heads in %d; kept fresh by "
               "config.transfer.dont_load: %s", source.step_dir, len(report.loaded),
               len(report.new), report.not_loaded or "none")
  ctx.run_info = {"checkpoint": str(source.step_dir), "step": source.step,
                  "source_tasks": source.tasks, "xi_init": config.xi_init,
                  "trainable": config.trainable or "lr_multipliers",
                  "trainable_parameters": optim.count_trainable(trainable, state.params),
                  "new_tasks": {}, "added_templates": added_templates}
  new_tasks = sorted(set(config.tasks) - set(sources))
  for task in new_tasks:
    variables, ctx.run_info["new_tasks"][task] = transfer.initialise_new_task(
        ctx, variables, task, source.tasks)
  if config.transfer.target_bn_batches:
    variables = transfer.precise_bn_statistics(ctx, variables, new_tasks,
                                               config.transfer.target_bn_batches)
    logging.info("BN statistics of %s re-estimated on %d of their training batches.",
                 new_tasks, config.transfer.target_bn_batches)
  if own:
    variables["params"][own] = method_params
  # Separate copies: the train step donates its state, and params and EMA may not share one.
  state = state.replace(params=ctx.replicated(variables["params"]),
                        ema_params=ctx.replicated(variables["params"]),
                        batch_stats=ctx.replicated(variables["batch_stats"]))
  results = ctx.evaluate(state)
  for task, info in ctx.run_info["new_tasks"].items():
    info["accuracy_before_finetune"] = results[task]["test_accuracy"]
    logging.info("Task %s before fine-tuning: test accuracy %.4f; it adds %s parameters.",
                 task, results[task]["test_accuracy"], info["added_parameters"])
  return state, results


def _check_kept_tasks(ctx, trainable, params, kept):
  """A preset promises to keep the checkpoint's other tasks as they were: refused, before
  anything is evaluated or trained, when it would train what they share; '' (lr_multipliers
  alone) and 'all' only warn, since changing everything is what they ask for."""
  problem = optim.kept_tasks_problem(trainable, params, ctx.config, ctx.model.spec, ctx.method,
                                     kept)
  if problem and ctx.config.trainable in ("", "all"):
    logging.warning("%s", problem)
  elif problem:
    raise ValueError(problem)
