"""Routing by content. config.model.routing='example': every example's xi is its task's mixture
logits plus a router on each layer's pooled input, and the whole block mixes per example.
routing='task_posterior': a domain classifier's posterior p(t|x) mixes the tasks' xi, BN scale,
offset and moving statistics per example in evaluation. config.model.task_free: one network for
every task, which never reads the task."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from compmod_jax.finetune import init_from, pretrained, surgery, transfer
from compmod_jax.models.network import CompositionalIsometricNet
from compmod_jax.models.network_spec import NetworkSpec
from compmod_jax.methods import adaptation, supervised
from compmod_jax.train import loop, steps, validation
from configs import digits_da, digits_multidomain
from helpers import flat_host, tiny_digits, with_one_hot_xi

TASK = NetworkSpec(tasks=(("a", 10), ("b", 10)), input_channels=1, num_layers=4,
                   num_templates=3, patch_size=4, depth_multiplier=0.2, expansion=2)
EXAMPLE = dataclasses.replace(TASK, routing="example")
PER_TASK_BN = dataclasses.replace(TASK, batch_norm="per_task")
POSTERIOR = dataclasses.replace(PER_TASK_BN, routing="task_posterior")
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
    (dict(routing="content"), r"routing must be one of \('task', 'example', 'task_posterior'\)"),
    (dict(routing="example", signature="cyclic"),
     "routing='example' mixes the templates per example, which signature='cyclic'"),
    (dict(routing="example", batch_norm="mixed"), "batch_norm='mixed' .* would need them"),
    (dict(routing="task_posterior", signature="sequential"),
     "routing='task_posterior' mixes the templates per example, which signature='sequential'"),
    (dict(routing="task_posterior", input_adapter="per_task"),
     "infers the task from the input adapter's output.*use input_adapter='shared'"),
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


@pytest.mark.parametrize("routing", ["example", "task_posterior"])
def test_a_per_task_checkpoint_loads_into_a_routed_model_that_trains_only_its_router(
    embedded_dir, source_workdir, tmp_path, routing):
  config = digits_multidomain.get_config("setup=mixture_patches,tiny=1")
  config.tasks = {task: config.tasks[task] for task in ("mnist", "mnist_blur")}
  config.data.update(data_dir=str(embedded_dir), eval_split="test[:400]")
  config.update(batch_size=64, eval_batch_size=200, total_steps=8, eval_every=8,
                checkpoint_every=8, init_from=str(source_workdir), trainable="router",
                save_delta=True)
  config.model.routing = routing
  config.transfer.dont_load = ("^params/router/",)
  results = loop.train_and_evaluate(config, str(tmp_path / "routed"))
  # The run shipped as a delta (its router, new to the base): base + delta is the run's model.
  config.update(save_delta=False, deltas=(str(tmp_path / "routed" / "delta"),))
  rebuilt = flat_host(init_from.pretrained_source(config).variables)
  expected = flat_host(pretrained.load(tmp_path / "routed").variables)
  assert sorted(rebuilt) == sorted(expected)
  for path, value in expected.items():
    np.testing.assert_array_equal(rebuilt[path], value, path)
  source = flat_host(pretrained.load(source_workdir).variables["params"])
  routed = flat_host(pretrained.load(tmp_path / "routed").variables["params"])
  router = {"example": {"router/kernel"}, "task_posterior": {"router/kernel", "router/bias"}}
  assert set(routed) == set(source) | router[routing]
  for path, value in source.items():
    np.testing.assert_array_equal(routed[path], value, path)
  # Every layer's router (example) or every domain's column (task_posterior) moved from zero.
  trained = np.abs(routed["router/kernel"]).sum(axis=(1, 2) if routing == "example" else 0)
  assert np.all(trained > 0), trained
  if routing == "task_posterior":  # what the eval step counted, per task, as a share
    accuracies = [results["tasks"][task][name] for task in ("mnist", "mnist_blur")
                  for name in ("domain_accuracy", "task_given_accuracy")]
    assert all(0 <= accuracy <= 1 and abs(accuracy * 400 - round(accuracy * 400)) < 1e-9
               for accuracy in accuracies), accuracies
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



def with_posterior(variables, log_posterior, kernel_scale=0.0):
  """The classifier's bias at `log_posterior` [tasks] (its kernel zero unless `kernel_scale`):
  a bias of (0, -inf) gives the exactly one-hot posterior (1, 0)."""
  kernel = kernel_scale * jax.random.normal(jax.random.key(5), (TASK.width, 2))
  return dict(variables, params=dict(variables["params"], router={
      "kernel": kernel, "bias": jnp.asarray(log_posterior, jnp.float32)}))


def with_distinct_tasks(variables):
  """Per-task BN scale, offset and moving statistics drawn apart, so that a model using another
  task's rows, or the wrong mixture of them, computes something else."""
  keys = iter(jax.random.split(jax.random.key(11), 64))
  draw = lambda leaf, low, high: jax.random.uniform(next(keys), leaf.shape, minval=low,
                                                    maxval=high)
  bn = {name: {"scale": draw(p["scale"], 0.5, 1.5), "bias": draw(p["bias"], -0.5, 0.5)}
        for name, p in variables["params"]["block_bn"].items()}
  stats = {name: {"mean": draw(s["mean"], -1.0, 1.0), "var": draw(s["var"], 0.5, 2.0)}
           for name, s in variables["batch_stats"]["block_bn"].items()}
  return {"params": dict(variables["params"], block_bn=bn), "batch_stats": {"block_bn": stats}}


