"""Shared test setup: eight simulated CPU devices (set before JAX touches its backend), one
persistent compilation cache that every test process and subprocess of the machine shares
(identical steps compile once, across tests, pytest-xdist workers and runs), and, once per test
run for all workers, the embedded digits and the tiny pretrained model several test files start
from."""
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Tests check what the code computes, not how fast: XLA's cheaper compilation cuts the suite's
# time by about a fifth (most tests compile more than they run). Set in the environment before
# JAX starts, so subprocesses of the tests inherit it and stay bit-comparable with them.
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"

import jax  # noqa: E402
import pytest  # noqa: E402

# COMPMOD_TEST_CACHE_DIR overrides it (CI points it at an empty folder, to measure a cold run).
CACHE_DIR = os.environ.get("COMPMOD_TEST_CACHE_DIR") or os.path.join(
    tempfile.gettempdir(), f"compmod_jax_test_cache_{os.getuid()}")
# JAX's own variable, which the configs' compilation_cache_dir defaults to: the commands that
# tests start as subprocesses share this cache instead of the user's.
os.environ["JAX_COMPILATION_CACHE_DIR"] = CACHE_DIR
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
# Every program, however quick to compile: a tiny run compiles ~30 small ones, which add up to
# seconds in every run and subprocess.
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

from compmod_jax.data import embedded_digits  # noqa: E402
from compmod_jax.data.datasets import get_builder  # noqa: E402
from helpers import built_once_per_run  # noqa: E402


def pytest_addoption(parser):
  parser.addoption("--run-slow", action="store_true",
                   help="also run the tests marked slow (those that start other processes, "
                        "the pod configs' end-to-end runs under mock data)")


def pytest_collection_modifyitems(config, items):
  """The README's test command leaves the slow tests out, so that it stays under 10 minutes
  on 2 cores; .ci/run runs them next (pytest -m slow --run-slow)."""
  if config.getoption("--run-slow"):
    return
  skip = pytest.mark.skip(reason="slow end-to-end run: pass --run-slow (CI does)")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)


@pytest.fixture(scope="session")
def embedded_dir(tmp_path_factory):
  """Every embedded_digits config prepared once for the whole run."""
  def prepare(data_dir):
    for config in embedded_digits.EmbeddedDigits.BUILDER_CONFIGS:
      get_builder(f"embedded_digits/{config.name}", str(data_dir))
  return built_once_per_run(tmp_path_factory, "tfds", prepare)


@pytest.fixture(scope="session")
def source_workdir(embedded_dir, tmp_path_factory):
  """configs/digits_multidomain.py:setup=mixture_patches (per-task xi and BN) on two embedded
  domains, mnist and mnist_blur, tiny, trained on 8 devices for 60 steps (checkpoints at 30 and
  60) and tested on the first 400 test digits of each (surgery evaluates it dozens of times):
  the multi-domain test inspects what it learned, and transfer, adaptation and surgery start
  from it. Tests only read it (they copy it before damaging it)."""
  def pretrain(workdir):
    from compmod_jax.train import loop
    from configs import digits_multidomain
    config = digits_multidomain.get_config("setup=mixture_patches,tiny=1")
    config.tasks = {task: config.tasks[task] for task in ("mnist", "mnist_blur")}
    config.data.update(data_dir=str(embedded_dir), eval_split="test[:400]")
    config.update(batch_size=64, eval_batch_size=200, total_steps=60, eval_every=60,
                  checkpoint_every=30)
    config.optimizer.warmup_steps = 5
    config.model.bn_momentum = 0.9  # moving statistics must settle within a few steps
    loop.train_and_evaluate(config, str(workdir))
  return built_once_per_run(tmp_path_factory, "pretrained", pretrain)


@pytest.fixture
def no_heavy_work(monkeypatch):
  """Fails the test if the run reads data or builds the train state."""
  from compmod_jax.train import context, start

  def heavy(*args, **kwargs):
    raise AssertionError("heavy work started before the error")
  monkeypatch.setattr(context, "make_streams", heavy)
  monkeypatch.setattr(start, "create_train_state", heavy)


@pytest.fixture(scope="session")
def svhn_digits_run(tmp_path_factory):
  """configs/digits_svhn_da.py:method=source_only,tiny=1 (the compositional model) on two of
  its sources, mnist and svhn, under mock data (16 examples per split): it pretrains into
  <workdir>/pretrained, then evaluates the target as it starts. The domain adaptation test
  reads it; Table 9's transfer starts from its pretraining. Returns (workdir, config)."""
  from compmod_jax.train import loop
  from configs import digits_svhn_da
  from helpers import mock_datasets
  config = digits_svhn_da.get_config("method=source_only,tiny=1")
  # An embedded domain and the real one (the other two add compile time, not coverage).
  config.pretrain.tasks = {d: config.pretrain.tasks[d] for d in ("mnist", "svhn")}

  def run(folder):
    config.data.data_dir = config.pretrain.data.data_dir = str(folder / "tfds")
    names = set(digits_svhn_da.SOURCES.values()) | {"embedded_digits/uci_digits"}
    with mock_datasets(names, config.data.data_dir, 16):
      loop.train_and_evaluate(config, str(folder / "work"))

  folder = built_once_per_run(tmp_path_factory, "svhn_digits_da", run)
  config.data.data_dir = config.pretrain.data.data_dir = str(folder / "tfds")
  return folder / "work", config


@pytest.fixture
def start_run(embedded_dir):
  """start_run(workdir, *hooks, **kwargs) -> DriverRun; kills what a failed test left running."""
  from helpers import driver_runs
  with driver_runs(embedded_dir) as start:
    yield start


@pytest.fixture
def several_processes(tmp_path_factory):
  """Held by a test while it runs training processes of several processes: one such test at a
  time across the pytest-xdist workers. Three workers each starting two processes on the 2
  cores of the project's machines took more than 3 minutes to reach a first step."""
  from helpers import one_at_a_time
  with one_at_a_time(tmp_path_factory, "several_processes"):
    yield
