"""Optimizers with parameter groups (App. A.2 defaults: RMSProp, weight decay 1e-5 on kernels).

Every parameter belongs to exactly one group (first matching rule, in the order below); each
group has a learning-rate multiplier in the config, and a multiplier of 0 freezes the group:
its parameters get exactly zero updates and no optimizer state. A parameter that no group
covers is an error naming it, so a new parameter can never be trained (or frozen) by accident.
"""
import re

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

# (group, regex over "/"-joined parameter paths). Order matters: the first match wins, so the
# BN parameters that live inside the template bank ("mixed" batch norm) count as batch norm.
PARAMETER_GROUPS = (
    ("batch_norm", r"^block_bn/|^templates/bn/"),
    ("templates", r"^templates/"),
    ("mixture_logits", r"^mixture_logits$"),
    ("adapters", r"^(input_adapter|output_adapter)/"),
    ("heads", r"^heads/"),
)
OPTIMIZERS = ("rmsprop", "sgd", "adam")
SCHEDULES = ("constant", "linear", "cosine", "exponential")


def path_names(params):
  """A tree like `params` whose leaves are their "/"-joined paths."""
  flat = traverse_util.flatten_dict(params, sep="/")
  return traverse_util.unflatten_dict({k: k for k in flat}, sep="/")


def group_labels(params, groups=PARAMETER_GROUPS):
  """The group of every parameter, as a tree like `params`."""
  def label(path):
    for name, pattern in groups:
      if re.search(pattern, path):
        return name
    raise ValueError(f"Parameter {path!r} matches no optimizer group; groups and their "
                     f"patterns: {dict(groups)}. Add a group for it in train/optim.py.")
  return jax.tree.map(label, path_names(params))


def check_config(config, groups=PARAMETER_GROUPS):
  """Errors for `config.optimizer`, raised before any heavy work."""
  opt = config.optimizer
  if opt.name not in OPTIMIZERS:
    raise ValueError(f"config.optimizer.name must be one of {OPTIMIZERS}, got {opt.name!r}")
  if opt.schedule not in SCHEDULES:
    raise ValueError(f"config.optimizer.schedule must be one of {SCHEDULES}, got "
                     f"{opt.schedule!r}")
  if opt.learning_rate <= 0:
    raise ValueError(f"config.optimizer.learning_rate must be > 0, got {opt.learning_rate}")
  names = [name for name, _ in groups]
  unknown = sorted(set(opt.lr_multipliers) - set(names))
  if unknown:
    raise ValueError(f"config.optimizer.lr_multipliers names unknown group(s) {unknown}; "
                     f"groups are {names}")
  for name, multiplier in opt.lr_multipliers.items():
    if multiplier < 0:
      raise ValueError(f"config.optimizer.lr_multipliers.{name} must be >= 0 (0 freezes), "
                       f"got {multiplier}")


def check_trainable(params, config, groups=PARAMETER_GROUPS):
  """Fails when no parameter of this model would be trained.

  That happens when every multiplier is 0, or when the only groups with a multiplier > 0
  match no parameter of this model (e.g. mixture_logits with a fixed signature). A group that
  matches nothing while others train is fine: the default multipliers name every group.
  """
  if any(jax.tree.leaves(trainable_mask(params, config, groups))):
    return
  multipliers = dict(config.optimizer.lr_multipliers)
  present = sorted(set(jax.tree.leaves(group_labels(params, groups))))
  raise ValueError(
      f"config.optimizer.lr_multipliers trains nothing in this model: the groups with a "
      f"multiplier > 0 are {sorted(n for n, _ in groups if multipliers.get(n, 1.0) > 0)}, "
      f"and this model's parameters are in {present}. Give one of those a multiplier > 0.")


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
  multipliers = dict(opt.lr_multipliers)
  schedule = make_schedule(config)
  transforms = {}
  for name, _ in groups:
    multiplier = multipliers.get(name, 1.0)
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


def trainable_mask(params, config, groups=PARAMETER_GROUPS):
  """True for parameters whose group has a non-zero learning-rate multiplier."""
  multipliers = dict(config.optimizer.lr_multipliers)
  return jax.tree.map(lambda g: multipliers.get(g, 1.0) > 0, group_labels(params, groups))


def ema_update(ema_params, params, decay, step):
  """EMA of the parameters used for evaluation (App. A.2), warmed up like TF's
  ExponentialMovingAverage(num_updates): early steps use a smaller decay, so a short run's
  average is not dominated by the random initialisation."""
  decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)