def posterior_model():
  return with_distinct_tasks(init(POSTERIOR))


@pytest.mark.parametrize("task_index", [0, 1])
def test_a_one_hot_posterior_is_the_per_task_model_of_that_task_bn_statistics_included(
    task_index):
  variables = posterior_model()
  task = "ab"[task_index]
  forced = with_posterior(variables, jnp.where(jnp.arange(2) == task_index, 0.0, -jnp.inf),
                          kernel_scale=3.0)
  np.testing.assert_array_equal(apply(POSTERIOR, forced, method="domain_posterior"),
                                jnp.broadcast_to(jax.nn.one_hot(task_index, 2), (6, 2)))
  xi = jax.nn.softmax(variables["params"]["mixture_logits"][task_index], -1)
  np.testing.assert_array_equal(apply(POSTERIOR, forced, task=task, method="routes"),
                                jnp.broadcast_to(xi[:, None], (4, 6, 3)))
  np.testing.assert_allclose(apply(POSTERIOR, forced, task=task),
                             apply(PER_TASK_BN, without_router(variables), task=task),
                             **REORDERED)
  # Training routes by the task itself, whatever the posterior: the same program, bit for bit,
  # the same BN statistics folded into that task's row.
  jax.tree.map(np.testing.assert_array_equal,
               train_apply(POSTERIOR, with_posterior(variables, [0.0, -jnp.inf]), task),
               train_apply(PER_TASK_BN, without_router(variables), task))


