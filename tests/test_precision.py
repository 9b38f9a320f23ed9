"""Mixed precision and rematerialisation (config.model.compute_dtype, config.model.remat): what
stays float32, how far bfloat16 moves a trained model's predictions, that remat changes no
gradient, and that neither is part of a checkpoint's identity."""
import logging
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from compmod_jax.finetune import surgery
from compmod_jax.models import blocks, templates
from compmod_jax.models.network import CompositionalIsometricNet
from compmod_jax.models.network_spec import NetworkSpec
from compmod_jax.train import loop, start
from helpers import read_checkpoint, tiny_digits


def spec(**fields):
  """A small digits network: 3 layers mixing 2 templates, 8x8 inputs of 1 channel."""
  return NetworkSpec(**{"tasks": (("a", 10), ("b", 5)), "input_channels": 1, "num_layers": 3,
                        "num_templates": 2, "depth_multiplier": 0.2, "patch_size": 2,
                        "layer_iteration": "loop", **fields})


def images_and_labels(count=16, side=8, seed=0):
  key_x, key_y = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(key_x, (count, side, side, 1)),
          jax.random.randint(key_y, (count,), 0, 10))


@pytest.fixture(scope="module")
def trained_run(source_workdir, embedded_dir):
  """The session's tiny pretrained model (mnist and mnist_blur) with its eval data."""
  run = surgery.load_run(str(source_workdir), str(embedded_dir))
  ctx = surgery.run_context(run.config, "", run.source_tasks)
  return run, ctx


def test_bfloat16_predicts_as_float32_on_a_trained_model(trained_run):
  """A trained model's float32 weights, evaluated in bfloat16, pick the same class for at
  least 99% of the test digits. The logits move by at most 0.5 (they span about 20 here):
  bfloat16 keeps 8 bits of mantissa, a relative error of 2^-9 per rounding, and the 3 blocks,
  adapters and heads round a few dozen times along the way, so a few tenths is its size."""
  run, ctx = trained_run
  logits = {}
  for dtype in ("float32", "bfloat16"):
    config = ml_collections.ConfigDict(run.config.to_dict())
    config.model.compute_dtype = dtype
    model = start.model_for(config, dict(ctx.model.spec.tasks))
    apply = jax.jit(model.apply, static_argnames=("task", "train"))
    logits[dtype] = {task: np.concatenate([
        np.asarray(apply(run.variables, batch["image"], task=task))
        for batch in ctx.eval_streams[task]]) for task in sorted(ctx.eval_streams)}
  for task, exact in logits["float32"].items():
    rounded = logits["bfloat16"][task]
    assert rounded.dtype == np.float32  # logits and everything after them stay float32
    assert len(exact) == 400
    agreement = np.mean(exact.argmax(-1) == rounded.argmax(-1))
    assert agreement >= 0.99, (task, agreement)
    assert np.abs(exact - rounded).max() < 0.5, (task, np.abs(exact - rounded).max())
    assert np.abs(exact - rounded).max() > 0  # it did compute in bfloat16


def test_after_a_bfloat16_train_step_every_state_leaf_is_float32(embedded_dir):
  config = tiny_digits(embedded_dir, **{"model.compute_dtype": "bfloat16",
                                        "model.remat": "full",
                                        "optimizer.warmup_steps": 0})  # step 0 moves them
  ctx = start.make_context(config, "", {})
  state, optimization = start.create_train_state(ctx, start.example_images(config))
  step = start.train_step(ctx, state, optimization)
  before = jax.device_get(state.params)
  state, metrics = step(state, ctx.global_batch({"mnist": next(iter(ctx.train_streams["mnist"]))}))
  for name in ("params", "ema_params", "batch_stats", "opt_state"):
    for path, leaf in jax.tree_util.tree_leaves_with_path(getattr(state, name)):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert leaf.dtype == jnp.float32, (name, jax.tree_util.keystr(path), leaf.dtype)
  for value in jax.tree.leaves(metrics):
    assert value.dtype == jnp.float32
  assert float(metrics["update_skipped"]) == 0
  moved = jax.tree.map(lambda new, old: bool(np.any(np.asarray(new) != old)),
                       jax.device_get(state.params), before)
  assert all(jax.tree.leaves(moved["templates"]))  # the bfloat16 step did update them


