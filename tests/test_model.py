"""The network against the paper's definitions (§3.2, §4.1, App. A.1, B, C)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from compmod_jax.analysis import accounting
from compmod_jax.models import ops, templates
from compmod_jax.models.network import CompositionalIsometricNet
from compmod_jax.models.network_spec import NetworkSpec, parse_explicit_signature, task_owners
from compmod_jax.train import optim
from helpers import with_one_hot_xi

L, K = 6, 3
SPEC = NetworkSpec(tasks=(("a", 10),), input_channels=1, num_layers=L, num_templates=K,
                   patch_size=4, depth_multiplier=0.2, expansion=2)
IMAGES = jax.random.normal(jax.random.key(1), (8, 16, 16, 1))


def init(spec, images=IMAGES):
  return CompositionalIsometricNet(spec).init(jax.random.key(0), images)


def init_shapes(spec, images=IMAGES):
  return jax.eval_shape(lambda x: init(spec, x), images)


def apply(spec, variables, images=IMAGES, **kw):
  return CompositionalIsometricNet(spec).apply(variables, images, **kw)


@pytest.fixture(scope="module")
def mixture_variables():
  return init(SPEC)


@pytest.mark.parametrize("input_skip", [False, True], ids=["blocks", "blocks_see_adapter"])
def test_one_hot_xi_reproduces_plain_block_exactly(input_skip):
  spec = dataclasses.replace(SPEC, input_skip=input_skip)
  mixture_variables = init(spec)
  signature = (2, 0, 1, 1, 0, 2)
  variables = with_one_hot_xi(mixture_variables, [signature])
  mixed, _ = apply(spec, variables, method=lambda m, _: m.layer_parameters(0))
  bank = mixture_variables["params"]["templates"]
  for layer, template in enumerate(signature):
    for name, value in mixed.items():
      np.testing.assert_array_equal(value[layer], bank[name][template])
  # The plain network with those per-layer blocks computes the same function, bit for bit.
  plain = dataclasses.replace(spec, signature="plain")
  plain_params = dict(mixture_variables["params"])
  del plain_params["mixture_logits"]
  plain_params["templates"] = jax.tree.map(lambda b: b[jnp.asarray(signature)], bank)
  plain_out = apply(plain, dict(mixture_variables, params=plain_params))
  np.testing.assert_array_equal(apply(spec, variables), plain_out)


def test_blocks_that_see_the_adapter_take_its_output_as_extra_input_channels(
    mixture_variables):
  """input_skip (paper Table 6): each block's 1x1 expansion reads [x, adapter output]; with the
  adapter's rows of the expansion kernel at zero it is the network without the skip."""
  skip_spec = dataclasses.replace(SPEC, input_skip=True)
  width = SPEC.width
  bank = dict(mixture_variables["params"]["templates"])
  expand = bank["expand_kernel"]
  assert init_shapes(skip_spec)["params"]["templates"]["expand_kernel"].shape == (
      K, 2 * width, expand.shape[-1])
  bank["expand_kernel"] = jnp.concatenate([expand, jnp.zeros_like(expand)], axis=1)
  skip_variables = dict(mixture_variables,
                        params=dict(mixture_variables["params"], templates=bank))
  np.testing.assert_allclose(apply(skip_spec, skip_variables), apply(SPEC, mixture_variables),
                             rtol=1e-5, atol=1e-6)
  bank["expand_kernel"] = jnp.concatenate([expand, expand], axis=1)
  assert not np.allclose(apply(skip_spec, skip_variables), apply(SPEC, mixture_variables))


def test_mixed_parameters_are_the_xi_weighted_sum(mixture_variables):
  mixed, _ = apply(SPEC, mixture_variables, method=lambda m, _: m.layer_parameters(0))
  xi = np.asarray(jax.nn.softmax(mixture_variables["params"]["mixture_logits"][0], axis=-1))
  np.testing.assert_allclose(xi.sum(-1), 1.0, rtol=1e-6)
  for name, bank in mixture_variables["params"]["templates"].items():
    expected = np.tensordot(xi, np.asarray(bank, np.float64), axes=1)
    np.testing.assert_allclose(mixed[name], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["sequential", "cyclic", "random", "explicit", "progressive"])
def test_fixed_signature_equals_learned_model_with_one_hot_xi(kind, mixture_variables):
  fixed = dataclasses.replace(SPEC, signature=kind, explicit_signature=(1, 3, 3, 2, 2, 2))
  fixed_params = dict(mixture_variables["params"])
  del fixed_params["mixture_logits"]
  fixed_out = apply(fixed, dict(mixture_variables, params=fixed_params))
  learned = with_one_hot_xi(mixture_variables, fixed.fixed_signatures[:1])
  np.testing.assert_array_equal(fixed_out, apply(SPEC, learned))


