"""Module surgery on a finished workdir (the commands: `python -m compmod_jax.surgery`, whose
docstring says what harden and prune do): load a trained run read-only, edit its bank
(models/bank.py), evaluate both models on the run's own data, and write the edited model as a
new workdir whose checkpoint loads with config.init_from like any run's. Also the evaluation of
a run with other mixture weights that analysis/perturb.py uses."""
import dataclasses
import time

import jax
import ml_collections
import numpy as np
from etils import epath

from compmod_jax.analysis import accounting
from compmod_jax.finetune import pretrained, transfer
from compmod_jax.methods import registry
from compmod_jax.models import bank, templates
from compmod_jax.train import checkpoint, context, loop, start, steps
from compmod_jax.workdir import RunStart, Workdir, prepare


class SurgeryError(ValueError):
  """A workdir or output folder the command cannot use."""


@dataclasses.dataclass(frozen=True)
class TrainedRun:
  """A finished workdir: its config (with the model's tasks), run information, evaluated
  variables (EMA parameters, BN statistics; host arrays) and step."""
  workdir: str
  config: ml_collections.ConfigDict
  source_tasks: dict   # {task: classes} of the model's tasks beyond config.tasks
  variables: dict
  step: int


def load_run(workdir, data_dir=None):
  """The newest intact checkpoint of `workdir` (read-only), with the model's own variables
  only (a method's training-time variables, e.g. a discriminator, are left out)."""
  if not Workdir(workdir).checkpoints.is_dir():
    raise SurgeryError(f"{workdir} holds no checkpoints/ directory: pass the --workdir of a "
                       f"training run.")
  loaded = pretrained.load(workdir)
  config = ml_collections.ConfigDict(loaded.config)
  if data_dir:
    config.data.data_dir = data_dir
  variables = {"params": dict(loaded.variables["params"]),
               "batch_stats": loaded.variables["batch_stats"]}
  own = registry.get(config.method).own_params
  if own:
    variables["params"].pop(own, None)
  source_tasks = {task: classes for task, classes in loaded.tasks.items()
                  if task not in config.tasks}
  return TrainedRun(workdir=str(workdir), config=config, source_tasks=source_tasks,
                    variables=variables, step=loaded.step)


def prepare_out(out):
  """`out` as a new or empty directory; refuses one that holds anything."""
  if not out:
    raise SurgeryError("--out is required: a new directory for the result.")
  path = epath.Path(out)
  if path.exists() and any(path.iterdir()):
    raise SurgeryError(f"--out={out} is not empty; surgery never overwrites. Pass a new "
                       f"directory.")
  return prepare(out)


def standalone_config(config, **model_fields):
  """A copy of `config` with `model_fields` changed, for a model whose checkpoint holds every
  variable: nothing is loaded or pretrained before it."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.update(model_fields)
  config.init_from = ""
  if "pretrain" in config:
    del config["pretrain"]
  return config


def fixed_signature_config(config, signatures):
  """`config` for the model with one fixed signature per task (0-based [tasks, L])."""
  return standalone_config(
      config, signature="explicit", num_templates=int(np.max(signatures)) + 1,
      shared_mixture_layers=0,
      explicit_signature=";".join(",".join(str(t + 1) for t in row) for row in signatures))


def test_accuracies(ctx, variables):
  """{task: test accuracy} of ctx's tasks with host `variables`."""
  return {task: ctx.accuracy(variables, stream, task)
          for task, stream in sorted(ctx.eval_streams.items())}


def inference_seconds(ctx, variables, repeats):
  """Median seconds of one jitted forward pass of an eval batch of the first task."""
  task, stream = sorted(ctx.eval_streams.items())[0]
  images = ctx.global_batch(next(iter(stream)))["image"]
  iter(stream)  # restart the pass
  forward = jax.jit(lambda v, x: ctx.model.apply(v, x, task=task))
  placed = ctx.replicated(variables)
  forward(placed, images).block_until_ready()
  times = []
  for _ in range(repeats):
    started = time.perf_counter()
    forward(placed, images).block_until_ready()
    times.append(time.perf_counter() - started)
  return float(np.median(times))


