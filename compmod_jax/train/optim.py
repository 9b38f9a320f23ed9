"""Optimizers with parameter groups (App. A.2 defaults: RMSProp, weight decay 1e-5 on kernels).

Every parameter belongs to exactly one group (first matching rule, in the order below); each
group has a learning-rate multiplier in the config, and a multiplier of 0 freezes the group:
its parameters get exactly zero updates and no optimizer state. A parameter that no group
covers is an error naming it, so a new parameter can never be trained (or frozen) by accident.
"""
import dataclasses
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from compmod_jax.finetune import growth
from compmod_jax.models import network_spec

# (group, regex over "/"-joined parameter paths) of the model's parameters. Order matters: the
# first match wins, so the BN parameters that live inside the template bank ("mixed" batch norm)
# count as batch norm. A method's own variables (registry.Method.own_params) add one group
# after these (`parameter_groups`).
PARAMETER_GROUPS = (
    ("batch_norm", r"^block_bn/|^templates/bn/"),
    ("templates", r"^templates/"),
    ("mixture_logits", r"^(shared_)?mixture_logits$"),
    ("router", r"^router/"),
    ("input_adapter", r"^input_adapter/"),
    ("output_adapter", r"^output_adapter/"),
    ("heads", r"^heads/"),
)
MODEL_GROUPS = tuple(name for name, _ in PARAMETER_GROUPS)
# config.trainable: which groups of the model a run trains (the others get multiplier 0). ""
# leaves it to config.optimizer.lr_multipliers alone. The presets of transfer learning (paper
# §4.3): head only, head + BN, the paper's method (mixture weights + head + BN), and full
# fine-tuning; and of domain adaptation (§4.4): the mixture weights alone, or with BN or the
# input adapter, and the plain network's baseline, its input adapter alone; and of growth
# (finetune/growth.py): a new task's private variables with the templates (only the added ones
# when config.transfer.add_templates > 0); and of content routing (routing='example'): the
# router alone on a loaded per-task model, or with the mixture logits it adds to. A method's
# own variables are not the model's: presets leave their group alone.
TRAINABLE_PRESETS = {
    "xi": ("mixture_logits",),
    "router": ("router",),
    "xi_router": ("mixture_logits", "router"),
    "xi_bn": ("mixture_logits", "batch_norm"),
    "xi_input_adapter": ("mixture_logits", "input_adapter"),
    "input_adapter": ("input_adapter",),
    "head": ("heads",),
    "head_bn": ("heads", "batch_norm"),
    "xi_head_bn": ("heads", "batch_norm", "mixture_logits"),
    "xi_head_bn_templates": ("heads", "batch_norm", "mixture_logits", "templates"),
    "all": MODEL_GROUPS,
}
OPTIMIZERS = ("rmsprop", "sgd", "adam")
SCHEDULES = ("constant", "linear", "cosine", "exponential")


@dataclasses.dataclass(frozen=True)
class Optimization:
  """A run's optimizer, its learning-rate schedule and the trainable mask (`trainable_mask`)."""
  tx: Any
  schedule: Callable
  trainable: Any


def path_names(params):
  """A tree like `params` whose leaves are their "/"-joined paths."""
  flat = traverse_util.flatten_dict(params, sep="/")
  return traverse_util.unflatten_dict({k: k for k in flat}, sep="/")


def parameter_groups(method=None):
  """The model's groups, plus the group of `method`'s own variables when it has some."""
  if method is None or not method.own_params:
    return PARAMETER_GROUPS
  return PARAMETER_GROUPS + ((method.own_params, f"^{re.escape(method.own_params)}/"),)


def group_labels(params, groups=PARAMETER_GROUPS):
  """The group of every parameter, as a tree like `params`."""
  def label(path):
    for name, pattern in groups:
      if re.search(pattern, path):
        return name
    raise ValueError(f"Parameter {path!r} matches no optimizer group; groups and their "
                     f"patterns: {dict(groups)}. Add a group for it in train/optim.py (a "
                     f"method's own variables: registry.Method.own_params).")
  return jax.tree.map(label, path_names(params))


def check_config(config, groups=PARAMETER_GROUPS):
  """Errors for `config.optimizer` and `config.trainable`, raised before any heavy work."""
  opt = config.optimizer
  if opt.name not in OPTIMIZERS:
    raise ValueError(f"config.optimizer.name must be one of {OPTIMIZERS}, got {opt.name!r}")
  if opt.schedule not in SCHEDULES:
    raise ValueError(f"config.optimizer.schedule must be one of {SCHEDULES}, got "
                     f"{opt.schedule!r}")
  names = [name for name, _ in groups]
  unknown = sorted(set(opt.lr_multipliers) - set(names))
  if unknown:
    raise ValueError(f"config.optimizer.lr_multipliers names unknown group(s) {unknown}; "
                     f"groups are {names}")
  for name, multiplier in opt.lr_multipliers.items():
    if multiplier < 0:
      raise ValueError(f"config.optimizer.lr_multipliers.{name} must be >= 0 (0 freezes), "
                       f"got {multiplier}")
  if config.trainable and config.trainable not in TRAINABLE_PRESETS:
    raise ValueError(f"config.trainable must be one of {tuple(TRAINABLE_PRESETS)} or '' (use "
                     f"config.optimizer.lr_multipliers alone), got {config.trainable!r}")


def group_multipliers(config, groups=PARAMETER_GROUPS):
  """{group: learning-rate multiplier}: config.optimizer.lr_multipliers (default 1), with the
  model groups outside the config.trainable preset (when one is set) at 0."""
  multipliers = {name: config.optimizer.lr_multipliers.get(name, 1.0) for name, _ in groups}
  if config.trainable:
    preset = TRAINABLE_PRESETS[config.trainable]
    multipliers = {name: m if name in preset or name not in MODEL_GROUPS else 0.0
                   for name, m in multipliers.items()}
  return multipliers


