"""Unsupervised domain adaptation on the mixture weights (paper §4.4, App. D.3).

Adversarial (ADDA-style): a domain discriminator, a small 3-layer CNN on the body features (the
input of the output adapter), learns to tell the source domains' features from the target's;
the target's trainable variables (by default only its xi) learn to make the target's features
pass for source ones (the GAN loss with inverted labels). Both move in the same step: each term
sees the other's variables through stop_gradient, so the discriminator's gradient comes only
from its loss and the target's only from the mapping loss.

The source domains run in evaluation mode (their moving BN statistics, not updated); the target
runs in training mode and updates only its own statistics, so source and target inputs never
share a BN statistics update. The target's labels are never read.
"""
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn


class Discriminator(nn.Module):
  """Logit of "source" for body features [N, H, W, C]: conv 3x3, conv 3x3 stride 2, dense."""
  channels: int = 64

  @nn.compact
  def __call__(self, features):
    x = nn.relu(nn.Conv(self.channels, (3, 3), name="conv_1")(features))
    x = nn.relu(nn.Conv(self.channels, (3, 3), strides=2, name="conv_2")(x))
    return nn.Dense(1, name="logit")(jnp.mean(x, axis=(1, 2)))[:, 0]


def init_discriminator(key, feature_shape, channels):
  return Discriminator(channels).init(key, jnp.zeros((1,) + tuple(feature_shape)))["params"]


def binary_cross_entropy(logits, is_source):
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, jnp.full(logits.shape, is_source)))


def adversarial_loss(model, params, batch_stats, batch, rng, *, target, discriminator):
  """Returns (discriminator loss + mapping loss, (new batch_stats, metrics)).

  `batch` is {task: examples}: every task but `target` is a source domain.
  """
  del rng  # no dropout before the body features
  variables = {"params": params, "batch_stats": batch_stats}
  sources = sorted(task for task in batch if task != target)
  source_features = jnp.concatenate([
      jax.lax.stop_gradient(model.apply(variables, batch[task]["image"], task=task, train=False,
                                        method=model.body_features))
      for task in sources])
  target_features, updates = model.apply(variables, batch[target]["image"], task=target,
                                         train=True, mutable=["batch_stats"],
                                         method=model.body_features)
  disc = lambda p, x: discriminator.apply({"params": p}, x)
  disc_params = params["discriminator"]
  source_logits = disc(disc_params, source_features)
  target_logits = disc(disc_params, jax.lax.stop_gradient(target_features))
  discriminator_loss = 0.5 * (binary_cross_entropy(source_logits, 1.0)
                              + binary_cross_entropy(target_logits, 0.0))
  mapping_loss = binary_cross_entropy(
      disc(jax.lax.stop_gradient(disc_params), target_features), 1.0)
  correct = jnp.concatenate([source_logits > 0, target_logits <= 0])
  metrics = {"adaptation/discriminator_loss": discriminator_loss,
             "adaptation/mapping_loss": mapping_loss,
             "adaptation/discriminator_accuracy": jnp.mean(correct.astype(jnp.float32))}
  return discriminator_loss + mapping_loss, (updates["batch_stats"], metrics)