class SignatureEvaluator:
  """Test accuracy of a run's task with its mixture logits [L, K] replaced, everything else as
  trained (analysis/perturb.py). Layers shared among tasks become each task's own here, so one
  task's perturbation leaves the others alone."""

  def __init__(self, run, max_examples=0):
    """`run`: a learned-signature run (load_learned_run)."""
    config = ml_collections.ConfigDict(run.config.to_dict())
    config.model.shared_mixture_layers = 0
    self.ctx = run_context(config, run.workdir, run.source_tasks)
    params = {name: value for name, value in run.variables["params"].items()
              if name != "shared_mixture_logits"}
    params["mixture_logits"] = np.asarray(
        templates.task_mixture_logits(run.variables["params"]))
    self.variables = {"params": params, "batch_stats": run.variables["batch_stats"]}
    self.max_batches = (-(-max_examples // config.eval_batch_size) if max_examples else None)

  def mixture_logits(self, task):
    """The task's trained mixture logits [L, K] (numpy)."""
    return self.variables["params"]["mixture_logits"][self.ctx.model.spec.task_index(task)]

  def __call__(self, task, logits):
    all_logits = self.variables["params"]["mixture_logits"].copy()
    all_logits[self.ctx.model.spec.task_index(task)] = logits
    variables = dict(self.variables, params=dict(self.variables["params"],
                                                 mixture_logits=all_logits))
    return self.ctx.accuracy(variables, self.ctx.eval_streams[task], task, self.max_batches)


def run_context(config, workdir, source_tasks):
  context.check_and_prepare_datasets(config)
  return start.make_context(config, workdir, source_tasks)


def model_context(ctx, config):
  """ctx for the model of `config` (another signature or bank of the same tasks), sharing
  ctx's data streams and mesh: the data are the same, only the model and its steps change."""
  model = start.model_for(config, dict(ctx.model.spec.tasks))
  return dataclasses.replace(ctx, config=config, model=model, eval_steps={
      task: steps.jit_eval_step(model, task) for task in ctx.eval_streams})


def load_learned_run(workdir, data_dir, operation):
  """load_run for an operation on mixture weights; refuses a fixed-signature run."""
  run = load_run(workdir, data_dir)
  if run.config.model.signature != templates.LEARNED:
    raise SurgeryError(f"{workdir} trained a fixed signature "
                       f"(config.model.signature={run.config.model.signature!r}); only a "
                       f"model with mixture weights can be {operation}.")
  if run.config.model.get("task_free"):
    raise SurgeryError(f"{workdir} trained one network for all tasks "
                       f"(config.model.task_free=True); surgery rewrites the mixture weights "
                       f"and heads of each task, which this model does not have apart.")
  if run.config.model.get("routing", "task") != "task":
    raise SurgeryError(f"{workdir} routes by content (config.model.routing="
                       f"{run.config.model.routing!r}): each image gets its own xi, so there "
                       f"are no per-task mixture weights to be {operation}.")
  return run


def harden(workdir, out, *, reestimate=False, bn_batches=50, data_dir=None, timing_repeats=20):
  """Hardens the run in `workdir` into the new workdir `out` (see the module docstring) and
  returns what it writes to out/results.json."""
  run = load_learned_run(workdir, data_dir, "hardened")
  out = prepare_out(out)
  mixed_ctx = run_context(run.config, out, run.source_tasks)
  xi = templates.mixture_weights(templates.task_mixture_logits(run.variables["params"]))
  signatures = bank.hardened_signatures(xi)
  variables, compact_signatures = bank.compact_variables(run.variables, signatures)
  config = fixed_signature_config(run.config, compact_signatures)
  ctx = model_context(mixed_ctx, config)
  if reestimate:
    variables = transfer.precise_bn_statistics(ctx, variables, sorted(ctx.train_streams),
                                                 bn_batches)
  mixed, hardened = (test_accuracies(mixed_ctx, run.variables), test_accuracies(ctx, variables))
  names = [name for name, _ in ctx.model.spec.tasks]
  results = {
      "surgery": {"operation": "harden", "workdir": str(epath.Path(workdir).absolute()),
                  "step": run.step},
      "bn_statistics": f"re-estimated on {bn_batches} training batches" if reestimate else
                       "as trained (mixed model)",
      "signatures": {name: [int(t) + 1 for t in row] for name, row in zip(names, signatures)},
      "kept_templates": [int(t) + 1 for t in np.unique(signatures)],
      "max_xi": {name: np.asarray(xi[i]).max(-1).round(4).tolist()
                 for i, name in enumerate(names)},
      "tasks": {task: {"mixed_test_accuracy": mixed[task], "test_accuracy": hardened[task]}
                for task in hardened},
      "parameters": {"mixed": accounting.count(run.variables["params"]),
                     "hardened": accounting.count(variables["params"])},
      "inference_step_seconds": {
          "mixed": inference_seconds(mixed_ctx, run.variables, timing_repeats),
          "hardened": inference_seconds(ctx, variables, timing_repeats)},
      "step": run.step,
  }
  _write_workdir(ctx, variables, run.step, results)
  return results


def prune(workdir, out, *, keep, reestimate=False, bn_batches=50, data_dir=None,
          refit_steps=0):
  """Prunes the run in `workdir` to its `keep` most used templates into the new workdir `out`
  (see the module docstring) and returns what it writes to out/results.json."""
  run = load_learned_run(workdir, data_dir, "pruned")
  num_templates = run.config.model.num_templates
  if not 1 <= keep < num_templates:
    raise SurgeryError(f"--keep={keep}: the model has {num_templates} templates; keep between "
                       f"1 and {num_templates - 1}.")
  if refit_steps and (run.config.method != "supervised" or run.source_tasks):
    raise SurgeryError(f"--refit_steps re-fits with each task's labels, so it takes a "
                       f"supervised run that trained all the model's tasks; {workdir} ran "
                       f"method {run.config.method!r} on {sorted(run.config.tasks)}, and the "
                       f"model also holds {sorted(run.source_tasks)}.")
  out = prepare_out(out)
  full_ctx = run_context(run.config, out, run.source_tasks)
  variables, kept, usage = bank.pruned_variables(run.variables, keep)
  ctx = model_context(full_ctx, standalone_config(run.config, num_templates=keep))
  if reestimate:
    variables = transfer.precise_bn_statistics(ctx, variables, sorted(ctx.train_streams),
                                                 bn_batches)
  before, after = test_accuracies(full_ctx, run.variables), test_accuracies(ctx, variables)
  results = {
      "surgery": {"operation": "prune", "workdir": str(epath.Path(workdir).absolute()),
                  "step": run.step},
      "bn_statistics": f"re-estimated on {bn_batches} training batches" if reestimate else
                       "as trained",
      "template_usage": usage.round(4).tolist(),
      "kept_templates": [int(t) + 1 for t in kept],
      "tasks": {task: {"unpruned_test_accuracy": before[task], "test_accuracy": after[task]}
                for task in after},
      "parameters": {"unpruned": accounting.count(run.variables["params"]),
                     "pruned": accounting.count(variables["params"])},
      "step": run.step,
  }
  _write_workdir(ctx, variables, run.step, results)
  if refit_steps:
    refit_dir = str(Workdir(out).refit)
    refit = loop.train_and_evaluate(refit_config(ctx.config, out, refit_steps), refit_dir)
    results["refit"] = {"steps": refit_steps, "trainable": "xi_bn",
                        "workdir": refit_dir,
                        "tasks": {task: {"test_accuracy": values["test_accuracy"]}
                                  for task, values in refit["tasks"].items()}}
    Workdir(out).write_results(results)
  return results


def refit_config(config, pruned_dir, steps):
  """The run that re-fits a pruned model's mixture weights and BN: the pruned run's own recipe
  for `steps` steps (a tenth of them warm-up), starting from `pruned_dir`."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.init_from = str(pruned_dir)
  config.trainable = "xi_bn"
  config.total_steps = config.eval_every = config.checkpoint_every = steps
  config.log_every = min(config.log_every, steps)
  config.optimizer.warmup_steps = steps // 10
  return config


def _write_workdir(ctx, variables, step, results):
  """ctx.workdir as a finished run of ctx's model: config.json, a checkpoint at `step` whose
  parameters and EMA are `variables` (with a fresh optimizer state), results.json. The run
  information names the model's tasks beyond config.tasks, as a transfer run's does, so that
  the trainer rebuilds the same model from this workdir."""
  source_tasks = {task: classes for task, classes in ctx.model.spec.tasks
                  if task not in ctx.config.tasks}
  state, _ = start.create_train_state(ctx, start.example_images(ctx.config))
  state = state.replace(step=ctx.replicated(np.int32(step)),
                        params=ctx.replicated(variables["params"]),
                        ema_params=ctx.replicated(variables["params"]),
                        batch_stats=ctx.replicated(variables["batch_stats"]))
  Workdir(ctx.workdir).write_config(ctx.config)
  checkpointer = checkpoint.Checkpointer(ctx.workdir, ctx.config.keep_checkpoints)
  try:
    checkpointer.save(step, state, {"config": ctx.config.to_dict(), "step": step,
                                    "run_info": RunStart(
                                        surgery=results["surgery"],
                                        source_tasks=source_tasks).to_dict(),
                                    "wall_time_s": 0.0}, ctx.train_streams)
  finally:
    checkpointer.close()
  Workdir(ctx.workdir).write_results(results)
