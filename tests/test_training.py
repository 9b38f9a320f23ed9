"""The training loop, optimizer groups, regularisers and checkpoints (issue: training)."""
import functools
import importlib
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compmod_jax import experiments
from compmod_jax.data import datasets
from compmod_jax.methods import registry, supervised
from compmod_jax.models.network import CompositionalIsometricNet
from compmod_jax.models.network_spec import NetworkSpec
from compmod_jax.train import context, loop, optim, regularizers, start, steps
from compmod_jax.workdir import RunStart
from configs import cifar100_signatures, imagenet_table1
from helpers import built_once_per_run, mock_datasets, read_checkpoint, run_main, tiny_digits


def final_params(workdir):
  """The last checkpoint's step and train state as numpy trees."""
  step, saved = read_checkpoint(workdir)
  return step, saved["state"]


@pytest.fixture(scope="module")
def finished_run(embedded_dir, tmp_path_factory):
  """One uninterrupted tiny run (configs/digits.py:tiny, 60 steps, a checkpoint at 30 and 60)
  in a workdir given as a relative path, as in the README's command; built once per test run
  and shared by the tests that inspect its workdir."""
  config = tiny_digits(embedded_dir)

  def train(workdir):
    here = os.getcwd()
    os.chdir(workdir.parent)
    try:
      loop.train_and_evaluate(config, workdir.name)
    finally:
      os.chdir(here)

  workdir = built_once_per_run(tmp_path_factory, "finished_tiny_digits", train)
  return config, workdir, json.loads((workdir / "results.json").read_text())


def test_tiny_run_learns_and_writes_what_users_see(finished_run):
  _, workdir, results = finished_run
  accuracy = results["tasks"]["mnist"]["test_accuracy"]
  assert accuracy > 0.4, f"a tiny run should beat chance (0.1) clearly, got {accuracy}"
  on_disk = json.loads((workdir / "results.json").read_text())
  assert on_disk["step"] == 60 and on_disk["wall_time_s"] > 0
  assert on_disk["tasks"]["mnist"]["test_accuracy"] == accuracy
  assert on_disk["tasks"]["mnist"]["test_examples"] == 1000
  assert (workdir / "mixture_weights.png").stat().st_size > 1000
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"]["num_layers"] == 4


def test_rerunning_a_finished_run_only_reports(finished_run, monkeypatch):
  config, workdir, results = finished_run
  checkpoints = sorted(os.listdir(workdir / "checkpoints"))

  def no_training_or_evaluation(*args, **kwargs):
    raise AssertionError("a finished run trained or evaluated again")
  monkeypatch.setattr(steps, "jit_train_step", no_training_or_evaluation)
  monkeypatch.setattr(context.RunContext, "evaluate", no_training_or_evaluation)
  again = loop.train_and_evaluate(config, str(workdir))
  assert again == json.loads((workdir / "results.json").read_text())
  assert again["tasks"] == results["tasks"] and again["step"] == 60
  assert sorted(os.listdir(workdir / "checkpoints")) == checkpoints


def test_checkpoint_with_another_config_is_refused(finished_run):
  config, workdir, _ = finished_run
  changed = tiny_digits(config.data.data_dir, **{"model.num_templates": 3})
  with pytest.raises(ValueError, match=r"model\.num_templates: checkpoint has 2, new config "
                                       r"has 3"):
    loop.train_and_evaluate(changed, str(workdir))


