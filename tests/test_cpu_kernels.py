"""The one-pass CPU depthwise kernel gradient (models/cpu_kernels) against the definition of a
3x3 depthwise correlation and XLA's grouped convolution, and the fallback without it."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compmod_jax.models import cpu_kernels, ops
from compmod_jax.models.network import CompositionalIsometricNet
from compmod_jax.models.network_spec import NetworkSpec

# Odd sizes, batch 1, a 1x1 image (only the centre tap sees data), one channel, and the
# expanded activation of the digits model.
SHAPES = [(1, 1, 1, 3), (1, 5, 7, 3), (3, 9, 4, 5), (1, 2, 13, 1), (2, 14, 14, 144)]

# Where a compiler exists the kernel must build: a broken build fails these tests.
needs_kernel = pytest.mark.skipif(cpu_kernels.compiler() is None, reason="no C++ compiler here")


def kernel_grad_by_definition(x, dy):
  """dkernel[i, j, c] = sum_{n,h,w} x[n, h+i-1, w+j-1, c] dy[n, h, w, c], x zero outside."""
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  height, width = x.shape[1:3]
  return np.stack([np.stack([np.einsum("nhwc,nhwc->c", padded[:, i:i + height, j:j + width],
                                       dy) for j in range(3)]) for i in range(3)])


def random_arrays(shape, dtype, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=shape).astype(dtype), rng.normal(size=(3, 3, shape[-1])).astype(dtype),
          rng.normal(size=shape).astype(dtype))


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
def test_values_and_gradients_equal_the_grouped_convolution_in_float64(shape):
  assert cpu_kernels.available()
  with jax.enable_x64(True):
    x, kernel, cotangent = random_arrays(shape, np.float64)
    outputs = {}
    for impl in ("native", "cpu_kernel"):
      y, vjp = jax.vjp(lambda a, k, impl=impl: ops.depthwise_conv3x3(a, k, impl), x, kernel)
      outputs[impl] = (y, *vjp(cotangent))
    assert outputs["cpu_kernel"][0].dtype == jnp.float64
    for ours, reference in zip(outputs["cpu_kernel"], outputs["native"]):
      np.testing.assert_allclose(ours, reference, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(outputs["cpu_kernel"][2], kernel_grad_by_definition(x, cotangent),
                               rtol=1e-12, atol=1e-12)


@needs_kernel
def test_float32_kernel_gradient_is_the_definition_and_does_not_depend_on_threads():
  x, _, dy = random_arrays((16, 7, 7, 144), np.float32)  # large enough to use both threads
  first = np.asarray(jax.jit(cpu_kernels.depthwise3x3_kernel_grad)(x, dy))
  again = np.asarray(jax.jit(cpu_kernels.depthwise3x3_kernel_grad)(x, dy))
  np.testing.assert_array_equal(first, again)
  np.testing.assert_allclose(first, kernel_grad_by_definition(x.astype(np.float64), dy),
                             rtol=1e-4, atol=1e-3)
  # Under vmap (a stacked axis of tasks or layers) each member gets its own gradient.
  stacked = jax.vmap(cpu_kernels.depthwise3x3_kernel_grad)(np.stack([x, -x]), np.stack([dy, dy]))
  np.testing.assert_array_equal(stacked[0], first)
  np.testing.assert_array_equal(stacked[1], -first)


@needs_kernel
def test_auto_uses_the_kernel_on_one_cpu_device_only(monkeypatch):
  assert len(jax.devices()) == 8 and ops.resolve_conv_impl("auto") == "shifted"
  one_device = jax.devices()[:1]
  monkeypatch.setattr(jax, "devices", lambda *args, **kwargs: one_device)
  assert ops.resolve_conv_impl("auto") == "cpu_kernel"
  x, kernel, _ = random_arrays((2, 5, 5, 4), np.float32)
  gradient = jax.make_jaxpr(jax.grad(lambda k: jnp.sum(ops.depthwise_conv3x3(x, k, "cpu_kernel"))))
  assert cpu_kernels.TARGET in str(gradient(kernel))


def tiny_spec(**overrides):
  return NetworkSpec(tasks=(("a", 10),), input_channels=1, num_layers=2, num_templates=2,
                     patch_size=4, depth_multiplier=0.2, expansion=2, **overrides)


def network_loss(spec, variables, images, labels):
  logits, _ = CompositionalIsometricNet(spec).apply(
      variables, images, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(2)})
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@needs_kernel
def test_the_networks_gradient_is_the_same_with_the_kernel_in_float64():
  """The whole training loss (templates mixed by xi, BN in training mode, SE, dropout) through
  the kernel and through the shifted copies: equal values and parameter gradients."""
  with jax.enable_x64(True):
    images = jax.random.normal(jax.random.key(1), (4, 16, 16, 1), jnp.float64)
    labels = jnp.arange(4) % 10
    variables = CompositionalIsometricNet(tiny_spec()).init(jax.random.key(0), images)
    results = {impl: jax.value_and_grad(
        lambda p, impl=impl: network_loss(tiny_spec(conv_impl=impl), {**variables, "params": p},
                                          images, labels))(variables["params"])
               for impl in ("shifted", "cpu_kernel")}
    np.testing.assert_allclose(results["cpu_kernel"][0], results["shifted"][0], rtol=1e-12)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12),
                 results["cpu_kernel"][1], results["shifted"][1])
    depthwise = results["cpu_kernel"][1]["templates"]["depthwise_kernel"]
    assert depthwise.dtype == jnp.float64 and np.abs(depthwise).max() > 0


def test_without_a_compiler_the_model_falls_back_with_one_log_line_and_still_trains(
    monkeypatch, tmp_path, caplog):
  # As in a one-device run, where `auto` would otherwise take the kernel (the tests simulate 8).
  one_device = jax.devices()[:1]
  monkeypatch.setattr(jax, "devices", lambda *args, **kwargs: one_device)
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  monkeypatch.setenv("COMPMOD_KERNEL_CACHE", str(tmp_path / "empty-cache"))
  cpu_kernels.available.cache_clear()
  try:
    with caplog.at_level(logging.WARNING):
      assert not cpu_kernels.available()
      assert ops.resolve_conv_impl("auto") == "shifted"
    lines = [r.getMessage() for r in caplog.records if "depthwise kernel" in r.getMessage()]
    assert len(lines) == 1 and "no C++ compiler" in lines[0] and "shifted-copies" in lines[0]
    with pytest.raises(ValueError, match=r"config\.model\.conv_impl='cpu_kernel' needs its C\+\+ "
                                         r"kernel, which could not be built.*'auto' or 'shifted'"):
      tiny_spec(conv_impl="cpu_kernel")
    images = jax.random.normal(jax.random.key(1), (16, 16, 16, 1))
    labels = jnp.arange(16) % 10
    variables = CompositionalIsometricNet(tiny_spec()).init(jax.random.key(0), images)

    def loss(params):
      return network_loss(tiny_spec(), {**variables, "params": params}, images, labels)

    assert cpu_kernels.TARGET not in str(jax.make_jaxpr(jax.grad(loss))(variables["params"]))
    optimizer = optax.adam(1e-2)

    @jax.jit
    def step(params, state):
      updates, state = optimizer.update(jax.grad(loss)(params), state)
      return optax.apply_updates(params, updates), state

    params, state = variables["params"], optimizer.init(variables["params"])
    first = float(loss(params))
    for _ in range(20):
      params, state = step(params, state)
    assert float(loss(params)) < 0.5 * first
  finally:
    cpu_kernels.available.cache_clear()  # later tests build or find the kernel again
