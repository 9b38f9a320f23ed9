"""train_and_evaluate(config, workdir): the one loop every experiment runs.

config -> per-task data streams (each process reads its own share) -> global batches sharded
over the mesh's "data" axis -> jitted train step (method loss + regularisers, partitioned
optimizer, EMA) -> metrics, mixture-weight pictures, results.json, checkpoints.

What the run does on SIGTERM, crashes, corrupt checkpoints, NaNs and bad config:
docs/reliability.md.
"""
import functools
import itertools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from etils import epath
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from compmod_jax.analysis import accounting, figures, similarity
from compmod_jax.data import pipeline
from compmod_jax.methods import adaptation, multitask, regularizers, supervised, transfer
from compmod_jax.models import network, templates
from compmod_jax.models.network import CompositionalIsometricNet, NetworkSpec
from compmod_jax.train import checkpoint, defaults, nonfinite, optim, preemption, pretrained, steps
from compmod_jax.train import workdir as workdir_io


def make_mesh(config):
  """A data-parallel mesh. Auto axis types: replicated params need no explicit sharding."""
  shape = tuple(jax.device_count() if n == -1 else n for n in config.mesh_shape)
  return jax.make_mesh(shape, ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def task_data_config(config, task):
  data_config = ml_collections.ConfigDict(config.data.to_dict())
  data_config.name = config.tasks[task].dataset
  data_config.label_map = config.tasks[task].get("label_map", "identity")
  return data_config


def task_stream(config, task, *, global_batch_size, train, seed=0, split=None):
  """This process's share of `task`'s split (default: the train or eval split)."""
  return pipeline.DataStream(
      task_data_config(config, task), batch_size=global_batch_size // jax.process_count(),
      train=train, split=split, seed=seed, process_index=jax.process_index(),
      process_count=jax.process_count())


def make_streams(config, *, train):
  """{task: DataStream} with this process's share of each task's split."""
  if train:
    batch_sizes = multitask.task_batch_sizes(config, jax.device_count())
  else:
    batch_sizes = {task: config.eval_batch_size for task in config.tasks}
  return {task: task_stream(config, task, global_batch_size=batch_sizes[task], train=train,
                            seed=config.seed + index)
          for index, task in enumerate(sorted(config.tasks))}


def make_model(config, streams, source_tasks=None):
  """The network for the tasks of `streams`, plus the tasks {name: classes} of a pretrained
  checkpoint that the run starts from (their rows stay frozen: optim.trainable_mask)."""
  num_classes = dict(source_tasks or {})
  num_classes.update({task: pipeline.num_classes(stream.builder, stream.data_config)
                      for task, stream in streams.items()})
  return model_for(config, num_classes)


def model_for(config, num_classes):
  """The network of `config` for tasks with these {task: number of classes}."""
  spec = NetworkSpec.from_config(config.model, sorted(num_classes.items()),
                                 config.data.channels)
  return CompositionalIsometricNet(spec)


def check_config(config):
  """Raises the first config error before any data is read or anything is compiled: training,
  optimizer, per-task batch and data fields, the model spec, and the trainable set. The model
  gets 2 classes per task as placeholders: the real counts come from the data, and no check
  depends on them."""
  if config.get("pretrain"):
    check_config(config.pretrain)
  defaults.validate(config, jax.device_count())
  multitask.task_batch_sizes(config, jax.device_count())
  for task in config.tasks:
    pipeline.check_data_config(task_data_config(config, task))
  model = model_for(config, {task: 2 for task in config.tasks})
  side = config.data.image_size or 4 * config.model.patch_size
  images = jnp.zeros((1, side, side, config.data.channels), jnp.float32)
  optim.check_trainable(jax.eval_shape(model.init, jax.random.key(0), images)["params"], config,
                        model.spec)


def replicated(mesh, host_tree):
  """A host (numpy) tree as arrays replicated on the mesh (every process passes the same)."""
  sharding = NamedSharding(mesh, P())
  return jax.tree.map(lambda x: jax.make_array_from_callback(
      np.shape(x), sharding, lambda index: np.asarray(x)[index]), host_tree)


def global_batch(mesh, local_batch):
  sharding = NamedSharding(mesh, P("data"))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x),
                      local_batch)