def test_signatures_follow_the_paper():
  assert templates.build_signature("sequential", 4, 2) == (0, 0, 1, 1)
  assert templates.build_signature("cyclic", 4, 2) == (0, 1, 0, 1)
  # App. B: the discovered progressive signature (1,2,2,3,3,3,3,4,4,4,4,4) for K=4, L=12.
  assert templates.build_signature("progressive", 12, 4) == tuple(
      t - 1 for t in (1, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 4))
  progressive = templates.build_signature("progressive", 48, 16)
  runs = np.bincount(progressive)
  assert len(progressive) == 48 and runs.min() >= 1 and np.all(np.diff(runs) >= 0)
  assert list(progressive) == sorted(progressive)
  random_sig = templates.build_signature("random", 8, 4, seed=3)
  assert sorted(random_sig) == sorted(templates.build_signature("sequential", 8, 4))
  assert random_sig == templates.build_signature("random", 8, 4, seed=3)
  assert templates.build_signature("explicit", 3, 2, explicit=(1, 2, 2)) == (0, 1, 1)


def test_fixed_signatures_create_no_mixture_logits():
  variables = init_shapes(dataclasses.replace(SPEC, signature="cyclic"))
  assert "mixture_logits" not in variables["params"]
  plain = init_shapes(dataclasses.replace(SPEC, signature="plain"))
  assert plain["params"]["templates"]["project_kernel"].shape[0] == L


def test_mixture_logit_initialisations():
  shape = (2, 4, 4)
  diagonal = templates.init_mixture_logits(jax.random.key(0), "diagonal", shape, 5.0)
  xi = jax.nn.softmax(diagonal, axis=-1)
  np.testing.assert_array_equal(jnp.argmax(xi, -1), np.tile(np.arange(4), (2, 1)))
  assert float(xi.max(-1).min()) > 0.95
  uniform = templates.init_mixture_logits(jax.random.key(0), "uniform", shape, 1.0)
  np.testing.assert_allclose(jax.nn.softmax(uniform, -1), 0.25)
  normal = templates.init_mixture_logits(jax.random.key(0), "normal", (1, 64, 64), 2.0)
  assert abs(float(jnp.std(normal)) - 2.0) < 0.1


def test_gradients_reach_templates_and_mixture_logits(mixture_variables):
  labels = jnp.arange(8) % 10

  def loss(params):
    logits, _ = apply(SPEC, dict(mixture_variables, params=params), train=True,
                      mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1))

  grads = jax.jit(jax.grad(loss))(mixture_variables["params"])
  for name, grad in grads["templates"].items():
    per_template = jnp.abs(grad).reshape(K, -1).sum(-1)
    assert bool(jnp.all(per_template > 0)), f"no gradient reaches every template of {name}"
  assert bool(jnp.all(jnp.abs(grads["mixture_logits"]).sum(-1) > 0))


def test_parameter_counts_match_formulas_and_table7():
  for design, spec in accounting.table7_specs().items():
    ours = accounting.component_counts(spec)
    assert ours == accounting.formula_counts(spec)
    column = 0 if design == "small" else 1
    for component, paper in accounting.PAPER_TABLE7.items():
      assert abs(ours[component] - paper[column]) <= 0.1 * paper[column], (design, component)
  skip = dataclasses.replace(SPEC, input_skip=True)
  assert accounting.component_counts(skip) == accounting.formula_counts(skip)


@pytest.mark.parametrize("shape,patch", [((2, 28, 28, 1), 2), ((2, 32, 32, 3), 4),
                                         ((2, 224, 224, 3), 16)])
