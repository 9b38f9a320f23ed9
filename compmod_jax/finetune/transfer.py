"""A new task's private variables, initialised from the source tasks of a pretrained model
(paper §4.3 and App. C, Eq. 1).

A task's private variables are its row of the mixture logits (its xi), its head, its rows of
per-task BN scale/bias and its BN moving statistics. For coefficients c over the source tasks
(c_v >= 0, sum 1) the new task gets

    xi* = sum_v c_v xi_v            (Eq. 1, on the softmax-normalised weights; logits log xi*)
    head, BN rows and statistics = sum_v c_v (the same of v)

`config.xi_init` picks c:
  source:<task>  c one-hot on that source task; its rows are copied exactly
  best_source    the source whose own network (xi, BN, head) is most accurate on the new task's
                 training data, copied exactly
  min_entropy_source  the source whose own network predicts the new task's training images
                 with the lowest mean entropy (the most confident), copied exactly; reads no
                 label, so domain adaptation can use it
  accuracy       c_v proportional to that accuracy of each source
  learned        c = softmax(gamma), gamma trained on the new task's training data with every
                 other variable fixed (`learn_coefficients`)
  random         the model's fresh xi row (config.model.mixture_init); head, BN uniform over
                 the sources
  diagonal       xi near one-hot on template l in layer l; head, BN uniform over the sources
Heads are combined only when every source head has the new task's number of classes (the
paper's case: one label set); otherwise the new head keeps its fresh initialisation, and the
strategies that evaluate source heads (best_source, min_entropy_source, accuracy, learned) are
refused.

Each strategy is a small function of a `NewTask` (the run context, the variables, the new task
and the sources) returning a `NewTaskStart` (c, or the source to copy, or a fresh xi row, and
what it measured); STRATEGIES maps config.xi_init to it. `initialise_new_task` runs one and
builds the task. The run context (compmod_jax/train/context.py RunContext) gives the data and
evaluation; this module never imports the trainer.
"""
import dataclasses
import functools
import math
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import traverse_util

from compmod_jax.finetune import growth
from compmod_jax.models import network_spec, templates

SOURCE_PREFIX = "source:"
DEFAULT_XI_INIT = "best_source"
READS_NEW_TASK_LABELS = ("best_source", "accuracy", "learned")
NEEDS_SOURCE_HEADS = READS_NEW_TASK_LABELS + ("min_entropy_source",)


@dataclasses.dataclass(frozen=True)
class NewTask:
  """What a strategy is given: the run (a RunContext), the model's variables {"params",
  "batch_stats"} as host arrays with the checkpoint loaded, the new task, the source tasks
  (sorted, as the model orders them)."""
  ctx: Any
  variables: dict
  task: str
  sources: tuple


@dataclasses.dataclass(frozen=True)
class NewTaskStart:
  """What a strategy chose: coefficients c over the sources (Eq. 1) or the one source to copy
  exactly, a fresh xi row when it replaces Eq. 1's, and what it measured on the way."""
  coefficients: np.ndarray
  copy_source: Optional[str] = None
  xi_logits: Optional[Any] = None
  source_accuracies: dict = dataclasses.field(default_factory=dict)
  source_entropies: dict = dataclasses.field(default_factory=dict)
  learning_losses: tuple = ()


def _copy(new, source):
  return NewTaskStart(coefficients=(np.array(new.sources) == source).astype(np.float64),
                      copy_source=source)


def _best_source(new):
  accuracies = source_accuracies(new)
  best = max(new.sources, key=lambda name: accuracies[name])
  return dataclasses.replace(_copy(new, best), source_accuracies=accuracies)


def _min_entropy_source(new):
  """The source whose variables are most confident on the new task's images: the lowest mean
  entropy of the predicted class distribution. Reads no label of the new task, so it is a
  fully unsupervised choice for domain adaptation."""
  entropies = source_entropies(new)
  chosen = min(new.sources, key=lambda name: entropies[name])
  return dataclasses.replace(_copy(new, chosen), source_entropies=entropies)


def _accuracy_weighted(new):
  accuracies = source_accuracies(new)
  return NewTaskStart(coefficients=accuracy_coefficients(accuracies, new.sources),
                      source_accuracies=accuracies)


