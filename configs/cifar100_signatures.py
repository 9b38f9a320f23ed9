r"""The paper's CIFAR-100 signature study (App. A, B; Tables 5 and 6).

Small design (rho = 0.6: 24 channels, output adapter 128/256), 2x2 input patches on 32x32
images (16x16 activations), RMSProp at 0.02, EMA evaluation. The argument picks K, L and the
signature type (mixture | sequential | cyclic | random | progressive), and optionally
input_skip=1 for the Table 6 variant where every block also sees the input adapter's output:

  python -m compmod_jax.main --config=configs/cifar100_signatures.py:K=4,L=16,signature=mixture \
      --workdir=workdirs/cifar100_k4_l16_mixture --config.data.data_dir=$TFDS_DATA_DIR

Needs cifar100 prepared in the data_dir (`tfds build cifar100 --data_dir=...`).
Expected (Table 5, validation accuracy): K=4, L=16: mixture 66.4, sequential 66.7,
cyclic 63.3, random 65.1. "tiny" (e.g. `:K=2,L=4,signature=cyclic,tiny=1`) runs in seconds.

Memory (python -m compmod_jax.plan --num_devices=8, XLA:CPU's figure, 2026-12-03): 0.69 GiB per
device in float32 (K=4,L=16,signature=mixture): it fits 16 GiB as it is.
"""
from compmod_jax import experiments

ARGUMENTS = {"K": 4, "L": 16, "signature": "mixture", "input_skip": 0, "tiny": 0}


def get_config(arg=None):
  args = experiments.parse_argument(arg, ARGUMENTS)
  config = experiments.base_config()
  config.tasks = {"cifar100": experiments.task("cifar100")}
  experiments.natural_images(config, 32)
  config.batch_size = 256
  config.total_steps = 80_000
  config.eval_every = 5_000
  config.checkpoint_every = 5_000
  config.model.num_templates = args["K"]
  config.model.num_layers = args["L"]
  config.model.signature = args["signature"]
  config.model.input_skip = bool(args["input_skip"])
  config.model.patch_size = 2
  config.optimizer.learning_rate = 0.02
  config.optimizer.warmup_steps = 1_000
  if args["tiny"]:
    experiments.make_tiny(config, total_steps=6, batch_size=16, eval_batch_size=16)
    config.model.patch_size = 8
  return config