def test_output_shapes(shape, patch):
  spec = dataclasses.replace(SPEC, input_channels=shape[-1], patch_size=patch,
                             tasks=(("a", 10), ("b", 100)))
  images = jnp.ones(shape)
  variables = init_shapes(spec, images)
  for task, classes in spec.tasks:
    logits = jax.eval_shape(lambda v, x, t=task: apply(spec, v, x, task=t), variables, images)
    assert logits.shape == (2, classes)
  features = jax.eval_shape(lambda v, x: apply(spec, v, x, method="body_features"),
                            variables, images)
  assert features.shape == (2, shape[1] // patch, shape[2] // patch, spec.width)


def test_moving_statistics_are_per_task_and_layer():
  spec = dataclasses.replace(SPEC, tasks=(("a", 10), ("b", 5)))
  variables = init(spec)
  _, updated = apply(spec, variables, task="b", train=True, mutable=["batch_stats"],
                     rngs={"dropout": jax.random.key(0)})
  for old, new in zip(jax.tree.leaves(variables["batch_stats"]),
                      jax.tree.leaves(updated["batch_stats"])):
    np.testing.assert_array_equal(old[0], new[0])  # task "a" untouched
    assert bool(jnp.all(jnp.any(old[1] != new[1], axis=-1)))  # every layer of "b" moved


def test_batch_norm_modes_create_the_right_parameters():
  mixed = init_shapes(dataclasses.replace(SPEC, batch_norm="mixed"))["params"]
  assert "block_bn" not in mixed
  assert mixed["templates"]["bn"]["expand"]["scale"].shape == (K, SPEC.expanded)
  per_task = init_shapes(dataclasses.replace(SPEC, batch_norm="per_task",
                                             tasks=(("a", 3), ("b", 4))))["params"]
  assert per_task["block_bn"]["project"]["bias"].shape == (2, L, SPEC.width)


def test_scan_and_loop_compute_the_same_function(mixture_variables):
  outputs = {}
  for mode in ("loop", "scan"):
    spec = dataclasses.replace(SPEC, layer_iteration=mode, scan_unroll=2)
    outputs[mode] = apply(spec, mixture_variables, train=True, mutable=["batch_stats"],
                          rngs={"dropout": jax.random.key(0)})
  np.testing.assert_allclose(outputs["loop"][0], outputs["scan"][0], rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               outputs["loop"][1], outputs["scan"][1])


def test_shifted_depthwise_conv_equals_native_and_its_gradient():
  x = jax.random.normal(jax.random.key(0), (2, 5, 7, 4))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 4))
  for impl_args in [(x, kernel)]:
    np.testing.assert_allclose(ops.depthwise_conv3x3(*impl_args, "shifted"),
                               ops.depthwise_conv3x3(*impl_args, "native"), rtol=1e-5,
                               atol=1e-5)
  grad = lambda impl: jax.grad(lambda a, k: jnp.sum(ops.depthwise_conv3x3(a, k, impl) ** 2),
                               argnums=(0, 1))(x, kernel)
  for shifted, native in zip(grad("shifted"), grad("native")):
    np.testing.assert_allclose(shifted, native, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("relu", [False, True])
def test_batch_norm_custom_gradient_matches_autodiff(relu):
  """ops.batch_norm_train's custom VJP, alone and with the ReLU fused into it, against autodiff
  of the textbook formula (batch statistics, biased variance)."""
  x = jax.random.normal(jax.random.key(0), (4, 3, 3, 5)) * 3 + 1
  scale, bias = jnp.linspace(0.5, 2, 5), jnp.linspace(-1, 1, 5)
  weights = jax.random.normal(jax.random.key(1), x.shape)

  def reference(x, scale, bias):
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    normalised = (x - mean) / jnp.sqrt(var + 1e-3) * scale + bias
    return jax.nn.relu(normalised) if relu else normalised

  custom = lambda *a: ops.batch_norm_train(*a, 1e-3, relu=relu)[0]
  np.testing.assert_allclose(custom(x, scale, bias), reference(x, scale, bias), rtol=1e-5,
                             atol=1e-5)
  gradients = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) * weights), argnums=(0, 1, 2))(
      x, scale, bias) for f in (custom, reference)]
  for c, a in zip(*gradients):
    np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-4)


def test_block_with_and_without_fused_bn_relu_agree(mixture_variables, monkeypatch):
  # A new jit each call: FUSE_BN_RELU is read while tracing.
  run = lambda: jax.jit(jax.grad(lambda v: jnp.sum(apply(
      SPEC, v, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})[0] ** 2),
      allow_int=True))(mixture_variables)
  fused = run()
  monkeypatch.setattr(ops, "FUSE_BN_RELU", False)
  unfused = run()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), fused,
               unfused)


def test_sharded_forward_equals_single_device(mixture_variables):
  assert len(jax.devices()) == 8
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  replicated = jax.device_put(mixture_variables, NamedSharding(mesh, P()))
  sharded_images = jax.device_put(IMAGES, NamedSharding(mesh, P("data")))
  step = jax.jit(lambda v, x: apply(SPEC, v, x, train=True, mutable=["batch_stats"],
                                    rngs={"dropout": jax.random.key(0)}))
  single = step(mixture_variables, IMAGES)
  sharded = step(replicated, sharded_images)
  assert sharded[0].sharding.spec == P("data")
  # The same math; BN's batch statistics are summed across devices in another order, which
  # moves the logits by a few float32 roundings (measured: 2e-6 at 0.08).
  np.testing.assert_allclose(sharded[0], single[0], rtol=1e-4, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               sharded[1], single[1])


