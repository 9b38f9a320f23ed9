r"""How to start a new task's mixture weights (paper App. C, Table 9): random, accuracy-based
interpolation of the sources' xi (Eq. 1), learned interpolation, or the best single source,
then fine-tuning of xi, BN and head. The new task shares the sources' labels, so every source
head can be evaluated on it.

  data=digits: pretrained on MNIST, corrupted MNIST (shear, scale) and SVHN, the new task the
      UCI handwritten digits (the paper's USPS is not in TFDS);
  data=domainnet: pretrained on clipart, infograph, painting, quickdraw and real, the new task
      sketch (the 100 most frequent classes, labelled).

  python -m compmod_jax.main --config=configs/transfer_table9.py:data=digits,xi_init=learned \
      --workdir=workdirs/table9_digits_learned --config.data.data_dir=~/tensorflow_datasets
  python -m compmod_jax.analysis.tables transfer workdirs/table9_digits_*

Without --config.init_from the run first pretrains the compositional model of
`digits_svhn_da.py` / `domainnet_da.py` (setup mixture_patches) into <workdir>/pretrained;
point --config.init_from at one such pretraining (for example a domain adaptation run's
<workdir>/pretrained) to share it between the four runs. results.json holds the new task's
accuracy before fine-tuning (Table 9's "init." rows) and after it ("ft." rows).

Arguments: data (digits | domainnet), xi_init (random | accuracy | learned | best_source; the
paper's S/O column is best_source), tiny (a CPU smoke test).
Paper (Table 9; random / accuracy-based / learned / S/O): digits, USPS fine-tuned 93.76 / 95.50
/ 95.95 / 95.81 and 96.05 / 96.37 / 96.61; DomainNet sketch init. 5.4 / 15.08 / 13.57 / 16.04,
fine-tuned 14.76 / 16.44 / 15.90 / 15.46.

Memory (python -m compmod_jax.plan --num_devices=8, XLA:CPU's figure, 2026-12-03): 0.02 GiB
(data=digits) and 0.30 GiB (data=domainnet) per device in float32.
"""
import ml_collections

from compmod_jax import experiments

from configs import digits_svhn_da, domainnet_da

XI_INITS = ("random", "accuracy", "learned", "best_source")
SETUP = "mixture_patches"  # per-task xi and BN: the new task's are its own
ARGUMENTS = {"data": "digits", "xi_init": "learned", "tiny": 0}


def digits(tiny):
  pretrain = digits_svhn_da.pretraining(SETUP, tiny)
  target = experiments.task(f"embedded_digits/{digits_svhn_da.TARGET}", batch_size=8 if tiny else 32)
  return pretrain, digits_svhn_da.TARGET, target, 1_000  # ~22 epochs of 1,438 digits at 32


def domainnet(tiny):
  pretrain = domainnet_da.pretraining(SETUP, tiny)
  target = experiments.task(f"domainnet/{domainnet_da.TARGET}", batch_size=8 if tiny else 64)
  return pretrain, domainnet_da.TARGET, target, 20_000  # ~26 epochs of sketch's 100 classes


DATA = {"digits": digits, "domainnet": domainnet}


def get_config(arg=None):
  args = experiments.parse_argument(arg, ARGUMENTS, {"data": DATA, "xi_init": XI_INITS})
  pretrain, target, target_task, total_steps = DATA[args["data"]](args["tiny"])
  config = ml_collections.ConfigDict(pretrain.to_dict())
  config.pretrain = pretrain
  config.tasks = {target: target_task}
  config.xi_init = args["xi_init"]
  config.trainable = "xi_head_bn"
  if args["tiny"]:
    config.transfer.update(selection_examples=16, learned_steps=2)
  else:
    config.total_steps = total_steps
    config.eval_every = config.checkpoint_every = total_steps // 4
  return config
