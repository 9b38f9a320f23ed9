"""Unsupervised multi-source domain adaptation on the target's variables (paper §4.4, App. D).

Both methods train the target's trainable variables (by default its xi alone: config.trainable)
and a few variables of their own, kept in params["adaptation"] under their own optimizer group
(registry.Method.own_params). Both are methods of the plug-in registry (methods/registry.py).
Each step computes both players' objectives at once; every term sees the other player's
variables through stop_gradient, so each gets the gradient of its own objective only.

The source domains run in evaluation mode (their moving BN statistics are not updated); the
target runs in training mode and updates only its own statistics, so source and target inputs
never share a BN statistics update. The target's labels are never read.

Frozen (the default) or joint (config.adaptation.joint, the paper's §4.4): jointly, the same
step also trains the source domains on their labelled classification loss, which reaches the
templates, adapters and the sources' xi, BN and heads (the sources' forward never reads the
target's rows), while the adaptation loss reaches only the target's own adapted rows
(config.adaptation.target_params: its xi, or a plain model's input adapter) and the method's
variables: every other parameter enters it through stop_gradient. The target's other rows (head,
BN) stay as they were copied (optimizer mask: Method.trained_rows).

Adversarial (ADDA-style, App. D.3): a domain discriminator, a small 3-layer CNN on the body
features (the input of the output adapter), learns to tell the sources' features from the
target's; the target learns to make its features pass for source ones (the GAN loss with
inverted labels).

Moment matching (M3SDA-style, App. D.4, Peng et al. 2019): the target minimises the moment
distance between its embeddings (the output adapter's output) and each source's, plus the
discrepancy of two classifiers on its embeddings; the two classifiers learn to classify the
sources while maximising that discrepancy (the min-max step of Maximum Classifier Discrepancy).
The classifiers only shape the target's features: predictions still come from the target's
own head.
"""
import dataclasses
import functools
import itertools
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn

from compmod_jax import ranges
from compmod_jax.methods import registry, supervised

METHODS = ("adversarial", "moment_matching")
# The key of the methods' own variables in params, and so their optimizer group.
OWN_PARAMS = "adaptation"
# Table 3 (analysis/tables.py): its rows, in order (source-only, the target's own BN statistics
# and the supervised bound run the supervised method on the target alone), and its columns,
# the two models, each with the multi-task set-up of its pretraining and the variables
# adaptation trains by default.
TABLE3_METHODS = ("source_only", "bn_stats") + METHODS + ("supervised",)
TABLE3_MODELS = {"compositional": ("mixture_patches", "xi"),
                 "plain": ("simple_baseline", "input_adapter")}
# Joint adaptation: the target parameters each model adapts (its rows of them).
JOINT_TARGET_PARAMS = {"compositional": ("mixture_logits",), "plain": ("input_adapter",)}


def default_config():
  """config.adaptation: the target task (its private variables are the only model variables
  that train; the adaptation losses never read its labels), the discriminator's width, the
  weight of the moment distance, and the labels of the run in the Table 3 layout."""
  return ml_collections.ConfigDict(dict(
      target="", discriminator_channels=64, moment_weight=1.0, method_name="", model_name="",
      joint=False, target_params=("mixture_logits",)))


def check_config(config):
  adaptation = config.get("adaptation")
  if adaptation is None:
    raise ValueError(f"config.method={config.method!r} needs a config.adaptation section "
                     f"(methods/adaptation.py default_config(); configs/common.py "
                     f"domain_adaptation builds one).")
  if adaptation.target not in config.tasks or len(config.tasks) < 2:
    raise ValueError(f"config.method={config.method!r} needs config.adaptation.target to name "
                     f"one of config.tasks and at least one source task beside it; got target "
                     f"{adaptation.target!r} and tasks {sorted(config.tasks)}")
  if not adaptation.moment_weight >= 0:
    raise ValueError(f"config.adaptation.moment_weight must be >= 0, got "
                     f"{adaptation.moment_weight}")
  if adaptation.joint and (isinstance(adaptation.target_params, str)
                          or not adaptation.target_params):
    raise ValueError(f"config.adaptation.joint trains the target's rows of "
                     f"config.adaptation.target_params alone; give a tuple of parameter names, "
                     f"e.g. ('mixture_logits',), got {adaptation.target_params!r}")
  ranges.check_positive_integer("config.adaptation.discriminator_channels",
                                adaptation.discriminator_channels)
  if config.model.get("task_free"):
    raise ValueError(f"config.method={config.method!r} adapts the target's own rows and "
                     f"head, which config.model.task_free=True (one network for all tasks) "
                     f"does not have: use task_free=False.")
  if config.model.routing == "task_posterior":
    raise ValueError(f"config.method={config.method!r} does not train the domain classifier "
                     f"of config.model.routing='task_posterior' (the supervised loss does): use "
                     f"routing='task' or 'example'.")


