"""The base config every experiment starts from, and the helpers config files use: a task
(`task`), the config file's argument (`parse_argument`), a seconds-long version (`make_tiny`)
and the multi-task set-ups of App. C (`apply_setup`).

configs/<experiment>.py override what they change; configs/common.py holds the recipes several
of them share. The paper's training recipe (App. A.2): RMSProp, learning rate 0.02-0.04, dropout
keep 0.8, weight decay 1e-5 on kernels, evaluation with an exponential moving average of the
weights. Every field is checked by `validation.validate` before any data is read.
"""
import os

import ml_collections

from compmod_jax.data import fields
from compmod_jax.finetune import transfer
from compmod_jax.models import network_spec
from compmod_jax.train import optim


def base_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.total_steps = 1000
  # Global examples per step, shared by the tasks in proportion to their sampling_weight (a
  # task's own batch_size, when set, takes precedence); every task is in every step.
  config.batch_size = 128
  config.eval_batch_size = 512     # global
  config.log_every = 50
  config.eval_every = 500
  config.checkpoint_every = 500
  config.keep_checkpoints = 2
  config.ema_decay = 0.999         # 0 evaluates the raw weights
  config.mesh_shape = (-1,)        # devices along the "data" axis; -1 = all
  # Reliability (docs/reliability.md). A step whose loss, gradient norm or new parameters are
  # NaN/Inf skips its update (the batch is consumed); after more than this many skipped
  # updates in one run (counted from its start or resume) the run stops with an error. 0 stops
  # at the first.
  config.max_nonfinite_skips = 3
  # A checkpoint that fails its checksums, is truncated or misses an item, found at resume:
  # "fall_back" resumes from the newest good one (bad newer ones are moved to
  # <workdir>/corrupt_checkpoints); "refuse" stops with an error and changes nothing.
  config.on_corrupt_checkpoint = "fall_back"
  # Compiled programs are kept here and reused by the next run of the same step (a restart
  # after a preemption, the second run of a config): a local folder or a gs:// path; "" turns
  # the cache off. Used by the commands (main, plan), not by train_and_evaluate itself.
  config.compilation_cache_dir = default_compilation_cache_dir()

  # Preprocessing shared by all tasks (compmod_jax/data/fields.py).
  config.data = fields.default_data_config()
  del config.data["name"]  # each task names its own dataset: config.tasks.<task>.dataset
  config.tasks = ml_collections.ConfigDict({"mnist": task("embedded_digits/mnist")})

  # The network (models/network_spec.py: NetworkSpec's fields, their defaults and checks).
  config.model = ml_collections.ConfigDict(network_spec.config_defaults())

  config.optimizer = ml_collections.ConfigDict(dict(
      name="rmsprop", learning_rate=0.02, schedule="cosine", warmup_steps=50,
      final_lr_fraction=0.01, decay_steps=1000, decay_rate=0.5, momentum=0.9,
      rmsprop_decay=0.9, eps=1e-3, nesterov=False, adam_b1=0.9, adam_b2=0.999,
      weight_decay=1e-5, grad_clip_norm=0.0,
      lr_multipliers=ml_collections.ConfigDict({name: 1.0 for name in optim.MODEL_GROUPS})))

  config.regularizers = ml_collections.ConfigDict(dict(
      entropy_weight=0.0, clustering_weight=0.0, clustering_g="square"))

  # What the run minimises: a method of the plug-in registry (compmod_jax/methods/registry.py):
  # "supervised" (classification of every task), or a domain adaptation method
  # (methods/adaptation.py; such a method brings its own config section).
  config.method = "supervised"

  # Transfer (finetune/pretrained.py, finetune/transfer.py): start from another run's checkpoint
  # (its workdir or <workdir>/checkpoints/<step>). Its tasks stay in the model, frozen; the
  # tasks of config.tasks it lacks are new, and config.xi_init builds their xi, head and BN.
  config.init_from = ""
  config.xi_init = transfer.DEFAULT_XI_INIT  # source:<task> or a transfer.STRATEGIES name
  config.trainable = ""           # an optim.TRAINABLE_PRESETS name; "" = lr_multipliers alone
  config.transfer = ml_collections.ConfigDict(dict(
      dont_load=(),               # regexes over variable paths to keep freshly initialised
      selection_examples=2048,    # training examples that measure each source on a new task
      learned_steps=200, learned_learning_rate=0.05,  # xi_init=learned: Adam on the c logits
      # Growth (finetune/growth.py): templates appended to the checkpoint's, started "fresh" or
      # as noisy "copies" of the most used ones; config.model.num_templates counts them.
      add_templates=0, new_templates="fresh", new_templates_noise=0.01,
      # > 0: each new task's BN moving statistics re-estimated on this many of its training
      # batches once its variables are built (AdaBN, labels unread; finetune/transfer.py).
      target_bn_batches=0))
  # Deltas (finetune/deltas.py): a run from config.init_from also writes <workdir>/delta/, what
  # it added or trained; config.deltas applies such directories, in order, to init_from.
  config.save_delta = False
  config.deltas = ()
  return config