def create_train_state(config, model, mesh, example_images):
  """Parameters are created already replicated on the mesh (jit with out_shardings). A domain
  adaptation method's own variables (methods/adaptation.py) live beside the model's, under
  params["adaptation"] and its own parameter group."""
  def init_variables(rng):
    variables = dict(model.init(rng, example_images))
    if config.method in adaptation.METHODS:
      variables["params"] = dict(variables["params"], adaptation=adaptation.init_method_params(
          config, model, variables, jax.random.fold_in(rng, 1), example_images))
    return variables

  params_shapes = jax.eval_shape(init_variables, jax.random.key(0))["params"]
  tx, schedule = optim.make_optimizer(config, params_shapes)
  trainable = optim.trainable_mask(params_shapes, config, model.spec)

  def init(rng):
    variables = init_variables(rng)
    params = variables["params"]
    return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                            batch_stats=variables["batch_stats"], opt_state=tx.init(params),
                            ema_params=params)

  state = jax.jit(init, out_shardings=NamedSharding(mesh, P()))(jax.random.key(config.seed))
  return state, tx, schedule, trainable


def mixture_weights_by_task(model, params):
  """{task: xi [L, K]} for a learned signature, or the one-hot fixed signature."""
  spec = model.spec
  if "mixture_logits" in params:
    xi = np.asarray(templates.mixture_weights(params["mixture_logits"]))
  else:
    one_hot = np.eye(spec.bank_size)[np.asarray(spec.fixed_signature)]
    xi = np.broadcast_to(one_hot, (len(spec.tasks),) + one_hot.shape)
  return {task: xi[index] for index, (task, _) in enumerate(spec.tasks)}


def mixture_scalars(model, params):
  """Per-layer entropy and max of xi for each task (learned signatures only)."""
  if "mixture_logits" not in params:
    return {}
  entropy = np.asarray(regularizers.mixture_entropy(params["mixture_logits"]))
  scalars = {}
  for task, xi in mixture_weights_by_task(model, params).items():
    index = model.spec.task_index(task)
    for layer in range(xi.shape[0]):
      scalars[f"xi_entropy/{task}/layer_{layer + 1:02d}"] = entropy[index, layer]
      scalars[f"xi_max/{task}/layer_{layer + 1:02d}"] = xi[layer].max()
    scalars[f"xi_entropy/{task}/mean"] = entropy[index].mean()
  return scalars


def evaluate(state, eval_streams, eval_steps, mesh):
  """Accuracy and loss of each task on its whole eval split (padded batches are masked)."""
  results = {}
  for task, stream in sorted(eval_streams.items()):
    totals = eval_sums(state, stream, eval_steps[task], mesh)
    count = max(totals["count"], 1.0)
    results[task] = {"test_accuracy": totals["correct"] / count,
                     "test_loss": totals["loss_sum"] / count, "test_examples": int(count)}
  return results


def eval_sums(state, stream, eval_step, mesh, max_batches=None):
  """Correct predictions, cross-entropy and real examples summed over one pass of an eval
  stream (or its first `max_batches` batches)."""
  totals = {"correct": 0.0, "loss_sum": 0.0, "count": 0.0}
  for local_batch in itertools.islice(stream, max_batches):
    sums = eval_step(state, global_batch(mesh, local_batch))
    for key in totals:
      totals[key] += float(sums[key])
  return totals


