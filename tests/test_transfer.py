"""Transfer learning: restoring a pretrained checkpoint and fitting a new task by its mixture
weights (paper §4.3, App. C Eq. 1)."""
import json
import os
import re
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from compmod_jax import experiments
from compmod_jax.analysis import tables
from compmod_jax.finetune import init_from, pretrained, transfer
from compmod_jax.methods import registry
from compmod_jax.models import network_spec, templates
from compmod_jax.models.network import CompositionalIsometricNet
from compmod_jax.models.network_spec import NetworkSpec
from compmod_jax.train import context, loop, optim, steps
from configs import digits_transfer, transfer_table9
from helpers import REPO, mock_datasets, subprocess_env

SOURCES = ("mnist", "mnist_blur")
NEW = "uci_digits"


# --- strict loading ---------------------------------------------------------------------------

def tiny_spec(tasks, **fields):
  fields = {**experiments.SETUPS["mixture_patches"], **fields}
  return NetworkSpec(tasks=tuple((t, 10) for t in tasks), input_channels=1, num_layers=3,
                     num_templates=2, depth_multiplier=0.2, patch_size=4, **fields)


def host_variables(spec, seed=0):
  variables = CompositionalIsometricNet(spec).init(jax.random.key(seed), jnp.zeros((1, 8, 8, 1)))
  return jax.device_get(variables)


def flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def unflat(tree):
  return traverse_util.unflatten_dict(tree, sep="/")


MISMATCHES = {
    "only_in_checkpoint": (
        lambda old: unflat({**flat(old), "params/extra/kernel": np.zeros((3, 3))}),
        r"params/extra/kernel \(3, 3\) is in the checkpoint but not in the model"),
    "only_in_model": (
        lambda old: unflat({k: v for k, v in flat(old).items()
                            if k != "params/output_adapter/dense_bias"}),
        r"params/output_adapter/dense_bias \(256,\) is in the model but not in the checkpoint"),
    "other_shape": (
        lambda old: unflat({**flat(old), "params/templates/expand_kernel":
                            np.zeros((2, 8, 16))}),
        r"params/templates/expand_kernel has shape \(2, 8, 16\) in the checkpoint and "
        r"\(2, 8, 48\) in the model"),
    "other_shape_beyond_the_task_axis": (
        lambda old: unflat({**flat(old), "params/mixture_logits": np.zeros((2, 5, 2))}),
        r"params/mixture_logits has shape \(2, 5, 2\) in the checkpoint .* beyond the task axis"),
}


@pytest.mark.parametrize("kind", sorted(MISMATCHES))
def test_strict_loading_refuses_each_mismatch_naming_it_and_dont_load_lets_it_through(kind):
  spec = tiny_spec(SOURCES + (NEW,))
  fresh = host_variables(spec, seed=1)
  old = host_variables(tiny_spec(SOURCES), seed=2)
  change, message = MISMATCHES[kind]
  changed = change(old)
  with pytest.raises(pretrained.PretrainedCheckpointError, match=message):
    pretrained.merge(fresh, changed, spec, list(SOURCES))
  path = message.split(" ")[0].replace("\\", "")
  merged, report = pretrained.merge(fresh, changed, spec, list(SOURCES),
                                    dont_load=(f"^{path}$",))
  if path in flat(fresh):  # kept fresh, as the rule asks
    np.testing.assert_array_equal(flat(merged)[path], flat(fresh)[path])
  assert path not in report.loaded
  # Everything the rule does not name is still loaded.
  np.testing.assert_array_equal(flat(merged)["params/templates/project_kernel"],
                                flat(old)["params/templates/project_kernel"])


def test_a_dont_load_rule_that_matches_nothing_is_an_error():
  spec = tiny_spec(SOURCES + (NEW,))
  with pytest.raises(pretrained.PretrainedCheckpointError,
                     match=r"dont_load rule\(s\) \['output_adaptor'\] match no variable"):
    pretrained.merge(host_variables(spec), host_variables(tiny_spec(SOURCES)), spec,
                     list(SOURCES), dont_load=("output_adaptor",))


