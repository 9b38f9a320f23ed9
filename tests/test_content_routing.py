"""Routing by content (config.model.routing='example'): every example's xi is its task's mixture
logits plus a router on each layer's pooled input, and the whole block mixes per example."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from compmod_jax.finetune import pretrained, surgery
from compmod_jax.models.network import CompositionalIsometricNet
from compmod_jax.models.network_spec import NetworkSpec
from compmod_jax.train import loop, validation
from configs import digits_multidomain
from helpers import tiny_digits, with_one_hot_xi

TASK = NetworkSpec(tasks=(("a", 10), ("b", 10)), input_channels=1, num_layers=4,
                   num_templates=3, patch_size=4, depth_multiplier=0.2, expansion=2)
EXAMPLE = dataclasses.replace(TASK, routing="example")
IMAGES = jax.random.normal(jax.random.key(1), (6, 16, 16, 1))
# Per-example kernels are contracted in another order than one kernel for the whole batch
# (a batched matmul per example against one matmul over every pixel), so float32 sums round
# differently: equal up to a few float32 ulps of the activations, not bit for bit.
REORDERED = dict(rtol=1e-5, atol=1e-5)


def init(spec, images=IMAGES):
  return CompositionalIsometricNet(spec).init(jax.random.key(0), images)


def apply(spec, variables, images=IMAGES, **kw):
  return CompositionalIsometricNet(spec).apply(variables, images, **kw)


def train_apply(spec, variables, task):
  return apply(spec, variables, task=task, train=True, mutable=["batch_stats"],
               rngs={"dropout": jax.random.key(2)})


def with_router(variables, kernel):
  return dict(variables, params=dict(variables["params"], router={"kernel": kernel}))


def without_router(variables):
  return dict(variables, params={k: v for k, v in variables["params"].items() if k != "router"})


def random_router(variables, scale=3.0):
  shape = variables["params"]["router"]["kernel"].shape
  return with_router(variables, scale * jax.random.normal(jax.random.key(7), shape))


def test_task_routing_computes_what_it_did_before_content_routing():
  """Logits and gradient sizes of a fixed model, computed by the code before routing='example'
  existed (commit ceeb9dc); the tolerance allows another CPU's float32 rounding."""
  variables = init(TASK, IMAGES[:4])
  assert "router" not in variables["params"]
  logits = apply(TASK, variables, IMAGES[:4], task="b")
  np.testing.assert_allclose(logits[:2], [
      [-0.057159, -0.210788, -0.566271, -0.089905, 0.243897, -0.247313, -0.6037, -1.425164,
       -0.27286, -1.492545],
      [0.534089, 0.141498, -1.06818, -0.549273, 0.463758, -0.399869, -0.911296, -0.827609,
       0.139345, -0.924297]], rtol=1e-5, atol=2e-6)

  def loss(params):
    out, _ = apply(TASK, dict(variables, params=params), IMAGES[:4], task="b", train=True,
                   mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out), jnp.arange(4)[:, None], -1))

  grads = jax.grad(loss)(variables["params"])
  l1 = {name: float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(tree)))
        for name, tree in grads.items()}
  np.testing.assert_allclose([l1[k] for k in sorted(l1)], [
      14.565139770507812, 320.8992004394531, 21.309362411499023, 2.164834499359131,
      1281.100830078125, 88.25811767578125], rtol=1e-5)  # sorted: block_bn ... templates


def test_a_constant_one_hot_route_is_the_per_task_model_with_that_xi():
  variables = init(EXAMPLE)
  signatures = [(2, 0, 1, 1), (0, 0, 2, 1)]
  # -inf logits stay -inf whatever the router adds, so every example takes the one-hot route
  # even with a large random router.
  forced = with_one_hot_xi(random_router(variables), signatures)
  per_task = with_one_hot_xi(without_router(variables), signatures)
  for task, signature in zip(("a", "b"), signatures):
    routes = apply(EXAMPLE, forced, task=task, method="routes")
    np.testing.assert_array_equal(routes, jnp.broadcast_to(
        jax.nn.one_hot(jnp.asarray(signature), 3)[:, None], routes.shape))
    np.testing.assert_allclose(apply(EXAMPLE, forced, task=task),
                               apply(TASK, per_task, task=task), **REORDERED)
    (routed, routed_stats), (plain, plain_stats) = (train_apply(EXAMPLE, forced, task),
                                                    train_apply(TASK, per_task, task))
    np.testing.assert_allclose(routed, plain, **REORDERED)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **REORDERED),
                 routed_stats, plain_stats)


def test_each_example_computes_the_per_task_model_with_its_own_xi():
  """The definition, example by example: the routed model's output for an image is the per-task
  model's output with xi = that image's routes (read back with `routes`)."""
  variables = random_router(init(EXAMPLE))
  routes = apply(EXAMPLE, variables, task="b", method="routes")  # [L, N, K]
  assert float(jnp.abs(routes - routes[:, :1]).max()) > 0.05  # the examples are routed apart
  routed = apply(EXAMPLE, variables, task="b")
  for n in range(IMAGES.shape[0]):
    logits = variables["params"]["mixture_logits"].at[1].set(jnp.log(routes[:, n]))
    own = dict(without_router(variables), params=dict(without_router(variables)["params"],
                                                      mixture_logits=logits))
    np.testing.assert_allclose(apply(TASK, own, IMAGES[n:n + 1], task="b")[0], routed[n],
                               **REORDERED)