def test_every_parameter_is_in_exactly_one_group():
  for batch_norm in ("per_layer", "per_task", "mixed"):
    spec = NetworkSpec(tasks=(("a", 10), ("b", 3)), input_channels=1, num_layers=3,
                       num_templates=2, batch_norm=batch_norm)
    params = jax.eval_shape(CompositionalIsometricNet(spec).init, jax.random.key(0),
                            jnp.zeros((1, 8, 8, 1)))["params"]
    labels = optim.group_labels(params)
    flat = dict(zip(jax.tree.leaves(optim.path_names(params)), jax.tree.leaves(labels)))
    # Each pattern a path matches must be its group's (first-match rule), and every group
    # that exists in this model is used.
    assert set(flat.values()) <= set(dict(optim.PARAMETER_GROUPS))
    assert flat["mixture_logits"] == "mixture_logits"
    assert flat["templates/expand_kernel"] == "templates"
    assert flat["heads/b/kernel"] == "heads"
    assert flat["input_adapter/kernel"] == "input_adapter"
    assert flat["output_adapter/dense_bias"] == "output_adapter"
    bn_path = ("templates/bn/expand/scale" if batch_norm == "mixed"
               else "block_bn/expand/scale")
    assert flat[bn_path] == "batch_norm"
  with pytest.raises(ValueError, match="'extra/kernel' matches no optimizer group"):
    optim.group_labels({"extra": {"kernel": jnp.zeros(2)}, "heads": {"a": jnp.zeros(1)}})


def test_frozen_groups_get_exactly_zero_updates():
  config = experiments.base_config()
  config.optimizer.lr_multipliers.templates = 0.0
  config.optimizer.lr_multipliers.heads = 0.5
  params = {"templates": {"expand_kernel": jnp.ones((2, 3))},
            "heads": {"a": {"kernel": jnp.ones((3, 2))}},
            "mixture_logits": jnp.zeros((1, 2, 2)), "block_bn": {"s": jnp.ones(2)},
            "input_adapter": {"bias": jnp.zeros(3)}}
  tx, _ = optim.make_optimizer(config, params)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(params["templates"]["expand_kernel"], jnp.ones((2, 3)))
  assert bool(jnp.all(params["heads"]["a"]["kernel"] < 1.0))
  with pytest.raises(ValueError, match="unknown group"):
    config.optimizer.lr_multipliers["template"] = 1.0
    optim.make_optimizer(config, params)


def test_clustering_regulariser_is_smallest_at_one_hot_and_pulls_templates_to_the_mix():
  bank = {"w": jax.random.normal(jax.random.key(0), (3, 5, 4)),
          "b": jax.random.normal(jax.random.key(1), (3, 4))}
  one_hot = jnp.array([[[0.0, -1e4, -1e4]]])
  for g in regularizers.CLUSTERING_G:
    at_one_hot = float(regularizers.clustering(one_hot, bank, g))
    for logits in (jnp.zeros((1, 1, 3)), jnp.array([[[2.0, 0.0, -1.0]]]),
                   jax.random.normal(jax.random.key(2), (1, 1, 3))):
      assert float(regularizers.clustering(logits, bank, g)) > at_one_hot + 1e-3
    assert abs(at_one_hot) < 1e-5
  logits = jnp.array([[[1.0, 0.3, -0.5]]])
  xi = jax.nn.softmax(logits[0, 0])
  grads = jax.grad(lambda b: regularizers.clustering(logits, b, "square"))(bank)
  for name, templates_k in bank.items():
    mixed = jnp.tensordot(xi, templates_k, axes=1)
    # d/d theta_k of sum_j xi_j ||theta_bar - theta_j||^2 = 2 xi_k (theta_k - theta_bar):
    # a gradient step moves template k towards theta_bar, proportionally to xi_k.
    expected = 2 * xi.reshape((3,) + (1,) * (templates_k.ndim - 1)) * (templates_k - mixed)
    np.testing.assert_allclose(grads[name], expected, rtol=1e-4, atol=1e-5)


def test_entropy_regulariser_matches_definition():
  logits = jnp.array([[[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]]])
  xi = jax.nn.softmax(logits, -1)
  np.testing.assert_allclose(regularizers.mixture_entropy(logits),
                             -jnp.sum(xi * jnp.log(xi), -1), rtol=1e-6)
  np.testing.assert_allclose(regularizers.mixture_entropy(logits)[0, 1], np.log(3), rtol=1e-6)
  config = experiments.base_config()
  config.regularizers.entropy_weight = 0.1
  config.regularizers.clustering_weight = 0.01
  losses = regularizers.regularization_losses(
      {"mixture_logits": logits, "templates": {"w": jnp.ones((3, 2))}}, config)
  np.testing.assert_allclose(losses["entropy"], 0.1 * jnp.sum(-jnp.sum(xi * jnp.log(xi), -1)),
                             rtol=1e-6)
  assert set(losses) == {"entropy", "clustering"}


