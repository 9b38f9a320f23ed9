"""The run context: what one run holds while it trains (config, workdir, mesh, model, method,
data streams, evaluation steps), and the small operations on it that the loop, the start-up
paths and the methods share: this process's share of a task's data, global batches on the mesh,
replicated parameters, and evaluation.

Methods (compmod_jax/methods) never import the trainer; they are handed a RunContext and use
its attributes and methods.
"""
import dataclasses
import itertools
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from compmod_jax.data import classes, datasets, streams
from compmod_jax.train import multitask, steps
from compmod_jax.workdir import RunStart


def make_mesh(config):
  """A data-parallel mesh. Auto axis types: replicated params need no explicit sharding."""
  shape = tuple(jax.device_count() if n == -1 else n for n in config.mesh_shape)
  return jax.make_mesh(shape, ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def task_data_config(config, task):
  """config.data with the task's own dataset, labeling and (when it sets them) splits and
  augmentation."""
  task_config = config.tasks[task]
  data_config = ml_collections.ConfigDict(config.data.to_dict())
  data_config.name = task_config.dataset
  data_config.label_map = task_config.get("label_map", "identity")
  for field in ("train_split", "eval_split", "augment"):
    if task_config.get(field):
      data_config[field] = task_config[field]
  return data_config


def task_classes(config):
  """{task: classes the model predicts} of config.tasks, from the datasets' metadata (the
  builders' code): no data is read."""
  counts = {}
  for task in config.tasks:
    data_config = task_data_config(config, task)
    builder = datasets.dataset_builder(data_config.name, data_config.data_dir)
    counts[task] = classes.num_classes(builder, data_config)
  return counts


def input_shape(config):
  """(side, side, channels) of the model's input, from the config and the datasets' metadata:
  config.data.image_size, else the stored size every task's images share (no data is read).
  The one place the input shape is decided: start-up, `plan` and validation ask here."""
  side = config.data.image_size
  if side:
    return (side, side, config.data.channels)
  stored = {}
  for task in sorted(config.tasks):
    data_config = task_data_config(config, task)
    shape = datasets.dataset_builder(data_config.name,
                                     data_config.data_dir).info.features["image"].shape
    stored[task] = tuple(shape[:2])
  sizes = set(stored.values())
  height, width = sizes.pop() if len(sizes) == 1 else (None, None)
  if height is None or height != width:
    raise ValueError(f"The tasks' images are stored at sizes {stored} (None: varying); the "
                     f"model needs one square input: set config.data.image_size.")
  return (height, width, config.data.channels)


def check_and_prepare_datasets(config):
  """Fails at once for a task whose dataset is missing; then prepares those made from files on
  this machine (embedded digits, image folders, downloads when allowed) on process 0 while the
  others wait, since processes share the data_dir and must not write it together."""
  data_configs = [task_data_config(config, task) for task in sorted(config.tasks)]
  for data_config in data_configs:
    datasets.check_dataset(data_config.name, data_config.data_dir, data_config.download)
  if jax.process_index() == 0:
    for data_config in data_configs:
      datasets.get_builder(data_config.name, data_config.data_dir, data_config.download)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("compmod_jax: datasets prepared")


def task_stream(config, task, *, global_batch_size, train, seed=0, split=None):
  """This process's share of `task`'s split (default: the train or eval split)."""
  return streams.DataStream(
      task_data_config(config, task), batch_size=global_batch_size // jax.process_count(),
      train=train, split=split, seed=seed, process_index=jax.process_index(),
      process_count=jax.process_count())


def make_streams(config, *, train):
  """{task: DataStream} with this process's share of each task's split."""
  if train:
    batch_sizes = multitask.task_batch_sizes(config, jax.device_count())
  else:
    batch_sizes = {task: config.eval_batch_size for task in config.tasks}
  return {task: task_stream(config, task, global_batch_size=batch_sizes[task], train=train,
                            seed=config.seed + index)
          for index, task in enumerate(sorted(config.tasks))}


def replicated(mesh, host_tree):
  """A host (numpy) tree as arrays replicated on the mesh (every process passes the same)."""
  sharding = NamedSharding(mesh, P())
  return jax.tree.map(lambda x: jax.make_array_from_callback(
      np.shape(x), sharding, lambda index: np.asarray(x)[index]), host_tree)


def global_batch(mesh, local_batch):
  """This process's batch (a tree of numpy arrays) as one global array split over "data"."""
  sharding = NamedSharding(mesh, P("data"))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x),
                      local_batch)