def test_task_rows_and_heads_are_loaded_by_task_name_and_new_ones_stay_fresh():
  spec = tiny_spec(("a_new",) + SOURCES)  # the new task sorts first: rows move by name
  fresh, old = host_variables(spec, seed=1), host_variables(tiny_spec(SOURCES), seed=2)
  merged, report = pretrained.merge(fresh, old, spec, list(SOURCES))
  for path in ("params/mixture_logits", "params/block_bn/expand/scale",
               "batch_stats/block_bn/project/mean"):
    np.testing.assert_array_equal(flat(merged)[path][1:], flat(old)[path])
    np.testing.assert_array_equal(flat(merged)[path][0], flat(fresh)[path][0])
    assert path in report.new
  np.testing.assert_array_equal(merged["params"]["heads"]["mnist_blur"]["kernel"],
                                old["params"]["heads"]["mnist_blur"]["kernel"])
  np.testing.assert_array_equal(merged["params"]["heads"]["a_new"]["kernel"],
                                fresh["params"]["heads"]["a_new"]["kernel"])
  assert "params/templates/expand_kernel" in report.loaded


# --- initialising the new task's xi (Eq. 1) ---------------------------------------------------

def test_a_shared_input_adapter_loads_into_every_row_of_a_per_task_one_and_rows_stay_apart():
  spec = tiny_spec(SOURCES + (NEW,), input_adapter="per_task")
  old = host_variables(tiny_spec(SOURCES), seed=2)
  merged, report = pretrained.merge(host_variables(spec, seed=1), old, spec, list(SOURCES))
  for name in ("kernel", "bias"):
    path = f"params/input_adapter/{name}"
    assert flat(merged)[path].shape == (3,) + flat(old)[path].shape
    for row in range(3):
      np.testing.assert_array_equal(flat(merged)[path][row], flat(old)[path])
    assert path in report.new  # the new task's row is new (a copy of the shared adapter)
  # Each task reads its own row: moving the new task's row changes only its features.
  model, images = CompositionalIsometricNet(spec), jnp.ones((2, 8, 8, 1))
  features = lambda variables: {task: model.apply(variables, images, task=task,
                                                  method=model.body_features)
                                for task in SOURCES + (NEW,)}
  before = features(merged)
  merged["params"]["input_adapter"]["bias"][spec.task_index(NEW)] += 1.0
  after = features(merged)
  for task in SOURCES:
    np.testing.assert_array_equal(after[task], before[task])
  assert not np.allclose(after[NEW], before[NEW])


def test_accuracy_coefficients_are_proportional_to_accuracy_and_sum_to_one():
  c = transfer.accuracy_coefficients({"a": 0.2, "b": 0.6, "c": 0.2}, ["a", "b", "c"])
  np.testing.assert_allclose(c, [0.2, 0.6, 0.2], rtol=1e-12)
  c = transfer.accuracy_coefficients({"a": 0.3, "b": 0.9}, ["a", "b"])
  np.testing.assert_allclose(c, [0.25, 0.75], rtol=1e-12)
  assert c.sum() == pytest.approx(1.0, abs=1e-12)


def test_new_task_is_eq1_of_the_sources_softmax_weights_and_copies_exactly():
  spec = tiny_spec(("a", "b", "new"))
  variables = host_variables(spec, seed=3)
  c = jnp.array([0.3, 0.7])
  built = flat(transfer.build_task(variables, spec, "new", ["a", "b"], coefficients=c))
  logits = variables["params"]["mixture_logits"]
  expected_xi = 0.3 * jax.nn.softmax(logits[0]) + 0.7 * jax.nn.softmax(logits[1])
  np.testing.assert_allclose(jax.nn.softmax(built["params/mixture_logits"][2]), expected_xi,
                             rtol=1e-6)
  head = variables["params"]["heads"]
  np.testing.assert_allclose(built["params/heads/new/kernel"],
                             0.3 * head["a"]["kernel"] + 0.7 * head["b"]["kernel"], rtol=1e-6,
                             atol=1e-8)
  np.testing.assert_array_equal(built["params/mixture_logits"][:2], logits[:2])
  copied = flat(transfer.build_task(variables, spec, "new", ["a", "b"], copy_source="b"))
  for path, value in copied.items():
    if path == "params/mixture_logits" or path.startswith(("params/block_bn", "batch_stats")):
      np.testing.assert_array_equal(value[2], value[1], err_msg=path)
  np.testing.assert_array_equal(copied["params/heads/new/bias"], head["b"]["bias"])


