r"""Unsupervised multi-source domain adaptation (paper §4.4, App. D, Table 3 on embedded data):
sources = MNIST and its five corrupted renderings (labelled), target = the UCI handwritten
digits (unlabelled).

  # pretraining (or leave out --config.init_from: the run then pretrains into <workdir>/pretrained)
  python -m compmod_jax.main --config=configs/digits_multidomain.py:setup=mixture_patches \
      --workdir=workdirs/multidomain_patches
  python -m compmod_jax.main --config=configs/digits_da.py:method=source_only,model=plain \
      --workdir=workdirs/da_plain_pretraining   # pretrains the plain network in .../pretrained
  # Table 3 from the label-free source choice (no target label anywhere); S=best_source for
  # the paper's App. D.2 choice, which reads target labels to pick the domain, or a domain name
  S=auto; D=workdirs/da_$S; C=configs/digits_da.py; P=workdirs/da_plain_pretraining/pretrained
  for model in compositional plain; do
    I=workdirs/multidomain_patches; [ $model = plain ] && I=$P
    for method in source_only bn_stats; do
      python -m compmod_jax.main --config=$C:method=$method,model=$model,source=$S \
          --config.init_from=$I --workdir=$D/${model}_$method
    done
    for seed in 0 1 2; do
      for method in adversarial moment_matching; do for joint in 0 1; do
        python -m compmod_jax.main --config=$C:method=$method,model=$model,source=$S,joint=$joint \
            --config.init_from=$I --config.seed=$seed --workdir=$D/${model}_${method}_${joint}_$seed
      done; done
      python -m compmod_jax.main --config=$C:method=supervised,model=$model,source=$S \
          --config.init_from=$I --config.seed=$seed --workdir=$D/${model}_supervised_$seed
    done
  done
  python -m compmod_jax.analysis.tables da $D/* --out=workdirs/table3_$S

Models (Table 3's columns):
  compositional  pretrained with per-domain xi and BN (setup mixture_patches); adaptation trains
                 the target's xi alone (32 numbers; `trainable=xi_bn` or `xi_input_adapter`
                 add its BN or its input adapter)
  plain          the isometric network without templates, as many layers as the compositional
                 model has templates (App. D.3), pretrained with everything shared but the
                 heads and BN statistics (setup simple_baseline); adaptation trains the target's
                 input adapter alone (408 numbers)
Methods (Table 3's rows; all start from the same target variables: a source domain's, copied):
  source_only      no adaptation: the copied source network on the target (0 steps)
  bn_stats         the target's own BN statistics (AdaBN): the copied source network with the
                   target's BN moving statistics re-estimated on 50 batches of target images
                   (labels unread); nothing trains (0 steps). The control every adaptation
                   method is compared with.
  adversarial      ADDA-style (App. D.3): a 3-layer CNN discriminator on the body features;
                   Adam, rate decaying linearly from 2e-4 to 1e-5 (10x for the target's)
  moment_matching  M3SDA-style (App. D.4): moment distance to every source plus the two-
                   classifier discrepancy min-max on the embeddings; Adam, 1e-4 to 1e-5
  supervised       the upper bound: the same variables fine-tuned with target labels
`joint=1` (adversarial, moment_matching): the paper's §4.4 method. In the same step the source
domains train on their labelled classification loss (their xi, BN, heads, the templates and
adapters: trainable=all) while only the target's xi (a plain model: its input adapter) follows
the adaptation loss; App. D.2-D.3's dropout 0.3, weight regularisation 1e-5 and EMA evaluation.
Without it (the default) the pretrained model stays frozen and only the target's variables
adapt.
`source` picks the domain whose variables are copied: `best_source` (default) is the one most
accurate on the target's labelled training split (App. D.2; the log flags this use of target
labels), `auto` (or its name, `min_entropy_source`) the one whose predictions on the target's
images are most confident (lowest mean entropy; no label read), or a domain name; both of the
latter keep the run unsupervised. Adapted runs train 225 steps (App. D's 10 epochs of the
target). results.json holds the target's test accuracy under tasks.uci_digits (adversarial and
moment matching runs also as target_test_accuracy); new_task_xi.png shows the target's xi at
the start and now. `tiny=1`: a seconds-long debug run.
Measured (docs/domain_adaptation.md, 2026-12-03 at d7311c4, seeds 0-1; both source rules pick
mnist_blur), as compositional / plain: source-only 89.69 / 94.43, target statistics 88.30 /
92.76, adversarial 89.00 +- 0.20 / 89.14 +- 1.58, adversarial joint 88.44 +- 0.20 / 92.06 +-
0.20, moment matching 87.74 +- 0.00 / 92.20 +- 0.00, moment matching joint 88.02 +- 0.39 / 92.48
+- 0.39, supervised 89.42 +- 0.00 / 94.85 +- 0.20: no unsupervised method beats source-only.

Memory (python -m compmod_jax.plan --num_devices=8, XLA:CPU's figure, 2026-12-03): 0.02 GiB per
device in float32 (the adversarial step).
"""
from compmod_jax import experiments

from configs import common

TARGET = "uci_digits"
# App. D.2-D.3: 10 epochs of adaptation, of the target's 1,438 training images at batch 64.
ADAPTATION_STEPS = 225


def get_config(arg=None):
  return adaptation_config(arg, common.digits_multidomain)


def adaptation_config(arg, pretraining):
  """Adaptation to the UCI digits from the sources of `pretraining(setup, tiny)`, with this
  config's arguments, batch sizes and steps (configs/digits_five_da.py shares them)."""
  args = experiments.parse_argument(arg, common.DA_ARGUMENTS, common.DA_CHOICES)
  config = common.domain_adaptation(
      pretraining, TARGET, experiments.task(f"embedded_digits/{TARGET}", batch_size=64), args,
      source_batch_size=16, total_steps=ADAPTATION_STEPS)
  if not args["tiny"]:
    config.eval_every = config.checkpoint_every = ADAPTATION_STEPS
    config.log_every = 25
  return config
