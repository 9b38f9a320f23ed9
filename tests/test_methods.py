"""Methods are plug-ins (compmod_jax/methods/registry.py): a method defined here, in the test
file, trains end to end through the unchanged trainer, with its own variables in their own
optimizer group, its own results field and its own config check."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compmod_jax.methods import registry, supervised
from compmod_jax.train import loop, optim
from helpers import read_checkpoint, tiny_digits

OWN = "temperature"


def temperature_scaled_loss(config, spec):
  """Cross-entropy of the logits divided by a learned temperature T = exp(log_t) (one per
  run): the network and T train together. Evaluation, as always, uses the network alone."""
  del config, spec

  def loss(model, params, batch_stats, batch, rng):
    total, metrics = 0.0, {}
    for index, (task, examples) in enumerate(sorted(batch.items())):
      logits, updates = model.apply(
          {"params": params, "batch_stats": batch_stats}, examples["image"], task=task,
          train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.fold_in(rng, index)})
      batch_stats = updates["batch_stats"]
      scaled = logits * jnp.exp(-params[OWN]["log_t"])
      total += supervised.masked_mean(optax.softmax_cross_entropy_with_integer_labels(
          scaled, examples["label"]), examples["mask"])
    metrics["temperature"] = jnp.exp(params[OWN]["log_t"])
    return total, (batch_stats, metrics)

  return loss


def check_temperature_config(config):
  if len(config.tasks) != 1:
    raise ValueError(f"temperature_scaled trains one task, got {sorted(config.tasks)}")


registry.register(registry.Method(
    "temperature_scaled", make_loss=temperature_scaled_loss, own_params=OWN,
    init_params=lambda config, model, variables, rng, images: {"log_t": jnp.zeros(())},
    results=lambda config, task_results: {"mean_test_accuracy": float(np.mean(
        [r["test_accuracy"] for r in task_results.values()]))},
    check_config=check_temperature_config))


def test_a_method_defined_in_a_test_file_trains_through_the_trainer(embedded_dir, tmp_path):
  config = tiny_digits(embedded_dir, total_steps=8, method="temperature_scaled",
                       **{"data.eval_split": "test[:200]"})
  config.optimizer.lr_multipliers[OWN] = 10.0
  results = loop.train_and_evaluate(config, str(tmp_path))
  assert results["mean_test_accuracy"] == results["tasks"]["mnist"]["test_accuracy"]
  step, saved = read_checkpoint(tmp_path)
  assert step == 8
  # Only the method's loss gives log_t a gradient, and only its group updates it.
  assert saved["state"]["params"][OWN]["log_t"] != 0.0


def test_a_methods_group_follows_its_multiplier_outside_the_presets(embedded_dir):
  method = registry.get("temperature_scaled")
  assert optim.parameter_groups(method)[-1] == (OWN, "^temperature/")
  config = tiny_digits(embedded_dir, method="temperature_scaled")
  config.optimizer.update(schedule="constant", warmup_steps=0)  # a rate > 0 from the start
  params = {"heads": {"mnist": {"bias": jnp.ones(2)}}, OWN: {"log_t": jnp.zeros(())}}
  grads = jax.tree.map(jnp.ones_like, params)
  for multiplier, trainable in ((0.0, ""), (1.0, "head"), (1.0, "xi")):
    config.optimizer.lr_multipliers[OWN] = multiplier
    config.trainable = trainable
    tx, _ = optim.make_optimizer(config, params, optim.parameter_groups(method))
    updates, _ = tx.update(grads, tx.init(params), params)
    # A multiplier of 0 freezes the method's variables exactly; a model preset never does.
    assert (float(updates[OWN]["log_t"]) == 0.0) == (multiplier == 0.0), (multiplier, trainable)
    assert (float(updates["heads"]["mnist"]["bias"][0]) == 0.0) == (trainable == "xi")


def test_a_methods_config_check_runs_before_anything_else(embedded_dir, tmp_path):
  config = tiny_digits(embedded_dir, method="temperature_scaled")
  config.tasks.parity = config.tasks.mnist
  with pytest.raises(ValueError, match=r"temperature_scaled trains one task, got \['mnist', "
                                       r"'parity'\]"):
    loop.train_and_evaluate(config, str(tmp_path / "refused"))
  assert not (tmp_path / "refused").exists()  # refused before the workdir was made


def test_an_unknown_method_lists_the_registered_ones(embedded_dir, tmp_path):
  config = tiny_digits(embedded_dir, method="mixup")
  with pytest.raises(ValueError, match=r"config.method must be one of \(.*'adversarial', "
                                       r"'moment_matching', 'supervised', 'temperature_scaled'"
                                       r"\), got 'mixup'"):
    loop.train_and_evaluate(config, str(tmp_path))