def test_a_mixed_posterior_mixes_xi_bn_and_the_statistics_by_the_law_of_total_variance():
  """With p(t|x) = (0.3, 0.7) everywhere, every example is the per-task model whose row holds
  xi = sum_t p_t xi_t, the mixed BN scale and offset, and the moving mean and variance of the
  mixture of the two tasks' activations (E[x^2] - mean^2, computed here in float64)."""
  variables = posterior_model()
  p = np.array([0.3, 0.7])
  mixed_model = apply(POSTERIOR, with_posterior(variables, np.log(p)), task="a")
  params = jax.device_get(variables["params"])
  xi = np.einsum("t,tlk->lk", p, jax.nn.softmax(params["mixture_logits"], -1))
  mix = lambda rows: np.einsum("t,t...->...", p, np.asarray(rows, np.float64))

  def mixture_stats(stats):
    mean = mix(stats["mean"])
    second_moment = mix(np.asarray(stats["var"], np.float64) + np.square(stats["mean"]))
    return {"mean": mean, "var": second_moment - np.square(mean)}

  bn = jax.tree.map(lambda rows: np.stack([mix(rows), rows[1]]), params["block_bn"])
  stats = {name: {key: np.stack([value, s[key][1]]) for key, value in mixture_stats(s).items()}
           for name, s in jax.device_get(variables["batch_stats"]["block_bn"]).items()}
  logits = np.stack([np.log(xi), params["mixture_logits"][1]])
  as_per_task = {"params": dict(without_router(variables)["params"], mixture_logits=logits,
                                block_bn=bn),
                 "batch_stats": {"block_bn": jax.tree.map(lambda a: a.astype(np.float32),
                                                          stats)}}
  np.testing.assert_allclose(mixed_model, apply(PER_TASK_BN, as_per_task, task="a"),
                             **REORDERED)
  # With the task given, whatever the posterior, it is the per-task model: the same program.
  for task in "ab":
    np.testing.assert_array_equal(
        apply(POSTERIOR, with_posterior(variables, np.log(p)), task=task,
              method="task_given_logits"),
        apply(PER_TASK_BN, without_router(variables), task=task))


def test_with_the_posterior_an_examples_output_does_not_depend_on_its_batch():
  variables = with_posterior(posterior_model(), [0.0, 0.0], kernel_scale=3.0)
  posterior = apply(POSTERIOR, variables, method="domain_posterior")
  assert float(posterior[:, 0].max() - posterior[:, 0].min()) > 0.1  # the images differ
  whole = apply(POSTERIOR, variables, task="b")
  order = jnp.asarray([4, 0, 5, 2, 1, 3])
  np.testing.assert_allclose(apply(POSTERIOR, variables, IMAGES[order], task="b"), whole[order],
                             rtol=1e-6, atol=1e-6)
  parts = [apply(POSTERIOR, variables, IMAGES[i:j], task="b") for i, j in ((0, 2), (2, 6))]
  np.testing.assert_allclose(jnp.concatenate(parts), whole, rtol=1e-6, atol=1e-6)


def test_the_supervised_loss_trains_the_classifier_on_the_domain_labels_alone():
  """The loss adds the classifier's cross-entropy of every image's domain (here p(t|x) =
  (0.25, 0.75) for every image); its gradient is all the classifier gets, and every other
  parameter's gradient is the per-task model's, the input adapter's included."""
  variables = with_posterior(init(POSTERIOR), np.log([0.25, 0.75]))
  # A classifier that reads the features, whose loss would reach the adapter if it could: a
  # zero column difference keeps p(t|x) at (0.25, 0.75) for every image.
  kernel = jnp.broadcast_to(jax.random.normal(jax.random.key(5), (TASK.width, 1)),
                            (TASK.width, 2))
  variables["params"]["router"] = dict(variables["params"]["router"], kernel=kernel)
  batch = {task: {"image": IMAGES[3 * i:3 * i + 3], "label": jnp.arange(3),
                  "mask": jnp.ones(3)} for i, task in enumerate("ab")}
  weights = {"a": 1.0, "b": 1.0}

  def loss(spec, params):
    return supervised.classification_loss(
        CompositionalIsometricNet(spec), params, variables["batch_stats"], batch,
        jax.random.key(0), weights)

  (total, (_, metrics)), grads = jax.value_and_grad(loss, argnums=1, has_aux=True)(
      POSTERIOR, variables["params"])
  (plain_total, _), plain_grads = jax.value_and_grad(loss, argnums=1, has_aux=True)(
      PER_TASK_BN, without_router(variables)["params"])
  assert float(metrics["a/domain_cross_entropy"]) == pytest.approx(-np.log(0.25), rel=1e-6)
  assert float(metrics["b/domain_cross_entropy"]) == pytest.approx(-np.log(0.75), rel=1e-6)
  assert float(total) == pytest.approx(float(plain_total) - np.log(0.25 * 0.75), rel=1e-6)
  for name in ("input_adapter", "templates", "mixture_logits", "block_bn", "heads"):
    jax.tree.map(np.testing.assert_array_equal, grads[name], plain_grads[name])
  assert float(jnp.abs(grads["router"]["kernel"]).sum()) > 0