@dataclasses.dataclass
class RunContext:
  """One run: its config, workdir, mesh, model, method and data.

  eval_steps: {task: jitted eval step}; run_start: how the run started (workdir.RunStart: a
  pretrained checkpoint, new tasks' initialisation), carried by every checkpoint and results.json.
  """
  config: Any
  workdir: str
  mesh: Any
  model: Any
  method: Any
  train_streams: dict
  eval_streams: dict
  eval_steps: dict
  run_start: RunStart = dataclasses.field(default_factory=RunStart)

  def replicated(self, host_tree):
    return replicated(self.mesh, host_tree)

  def global_batch(self, local_batch):
    return global_batch(self.mesh, local_batch)

  def data_config(self, task):
    """config.data as `task` reads it (its dataset, labeling and splits)."""
    return task_data_config(self.config, task)

  def task_stream(self, task, **kwargs):
    """task_stream(config, task, global_batch_size=..., train=..., seed=..., split=...)."""
    return task_stream(self.config, task, **kwargs)

  def train_batch_size(self, task):
    """Global examples of `task` per training step."""
    return multitask.task_batch_sizes(self.config, jax.device_count())[task]

  def evaluate(self, state):
    """{task: test accuracy, loss and examples} on each task's whole eval split (padded batches
    are masked), with the EMA parameters."""
    results = {}
    for task, stream in sorted(self.eval_streams.items()):
      totals = self.eval_sums(state, stream, task)
      count = max(float(totals["count"]), 1.0)
      results[task] = {"test_accuracy": float(totals["correct"]) / count,
                       "test_loss": float(totals["loss_sum"]) / count,
                       "test_examples": int(count)}
      if "route_sum" in totals:  # routed per image: [L, K] and [L], over the test images
        results[task].update(mean_route=(totals["route_sum"] / count).tolist(),
                             mean_route_entropy=(totals["route_entropy_sum"] / count).tolist())
      if "domain_correct" in totals:  # routing='task_posterior'
        results[task].update(
            domain_accuracy=float(totals["domain_correct"]) / count,
            domain_mass=float(totals["domain_mass_sum"]) / count,
            task_given_accuracy=float(totals["task_given_correct"]) / count)
    return results

  def eval_sums(self, state, stream, task, max_batches=None):
    """Correct predictions, cross-entropy, real examples (and the routes) of `task`'s eval step
    summed over one pass of an eval stream (or its first `max_batches` batches), as float64
    numpy values."""
    totals = {}
    for local_batch in itertools.islice(stream, max_batches):
      sums = self.eval_steps[task](state, self.global_batch(local_batch))
      for key, value in sums.items():  # replicated: every process reads the whole sum
        totals[key] = totals.get(key, 0.0) + np.asarray(value, np.float64)
    return totals or {"correct": 0.0, "loss_sum": 0.0, "entropy_sum": 0.0, "count": 0.0}

  def accuracy(self, variables, stream, task, max_batches=None):
    """Accuracy of host `variables` {"params", "batch_stats"} as `task` on `stream` (read in
    evaluation mode; the first `max_batches` batches, or one pass)."""
    totals = self._variables_sums(variables, stream, task, max_batches)
    return totals["correct"] / max(totals["count"], 1.0)

  def mean_prediction_entropy(self, variables, stream, task, max_batches=None):
    """Mean entropy (nats) of the class distribution `variables` predict as `task` on
    `stream`'s images, as `accuracy` reads them; depends on no label."""
    totals = self._variables_sums(variables, stream, task, max_batches)
    return totals["entropy_sum"] / max(totals["count"], 1.0)

  def _variables_sums(self, variables, stream, task, max_batches):
    placed = self.replicated(variables)
    state = steps.TrainState(step=0, params=None, batch_stats=placed["batch_stats"],
                             opt_state=None, ema_params=placed["params"])
    return self.eval_sums(state, stream, task, max_batches)
