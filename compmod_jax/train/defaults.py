"""Defaults every experiment config starts from (configs/*.py override what they change).

The paper's training recipe (App. A.2): RMSProp, learning rate 0.02-0.04, dropout keep 0.8,
weight decay 1e-5 on kernels, evaluation with an exponential moving average of the weights.
"""
import re

import ml_collections

from compmod_jax.methods import adaptation, multitask, transfer
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

  # Preprocessing shared by all tasks (compmod_jax/data/pipeline.py).
  config.data = ml_collections.ConfigDict(dict(
      data_dir=ml_collections.config_dict.placeholder(str), download=False,
      train_split="train", eval_split="test", image_size=28, channels=1,
      normalization="unit", augment="none", shuffle_buffer=10_000,
      most_frequent_classes=0, class_frequency_datasets=()))
  config.tasks = ml_collections.ConfigDict({"mnist": task("embedded_digits/mnist")})

  config.model = ml_collections.ConfigDict(dict(
      num_layers=16, num_templates=4, depth_multiplier=0.6, design="small", expansion=6,
      use_se=True, se_ratio=0.25, patch_size=2, activation="relu", dropout_rate=0.2,
      signature="mixture", explicit_signature="", signature_seed=0, mixture_init="normal",
      mixture_init_scale=1.0, batch_norm="per_layer", input_adapter="shared", input_skip=False,
      layer_iteration="auto", scan_unroll=1, conv_impl="auto", bn_momentum=0.99,
      bn_eps=1e-3))

  config.optimizer = ml_collections.ConfigDict(dict(
      name="rmsprop", learning_rate=0.02, schedule="cosine", warmup_steps=50,
      final_lr_fraction=0.01, decay_steps=1000, decay_rate=0.5, momentum=0.9,
      rmsprop_decay=0.9, eps=1e-3, nesterov=False, adam_b1=0.9, adam_b2=0.999,
      weight_decay=1e-5, grad_clip_norm=0.0,
      lr_multipliers=ml_collections.ConfigDict({name: 1.0 for name, _ in
                                                optim.PARAMETER_GROUPS})))

  config.regularizers = ml_collections.ConfigDict(dict(
      entropy_weight=0.0, clustering_weight=0.0, clustering_g="square"))

  # What the run minimises: "supervised" (classification, every task), or "adversarial" or
  # "moment_matching" (domain adaptation of config.adaptation.target, methods/adaptation.py).
  config.method = "supervised"
  # Domain adaptation: the target task (its private variables are the only model variables that
  # train; the adaptation losses never read its labels), the discriminator's width, the weight
  # of the moment distance, and the labels of the run in the Table 3 layout (analysis/tables.py).
  config.adaptation = ml_collections.ConfigDict(dict(
      target="", discriminator_channels=64, moment_weight=1.0, method_name="", model_name=""))

  # Transfer (train/pretrained.py, methods/transfer.py): start from another run's checkpoint
  # (its workdir or <workdir>/checkpoints/<step>). Its tasks stay in the model, frozen; the
  # tasks of config.tasks it lacks are new, and config.xi_init builds their xi, head and BN.
  config.init_from = ""
  config.xi_init = "best_source"  # source:<task> | best_source | accuracy | learned | random | diagonal
  config.trainable = ""           # head | head_bn | xi_head_bn | all; "" = lr_multipliers alone
  config.transfer = ml_collections.ConfigDict(dict(
      dont_load=(),               # regexes over variable paths to keep freshly initialised
      selection_examples=2048,    # training examples that measure each source on a new task
      learned_steps=200, learned_learning_rate=0.05))  # xi_init=learned: Adam on the c logits
  return config


def task(dataset, *, weight=1.0, sampling_weight=1.0, batch_size=0, label_map="identity"):
  """One task: a TFDS dataset, the weight of its loss in the total, its share of each step's
  batch (or a fixed batch_size; 0 = share), and a labeling (pipeline.LABEL_MAPS)."""
  return ml_collections.ConfigDict(dict(dataset=dataset, weight=weight,
                                        sampling_weight=sampling_weight,
                                        batch_size=batch_size, label_map=label_map))


def parse_argument(arg, arguments):
  """Parses a config file's argument "k1=v1,k2=v2" against {key: default} (typed by default)."""
  values = dict(arguments)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in values:
      raise ValueError(f"This config takes the arguments {sorted(arguments)}, got {key!r}")
    values[key] = type(arguments[key])(value)
  return values