def write_results(workdir, results, step, wall_time_s, run_info=None):
  """results.json: the interface later tools read; rewritten at each evaluation. A run started
  from a pretrained checkpoint adds, per new task, `accuracy_before_finetune` and
  `added_parameters`, and the details of its initialisation under "init_from"; a domain
  adaptation run the target's `target_test_accuracy`."""
  results = {task: dict(r, **_new_task_summary(run_info, task)) for task, r in results.items()}
  payload = {"tasks": results, "step": int(step), "wall_time_s": float(wall_time_s)}
  target = (run_info or {}).get("adaptation_target")
  if target:
    payload["target_test_accuracy"] = results[target]["test_accuracy"]
  if run_info:
    payload["init_from"] = run_info
  if jax.process_index() == 0:  # one writer: processes share the workdir
    workdir_io.write_json(epath.Path(workdir) / "results.json", payload)
  return payload


def _new_task_summary(run_info, task):
  info = (run_info or {}).get("new_tasks", {}).get(task)
  if not info:
    return {}
  return {"accuracy_before_finetune": info["accuracy_before_finetune"],
          "added_parameters": sum(info["added_parameters"].values())}


def read_results(workdir):
  return workdir_io.read_json(epath.Path(workdir) / "results.json")


def method_loss(config, spec):
  """The loss config.method trains on a model of `spec`:
  loss(model, params, batch_stats, batch, rng) -> (loss, (batch_stats, metrics))."""
  if config.method in adaptation.METHODS:
    return adaptation.make_loss(config, spec)
  task_weights = {task: config.tasks[task].weight for task in config.tasks}
  return functools.partial(supervised.classification_loss, task_weights=task_weights)


def stop_requested(watcher, step):
  """Whether to save and stop after `step` (tests patch this to simulate an interruption)."""
  return watcher.stop_at(step)


def train_and_evaluate(config, workdir):
  """Trains and evaluates `config` in `workdir`, resuming from its newest good checkpoint.

  Config errors, an unusable workdir, a checkpoint made with another config and a missing
  dataset all fail before any data is read or anything is compiled. Returns the final
  results.json payload.
  """
  check_config(config)
  workdir = workdir_io.prepare(workdir)
  if config.get("pretrain") and not config.init_from:
    config = _after_pretraining(config, workdir)
  checkpointer = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
  try:
    own_meta = _refuse_other_config(config, workdir, checkpointer)
    if jax.process_index() == 0:  # one writer: processes share the workdir
      (epath.Path(workdir) / "config.json").write_text(
          config.to_json_best_effort(indent=2, sort_keys=True))
    # A run resumes from its own checkpoints; the pretrained one is read only at the start.
    source = _pretrained_source(config) if config.init_from and not own_meta else None
    for task in sorted(config.tasks):
      data_config = task_data_config(config, task)
      pipeline.check_dataset(data_config.name, data_config.data_dir, data_config.download)
    # From here on SIGTERM means: save at the next step boundary and exit cleanly.
    with preemption.PreemptionWatcher() as watcher:
      mesh = make_mesh(config)
      train_streams = make_streams(config, train=True)
      eval_streams = make_streams(config, train=False)
      source_tasks = (source.tasks if source else
                      (own_meta or {}).get("run_info", {}).get("source_tasks", {}))
      model = make_model(config, train_streams, source_tasks)
      eval_steps = _eval_steps(model, eval_streams)
      example_images = jnp.zeros((1,) + _image_shape(config, eval_streams), jnp.float32)
      state, tx, schedule, trainable = create_train_state(config, model, mesh, example_images)
      state, meta = _maybe_resume(config, checkpointer, state, train_streams)
      run_info, start_results = meta.get("run_info", {}), None
      if source:
        state, run_info, start_results = _start_from_pretrained(
            config, model, state, source, mesh, eval_streams, eval_steps, trainable)
      if int(state.step) >= config.total_steps:
        logging.info("Run in %s is at step %d of config.total_steps=%d: evaluating only.",
                     workdir, int(state.step), config.total_steps)
        return read_results(workdir) or write_results(
            workdir, start_results or evaluate(state, eval_streams, eval_steps, mesh),
            int(state.step), meta.get("wall_time_s", 0.0), run_info)
      return _train(config, workdir, model, mesh, state, tx, schedule, trainable,
                    train_streams, eval_streams, eval_steps, checkpointer,
                    meta.get("wall_time_s", 0.0), watcher, run_info)
  finally:
    checkpointer.close()