@pytest.mark.slow
def test_cifar100_signature_config_runs_under_mock_data(tmp_path):
  config = cifar100_signatures.get_config("K=2,L=4,signature=cyclic,tiny=1")
  config.data.data_dir = str(tmp_path / "tfds")
  with mock_datasets(("cifar100",), config.data.data_dir, 48):
    results = loop.train_and_evaluate(config, str(tmp_path / "work"))
  assert results["step"] == 6
  assert results["tasks"]["cifar100"]["test_examples"] == 48
  assert 0.0 <= results["tasks"]["cifar100"]["test_accuracy"] <= 1.0
  with pytest.raises(ValueError, match="takes"):
    cifar100_signatures.get_config("K=2,depth=3")


@pytest.mark.slow
def test_table1_config_runs_under_mock_data_on_imagenets_labelled_splits(tmp_path):
  config = imagenet_table1.get_config("K=8,L=32,tiny=1")
  assert config.model.signature == "progressive"
  assert imagenet_table1.get_config("K=8,L=8").model.signature == "plain"
  config.data.data_dir = str(tmp_path / "tfds")
  with mock_datasets(("imagenet2012",), config.data.data_dir, 16):
    results = loop.train_and_evaluate(config, str(tmp_path / "work"))
  # Evaluated on 'validation': imagenet2012's 'test' labels are -1 (the mock's too).
  assert results["step"] == 2
  assert results["tasks"]["imagenet2012"]["test_examples"] == 16


@pytest.mark.parametrize("argument, message", [
    ("K=abc", r"Config argument K='abc' must be an integer \(default 8\)\.$"),
    ("K=4;L=16", r"K='4;L=16' must be an integer .*separate arguments with ',' not ';'"),
    ("depth=3", r"Unknown config argument 'depth' .* takes K=<integer, default 8>, "
                r"L=<integer, default 32>, signature=<text, default 'progressive'>"),
    ("signature", r"Config argument 'signature' needs a value: signature=<text>"),
])
def test_a_bad_config_file_argument_is_one_line_naming_it_and_what_it_takes(argument,
                                                                             message):
  with pytest.raises(ValueError, match=message) as error:
    imagenet_table1.get_config(argument)
  assert "\n" not in str(error.value)


def test_a_bare_integer_argument_means_one():
  assert imagenet_table1.get_config("tiny").to_dict() == imagenet_table1.get_config(
      "tiny=1").to_dict()


def test_missing_dataset_fails_before_heavy_work_naming_it(tmp_path, no_heavy_work):
  config = tiny_digits(tmp_path / "empty")
  config.tasks.mnist.dataset = "cifar100"
  with pytest.raises(datasets.DatasetNotFoundError, match=r"cifar100.*empty"):
    loop.train_and_evaluate(config, str(tmp_path / "work"))


def test_an_override_of_a_field_the_config_lacks_names_it_and_what_is_there():
  from absl import flags
  from compmod_jax import cli
  if "config" not in flags.FLAGS:  # main and plan define it; a worker may have imported plan
    importlib.import_module("compmod_jax.main")
  config_file = "--config=configs/digits.py:tiny"
  assert cli.unknown_override(["main", config_file, "--config.optimizer.lr=0.1"]) == (
      "--config.optimizer.lr: config.optimizer has no field 'lr'; its fields are ['adam_b1', "
      "'adam_b2', 'decay_rate', 'decay_steps', 'eps', 'final_lr_fraction', 'grad_clip_norm', "
      "'learning_rate', 'lr_multipliers', 'momentum', 'name', 'nesterov', 'rmsprop_decay', "
      "'schedule', 'warmup_steps', 'weight_decay'].")
  assert cli.unknown_override(["main", config_file, "--config.modl.num_layers=3"]) == (
      "--config.modl.num_layers: config has no field 'modl'; did you mean config.model?")
  assert cli.unknown_override(["main", config_file, "--config.model.num_layers=3"]) is None


