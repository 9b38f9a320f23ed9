"""What a run shows its user: results.json, accuracy_table.md, mixture-weight pictures and the
TensorBoard scalars. results.json is the interface later tools read (analysis/tables.py)."""
import time

import jax
import numpy as np
from absl import logging

from compmod_jax.analysis import figures, routing, similarity
from compmod_jax.models import templates
from compmod_jax.train import regularizers
from compmod_jax.workdir import Workdir


# What ctx.evaluate adds per task for a model that routes each image: the mean route [L, K]
# and mean route entropy [L] over its test images (routing_health reads them).
ROUTE_SUMS = ("mean_route", "mean_route_entropy")


def mixture_weights_by_task(model, params):
  """{task: xi [L, K]} for a learned signature, or the one-hot fixed signature."""
  spec = model.spec
  if "mixture_logits" in params:
    xi = np.asarray(templates.mixture_weights(templates.task_mixture_logits(params)))
  else:
    xi = np.eye(spec.bank_size)[np.asarray(spec.fixed_signatures)]
  return {task: xi[spec.task_index(task)] for task, _ in spec.tasks}


def mixture_scalars(model, params):
  """Per-layer entropy and max of xi for each task (learned signatures only)."""
  if "mixture_logits" not in params:
    return {}
  entropy = np.asarray(regularizers.mixture_entropy(templates.task_mixture_logits(params)))
  scalars = {}
  for task, xi in mixture_weights_by_task(model, params).items():
    index = model.spec.task_index(task)
    for layer in range(xi.shape[0]):
      scalars[f"xi_entropy/{task}/layer_{layer + 1:02d}"] = entropy[index, layer]
      scalars[f"xi_max/{task}/layer_{layer + 1:02d}"] = xi[layer].max()
    scalars[f"xi_entropy/{task}/mean"] = entropy[index].mean()
  return scalars


def write_train_metrics(ctx, writer, step, pending_metrics, learning_rate, state):
  """The training metrics averaged since the last write, the learning rate and xi scalars."""
  averaged = {k: float(np.mean([float(m[k]) for m in pending_metrics]))
              for k in pending_metrics[0]}
  averaged["learning_rate"] = float(learning_rate)
  averaged.update(mixture_scalars(ctx.model, jax.device_get(state.params)))
  writer.write_scalars(step, averaged)


def routing_params(params):
  """A host copy of what the mixture weights and the routing health read of `params`: the
  mixture logits and the templates (not the adapters, heads or BN rows)."""
  return jax.device_get({name: params[name] for name in templates.MIXTURE_PARAMS
                         + ("templates",) if name in params})


def routing_health(model, params, results):
  """analysis/routing.py's health of `params`' routes and templates; None for the plain
  signature, whose bank holds each layer's own block (no template is shared). A model that
  routes each image (routing 'example' or 'task_posterior') is read from the routes of its
  test images, which `results` (ctx.evaluate's) holds per task."""
  if model.spec.signature == "plain":
    return None
  if model.spec.routing != "task":
    return routing.health(
        {task: np.asarray(r["mean_route"]) for task, r in results.items()}, params["templates"],
        mean_entropy={task: np.asarray(r["mean_route_entropy"]) for task, r in results.items()})
  return routing.health(mixture_weights_by_task(model, params), params["templates"])


def write_results(ctx, state, results, wall_time_s):
  """results.json, rewritten at each evaluation of `state` (its EMA variables are what
  `results` evaluated). It holds the routing health of those variables (analysis/routing.py;
  its warnings go to the log too). A run started from a pretrained checkpoint adds, per new
  task, `accuracy_before_finetune` and `added_parameters`, and the details of its
  initialisation under "init_from"; the method adds its own fields (Method.results)."""
  run_start = ctx.run_start
  health = routing_health(ctx.model, routing_params(state.ema_params), results)
  results = {task: dict({k: v for k, v in r.items() if k not in ROUTE_SUMS},
                        **_new_task_summary(run_start, task)) for task, r in results.items()}
  payload = {"tasks": results, "step": int(state.step), "wall_time_s": float(wall_time_s)}
  if health:
    payload["routing"] = health
    for warning in health["warnings"]:
      logging.warning("Routing at step %d: %s.", int(state.step), warning)
  payload.update(ctx.method.results(ctx.config, results))
  if run_start:
    payload["init_from"] = run_start.to_dict()
  if jax.process_index() == 0:  # one writer: processes share the workdir
    Workdir(ctx.workdir).write_results(payload)
  return payload