def _learned(new):
  ctx, config = new.ctx, new.ctx.config
  stream = ctx.task_stream(new.task, global_batch_size=ctx.train_batch_size(new.task),
                           train=True, seed=config.seed + 7919)  # its own shuffle
  batches = (ctx.global_batch(batch) for batch in stream)
  coefficients, losses = learn_coefficients(
      ctx.model, ctx.replicated(new.variables), new.task, new.sources, batches,
      steps=config.transfer.learned_steps, learning_rate=config.transfer.learned_learning_rate)
  return NewTaskStart(coefficients=np.asarray(coefficients, np.float64),
                      learning_losses=tuple(losses))


def _fresh_xi(new, init):
  """A fresh xi row (a fixed signature has none); head and BN uniform over the sources."""
  uniform = np.full(len(new.sources), 1.0 / len(new.sources))
  params, spec = new.variables["params"], new.ctx.model.spec
  if "mixture_logits" not in params:
    return NewTaskStart(coefficients=uniform)
  fresh_row = params["mixture_logits"][spec.task_index(new.task)]
  return NewTaskStart(coefficients=uniform, xi_logits=fresh_xi_logits(
      init, spec, fresh_row, new.ctx.config.seed))


STRATEGIES = {
    "best_source": _best_source,
    "min_entropy_source": _min_entropy_source,
    "accuracy": _accuracy_weighted,
    "learned": _learned,
    "random": functools.partial(_fresh_xi, init="random"),
    "diagonal": functools.partial(_fresh_xi, init="diagonal"),
}
XI_INITS = tuple(STRATEGIES)


def strategy(xi_init):
  """The function of config.xi_init."""
  if xi_init.startswith(SOURCE_PREFIX):
    return functools.partial(_copy, source=xi_init[len(SOURCE_PREFIX):])
  return STRATEGIES[xi_init]


def source_accuracies(new):
  """{source: accuracy of its own xi, BN and head on the new task's training data} (the first
  config.transfer.selection_examples, read in evaluation mode)."""
  return _measure_sources(new, "accuracy", "accuracy")


def source_entropies(new):
  """{source: mean entropy of what its own xi, BN and head predict on the new task's training
  images} (as source_accuracies reads them; no label used)."""
  return _measure_sources(new, "mean_prediction_entropy", "mean prediction entropy (nats)")


def _measure_sources(new, measure, what):
  ctx, config = new.ctx, new.ctx.config
  stream = ctx.task_stream(new.task, global_batch_size=config.eval_batch_size, train=False,
                           split=ctx.data_config(new.task).train_split)
  max_batches = math.ceil(config.transfer.selection_examples / config.eval_batch_size)
  values = {}
  for name in new.sources:
    candidate = build_task(new.variables, ctx.model.spec, new.task, new.sources,
                           copy_source=name)
    values[name] = getattr(ctx, measure)(candidate, stream, new.task, max_batches)
    logging.info("Task %s: xi, BN and head of source %s give %s %.4f on its training data.",
                 new.task, name, what, values[name])
  return values


def initialise_new_task(ctx, variables, task, source_classes):
  """`variables` (host) with task's xi, head and BN built from the sources as
  ctx.config.xi_init says, and what the run reports about them."""
  xi_init, spec = ctx.config.xi_init, ctx.model.spec
  check_heads_fit(xi_init, task, dict(spec.tasks)[task], source_classes)
  if xi_init in READS_NEW_TASK_LABELS:
    logging.warning("xi_init=%s uses the labels of task %s's training split (for domain "
                    "adaptation: paper App. D.2's selection); with xi_init=source:<task> no "
                    "label of %s is read.", xi_init, task, task)
  new = NewTask(ctx=ctx, variables=variables, task=task, sources=tuple(sorted(source_classes)))
  start = strategy(xi_init)(new)
  variables = jax.device_get(build_task(
      variables, spec, task, list(new.sources),
      coefficients=jnp.asarray(start.coefficients, jnp.float32),
      copy_source=start.copy_source, xi_logits=start.xi_logits))
  if ctx.config.transfer.add_templates and "mixture_logits" in variables["params"]:
    variables = growth.with_new_template_share(variables, spec, task,
                                               ctx.config.transfer.add_templates)
  coefficients = dict(zip(new.sources, start.coefficients.tolist()))
  logging.info("Task %s: xi_init=%s, coefficients %s.", task, xi_init,
               {name: round(c, 4) for name, c in coefficients.items()})
  params = variables["params"]
  initial_xi = (templates.mixture_weights(templates.task_mixture_logits(params))
                [spec.task_index(task)] if "mixture_logits" in params else None)
  return variables, {
      "xi_init": xi_init, "coefficients": coefficients,
      "initial_xi": None if initial_xi is None else np.asarray(initial_xi).tolist(),
      "source_accuracy_on_train": start.source_accuracies,
      "source_entropy_on_train": start.source_entropies,
      "coefficient_learning_loss": list(start.learning_losses[-1:]),
      "added_parameters": added_parameters(spec, variables["params"], task)}