def trained_tasks(config):
  """The target alone; jointly, every task (the sources learn their classification)."""
  return tuple(sorted(config.tasks)) if config.adaptation.joint else (config.adaptation.target,)


def trained_rows(config, path):
  """Jointly, the target's rows train only in its adapted parameters."""
  if config.adaptation.joint and path.split("/")[0] not in config.adaptation.target_params:
    return tuple(sorted(set(config.tasks) - {config.adaptation.target}))
  return trained_tasks(config)


def target_accuracy(config, task_results):
  return {"target_test_accuracy": task_results[config.adaptation.target]["test_accuracy"]}


class Discriminator(nn.Module):
  """Logit of "source" for body features [N, H, W, C]: conv 3x3, conv 3x3 stride 2, dense."""
  channels: int = 64

  @nn.compact
  def __call__(self, features):
    x = nn.relu(nn.Conv(self.channels, (3, 3), name="conv_1")(features))
    x = nn.relu(nn.Conv(self.channels, (3, 3), strides=2, name="conv_2")(x))
    return nn.Dense(1, name="logit")(jnp.mean(x, axis=(1, 2)))[:, 0]


class ClassifierPair(nn.Module):
  """Two independently initialised linear classifiers on the embedding: (logits_1, logits_2)."""
  num_classes: int

  @nn.compact
  def __call__(self, embedding):
    return (nn.Dense(self.num_classes, name="classifier_1")(embedding),
            nn.Dense(self.num_classes, name="classifier_2")(embedding))


def method_module(config, spec):
  """The method's own network (its variables live in params["adaptation"])."""
  if config.method == "adversarial":
    return Discriminator(config.adaptation.discriminator_channels)
  return ClassifierPair(dict(spec.tasks)[config.adaptation.target])


def init_params(config, model, variables, key, example_images):
  """The method's own initial variables, for inputs shaped like the features it reads."""
  features = jax.eval_shape(functools.partial(model.apply, method=feature_method(config, model)),
                            variables, example_images)
  module = method_module(config, model.spec)
  return module.init(key, jnp.zeros((1,) + features.shape[1:]))["params"]


def feature_method(config, model):
  """What the method compares between domains: the body features (adversarial, App. D.3) or
  the embeddings (moment matching)."""
  return model.body_features if config.method == "adversarial" else model.embedding


def make_loss(config, spec):
  """loss(model, params, batch_stats, batch, rng) -> (loss, (batch_stats, metrics)) of
  config.method; `batch` is {task: examples}, every task but the target a source domain."""
  module = method_module(config, spec)
  target = config.adaptation.target
  if config.method == "adversarial":
    adapt = AdversarialLoss(target=target, discriminator=module)
  else:
    adapt = MomentMatchingLoss(target=target, classifiers=module,
                               moment_weight=config.adaptation.moment_weight)
  if not config.adaptation.joint:
    return adapt
  return JointLoss(adapt=adapt, target=target,
                   adapted=tuple(config.adaptation.target_params) + (OWN_PARAMS,),
                   task_weights={task: config.tasks[task].weight for task in config.tasks})


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity, like functools.partial
class JointLoss:
  """The sources' classification loss (training mode: their BN statistics update) plus the
  adaptation loss `adapt`, in which only the `adapted` parameters carry gradients."""
  adapt: Callable
  target: str
  adapted: tuple
  task_weights: dict

  def __call__(self, model, params, batch_stats, batch, rng):
    sources = {task: examples for task, examples in batch.items() if task != self.target}
    classification, (batch_stats, metrics) = supervised.classification_loss(
        model, params, batch_stats, sources, rng, self.task_weights)
    adapting = {name: value if name in self.adapted else jax.lax.stop_gradient(value)
                for name, value in params.items()}
    adaptation, (batch_stats, adaptation_metrics) = self.adapt(model, adapting, batch_stats,
                                                               batch, rng)
    return classification + adaptation, (batch_stats, {**metrics, **adaptation_metrics})


def binary_cross_entropy(logits, is_source):
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, jnp.full(logits.shape, is_source)))


