"""Recipes several experiment configs share (imported by them as `configs.common`).

Not an experiment itself: each config file in this folder is one, with its command and expected
result in its docstring.
"""
import ml_collections

from compmod_jax import experiments
from compmod_jax.methods import adaptation
from compmod_jax.train import optim

# The embedded digit domains of the multi-domain configs: MNIST and five renderings of it.
MNIST_DOMAINS = ("mnist", "mnist_shear", "mnist_scale", "mnist_shot_noise", "mnist_blur",
                 "mnist_boundary")


def digits_multitask(tasks, tiny):
  """The recipe shared by the embedded-digits multi-task configs: 8 layers, 4 templates, 4x4
  input patches (7x7x24 activations), random translations, 32 examples per task and step."""
  config = experiments.base_config()
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
    experiments.make_tiny(config, total_steps=4, batch_size=8 * len(tasks))
    config.optimizer.learning_rate = 0.02
    config.model.num_layers = 3
    config.model.num_templates = 2
  return config


def digits_multidomain(setup, tiny, domains=MNIST_DOMAINS):
  """Every MNIST domain of `domains` a task with its own xi (configs/digits_multidomain.py),
  with the model fields of one of the App. C set-ups."""
  tasks = {domain: experiments.task(f"embedded_digits/{domain}") for domain in domains}
  config = digits_multitask(tasks, tiny)
  experiments.apply_setup(config.model, setup)
  return config


# Table 12's models: {name: (App. C set-up, fraction of the layers whose mixture weights all
# domains share)}.
TABLE12_MODELS = {"isometric": ("simple_baseline", 0.0), "half_shared": ("mixture", 0.5),
                  "compositional": ("mixture", 0.0)}


def digits_with_svhn(datasets, setup, tiny):
  """App. D.2's digits pretraining on real TFDS digit domains with SVHN (`datasets`: {task:
  TFDS name}): every image 32x32 RGB, 16 layers and 4 templates, dropout 0.3, kernel weight
  decay 1e-5, a learning rate decaying linearly from 2e-3 to 2e-5 for about 2 epochs of SVHN
  (5,000 steps of 32 per domain), with the model fields of App. C set-up `setup`."""
  config = digits_multitask({name: experiments.task(dataset) for name, dataset in
                             datasets.items()}, tiny)
  experiments.apply_setup(config.model, setup)
  config.data.update(image_size=32, channels=3)
  if not tiny:
    config.model.update(num_layers=16, num_templates=4, dropout_rate=0.3)
    config.optimizer.update(schedule="linear", learning_rate=2e-3, final_lr_fraction=0.01,
                            weight_decay=1e-5)
    config.total_steps = 5_000  # ~2 epochs of SVHN's 73,257 training digits at 32 per step
  return config


def natural_domains(tasks, setup, tiny, *, batch_size, total_steps, every, warmup_steps):
  """The multi-domain pretraining recipe of App. D.2's DomainNet experiment, shared by the
  natural-image domain configs: 128x128 RGB images (ImageNet statistics, random crops and
  flips), 16 blocks and 12 templates at depth multiplier 1 (8x8 patches: 16x16x40
  activations), dropout 0.3, a learning rate decaying linearly from 2e-3 to 2e-5, the set-up
  `setup`. `every`: steps between evaluations and checkpoints. `tiny`: a CPU smoke test with 8
  images per domain and step."""
  config = experiments.base_config()
  config.tasks = tasks
  experiments.natural_images(config, 128)
  config.model.update(num_layers=16, num_templates=12, depth_multiplier=1.0, patch_size=8,
                      dropout_rate=0.3)
  config.optimizer.update(schedule="linear", learning_rate=2e-3, final_lr_fraction=0.01,
                          warmup_steps=warmup_steps)
  config.batch_size = config.eval_batch_size = batch_size
  config.total_steps = total_steps
  config.eval_every = config.checkpoint_every = every
  config.log_every = 100
  experiments.apply_setup(config.model, setup)
  if tiny:
    config.data.update(image_size=32, shuffle_buffer=64)
    config.model.update(num_layers=3, num_templates=2, depth_multiplier=0.2, patch_size=4)
    experiments.make_tiny(config, total_steps=4, batch_size=8 * len(tasks),
                       eval_batch_size=8 * len(tasks))
    for task in config.tasks.values():
      task.batch_size = 8
  return config


# The arguments of every domain adaptation config (`domain_adaptation` says what they mean).
DA_ARGUMENTS = {"method": "adversarial", "model": "compositional", "source": "best_source",
                "trainable": "", "joint": 0, "tiny": 0}