@pytest.mark.slow
def test_config_typo_is_an_error_naming_the_key(tmp_path):
  result = run_main("--config=configs/digits.py:tiny", f"--workdir={tmp_path}",
                    "--config.model.num_layerz=3")
  assert result.returncode != 0
  assert "num_layerz" in result.stderr
  assert not os.path.exists(tmp_path / "checkpoints")


def test_eight_devices_give_the_loss_of_one_device(embedded_dir):
  config = tiny_digits(embedded_dir)
  losses = {}
  for devices in (1, 8):
    config.mesh_shape = (devices,)
    mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:devices])
    streams = context.make_streams(config, train=True)
    model = start.model_for(config, {"mnist": 10})
    ctx = context.RunContext(config=config, workdir="", mesh=mesh, model=model,
                             method=registry.get("supervised"), train_streams=streams,
                             eval_streams={}, eval_steps={})
    state, optimization = start.create_train_state(ctx, jnp.zeros((1, 28, 28, 1)))
    step = start.train_step(ctx, state, optimization)
    iterator = iter(streams["mnist"])
    losses[devices] = []
    for _ in range(3):
      state, metrics = step(state, ctx.global_batch({"mnist": next(iterator)}))
      losses[devices].append(float(metrics["total_loss"]))
  np.testing.assert_allclose(losses[8], losses[1], rtol=2e-5)


def test_ema_follows_tf_warmup_and_evaluation_reads_only_the_ema_weights():
  """EMA (App. A.2): decay_t = min(decay, (1 + t) / (10 + t)) at step t; the eval step uses
  ema_params and ignores params."""
  ema, params = {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, -2.0])}
  for step, decay in ((0, 0.1), (5, 6 / 15), (10_000, 0.999)):
    expected = decay * ema["w"] + (1 - decay) * params["w"]
    np.testing.assert_allclose(optim.ema_update(ema, params, 0.999, step)["w"], expected,
                               rtol=1e-6)
  spec = NetworkSpec(tasks=(("a", 10),), input_channels=1, num_layers=2, num_templates=2,
                     patch_size=4, depth_multiplier=0.2)
  model = CompositionalIsometricNet(spec)
  images = jax.random.uniform(jax.random.key(0), (16, 8, 8, 1))
  a, b = (jax.jit(model.init)(jax.random.key(seed), images) for seed in (1, 2))
  examples = {"image": images, "label": jnp.arange(16) % 10, "mask": jnp.ones(16)}
  evaluate = jax.jit(lambda ema_variables, params: steps.eval_step(
      steps.TrainState(step=0, params=params, batch_stats=ema_variables["batch_stats"],
                       opt_state=None, ema_params=ema_variables["params"]), examples,
      model=model, task="a"))
  expected_loss = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(
      model.apply(a, images, task="a"), examples["label"]))
  np.testing.assert_allclose(evaluate(a, b["params"])["loss_sum"], expected_loss, rtol=1e-6)
  assert evaluate(a, b["params"]) == evaluate(a, a["params"])
  assert evaluate(b, a["params"])["loss_sum"] != evaluate(a, a["params"])["loss_sum"]


