r"""Five natural-image datasets co-trained (paper §4.3, App. C, Table 8): imagenet2012,
cifar100, places365_small, sun397 and food101 with the large design (rho = 1: 40 channels,
output adapter 960/1280), 16 layers and 32 templates, for a TPU pod.

  TPU_NAME=... ZONE=... launch/tpu_pod.sh run configs/natural5.py:setup=mixture \
      gs://bucket/workdirs/natural5 --config.data.data_dir=gs://bucket/tensorflow_datasets

Needs the five datasets prepared in the data_dir (imagenet2012 from manually downloaded
archives). Set-ups as in Table 8: mixture, mixture_patches, simple_baseline, baseline_patches;
K templates (Table 8: 32, or 16 for "MW with patches"; the baselines have one block per layer);
`diag=1` initialises xi near-diagonal; `tiny=1` is a CPU smoke test. transfer_table2.py
transfers a finished run to new datasets (Tables 2, 10).
Expected (Table 8, validation accuracy, MW K=32): CIFAR 76.6, FOOD 71.9, IMAGENET 63.1,
PLACES 48.7, SUN 58.8.

Evaluation reads each dataset's `validation` split, as the paper reports validation accuracy:
the `test` splits of imagenet2012 and places365_small carry no labels and food101 has none.
cifar100 has no validation split, so it is evaluated on `test` (data/catalog.py records the
splits; the tests refuse a config that reads one a dataset lacks).

Memory (python -m compmod_jax.plan --num_devices=8, XLA:CPU's figure, 2026-12-03): 4.7 GiB per
device in float32 (setup=mixture): it fits 16 GiB as it is.
"""
from compmod_jax import experiments

DATASETS = ("imagenet2012", "cifar100", "places365_small", "sun397/tfds", "food101")
TASKS = {dataset.split("/")[0]: dataset for dataset in DATASETS}  # sun397's task: "sun397"
ARGUMENTS = {"setup": "mixture", "K": 32, "diag": 0, "tiny": 0}


def get_config(arg=None):
  args = experiments.parse_argument(arg, ARGUMENTS)
  config = experiments.base_config()
  config.tasks = {task: experiments.task(dataset) for task, dataset in TASKS.items()}
  config.data.eval_split = "validation"
  config.tasks.cifar100.eval_split = "test"  # it has no validation split
  experiments.natural_images(config, 224)
  config.batch_size = 1280
  config.eval_batch_size = 1280
  config.total_steps = 300_000
  config.eval_every = 10_000
  config.checkpoint_every = 2_000
  config.model.depth_multiplier = 1.0
  config.model.design = "large"
  config.model.num_layers = 16
  config.model.num_templates = args["K"]
  config.model.patch_size = 8
  config.optimizer.learning_rate = 0.04
  config.optimizer.warmup_steps = 5_000
  experiments.apply_setup(config.model, args["setup"])
  if args["diag"]:
    config.model.mixture_init = "diagonal"
    config.model.mixture_init_scale = 4.0
  if args["tiny"]:
    config.data.image_size = 32
    config.data.shuffle_buffer = 64
    experiments.make_tiny(config, total_steps=2, batch_size=40, eval_batch_size=40)
    config.model.num_layers = 2
    config.model.num_templates = 2
    config.model.depth_multiplier = 0.2
    config.model.design = "small"
  return config