DA_CHOICES = {"method": adaptation.TABLE3_METHODS, "model": adaptation.TABLE3_MODELS}
# App. D.3-D.4: Adam, with a learning rate decaying linearly (a polynomial of degree 1) from the
# first value to the second.
DA_LEARNING_RATES = {"adversarial": (2e-4, 1e-5), "moment_matching": (1e-4, 1e-5),
                     "supervised": (2e-4, 1e-5), "source_only": (2e-4, 1e-5),
                     "bn_stats": (2e-4, 1e-5)}
# source=auto: the label-free choice of the domain whose variables the target copies.
LABEL_FREE_SOURCE = "min_entropy_source"
# bn_stats: the target's BN moving statistics, re-estimated on this many of its training batches.
TARGET_BN_BATCHES = 50


def domain_adaptation_config(arg, pretraining, target, target_task, **sizes):
  """`domain_adaptation` for a config whose arguments are DA_ARGUMENTS (`arg`, the string after
  the config's name)."""
  args = experiments.parse_argument(arg, DA_ARGUMENTS, DA_CHOICES)
  return domain_adaptation(pretraining, target, target_task, args, **sizes)


def domain_adaptation(pretraining, target, target_task, args, *, source_batch_size,
                      total_steps):
  """A domain adaptation run of the `target` domain (`target_task`, a task config) from a model
  pretrained on source domains: `pretraining(setup, tiny)` returns that multi-domain
  pretraining config with one of the multi-task set-ups (experiments.SETUPS). args: method (a
  row of Table 3: adaptation.TABLE3_METHODS), model (a column: adaptation.TABLE3_MODELS),
  source (a source task, "best_source", App. D.2's choice by target labels, or "auto" =
  "min_entropy_source", the label-free choice), trainable ("" = the model's default), tiny (the
  pretraining's debug settings, 8 examples per domain and step).

  Every domain gets its own input adapter row (loaded from the pretrained shared adapter), so
  tuning the target's never moves the sources'. Source-only runs train no step; source-only and
  the supervised bound run the supervised method on the target alone.
  """
  method, model, joint = args["method"], args["model"], bool(args["joint"])
  if joint and method not in adaptation.METHODS:
    raise ValueError(f"Config argument joint=1 trains the sources beside an adaptation loss: "
                     f"it takes method= one of {adaptation.METHODS}, got {method!r}.")
  setup, default_trainable = adaptation.TABLE3_MODELS[model]
  # Jointly the sources train everything of theirs and the shared parameters; the target's
  # rows are restricted to config.adaptation.target_params by the method itself.
  trainable = args["trainable"] or ("all" if joint else default_trainable)
  pretrain = pretraining(setup, args["tiny"])
  if model == "plain":
    # App. D.3: the baseline has as many layers as the compositional model has templates, so
    # both have about the same number of parameters.
    pretrain.model.num_layers = pretrain.model.num_templates
  config = ml_collections.ConfigDict(pretrain.to_dict())
  config.pretrain = pretrain
  config.tasks = {target: target_task}
  config.adaptation = adaptation.default_config()
  config.adaptation.update(target=target, method_name=method, model_name=model, joint=joint,
                           target_params=adaptation.JOINT_TARGET_PARAMS[model])
  if method in adaptation.METHODS:  # the sources' data feed the adaptation loss
    for domain, domain_task in pretrain.tasks.items():  # the same data, another batch size
      config.tasks[domain] = ml_collections.ConfigDict(
          {**domain_task.to_dict(), "batch_size": source_batch_size})
    config.method = method
    config.optimizer.lr_multipliers[adaptation.OWN_PARAMS] = 1.0
  config.model.input_adapter = "per_task"
  source = LABEL_FREE_SOURCE if args["source"] == "auto" else args["source"]
  config.xi_init = (source if source in ("best_source", LABEL_FREE_SOURCE)
                    else f"source:{source}")
  config.trainable = trainable
  first, last = DA_LEARNING_RATES[method]
  config.optimizer.update(name="adam", schedule="linear", learning_rate=first, warmup_steps=0,
                          final_lr_fraction=last / first, weight_decay=0.0)
  if joint:  # App. D.2-D.3: dropout 0.3, weight regularisation 1e-5, EMA evaluation (A.2)
    config.model.dropout_rate = 0.3
    config.optimizer.weight_decay = 1e-5
  else:
    for group in optim.TRAINABLE_PRESETS[trainable]:  # the target's variables learn faster
      config.optimizer.lr_multipliers[group] = 10.0
    config.ema_decay = 0.0  # evaluate the adapted variables themselves
  if method == "bn_stats":
    config.transfer.target_bn_batches = 2 if args["tiny"] else TARGET_BN_BATCHES
  if method in ("source_only", "bn_stats"):
    config.total_steps = 0
  elif not args["tiny"]:
    config.total_steps = total_steps
  if args["tiny"]:
    for task_config in config.tasks.values():
      task_config.batch_size = 8
  return config