def test_evaluation_counts_the_images_whose_domain_the_classifier_infers():
  """And the images the per-task model classifies right with the task given: the labels are
  its own predictions on four of the five real images."""
  variables = posterior_model()
  predicted = jnp.argmax(apply(PER_TASK_BN, without_router(variables), task="a"), -1)
  labels = predicted.at[2].set((predicted[2] + 1) % 10)
  examples = {"image": IMAGES, "label": labels,
              "mask": jnp.asarray([1, 1, 1, 1, 1, 0], jnp.float32)}
  model = CompositionalIsometricNet(POSTERIOR)
  for log_posterior, expected in (([0.0, -jnp.inf], 5), ([-jnp.inf, 0.0], 0)):
    forced = with_posterior(variables, log_posterior)
    state = steps.TrainState(step=0, params=None, batch_stats=forced["batch_stats"],
                             opt_state=None, ema_params=forced["params"])
    sums = steps.eval_step(state, examples, model=model, task="a")
    assert float(sums["domain_correct"]) == expected
    assert float(sums["domain_mass_sum"]) == expected  # p(a|x) is 1 or 0 on 5 real images
    assert float(sums["task_given_correct"]) == 4
    assert float(sums["count"]) == 5


def test_the_own_domain_mass_is_the_mean_posterior_of_the_task_over_real_images():
  variables = with_posterior(posterior_model(), np.log([0.25, 0.75]))
  state = steps.TrainState(step=0, params=None, batch_stats=variables["batch_stats"],
                           opt_state=None, ema_params=variables["params"])
  examples = {"image": IMAGES, "label": jnp.zeros(6, jnp.int32),
              "mask": jnp.asarray([1, 1, 1, 1, 0, 0], jnp.float32)}
  model = CompositionalIsometricNet(POSTERIOR)
  for task, mass in (("a", 0.25), ("b", 0.75)):
    sums = steps.eval_step(state, examples, model=model, task=task)
    assert float(sums["domain_mass_sum"]) == pytest.approx(4 * mass, rel=1e-6)


def test_adaptation_methods_refuse_the_posterior_routing():
  config = digits_da.get_config("method=adversarial,tiny=1")
  config.model.routing = "task_posterior"
  with pytest.raises(ValueError, match="does not train the domain classifier"):
    adaptation.check_config(config)


# One network for both tasks: per-task BN, so that a model reading a task's row would show it.
FREE = dataclasses.replace(PER_TASK_BN, task_free=True)
ONE_TASK = dataclasses.replace(PER_TASK_BN, tasks=(("a", 10),))


def one_task_as_task_free(variables):
  """A one-task model's variables as a task_free model's: the same rows, its head renamed."""
  params = dict(variables["params"], heads={"all_tasks": variables["params"]["heads"]["a"]})
  return dict(variables, params=params)


def test_a_task_free_model_is_one_network_whatever_task_it_is_given():
  """Its variables are a one-task model's (one row of xi, BN and statistics, one head), and
  every task computes that model, in evaluation and in training, statistics included."""
  one = with_distinct_tasks(init(ONE_TASK))
  free = one_task_as_task_free(one)
  shapes = lambda tree: jax.tree.map(jnp.shape, tree)
  assert shapes(init(FREE)) == shapes(free)
  for task in ("a", "b", 1):
    np.testing.assert_array_equal(apply(FREE, free, task=task), apply(ONE_TASK, one, task="a"))
    jax.tree.map(np.testing.assert_array_equal, train_apply(FREE, free, task),
                 train_apply(ONE_TASK, one, "a"))


