"""Helpers every test file shares: tiny configs, a read-only checkpoint reader, subprocess
runs that share the session's compilation cache, free ports, the mock-data block, and runs of
compmod_jax.main under tests/fault_driver.py with what they leave in their workdirs."""
import contextlib
import fcntl
import importlib
import os
import queue
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf
import tensorflow_datasets as tfds
from flax import traverse_util

from compmod_jax.train import checkpoint
from configs import digits
from mock_tfds import checkpointable_mock_dataset, write_mock_metadata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def built_once_per_run(tmp_path_factory, name, build):
  """The folder `name`, filled by build(folder) once per test run: with pytest-xdist, the
  first worker to ask builds it under a file lock and the others wait for it, then share it
  (a module- or session-scoped fixture would otherwise run once in every worker)."""
  root = run_folder(tmp_path_factory)
  folder, done = root / name, root / f"{name}.done"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      folder.mkdir(exist_ok=True)
      build(folder)
      done.touch()
  return folder


def run_folder(tmp_path_factory):
  """The test run's temporary folder, shared by all pytest-xdist workers."""
  root = tmp_path_factory.getbasetemp()
  return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


@contextlib.contextmanager
def one_at_a_time(tmp_path_factory, name):
  """Holds the run-wide lock `name` (across pytest-xdist workers) while the block runs."""
  with open(run_folder(tmp_path_factory) / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    yield


def set_field(config, dotted_key, value):
  """config["a"]["b"] = value for dotted_key "a.b"."""
  *parents, leaf = dotted_key.split(".")
  for parent in parents:
    config = config[parent]
  config[leaf] = value


def with_fields(config, **dotted_overrides):
  """`config` with fields set by dotted keys (**{"model.num_layers": 3})."""
  for key, value in dotted_overrides.items():
    set_field(config, key, value)
  return config


def flat_host(tree):
  """A variable tree on the host as {"/"-joined path: array}."""
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def tiny_digits(data_dir, **overrides):
  """configs/digits.py:tiny on the session's embedded digits, with dotted-key overrides."""
  config = digits.get_config("tiny")
  config.data.data_dir = str(data_dir)
  return with_fields(config, **overrides)


def with_one_hot_xi(variables, signatures):
  """`variables` with mixture logits whose softmax is exactly one-hot at `signatures` (template
  indices, [tasks, layers]): every other logit is -inf, and exp(-inf) is 0."""
  num_templates = variables["params"]["mixture_logits"].shape[-1]
  one_hot = jax.nn.one_hot(jnp.asarray(signatures), num_templates) > 0
  return dict(variables, params=dict(variables["params"],
                                     mixture_logits=jnp.where(one_hot, 0.0, -jnp.inf)))


def read_checkpoint(workdir, step=None):
  """A committed step's saved items {"state", "meta"} as numpy (default: the newest step),
  read without changing anything in the workdir."""
  manager = ocp.CheckpointManager(str(os.path.join(workdir, "checkpoints")),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    step = manager.latest_step() if step is None else step
    return step, jax.device_get(dict(manager.restore(step)))
  finally:
    manager.close()


def subprocess_env(**extra):
  """The environment of a compmod_jax process started by a test: CPU, quiet TF, the tests'
  compilation settings (tests/conftest.py), and this session's persistent compilation cache
  with every program in it, so a subprocess reuses what the tests compiled (and the next
  subprocess what it compiled)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env.update(extra)
  return env


def run_main(*args, module="main", timeout=300, **env):
  """python -m compmod_jax.<module> *args from the repository root; the CompletedProcess."""
  return subprocess.run([sys.executable, "-m", f"compmod_jax.{module}", *args], cwd=REPO,
                        env=subprocess_env(**env), capture_output=True, text=True,
                        timeout=timeout)


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def mock_datasets(names, data_dir, num_examples):
  """The TFDS datasets `names` under tfds.testing.mock_data in `data_dir`: metadata with split
  sizes and a checkpointable reader of random images and labels."""
  for name in names:
    write_mock_metadata(name, data_dir, num_examples)
  with tfds.testing.mock_data(num_examples=num_examples,
                              as_dataset_fn=checkpointable_mock_dataset(num_examples),
                              policy=tfds.testing.MockPolicy.USE_FILES, data_dir=data_dir):
    yield


# Office-Caltech10's domains and classes: its config reads image folders that users bring.
OFFICE_CALTECH10_DOMAINS = ("amazon", "caltech", "dslr", "webcam")
OFFICE_CALTECH10_CLASSES = ("back_pack", "bike", "calculator", "headphones", "keyboard",
                            "laptop_computer", "monitor", "mouse", "mug", "projector")


def office_caltech10_stand_in():
  """A folder tree laid out like Office-Caltech10 (every domain, every class, one 2x2 image):
  enough for the checks and the plan, which read the listing, not the images."""
  root = os.path.join(tempfile.gettempdir(), f"compmod_jax_office_caltech10_{os.getuid()}")
  for domain in OFFICE_CALTECH10_DOMAINS:
    for name in OFFICE_CALTECH10_CLASSES:
      os.makedirs(os.path.join(root, domain, "all", name), exist_ok=True)
      with open(os.path.join(root, domain, "all", name, "0.png"), "wb") as image:
        image.write(tf.io.encode_png(tf.zeros([2, 2, 3], tf.uint8)).numpy())
  return root


# Arguments for configs whose default arguments name data that only users have.
CONFIG_ARGUMENTS = {"office_caltech_da": lambda: f"folder={office_caltech10_stand_in()}"}


def configs_to_check():
  """(label, config) for every experiment config file in configs/ with its default arguments
  (CONFIG_ARGUMENTS where those name a user's folder), and the pretraining config a config
  carries (domain adaptation, Table 9)."""
  names = sorted(name[:-3] for name in os.listdir(os.path.join(REPO, "configs"))
                 if name.endswith(".py") and name != "common.py")
  seen = set()
  for name in names:
    arguments = CONFIG_ARGUMENTS.get(name, lambda: None)()
    config = importlib.import_module(f"configs.{name}").get_config(arguments)
    for label, checked in ((name, config), (f"{name} (pretraining)", config.get("pretrain"))):
      # Configs that share a pretraining recipe yield it once.
      if checked and checked.to_json() not in seen:
        seen.add(checked.to_json())
        yield label, checked


# --- runs of compmod_jax.main in subprocesses (tests/fault_driver.py), and what they leave ---

DRIVER = os.path.join(REPO, "tests", "fault_driver.py")
TOTAL_STEPS = 8
# A short run that checkpoints every other step; 200 test examples keep evaluation quick.
FAULT_RUN = {"total_steps": TOTAL_STEPS, "checkpoint_every": 2, "eval_every": TOTAL_STEPS,
             "log_every": 2, "keep_checkpoints": 3, "data.eval_split": "test[:200]"}
COMPARED = ("params", "ema_params", "batch_stats", "opt_state")


def fault_config(data_dir, **overrides):
  return tiny_digits(data_dir, **{**FAULT_RUN, **overrides})


def committed_steps(workdir):
  return checkpoint.committed_steps(workdir / "checkpoints")


def half_written(workdir):
  return [name for name in os.listdir(workdir / "checkpoints")
          if checkpoint.HALF_WRITTEN_MARK in name]


def saved_state(workdir, step=None):
  """A committed step's train state as numpy, read without touching the workdir."""
  return read_checkpoint(workdir, step)[1]["state"]


def assert_same_state(state, reference):
  for name in COMPARED:
    jax.tree.map(np.testing.assert_array_equal, state[name], reference[name])


def scalar_summaries(workdir):
  """{(tag, step): value} of every scalar in the workdir's TensorBoard files, timings excluded."""
  timings = ("steps_per_sec", "uptime", "eval_seconds")
  scalars = {}
  for name in os.listdir(workdir):
    if name.startswith("events.out.tfevents"):
      for event in tf.compat.v1.train.summary_iterator(str(workdir / name)):
        for value in event.summary.value:
          if value.tag not in timings and value.metadata.plugin_data.plugin_name == "scalars":
            scalars[(value.tag, event.step)] = float(tf.make_ndarray(value.tensor))
  return scalars


class DriverRun:
  """compmod_jax.main in a subprocess (tests/fault_driver.py); its stdout announces steps."""

  def __init__(self, workdir, data_dir, *hooks, flags=(), env=None, log_dir=None):
    """`flags` come last: they override FAULT_RUN. The log goes beside the workdir, or into
    `log_dir`."""
    self.log = (log_dir or workdir.parent) / f"{workdir.name}.{time.time_ns()}.log"
    command = [sys.executable, DRIVER, *hooks, "--", "--config=configs/digits.py:tiny",
               f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
               *(f"--config.{key}={value}" for key, value in FAULT_RUN.items()), *flags]
    with open(self.log, "w") as log:
      self.process = subprocess.Popen(command, cwd=REPO, env=driver_env(env), text=True,
                                      stdout=subprocess.PIPE, stderr=log)
    self.lines = queue.Queue()
    threading.Thread(target=self._read_stdout, daemon=True).start()

  def _read_stdout(self):
    for line in self.process.stdout:
      self.lines.put(line.strip())

  def wait_for(self, wanted, timeout=300):
    """Blocks until the run prints the line `wanted`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
      try:
        if self.lines.get(timeout=1) == wanted:
          return
      except queue.Empty:
        if self.process.poll() is not None:
          break
    raise AssertionError(f"The run never printed {wanted!r}:\n{self.output()[-3000:]}")

  def send(self, signum):
    self.process.send_signal(signum)

  def finish(self, timeout=400):
    return self.process.wait(timeout=timeout)

  def output(self):
    return self.log.read_text()

  def stopped_at(self):
    found = re.findall(r"Stopped at step (\d+) after saving", self.output())
    assert len(found) == 1, self.output()[-3000:]
    return int(found[0])


def driver_env(extra=None):
  """CPU with the 8 devices of the in-process runs (bit-identical results) and their
  compilation cache, every program in it (orbax's many small slicing programs too): each run
  starts seconds faster."""
  return subprocess_env(**{"XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                           **(extra or {})})


@contextlib.contextmanager
def driver_runs(data_dir):
  """start(workdir, *hooks, **kwargs) -> DriverRun on `data_dir`; at the end, kills what is
  still running (a killed parent takes its supervised worker with it)."""
  runs = []

  def start(workdir, *hooks, **kwargs):
    runs.append(DriverRun(workdir, data_dir, *hooks, **kwargs))
    return runs[-1]

  try:
    yield start
  finally:
    for run in runs:
      if run.process.poll() is None:
        run.process.kill()
        run.process.wait()
