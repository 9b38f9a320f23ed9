"""The one place a config is checked: `validate(config)`, before any data is read or anything
is compiled. It checks the training fields itself and calls each part's own check: the
method's (registry.Method.check_config), the optimizer's, transfer's, the multi-task batch
shares, each task's data config and the model spec, then that something trains."""
import jax
import jax.numpy as jnp

from compmod_jax.data import catalog, image_folder, pipeline
from compmod_jax.methods import multitask, registry, transfer
from compmod_jax.train import context, optim, start

ON_CORRUPT_CHECKPOINT = ("fall_back", "refuse")
POSITIVE_INTEGERS = ("batch_size", "eval_batch_size", "log_every", "eval_every",
                     "checkpoint_every", "keep_checkpoints")


def validate(config):
  """Raises a ValueError naming the first bad field (a pretraining config first)."""
  if config.get("pretrain"):
    validate(config.pretrain)
  device_count = jax.device_count()
  _check_training(config, device_count)
  _check_tasks(config)
  method = registry.get(config.method)
  method.check_config(config)
  optim.check_config(config, optim.parameter_groups(method))
  transfer.check_config(config)
  if config.trainable not in ("", "all") and not _starts_trained(config):
    raise ValueError(f"config.trainable={config.trainable!r} freezes the rest of a freshly "
                     f"initialised model; set config.init_from=<pretrained workdir> (or "
                     f"trainable='' to train everything).")
  multitask.task_batch_sizes(config, device_count)
  for task in config.tasks:
    data_config = context.task_data_config(config, task)
    pipeline.check_data_config(data_config)
    _check_splits(task, data_config)
  # The model gets 2 classes per task as placeholders: the real counts come from the data, and
  # no check depends on them.
  model = start.model_for(config, {task: 2 for task in config.tasks})
  side = config.data.image_size or 4 * config.model.patch_size
  images = jnp.zeros((1, side, side, config.data.channels), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
  optim.check_trainable(params, config, model.spec, method)


def _starts_trained(config):
  return bool(config.init_from or config.get("pretrain"))


def _check_training(config, device_count):
  if config.total_steps < 0 or (config.total_steps == 0 and not _starts_trained(config)):
    raise ValueError(f"config.total_steps must be a positive integer (0 only evaluates a model "
                     f"started from config.init_from), got {config.total_steps!r}")
  for name in POSITIVE_INTEGERS:
    if config[name] <= 0:
      raise ValueError(f"config.{name} must be a positive integer, got {config[name]!r}")
  for name in ("batch_size", "eval_batch_size"):
    if config[name] % device_count:
      raise ValueError(f"config.{name}={config[name]} must be divisible by the number of "
                       f"devices ({device_count}); try "
                       f"{max(1, config[name] // device_count) * device_count}.")
  if not 0.0 <= config.ema_decay < 1.0:
    raise ValueError(f"config.ema_decay must be in [0, 1), got {config.ema_decay}")
  if config.max_nonfinite_skips < 0:
    raise ValueError(f"config.max_nonfinite_skips must be >= 0 (0 stops at the first NaN/Inf), "
                     f"got {config.max_nonfinite_skips}")
  if config.on_corrupt_checkpoint not in ON_CORRUPT_CHECKPOINT:
    raise ValueError(f"config.on_corrupt_checkpoint must be one of {ON_CORRUPT_CHECKPOINT}, got "
                     f"{config.on_corrupt_checkpoint!r}")


def _check_splits(task, data_config):
  """Each split the task reads exists in its dataset and has labels (data/catalog.py; an image
  folder's splits are its sub-folders)."""
  name = data_config.name
  folder_splits = None
  if image_folder.is_folder_name(name):  # listed, not read: its splits are its sub-folders
    folder_splits = pipeline.dataset_builder(name, data_config.data_dir).split_names
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