def _after_pretraining(config, workdir):
  """Runs (or resumes, or finds finished) config.pretrain in <workdir>/pretrained and returns
  a copy of `config` that starts from it."""
  pretrain_dir = epath.Path(workdir) / "pretrained"
  logging.info("No config.init_from: pretraining config.pretrain in %s first.", pretrain_dir)
  config = ml_collections.ConfigDict(config.to_dict())
  config.pretrain.data.data_dir = config.data.data_dir  # the same datasets
  train_and_evaluate(config.pretrain, str(pretrain_dir))
  config.init_from = str(pretrain_dir)
  return config


def _pretrained_source(config):
  """The checkpoint config.init_from names, read and checked against config.xi_init."""
  source = pretrained.load(config.init_from)
  if set(config.tasks) - set(source.tasks):  # xi_init applies to new tasks only
    transfer.check_xi_init(config.xi_init, source.tasks)
  return source


def _start_from_pretrained(config, model, state, source, mesh, eval_streams, eval_steps,
                           trainable):
  """Loads the pretrained checkpoint into the fresh state (strictly: pretrained.merge), builds
  each new task's variables from the source tasks (config.xi_init) and evaluates the result.
  Returns the state, the run_info every checkpoint and results.json of the run carry, and that
  evaluation."""
  spec = model.spec
  sources = sorted(source.tasks)
  fresh = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
  method_params = {k: fresh["params"].pop(k) for k in optim.METHOD_GROUPS if k in fresh["params"]}
  variables, report = pretrained.merge(fresh, source.variables, spec, sources,
                                       tuple(config.transfer.dont_load))
  logging.info("From %s: loaded %d variables; new-task rows or heads in %d; kept fresh by "
               "config.transfer.dont_load: %s", source.step_dir, len(report.loaded),
               len(report.new), report.not_loaded or "none")
  run_info = {"checkpoint": str(source.step_dir), "step": source.step,
              "adaptation_target": config.adaptation.target,
              "source_tasks": source.tasks, "xi_init": config.xi_init,
              "trainable": config.trainable or "lr_multipliers",
              "trainable_parameters": optim.count_trainable(trainable, state.params),
              "new_tasks": {}}
  for task in sorted(set(config.tasks) - set(sources)):
    variables, run_info["new_tasks"][task] = _initialise_new_task(
        config, model, variables, task, source.tasks, mesh, eval_steps[task])
  variables["params"].update(method_params)  # fresh: the pretrained run had no such method
  # Separate copies: the train step donates its state, and params and EMA may not share one.
  state = state.replace(params=replicated(mesh, variables["params"]),
                        ema_params=replicated(mesh, variables["params"]),
                        batch_stats=replicated(mesh, variables["batch_stats"]))
  results = evaluate(state, eval_streams, eval_steps, mesh)
  for task, info in run_info["new_tasks"].items():
    info["accuracy_before_finetune"] = results[task]["test_accuracy"]
    logging.info("Task %s before fine-tuning: test accuracy %.4f; it adds %s parameters.",
                 task, results[task]["test_accuracy"], info["added_parameters"])
  _warn_if_shared_parameters_train(config, spec, trainable, sources)
  return state, run_info, results


