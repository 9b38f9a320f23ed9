r"""The paper's Table 12 on the real TFDS digits: MNIST, Corrupted MNIST (shot noise, shear, scale)
and SVHN trained at once, each domain a task with its own head (and, in the compositional models,
its own mixture weights); App. D.2's recipe (configs/common.py `digits_with_svhn`: 32x32 RGB,
16 layers, 4 templates, dropout 0.3, weight decay 1e-5, learning rate 2e-3 -> 2e-5 linearly,
5,000 steps of 32 per domain).

  # once, on a machine with network access:
  for name in mnist mnist_corrupted/shot_noise mnist_corrupted/shear mnist_corrupted/scale \
      svhn_cropped; do tfds build $name --data_dir=$TFDS_DATA_DIR; done
  for model in isometric half_shared compositional; do
    python -m compmod_jax.main --config=configs/digits_table12.py:model=$model \
        --workdir=workdirs/table12_$model --config.data.data_dir=$TFDS_DATA_DIR
  done
  python -m compmod_jax.analysis.tables domains workdirs/table12_* --out=workdirs/table12

`model`: isometric (the plain network, 16 layers, everything shared but the heads; App. C's
simple_baseline), half_shared (mixture weights of the first 8 layers shared by all domains),
compositional (per-domain mixture weights; both mix BN with the weights, App. C's mixture).
`tiny=1`: a CPU smoke test. The embedded-data counterpart, with MNIST-M and synthetic digits in
place of SVHN, is configs/digits_five.py (docs/digits_five.md).
Expected (Table 12, test accuracy, isometric / half-shared / compositional): MNIST 99.14 / 99.09 /
99.29, shot noise 97.63 / 98.63 / 98.28, shear 98.79 / 98.69 / 98.58, scale 98.18 / 98.38 /
98.79, SVHN 54.73 / 88.86 / 89.16.
"""
from compmod_jax import experiments

from configs import common

DATASETS = {"mnist": "mnist", "mnist_shot_noise": "mnist_corrupted/shot_noise",
            "mnist_shear": "mnist_corrupted/shear", "mnist_scale": "mnist_corrupted/scale",
            "svhn": "svhn_cropped"}
ARGUMENTS = {"model": "compositional", "tiny": 0}


def get_config(arg=None):
  args = experiments.parse_argument(arg, ARGUMENTS, {"model": tuple(common.TABLE12_MODELS)})
  setup, shared_fraction = common.TABLE12_MODELS[args["model"]]
  config = common.digits_with_svhn(DATASETS, setup, args["tiny"])
  config.model.shared_mixture_layers = int(shared_fraction * config.model.num_layers)
  return config