def precise_bn_statistics(ctx, variables, tasks, num_batches):
  """`variables` with the BN moving statistics of each of `tasks` replaced by the mean over
  `num_batches` of its training batches of the batch statistics ("precise BN"; for a new task
  from a source's variables, AdaBN: Li et al. 2016), the network in training mode but nothing
  else changed. Reads the tasks' images, never their labels."""
  model = ctx.model
  placed = ctx.replicated(variables)
  batch_stats = jax.device_get(variables["batch_stats"])
  for task in tasks:
    statistics = jax.jit(lambda v, images, task=task: model.apply(
        v, images, task=task, method=model.batch_statistics))
    batches = iter(ctx.train_streams[task])
    total = None
    for _ in range(num_batches):
      images = ctx.global_batch({task: next(batches)})[task]["image"]
      stats = jax.device_get(statistics(placed, images))
      total = stats if total is None else jax.tree.map(np.add, total, stats)
    row = model.spec.task_index(task)
    batch_stats["block_bn"] = jax.tree.map(
        lambda all_tasks, summed: _with_row(all_tasks, row, summed / num_batches),
        batch_stats["block_bn"], total)
  return {"params": variables["params"], "batch_stats": batch_stats}


def _with_row(array, row, value):
  array = np.array(array)
  array[row] = value
  return array


def check_config(config):
  """Errors for config.xi_init and config.transfer, raised before any heavy work."""
  check_xi_init(config.xi_init)
  if config.model.get("task_free") and (config.init_from or config.get("pretrain")):
    raise ValueError("config.model.task_free=True trains one network for all tasks from "
                     "scratch; starting it from a checkpoint (config.init_from or "
                     "config.pretrain: transfer, growth, deltas) is not supported: unset "
                     "config.init_from, or use task_free=False.")
  for rule in config.transfer.dont_load:
    try:
      re.compile(rule)
    except re.error as error:
      raise ValueError(f"config.transfer.dont_load rule {rule!r} is not a regex: {error}") from None
  if config.transfer.target_bn_batches < 0:
    raise ValueError(f"config.transfer.target_bn_batches must be >= 0 (0: the new tasks keep "
                     f"the BN statistics they were built with), got "
                     f"{config.transfer.target_bn_batches!r}")
  for name in ("selection_examples", "learned_steps"):
    if config.transfer[name] <= 0:
      raise ValueError(f"config.transfer.{name} must be a positive integer, got "
                       f"{config.transfer[name]!r}")


def check_xi_init(xi_init, source_tasks=None):
  """Errors for config.xi_init (with `source_tasks`, also an unknown source task)."""
  if xi_init.startswith(SOURCE_PREFIX):
    task = xi_init[len(SOURCE_PREFIX):]
    if source_tasks is not None and task not in source_tasks:
      raise ValueError(f"config.xi_init={xi_init!r} names no task of the pretrained checkpoint;"
                       f" its tasks are {sorted(source_tasks)}")
    return
  if xi_init not in XI_INITS:
    raise ValueError(f"config.xi_init must be 'source:<task>' or one of {XI_INITS}, got "
                     f"{xi_init!r}")


def check_heads_fit(xi_init, target, target_classes, source_classes):
  """Refuses a strategy that evaluates source heads when their label sets cannot be the new
  task's."""
  misfits = {t: c for t, c in source_classes.items() if c != target_classes}
  if xi_init in NEEDS_SOURCE_HEADS and misfits:
    raise ValueError(
        f"config.xi_init={xi_init!r} evaluates the source tasks' heads on task {target!r} "
        f"({target_classes} classes), but the sources {misfits} have other numbers of classes. "
        f"Use xi_init='source:<task>', 'random' or 'diagonal'.")