@pytest.mark.parametrize("field,value,message", [
    ("num_templates", 0, "num_templates must be a positive"),
    ("signature", "zigzag", "signature must be one of"),
    ("explicit_signature", (1, 2), "has 2 entries but num_layers is 6"),
    ("batch_norm", "shared", "batch_norm must be one of"),
])
def test_bad_model_config_values_give_clear_errors(field, value, message):
  changes = {field: value}
  if field == "explicit_signature":
    changes["signature"] = "explicit"
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(SPEC, **changes)


def test_shared_early_layers_give_every_task_one_xi_row_trained_by_all_tasks():
  """model.shared_mixture_layers = n (paper Tables 11/12): one [n, K] parameter holds the first
  n layers' logits of every task; the model equals one whose tasks each hold a copy of it."""
  shared = dataclasses.replace(SPEC, tasks=(("a", 10), ("b", 10)), shared_mixture_layers=2)
  variables = init(shared)
  params = variables["params"]
  assert params["shared_mixture_logits"].shape == (2, K)
  assert params["mixture_logits"].shape == (2, L - 2, K)
  every_task = templates.task_mixture_logits(params)
  np.testing.assert_array_equal(every_task[0, :2], every_task[1, :2])
  np.testing.assert_array_equal(every_task[:, 2:], params["mixture_logits"])
  unshared = dataclasses.replace(shared, shared_mixture_layers=0)
  copies = dict(variables, params={k: v for k, v in params.items()
                                   if k != "shared_mixture_logits"} | {
                                       "mixture_logits": every_task})
  for task in ("a", "b"):
    np.testing.assert_array_equal(apply(shared, variables, task=task),
                                  apply(unshared, copies, task=task))

  def loss(shared_logits, task):
    changed = dict(variables, params=dict(params, shared_mixture_logits=shared_logits))
    return jnp.sum(apply(shared, changed, task=task) ** 2)
  grad_a, grad_b = (jax.grad(loss)(params["shared_mixture_logits"], t) for t in ("a", "b"))
  assert np.abs(grad_a).max() > 0 and np.abs(grad_b).max() > 0
  both = jax.grad(lambda s: loss(s, "a") + loss(s, "b"))(params["shared_mixture_logits"])
  np.testing.assert_allclose(both, grad_a + grad_b, rtol=1e-5, atol=1e-7)
  # One optimizer group with the tasks' own rows; owned by no task, so a new task that a
  # transfer run adds cannot move it.
  assert optim.group_labels(params)["shared_mixture_logits"] == "mixture_logits"
  assert task_owners(shared, "params/shared_mixture_logits") is None


@pytest.mark.parametrize("field, value, message", [
    ("shared_mixture_layers", L, r"must be in 0\.\.5"),
    ("explicit_signature", ((1, 2, 3, 1, 2, 3),), r"gives 1 per-task signatures but the model "
                                                   r"has 2 tasks"),
])
def test_shared_and_per_task_signature_fields_are_checked(field, value, message):
  changes = {field: value, "tasks": (("a", 10), ("b", 10))}
  if field == "explicit_signature":
    changes["signature"] = "explicit"
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(SPEC, **changes)


def test_per_task_explicit_signatures_select_each_tasks_templates():
  assert parse_explicit_signature("1,2,3,3,2,1;3,3,3,1,1,1") == ((1, 2, 3, 3, 2, 1),
                                                                 (3, 3, 3, 1, 1, 1))
  assert parse_explicit_signature("1,2, 3") == (1, 2, 3)
  with pytest.raises(ValueError, match="explicit_signature='1,x'"):
    parse_explicit_signature("1,x")
  tasks = (("a", 10), ("b", 10))
  per_task = dataclasses.replace(SPEC, tasks=tasks, signature="explicit",
                                 explicit_signature=((1, 2, 3, 3, 2, 1), (3, 3, 3, 1, 1, 1)))
  variables = init(per_task)
  for task, signature in zip(("a", "b"), per_task.explicit_signature):
    alone = dataclasses.replace(per_task, explicit_signature=signature)
    np.testing.assert_array_equal(apply(per_task, variables, task=task),
                                  apply(alone, variables, task=task))