def digits_multitask(tasks, tiny):
  """The recipe shared by the embedded-digits multi-task configs: 8 layers, 4 templates, 4x4
  input patches (7x7x24 activations), random translations, 32 examples per task and step."""
  config = base_config()
  config.tasks = tasks
  config.data.augment = "crop"
  config.batch_size = 32 * len(tasks)
  config.total_steps = 2000
  config.eval_every = 500
  config.checkpoint_every = 500
  config.log_every = 100
  config.model.num_layers = 8
  config.model.num_templates = 4
  config.model.patch_size = 4
  config.optimizer.learning_rate = 0.005  # 0.02 stalls at these batch sizes (configs/digits.py)
  if tiny:
    make_tiny(config, total_steps=4, batch_size=8 * len(tasks))
    config.optimizer.learning_rate = 0.02
    config.model.num_layers = 3
    config.model.num_templates = 2
  return config


# The embedded digit domains of the multi-domain configs: MNIST and five renderings of it.
MNIST_DOMAINS = ("mnist", "mnist_shear", "mnist_scale", "mnist_shot_noise", "mnist_blur",
                 "mnist_boundary")


def digits_multidomain(setup, tiny):
  """Every MNIST domain a task with its own xi (configs/digits_multidomain.py), with the model
  fields of one of the App. C set-ups."""
  tasks = {domain: task(f"embedded_digits/{domain}") for domain in MNIST_DOMAINS}
  config = digits_multitask(tasks, tiny)
  multitask.apply_setup(config.model, setup)
  return config


# Domain adaptation (paper §4.4, App. D): the two models of Table 3, each with the multi-task
# set-up of its pretraining on the source domains and the variables adaptation trains by default
# (the mixture weights; the plain network's input adapter).
DA_MODELS = {"compositional": ("mixture_patches", "xi"),
             "plain": ("simple_baseline", "input_adapter")}
DA_METHODS = ("source_only",) + adaptation.METHODS + ("supervised",)
# The arguments of every domain adaptation config (`domain_adaptation` says what they mean).
DA_ARGUMENTS = {"method": "adversarial", "model": "compositional", "source": "best_source",
                "trainable": "", "tiny": 0}
# App. D.3-D.4: Adam, with a learning rate decaying linearly (a polynomial of degree 1) from the
# first value to the second.
DA_LEARNING_RATES = {"adversarial": (2e-4, 1e-5), "moment_matching": (1e-4, 1e-5),
                     "supervised": (2e-4, 1e-5), "source_only": (2e-4, 1e-5)}


def domain_adaptation(pretrain_for, target, target_task, args, *, source_batch_size,
                      total_steps):
  """A domain adaptation run of the `target` domain (`target_task`, a task config) from a model
  pretrained on source domains: `pretrain_for(setup)` returns that multi-domain pretraining
  config with one of the multi-task set-ups (multitask.SETUPS). args: method, model, source (a
  source task or "best_source", App. D.2's choice by target labels), trainable ("" = the
  model's default), tiny (the pretraining's debug settings, 8 examples per domain and step).

  Every domain gets its own input adapter row (loaded from the pretrained shared adapter), so
  tuning the target's never moves the sources'. Source-only runs train no step.
  """
  method, model = args["method"], args["model"]
  for name, value, allowed in (("method", method, DA_METHODS), ("model", model, DA_MODELS)):
    if value not in allowed:
      raise ValueError(f"Domain adaptation {name} must be one of {tuple(allowed)}, got {value!r}")
  setup, default_trainable = DA_MODELS[model]
  trainable = args["trainable"] or default_trainable
  pretrain = pretrain_for(setup)
  if model == "plain":
    # App. D.3: the baseline has as many layers as the compositional model has templates, so
    # both have about the same number of parameters.
    pretrain.model.num_layers = pretrain.model.num_templates
  config = ml_collections.ConfigDict(pretrain.to_dict())
  config.pretrain = pretrain
  config.tasks = {target: target_task}
  if method in adaptation.METHODS:  # the sources' data feed the adaptation loss
    config.tasks.update({domain: task(pretrain.tasks[domain].dataset,
                                      batch_size=source_batch_size) for domain in pretrain.tasks})
    config.method = method
  config.model.input_adapter = "per_task"
  config.xi_init = args["source"] if args["source"] == "best_source" else f"source:{args['source']}"
  config.trainable = trainable
  config.adaptation.update(target=target, method_name=method, model_name=model)
  first, last = DA_LEARNING_RATES[method]
  config.optimizer.update(name="adam", schedule="linear", learning_rate=first, warmup_steps=0,
                          final_lr_fraction=last / first, weight_decay=0.0)
  for group in optim.TRAINABLE_PRESETS[trainable]:  # the target's variables learn faster
    config.optimizer.lr_multipliers[group] = 10.0
  config.ema_decay = 0.0  # evaluate the adapted variables themselves
  if method == "source_only":
    config.total_steps = 0
  elif not args["tiny"]:
    config.total_steps = total_steps
  if args["tiny"]:
    for task_config in config.tasks.values():
      task_config.batch_size = 8
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


