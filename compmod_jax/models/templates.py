"""Template banks, mixture weights and signatures (paper §3.2, §4.2, App. B and C).

Every block parameter exists once per template, stacked on a leading K axis. A layer's
parameters are either a softmax-weighted mixture of the K templates (a learned signature) or one
template picked by a fixed signature. Both produce a tree stacked on a leading L axis, so the
layer loop downstream is the same for every signature.
"""
import jax
import jax.numpy as jnp
import numpy as np

LEARNED = "mixture"
FIXED_SIGNATURES = ("sequential", "cyclic", "random", "explicit", "progressive", "plain")
SIGNATURES = (LEARNED,) + FIXED_SIGNATURES
MIXTURE_INITS = ("normal", "uniform", "diagonal")


# The parameters that hold mixture logits: each task's own rows [tasks, L - n, K], and the
# first n layers' rows that all tasks share [n, K] (config.model.shared_mixture_layers = n).
MIXTURE_PARAMS = ("mixture_logits", "shared_mixture_logits")


def task_mixture_logits(params):
  """Every task's mixture logits [tasks, L, K] from a model's params: the shared first layers'
  rows (when the model shares some) followed by the task's own."""
  own = params["mixture_logits"]
  if "shared_mixture_logits" not in params:
    return own
  shared = params["shared_mixture_logits"]
  shared = jnp.broadcast_to(shared, (own.shape[0],) + tuple(shared.shape))
  return jnp.concatenate([shared, own], axis=1)


def mixture_weights(mixture_logits):
  """xi = softmax(logits) over the template axis; each xi_l sums to one."""
  return jax.nn.softmax(mixture_logits, axis=-1)


def template_usage(params):
  """Each template's mixture weight summed over tasks and layers, [K], of a model's params:
  which templates surgery prunes and growth copies."""
  return np.asarray(mixture_weights(task_mixture_logits(params))).sum(axis=(0, 1))


def mix_templates(xi, templates):
  """Parameters of all L layers at once: out[l] = sum_k xi[l, k] * templates[k].

  One einsum per template leaf for the whole depth, computed once per batch (not per example),
  before the layer loop.
  """
  return jax.tree.map(lambda bank: jnp.einsum("lk,k...->l...", xi, bank), templates)


def mix_templates_per_example(routes, templates):
  """One layer's parameters for every example: out[n] = sum_k routes[n, k] * templates[k]
  (routes [N, K]); each leaf gets a leading N axis that the block's batched contractions
  read."""
  return jax.tree.map(lambda bank: jnp.einsum("nk,k...->n...", routes, bank), templates)


def select_templates(signature, templates):
  """Parameters of all layers for a fixed signature: out[l] = templates[signature[l]]."""
  index = jnp.asarray(signature, dtype=jnp.int32)
  return jax.tree.map(lambda bank: jnp.take(bank, index, axis=0), templates)


def build_signature(kind, num_layers, num_templates, explicit=(), seed=0):
  """The 0-based template index of each layer for a fixed signature.

  sequential: (f_K^{L/K}) o ... o (f_1^{L/K}), each template repeated in one contiguous run;
  cyclic: (f_K o ... o f_1)^{L/K}; random: a seeded shuffle of the sequential signature;
  progressive: contiguous runs whose length grows towards the output (for K=4, L=12 this is
  the paper's discovered (1,2,2,3,3,3,3,4,4,4,4,4)); explicit: given 1-based, as in the paper;
  plain: every layer its own block (K must equal L).
  """
  layers = np.arange(num_layers)
  if kind == "sequential":
    signature = layers * num_templates // num_layers
  elif kind == "cyclic":
    signature = layers % num_templates
  elif kind == "random":
    signature = np.random.default_rng(seed).permutation(layers * num_templates // num_layers)
  elif kind == "progressive":
    signature = np.repeat(np.arange(num_templates), _progressive_run_lengths(num_layers,
                                                                             num_templates))
  elif kind == "explicit":
    signature = np.asarray(explicit, dtype=np.int64) - 1
  elif kind == "plain":
    signature = layers
  else:
    raise ValueError(f"signature must be one of {FIXED_SIGNATURES}, got {kind!r}")
  return tuple(int(t) for t in signature)


def _progressive_run_lengths(num_layers, num_templates):
  """Run lengths 1 + extra_k with the L - K extra layers split in proportion to k - 1.

  Largest-remainder rounding keeps the total exactly L and the lengths non-decreasing.
  """
  extra = num_layers - num_templates
  weights = np.arange(num_templates, dtype=np.float64)
  quota = extra * weights / weights.sum() if weights.sum() > 0 else np.zeros(num_templates)
  runs = np.floor(quota).astype(np.int64)
  leftover = extra - runs.sum()
  # Ties go to the later template so that runs never shrink towards the output.
  order = np.lexsort((-np.arange(num_templates), -(quota - runs)))
  runs[order[:leftover]] += 1
  return runs + 1


def init_mixture_logits(key, kind, shape, scale):
  """Initial mixture logits of shape [tasks, L, K].

  normal: N(0, scale^2); uniform: all zero, so xi = 1/K; diagonal: xi_l close to one-hot on
  template l (App. C, the "diag" models), with `scale` as the one-hot logit. With fewer
  templates than layers, "diagonal" follows the sequential signature (for K = L they coincide).
  """
  num_tasks, num_layers, num_templates = shape
  if kind == "normal":
    return scale * jax.random.normal(key, shape)
  if kind == "uniform":
    return jnp.zeros(shape)
  if kind == "diagonal":
    if num_templates >= num_layers:
      chosen = np.arange(num_layers)
    else:
      chosen = np.asarray(build_signature("sequential", num_layers, num_templates))
    one_hot = jax.nn.one_hot(chosen, num_templates)
    return jnp.broadcast_to(scale * one_hot, shape)
  raise ValueError(f"mixture_init must be one of {MIXTURE_INITS}, got {kind!r}")
