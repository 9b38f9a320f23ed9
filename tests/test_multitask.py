"""Multi-task and multi-domain training (paper §4.3, App. C)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compmod_jax import experiments
from compmod_jax.analysis import similarity
from compmod_jax.data import classes, streams
from compmod_jax.methods import supervised
from compmod_jax.models.network import CompositionalIsometricNet
from compmod_jax.models.network_spec import NetworkSpec
from compmod_jax.train import context, loop, multitask, validation
from configs import digits_9tasks, natural5, transfer_table2
from helpers import mock_datasets

TASKS = (("a", 10), ("b", 2), ("c", 5))


def setup_spec(setup):
  fields = dict(experiments.SETUPS[setup])
  return NetworkSpec(tasks=TASKS, input_channels=1, num_layers=3, num_templates=2,
                     depth_multiplier=0.2, patch_size=4, **fields)


def init(spec):
  return CompositionalIsometricNet(spec).init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))


def test_four_setups_create_exactly_their_parameters():
  shapes = {setup: jax.eval_shape(lambda s=setup: init(setup_spec(s)))
            for setup in experiments.SETUPS}
  for setup, variables in shapes.items():
    params = variables["params"]
    has_mixture = "mixture_logits" in params
    assert has_mixture == setup.startswith("mixture"), setup
    if has_mixture:
      assert params["mixture_logits"].shape == (3, 3, 2)
    bank = params["templates"]["project_kernel"].shape[0]
    assert bank == (2 if has_mixture else 3)  # plain: one block per layer
    bn_scale = (params["templates"]["bn"]["project"]["scale"] if setup == "mixture"
                else params["block_bn"]["project"]["scale"])
    width = setup_spec(setup).width
    expected_bn = {"simple_baseline": (3, width), "baseline_patches": (3, 3, width),
                   "mixture": (2, width), "mixture_patches": (3, 3, width)}[setup]
    assert bn_scale.shape == expected_bn, setup
    assert ("block_bn" in params) == (setup != "mixture")
    assert {t: params["heads"][t]["kernel"].shape for t, _ in TASKS} == {
        "a": (256, 10), "b": (256, 2), "c": (256, 5)}
    stats = variables["batch_stats"]["block_bn"]["expand"]["mean"]
    assert stats.shape[:2] == (3, 3)  # moving statistics: per task and layer, always


@pytest.mark.parametrize("setup", ["mixture_patches", "baseline_patches"])
def test_only_a_tasks_own_loss_moves_its_private_parameters(setup):
  spec = setup_spec(setup)
  variables = init(spec)
  images = jax.random.normal(jax.random.key(1), (4, 16, 16, 1))

  def loss_of_task_b(params):
    batch = {"b": {"image": images, "label": jnp.array([0, 1, 1, 0]), "mask": jnp.ones(4)}}
    return supervised.classification_loss(CompositionalIsometricNet(spec), params,
                                          variables["batch_stats"], batch, jax.random.key(2),
                                          task_weights={"b": 1.0})[0]

  grads = jax.jit(jax.grad(loss_of_task_b))(variables["params"])
  task_b = 1
  for name, grad in grads["heads"].items():
    assert bool(jnp.any(grad["kernel"] != 0)) == (name == "b"), name
  per_task = [grads["block_bn"]]
  if "mixture_logits" in grads:
    per_task.append(grads["mixture_logits"])
  for tree in per_task:
    for leaf in jax.tree.leaves(tree):
      assert bool(jnp.any(leaf[task_b] != 0))
      np.testing.assert_array_equal(leaf[0], 0.0)
      np.testing.assert_array_equal(leaf[2], 0.0)
  assert bool(jnp.any(grads["templates"]["expand_kernel"] != 0))  # shared: moved by every task


def test_task_sampling_gives_every_task_its_share():
  config = experiments.base_config()
  config.batch_size = 96
  config.tasks = {"a": experiments.task("x", sampling_weight=2.0),
                  "b": experiments.task("x", sampling_weight=1.0),
                  "c": experiments.task("x", batch_size=16)}
  assert multitask.task_batch_sizes(config, device_count=8) == {"a": 64, "b": 32, "c": 16}
  config.tasks.b.sampling_weight = 0.01
  assert multitask.task_batch_sizes(config, device_count=8)["b"] == 8  # never starved
  config.tasks.c.batch_size = 12
  with pytest.raises(ValueError, match="multiple of the device count"):
    multitask.task_batch_sizes(config, device_count=8)


def test_a_task_sets_its_own_splits_and_augmentation_over_config_data():
  config = transfer_table2.get_config("target=emnist")
  emnist = context.task_data_config(config, "emnist")
  assert (emnist.name, emnist.augment, emnist.train_split) == ("emnist/balanced", "crop", "train")
  assert config.data.augment == "crop_flip"  # the natural images' own
  config.tasks.emnist.augment = "mirror"
  config.init_from = "a/natural5/workdir"  # as its docstring runs it; validation reads none
  with pytest.raises(ValueError, match=r"Task 'emnist' .*config\.data\.augment='mirror'"):
    validation.validate(config)


def test_label_maps_make_new_tasks_from_the_same_digits(embedded_dir):
  config = digits_9tasks.get_config("tiny=1")
  assert len(config.tasks) == 9
  task_streams = {}
  for task in ("original_digit", "original_parity", "original_ge5"):
    data_config = context.task_data_config(config, task)
    data_config.data_dir = str(embedded_dir)
    task_streams[task] = streams.DataStream(data_config, batch_size=50, train=False)
  num_classes = {t: classes.num_classes(s.builder, s.data_config)
                 for t, s in task_streams.items()}
  assert num_classes == {"original_digit": 10, "original_parity": 2, "original_ge5": 2}
  digit, parity, ge5 = (next(iter(task_streams[t]))["label"] for t in task_streams)
  np.testing.assert_array_equal(parity, digit % 2)
  np.testing.assert_array_equal(ge5, (digit >= 5).astype(np.int32))


def test_task_similarity_is_the_bhattacharyya_coefficient():
  xi = {"a": np.array([[1.0, 0.0], [0.5, 0.5]]), "b": np.array([[0.0, 1.0], [0.5, 0.5]]),
        "c": np.array([[1.0, 0.0], [0.9, 0.1]])}
  tasks, sim = similarity.task_similarity(xi)
  assert tasks == ["a", "b", "c"] and sim.shape == (2, 3, 3)
  np.testing.assert_allclose(np.diagonal(sim, axis1=1, axis2=2), 1.0)
  np.testing.assert_allclose(sim, np.swapaxes(sim, 1, 2))
  assert sim[0, 0, 1] == 0.0 and sim[0, 0, 2] == 1.0 and sim[1, 0, 1] == pytest.approx(1.0)
  assert sim[1, 0, 2] == pytest.approx(np.sqrt(0.45) + np.sqrt(0.05))


def test_tiny_multidomain_run_learns_every_task(source_workdir):
  """The session's source model (conftest.py): two domains, each with its own xi and BN."""
  results = json.loads((source_workdir / "results.json").read_text())
  assert results["tasks"].keys() == {"mnist", "mnist_blur"}
  for task, r in results["tasks"].items():
    assert r["test_accuracy"] > 0.3, (task, r)
    assert r["test_examples"] == 400
  for name in ("mixture_weights.png", "task_similarity.png", "accuracy_table.md"):
    assert (source_workdir / name).stat().st_size > 100, name
  table = (source_workdir / "accuracy_table.md").read_text()
  assert "| mnist_blur |" in table and "| mean |" in table