def test_mixed_kernels_are_formed_in_float32_and_cast_after_mixing(monkeypatch):
  """The block receives sum_k xi_k W_k computed in float32, then rounded once to bfloat16:
  not a mixture of bfloat16 templates (rounded K times, and summed in bfloat16)."""
  received = []
  original = blocks.inverted_residual

  def recording(x, skip, layer, **kwargs):
    received.append(layer[0])  # the layer's parameters
    return original(x, skip, layer, **kwargs)

  monkeypatch.setattr(blocks, "inverted_residual", recording)
  model = CompositionalIsometricNet(spec(compute_dtype="bfloat16"))
  images, _ = images_and_labels()
  variables = model.init(jax.random.key(0), images)
  received.clear()
  model.apply(variables, images, task="b")
  params = variables["params"]
  xi = templates.mixture_weights(templates.task_mixture_logits(params)[1])
  mixed32 = templates.mix_templates(xi, params["templates"])
  assert len(received) == 3
  differs_from_bf16_mixing = False
  for layer, layer_params in enumerate(received):
    for name, kernel in layer_params.items():
      assert kernel.dtype == jnp.bfloat16, name
      np.testing.assert_array_equal(np.asarray(kernel, np.float32),
                                    np.asarray(mixed32[name][layer].astype(jnp.bfloat16),
                                               np.float32))
      in_bf16 = jnp.einsum("k,k...->...", xi[layer].astype(jnp.bfloat16),
                           params["templates"][name].astype(jnp.bfloat16))
      differs_from_bf16_mixing |= bool(jnp.any(in_bf16 != kernel))
  assert differs_from_bf16_mixing  # the comparison can tell the two orders apart


def training_loss(model_spec, variables, images, labels):
  """params -> task a's cross-entropy in training mode (batch statistics, dropout)."""
  model = CompositionalIsometricNet(model_spec)

  def loss(params):
    logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                            images, task="a", train=True, mutable=["batch_stats"],
                            rngs={"dropout": jax.random.key(1)})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  return loss


def loss_and_grads(model_spec, variables, images, labels):
  loss = training_loss(model_spec, variables, images, labels)
  return jax.jit(jax.value_and_grad(loss))(variables["params"])


@pytest.mark.parametrize("iteration", ["loop", "scan"])
@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_gradients_of_no_remat(remat, iteration):
  """Under lax.scan bit for bit: rematerialisation recomputes the same operations on the same
  inputs, and XLA:CPU compiles the loop body alike. In the Python loop XLA fuses across layers,
  and the recomputed layers fuse differently, so float32 sums are added in another order. A
  gradient entry is a sum over batch and pixels of terms that largely cancel (BN's scale
  gradient sums dy * x_hat to nearly zero), so its rounding error scales with the terms, not
  the result: each leaf agrees to 1e-4 of its largest entry (seen: 4e-5)."""
  images, labels = images_and_labels()
  plain = spec(layer_iteration=iteration)
  variables = CompositionalIsometricNet(plain).init(jax.random.key(0), images)
  loss, grads = loss_and_grads(plain, variables, images, labels)
  remat_loss, remat_grads = loss_and_grads(spec(layer_iteration=iteration, remat=remat),
                                           variables, images, labels)
  assert float(remat_loss) == float(loss)
  for path, value in jax.tree_util.tree_leaves_with_path(grads):
    other = remat_grads
    for key in path:
      other = other[key.key]
    if iteration == "scan":
      np.testing.assert_array_equal(np.asarray(other), np.asarray(value),
                                    err_msg=jax.tree_util.keystr(path))
    else:
      np.testing.assert_allclose(np.asarray(other), np.asarray(value), rtol=0,
                                 atol=1e-4 * float(jnp.abs(value).max()),
                                 err_msg=jax.tree_util.keystr(path))
  assert float(optax.global_norm(grads)) > 0