def test_learned_interpolation_trains_only_the_coefficients_toward_the_right_source():
  """Labels are what source "good" predicts; source "bad" has its head's classes permuted.
  Learning c (the only thing learn_coefficients optimises and returns) must move it to
  "good", and the new task's variables are then Eq. 1 of the sources by that c."""
  spec = tiny_spec(("bad", "good", "new"), dropout_rate=0.0)
  model = CompositionalIsometricNet(spec)
  variables = host_variables(spec, seed=4)
  heads = variables["params"]["heads"]
  heads["bad"] = {k: np.roll(v, 3, axis=-1) for k, v in heads["good"].items()}
  images = jax.random.uniform(jax.random.key(5), (64, 8, 8, 1))
  labels = jnp.argmax(model.apply(variables, images, task="good"), -1)
  batch = {"image": images, "label": labels, "mask": jnp.ones(64)}
  c, losses = transfer.learn_coefficients(model, variables, "new", ["bad", "good"],
                                          iter([batch] * 60), steps=60, learning_rate=0.1)
  assert c.shape == (2,) and c.sum() == pytest.approx(1.0, abs=1e-6)
  assert c[1] > 0.9, c
  assert losses[-1] < losses[0]
  # The learned loss is the loss of the task built by c: rebuilding it gives the last loss.
  built = transfer.build_task(variables, spec, "new", ["bad", "good"], coefficients=jnp.asarray(c))
  final = optax.softmax_cross_entropy_with_integer_labels(
      model.apply(built, images, task="new"), labels).mean()
  assert abs(float(final) - losses[-1]) < 0.1 * (losses[0] - losses[-1])


def test_precise_bn_statistics_are_the_mean_of_the_batches_statistics_and_read_no_label():
  """AdaBN / precise BN: the new task's moving statistics become the plain mean of its batches'
  statistics (computed here one batch at a time), every other row and every parameter is left
  as it was, and the batches carry no label, so reading one would fail."""
  spec = tiny_spec(SOURCES + (NEW,))
  model = CompositionalIsometricNet(spec)
  variables = host_variables(spec, seed=6)
  # Batches of very different scales, so a sum, the last batch or a moving average are far off.
  batches = [{"image": np.asarray(jax.random.uniform(jax.random.key(i), (8, 8, 8, 1))) * (i + 1)}
             for i in range(3)]
  ctx = types.SimpleNamespace(model=model, replicated=lambda tree: tree,
                              train_streams={NEW: batches}, global_batch=lambda batch: batch)
  estimated = transfer.precise_bn_statistics(ctx, variables, [NEW], num_batches=3)
  per_batch = [model.apply(variables, batch["image"], task=NEW, method=model.batch_statistics)
               for batch in batches]
  expected = jax.tree.map(lambda *stats: np.mean(np.stack(stats), axis=0), *per_batch)
  rows = {task: spec.task_index(task) for task in SOURCES + (NEW,)}
  jax.tree.map(lambda new, mean: np.testing.assert_allclose(new[rows[NEW]], mean, rtol=2e-6,
                                                             atol=1e-7),
               estimated["batch_stats"]["block_bn"], expected)
  others = [rows[task] for task in SOURCES]
  jax.tree.map(lambda new, old: np.testing.assert_array_equal(new[others], old[others]),
               estimated["batch_stats"]["block_bn"], variables["batch_stats"]["block_bn"])
  jax.tree.map(np.testing.assert_array_equal, estimated["params"], variables["params"])


