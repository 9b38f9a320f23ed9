r"""Transfer from the five-dataset model to a new dataset (paper §4.3, Tables 2 and 10): the
templates of a `natural5.py` run stay frozen; the new task gets its own mixture weights (copied
from one pretraining task's, then fine-tuned), BN scales and offsets, and head.

  # 1. pretrain once (Table 8's "MW with patches", or its baseline), on a pod:
  launch/tpu_pod.sh run configs/natural5.py:setup=mixture_patches,K=32 gs://b/work/natural5_mw32 \
      --config.data.data_dir=gs://b/tensorflow_datasets
  # 2. transfer, one run per target and source column:
  launch/tpu_pod.sh run configs/transfer_table2.py:target=stanford_dogs,source=imagenet2012 \
      gs://b/work/dogs_from_imagenet --config.init_from=gs://b/work/natural5_mw32 \
      --config.data.data_dir=gs://b/tensorflow_datasets
  # Aircraft is no TFDS dataset: give its images as a folder, every labelled image in
  # <folder>/all/<variant>/*.jpg (App. A.2: 80% train, 20% test, split here)
  ... configs/transfer_table2.py:target=aircraft,folder=gs://b/fgvc_aircraft ...

Arguments:
  target: stanford_dogs | cars196 | emnist (TFDS emnist/balanced, 47 classes; the paper does
      not say which EMNIST) | cifar10 | aircraft (needs `folder`).
  source: the pretraining task whose mixture weights and BN the new task starts from (Table 2's
      columns: imagenet2012, cifar100, food101; also places365_small, sun397).
  model: compositional (`natural5.py:setup=mixture_patches`: xi, BN and head train) or
      baseline (`setup=baseline_patches`, no xi: BN and head train, Table 2's first column).
  K: templates of the pretrained compositional model (Table 10: 16 or 32); must match it.
  tiny: a CPU smoke test (pretrain with natural5.py:...,tiny=1).

Paper (Table 2, test accuracy; baseline / from IMAGENET / CIFAR / FOOD xi): AIRCRAFT 43.3 /
43.9 / 42.6 / 39.4; CARS 49.2 / 51.0 / 46.7 / 42.2; EMNIST 85.5 / 85.0 / 85.2 / 83.6; STANFORD
DOGS 55.6 / 57.6 / 42.4 / 36.5. Table 10 (baseline / MW K=16 / MW K=32): EMNIST 93.5 / 93.7 /
93.1; AIRCRAFT 42.8 / 46.9 / 43.1; CIFAR-10 93.5 / 93.7 / 93.1; STANFORD DOGS 63.2 / 64.0 /
67.5; CARS196 57.5 / 63.4 / 63.1. The new task adds fewer than 500 parameters besides its head
(the paper's count; results.json reports ours as added_parameters). The paper gives no
fine-tuning schedule: this config trains 10,000 steps of 256 images (about 200 epochs of
Stanford Dogs, 23 of EMNIST) with RMSProp at 0.01; the plan's numbers are in docs/pods.md.

Memory (python -m compmod_jax.plan --num_devices=8, XLA:CPU's figure, 2026-12-03): 3.8 GiB per
device in float32 (the new task's part; the checkpoint's tasks add their rows and heads): it
fits 16 GiB as it is.
"""
from compmod_jax import experiments
from compmod_jax.data import image_folder

from configs import natural5

# target -> (dataset, train split, eval split); the folder's dataset name is built from `folder`.
TARGETS = {
    "stanford_dogs": ("stanford_dogs", "train", "test"),
    "cars196": ("cars196", "train", "test"),
    "emnist": ("emnist/balanced", "train", "test"),
    "cifar10": ("cifar10", "train", "test"),
    "aircraft": (None, "all[:80%]", "all[80%:]"),
}
MODELS = {"compositional": ("mixture_patches", "xi_head_bn"),
          "baseline": ("baseline_patches", "head_bn")}
ARGUMENTS = {"target": "stanford_dogs", "folder": "", "source": "imagenet2012",
             "model": "compositional", "K": 32, "tiny": 0}


def get_config(arg=None):
  args = experiments.parse_argument(arg, ARGUMENTS, {"target": TARGETS, "model": MODELS,
                                                   "source": natural5.DATASETS})
  dataset, train_split, eval_split = TARGETS[args["target"]]
  if args["target"] == "aircraft":
    if not args["folder"]:
      raise ValueError("transfer_table2.py:target=aircraft needs folder=<path> (Aircraft is not "
                       "in TFDS): every labelled image in <path>/all/<variant>/<image>.jpg.")
    dataset = image_folder.PREFIX + args["folder"]
  setup, trainable = MODELS[args["model"]]
  config = natural5.get_config(f"setup={setup},K={args['K']},tiny={args['tiny']}")
  config.tasks = {args["target"]: experiments.task(
      dataset, train_split=train_split, eval_split=eval_split,
      augment="crop" if args["target"] == "emnist" else "")}  # mirrored letters are others
  config.xi_init = f"source:{args['source']}"
  config.trainable = trainable
  if args["tiny"]:
    config.batch_size = config.eval_batch_size = 16  # one task: natural5's 8 per task, twice
    return config
  config.batch_size = config.eval_batch_size = 256
  config.total_steps = 10_000
  config.eval_every = config.checkpoint_every = 1_000
  config.optimizer.update(learning_rate=0.01, warmup_steps=200)
  return config
