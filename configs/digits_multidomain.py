r"""Multi-domain digits: MNIST and five corrupted renderings of it, each domain a task with its
own mixture weights, head and BN statistics; templates and adapters shared (paper §4.3, App. D.2
and Table 12 on the embedded data).

  python -m compmod_jax.main --config=configs/digits_multidomain.py --workdir=workdirs/multidomain
  python -m compmod_jax.main --config=configs/digits_multidomain.py:setup=baseline_patches \
      --workdir=workdirs/multidomain_baseline_patches

The argument picks the App. C set-up (mixture | mixture_patches | simple_baseline |
baseline_patches; default mixture), `shared_mixture_layers=<n>` makes the first n layers' mixture
weights one row all domains share (Tables 11/12's "half-shared" model is n = 4 of these 8
layers), `domains=table12` keeps the four domains of the paper's Table 12 that are embedded here
(MNIST, shot noise, shear, scale; its fifth, SVHN, is not), and `tiny=1` gives a seconds-long
debug run. The workdir gets
results.json, accuracy_table.md, mixture_weights.png and task_similarity.png.
Expected (2-core CPU, docs/digits_results.md): >= 95% test accuracy on every domain.
"""
from compmod_jax import experiments

from configs import common

ARGUMENTS = {"setup": "mixture", "shared_mixture_layers": 0, "domains": "all", "tiny": 0}
DOMAINS = {"all": common.MNIST_DOMAINS,
           "table12": ("mnist", "mnist_shot_noise", "mnist_shear", "mnist_scale")}


def get_config(arg=None):
  args = experiments.parse_argument(arg, ARGUMENTS, {"domains": DOMAINS})
  config = common.digits_multidomain(args["setup"], args["tiny"], DOMAINS[args["domains"]])
  config.model.shared_mixture_layers = args["shared_mixture_layers"]
  return config