def _initialise_new_task(config, model, variables, task, source_classes, mesh, eval_step):
  """A new task's xi, head and BN built from the source tasks as config.xi_init says.
  Returns the variables and what the run reports about them."""
  spec = model.spec
  sources = sorted(source_classes)
  transfer.check_heads_fit(config.xi_init, task, dict(spec.tasks)[task], source_classes)
  if config.xi_init in transfer.NEEDS_SOURCE_HEADS:
    logging.warning("xi_init=%s uses the labels of task %s's training split (for domain "
                    "adaptation: paper App. D.2's selection); with xi_init=source:<task> no "
                    "label of %s is read.", config.xi_init, task, task)
  accuracies = (_source_accuracies(config, variables, spec, task, sources, mesh, eval_step)
                if config.xi_init in ("best_source", "accuracy") else {})
  coefficients, copy_source, xi_logits, learning_losses = _coefficients(
      config, model, variables, task, sources, accuracies, mesh)
  variables = jax.device_get(transfer.build_task(
      variables, spec, task, sources, coefficients=jnp.asarray(coefficients, jnp.float32),
      copy_source=copy_source, xi_logits=xi_logits))
  logging.info("Task %s: xi_init=%s, coefficients %s.", task, config.xi_init,
               dict(zip(sources, np.round(coefficients, 4).tolist())))
  initial_xi = (templates.mixture_weights(variables["params"]["mixture_logits"])
                [spec.task_index(task)] if "mixture_logits" in variables["params"] else None)
  return variables, {
      "xi_init": config.xi_init, "coefficients": dict(zip(sources, coefficients.tolist())),
      "initial_xi": None if initial_xi is None else np.asarray(initial_xi).tolist(),
      "source_accuracy_on_train": accuracies, "coefficient_learning_loss": learning_losses[-1:],
      "added_parameters": transfer.added_parameters(spec, variables["params"], task)}


def _source_accuracies(config, variables, spec, task, sources, mesh, eval_step):
  """{source: accuracy of its own xi, BN and head on `task`'s training data}."""
  stream = task_stream(config, task, global_batch_size=config.eval_batch_size, train=False,
                       split=config.data.train_split)
  accuracies = {}
  for name in sources:
    candidate = transfer.build_task(variables, spec, task, sources, copy_source=name)
    accuracies[name] = _selection_accuracy(config, stream, candidate, mesh, eval_step)
    logging.info("Task %s: xi, BN and head of source %s give %.4f accuracy on its training "
                 "data.", task, name, accuracies[name])
  return accuracies


def _coefficients(config, model, variables, task, sources, accuracies, mesh):
  """(c over the sources, the source to copy exactly or None, a fresh xi row or None, the
  coefficient-learning losses) for config.xi_init."""
  xi_init = config.xi_init
  uniform = np.full(len(sources), 1.0 / len(sources))
  if xi_init.startswith(transfer.SOURCE_PREFIX) or xi_init == "best_source":
    copy_source = (xi_init[len(transfer.SOURCE_PREFIX):] if xi_init != "best_source"
                   else max(sources, key=lambda name: accuracies[name]))
    return (np.array(sources) == copy_source).astype(np.float64), copy_source, None, []
  if xi_init == "accuracy":
    return transfer.accuracy_coefficients(accuracies, sources), None, None, []
  if xi_init == "learned":
    coefficients, losses = transfer.learn_coefficients(
        model, replicated(mesh, variables), task, sources, _coefficient_batches(config, task, mesh),
        steps=config.transfer.learned_steps, learning_rate=config.transfer.learned_learning_rate)
    return np.asarray(coefficients, np.float64), None, None, losses
  xi_logits = None  # random or diagonal: a fresh xi row (a fixed signature has none)
  if "mixture_logits" in variables["params"]:
    fresh_row = variables["params"]["mixture_logits"][model.spec.task_index(task)]
    xi_logits = transfer.fresh_xi_logits(xi_init, model.spec, fresh_row, config.seed)
  return uniform, None, xi_logits, []


