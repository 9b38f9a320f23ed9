r"""Multi-source domain adaptation on Office-Caltech10 (paper §4.4, Table 3's middle column,
Table 11): sources amazon, caltech and dslr (labelled), target webcam (unlabelled), the 10
classes the four domains share. Office-Caltech10 is not in TFDS: give it as image folders,

    <folder>/<domain>/all/<class>/<image>.jpg     domain: amazon, caltech, dslr, webcam

(every domain with the same 10 class folders: back_pack, bike, calculator, headphones,
keyboard, laptop_computer, monitor, mouse, mug, projector). Each domain trains on the first 80%
of its images (in the order TFDS's preparation shuffled them) and is tested on the other 20%.

  python -m compmod_jax.main \
      --config=configs/office_caltech_da.py:method=adversarial,folder=/data/office_caltech10 \
      --workdir=workdirs/office_adversarial
  python -m compmod_jax.analysis.tables da workdirs/office_* --out=table3_office

Arguments as in configs/digits_da.py (method, model, source, trainable, tiny) and folder (the
root above). The paper gives no model for this dataset; this config uses DomainNet's (App.
D.2: 16 blocks and 12 templates, the plain baseline 12 blocks, 128x128 images, 8x8 patches,
dropout 0.3, kernel weight decay 1e-5, a learning rate decaying linearly from 2e-3 to 2e-5),
pretrained 3,000 steps of 32 images per source (about 100 epochs of amazon and caltech) and
adapted for 1,000 steps.
Expected (Table 3, webcam): source-only 42.96 (plain) / 41.89 (comp.); adversarial 57.79 /
48.18; moment matching 51.39 / 52.76; comp. supervised 53.57. Table 11 (supervised, isometric
/ compositional): amazon 49.84 / 68.96, caltech 64.70 / 65.17, dslr 64.54 / 55.51.

Memory (python -m compmod_jax.plan --num_devices=8, XLA:CPU's figure, 2026-12-03): 0.16 GiB per
device in float32 (the adversarial step).
"""
from compmod_jax import experiments
from compmod_jax.data import image_folder

from configs import common

SOURCES = ("amazon", "caltech", "dslr")
TARGET = "webcam"
TRAIN_SPLIT, EVAL_SPLIT = "all[:80%]", "all[80%:]"
ARGUMENTS = {**common.DA_ARGUMENTS, "folder": "office_caltech10"}


def domain_task(folder, domain, batch_size):
  return experiments.task(f"{image_folder.PREFIX}{folder}/{domain}", batch_size=batch_size,
                       train_split=TRAIN_SPLIT, eval_split=EVAL_SPLIT)


def pretraining(setup, folder, tiny):
  """Every source domain a task (with per-domain xi for the compositional set-up)."""
  return common.natural_domains({d: domain_task(folder, d, 32) for d in SOURCES}, setup, tiny,
                                batch_size=96, total_steps=3_000, every=500, warmup_steps=200)


def get_config(arg=None):
  args = experiments.parse_argument(arg, ARGUMENTS, common.DA_CHOICES)
  folder = args.pop("folder").rstrip("/")
  return common.domain_adaptation(
      lambda setup, tiny: pretraining(setup, folder, tiny), TARGET,
      domain_task(folder, TARGET, 32), args, source_batch_size=32, total_steps=1_000)
