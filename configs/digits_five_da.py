r"""Unsupervised multi-source domain adaptation (paper §4.4, Table 3) from the five digit domains
of configs/digits_five.py (MNIST, MNIST-M, synthetic digits, shear, scale; labelled) to the UCI
handwritten digits (unlabelled): configs/digits_da.py's methods, models, arguments and
adaptation recipe (225 steps, App. D.2-D.4), with the five colour domains as sources.

  S=auto; D=workdirs/five_da; C=configs/digits_five_da.py; P=workdirs/five_da_plain_pretraining
  python -m compmod_jax.main --config=configs/digits_five.py:setup=mixture_patches \
      --workdir=workdirs/five_patches
  python -m compmod_jax.main --config=$C:method=source_only,model=plain \
      --workdir=$P          # pretrains the plain network in $P/pretrained
  for model in compositional plain; do
    I=workdirs/five_patches; [ $model = plain ] && I=$P/pretrained
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
  python -m compmod_jax.analysis.tables da $D/* --out=workdirs/table3_five

All images are 28x28 RGB (the grayscale domains and the target as three equal channels).
`tiny=1`: a seconds-long debug run.
"""
from configs import digits_da, digits_five


def get_config(arg=None):
  return digits_da.adaptation_config(arg, digits_five.pretraining)
