r"""Self-organisation on 9 tasks (the embedded-data analogue of paper Fig. 2b): three labelings
of the digits (the digit, its parity, whether it is >= 5) x three renderings (original, boundary
extraction, blur), 9 templates, every task its own mixture weights.

  python -m compmod_jax.main --config=configs/digits_9tasks.py --workdir=workdirs/digits_9tasks

Look at task_similarity.png: tasks on the same rendering should share early layers, tasks with
the same labeling late ones. `:tiny=1` runs in seconds; `:setup=...` as in digits_multidomain.
"""
from compmod_jax import experiments

from configs import common

RENDERINGS = {"original": "mnist", "boundary": "mnist_boundary", "blur": "mnist_blur"}
LABELINGS = {"digit": "identity", "parity": "parity", "ge5": "at_least_5"}
ARGUMENTS = {"setup": "mixture", "tiny": 0}


def get_config(arg=None):
  args = experiments.parse_argument(arg, ARGUMENTS)
  tasks = {f"{rendering}_{labeling}": experiments.task(f"embedded_digits/{domain}",
                                                    label_map=label_map)
           for rendering, domain in RENDERINGS.items()
           for labeling, label_map in LABELINGS.items()}
  config = common.digits_multitask(tasks, args["tiny"])
  config.model.num_templates = 9 if not args["tiny"] else 3
  experiments.apply_setup(config.model, args["setup"])
  return config
