"""Unsupervised domain adaptation on the target's mixture weights (paper §4.4, App. D.3)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from compmod_jax import experiments
from compmod_jax.analysis import tables
from compmod_jax.methods import adaptation, registry, supervised
from compmod_jax.train import context, loop, start, validation
from compmod_jax.workdir import Workdir
from configs import digits_da, domainnet_da
from mock_tfds import labelled_mock_dataset, write_mock_metadata
from helpers import flat_host, read_checkpoint

SOURCES = ("mnist", "mnist_blur")
TARGET = "uci_digits"


def test_discriminator_loss_falls_when_trained_alone_on_separable_features():
  source = 1.0 + jax.random.normal(jax.random.key(0), (64, 4, 4, 8))
  target = -1.0 + jax.random.normal(jax.random.key(1), (64, 4, 4, 8))
  disc = adaptation.Discriminator(16)
  params = disc.init(jax.random.key(2), source[:1])["params"]
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)

  def loss_fn(p):
    return 0.5 * (adaptation.binary_cross_entropy(disc.apply({"params": p}, source), 1.0)
                  + adaptation.binary_cross_entropy(disc.apply({"params": p}, target), 0.0))

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for _ in range(40):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert losses[0] > 0.5 and losses[-1] < 0.1 * losses[0], losses[::10]
  assert float(jnp.mean(disc.apply({"params": params}, source) > 0)) == 1.0
  assert float(jnp.mean(disc.apply({"params": params}, target) <= 0)) == 1.0


def adaptation_setup(method="adversarial", model="compositional", trainable="", joint=0):
  config = digits_da.get_config(
      f"method={method},model={model},trainable={trainable},joint={joint},tiny=1")
  config.tasks = {t: experiments.task(f"embedded_digits/{t}", batch_size=8)
                  for t in SOURCES + (TARGET,)}
  model = start.model_for(config, {t: 10 for t in config.tasks})
  ctx = context.RunContext(config=config, workdir="", mesh=context.make_mesh(config),
                           model=model, method=registry.get(config.method), train_streams={},
                           eval_streams={}, eval_steps={})
  state, optimization = start.create_train_state(ctx, jnp.zeros((1, 28, 28, 1)))
  step = start.train_step(ctx, state, optimization)
  keys = iter(jax.random.split(jax.random.key(3), 8))
  batch = {t: {"image": jax.random.uniform(next(keys), (8, 28, 28, 1)) + 0.3 * (t == TARGET),
               "label": jax.random.randint(next(keys), (8,), 0, 10), "mask": jnp.ones(8)}
           for t in config.tasks}
  return model, ctx.mesh, state, step, batch


def host_batch(batch):
  return jax.tree.map(np.asarray, batch)



@pytest.mark.parametrize("method, model, trained", [
    ("adversarial", "compositional", {"params/mixture_logits"}),
    ("moment_matching", "compositional", {"params/mixture_logits"}),
    ("adversarial", "plain", {"params/input_adapter/kernel", "params/input_adapter/bias"})])
def test_an_adaptation_step_moves_only_the_targets_trainable_rows_and_the_methods_own(
    method, model, trained):
  model, mesh, state, step, batch = adaptation_setup(method, model)
  before = flat_host({"params": state.params, "batch_stats": state.batch_stats})
  new_state, metrics = step(state, context.global_batch(mesh, batch))
  after = flat_host({"params": new_state.params, "batch_stats": new_state.batch_stats})
  target_row = model.spec.task_index(TARGET)
  other_rows = [model.spec.task_index(t) for t in SOURCES]
  changed = {path for path in after if not np.array_equal(after[path], before[path])}
  assert {p.split("/")[1] for p in changed if p.startswith("params/adaptation/")} == {
      "adaptation"}
  assert {p for p in changed if not p.startswith(("params/adaptation/", "batch_stats/"))} == (
      trained)
  for path in sorted(trained) + ["batch_stats/block_bn/expand/mean"]:
    np.testing.assert_array_equal(after[path][other_rows], before[path][other_rows])
    assert not np.array_equal(after[path][target_row], before[path][target_row]), path
  assert np.isfinite(float(metrics["total_loss"]))


@pytest.mark.parametrize("method", adaptation.METHODS)
def test_a_joint_step_trains_the_sources_and_the_shared_modules_and_of_the_target_its_xi(
    method):
  """Paper §4.4: sources' xi, BN, heads and the templates and adapters learn the sources'
  classification; of the target only its xi moves (and its BN statistics, in training mode);
  relabelling the target gives a bit-identical step: its labels are never read."""
  model, mesh, state, step, batch = adaptation_setup(method, joint=1)
  before = flat_host({"params": state.params, "batch_stats": state.batch_stats})
  relabelled = {**batch, TARGET: {**batch[TARGET], "label": (batch[TARGET]["label"] + 3) % 10}}
  new_state = step(jax.tree.map(jnp.copy, state), context.global_batch(mesh, batch))[0]
  after = flat_host({"params": new_state.params, "batch_stats": new_state.batch_stats})
  again = flat_host({"params": (other := step(state, context.global_batch(mesh, relabelled))[0])
                     .params, "batch_stats": other.batch_stats})
  for path in after:
    np.testing.assert_array_equal(again[path], after[path], path)
  changed = lambda path, rows=slice(None): not np.array_equal(after[path][rows],
                                                               before[path][rows])
  target = model.spec.task_index(TARGET)
  sources = [model.spec.task_index(t) for t in SOURCES]
  assert changed("params/templates/expand_kernel")
  assert changed("params/output_adapter/conv_kernel")
  for task in SOURCES:
    assert changed(f"params/heads/{task}/kernel")
  assert not changed(f"params/heads/{TARGET}/kernel")
  assert changed("params/mixture_logits", target) and changed("params/mixture_logits", sources)
  for path in [p for p in after if p.startswith(("params/block_bn/", "params/input_adapter/"))]:
    assert not changed(path, target), path  # per-task BN and input adapter: the sources' rows
  assert changed("params/block_bn/expand/scale", sources)
  assert changed("params/input_adapter/kernel", sources)


def test_in_a_joint_loss_each_loss_reaches_only_what_the_paper_says():
  """The sources' classification gradient never reaches the target's xi row; the adaptation
  gradient reaches the target's xi row and nothing of the sources or the shared modules, so
  there the joint gradient is the classification gradient (to float rounding: two programs)."""
  model, _, state, _, batch = adaptation_setup("adversarial", joint=1)
  config = digits_da.get_config("method=adversarial,joint=1,tiny=1")
  config.tasks = {t: experiments.task(f"embedded_digits/{t}") for t in SOURCES + (TARGET,)}
  joint = registry.get("adversarial").make_loss(config, model.spec)
  weights = {t: 1.0 for t in SOURCES}
  sources = {t: batch[t] for t in SOURCES}
  rng = jax.random.key(0)
  classify = lambda p: supervised.classification_loss(model, p, state.batch_stats, sources,
                                                      rng, weights)[0]
  joint_grads = flat_host(jax.jit(jax.grad(
      lambda p: joint(model, p, state.batch_stats, batch, rng)[0]))(state.params))
  class_grads = flat_host(jax.jit(jax.grad(classify))(state.params))
  target = model.spec.task_index(TARGET)
  sources_rows = [model.spec.task_index(t) for t in SOURCES]
  assert not class_grads["mixture_logits"][target].any()
  assert class_grads["mixture_logits"][sources_rows].any()
  assert joint_grads["mixture_logits"][target].any()
  for path, gradient in class_grads.items():
    if path.startswith(f"{adaptation.OWN_PARAMS}/"):  # the discriminator's own loss
      continue
    if path == "mixture_logits":
      np.testing.assert_allclose(joint_grads[path][sources_rows], gradient[sources_rows],
                                 rtol=1e-5, atol=1e-7)
    else:
      np.testing.assert_allclose(joint_grads[path], gradient, rtol=1e-5, atol=1e-7,
                                 err_msg=path)


def test_moment_distance_is_zero_for_identical_sets_and_grows_with_a_shift():
  features = jax.random.normal(jax.random.key(0), (32, 6))
  assert float(adaptation.moment_distance([features, features], features)) == 0.0
  gradient = jax.grad(lambda t: adaptation.moment_distance([features], t))(features)
  np.testing.assert_array_equal(gradient, np.zeros_like(gradient))
  # By hand: means [1, 1] on both sides; second moments [2, 2] and [1, 1].
  source, target = jnp.array([[0.0, 0.0], [2.0, 2.0]]), jnp.ones((2, 2))
  assert float(adaptation.moment_distance([source], target)) == pytest.approx(2 ** 0.5)
  # A second source (means [2, 2], second moments [5, 5]) adds its distance to the target to
  # the mean over sources, and the source pair's: order 1: (0 + |[1, 1]|) / 2 + |[1, 1]|;
  # order 2: (|[1, 1]| + |[4, 4]|) / 2 + |[3, 3]|.
  root2 = 2 ** 0.5
  assert float(adaptation.moment_distance([source, source + 1.0], target)) == pytest.approx(
      root2 / 2 + root2 + 5 * root2 / 2 + 3 * root2, rel=1e-6)
  shifted = [float(adaptation.moment_distance([features], features + shift))
             for shift in (0.1, 0.5, 1.0, 2.0)]
  assert all(a < b for a, b in zip(shifted, shifted[1:])), shifted


def test_the_two_classifier_step_splits_the_min_max_between_classifiers_and_target():
  """Classifiers: gradient of (source classification - target discrepancy) with the target's
  embeddings held fixed; the target: gradient of (discrepancy + moment distance) with the
  classifiers held fixed (Maximum Classifier Discrepancy's steps B and C, M3SDA's moments)."""
  model, _, state, _, batch = adaptation_setup("moment_matching")
  params, batch_stats = state.params, state.batch_stats
  config = digits_da.get_config("method=moment_matching,tiny=1")
  loss_fn = registry.get(config.method).make_loss(config, model.spec)
  grads = jax.jit(jax.grad(lambda p: loss_fn(model, p, batch_stats, batch, None)[0]))(params)
  pair = adaptation.ClassifierPair(10)
  embed = lambda p, task, train: model.apply(
      {"params": p, "batch_stats": batch_stats}, batch[task]["image"], task=task, train=train,
      mutable=["batch_stats"] if train else False, method=model.embedding)
  target_embedding = lambda p: embed(p, TARGET, True)[0]
  sources = [jax.jit(embed, static_argnums=(1, 2))(params, task, False) for task in SOURCES]

  def classifiers_objective(pair_params):
    cross_entropy = [optax.softmax_cross_entropy_with_integer_labels(
        logits, batch[task]["label"]).mean() for task, embedding in zip(SOURCES, sources)
        for logits in pair.apply({"params": pair_params}, embedding)]
    return jnp.mean(jnp.stack(cross_entropy)) - adaptation.classifier_discrepancy(
        *pair.apply({"params": pair_params}, target_embedding(params)))

  def target_objective(p):
    embedding = target_embedding(p)
    return (adaptation.classifier_discrepancy(*pair.apply({"params": params["adaptation"]},
                                                          embedding))
            + adaptation.moment_distance(sources, embedding))

  # Two computations of the same gradients, summed in different orders: float32 rounding
  # (up to ~1e-8 on entries near 1e-5), hence atol.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               grads["adaptation"],
               jax.jit(jax.grad(classifiers_objective))(params["adaptation"]))
  np.testing.assert_allclose(grads["mixture_logits"],
                             jax.jit(jax.grad(target_objective))(params)["mixture_logits"],
                             rtol=1e-5, atol=1e-7)
  assert np.abs(grads["mixture_logits"]).max() > 0


def test_the_adversarial_loss_never_reads_the_target_labels_and_bn_moves_with_xi_bn():
  model, mesh, state, step, batch = adaptation_setup(trainable="xi_bn")
  relabelled = dict(batch, **{TARGET: dict(batch[TARGET],
                                           label=(batch[TARGET]["label"] + 1) % 10)})
  before = flat_host(state.params)
  copy = jax.tree.map(jnp.copy, state)  # the step donates its input
  first, metrics = step(state, context.global_batch(mesh, batch))
  second, metrics_relabelled = step(copy, context.global_batch(mesh, relabelled))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(first), jax.device_get(second))
  assert float(metrics["total_loss"]) == float(metrics_relabelled["total_loss"])
  after = flat_host(first.params)
  target_row = model.spec.task_index(TARGET)
  other_rows = [model.spec.task_index(t) for t in SOURCES]
  for path in ("block_bn/expand/scale", "block_bn/project/bias"):
    np.testing.assert_array_equal(after[path][other_rows], before[path][other_rows])
    assert not np.array_equal(after[path][target_row], before[path][target_row]), path


def tiny_da(data_dir, init_from, method, model="compositional"):
  config = digits_da.get_config(f"method={method},model={model},tiny=1,source=mnist_blur")
  config.data.data_dir = str(data_dir)
  config.eval_batch_size = 200
  config.init_from = str(init_from)
  config.tasks = {t: config.tasks[t] for t in SOURCES + (TARGET,) if t in config.tasks}
  return config


def test_digits_da_run_writes_the_table3_layout(embedded_dir, source_workdir, tmp_path):
  """Adversarial adaptation end to end (moment matching's runs end to end in the DomainNet
  test below), then Table 3 from its workdir."""
  result = loop.train_and_evaluate(tiny_da(embedded_dir, source_workdir, "adversarial"),
                                   str(tmp_path / "da_adversarial"))
  assert result["step"] == 4
  assert (tmp_path / "da_adversarial" / "new_task_xi.png").exists()
  markdown = tables.da_table([tmp_path / "da_adversarial"], out=tmp_path / "table3")
  table = json.loads((tmp_path / "table3" / "table3.json").read_text())
  accuracy = result["tasks"][TARGET]["test_accuracy"]
  assert result["target_test_accuracy"] == accuracy
  assert table == {"xi_init": "source:mnist_blur", "target_test_accuracy": {
      "adversarial": {"compositional": {"mean": accuracy, "std": 0.0,
                                        "by_seed": {"0": accuracy}}}},
                   "source_copied": {"compositional": ["mnist_blur"]}}
  assert markdown.splitlines()[2:] == [
      "| method | compositional |", "|---|---:|", f"| adversarial | {100 * accuracy:.2f} |", "",
      "The source domain whose variables the target copied: compositional: mnist_blur."]


def test_target_statistics_change_nothing_but_the_targets_bn_statistics(embedded_dir,
                                                                       source_workdir, tmp_path):
  """bn_stats (AdaBN) against source-only from the same source: the same parameters and the
  same statistics of every source; only the target's statistics row is re-estimated, as the
  mean of its batches' statistics (so its moving mean is no longer the source's)."""
  saved = {}
  for method in ("source_only", "bn_stats"):
    result = loop.train_and_evaluate(tiny_da(embedded_dir, source_workdir, method),
                                     str(tmp_path / method))
    assert result["step"] == 0
    saved[method] = read_checkpoint(tmp_path / method)[1]["state"]
  source_only, bn_stats = saved["source_only"], saved["bn_stats"]
  jax.tree.map(np.testing.assert_array_equal, bn_stats["params"], source_only["params"])
  row = sorted(SOURCES + (TARGET,)).index(TARGET)
  for path, statistic in flat_host(bn_stats["batch_stats"]).items():
    before = flat_host(source_only["batch_stats"])[path]
    others = [i for i in range(len(statistic)) if i != row]
    np.testing.assert_array_equal(statistic[others], before[others])
    assert not np.array_equal(statistic[row], before[row]), path
    if path.endswith("var"):
      assert np.all(statistic[row] >= 0)


def test_the_table3_rows_without_adaptation_train_no_step_and_joint_runs_train_the_sources():
  for method in ("source_only", "bn_stats"):
    assert digits_da.get_config(f"method={method}").total_steps == 0
  assert digits_da.get_config("method=bn_stats").transfer.target_bn_batches == 50
  joint = digits_da.get_config("method=moment_matching,joint=1")
  assert (joint.total_steps, joint.trainable, joint.adaptation.joint) == (225, "all", True)
  assert set(joint.tasks) == set(digits_da.common.MNIST_DOMAINS) | {TARGET}
  with pytest.raises(ValueError, match=r"joint=1 trains the sources beside an adaptation loss"):
    digits_da.get_config("method=supervised,joint=1")
  sources = {name: digits_da.get_config(f"source={name}").xi_init
             for name in ("auto", "best_source", "mnist_blur")}
  assert sources == {"auto": "min_entropy_source", "best_source": "best_source",
                     "mnist_blur": "source:mnist_blur"}


def write_da_run(workdir, method, seed, accuracy, xi_init="source:mnist"):
  """The two files the Table 3 tool reads from a finished run."""
  workdir.mkdir(parents=True)
  (workdir / "results.json").write_text(json.dumps(
      {"tasks": {TARGET: {"test_accuracy": accuracy}}}))
  (workdir / "config.json").write_text(json.dumps({
      "adaptation": {"method_name": method, "model_name": "compositional", "target": TARGET},
      "trainable": "xi", "seed": seed, "xi_init": xi_init}))
  return workdir


def test_table3_gives_mean_and_std_over_seeds_of_one_starting_point(tmp_path):
  runs = [write_da_run(tmp_path / f"adv_{seed}", "adversarial", seed, accuracy)
          for seed, accuracy in ((0, 0.80), (1, 0.90), (2, 0.85))]
  runs.append(write_da_run(tmp_path / "source_only", "source_only", 0, 0.70))
  markdown = tables.da_table(runs, out=tmp_path / "table3")
  cells = json.loads((tmp_path / "table3" / "table3.json").read_text())["target_test_accuracy"]
  adversarial = cells["adversarial"]["compositional"]
  assert adversarial["by_seed"] == {"0": 0.80, "1": 0.90, "2": 0.85}
  assert (adversarial["mean"], adversarial["std"]) == pytest.approx((0.85, 0.05))
  assert markdown.splitlines()[4:] == ["| source_only | 70.00 |",
                                       "| adversarial | 85.00 ± 5.00 (3) |"]
  with pytest.raises(ValueError, match=r"Two runs for 'adversarial', 'compositional' with "
                                       r"seed 1 \(.*again is the second\)"):
    tables.da_table(runs + [write_da_run(tmp_path / "again", "adversarial", 1, 0.5)])
  with pytest.raises(ValueError, match=r"different target variables \(config.xi_init: "
                                       r"\{'source:mnist': .*'best_source': "):
    tables.da_table(runs + [write_da_run(tmp_path / "best", "supervised", 0, 0.9, "best_source")])


def test_bad_adaptation_configs_fail_with_clear_errors(embedded_dir, source_workdir, tmp_path):
  with pytest.raises(ValueError, match=r"config.method='moment_matching' needs "
                                       r"config.adaptation.target to name one of config.tasks"):
    config = tiny_da(embedded_dir, source_workdir, "moment_matching")
    config.tasks = {TARGET: experiments.task(f"embedded_digits/{TARGET}", batch_size=8)}
    loop.train_and_evaluate(config, str(tmp_path / "run"))
  with pytest.raises(ValueError, match=r"Config argument method='mmd' must be one of "
                                       r"\('source_only', 'bn_stats', 'adversarial', "
                                       r"'moment_matching'"):
    digits_da.get_config("method=mmd")
  with pytest.raises(ValueError, match=r"Config argument model='isometric' must be one of "
                                       r"\('compositional', 'plain'\)\.$"):
    digits_da.get_config("model=isometric")
  config = tiny_da(embedded_dir, source_workdir, "adversarial")
  config.adaptation.discriminator_channels = 0
  with pytest.raises(ValueError, match=r"config\.adaptation\.discriminator_channels must be a "
                                       r"positive integer, got 0"):
    validation.validate(config)


@pytest.mark.slow
def test_domainnet_config_adapts_on_its_most_frequent_classes_under_mock_data(tmp_path):
  config = domainnet_da.get_config("method=moment_matching,tiny=1")
  config.data.data_dir = config.pretrain.data.data_dir = str(tmp_path / "tfds")
  assert config.data.most_frequent_classes == config.pretrain.data.most_frequent_classes == 100
  config.data.most_frequent_classes = config.pretrain.data.most_frequent_classes = 10
  # One of the five sources (the others add compile time, not coverage); every domain's labels
  # still rank the classes.
  kept = ("real",)
  config.pretrain.tasks = {d: config.pretrain.tasks[d] for d in kept}
  config.tasks = {d: config.tasks[d] for d in kept + (domainnet_da.TARGET,)}
  domains = domainnet_da.SOURCES + (domainnet_da.TARGET,)
  # 24 examples per domain: classes 0..9 (2 or 3 each) and 300 twice, which loses the tie for
  # the 10th place to the smaller ids: 22 examples per split remain.
  labels = {f"domainnet/{d}": np.concatenate([np.arange(22) % 10, [300, 300]]) for d in domains}
  for name in labels:
    write_mock_metadata(name, config.data.data_dir, 24)
  with tfds.testing.mock_data(as_dataset_fn=labelled_mock_dataset(labels, side=40),
                              policy=tfds.testing.MockPolicy.USE_FILES,
                              data_dir=config.data.data_dir):
    results = loop.train_and_evaluate(config, str(tmp_path / "work"))
  assert results["step"] == 4
  assert results["init_from"]["source_tasks"] == {d: 10 for d in kept}
  assert results["tasks"]["sketch"]["test_examples"] == 22
  assert 0.0 <= results["target_test_accuracy"] <= 1.0


@pytest.mark.slow
def test_digits_svhn_config_mixes_embedded_digits_and_svhn_under_mock_data(svhn_digits_run):
  workdir, config = svhn_digits_run
  kept = tuple(config.pretrain.tasks)
  results = Workdir(workdir).read_results()
  # Without init_from the run pretrains config.pretrain first: the compositional network, whose
  # shared input adapter then starts every domain's own; source-only evaluates it as it starts.
  pretrained_dir = workdir / "pretrained"
  assert results["init_from"]["checkpoint"] == str(pretrained_dir / "checkpoints" / "4")
  assert results["init_from"]["source_tasks"] == {d: 10 for d in kept}
  assert results["step"] == 0 and results["tasks"][TARGET]["test_examples"] == 16
  assert results["tasks"][TARGET]["test_accuracy"] == pytest.approx(
      results["tasks"][TARGET]["accuracy_before_finetune"], abs=0)
  assert set(results["init_from"]["new_tasks"][TARGET]["source_accuracy_on_train"]) == set(kept)
  pretrained = Workdir(pretrained_dir).read_results()
  assert pretrained["step"] == 4 and set(pretrained["tasks"]) == set(kept)
