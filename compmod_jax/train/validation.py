"""The one place a config is checked: `validate(config)`, before any data is read or anything
is compiled. It checks the training fields itself and calls each part's own check: the
method's (registry.Method.check_config), the optimizer's, transfer's, the multi-task batch
shares, each task's data config and the model spec, then that something trains."""
import os

import jax
from etils import epath

from compmod_jax import ranges
from compmod_jax.data import catalog, datasets, fields, image_folder
from compmod_jax.finetune import deltas, growth, transfer
from compmod_jax.methods import registry
from compmod_jax.ranges import INF
from compmod_jax.train import context, multitask, optim, regularizers, start

ON_CORRUPT_CHECKPOINT = ("fall_back", "refuse")
POSITIVE_INTEGERS = ("batch_size", "eval_batch_size", "log_every", "eval_every",
                     "checkpoint_every", "keep_checkpoints")


# Numeric fields and the interval each must lie in (ranges.check_number); the model's own are
# NetworkSpec's (models/network_spec.py).
NUMBER_RANGES = {
    "ema_decay": (0, 1, True, False),
    "optimizer.learning_rate": (0, INF, False, False),
    "optimizer.final_lr_fraction": (0, 1, True, True),
    "optimizer.warmup_steps": (0, INF, True, False),
    "optimizer.decay_steps": (0, INF, False, False),
    "optimizer.decay_rate": (0, 1, False, True),
    "optimizer.momentum": (0, 1, True, False),
    "optimizer.rmsprop_decay": (0, 1, True, False),
    "optimizer.eps": (0, INF, False, False),
    "optimizer.adam_b1": (0, 1, True, False),
    "optimizer.adam_b2": (0, 1, True, False),
    "optimizer.weight_decay": (0, INF, True, False),
    "optimizer.grad_clip_norm": (0, INF, True, False),
    "regularizers.entropy_weight": (0, INF, True, False),
    "regularizers.clustering_weight": (0, INF, True, False),
    "transfer.learned_learning_rate": (0, INF, False, False),
    "transfer.new_templates_noise": (0, INF, True, False),
}
TASK_NUMBER_RANGES = {"weight": (0, INF, False, False), "sampling_weight": (0, INF, False, False)}


