"""Unsupervised domain adaptation on the target's mixture weights (paper §4.4, App. D.3)."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from compmod_jax.analysis import tables
from compmod_jax.methods import adaptation
from compmod_jax.train import defaults, loop, steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import digits_da  # noqa: E402

SOURCES = ("mnist", "mnist_blur")
TARGET = "uci_digits"


def test_discriminator_loss_falls_when_trained_alone_on_separable_features():
  source = 1.0 + jax.random.normal(jax.random.key(0), (64, 4, 4, 8))
  target = -1.0 + jax.random.normal(jax.random.key(1), (64, 4, 4, 8))
  disc = adaptation.Discriminator(16)
  params = adaptation.init_discriminator(jax.random.key(2), (4, 4, 8), 16)
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)

  def loss_fn(p):
    return 0.5 * (adaptation.binary_cross_entropy(disc.apply({"params": p}, source), 1.0)
                  + adaptation.binary_cross_entropy(disc.apply({"params": p}, target), 0.0))

  losses = []
  for _ in range(40):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state)
    params = optax.apply_updates(params, updates)
    losses.append(float(loss))
  assert losses[0] > 0.5 and losses[-1] < 0.1 * losses[0], losses[::10]
  assert float(jnp.mean(disc.apply({"params": params}, source) > 0)) == 1.0
  assert float(jnp.mean(disc.apply({"params": params}, target) <= 0)) == 1.0


def adversarial_setup(trainable="xi"):
  config = digits_da.get_config("tiny=1")
  config.tasks = {t: defaults.task(f"embedded_digits/{t}", batch_size=8)
                  for t in SOURCES + (TARGET,)}
  config.trainable = trainable
  model = loop.model_for(config, {t: 10 for t in config.tasks})
  mesh = loop.make_mesh(config)
  state, tx, _, trainable_mask = loop.create_train_state(config, model, mesh,
                                                         jnp.zeros((1, 28, 28, 1)))
  step = steps.jit_train_step(jax.tree.map(lambda a: a.sharding, state), model=model, tx=tx,
                              loss_fn=loop.method_loss(config), trainable=trainable_mask,
                              config=config)
  keys = iter(jax.random.split(jax.random.key(3), 8))
  batch = {t: {"image": jax.random.uniform(next(keys), (8, 28, 28, 1)) + 0.3 * (t == TARGET),
               "label": jax.random.randint(next(keys), (8,), 0, 10), "mask": jnp.ones(8)}
           for t in config.tasks}
  return model, mesh, state, step, batch


def flat_host(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def test_adversarial_step_moves_only_the_target_xi_and_the_discriminator():
  model, mesh, state, step, batch = adversarial_setup()
  before = flat_host({"params": state.params, "batch_stats": state.batch_stats})
  new_state, metrics = step(state, loop.global_batch(mesh, batch))
  after = flat_host({"params": new_state.params, "batch_stats": new_state.batch_stats})
  target_row = model.spec.task_index(TARGET)
  other_rows = [model.spec.task_index(t) for t in SOURCES]
  changed = sorted(path for path in after if not np.array_equal(after[path], before[path]))
  assert any(path.startswith("params/discriminator/") for path in changed)
  assert "params/mixture_logits" in changed
  assert {p for p in changed if not p.startswith(("params/discriminator/", "batch_stats/"))} == {
      "params/mixture_logits"}
  for path in ("params/mixture_logits", "batch_stats/block_bn/expand/mean"):
    np.testing.assert_array_equal(after[path][other_rows], before[path][other_rows])
    assert not np.array_equal(after[path][target_row], before[path][target_row]), path
  assert np.isfinite(float(metrics["adaptation/discriminator_loss"]))


def test_the_adversarial_loss_never_reads_the_target_labels_and_bn_moves_with_xi_bn():
  model, mesh, state, step, batch = adversarial_setup(trainable="xi_bn")
  relabelled = dict(batch, **{TARGET: dict(batch[TARGET],
                                           label=(batch[TARGET]["label"] + 1) % 10)})
  before = flat_host(state.params)
  copy = jax.tree.map(jnp.copy, state)  # the step donates its input
  first, metrics = step(state, loop.global_batch(mesh, batch))
  second, metrics_relabelled = step(copy, loop.global_batch(mesh, relabelled))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(first), jax.device_get(second))
  assert float(metrics["total_loss"]) == float(metrics_relabelled["total_loss"])
  after = flat_host(first.params)
  target_row = model.spec.task_index(TARGET)
  other_rows = [model.spec.task_index(t) for t in SOURCES]
  for path in ("block_bn/expand/scale", "block_bn/project/bias"):
    np.testing.assert_array_equal(after[path][other_rows], before[path][other_rows])
    assert not np.array_equal(after[path][target_row], before[path][target_row]), path


def tiny_da(data_dir, init_from, method, **overrides):
  config = digits_da.get_config(f"method={method},tiny=1,source=mnist_blur")
  config.data.data_dir = str(data_dir)
  config.eval_batch_size = 200
  config.init_from = str(init_from)
  if method == "adversarial":
    config.tasks = {t: config.tasks[t] for t in SOURCES + (TARGET,)}
  config.update(overrides)
  return config


def test_digits_da_source_only_and_adversarial_write_the_table3_layout(
    embedded_dir, source_workdir, tmp_path):
  # Without init_from the run pretrains config.pretrain first (two domains here, for time).
  config = tiny_da(embedded_dir, "", "source_only")
  config.pretrain.tasks = {t: config.pretrain.tasks[t] for t in SOURCES}
  source_only = loop.train_and_evaluate(config, str(tmp_path / "da_source_only"))
  assert source_only["init_from"]["checkpoint"] == str(
      tmp_path / "da_source_only" / "pretrained" / "checkpoints" / "4")
  assert source_only["init_from"]["source_tasks"] == {"mnist": 10, "mnist_blur": 10}
  assert source_only["step"] == 0
  assert source_only["target_test_accuracy"] == pytest.approx(
      source_only["tasks"][TARGET]["accuracy_before_finetune"], abs=0)
  assert source_only["init_from"]["new_tasks"][TARGET]["source_accuracy_on_train"] == {}
  adversarial = loop.train_and_evaluate(tiny_da(embedded_dir, source_workdir, "adversarial"),
                                        str(tmp_path / "da_adversarial"))
  assert adversarial["step"] == 4
  assert (tmp_path / "da_adversarial" / "new_task_xi.png").exists()
  markdown = tables.da_table([tmp_path / "da_source_only", tmp_path / "da_adversarial"],
                             out=tmp_path / "table3")
  table = json.loads((tmp_path / "table3" / "table3.json").read_text())
  assert table == {"source_only": {"compositional": source_only["target_test_accuracy"]},
                   "adversarial": {"compositional": adversarial["target_test_accuracy"]}}
  assert markdown.splitlines()[4].startswith("| source_only |")


def test_bad_adaptation_configs_fail_with_clear_errors(embedded_dir, source_workdir, tmp_path):
  with pytest.raises(ValueError, match=r"config.method='adversarial' needs "
                                       r"config.adaptation.target to name one of config.tasks"):
    config = tiny_da(embedded_dir, source_workdir, "adversarial")
    config.tasks = {TARGET: defaults.task(f"embedded_digits/{TARGET}", batch_size=8)}
    loop.train_and_evaluate(config, str(tmp_path / "run"))
  with pytest.raises(ValueError, match=r"method must be one of \('source_only'"):
    digits_da.get_config("method=mmd")
