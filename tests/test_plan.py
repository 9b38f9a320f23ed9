"""python -m compmod_jax.plan: every pod config's sharded train step at its real shapes on 8
devices, without data; one large-design config compiled, with its costs."""
import json
import re

import jax
import numpy as np
import pytest

from compmod_jax import plan
from configs import digits, digits_transfer, imagenet_table1
from helpers import configs_to_check, run_main


def pod_configs():
  """The configs whose datasets are real TFDS datasets, the ones that run on pods: their
  steps are lowered at full size here. The embedded-digits configs run end to end in the
  other tests."""
  for label, config in configs_to_check():
    if any(not task.dataset.startswith("embedded_digits/") for task in config.tasks.values()):
      yield label, config


@pytest.mark.parametrize("label, config", list(pod_configs()),
                         ids=[label for label, _ in pod_configs()])
def test_every_pod_config_lowers_its_sharded_step_at_its_real_shapes(label, config):
  if config.trainable and not (config.init_from or config.get("pretrain")):
    config.init_from = "a/pretrained/workdir"  # as its docstring runs it; the plan reads none
  # Traced through lax.scan over the layers: the same shapes and shardings as the unrolled
  # loop these depths use, in a fraction of the tracing time (the plan compiles the real one).
  config.model.layer_iteration = "scan"
  lowered, state, _ = plan.lower(config)
  side = config.data.image_size
  assert f"x{side}x{side}x{config.data.channels}xf32>" in lowered.as_text(), label
  assert jax.tree.leaves(state.params)[0].sharding.is_fully_replicated


def test_the_plan_of_a_large_design_config_counts_what_it_compiled():
  config = imagenet_table1.get_config("K=8,L=8")
  config.batch_size = 64  # 8 per device: the program's shapes, not its size, are the point here
  result = plan.plan(config)
  spec_params = result["parameters"]
  assert spec_params["total"] == sum(spec_params["per_group"].values())
  assert set(spec_params["per_group"]) == {"batch_norm", "templates", "input_adapter",
                                           "output_adapter", "heads"}  # plain: no xi
  assert spec_params["per_group"]["heads"] == 1280 * 1000 + 1000  # large design, ImageNet
  assert result["per_device_batch"] == {"imagenet2012": 8}
  assert result["image_shape"] == [224, 224, 3]
  # One step is at least the forward and backward of each block's 1x1 convolutions (2 FLOPs a
  # multiply-add, forward + two backward products): 3 x 2 x 2 x tokens x 40 x 240 per block.
  tokens = 64 * 28 * 28
  assert result["flops_per_step"] > 8 * 3 * 2 * 2 * tokens * 40 * 240
  assert result["flops_per_step"] == pytest.approx(8 * result["flops_per_step_per_device"])
  params_bytes = 4 * spec_params["total"]
  assert result["bytes_per_device"] > 3 * params_bytes  # params, EMA, optimizer state, ...
  assert (result["compute_dtype"], result["remat"]) == ("bfloat16", "none")  # as configured
  # What the forward pass keeps: at least each block's input, expansion and depthwise output,
  # 2 bytes each in bfloat16.
  assert result["saved_activation_bytes_per_device"] > 2 * 8 * 8 * 28 * 28 * (40 + 2 * 240)


def test_precision_and_remat_shrink_what_the_step_keeps():
  config = digits.get_config()
  costs = {name: plan.step_cost(variant)[0]
           for name, variant in plan.precision_variants(config).items()}
  saved = {name: cost["saved_activation_bytes_per_device"] for name, cost in costs.items()}
  # bfloat16 halves the activations (parameters and BN's float32 statistics stay).
  assert 0.45 < saved["bfloat16"] / saved["float32"] < 0.6, saved
  # remat=full keeps each layer's input only: 8 layers of 16 x 7 x 7 x 24 in bfloat16, plus
  # the adapters' activations and the parameters the recomputation reads.
  assert saved["bfloat16+remat=full"] < 0.1 * saved["bfloat16"], saved
  flops = {name: cost["flops_per_step"] for name, cost in costs.items()}
  assert flops["bfloat16+remat=full"] > 1.2 * flops["bfloat16"]  # the forward pass again


def test_a_step_over_the_memory_limit_is_told_what_fits_and_the_largest_batch():
  config = digits.get_config()  # 16 examples per device on 8 devices
  config.model.num_layers = 2  # the search compiles about 12 steps: 2 layers halve its time
  needed = plan.step_cost(config)[0]["bytes_per_device"]
  limit_gb = 0.6 * needed / 2**30
  with pytest.raises(plan.PlanError) as refused:
    plan.plan(config, device_memory_gb=limit_gb)
  message = str(refused.value)
  assert re.search(r"needs .* GiB per device .* more than --device_memory_gb=", message)
  # At 2 layers activations are a smaller share of the step: only bfloat16 with remat fits.
  assert "--config.model.compute_dtype=bfloat16 --config.model.remat=full" in message
  assert "--config.model.compute_dtype=float32 --config.model.remat=none" not in message
  largest = int(re.search(r"largest batch that fits is (\d+) examples per device: "
                          r"--config.batch_size=(\d+)", message).group(2))
  assert largest < config.batch_size and largest % 8 == 0
  for batch_size, fits in ((largest, True), (largest + 8, False)):
    config.batch_size = batch_size
    assert (plan.step_cost(config)[0]["bytes_per_device"] <= limit_gb * 2**30) == fits


def test_a_batch_that_does_not_divide_over_the_devices_is_refused():
  config = digits.get_config()
  config.batch_size = 100
  with pytest.raises(plan.PlanError, match=r"config.batch_size=100 must be divisible by the "
                                           r"number of devices \(8\); try 96"):
    plan.lower(config)


@pytest.mark.slow
def test_the_command_prints_one_json_object(tmp_path):
  result = run_main("--config=configs/digits.py:tiny", "--num_devices=2", module="plan")
  assert result.returncode == 0, result.stderr[-3000:]
  printed = json.loads(result.stdout)
  assert printed["devices"] == 2 and printed["per_device_batch"] == {"mnist": 16}
  assert np.isfinite(printed["flops_per_step"]) and printed["compile_seconds"] > 0


def test_a_transfer_plan_holds_the_tasks_of_the_checkpoint_it_starts_from(source_workdir):
  config = digits_transfer.get_config("tiny=1")
  config.init_from = str(source_workdir)
  assert plan.source_tasks(config) == {"mnist": 10, "mnist_blur": 10}
  _, state, _ = plan.lower(config)
  assert set(state.params["heads"]) == {"mnist", "mnist_blur", "uci_digits"}
  assert state.params["mixture_logits"].shape[0] == 3
  config.init_from = "a/workdir/not/here"
  assert plan.source_tasks(config) == {}


def test_flops_count_every_layer_of_a_scanned_model():
  """XLA counts a loop's body once: a scanned model's step would read as one layer."""
  config = digits.get_config("tiny")
  config.model.layer_iteration = "loop"
  unrolled = plan.step_flops(plan.lower(config)[0])
  config.model.layer_iteration = "scan"
  assert plan.step_flops(plan.unrolled_lowering(config)) == unrolled
  assert plan.step_flops(plan.lower(config)[0]) < 0.7 * unrolled  # what the fix is for