def _selection_accuracy(config, stream, candidate, mesh, eval_step):
  """Accuracy of `candidate` variables on the first config.transfer.selection_examples of
  `stream` (a task's training split, read in evaluation mode)."""
  params = replicated(mesh, candidate)
  state = steps.TrainState(step=0, params=None, batch_stats=params["batch_stats"],
                           opt_state=None, ema_params=params["params"])
  totals = eval_sums(state, stream, eval_step, mesh,
                     max_batches=-(-config.transfer.selection_examples // config.eval_batch_size))
  return totals["correct"] / max(totals["count"], 1.0)


def _coefficient_batches(config, task, mesh):
  """Training batches of `task` for learning the coefficients (its own shuffle seed)."""
  stream = task_stream(
      config, task, global_batch_size=multitask.task_batch_sizes(config, jax.device_count())[task],
      train=True, seed=config.seed + 7919)
  return (global_batch(mesh, batch) for batch in stream)


def _warn_if_shared_parameters_train(config, spec, trainable, sources):
  flat = traverse_util.flatten_dict(trainable, sep="/")
  shared = sorted(path for path, mask in flat.items()
                  if network.task_owners(spec, "params/" + path) is None and np.any(mask))
  kept = sorted(set(sources) - set(config.tasks))
  if shared and kept:
    logging.warning("config.trainable=%r trains parameters all tasks share (%s, ...): the "
                    "predictions of the checkpoint's tasks %s will change. Use 'head', "
                    "'head_bn' or 'xi_head_bn' to keep them.", config.trainable, shared[0], kept)


def _image_shape(config, eval_streams):
  stream = next(iter(eval_streams.values()))
  shape = next(iter(stream))["image"].shape[1:]
  iter(stream)  # restart the pass consumed for the shape
  return tuple(shape)


def _eval_steps(model, eval_streams):
  return {task: steps.jit_eval_step(model, task) for task in eval_streams}


def _refuse_other_config(config, workdir, checkpointer):
  """The run's newest checkpoint meta (None without one); refuses a conflicting config."""
  meta = checkpointer.newest_meta()
  conflicts = checkpoint.config_conflicts(meta["config"], config) if meta else []
  if conflicts:
    raise ValueError(
        f"The checkpoint in {workdir} was made with another config; refusing to resume:\n  "
        + "\n  ".join(conflicts) + "\nUse a new --workdir, or the checkpoint's config "
        f"(saved in {epath.Path(workdir) / 'config.json'}).")
  return meta


def _maybe_resume(config, checkpointer, state, train_streams):
  """The newest good checkpoint's state and meta (corrupt newer ones are handled as
  config.on_corrupt_checkpoint says), or the fresh state and {}."""
  restored, meta = checkpointer.restore_newest_good(
      checkpoint.abstract_state(state), train_streams, config.on_corrupt_checkpoint)
  if restored is None:
    return state, {}
  logging.info("Resumed from %s at step %d.", checkpointer.workdir, meta["step"])
  return restored, meta


def _train(config, workdir, model, mesh, state, tx, schedule, trainable, train_streams,
           eval_streams, eval_steps, checkpointer, wall_time_before, watcher, run_info):
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  first_step = int(state.step)
  if first_step == 0:
    parameter_overview.log_parameter_overview(state.params)
    logging.info("Parameters per group:\n%s", accounting.format_model_summary(
        model.spec, state.params))
  train_step = steps.jit_train_step(
      jax.tree.map(lambda a: a.sharding, state), model=model, tx=tx,
      loss_fn=method_loss(config, model.spec), trainable=trainable, config=config)
  progress = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer)
  started = time.time()
  pending_metrics = []
  results = read_results(workdir)
  train_iterators = {task: iter(stream) for task, stream in train_streams.items()}
  nonfinite_guard = nonfinite.NonFiniteGuard(config.max_nonfinite_skips)
  for step in range(first_step + 1, config.total_steps + 1):
    local_batch = {task: next(it) for task, it in train_iterators.items()}
    state, metrics = train_step(state, global_batch(mesh, local_batch))
    nonfinite_guard.observe(step, metrics)
    pending_metrics.append(metrics)
    progress(step)
    last = step == config.total_steps
    if step % config.log_every == 0 or last:
      _write_train_metrics(writer, step, pending_metrics, schedule, model, state)
      pending_metrics = []
    if step % config.eval_every == 0 or last:
      nonfinite_guard.flush()  # past the allowed skips, stop before reporting
      wall_time = wall_time_before + time.time() - started
      results = _evaluate_and_report(workdir, writer, step, state, model, eval_streams,
                                     eval_steps, mesh, wall_time, run_info)
    stopping = stop_requested(watcher, step)
    if step % config.checkpoint_every == 0 or last or stopping:
      nonfinite_guard.flush()  # past the allowed skips, stop before saving
      meta = {"config": config.to_dict(), "step": step, "run_info": run_info,
              "wall_time_s": wall_time_before + time.time() - started}
      checkpointer.save(step, state, meta, train_streams)
    if stopping:
      logging.warning("Stopped at step %d after saving; rerun the same command to resume.",
                      step)
      break
  writer.flush()
  return results


def _write_train_metrics(writer, step, pending_metrics, schedule, model, state):
  averaged = {k: float(np.mean([float(m[k]) for m in pending_metrics]))
              for k in pending_metrics[0]}
  averaged["learning_rate"] = float(schedule(step - 1))
  averaged.update(mixture_scalars(model, jax.device_get(state.params)))
  writer.write_scalars(step, averaged)


def _evaluate_and_report(workdir, writer, step, state, model, eval_streams, eval_steps, mesh,
                         wall_time, run_info):
  """Evaluates every task and writes what the user looks at: scalars, results.json, the
  accuracy table, mixture-weight heatmaps and (with several tasks) the task similarity."""
  started = time.time()
  results = evaluate(state, eval_streams, eval_steps, mesh)
  eval_seconds = time.time() - started
  scalars = {f"{task}/{key}": value for task, r in results.items() for key, value in r.items()}
  scalars["eval_seconds"] = eval_seconds
  writer.write_scalars(step, scalars)
  xi_by_task = mixture_weights_by_task(model, jax.device_get(state.ema_params))
  pictures = {"mixture_weights": figures.mixture_heatmaps(xi_by_task, step)}
  new_tasks = {task: info["initial_xi"] for task, info in
               (run_info or {}).get("new_tasks", {}).items() if info.get("initial_xi")}
  if new_tasks:  # a new task's (a target domain's) xi at the start and now
    pictures["new_task_xi"] = figures.mixture_heatmaps(
        {name: xi for task, start in sorted(new_tasks.items()) for name, xi in
         ((f"{task} (start)", np.asarray(start)), (f"{task} (step {step})", xi_by_task[task]))},
        step)
  if len(xi_by_task) > 1:
    pictures["task_similarity"] = figures.task_similarity_grid(
        *similarity.task_similarity(xi_by_task), step)
  writer.write_images(step, {name: rgb[None] for name, rgb in pictures.items()})
  if jax.process_index() == 0:
    for name, rgb in pictures.items():
      (epath.Path(workdir) / f"{name}.png").write_bytes(figures.png_bytes(rgb))
  payload = write_results(workdir, results, step, wall_time, run_info)
  if jax.process_index() == 0:
    (epath.Path(workdir) / "accuracy_table.md").write_text(
        accuracy_table(payload["tasks"], step))
  logging.info("step %d (evaluated in %.1f s): %s", step, eval_seconds, ", ".join(
      f"{task} test accuracy {r['test_accuracy']:.4f}" for task, r in results.items()))
  return payload


def accuracy_table(results, step):
  """Per-task test accuracy as a Markdown table (results.json holds the same as JSON); tasks
  new to a pretrained model also show their accuracy before fine-tuning."""
  lines = [f"Test accuracy at step {step}", "",
           "| task | accuracy | before fine-tuning | loss | examples |", "|---|---:|---:|---:|---:|"]
  for task, r in sorted(results.items()):
    before = r.get("accuracy_before_finetune")
    before = "" if before is None else f"{100 * before:.2f}"
    lines.append(f"| {task} | {100 * r['test_accuracy']:.2f} | {before} | {r['test_loss']:.4f} | "
                 f"{r['test_examples']} |")
  if len(results) > 1:
    mean = np.mean([r["test_accuracy"] for r in results.values()])
    lines.append(f"| mean | {100 * mean:.2f} | | | |")
  return "\n".join(lines) + "\n"