@pytest.mark.slow
def test_natural5_then_its_table2_transfer_run_under_mock_data(tmp_path):
  """natural5.py (tiny, mixture_patches) on its five datasets, then transfer_table2.py moving it
  to stanford_dogs from imagenet2012's xi: every split as the real datasets name them."""
  data_dir = str(tmp_path / "tfds")
  pretrain = natural5.get_config("setup=mixture_patches,tiny=1")
  config = transfer_table2.get_config("target=stanford_dogs,source=imagenet2012,tiny=1")
  pretrain.data.data_dir = config.data.data_dir = data_dir
  config.init_from = str(tmp_path / "natural5")
  with mock_datasets(natural5.DATASETS + ("stanford_dogs",), data_dir, 16):
    pretrained = loop.train_and_evaluate(pretrain, config.init_from)
    results = loop.train_and_evaluate(config, str(tmp_path / "dogs"))
  assert set(pretrained["tasks"]) == set(natural5.TASKS)
  assert all(r["test_examples"] == 16 for r in pretrained["tasks"].values())
  dogs = results["tasks"]["stanford_dogs"]
  assert dogs["test_examples"] == 16 and "accuracy_before_finetune" in dogs
  assert results["init_from"]["new_tasks"]["stanford_dogs"]["coefficients"] == {
      task: float(task == "imagenet2012") for task in natural5.TASKS}
  assert natural5.get_config("diag=1").model.mixture_init == "diagonal"
  assert natural5.get_config("K=16").model.num_templates == 16
