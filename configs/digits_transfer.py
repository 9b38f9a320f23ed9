r"""Transfer to a new task by its mixture weights (paper §4.3, App. C Table 9 on embedded data):
templates and adapters pretrained on the multi-domain digits, the UCI handwritten digits
(sklearn; 8x8 scans, a domain none of the sources has) as the new task.

  # 1. pretrain (per-task BN, so the new task's BN is its own):
  python -m compmod_jax.main --config=configs/digits_multidomain.py:setup=mixture_patches \
      --workdir=workdirs/multidomain_patches
  # 2. transfer, once per xi initialisation:
  python -m compmod_jax.main --config=configs/digits_transfer.py \
      --config.init_from=workdirs/multidomain_patches --config.xi_init=best_source \
      --workdir=workdirs/transfer_best_source
  (xi_init: source:<task> | best_source | min_entropy_source | accuracy | learned | random |
   diagonal;
   trainable: head | head_bn | xi_head_bn (default, the paper's method) | all)
  # 3. the table of docs/fine_tuning.md:
  python -m compmod_jax.analysis.tables transfer workdirs/transfer_*
  # 4. growth: the new task brings one template of its own (finetune/growth.py), and the run
  #    also saves what it added as a delta (finetune/deltas.py):
  python -m compmod_jax.main --config=configs/digits_transfer.py \
      --config.init_from=workdirs/multidomain_patches --config.transfer.add_templates=1 \
      --config.model.num_templates=5 --config.trainable=xi_head_bn_templates \
      --config.save_delta=True --workdir=workdirs/transfer_grown

The new task trains for 600 steps of 32 examples on its 1,438 training digits and is tested on
its 359 held-out ones; the pretrained tasks stay in the model with bit-identical predictions.
results.json holds accuracy_before_finetune, test_accuracy and added_parameters for uci_digits.
Expected (docs/fine_tuning.md, 2-core CPU, a few minutes per run): best_source above random.
The argument `setup` must match the pretraining run's; with `mixture` or `simple_baseline` the
BN scale and bias are shared, so the default `xi_head_bn` is refused (it would change the
pretrained tasks): pass --config.trainable=head (or xi). `tiny=1` is a seconds-long debug run.

Memory (python -m compmod_jax.plan --num_devices=8, XLA:CPU's figure, 2026-12-03): 0.01 GiB per
device in float32 (the new task's part).
"""
from compmod_jax import experiments

from configs import common

ARGUMENTS = {"setup": "mixture_patches", "tiny": 0}


def get_config(arg=None):
  args = experiments.parse_argument(arg, ARGUMENTS)
  tasks = {"uci_digits": experiments.task("embedded_digits/uci_digits")}
  config = common.digits_multitask(tasks, args["tiny"])
  experiments.apply_setup(config.model, args["setup"])
  config.xi_init = "best_source"
  config.trainable = "xi_head_bn"
  if not args["tiny"]:
    config.total_steps = 600
    config.eval_every = 200
    config.checkpoint_every = 200
    config.log_every = 50
  return config