def test_remat_recomputes_in_the_backward_pass():
  """The remat'd step holds fewer live activations: XLA's temporaries of the compiled
  gradient shrink (what the option is for), while the gradient is unchanged (above)."""
  images, labels = images_and_labels(count=64, side=16)
  temporaries = {}
  for remat in ("none", "full"):
    model_spec = spec(remat=remat, num_layers=6, layer_iteration="scan")
    variables = CompositionalIsometricNet(model_spec).init(jax.random.key(0), images)
    loss = training_loss(model_spec, variables, images, labels)
    compiled = jax.jit(jax.grad(loss)).lower(variables["params"]).compile()
    temporaries[remat] = compiled.memory_analysis().temp_size_in_bytes
  assert temporaries["full"] < 0.8 * temporaries["none"], temporaries


def interrupted_at(monkeypatch, step):
  """Makes the next run stop (after saving) at `step`, as SIGTERM would."""
  monkeypatch.setattr(loop, "stop_requested", lambda watcher, at: at == step)


RUN = {"total_steps": 6, "checkpoint_every": 3, "eval_every": 6, "log_every": 3,
       "data.eval_split": "test[:200]"}


def test_a_float32_checkpoint_resumes_in_bfloat16_with_remat_and_trains_on(
    embedded_dir, tmp_path, monkeypatch, caplog):
  workdir = str(tmp_path / "run")
  interrupted_at(monkeypatch, 2)
  loop.train_and_evaluate(tiny_digits(embedded_dir, **RUN), workdir)
  step, float32_state = read_checkpoint(workdir)
  assert step == 2
  monkeypatch.undo()
  with caplog.at_level(logging.INFO):
    results = loop.train_and_evaluate(
        tiny_digits(embedded_dir, **RUN, **{"model.compute_dtype": "bfloat16",
                                            "model.remat": "full"}), workdir)
  assert re.search(r"Resumed from .* at step 2\.", caplog.text)  # not refused, not restarted
  step, resumed = read_checkpoint(workdir)
  assert step == 6 and results["step"] == 6
  assert np.isfinite(results["tasks"]["mnist"]["test_loss"])
  for name in ("params", "ema_params", "batch_stats"):
    for old, new in zip(jax.tree.leaves(float32_state["state"][name]),
                        jax.tree.leaves(resumed["state"][name])):
      assert new.dtype == np.float32
  changed = [bool(np.any(old != new)) for old, new in zip(
      jax.tree.leaves(float32_state["state"]["params"]["templates"]),
      jax.tree.leaves(resumed["state"]["params"]["templates"]))]
  assert all(changed)


def test_resume_within_a_bfloat16_run_is_bit_identical(embedded_dir, tmp_path, monkeypatch):
  config = lambda: tiny_digits(embedded_dir, **RUN, **{"model.compute_dtype": "bfloat16"})
  loop.train_and_evaluate(config(), str(tmp_path / "straight"))
  interrupted_at(monkeypatch, 3)
  loop.train_and_evaluate(config(), str(tmp_path / "resumed"))
  assert read_checkpoint(tmp_path / "resumed")[0] == 3
  monkeypatch.undo()
  loop.train_and_evaluate(config(), str(tmp_path / "resumed"))
  (step, straight), (_, resumed) = (read_checkpoint(tmp_path / "straight"),
                                    read_checkpoint(tmp_path / "resumed"))
  assert step == 6
  for name in ("params", "ema_params", "batch_stats", "opt_state"):
    jax.tree.map(np.testing.assert_array_equal, straight["state"][name],
                 resumed["state"][name])
