"""Shared pieces of the CPU benchmarks: the model spec, a jitted training step, timing helpers.

The training step matches the PyTorch one in benchmarks/torch_reference.py: softmax
cross-entropy, optax.rmsprop(0.02, decay=0.9, eps=1e-8), BN in training mode (batch
statistics, moving averages updated), dropout as in the model, params and optimizer state donated.
"""
import argparse
import importlib.util
import os
import platform
import statistics
import time

import jax
import optax

from compmod_jax.models.network import CompositionalIsometricNet
from compmod_jax.models.network_spec import NetworkSpec

TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


def digits_spec(**overrides):
  """The digits default shape: 28x28x1 input, patch 2 -> 14x14x24 activations, L=16, K=4."""
  fields = dict(tasks=(("digits", 10),), input_channels=1, num_layers=16, num_templates=4,
                depth_multiplier=0.6, patch_size=2)
  fields.update(overrides)
  return NetworkSpec(**fields)


def load_config(path):
  """The config of a config file (configs/<name>.py), with its default argument."""
  spec = importlib.util.spec_from_file_location("benchmark_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def random_batch(batch=128, hw=28, channels=1, classes=10, seed=0):
  key_x, key_y = jax.random.split(jax.random.key(seed))
  images = jax.random.normal(key_x, (batch, hw, hw, channels))
  labels = jax.random.randint(key_y, (batch,), 0, classes)
  return images, labels


class TrainStep:
  """A compiled training step for one spec; `run(n)` times n steps (seconds per step)."""

  def __init__(self, spec, batch=128, hw=28, seed=0):
    self.spec = spec
    self.model = CompositionalIsometricNet(spec)
    self.images, self.labels = random_batch(batch, hw, spec.input_channels,
                                            spec.tasks[0][1], seed)
    variables = self.model.init(jax.random.key(seed), self.images)
    self.params, self.batch_stats = variables["params"], variables["batch_stats"]
    self.optimizer = optax.rmsprop(0.02, decay=0.9, eps=1e-8)
    self.opt_state = self.optimizer.init(self.params)
    self.key = jax.random.key(seed + 1)
    model, optimizer = self.model, self.optimizer

    def step(params, opt_state, batch_stats, images, labels, key):
      key, dropout_key = jax.random.split(key)

      def loss_fn(p):
        logits, updates = model.apply({"params": p, "batch_stats": batch_stats}, images,
                                      train=True, mutable=["batch_stats"],
                                      rngs={"dropout": dropout_key})
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, updates["batch_stats"]

      (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      return params, opt_state, new_stats, key, loss

    self._jitted = jax.jit(step, donate_argnums=(0, 1, 2))
    self.compiled = None
    self.compile_s = None

  def args(self):
    return (self.params, self.opt_state, self.batch_stats, self.images, self.labels, self.key)

  def compile(self):
    """Lowers and compiles; returns the seconds `.lower(...).compile()` took."""
    start = time.perf_counter()
    self.compiled = self._jitted.lower(*self.args()).compile()
    self.compile_s = time.perf_counter() - start
    return self.compile_s

  def step(self):
    if self.compiled is None:
      self.compile()
    self.params, self.opt_state, self.batch_stats, self.key, loss = self.compiled(*self.args())
    return loss

  def run(self, n):
    loss = self.step()  # not timed: makes sure no earlier work is pending
    loss.block_until_ready()
    start = time.perf_counter()
    for _ in range(n):
      loss = self.step()
    loss.block_until_ready()
    return (time.perf_counter() - start) / n


def alternate(runners, rounds, steps, warmup=1):
  """Times each runner `rounds` times, alternating in the order given; returns {name: [s/step]}.

  runners: {name: callable(n) -> seconds per step}. The first `warmup` rounds are dropped.
  """
  times = {name: [] for name in runners}
  for r in range(rounds + warmup):
    for name, run in runners.items():
      t = run(steps)
      if r >= warmup:
        times[name].append(t)
  return times


def median(values):
  return statistics.median(values)


def machine_header():
  """One line about the machine and software the numbers were taken on."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    if names:
      cpu = f"{cpu} ({names[0]})"
  except OSError:
    pass
  preload = os.environ.get("LD_PRELOAD", "") or "-"
  tunables = os.environ.get("GLIBC_TUNABLES", "") or "-"
  return (f"cpu: {cpu}, nproc={os.cpu_count()}, jax {jax.__version__} "
          f"({jax.default_backend()}), python {platform.python_version()}, "
          f"LD_PRELOAD={preload}, GLIBC_TUNABLES={tunables}")


def argument_parser(doc, rounds, steps):
  """The parser every benchmark starts from: its docstring as --help, and how many alternating
  rounds of how many steps it times."""
  parser = argparse.ArgumentParser(description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rounds", type=int, default=rounds, help="alternating timed rounds")
  parser.add_argument("--steps", type=int, default=steps, help="steps per timed round")
  return parser


def add_step_arguments(parser):
  """How the benchmarked step iterates over layers and runs its depthwise convolutions."""
  parser.add_argument("--layer-iteration", default="auto", choices=["auto", "loop", "scan"])
  parser.add_argument("--conv-impl", default="auto",
                      choices=["auto", "shifted", "cpu_kernel", "native"])


def print_header(extra=""):
  """Prints the machine line (and `extra`), then the allocator warning when there is one."""
  print(machine_header() + extra)
  warning = allocator_warning()
  if warning:
    print(warning)


def allocator_warning():
  """A warning line when neither tcmalloc nor glibc hugetlb is active (the step is ~1.7x slower)."""
  if "tcmalloc" in os.environ.get("LD_PRELOAD", "") or "hugetlb" in os.environ.get(
      "GLIBC_TUNABLES", ""):
    return None
  return ("note: default glibc malloc; for representative CPU numbers run with "
          f"LD_PRELOAD={TCMALLOC} (Debian libtcmalloc-minimal4) or "
          "GLIBC_TUNABLES=glibc.malloc.hugetlb=1")


def ratios(values, base_values):
  """(ratio of medians, ratio of minimums, median of per-round ratios) of two alternated series.

  The per-round (paired) ratio compares steps timed seconds apart, so it is the most robust to
  load from other processes; the minimum is the least disturbed single round.
  """
  paired = [v / b for v, b in zip(values, base_values)]
  return (median(values) / median(base_values), min(values) / min(base_values), median(paired))