ON_CORRUPT_CHECKPOINT = ("fall_back", "refuse")


def validate(config, device_count):
  """Errors for training and optimizer fields, raised before any heavy work (the model spec
  and the data config check their own)."""
  starts_trained = bool(config.init_from or config.get("pretrain"))
  if config.total_steps < 0 or (config.total_steps == 0 and not starts_trained):
    raise ValueError(f"config.total_steps must be a positive integer (0 only evaluates a model "
                     f"started from config.init_from), got {config.total_steps!r}")
  for name in ("batch_size", "eval_batch_size", "log_every", "eval_every",
               "checkpoint_every", "keep_checkpoints"):
    if config[name] <= 0:
      raise ValueError(f"config.{name} must be a positive integer, got {config[name]!r}")
  for name in ("batch_size", "eval_batch_size"):
    if config[name] % device_count:
      raise ValueError(f"config.{name}={config[name]} must be divisible by the number of "
                       f"devices ({device_count}); try {max(1, config[name] // device_count) * device_count}.")
  if not 0.0 <= config.ema_decay < 1.0:
    raise ValueError(f"config.ema_decay must be in [0, 1), got {config.ema_decay}")
  if config.max_nonfinite_skips < 0:
    raise ValueError(f"config.max_nonfinite_skips must be >= 0 (0 stops at the first NaN/Inf), "
                     f"got {config.max_nonfinite_skips}")
  if config.on_corrupt_checkpoint not in ON_CORRUPT_CHECKPOINT:
    raise ValueError(f"config.on_corrupt_checkpoint must be one of {ON_CORRUPT_CHECKPOINT}, got "
                     f"{config.on_corrupt_checkpoint!r}")
  optim.check_config(config)
  _validate_transfer(config)
  _validate_adaptation(config)
  if not config.tasks:
    raise ValueError("config.tasks is empty; give at least one task with a dataset.")
  for task, task_config in config.tasks.items():
    if "/" in task:
      raise ValueError(f"Task name {task!r} may not contain '/'.")
    if not task_config.get("dataset"):
      raise ValueError(f"config.tasks.{task}.dataset must name a TFDS dataset.")


def _validate_transfer(config):
  transfer.check_xi_init(config.xi_init)
  if config.trainable not in ("", "all") and not (config.init_from or config.get("pretrain")):
    raise ValueError(f"config.trainable={config.trainable!r} freezes the rest of a freshly "
                     f"initialised model; set config.init_from=<pretrained workdir> (or "
                     f"trainable='' to train everything).")
  for rule in config.transfer.dont_load:
    try:
      re.compile(rule)
    except re.error as error:
      raise ValueError(f"config.transfer.dont_load rule {rule!r} is not a regex: {error}") from None
  for name in ("selection_examples", "learned_steps"):
    if config.transfer[name] <= 0:
      raise ValueError(f"config.transfer.{name} must be a positive integer, got "
                       f"{config.transfer[name]!r}")
  if config.transfer.learned_learning_rate <= 0:
    raise ValueError(f"config.transfer.learned_learning_rate must be > 0, got "
                     f"{config.transfer.learned_learning_rate}")


METHODS = ("supervised",) + adaptation.METHODS


def _validate_adaptation(config):
  if config.method not in METHODS:
    raise ValueError(f"config.method must be one of {METHODS}, got {config.method!r}")
  target = config.adaptation.target
  if config.method in adaptation.METHODS:
    if target not in config.tasks or len(config.tasks) < 2:
      raise ValueError(f"config.method={config.method!r} needs config.adaptation.target to name "
                       f"one of config.tasks and at least one source task beside it; got target "
                       f"{target!r} and tasks {sorted(config.tasks)}")
  if config.adaptation.moment_weight < 0:
    raise ValueError(f"config.adaptation.moment_weight must be >= 0, got "
                     f"{config.adaptation.moment_weight}")
  if target and target not in config.tasks:
    raise ValueError(f"config.adaptation.target={target!r} is not in config.tasks "
                     f"{sorted(config.tasks)}")
