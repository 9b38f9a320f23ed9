"""Shared test setup: eight simulated CPU devices (set before JAX touches its backend), one
compilation cache for the session (identical steps compile once across tests), and the
embedded digits prepared once."""
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="compmod_jax_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

from compmod_jax.data import embedded_digits  # noqa: E402
from compmod_jax.data.pipeline import get_builder  # noqa: E402
from compmod_jax.methods import multitask  # noqa: E402


@pytest.fixture(scope="session")
def embedded_dir(tmp_path_factory):
  """Every embedded_digits config prepared once for the whole session."""
  data_dir = tmp_path_factory.mktemp("tfds")
  for config in embedded_digits.EmbeddedDigits.BUILDER_CONFIGS:
    get_builder(f"embedded_digits/{config.name}", str(data_dir))
  return data_dir


@pytest.fixture(scope="session")
def source_workdir(embedded_dir, tmp_path_factory):
  """A tiny model pretrained on two embedded domains, mnist and mnist_blur, on 8 devices
  (per-task xi and BN: setup mixture_patches): the checkpoint transfer and adaptation start
  from."""
  from compmod_jax.train import defaults, loop
  config = defaults.digits_multitask(
      {task: defaults.task(f"embedded_digits/{task}") for task in ("mnist", "mnist_blur")},
      tiny=True)
  multitask.apply_setup(config.model, "mixture_patches")
  config.data.data_dir = str(embedded_dir)
  config.eval_batch_size = 200
  workdir = tmp_path_factory.mktemp("pretrained")
  loop.train_and_evaluate(config, str(workdir))
  return workdir