def test_strategies_that_evaluate_source_heads_are_refused_for_another_label_set():
  transfer.check_heads_fit("source:a", "parity", 2, {"a": 10, "b": 10})  # xi, BN only: fine
  transfer.check_heads_fit("random", "parity", 2, {"a": 10})
  for xi_init in transfer.NEEDS_SOURCE_HEADS:
    with pytest.raises(ValueError, match=r"evaluates the source tasks' heads on task 'parity' "
                                         r"\(2 classes\), but the sources \{'a': 10\}"):
      transfer.check_heads_fit(xi_init, "parity", 2, {"a": 10, "b": 2})


# --- trainable sets ---------------------------------------------------------------------------

@pytest.mark.parametrize("preset, groups", [
    ("head", {"heads"}), ("head_bn", {"heads", "block_bn"}),
    ("xi_head_bn", {"heads", "block_bn", "mixture_logits"}),
    ("all", {"heads", "block_bn", "mixture_logits", "templates", "input_adapter",
             "output_adapter"})])
def test_trainable_presets_train_their_groups_and_only_the_new_tasks_rows(preset, groups):
  spec = tiny_spec(SOURCES + (NEW,))
  config = experiments.base_config()
  config.tasks = {NEW: experiments.task("embedded_digits/uci_digits")}
  config.trainable = preset
  params = host_variables(spec)["params"]
  mask = flat(optim.trainable_mask(params, config, spec, registry.get("supervised")))
  trained = {path.split("/")[0] for path, m in mask.items() if np.any(m)}
  assert trained == groups
  for path, m in mask.items():
    if path.startswith("heads/"):
      assert bool(m) == (path.split("/")[1] == NEW and "heads" in groups), path
    elif path == "mixture_logits" or path.startswith("block_bn/"):
      rows_trained = np.broadcast_to(m, flat(params)[path].shape)[:, 0, 0].tolist()
      assert rows_trained == [False, False, path.split("/")[0] in groups], path
  added = transfer.added_parameters(spec, params, NEW)
  assert added == {"mixture_logits": 3 * 2, "heads": 256 * 10 + 10,
                   "block_bn": 3 * sum(2 * c for c in (48, 48, 8))}


def kept_tasks_change(mask, params, spec, kept):
  """Whether `mask` lets any entry train that a task in `kept` reads: a shared array, or the
  task's own row or head."""
  for path, leaf_mask in flat(mask).items():
    trains = np.broadcast_to(leaf_mask, flat(params)[path].shape)
    owners = network_spec.task_owners(spec, "params/" + path)
    if owners is None and trains.any():
      return True
    if owners is not None and any(trains[i].any() if len(owners) > 1 else trains.any()
                                  for i, owner in enumerate(owners) if owner in kept):
      return True
  return False


# With the shared input adapter of digits_transfer.py. These models route by task: "router"
# trains nothing in them (no router to train), and "xi_router" trains their xi alone.
SETUP_PRESETS_KEEPING_SOURCES = {
    "mixture_patches": {"xi", "xi_bn", "head", "head_bn", "xi_head_bn", "router", "xi_router"},
    "baseline_patches": {"xi", "xi_bn", "head", "head_bn", "xi_head_bn", "router", "xi_router"},
    # BN scale and bias are mixed from the shared templates
    "mixture": {"xi", "head", "router", "xi_router"},
    "simple_baseline": {"xi", "head", "router", "xi_router"},  # BN shared by all tasks
}


def trains_something(params, config, spec, method, preset):
  """Whether `preset` trains any parameter of this model (a plain network has no xi, a model
  routed by task no router)."""
  candidate = config.copy_and_resolve_references()
  candidate.trainable = preset
  return optim.count_trainable(optim.trainable_mask(params, candidate, spec, method), params) > 0


