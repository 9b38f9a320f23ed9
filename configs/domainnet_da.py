r"""Multi-source domain adaptation on DomainNet (paper §4.4, App. D.2-D.4, Table 3 and 4):
sources clipart, infograph, painting, quickdraw and real (labelled), target sketch
(unlabelled); the 100 most frequent classes, images at 128x128.

  # once, on a machine with network access (DomainNet is ~20 GB):
  for d in clipart infograph painting quickdraw real sketch; do
    tfds build domainnet/$d --data_dir=gs://bucket/tensorflow_datasets; done
  # pretraining on the sources and one adaptation run (add --config.init_from=<pretrained
  # workdir> to reuse a pretraining):
  TPU_NAME=... ZONE=... launch/tpu_pod.sh run \
      configs/domainnet_da.py:method=moment_matching,model=compositional \
      gs://bucket/workdirs/domainnet_mm --config.data.data_dir=gs://bucket/tensorflow_datasets
  python -m compmod_jax.analysis.tables da gs://bucket/workdirs/domainnet_* --out=table3

Arguments as in configs/digits_da.py (method, model, source, trainable, tiny). The models of
App. D.2: the compositional network has 16 blocks and 12 templates, the plain baseline 12
blocks; both output 16x16x40 activations (8x8 patches, depth multiplier 1). Training as for
the digits (D.2): dropout 0.3, kernel weight decay 1e-5, learning rate decaying linearly from
2e-3 to 2e-5 in pretraining. The class ranking counts the training labels of all six domains
("the 100 classes that occur most frequently in the dataset"), the only use of sketch's labels
besides best_source and supervised. The paper trained 20 epochs of pretraining and 15-20 of
adaptation; here 60,000 and 40,000 steps of 64 examples per domain (set
--config.total_steps and --config.pretrain.total_steps for other budgets).
Expected (Table 3, sketch): source-only 24.75 (plain) / 11.61 (comp.); adversarial 27.54 /
14.40; moment matching 26.12 / 14.22; comp. supervised 15.46. `tiny=1`: a CPU smoke test.

Memory (python -m compmod_jax.plan --num_devices=8, XLA:CPU's figure, 2026-12-03): 0.30 GiB per
device in float32 (the adversarial step): it fits 16 GiB as it is.
"""
from compmod_jax import experiments

from configs import common

SOURCES = ("clipart", "infograph", "painting", "quickdraw", "real")
TARGET = "sketch"


def pretraining(setup, tiny):
  """Every source domain a task (with per-domain xi for the compositional set-up)."""
  config = common.natural_domains(
      {d: experiments.task(f"domainnet/{d}", batch_size=64) for d in SOURCES}, setup, tiny,
      batch_size=320, total_steps=60_000, every=5_000, warmup_steps=1000)
  config.data.update(most_frequent_classes=100,
                     class_frequency_datasets=tuple(f"domainnet/{d}"
                                                    for d in SOURCES + (TARGET,)))
  if not tiny:
    config.log_every = 200
  return config


def get_config(arg=None):
  return common.domain_adaptation_config(
      arg, pretraining, TARGET, experiments.task(f"domainnet/{TARGET}", batch_size=64),
      source_batch_size=32, total_steps=40_000)