def test_weight_decay_shrinks_kernels_only():
  config = experiments.base_config()
  config.optimizer.update(name="sgd", momentum=0.0, schedule="constant", warmup_steps=0,
                          learning_rate=1.0, weight_decay=0.1)
  params = {"templates": {"expand_kernel": jnp.full((2, 3), 2.0), "se_reduce_bias": jnp.ones(3)},
            "block_bn": {"expand": {"scale": jnp.ones(3)}}, "mixture_logits": jnp.ones((1, 2, 2)),
            "heads": {"a": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}}
  tx, _ = optim.make_optimizer(config, params)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  new = optax.apply_updates(params, updates)
  # With zero gradients, SGD at rate 1 moves a decayed parameter by -0.1 x itself.
  np.testing.assert_allclose(new["templates"]["expand_kernel"], 1.8, rtol=1e-6)
  np.testing.assert_allclose(new["heads"]["a"]["kernel"], 0.9, rtol=1e-6)
  for path in (("templates", "se_reduce_bias"), ("block_bn", "expand", "scale"),
               ("mixture_logits",), ("heads", "a", "bias")):
    value = functools.reduce(lambda tree, key: tree[key], path, new)
    np.testing.assert_array_equal(value, functools.reduce(lambda t, k: t[k], path, params))


@pytest.mark.parametrize("schedule, after_warmup", [
    # steps after warmup s = 0, 45, 90 of 90 (total 100, warmup 10); base 0.1, final 0.01
    ("constant", (0.1, 0.1, 0.1)),
    ("linear", (0.1, 0.055, 0.01)),
    ("cosine", (0.1, 0.01 + 0.09 * 0.5, 0.01)),
    ("exponential", (0.1, 0.1 * 0.5 ** (45 / 30), 0.1 * 0.5 ** 3)),
])
def test_schedules_warm_up_linearly_then_follow_their_formula(schedule, after_warmup):
  config = experiments.base_config()
  config.total_steps = 100
  config.optimizer.update(schedule=schedule, learning_rate=0.1, warmup_steps=10,
                          final_lr_fraction=0.1, decay_steps=30, decay_rate=0.5)
  lr = optim.make_schedule(config)
  np.testing.assert_allclose([lr(0), lr(5)], [0.0, 0.05], rtol=1e-6)
  np.testing.assert_allclose([lr(10), lr(55), lr(100)], after_warmup, rtol=1e-5)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_each_optimizer_descends_a_quadratic(name):
  config = experiments.base_config()
  config.optimizer.update(name=name, schedule="constant", warmup_steps=0, learning_rate=0.05,
                          weight_decay=0.0)
  params = {"heads": {"a": {"bias": jnp.array([3.0, -2.0])}}}
  tx, _ = optim.make_optimizer(config, params)
  state = tx.init(params)
  loss = lambda p: jnp.sum(p["heads"]["a"]["bias"] ** 2)
  for _ in range(20):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  assert float(loss(params)) < 0.5 * 13.0


def test_rmsprop_is_tf1s_with_the_mean_square_starting_at_one():
  """The paper's optimizer (App. A.2) is TF1's RMSProp with the base config's settings:
  ms_t = rho ms_{t-1} + (1 - rho) g^2 from ms_0 = 1, mom_t = mu mom_{t-1} + lr g / sqrt(ms_t +
  eps), theta_t = theta_{t-1} - mom_t. Three steps against that formula in float64."""
  config = experiments.base_config()
  config.optimizer.update(schedule="constant", warmup_steps=0, learning_rate=0.1,
                          weight_decay=0.0)
  opt = config.optimizer
  assert (opt.name, opt.rmsprop_decay, opt.momentum, opt.eps) == ("rmsprop", 0.9, 0.9, 1e-3)
  params = {"heads": {"a": {"bias": jnp.array([3.0, -2.0, 0.5])}}}
  tx, _ = optim.make_optimizer(config, params)
  state = tx.init(params)
  theta, mean_square, momentum = np.array([3.0, -2.0, 0.5]), np.ones(3), np.zeros(3)
  for gradient in ([0.5, -4.0, 0.01], [0.2, 1.0, -0.03], [-0.7, 0.0, 2.0]):
    gradient = np.array(gradient)
    updates, state = tx.update({"heads": {"a": {"bias": jnp.asarray(gradient, jnp.float32)}}},
                               state, params)
    params = optax.apply_updates(params, updates)
    mean_square = 0.9 * mean_square + 0.1 * gradient ** 2
    momentum = 0.9 * momentum + 0.1 * gradient / np.sqrt(mean_square + 1e-3)
    theta = theta - momentum
    np.testing.assert_allclose(params["heads"]["a"]["bias"], theta, rtol=1e-6)


