"""Mixture-weight regularisers of paper §3.2.

entropy:    H[xi_l] = -sum_k xi_lk log xi_lk, summed over layers (and tasks).
clustering: R[xi, theta] = alpha sum_k xi_k g(||theta_bar - theta_k||), theta_bar = sum_k xi_k
            theta_k, per layer (and task). theta_k is every parameter of template k. R is
            smallest at one-hot xi, and its gradient pulls each template towards the mixed
            parameters theta_bar with a force proportional to xi_k.
"""
import jax
import jax.numpy as jnp

from compmod_jax.models import templates

CLUSTERING_G = {
    "square": lambda sq_dist: sq_dist,
    # sqrt with a floor: the gradient of ||.|| at 0 (one template alone) is undefined.
    "norm": lambda sq_dist: jnp.sqrt(sq_dist + 1e-12),
    "log1p": jnp.log1p,
}


def mixture_entropy(mixture_logits):
  """Entropy of each xi_l: [..., L]."""
  log_xi = jax.nn.log_softmax(mixture_logits, axis=-1)
  return -jnp.sum(jnp.exp(log_xi) * log_xi, axis=-1)


def squared_template_distances(xi, template_bank):
  """||theta_bar_l - theta_k||^2 for every layer l and template k: [L, K].

  Computed leaf by leaf from the difference itself (no Gram-matrix shortcut, whose
  cancellation would swamp the small distances near one-hot xi).
  """
  total = 0.0
  for bank in jax.tree.leaves(template_bank):
    flat = bank.reshape(bank.shape[0], -1)
    mixed = xi @ flat
    total = total + jnp.sum(jnp.square(mixed[:, None, :] - flat[None, :, :]), axis=-1)
  return total


def clustering(mixture_logits, template_bank, g="square"):
  """R summed over tasks and layers, without the weight alpha. mixture_logits: [T, L, K]."""
  if g not in CLUSTERING_G:
    raise ValueError(f"config.regularizers.clustering_g must be one of {tuple(CLUSTERING_G)}, "
                     f"got {g!r}")
  xi = jax.nn.softmax(mixture_logits, axis=-1)
  per_task = jax.vmap(lambda x: jnp.sum(x * CLUSTERING_G[g](
      squared_template_distances(x, template_bank))))(xi)
  return jnp.sum(per_task)


def regularization_losses(params, config):
  """Weighted regularisers of a model's params as {name: value} (empty if none apply)."""
  weights = config.regularizers
  if "mixture_logits" not in params:
    return {}
  losses = {}
  # Over every task's xi: a layer whose xi all tasks share counts once per task.
  logits = templates.task_mixture_logits(params)
  if weights.entropy_weight:
    losses["entropy"] = weights.entropy_weight * jnp.sum(mixture_entropy(logits))
  if weights.clustering_weight:
    losses["clustering"] = weights.clustering_weight * clustering(
        logits, params["templates"], weights.clustering_g)
  return losses