def _features(model, params, batch_stats, batch, target, method):
  """({source: features}, target features, new batch_stats): sources in evaluation mode and
  constant, the target in training mode (only its own BN statistics row updates)."""
  variables = {"params": params, "batch_stats": batch_stats}
  sources = {task: jax.lax.stop_gradient(model.apply(
                 variables, examples["image"], task=task, train=False, method=method))
             for task, examples in sorted(batch.items()) if task != target}
  target_features, updates = model.apply(variables, batch[target]["image"], task=target,
                                         train=True, mutable=["batch_stats"], method=method)
  return sources, target_features, updates["batch_stats"]


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity, like functools.partial
class AdversarialLoss:
  """Discriminator loss + the target's mapping loss (see the module docstring)."""
  target: str
  discriminator: nn.Module

  def __call__(self, model, params, batch_stats, batch, rng):
    del rng  # no dropout before the body features
    sources, target_features, batch_stats = _features(model, params, batch_stats, batch,
                                                      self.target, model.body_features)
    disc = lambda p, x: self.discriminator.apply({"params": p}, x)
    disc_params = params[OWN_PARAMS]
    source_logits = disc(disc_params, jnp.concatenate(list(sources.values())))
    target_logits = disc(disc_params, jax.lax.stop_gradient(target_features))
    discriminator_loss = 0.5 * (binary_cross_entropy(source_logits, 1.0)
                                + binary_cross_entropy(target_logits, 0.0))
    mapping_loss = binary_cross_entropy(
        disc(jax.lax.stop_gradient(disc_params), target_features), 1.0)
    correct = jnp.concatenate([source_logits > 0, target_logits <= 0])
    metrics = {"adaptation/discriminator_loss": discriminator_loss,
               "adaptation/mapping_loss": mapping_loss,
               "adaptation/discriminator_accuracy": jnp.mean(correct.astype(jnp.float32))}
    return discriminator_loss + mapping_loss, (batch_stats, metrics)


def moment_distance(source_features, target_features, orders=(1, 2)):
  """M3SDA's moment distance (Peng et al. 2019, Eq. 1) between feature sets [N, D]:

    sum over orders k of  mean_i ||E[s_i^k] - E[t^k]||  +  mean_{i<j} ||E[s_i^k] - E[s_j^k]||

  with E[x^k] the element-wise k-th raw moment over the batch. Exactly 0 for identical sets
  (safe_norm: its gradient at 0 is 0, not NaN)."""
  total = 0.0
  for order in orders:
    source_moments = [jnp.mean(s ** order, axis=0) for s in source_features]
    target_moment = jnp.mean(target_features ** order, axis=0)
    total += jnp.mean(jnp.stack([optax.safe_norm(m - target_moment, 0.0)
                                 for m in source_moments]))
    pairs = list(itertools.combinations(source_moments, 2))
    if pairs:
      total += jnp.mean(jnp.stack([optax.safe_norm(a - b, 0.0) for a, b in pairs]))
  return total


def classifier_discrepancy(logits_1, logits_2):
  """Mean absolute difference of the two classifiers' class probabilities (MCD's)."""
  return jnp.mean(jnp.abs(jax.nn.softmax(logits_1) - jax.nn.softmax(logits_2)))


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity, like functools.partial
class MomentMatchingLoss:
  """Classifiers: source classification - target discrepancy; target: discrepancy + moment
  distance (see the module docstring)."""
  target: str
  classifiers: nn.Module
  moment_weight: float

  def __call__(self, model, params, batch_stats, batch, rng):
    del rng  # the embeddings are taken before the dropout
    sources, target_embedding, batch_stats = _features(model, params, batch_stats, batch,
                                                       self.target, model.embedding)
    pair = lambda p, x: self.classifiers.apply({"params": p}, x)
    pair_params = params[OWN_PARAMS]
    classification = 0.0
    for task, embedding in sources.items():
      mask = batch[task]["mask"].astype(jnp.float32)
      for logits in pair(pair_params, embedding):
        classification += supervised.masked_mean(
            optax.softmax_cross_entropy_with_integer_labels(logits, batch[task]["label"]),
            mask)
    classification /= 2 * len(sources)
    classifiers_discrepancy = classifier_discrepancy(
        *pair(pair_params, jax.lax.stop_gradient(target_embedding)))
    target_discrepancy = classifier_discrepancy(
        *pair(jax.lax.stop_gradient(pair_params), target_embedding))
    moments = moment_distance(list(sources.values()), target_embedding)
    metrics = {"adaptation/source_classification_loss": classification,
               "adaptation/classifier_discrepancy": target_discrepancy,
               "adaptation/moment_distance": moments}
    loss = (classification - classifiers_discrepancy + target_discrepancy
            + self.moment_weight * moments)
    return loss, (batch_stats, metrics)


for _name in METHODS:
  registry.register(registry.Method(
      _name, make_loss=make_loss, own_params=OWN_PARAMS, init_params=init_params,
      trained_tasks=trained_tasks, trained_rows=trained_rows, results=target_accuracy,
      check_config=check_config))
