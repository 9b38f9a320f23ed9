r"""Five digit domains, in colour, in the spirit of the digit-five benchmark: MNIST, MNIST-M,
synthetic street-number digits and two corrupted MNIST renderings (shear, scale) as sources, each
a task with its own mixture weights and head; the UCI handwritten digits are the unseen target
(configs/digits_five_da.py adapts to them). The embedded-data counterpart of the paper's Table 12
(whose hard domain is SVHN) and of App. D.2's digits pretraining.

  python -m compmod_jax.main --config=configs/digits_five.py --workdir=workdirs/five
  python -m compmod_jax.main --config=configs/digits_five.py:setup=simple_baseline \
      --workdir=workdirs/five_isometric
  python -m compmod_jax.main --config=configs/digits_five.py:shared_mixture_layers=4 \
      --workdir=workdirs/five_half_shared

With each test image's domain unknown (docs/model.md, "Evaluating with the task unknown"): one
network for all five domains, `--config.model.task_free=True`, with one xi
(`:setup=mixture_patches`), the plain network (`:setup=simple_baseline`) or a router per image
(`:setup=mixture_patches --config.model.routing=example`); or the per-domain model that infers
the domain, `:setup=mixture_patches --config.model.routing=task_posterior`.

Every image is 28x28 RGB: the grayscale domains are fed as three equal channels, so one input
adapter reads them all. The recipe is configs/digits_multidomain.py's (8 layers, 4 templates,
4x4 patches, RMSProp, random translations, 32 examples per domain and step, 2,000 steps) with
App. D.2's dropout 0.3, kernel weight decay 1e-5 and a learning rate decaying linearly to a
hundredth; App. D.2's 16 layers (`layers=16`) double the time of a run on a CPU. The argument
picks the App. C set-up (mixture | mixture_patches | simple_baseline | baseline_patches; default
mixture), `shared_mixture_layers=<n>` shares the first n layers' mixture weights between all
domains (Table 12's half-shared model: n = 4 of 8), `tiny=1` gives a seconds-long debug run.
The three models of Table 12, 3 seeds each, and what they measure: docs/digits_five.md.
"""
from compmod_jax import experiments

from configs import common

SOURCES = ("mnist", "mnist_m", "syn_digits", "mnist_shear", "mnist_scale")
TARGET = "uci_digits"
ARGUMENTS = {"setup": "mixture", "shared_mixture_layers": 0, "layers": 8, "tiny": 0}


def pretraining(setup, tiny, layers=ARGUMENTS["layers"]):
  """The five sources as tasks, with the model fields of App. C set-up `setup`."""
  config = common.digits_multidomain(setup, tiny, SOURCES)
  config.data.channels = 3
  if not tiny:
    config.model.update(num_layers=layers, dropout_rate=0.3)
    config.optimizer.update(schedule="linear", final_lr_fraction=0.01, weight_decay=1e-5)
  return config


def get_config(arg=None):
  args = experiments.parse_argument(arg, ARGUMENTS)
  config = pretraining(args["setup"], args["tiny"], args["layers"])
  config.model.shared_mixture_layers = args["shared_mixture_layers"]
  return config
