"""Pure train and eval steps. The loop jits them once; sharding follows the inputs (parameters
replicated, batches split over the mesh's "data" axis), so the same code runs on 1 device,
N devices and several hosts."""
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from compmod_jax.train import optim, regularizers


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any


def train_step(state, batch, *, model, optimization, loss_fn, config):
  """One update with `optimization` (optim.Optimization: its tx and trainable mask).
  loss_fn(model, params, batch_stats, batch, rng) -> (loss, (stats, metrics))."""
  rng = jax.random.fold_in(jax.random.key(config.seed), state.step)

  def objective(params):
    loss, (batch_stats, metrics) = loss_fn(model, params, state.batch_stats, batch, rng)
    reg_losses = regularizers.regularization_losses(params, config)
    return loss + sum(reg_losses.values()), (batch_stats, metrics, reg_losses)

  (total, (batch_stats, metrics, reg_losses)), grads = jax.value_and_grad(
      objective, has_aux=True)(state.params)
  updates, opt_state = optimization.tx.update(grads, state.opt_state, state.params)
  # `trainable` (optim.trainable_mask) may freeze single rows of an array (other tasks' mixture
  # weights); selecting the old values, rather than zeroing the update, keeps them bit-identical
  # (weight decay and -0.0 + 0.0 cannot touch them), in the parameters and in their EMA.
  keep_frozen = lambda new, old: jax.tree.map(
      lambda t, n, o: jnp.where(t, n, o), optimization.trainable, new, old)
  params = keep_frozen(optax.apply_updates(state.params, updates), state.params)
  ema = keep_frozen(optim.ema_update(state.ema_params, params, config.ema_decay, state.step),
                    state.ema_params)
  grad_norm, param_norm = optax.global_norm(grads), optax.global_norm(params)
  # A NaN/Inf loss, gradient or new parameter skips the update: the state stays as it was and
  # only the step moves on (the loop applies config.max_nonfinite_skips; nonfinite.py).
  finite = jnp.isfinite(total) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
  metrics = dict(metrics, total_loss=total, grad_norm=grad_norm, param_norm=param_norm,
                 update_skipped=jnp.logical_not(finite).astype(jnp.float32),
                 **{f"regularizer/{k}": v for k, v in reg_losses.items()})
  updated = state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state,
                          ema_params=ema)
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
  return new_state.replace(step=state.step + 1), metrics


def eval_step(state, examples, *, model, task):
  """Sums of correct predictions, cross-entropy, the entropy of the predicted distribution (no
  label needed) and real examples over a padded batch, using the EMA parameters and the moving
  BN statistics; for a model that routes each image also of the routes and their entropies
  (and with routing='task_posterior' of the images whose inferred domain is `task`, of the
  posterior's mass on `task`, and of the correct predictions with the task given)."""
  variables = {"params": state.ema_params, "batch_stats": state.batch_stats}
  mask = examples["mask"].astype(jnp.float32)
  sums = {}
  if model.spec.routing != "task":
    # The routes' sums over the real examples: their mean and mean entropy per layer are what
    # the routing health reads of a model that routes each image (analysis/routing.py).
    logits, routes = model.apply(variables, examples["image"], task=task,
                                 method="logits_and_routes")
    sums["route_sum"] = jnp.einsum("lnk,n->lk", routes, mask)
    sums["route_entropy_sum"] = -jnp.einsum("lnk,n->l", routes * jnp.log(
        jnp.where(routes > 0, routes, 1.0)), mask)
  else:
    logits = model.apply(variables, examples["image"], task=task, train=False)
  if model.spec.routing == "task_posterior":
    # The images its classifier gives their domain, and the accuracy with the task given.
    posterior = model.apply(variables, examples["image"], method="domain_posterior")
    own = model.spec.task_index(task)
    sums["domain_correct"] = jnp.sum((jnp.argmax(posterior, -1) == own) * mask)
    sums["domain_mass_sum"] = jnp.sum(posterior[:, own] * mask)
    task_given = model.apply(variables, examples["image"], task=task,
                             method="task_given_logits")
    sums["task_given_correct"] = jnp.sum(
        (jnp.argmax(task_given, -1) == examples["label"]) * mask)
  cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, examples["label"])
  log_probabilities = jax.nn.log_softmax(logits)
  entropy = -jnp.sum(jnp.exp(log_probabilities) * log_probabilities, axis=-1)
  return dict(sums, correct=jnp.sum((jnp.argmax(logits, -1) == examples["label"]) * mask),
              loss_sum=jnp.sum(cross_entropy * mask), entropy_sum=jnp.sum(entropy * mask),
              count=jnp.sum(mask))


def jit_train_step(state_sharding, **kwargs):
  return jax.jit(functools.partial(train_step, **kwargs), donate_argnums=(0,),
                 out_shardings=(state_sharding, None))


def jit_eval_step(model, task):
  return jax.jit(functools.partial(eval_step, model=model, task=task))