def validate(config, planning=False):
  """Raises a ValueError naming the first bad field (a pretraining config first).
  planning=True checks a config for `plan`, which sizes a step for other devices (no check
  against this machine's memory) and plans a config whose checkpoint is not here: a trainable
  preset without config.init_from is then no mistake."""
  if config.get("pretrain"):
    validate(config.pretrain, planning)
  device_count = jax.device_count()
  _check_numbers(config)
  _check_training(config, device_count)
  _check_tasks(config)
  method = registry.get(config.method)
  method.check_config(config)
  optim.check_config(config, optim.parameter_groups(method))
  transfer.check_config(config)
  growth.check_config(config)
  deltas.check_config(config)
  if config.trainable not in ("", "all") and not _starts_trained(config) and not planning:
    raise ValueError(f"config.trainable={config.trainable!r} freezes the rest of a freshly "
                     f"initialised model; set config.init_from=<pretrained workdir> (or "
                     f"trainable='' to train everything).")
  batch_sizes = multitask.task_batch_sizes(config, device_count)
  _check_data_dir(config.data.data_dir)
  for task in config.tasks:
    data_config = context.task_data_config(config, task)
    try:
      fields.check_data_config(data_config)
    except ValueError as error:  # the field may be the task's own setting
      raise ValueError(f"Task {task!r} (config.tasks.{task}.<field>, else config.data): "
                       f"{error}") from None
    _check_splits(task, data_config)
    _check_batch_fits(task, data_config, batch_sizes[task])
  # The model gets 2 classes per task as placeholders, except a task_free model, whose one head
  # needs every task's classes alike: the counts come from the datasets' metadata.
  model = start.model_for(config, context.task_classes(config) if config.model.task_free
                          else {task: 2 for task in config.tasks})
  images = start.example_images(config)  # the input shape, read once from the metadata
  side = images.shape[1]
  _check_patches_tile(side, config.model.patch_size)
  params = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
  optim.check_trainable(params, config, model.spec, method)
  if not planning:  # the plan's check is XLA's own estimate, for the target devices
    _check_memory(config, model.spec, params,
                  max(1, sum(batch_sizes.values()) // device_count), side)


def _check_patches_tile(side, patch):
  """The input adapter cuts the image into patch x patch patches (stride = kernel): a side it
  does not divide would lose its last rows and columns without a word."""
  if side % patch:
    raise ValueError(f"config.model.patch_size={patch} does not divide the {side}-pixel input "
                     f"(config.data.image_size, else the stored size): the last {side % patch} "
                     f"rows and columns would be dropped. Use a patch size that divides {side}, "
                     f"or an image_size that is a multiple of {patch}.")


def memory_lower_bound(config, spec, params, examples, input_side):
  """(bytes per device, {part: bytes}): what one training step holds at the least, from the
  shapes alone. The parameters three times at least (values, gradients, one optimizer moment)
  plus the EMA copy; the activations a step keeps for its backward pass: per example and layer
  at least the block's input and its expanded and depthwise outputs (side x side x (width +
  2 expanded) floats). XLA's real figure (`python -m compmod_jax.plan`) is higher, often
  several times: this only catches runs that cannot possibly fit. `examples`: per device and
  step, every task's together. `input_side`: the input image's side, which the patch size
  divides (_check_patches_tile)."""
  parameter_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(params))
  copies = 3 + (config.ema_decay > 0)
  side = input_side // spec.patch_size
  per_example = side * side * (spec.width + 2 * spec.expanded) * spec.num_layers * 4
  parts = {"parameters": copies * parameter_bytes, "activations": examples * per_example}
  return sum(parts.values()), parts


def device_memory_bytes():
  """(bytes, what they are) one device can use: an accelerator's own limit, or on CPU the
  host's RAM shared by the local (possibly simulated) devices."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if stats.get("bytes_limit"):
    return stats["bytes_limit"], f"{jax.local_devices()[0].device_kind} memory"
  ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return ram // jax.local_device_count(), (f"this host's RAM shared by "
                                           f"{jax.local_device_count()} CPU device(s)")


def _check_memory(config, spec, params, examples, input_side):
  """Refuses a model or batch that cannot fit in memory, instead of compiling for minutes and
  dying of an allocation error (or swapping) later."""
  needed, parts = memory_lower_bound(config, spec, params, examples, input_side)
  available, where = device_memory_bytes()
  if needed > available:
    gib = {name: value / 2**30 for name, value in parts.items()}
    raise ValueError(
        f"One training step needs at least {needed / 2**30:,.1f} GiB per device (estimated "
        f"from the shapes: parameters with their gradients, EMA and optimizer state "
        f"{gib['parameters']:,.1f} GiB, activations {gib['activations']:,.1f} GiB for "
        f"{examples} examples per device through "
        f"{spec.num_layers} layers of {spec.expanded} expanded channels), more than the "
        f"{available / 2**30:,.1f} GiB of {where}. Lower config.batch_size, "
        f"config.model.num_layers, depth_multiplier or expansion (`python -m compmod_jax.plan` "
        f"gives XLA's own estimate).")


def _check_batch_fits(task, data_config, batch_size):
  """A step's batch of a task must not exceed its training split: every batch would repeat
  examples, and a huge one stalls the input pipeline instead of failing."""
  examples = _known_split_size(data_config.name, data_config.data_dir, data_config.train_split)
  if examples is not None and batch_size > examples:
    raise ValueError(f"Task {task!r} gets {batch_size} training examples per step "
                     f"(config.batch_size, or config.tasks.{task}.batch_size), but its "
                     f"train_split {data_config.train_split!r} of '{data_config.name}' has "
                     f"{examples}; use a batch of at most {examples}.")


def _known_split_size(name, data_dir, split):
  """Examples in `split` from a prepared dataset's metadata or else the catalog; None when
  neither knows (an unprepared dataset outside the catalog). Reads no data."""
  if not image_folder.is_folder_name(name):
    builder = datasets.dataset_builder(name, data_dir)
    if builder.is_prepared():
      problem = catalog.missing_split(name, split, builder.info.splits.keys())
      if problem:
        raise ValueError(f"{problem} (config.data.train_split or the task's train_split).")
      return datasets.dataset_size(builder, split)
  recorded = catalog.facts(name)
  if recorded and split in recorded.splits:  # whole splits only; slices are checked once read
    return recorded.splits[split]
  return None


def _check_data_dir(data_dir):
  if data_dir and epath.Path(data_dir).exists() and not epath.Path(data_dir).is_dir():
    raise ValueError(f"config.data.data_dir={data_dir!r} is a file; point it at the directory "
                     f"that holds the TFDS datasets (or leave it unset for TFDS's default).")


def _check_numbers(config):
  numbers = [(name, _field(config, name), interval) for name, interval in NUMBER_RANGES.items()]
  numbers += [(f"tasks.{task}.{name}", task_config.get(name, 1.0), interval)
              for task, task_config in config.tasks.items()
              for name, interval in TASK_NUMBER_RANGES.items()]
  for name, value, interval in numbers:
    ranges.check_number(f"config.{name}", value, interval)


def _field(config, dotted_name):
  for part in dotted_name.split("."):
    config = config[part]
  return config


def _starts_trained(config):
  return bool(config.init_from or config.get("pretrain"))


def _check_training(config, device_count):
  if config.total_steps < 0 or (config.total_steps == 0 and not _starts_trained(config)):
    raise ValueError(f"config.total_steps must be a positive integer (0 only evaluates a model "
                     f"started from config.init_from), got {config.total_steps!r}")
  for name in POSITIVE_INTEGERS:
    ranges.check_positive_integer(f"config.{name}", config[name])
  for name in ("batch_size", "eval_batch_size"):
    if config[name] % device_count:
      raise ValueError(f"config.{name}={config[name]} must be divisible by the number of "
                       f"devices ({device_count}); try "
                       f"{max(1, config[name] // device_count) * device_count}.")
  if config.max_nonfinite_skips < 0:
    raise ValueError(f"config.max_nonfinite_skips must be >= 0 (0 stops at the first NaN/Inf), "
                     f"got {config.max_nonfinite_skips}")
  mesh_shape = tuple(config.mesh_shape)
  if len(mesh_shape) != 1 or mesh_shape[0] not in (-1, device_count):
    raise ValueError(f"config.mesh_shape={mesh_shape} must be (-1,) or ({device_count},): one "
                     f"data-parallel axis over all {device_count} devices.")
  if config.regularizers.clustering_g not in regularizers.CLUSTERING_G:
    raise ValueError(f"config.regularizers.clustering_g must be one of "
                     f"{tuple(regularizers.CLUSTERING_G)}, got "
                     f"{config.regularizers.clustering_g!r}")
  if config.on_corrupt_checkpoint not in ON_CORRUPT_CHECKPOINT:
    raise ValueError(f"config.on_corrupt_checkpoint must be one of {ON_CORRUPT_CHECKPOINT}, got "
                     f"{config.on_corrupt_checkpoint!r}")


def _check_splits(task, data_config):
  """Each split the task reads exists in its dataset and has labels (data/catalog.py; an image
  folder's splits are its sub-folders)."""
  name = data_config.name
  folder_splits = None
  if image_folder.is_folder_name(name):  # listed, not read: its splits are its sub-folders
    try:
      folder_splits = datasets.dataset_builder(name, data_config.data_dir).split_names
    except image_folder.ImageFolderError as error:
      raise image_folder.ImageFolderError(
          f"Task {task!r} reads its images from a folder (config.tasks.{task}.dataset="
          f"{name!r}): {error} A config made for a dataset that users bring names its root as "
          f"an argument, e.g. configs/office_caltech_da.py:folder=<root>; see the config's "
          f"docstring for the layout.") from None
  for field in ("train_split", "eval_split"):
    problem = (catalog.missing_split(name, data_config[field], folder_splits)
               if folder_splits is not None else catalog.split_problem(name, data_config[field]))
    if problem:
      raise ValueError(f"Task {task!r} reads {field}={data_config[field]!r} "
                       f"(config.tasks.{task}.{field}, else config.data.{field}), but "
                       f"{problem}.")


def _check_tasks(config):
  if not config.tasks:
    raise ValueError("config.tasks is empty; give at least one task with a dataset.")
  for task, task_config in config.tasks.items():
    if "/" in task:
      raise ValueError(f"Task name {task!r} may not contain '/'.")
    if not task_config.get("dataset"):
      raise ValueError(f"config.tasks.{task}.dataset must name a TFDS dataset.")
