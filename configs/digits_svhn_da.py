r"""Multi-source domain adaptation on digits with SVHN (paper App. D.2, Table 3 "Digits"):
sources MNIST, corrupted MNIST (shear), corrupted MNIST (scale) and SVHN (labelled), target the
UCI handwritten digits (unlabelled; the paper's USPS is not in TFDS). All images at 32x32 RGB.

  # once, on a machine with network access:
  tfds build svhn_cropped --data_dir=~/tensorflow_datasets
  python -m compmod_jax.main --config=configs/digits_svhn_da.py:method=adversarial \
      --workdir=workdirs/svhn_da_adversarial --config.data.data_dir=~/tensorflow_datasets

Arguments as in configs/digits_da.py (method, model, source, trainable, tiny); without
--config.init_from the run pretrains on the sources into <workdir>/pretrained first. The models
of App. D.2: 16 layers and 4 templates (the plain baseline 4 layers), dropout 0.3, kernel
weight decay 1e-5, pretraining with a learning rate decaying linearly from 2e-3 to 2e-5 for
about 2 epochs of SVHN; adaptation for about 10 epochs of the target.
Expected (Table 3, with USPS as the target): source-only 95.75 (plain) / 96.05 (comp.);
adversarial 98.12 / 98.33; moment matching 96.93 / 96.85; comp. supervised 98.25.
`tiny=1`: a CPU smoke test.

Memory (python -m compmod_jax.plan --num_devices=8, XLA:CPU's figure, 2026-12-03): 0.05 GiB per
device in float32 (the adversarial step).
"""
from compmod_jax import experiments

from configs import common

SOURCES = {"mnist": "embedded_digits/mnist", "mnist_shear": "embedded_digits/mnist_shear",
           "mnist_scale": "embedded_digits/mnist_scale", "svhn": "svhn_cropped"}
TARGET = "uci_digits"


def pretraining(setup, tiny):
  return common.digits_with_svhn(SOURCES, setup, tiny)


def get_config(arg=None):
  # ~10 epochs of the target's 1,438 training digits at 64 per step.
  return common.domain_adaptation_config(
      arg, pretraining, TARGET, experiments.task(f"embedded_digits/{TARGET}", batch_size=64),
      source_batch_size=16, total_steps=250)
