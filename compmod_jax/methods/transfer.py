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
  accuracy       c_v proportional to that accuracy of each source
  learned        c = softmax(gamma), gamma trained on the new task's training data with every
                 other variable fixed (`learn_coefficients`)
  random         the model's fresh xi row (config.model.mixture_init); head, BN uniform over
                 the sources
  diagonal       xi near one-hot on template l in layer l; head, BN uniform over the sources
Heads are combined only when every source head has the new task's number of classes (the
paper's case: one label set); otherwise the new head keeps its fresh initialisation, and the
strategies that evaluate source heads (best_source, accuracy, learned) are refused.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from compmod_jax.models import network, templates

XI_INITS = ("best_source", "accuracy", "learned", "random", "diagonal")
NEEDS_SOURCE_HEADS = ("best_source", "accuracy", "learned")
SOURCE_PREFIX = "source:"


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
    owners = network.task_owners(spec, path)
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
  """The xi row of the `random` and `diagonal` strategies."""
  if xi_init == "random":
    return fresh_row
  return templates.init_mixture_logits(jax.random.key(seed), "diagonal",
                                       (1, spec.num_layers, spec.bank_size),
                                       spec.mixture_init_scale)[0]


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
    owners = network.task_owners(spec, "params/" + path)
    if owners is None or task not in owners:
      continue
    group = path.split("/")[0]
    size = int(np.prod(value.shape[1:])) if len(owners) > 1 else int(np.prod(value.shape))
    counts[group] = counts.get(group, 0) + size
  return counts