def test_the_run_record_reads_what_checkpoints_hold_and_refuses_unknown_fields():
  written = {"checkpoint": "/w/checkpoints/8", "step": 8, "source_tasks": {"a": 10},
             "xi_init": "best_source", "trainable": "xi_head_bn", "trainable_parameters": 7594,
             "new_tasks": {"b": {"xi_init": "best_source", "accuracy_before_finetune": 0.5}},
             "added_templates": None}  # a transfer run's "run_info", as checkpoints hold it
  start = RunStart.from_dict(written)
  assert start and start.new_tasks["b"]["accuracy_before_finetune"] == 0.5
  assert start.to_dict() == {**written, "surgery": None}
  older = RunStart.from_dict({**written, "adaptation_target": "uci_digits"})  # 2026-11-22..30
  assert older == start
  assert not RunStart.from_dict({}) and RunStart.from_dict(None).to_dict() == {}
  surgery = RunStart.from_dict({"surgery": {"operation": "prune"}, "source_tasks": {}})
  assert surgery and surgery.to_dict()["surgery"] == {"operation": "prune"}
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['new_field'\]"):
    RunStart.from_dict({**written, "new_field": 1})


def test_the_step_minimises_the_weighted_task_losses_plus_the_regularisers():
  """The objective of train_step: sum_t w_t CE_t + entropy_weight * sum of the xi entropies,
  each part computed here from the model and the paper's definitions."""
  spec = NetworkSpec(tasks=(("a", 10), ("b", 10)), input_channels=1, num_layers=2,
                     num_templates=3, patch_size=4, depth_multiplier=0.2)
  model = CompositionalIsometricNet(spec)
  images = jax.random.uniform(jax.random.key(0), (2, 8, 8, 8, 1))
  variables = jax.jit(functools.partial(model.init, task="a"))(jax.random.key(1), images[0])
  batch = {task: {"image": images[index], "label": (jnp.arange(8) * (index + 3)) % 10,
                  "mask": jnp.ones(8)} for index, task in enumerate(("a", "b"))}
  config = experiments.base_config()
  config.regularizers.entropy_weight = 0.1
  weights = {"a": 0.25, "b": 3.0}
  state = steps.TrainState(step=jnp.int32(0), params=variables["params"],
                           batch_stats=variables["batch_stats"], opt_state=None,
                           ema_params=variables["params"])
  optimization = types.SimpleNamespace(
      tx=optax.sgd(0.0), trainable=jax.tree.map(lambda _: True, variables["params"]))
  optimization_state = state.replace(opt_state=optimization.tx.init(state.params))
  _, metrics = jax.jit(functools.partial(
      steps.train_step, model=model, optimization=optimization, config=config,
      loss_fn=functools.partial(supervised.classification_loss, task_weights=weights)))(
          optimization_state, batch)
  rng = jax.random.fold_in(jax.random.key(config.seed), 0)
  expected = 0.0
  for index, task in enumerate(("a", "b")):
    logits, _ = jax.jit(functools.partial(model.apply, task=task, train=True,
                                          mutable=["batch_stats"]))(
        variables, batch[task]["image"], rngs={"dropout": jax.random.fold_in(rng, index)})
    expected += weights[task] * jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits, batch[task]["label"]))
  xi = jax.nn.softmax(variables["params"]["mixture_logits"], -1)  # [tasks, layers, K]
  entropy = 0.1 * -jnp.sum(xi * jnp.log(xi))
  np.testing.assert_allclose(metrics["regularizer/entropy"], entropy, rtol=1e-6)
  np.testing.assert_allclose(metrics["total_loss"], expected + entropy, rtol=1e-6)