def build_task(variables, spec, target, sources, coefficients=None, copy_source=None,
               xi_logits=None):
  """`variables` with the private variables of task `target` rebuilt from the source tasks.

  Either `copy_source` (exact copy of that task's rows) or `coefficients` [len(sources)] (Eq. 1
  and weighted sums); `xi_logits` [L, K], when given, replaces the xi row. Pure jnp: the result
  is differentiable in `coefficients`.
  """
  flat = traverse_util.flatten_dict(variables, sep="/")
  target_row = spec.task_index(target)
  rebuilt = dict(flat)
  for path, value in flat.items():
    owners = network_spec.task_owners(spec, path)
    if owners is None or (len(owners) == 1 and owners[0] != target):
      continue
    if len(owners) == 1:  # the target's head: from the sources' heads when they fit
      source_values = [flat[path.replace(f"heads/{target}/", f"heads/{s}/", 1)]
                       for s in sources]
      if all(v.shape == value.shape for v in source_values):
        rebuilt[path] = _combine(jnp.stack(source_values), coefficients, copy_source, sources)
      continue
    rows = jnp.stack([value[spec.task_index(s)] for s in sources])
    if path == "params/mixture_logits":
      row = xi_logits if xi_logits is not None else _combine_xi(rows, coefficients, copy_source,
                                                                sources)
    else:
      row = _combine(rows, coefficients, copy_source, sources)
    rebuilt[path] = jnp.asarray(value).at[target_row].set(row)
  return traverse_util.unflatten_dict(rebuilt, sep="/")


def _combine(stacked, coefficients, copy_source, sources):
  if copy_source is not None:
    return stacked[sources.index(copy_source)]
  return jnp.tensordot(coefficients, stacked, axes=1)


def _combine_xi(logit_rows, coefficients, copy_source, sources):
  """Eq. 1 on the softmax weights; stored back as logits (softmax(log xi*) = xi*)."""
  if copy_source is not None:
    return logit_rows[sources.index(copy_source)]
  xi = jnp.tensordot(coefficients, jax.nn.softmax(logit_rows, axis=-1), axes=1)
  return jnp.log(xi)


def fresh_xi_logits(xi_init, spec, fresh_row, seed):
  """The task's own xi rows (after the shared layers) of the `random` and `diagonal`
  strategies."""
  if xi_init == "random":
    return fresh_row
  return templates.init_mixture_logits(jax.random.key(seed), "diagonal",
                                       (1, spec.num_layers, spec.bank_size),
                                       spec.mixture_init_scale)[0, spec.shared_mixture_layers:]


def accuracy_coefficients(accuracies, sources):
  """c_v = a_v / sum_k a_k (App. C, accuracy-based interpolation)."""
  values = np.array([accuracies[s] for s in sources], np.float64)
  if values.sum() <= 0:
    raise ValueError(f"Every source task has accuracy 0 on the new task ({accuracies}); "
                     f"accuracy-based coefficients are undefined. Use xi_init='random'.")
  return values / values.sum()


def learn_coefficients(model, variables, target, sources, batches, *, steps, learning_rate):
  """Learned interpolation (App. C): c = softmax(gamma), gamma trained with Adam to minimise
  the new task's cross-entropy with its variables built from the sources by c (Eq. 1). Only
  gamma is trained; the network runs in evaluation mode (moving BN statistics, no dropout).
  `batches` yields {"image", "label", "mask"}. Returns (c, [loss per step])."""
  spec = model.spec
  tx = optax.adam(learning_rate)

  def loss_fn(gamma, variables, examples):
    built = build_task(variables, spec, target, sources, coefficients=jax.nn.softmax(gamma))
    logits = model.apply(built, examples["image"], task=target, train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, examples["label"])
    mask = examples["mask"].astype(jnp.float32)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)

  @jax.jit
  def step(gamma, opt_state, variables, examples):
    loss, grad = jax.value_and_grad(loss_fn)(gamma, variables, examples)
    updates, opt_state = tx.update(grad, opt_state, gamma)
    return optax.apply_updates(gamma, updates), opt_state, loss

  gamma = jnp.zeros(len(sources))  # uniform c to start
  opt_state = tx.init(gamma)
  losses = []
  for _ in range(steps):
    gamma, opt_state, loss = step(gamma, opt_state, variables, next(batches))
    losses.append(float(loss))
  return np.asarray(jax.nn.softmax(gamma)), losses


def added_parameters(spec, params, task):
  """{group: number of parameters private to `task`}: its xi row, head and per-task BN rows."""
  counts = {}
  for path, value in traverse_util.flatten_dict(params, sep="/").items():
    owners = network_spec.task_owners(spec, "params/" + path)
    if owners is None or task not in owners:
      continue
    group = path.split("/")[0]
    size = int(np.prod(value.shape[1:])) if len(owners) > 1 else int(np.prod(value.shape))
    counts[group] = counts.get(group, 0) + size
  return counts