def default_compilation_cache_dir():
  """$JAX_COMPILATION_CACHE_DIR when set (JAX's own variable), else a per-user folder:
  $XDG_CACHE_HOME/compmod_jax/compilation_cache (~/.cache/... when XDG_CACHE_HOME is unset)."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache_home, "compmod_jax", "compilation_cache")


def task(dataset, *, weight=1.0, sampling_weight=1.0, batch_size=0, label_map="identity",
         train_split="", eval_split="", augment=""):
  """One task: a TFDS dataset, the weight of its loss in the total, its share of each step's
  batch (or a fixed batch_size; 0 = share), a labeling (data/classes.py LABEL_MAPS), the TFDS splits
  it trains and is evaluated on and its training augmentation when they differ from
  config.data's ("" = those; slicing such as 'train[:80%]' works; augment 'crop' keeps digits
  and letters unflipped where natural images get 'crop_flip'). Image size and channels stay
  config.data's: every task feeds the same input adapter."""
  return ml_collections.ConfigDict(dict(dataset=dataset, weight=weight,
                                        sampling_weight=sampling_weight,
                                        batch_size=batch_size, label_map=label_map,
                                        train_split=train_split, eval_split=eval_split,
                                        augment=augment))


def parse_argument(arg, arguments, choices=None):
  """Parses a config file's argument "k1=v1,k2=v2" against {key: default}; each value takes its
  default's type, and a bare `k` means k=1 for an integer argument (`:tiny`). `choices`
  ({key: allowed values}) restricts some arguments. Every mistake is one ValueError naming the
  argument, what it got and what it takes."""
  values = dict(arguments)
  takes = ", ".join(f"{key}=<{_TYPE_NAMES[type(default)]}, default {default!r}>"
                    for key, default in arguments.items()) or "no arguments"
  for item in filter(None, (arg or "").split(",")):
    key, has_value, value = (part.strip() for part in item.partition("="))
    if key not in values:
      raise ValueError(f"Unknown config argument {key!r} in {arg!r}; this config takes {takes}, "
                       f"written ':name=value,name=value'.")
    if not has_value:
      if type(arguments[key]) is not int:
        raise ValueError(f"Config argument {key!r} needs a value: {key}=<"
                         f"{_TYPE_NAMES[type(arguments[key])]}>.")
      value = "1"
    values[key] = _typed_argument(key, value, arguments[key])
  for key, allowed in (choices or {}).items():
    if values[key] not in allowed:
      raise ValueError(f"Config argument {key}={values[key]!r} must be one of "
                       f"{tuple(allowed)}.")
  return values


_TYPE_NAMES = {int: "integer", float: "number", str: "text"}


def _typed_argument(key, value, default):
  try:
    return type(default)(value)
  except ValueError:
    hint = "; separate arguments with ',' not ';'" if ";" in value else ""
    raise ValueError(f"Config argument {key}={value!r} must be an "
                     f"{_TYPE_NAMES[type(default)]} (default {default!r}){hint}.") from None


def natural_images(config, image_size):
  """The input of the paper's natural-image experiments: RGB at `image_size` (the smaller side
  resized, then centre-cropped), ImageNet's statistics, random crops and flips in training."""
  config.data.update(image_size=image_size, channels=3, normalization="standard",
                     augment="crop_flip")
  return config


def make_tiny(config, *, total_steps, batch_size, eval_batch_size=None):
  """Shortens a config to a debugging run of seconds: few steps, small batches, logging,
  evaluation and a checkpoint at the end (and halfway), almost no warmup."""
  config.total_steps = total_steps
  config.batch_size = batch_size
  config.eval_batch_size = eval_batch_size or config.eval_batch_size
  config.log_every = max(1, total_steps // 2)
  config.eval_every = total_steps
  config.checkpoint_every = max(1, total_steps // 2)
  config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, max(1, total_steps // 10))
  return config


# The multi-task set-ups of App. C. Every task always has its own head and its own BN moving
# statistics; the set-ups differ in what else is private to a task (Table 8):
#   simple_baseline   one shared body (plain isometric network, no templates)
#   baseline_patches  shared body, per-task BN scale/bias ("linear patches", Mudrakarta et al.)
#   mixture           per-task mixture weights; BN scale/bias mixed with the same xi
#   mixture_patches   per-task mixture weights and per-task BN scale/bias
SETUPS = {
    "simple_baseline": {"signature": "plain", "batch_norm": "per_layer"},
    "baseline_patches": {"signature": "plain", "batch_norm": "per_task"},
    "mixture": {"signature": "mixture", "batch_norm": "mixed"},
    "mixture_patches": {"signature": "mixture", "batch_norm": "per_task"},
}


def apply_setup(model_config, setup):
  """Sets the model fields that define one of the paper's multi-task set-ups."""
  if setup not in SETUPS:
    raise ValueError(f"Multi-task set-up must be one of {tuple(SETUPS)}, got {setup!r}")
  model_config.update(SETUPS[setup])
  return model_config