def test_in_evaluation_an_examples_output_does_not_depend_on_its_batch():
  variables = random_router(init(EXAMPLE))
  whole = apply(EXAMPLE, variables, task="a")
  order = jnp.asarray([4, 0, 5, 2, 1, 3])
  np.testing.assert_allclose(apply(EXAMPLE, variables, IMAGES[order], task="a"), whole[order],
                             rtol=1e-6, atol=1e-6)
  parts = [apply(EXAMPLE, variables, IMAGES[i:j], task="a") for i, j in ((0, 1), (1, 4), (4, 6))]
  np.testing.assert_allclose(jnp.concatenate(parts), whole, rtol=1e-6, atol=1e-6)


def test_gradients_reach_the_router_of_every_layer():
  variables = random_router(init(EXAMPLE), scale=0.5)
  labels = jnp.arange(6) % 10

  def loss(params):
    logits, _ = train_apply(EXAMPLE, dict(variables, params=params), "a")
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1))

  grads = jax.grad(loss)(variables["params"])
  per_layer = jnp.abs(grads["router"]["kernel"]).sum(axis=(1, 2))
  assert per_layer.shape == (4,) and bool(jnp.all(per_layer > 0)), per_layer
  # Only task "a" ran: its row of the mixture logits learns, task b's gets nothing.
  assert float(jnp.abs(grads["mixture_logits"][0]).sum()) > 0
  assert float(jnp.abs(grads["mixture_logits"][1]).sum()) == 0


@pytest.mark.parametrize("changes", [dict(layer_iteration="scan"), dict(remat="full"),
                                     dict(layer_iteration="scan", remat="dots")],
                         ids=["scan", "remat", "scan_remat"])
def test_scan_and_remat_compute_the_same_routed_model_and_gradients(changes):
  variables = random_router(init(EXAMPLE), scale=0.5)
  other = dataclasses.replace(EXAMPLE, **changes)

  def loss(spec, params):
    logits, _ = train_apply(spec, dict(variables, params=params), "b")
    return jnp.sum(logits ** 2)

  np.testing.assert_allclose(apply(other, variables, task="b"),
                             apply(EXAMPLE, variables, task="b"), rtol=1e-5, atol=1e-6)
  # Another loop order rounds the float32 sums differently: routing='task' differs between
  # loop and scan by 3.5e-5 of a leaf's largest entry here, this model by 6.9e-5.
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0,
                                                       atol=2e-4 * float(jnp.abs(y).max())),
               jax.grad(loss, argnums=1)(other, variables["params"]),
               jax.grad(loss, argnums=1)(EXAMPLE, variables["params"]))


@pytest.mark.parametrize("changes,message", [
    (dict(routing="content"), r"routing must be one of \('task', 'example'\)"),
    (dict(routing="example", signature="cyclic"),
     "routing='example' mixes the templates per example, which signature='cyclic'"),
    (dict(routing="example", batch_norm="mixed"), "batch_norm='mixed' .* would need them"),
])
def test_bad_routing_options_give_one_clear_error(changes, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(TASK, **changes)


def test_growth_refuses_a_routed_model_before_any_work(embedded_dir, no_heavy_work):
  config = tiny_digits(embedded_dir, **{"model.routing": "example", "init_from": "/nowhere",
                                        "transfer.add_templates": 1})
  with pytest.raises(ValueError, match="grow with routing='task'"):
    validation.validate(config)


def test_surgery_refuses_a_routed_run(tmp_path, monkeypatch):
  config = tiny_digits(tmp_path, **{"model.routing": "example"})
  run = surgery.TrainedRun(workdir="runs/routed", config=config, source_tasks={},
                           variables=None, step=0)
  monkeypatch.setattr(surgery, "load_run", lambda workdir, data_dir: run)
  for operation in ("hardened", "pruned"):
    with pytest.raises(surgery.SurgeryError, match="no per-task mixture weights to be " +
                       operation):
      surgery.load_learned_run("runs/routed", None, operation)


def test_a_per_task_checkpoint_loads_into_a_routed_model_that_trains_only_its_router(
    embedded_dir, source_workdir, tmp_path):
  config = digits_multidomain.get_config("setup=mixture_patches,tiny=1")
  config.tasks = {task: config.tasks[task] for task in ("mnist", "mnist_blur")}
  config.data.update(data_dir=str(embedded_dir), eval_split="test[:400]")
  config.update(batch_size=64, eval_batch_size=200, total_steps=8, eval_every=8,
                checkpoint_every=8, init_from=str(source_workdir), trainable="router")
  config.model.routing = "example"
  config.transfer.dont_load = ("^params/router/",)
  results = loop.train_and_evaluate(config, str(tmp_path / "routed"))
  source = flat(pretrained.load(source_workdir).variables["params"])
  routed = flat(pretrained.load(tmp_path / "routed").variables["params"])
  assert set(routed) == set(source) | {"router/kernel"}
  for path, value in source.items():
    np.testing.assert_array_equal(routed[path], value, path)
  trained = np.abs(routed["router/kernel"]).sum(axis=(1, 2))
  assert np.all(trained > 0), trained  # every layer's router moved from its zero start
  # Its routing health reads its test images' routes: each task's mean route is no longer its
  # xi, and the route now tells images apart within a task.
  health = results["routing"]
  assert sorted(health["usage_by_task"]) == ["mnist", "mnist_blur"]
  logits = pretrained.load(tmp_path / "routed").variables["params"]["mixture_logits"]
  for index, task in enumerate(["mnist", "mnist_blur"]):
    mean_route = np.asarray(health["usage_by_task"][task])
    np.testing.assert_allclose(mean_route.sum(-1), 1.0, rtol=1e-6)
    assert np.abs(mean_route - jax.nn.softmax(logits[index], -1)).max() > 1e-4
  assert max(health["mutual_information"]) > 0
  assert "mean_route" not in results["tasks"]["mnist"]  # read by the health, not a result


def flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")