@pytest.mark.parametrize("setup", sorted(experiments.SETUPS))
def test_every_preset_keeps_the_checkpoints_other_tasks_or_is_refused(setup):
  """A preset either leaves every entry a kept task reads frozen (the step then keeps their
  predictions bit-identical: test_training's frozen-rows test), or kept_tasks_problem refuses
  it, naming the presets that would keep them."""
  spec = tiny_spec(SOURCES + (NEW,), **experiments.SETUPS[setup])
  params = host_variables(spec)["params"]
  config = digits_transfer.get_config(f"setup={setup},tiny=1")
  method = registry.get("supervised")
  for preset in optim.TRAINABLE_PRESETS:
    config.trainable = preset
    mask = optim.trainable_mask(params, config, spec, method)
    problem = init_from.kept_tasks_problem(mask, params, config, spec, method, SOURCES)
    changes = kept_tasks_change(mask, params, spec, SOURCES)
    assert (problem is not None) == changes, (setup, preset, problem)
    assert (not changes) == (preset in SETUP_PRESETS_KEEPING_SOURCES[setup]), (setup, preset)
    if problem:  # the safe presets that train something in this model
      safe = [name for name in optim.TRAINABLE_PRESETS
              if name in SETUP_PRESETS_KEEPING_SOURCES[setup] and trains_something(
                  params, config, spec, method, name)]
      assert problem.endswith(f"the predictions of the checkpoint's tasks {sorted(SOURCES)} "
                              f"would change. Presets that keep them: {safe}."), problem
  mask = optim.trainable_mask(params, config, spec, method)
  assert init_from.kept_tasks_problem(mask, params, config, spec, method, ()) is None  # none kept


def test_the_eval_steps_prediction_entropy_reads_no_label():
  spec = tiny_spec(SOURCES)
  params = host_variables(spec)["params"]
  model = CompositionalIsometricNet(spec)
  state = steps.TrainState(step=0, params=None, opt_state=None, ema_params=params,
                           batch_stats=host_variables(spec)["batch_stats"])
  images = jax.random.uniform(jax.random.key(1), (6, 8, 8, 1))
  sums = [steps.eval_step(state, {"image": images, "label": labels, "mask": jnp.ones(6)},
                          model=model, task="mnist")
          for labels in (jnp.arange(6), jnp.zeros(6, jnp.int32))]
  assert float(sums[0]["entropy_sum"]) == float(sums[1]["entropy_sum"])
  logits = model.apply({"params": params, "batch_stats": state.batch_stats}, images,
                       task="mnist", train=False)
  probabilities = np.asarray(jax.nn.softmax(logits.astype(jnp.float64)))
  entropy = -np.sum(probabilities * np.log(probabilities))
  assert float(sums[0]["entropy_sum"]) == pytest.approx(entropy, rel=1e-5)


def test_min_entropy_source_copies_the_most_confident_source_without_reading_labels(
    embedded_dir, source_workdir, tmp_path, caplog):
  caplog.set_level("WARNING", logger="absl")
  results = loop.train_and_evaluate(
      tiny_transfer(embedded_dir, source_workdir, xi_init="min_entropy_source",
                    trainable="head", total_steps=0), str(tmp_path / "run"))
  info = results["init_from"]["new_tasks"][NEW]
  entropies = info["source_entropy_on_train"]
  assert set(entropies) == set(SOURCES) and all(0 < e <= np.log(10) for e in entropies.values())
  chosen = min(SOURCES, key=lambda s: entropies[s])
  assert info["coefficients"] == {s: float(s == chosen) for s in SOURCES}
  assert info["source_accuracy_on_train"] == {}
  assert not [r for r in caplog.records if "uses the labels" in r.getMessage()]