@pytest.mark.parametrize("routing", ["task", "example"])
def test_the_supervised_loss_runs_every_tasks_images_through_a_task_free_model_together(routing):
  """BN normalises the whole batch at once, as a one-task model on the concatenated images;
  each task's loss is the mean over its own images, weighted by its task weight."""
  free_spec, one_spec = (dataclasses.replace(spec, routing=routing) for spec in (FREE, ONE_TASK))
  one = init(one_spec)
  if routing == "example":
    one = random_router(one, scale=0.5)
  labels = jnp.asarray([3, 1, 4, 1, 5, 9])
  batch = {"a": {"image": IMAGES[:2], "label": labels[:2], "mask": jnp.ones(2)},
           "b": {"image": IMAGES[2:], "label": labels[2:], "mask": jnp.asarray([1., 1., 1., 0.])}}
  weights = {"a": 1.0, "b": 2.0}
  free_loss = supervised.make_loss(
      ml_collections.ConfigDict({"tasks": {t: {"weight": w} for t, w in weights.items()}}),
      free_spec)

  def expected(params):
    logits, updates = apply(one_spec, dict(one, params=params), task="a", train=True,
                            mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
    cross_entropy = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1)[:, 0]
    return (jnp.mean(cross_entropy[:2]) + 2.0 * jnp.mean(cross_entropy[2:5]),
            updates["batch_stats"])

  (total, (stats, metrics)), grads = jax.value_and_grad(
      lambda params: free_loss(CompositionalIsometricNet(free_spec), params,
                               one["batch_stats"], batch, jax.random.key(0)),
      has_aux=True)(one_task_as_task_free(one)["params"])
  (expected_total, expected_stats), expected_grads = jax.value_and_grad(
      expected, has_aux=True)(one["params"])
  assert float(total) == pytest.approx(float(expected_total), rel=1e-6)
  assert float(metrics["b/loss"]) == pytest.approx(
      (float(expected_total) - float(metrics["a/loss"])) / 2.0, rel=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
               stats, expected_stats)
  expected_grads = one_task_as_task_free({"params": expected_grads})["params"]
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
               grads, expected_grads)


@pytest.mark.parametrize("changes,message", [
    (dict(tasks=(("a", 10), ("b", 7))), r"need the same classes; their class counts are "
                                        r"\{'a': 10, 'b': 7\}"),
    (dict(routing="task_posterior"), "has no task to infer"),
    (dict(signature="explicit", explicit_signature=((1, 2, 3, 1), (1, 1, 2, 3))),
     "gives all tasks one signature"),
])
def test_bad_task_free_options_give_one_clear_error(changes, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(FREE, **changes)


def test_task_free_tasks_of_other_classes_are_refused_before_any_work(embedded_dir,
                                                                        no_heavy_work):
  config = digits_multidomain.get_config("tiny=1")
  config.data.data_dir = str(embedded_dir)
  config.model.task_free = True
  config.tasks.mnist.label_map = "parity"
  with pytest.raises(ValueError, match="need the same classes; their class counts are "
                                       "{'mnist': 2, 'mnist_blur': 10"):
    validation.validate(config)


def test_what_needs_per_task_rows_refuses_a_task_free_model(tmp_path, monkeypatch):
  config = digits_da.get_config("method=adversarial,tiny=1")
  config.model.task_free = True
  with pytest.raises(ValueError, match="adapts the target's own rows and head"):
    adaptation.check_config(config)
  config = tiny_digits(tmp_path, **{"model.task_free": True, "init_from": "/nowhere"})
  with pytest.raises(ValueError, match="task_free=True trains one network for all tasks from "
                                       "scratch"):
    transfer.check_config(config)
  run = surgery.TrainedRun(workdir="runs/free", config=config, source_tasks={},
                           variables=None, step=0)
  monkeypatch.setattr(surgery, "load_run", lambda workdir, data_dir: run)
  with pytest.raises(surgery.SurgeryError, match="task_free=True"):
    surgery.load_learned_run("runs/free", None, "hardened")