def _new_task_summary(run_start, task):
  info = run_start.new_tasks.get(task)
  if not info:
    return {}
  return {"accuracy_before_finetune": info["accuracy_before_finetune"],
          "added_parameters": sum(info["added_parameters"].values())}


def evaluate_and_report(ctx, writer, step, state, wall_time):
  """Evaluates every task and writes what the user looks at: scalars, results.json, the
  accuracy table, mixture-weight heatmaps and (with several tasks) the task similarity."""
  started = time.time()
  results = ctx.evaluate(state)
  eval_seconds = time.time() - started
  scalars = {f"{task}/{key}": value for task, r in results.items() for key, value in r.items()
             if key not in ROUTE_SUMS}
  scalars["eval_seconds"] = eval_seconds
  payload = write_results(ctx, state, results, wall_time)
  pictures = _pictures(ctx, step, _routes_by_task(ctx.model, payload))
  writer.write_images(step, {name: rgb[None] for name, rgb in pictures.items()})
  if "routing" in payload:
    scalars.update(routing.scalars(payload["routing"]))
  writer.write_scalars(step, scalars)
  if jax.process_index() == 0:
    workdir = Workdir(ctx.workdir)
    for name, rgb in pictures.items():
      workdir.picture(name).write_bytes(figures.png_bytes(rgb))
    workdir.accuracy_table.write_text(accuracy_table(payload["tasks"], step))
  logging.info("step %d (evaluated in %.1f s): %s", step, eval_seconds, ", ".join(
      f"{task} test accuracy {r['test_accuracy']:.4f}" for task, r in results.items()))
  return payload


def _routes_by_task(model, payload):
  """{task: [L, K]} the pictures show: each task's route as the routing health read it (its xi,
  or with routing='example' its test images' mean route); a plain network's one-hot rows."""
  if "routing" in payload:
    routes = payload["routing"]["usage_by_task"]
    return {task: np.asarray(route) for task, route in routes.items()}
  return mixture_weights_by_task(model, {})  # plain: no shared templates, no health


def _pictures(ctx, step, xi_by_task):
  """{name: RGB array}: xi heatmaps, each new task's xi at the start and now, and with several
  tasks their similarity per layer."""
  pictures = {"mixture_weights": figures.mixture_heatmaps(xi_by_task, step)}
  new_tasks = {task: info["initial_xi"] for task, info in ctx.run_start.new_tasks.items()
               if info.get("initial_xi")}
  if new_tasks:  # a new task's (a target domain's) xi at the start and now
    pictures["new_task_xi"] = figures.mixture_heatmaps(
        {name: xi for task, start in sorted(new_tasks.items()) for name, xi in
         ((f"{task} (start)", np.asarray(start)), (f"{task} (step {step})", xi_by_task[task]))},
        step)
  if len(xi_by_task) > 1:
    pictures["task_similarity"] = figures.task_similarity_grid(
        *similarity.task_similarity(xi_by_task), step)
  return pictures


def accuracy_table(results, step):
  """Per-task test accuracy as a Markdown table (results.json holds the same as JSON); tasks
  new to a pretrained model also show their accuracy before fine-tuning."""
  lines = [f"Test accuracy at step {step}", "",
           "| task | accuracy | before fine-tuning | loss | examples |",
           "|---|---:|---:|---:|---:|"]
  for task, r in sorted(results.items()):
    before = r.get("accuracy_before_finetune")
    before = "" if before is None else f"{100 * before:.2f}"
    lines.append(f"| {task} | {100 * r['test_accuracy']:.2f} | {before} | {r['test_loss']:.4f} | "
                 f"{r['test_examples']} |")
  if len(results) > 1:
    mean = np.mean([r["test_accuracy"] for r in results.values()])
    lines.append(f"| mean | {100 * mean:.2f} | | | |")
  return "\n".join(lines) + "\n"
