r"""Unsupervised multi-source domain adaptation by the target's mixture weights (paper §4.4,
App. D, Table 3 on embedded data): sources = MNIST and its five corrupted renderings (labelled),
target = the UCI handwritten digits (unlabelled).

  # pretraining (or leave out --config.init_from: the run then pretrains into <workdir>/pretrained)
  python -m compmod_jax.main --config=configs/digits_multidomain.py:setup=mixture_patches \
      --workdir=workdirs/multidomain_patches
  for method in source_only adversarial supervised; do
    python -m compmod_jax.main --config=configs/digits_da.py:method=$method \
        --config.init_from=workdirs/multidomain_patches --workdir=workdirs/da_$method
  done
  python -m compmod_jax.analysis.tables da workdirs/da_* --out=workdirs/table3

Methods (all start from the same target xi, head and BN: a source domain's, copied):
  source_only   no adaptation: the copied source network on the target (0 steps)
  adversarial   ADDA-style (App. D.3): a 3-layer CNN discriminator on the body features; only the
                target's xi learns to fool it (`trainable=xi_bn` also tunes its BN); Adam with
                a linearly (polynomial of degree 1) decaying rate, 2e-4 to 1e-5 as in the paper
                for the discriminator, 10x that for xi
  supervised    the upper bound: the target's xi fine-tuned with target labels
`source` picks the domain whose xi is copied: `best_source` (default) is the one most accurate
on the target's labelled training split (App. D.2; the log flags this use of target labels),
or a domain name for a fully unsupervised run. results.json holds target_test_accuracy;
target_xi.png shows the target's xi before and after. `tiny=1`: a seconds-long debug run.
"""
from compmod_jax.train import defaults

TARGET = "uci_digits"
METHODS = ("source_only", "adversarial", "supervised")
TRAINABLE = ("xi", "xi_bn")
ARGUMENTS = {"method": "adversarial", "source": "best_source", "trainable": "xi", "tiny": 0}


def get_config(arg=None):
  args = defaults.parse_argument(arg, ARGUMENTS)
  if args["method"] not in METHODS:
    raise ValueError(f"configs/digits_da.py: method must be one of {METHODS}, got "
                     f"{args['method']!r}")
  if args["trainable"] not in TRAINABLE:
    raise ValueError(f"configs/digits_da.py: trainable must be one of {TRAINABLE}, got "
                     f"{args['trainable']!r}")
  tasks = {TARGET: defaults.task(f"embedded_digits/{TARGET}", batch_size=64)}
  if args["method"] == "adversarial":  # the sources' data feed the discriminator
    tasks.update({d: defaults.task(f"embedded_digits/{d}", batch_size=16)
                  for d in defaults.MNIST_DOMAINS})
  config = defaults.digits_multitask(tasks, args["tiny"])
  config.pretrain = defaults.digits_multidomain("mixture_patches", args["tiny"])
  config.model = config.pretrain.model.copy_and_resolve_references()
  if args["tiny"]:
    for task in config.tasks.values():
      task.batch_size = 8
  config.xi_init = args["source"] if args["source"] == "best_source" else f"source:{args['source']}"
  config.trainable = args["trainable"]
  config.adaptation.target = TARGET
  config.adaptation.method_name = args["method"]
  config.adaptation.model_name = "compositional"
  config.optimizer.update(name="adam", schedule="linear", learning_rate=2e-4, warmup_steps=0,
                          final_lr_fraction=0.05, weight_decay=0.0)
  config.optimizer.lr_multipliers.mixture_logits = 10.0
  config.optimizer.lr_multipliers.batch_norm = 10.0
  config.ema_decay = 0.0  # evaluate the adapted xi itself
  if args["method"] == "source_only":
    config.total_steps = 0
  elif not args["tiny"]:
    config.total_steps = 1000
    config.eval_every = config.checkpoint_every = 250
    config.log_every = 50
  if args["method"] == "adversarial":
    config.method = "adversarial"
  return config
