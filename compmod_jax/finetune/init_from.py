"""Starting a run from another run's checkpoint (config.init_from): the checkpoint with
config.deltas applied (deltas.py), grown by added templates (growth.py), loaded strictly into
the fresh state (pretrained.py), each new task's variables built from the source tasks
(transfer.py), evaluated before training; and the check that config.trainable keeps the
checkpoint's other tasks as they were."""
import jax
import numpy as np
from absl import logging
from flax import traverse_util

from compmod_jax.finetune import deltas, growth, pretrained, transfer
from compmod_jax.models import network_spec
from compmod_jax.train import optim
from compmod_jax.workdir import RunStart


def pretrained_source(config):
  """The checkpoint config.init_from names with config.deltas applied (deltas.py), read
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
  each new task's variables from the source tasks (transfer.py) and evaluates the
  result. Sets ctx.run_start (what every checkpoint and results.json of the run carry) and
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
  ctx.run_start = RunStart(
      checkpoint=str(source.step_dir), step=source.step, source_tasks=source.tasks,
      xi_init=config.xi_init, trainable=config.trainable or "lr_multipliers",
      trainable_parameters=optim.count_trainable(trainable, state.params),
      added_templates=added_templates)
  new_tasks = sorted(set(config.tasks) - set(sources))
  for task in new_tasks:
    variables, ctx.run_start.new_tasks[task] = transfer.initialise_new_task(
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
  for task, info in ctx.run_start.new_tasks.items():
    info["accuracy_before_finetune"] = results[task]["test_accuracy"]
    logging.info("Task %s before fine-tuning: test accuracy %.4f; it adds %s parameters.",
                 task, results[task]["test_accuracy"], info["added_parameters"])
  return state, results


def _check_kept_tasks(ctx, trainable, params, kept):
  """A preset promises to keep the checkpoint's other tasks as they were: refused, before
  anything is evaluated or trained, when it would train what they share; '' (lr_multipliers
  alone) and 'all' only warn, since changing everything is what they ask for."""
  problem = kept_tasks_problem(trainable, params, ctx.config, ctx.model.spec, ctx.method,
                                     kept)
  if problem and ctx.config.trainable in ("", "all"):
    logging.warning("%s", problem)
  elif problem:
    raise ValueError(problem)


def kept_tasks_problem(mask, params, config, spec, method, kept):
  """Why config.trainable (whose trainable_mask is `mask`) would change the predictions of
  `kept` (the checkpoint's tasks the run does not train), naming the presets that would not;
  None when it keeps them. Whether a
  parameter is shared depends on the set-up: with model.batch_norm 'mixed' the BN scale and
  bias are mixed from the templates and 'per_layer' shares them, so a preset with
  'batch_norm' keeps the other tasks only with 'per_task' BN."""
  shared = shared_arrays_trained(mask, spec, method.own_params)
  if not (kept and shared):
    return None
  safe = []
  for preset in optim.TRAINABLE_PRESETS:
    candidate = config.copy_and_resolve_references()
    candidate.trainable = preset
    preset_mask = optim.trainable_mask(params, candidate, spec, method)
    if optim.count_trainable(preset_mask, params) and not shared_arrays_trained(
        preset_mask, spec, method.own_params):
      safe.append(preset)
  return (f"config.trainable={config.trainable or 'lr_multipliers'!r} trains "
          f"{', '.join(shared[:3])}{', ...' if len(shared) > 3 else ''}, which every task of "
          f"this model shares (config.model.batch_norm={spec.batch_norm!r}, "
          f"input_adapter={spec.input_adapter!r}): the predictions of the checkpoint's tasks "
          f"{sorted(kept)} would change. Presets that keep them: {safe}.")


def shared_arrays_trained(mask, spec, own_params=None):
  """Paths of the whole arrays every task shares that `mask` lets train (a method's own
  variables aside). A partly trainable shared array is a bank grown by templates the old
  tasks weigh by exactly 0 (finetune/growth.py): it changes no old task."""
  return sorted(path for path, leaf_mask in traverse_util.flatten_dict(mask, sep="/").items()
                if network_spec.task_owners(spec, "params/" + path) is None and np.all(leaf_mask)
                and not path.startswith(f"{own_params}/"))