def test_a_preset_that_would_change_the_checkpoints_tasks_is_refused_before_evaluating(
    embedded_dir, source_workdir, tmp_path, monkeypatch):
  """The session's model has per-task BN but one input adapter all tasks share."""
  def evaluate(*args):
    raise AssertionError("evaluated before refusing")
  monkeypatch.setattr(context.RunContext, "evaluate", evaluate)
  config = tiny_transfer(embedded_dir, source_workdir, xi_init="source:mnist",
                         trainable="xi_input_adapter")
  with pytest.raises(ValueError, match=r"config\.trainable='xi_input_adapter' trains "
                                       r"input_adapter/.*which every task of this model shares "
                                       r"\(config\.model\.batch_norm='per_task', "
                                       r"input_adapter='shared'\): the predictions of the "
                                       r"checkpoint's tasks \['mnist', 'mnist_blur'\] would "
                                       r"change\. Presets that keep them: \['xi', "
                                       r"'xi_router', 'xi_bn', 'head', 'head_bn', "
                                       r"'xi_head_bn'\]"):
    loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists() or not os.listdir(
      tmp_path / "run" / "checkpoints")


# --- end to end on the embedded digits --------------------------------------------------------

def tiny_transfer(data_dir, init_from, **overrides):
  config = digits_transfer.get_config("tiny=1")
  config.data.data_dir = str(data_dir)
  config.eval_batch_size = 200
  config.init_from = str(init_from)
  config.update(overrides)
  return config


def source_model(workdir):
  source = pretrained.load(workdir)
  spec = tiny_transfer_spec(source.tasks)
  return source, CompositionalIsometricNet(spec)


def tiny_transfer_spec(tasks):
  config = digits_transfer.get_config("tiny=1")
  return NetworkSpec.from_config(config.model, sorted(tasks.items()), 1)


def test_transfer_with_best_source_keeps_everything_frozen_and_source_outputs_bit_identical(
    embedded_dir, source_workdir, tmp_path):
  workdir = tmp_path / "transfer"
  results = loop.train_and_evaluate(
      tiny_transfer(embedded_dir, source_workdir, xi_init="best_source", trainable="head"),
      str(workdir))
  source, source_net = source_model(source_workdir)
  after, after_net = source_model(workdir)
  info = results["init_from"]["new_tasks"][NEW]
  best = max(SOURCES, key=lambda s: info["source_accuracy_on_train"][s])
  assert info["coefficients"] == {s: float(s == best) for s in SOURCES}
  old, new = flat(source.variables), flat(after.variables)
  row = {task: index for index, (task, _) in enumerate(after_net.spec.tasks)}
  for path, value in new.items():
    if path.startswith(f"params/heads/{NEW}/"):  # trained, from the best source's head
      assert not np.array_equal(value, old[path.replace(NEW, best)]), path
    elif len(network_spec.task_owners(after_net.spec, path) or ()) > 1:  # one row per task
      np.testing.assert_array_equal(value[[row[s] for s in SOURCES]], old[path], path)
      # head-only training: the new task's xi, BN and statistics are the best source's copy
      if path.startswith("params/"):
        np.testing.assert_array_equal(value[row[NEW]], old[path][SOURCES.index(best)], path)
    else:
      np.testing.assert_array_equal(value, old[path], path)
  # The source tasks' predictions did not move (bit-identical), in a model one task larger.
  images = jax.random.uniform(jax.random.key(0), (16, 28, 28, 1))
  for task in SOURCES:
    np.testing.assert_array_equal(after_net.apply(after.variables, images, task=task),
                                  source_net.apply(source.variables, images, task=task))
  task_results = json.loads((workdir / "results.json").read_text())["tasks"][NEW]
  assert set(task_results) >= {"accuracy_before_finetune", "test_accuracy", "added_parameters"}
  assert task_results["added_parameters"] == sum(
      transfer.added_parameters(after_net.spec, after.variables["params"], NEW).values())
  [row] = tables.transfer_rows([workdir])
  assert row[1:] == ("best_source", "head", task_results["accuracy_before_finetune"],
                     task_results["test_accuracy"], task_results["added_parameters"],
                     256 * 10 + 10)  # head only: the new task's head is all that trains