def check_trainable(params, config, spec, method):
  """Fails when no parameter of this model would be trained by `method`.

  That happens when every multiplier is 0, when the only groups with a multiplier > 0 match no
  parameter of this model (e.g. mixture_logits with a fixed signature), or when they hold only
  rows of tasks this run does not train. A group that matches nothing while others train is
  fine: the default multipliers name every group. The method's own variables do not count:
  they alone would change nothing of the model.
  """
  groups = parameter_groups(method)
  mask = traverse_util.flatten_dict(trainable_mask(params, config, spec, method), sep="/")
  labels = traverse_util.flatten_dict(group_labels(params, groups), sep="/")
  if any(np.any(m) for path, m in mask.items() if labels[path] in MODEL_GROUPS):
    return
  multipliers = {name: m for name, m in group_multipliers(config, groups).items()
                 if name in MODEL_GROUPS}
  preset = f" (config.trainable={config.trainable!r})" if config.trainable else ""
  raise ValueError(
      f"config.optimizer.lr_multipliers trains nothing in this model{preset}: the groups with a "
      f"multiplier > 0 are {sorted(n for n, m in multipliers.items() if m > 0)}, and this "
      f"model's parameters are in {sorted(set(labels.values()))}; the run trains the tasks "
      f"{list(method.trained_tasks(config))}. Give one of those groups a multiplier > 0.")


def make_schedule(config):
  """Learning-rate schedule from `config.optimizer` (with optional linear warmup)."""
  opt = config.optimizer
  warmup = opt.warmup_steps
  decay_steps = max(1, config.total_steps - warmup)
  base, final = opt.learning_rate, opt.learning_rate * opt.final_lr_fraction
  if opt.schedule == "constant":
    main = optax.constant_schedule(base)
  elif opt.schedule == "linear":
    main = optax.linear_schedule(base, final, decay_steps)
  elif opt.schedule == "cosine":
    main = optax.cosine_decay_schedule(base, decay_steps, alpha=opt.final_lr_fraction)
  else:
    main = optax.exponential_decay(base, opt.decay_steps, opt.decay_rate)
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, base, warmup), main], [warmup])


def _base_optimizer(opt, learning_rate):
  if opt.name == "rmsprop":
    # TF1's RMSProp, as the paper used (A.2): the mean square starts at 1, not 0, so the
    # first updates are not blown up by a near-zero denominator.
    return optax.rmsprop(learning_rate, decay=opt.rmsprop_decay, eps=opt.eps,
                         initial_scale=1.0, momentum=opt.momentum or None)
  if opt.name == "sgd":
    return optax.sgd(learning_rate, momentum=opt.momentum or None, nesterov=opt.nesterov)
  return optax.adam(learning_rate, b1=opt.adam_b1, b2=opt.adam_b2, eps=opt.eps)


def _is_kernel(params):
  return jax.tree.map(lambda path: path.endswith("kernel"), path_names(params))


def make_optimizer(config, params, groups=PARAMETER_GROUPS):
  """optax.partition over the parameter groups; frozen groups use set_to_zero."""
  check_config(config, groups)
  opt = config.optimizer
  multipliers = group_multipliers(config, groups)
  schedule = make_schedule(config)
  transforms = {}
  for name, _ in groups:
    multiplier = multipliers[name]
    if multiplier == 0:
      transforms[name] = optax.set_to_zero()
    else:
      transforms[name] = optax.chain(
          optax.add_decayed_weights(opt.weight_decay, mask=_is_kernel),
          _base_optimizer(opt, lambda step, m=multiplier: m * schedule(step)))
  labels = group_labels(params, groups)
  tx = optax.partition(transforms, labels)
  if opt.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
  return tx, schedule


def trainable_mask(params, config, spec, method):
  """Which parameter entries this run may change, as a tree like `params`.

  A leaf is a numpy bool: a scalar when the whole array trains or not (its group's multiplier
  is > 0 or not), or a [tasks, 1, ...] mask over the rows of an array with one row per task.
  Rows and heads of tasks the model holds but `method` does not train (its trained_tasks) are
  always frozen: a model restored with more tasks keeps their predictions bit-identical. So are
  the checkpoint's templates when the run adds some (finetune/growth.py): [K, 1, ...] masks.
  """
  groups = parameter_groups(method)
  multipliers = group_multipliers(config, groups)
  flat = traverse_util.flatten_dict(params, sep="/")
  labels = traverse_util.flatten_dict(group_labels(params, groups), sep="/")

  def mask(path, leaf):
    if multipliers[labels[path]] <= 0:
      return np.bool_(False)
    owners = network_spec.task_owners(spec, "params/" + path)
    if owners is None:
      return growth.trainable_shared_entries(config, path, leaf.shape)
    trained_tasks = set(method.rows_trained(config, path))
    rows = np.array([task in trained_tasks for task in owners])
    if len(owners) == 1:
      return rows[0]
    return rows.reshape((len(owners),) + (1,) * (len(leaf.shape) - 1))

  return traverse_util.unflatten_dict({p: mask(p, leaf) for p, leaf in flat.items()}, sep="/")


def count_trainable(mask, params):
  """Number of parameter entries the mask lets train."""
  return int(sum(np.broadcast_to(m, p.shape).sum()
                 for m, p in zip(jax.tree.leaves(mask), jax.tree.leaves(params))))


def ema_update(ema_params, params, decay, step):
  """EMA of the parameters used for evaluation (App. A.2), warmed up like TF's
  ExponentialMovingAverage(num_updates): early steps use a smaller decay, so a short run's
  average is not dominated by the random initialisation."""
  decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)
