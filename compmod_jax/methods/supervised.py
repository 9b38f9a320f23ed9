"""Supervised classification on one or several tasks: the loss every experiment starts from.

A batch is {task name: {"image", "label", "mask"}}. Each task's images go through the network
with that task's mixture weights, head and BN statistics; the loss is the weighted sum of the
tasks' masked mean cross-entropies. All tasks share one jitted step (the task loop below is
unrolled at trace time, so nothing recompiles per task). A task_free model reads no task: all
tasks' images go through it in one call.
"""
import functools

import jax
import jax.numpy as jnp
import optax

from compmod_jax.methods import registry


def masked_mean(values, mask):
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def classification_loss(model, params, batch_stats, batch, rng, task_weights):
  """Returns (loss, (new batch_stats, per-task metrics))."""
  total = 0.0
  metrics = {}
  for index, (task, examples) in enumerate(sorted(batch.items())):
    logits, updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, examples["image"], task=task,
        train=True, mutable=["batch_stats", "losses"],
        rngs={"dropout": jax.random.fold_in(rng, index)})
    batch_stats = updates["batch_stats"]
    loss, metrics[f"{task}/accuracy"] = _loss_and_accuracy(logits, examples)
    total = total + task_weights[task] * loss
    metrics[f"{task}/loss"] = loss
    # The model's own losses (routing='task_posterior': its domain classifier's
    # cross-entropy), added unweighted: they teach the model, not the task.
    for name, (value,) in updates.get("losses", {}).items():
      total = total + value
      metrics[f"{task}/{name}"] = value
  return total, (batch_stats, metrics)


def _loss_and_accuracy(logits, examples):
  """The masked mean cross-entropy and accuracy of one task's logits."""
  mask = examples["mask"].astype(jnp.float32)
  cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, examples["label"])
  return (masked_mean(cross_entropy, mask),
          masked_mean(jnp.argmax(logits, -1) == examples["label"], mask))


def pooled_classification_loss(model, params, batch_stats, batch, rng, task_weights):
  """classification_loss for a task_free model: the tasks' images go through the network
  together, so BN normalises them with the statistics of the whole batch (in evaluation, the
  moving ones of every task's images: nothing there knows an image's task); each task's loss
  and weight are as in classification_loss."""
  tasks = sorted(batch)
  logits, updates = model.apply(
      {"params": params, "batch_stats": batch_stats},
      jnp.concatenate([batch[task]["image"] for task in tasks]), task=tasks[0], train=True,
      mutable=["batch_stats"], rngs={"dropout": rng})
  total = 0.0
  metrics = {}
  start = 0
  for task in tasks:
    examples = batch[task]
    end = start + examples["label"].shape[0]
    loss, metrics[f"{task}/accuracy"] = _loss_and_accuracy(logits[start:end], examples)
    start = end
    total = total + task_weights[task] * loss
    metrics[f"{task}/loss"] = loss
  return total, (updates["batch_stats"], metrics)


def make_loss(config, spec):
  task_weights = {task: config.tasks[task].weight for task in config.tasks}
  loss = pooled_classification_loss if spec.task_free else classification_loss
  return functools.partial(loss, task_weights=task_weights)


registry.register(registry.Method("supervised", make_loss=make_loss))