def test_accuracy_init_interpolates_by_the_logged_accuracies_and_resumes_its_own_workdir(
    embedded_dir, source_workdir, tmp_path, monkeypatch):
  moved_source = tmp_path / "pretrained"
  shutil.copytree(source_workdir, moved_source)
  config = tiny_transfer(embedded_dir, moved_source, xi_init="accuracy", trainable="head")
  workdir = tmp_path / "transfer"
  with monkeypatch.context() as patch:
    patch.setattr(loop, "stop_requested", lambda watcher, step: step == 2)
    loop.train_and_evaluate(config, str(workdir))
  shutil.rmtree(moved_source)  # the resumed run must not need it any more
  results = loop.train_and_evaluate(config, str(workdir))
  info = results["init_from"]["new_tasks"][NEW]
  accuracies = np.array([info["source_accuracy_on_train"][s] for s in SOURCES])
  coefficients = np.array([info["coefficients"][s] for s in SOURCES])
  np.testing.assert_allclose(coefficients, accuracies / accuracies.sum(), rtol=1e-12)
  assert "accuracy_before_finetune" in results["tasks"][NEW]
  after, after_net = source_model(workdir)
  source, _ = source_model(source_workdir)
  xi = jax.nn.softmax(after.variables["params"]["mixture_logits"], -1)
  source_xi = jax.nn.softmax(source.variables["params"]["mixture_logits"], -1)
  np.testing.assert_allclose(xi[after_net.spec.task_index(NEW)],
                             np.tensordot(coefficients, source_xi, 1), rtol=1e-5)


@pytest.mark.slow
def test_a_checkpoint_from_eight_devices_restores_on_one(embedded_dir, source_workdir,
                                                         tmp_path):
  env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=1")
  workdir = tmp_path / "one_device"
  subprocess.run(
      [sys.executable, "-m", "compmod_jax.main", "--config=configs/digits_transfer.py:tiny=1",
       f"--config.init_from={source_workdir}", f"--config.data.data_dir={embedded_dir}",
       "--config.eval_batch_size=200", f"--workdir={workdir}"],
      cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
  results = json.loads((workdir / "results.json").read_text())
  assert results["step"] == 4 and "accuracy_before_finetune" in results["tasks"][NEW]
  source, _ = source_model(source_workdir)
  after, _ = source_model(workdir)
  np.testing.assert_array_equal(after.variables["params"]["templates"]["expand_kernel"],
                                source.variables["params"]["templates"]["expand_kernel"])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax, failed read
def test_a_corrupt_newest_pretrained_step_falls_back_to_the_previous_one(source_workdir,
                                                                          tmp_path, caplog):
  workdir = tmp_path / "pretrained"
  shutil.copytree(source_workdir, workdir)
  state_files = [os.path.join(root, name) for root, _, names
                 in os.walk(workdir / "checkpoints" / "60" / "state") for name in names]
  largest = max(state_files, key=os.path.getsize)
  with open(largest, "r+b") as file:
    file.truncate(os.path.getsize(largest) // 2)
  source = pretrained.load(workdir)
  assert source.step == 30
  assert re.search(r"Checkpoint step 60 at .*checkpoints/60 is corrupt: its state cannot be "
                   r"read", caplog.text)
  assert os.path.exists(workdir / "checkpoints" / "60")  # someone else's: never moved


def test_bad_transfer_configs_fail_before_training_with_clear_errors(embedded_dir,
                                                                     source_workdir, tmp_path):
  cases = [
      (dict(init_from=str(tmp_path / "nowhere")), pretrained.PretrainedCheckpointError,
       r"neither a workdir with a checkpoints/ directory nor a step directory"),
      (dict(xi_init="source:svhn"), ValueError,
       r"xi_init='source:svhn' names no task of the pretrained checkpoint; its tasks are "
       r"\['mnist', 'mnist_blur'\]"),
      (dict(xi_init="closest"), ValueError, r"config.xi_init must be 'source:<task>' or one of"),
      (dict(init_from="", trainable="head"), ValueError,
       r"config.trainable='head' freezes the rest of a freshly initialised model"),
  ]
  for overrides, error, message in cases:
    with pytest.raises(error, match=message):
      init_from = overrides.pop("init_from", source_workdir)
      loop.train_and_evaluate(tiny_transfer(embedded_dir, init_from, **overrides),
                              str(tmp_path / "run"))
  config = tiny_transfer(embedded_dir, source_workdir)
  config.model.num_layers = 4
  with pytest.raises(pretrained.PretrainedCheckpointError,
                     match=r"params/mixture_logits has shape \(2, 3, 2\) in the checkpoint"):
    loop.train_and_evaluate(config, str(tmp_path / "run_other_depth"))


@pytest.mark.parametrize("xi_init", ["random", "diagonal"])
def test_random_and_diagonal_start_a_fresh_xi_with_the_sources_mean_head_and_bn(
    embedded_dir, source_workdir, tmp_path, xi_init):
  config = tiny_transfer(embedded_dir, source_workdir, xi_init=xi_init, trainable="head")
  results = loop.train_and_evaluate(config, str(tmp_path))
  info = results["init_from"]["new_tasks"][NEW]
  assert info["coefficients"] == {s: 0.5 for s in SOURCES}
  source, _ = source_model(source_workdir)
  after, after_net = source_model(tmp_path)
  spec = after_net.spec
  if xi_init == "random":  # the new model's own initial row (config.model.mixture_init)
    fresh = after_net.init(jax.random.key(config.seed), jnp.zeros((1, 28, 28, 1)))
    expected_logits = fresh["params"]["mixture_logits"][spec.task_index(NEW)]
  else:
    expected_logits = transfer.fresh_xi_logits("diagonal", spec, None, config.seed)
    assert np.argmax(expected_logits, -1).tolist() == list(
        templates.build_signature("sequential", spec.num_layers, spec.num_templates, (), 0))
  # trainable=head: xi, BN and statistics are exactly what the strategy built.
  logits = after.variables["params"]["mixture_logits"][spec.task_index(NEW)]
  np.testing.assert_array_equal(logits, expected_logits)
  np.testing.assert_allclose(info["initial_xi"], jax.nn.softmax(expected_logits, -1),
                             rtol=1e-6)
  old_bn = source.variables["params"]["block_bn"]["expand"]["scale"]
  np.testing.assert_allclose(after.variables["params"]["block_bn"]["expand"]["scale"][
      spec.task_index(NEW)], old_bn.mean(0), rtol=1e-6)


@pytest.mark.slow
def test_table9_config_interpolates_the_svhn_digits_sources_under_mock_data(svhn_digits_run,
                                                                            tmp_path):
  """transfer_table9.py:data=digits (tiny), xi_init=learned, from the pretraining that
  digits_svhn_da.py ran (the same recipe), the target under mock data with its real splits."""
  da_workdir, da_config = svhn_digits_run
  config = transfer_table9.get_config("data=digits,xi_init=learned,tiny=1")
  assert config.pretrain.model.to_dict() == da_config.pretrain.model.to_dict()
  config.init_from = str(da_workdir / "pretrained")
  config.data.data_dir = str(tmp_path / "tfds")
  with mock_datasets([f"embedded_digits/{NEW}"], config.data.data_dir, 16):
    results = loop.train_and_evaluate(config, str(tmp_path / "work"))
  info = results["init_from"]["new_tasks"][NEW]
  sources = tuple(da_config.pretrain.tasks)
  assert set(info["coefficients"]) == set(sources)
  assert sum(info["coefficients"].values()) == pytest.approx(1.0, abs=1e-6)
  assert results["step"] == config.total_steps == 4
  assert results["tasks"][NEW]["test_examples"] == 16
  assert {"accuracy_before_finetune", "test_accuracy"} <= set(results["tasks"][NEW])
