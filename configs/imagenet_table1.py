r"""ImageNet at 224x224 with the same parameters arranged into more layers (paper §4.2, Table 1).

The isometric baselines have one block per layer (`signature=plain`, 8 or 16 layers). The
compositional models keep those 8 or 16 blocks as templates and arrange them into 32 or 48
layers with the progressive signature the paper found in single-task training (each template
repeated in a contiguous run, runs growing towards the output); `signature=mixture` learns the
arrangement instead. Large design (rho = 1: 40 channels, output adapter 960/1280), 8x8 input
patches (28x28 activations), RMSProp at 0.04 with warmup, EMA evaluation on `validation` (the
`test` split of imagenet2012 has no labels).

  TPU_NAME=... ZONE=... launch/tpu_pod.sh run configs/imagenet_table1.py:K=8,L=32 \
      gs://bucket/workdirs/imagenet_8_32 --config.data.data_dir=gs://bucket/tensorflow_datasets
  # the baselines: K=8,L=8 and K=16,L=16 (signature plain is implied when K == L)

Arguments: K (templates = blocks of the baseline), L (layers), signature (progressive,
mixture, sequential, cyclic, random; K == L always means the plain baseline), tiny=1 (a CPU
smoke test at 32x32). The paper's isometric models come from Sandler et al. (2019); their exact
widths are not restated in the paper, so this config uses the paper's large design.

Expected (Table 1, ImageNet validation accuracy): isometric-8 68.3, K=8 in 32 layers 70.6;
isometric-16 71.7, K=16 in 48 layers 72.8 (the same parameter count as the baseline). Cost on
8 devices: docs/pods.md, "What an experiment costs" (python -m compmod_jax.plan).

Memory (python -m compmod_jax.plan --num_devices=8, XLA:CPU's figure, 2026-12-03): in the
precision and remat chosen below, per device at 128 images each: K=8,L=8 6.1 GiB and K=16,L=16
11.1 GiB in bfloat16; K=8,L=32 5.6 GiB and K=16,L=48 8.1 GiB in bfloat16 with remat=dots (each
layer's matmul outputs kept, +6% FLOPs). In float32 without remat the deep two need 22.4 and
32.9 GiB: more than a v5e or v3 chip holds (16 GiB), and the second more than a v4's 32 GiB.
"""
from compmod_jax import experiments

ARGUMENTS = {"K": 8, "L": 32, "signature": "progressive", "tiny": 0}


def get_config(arg=None):
  args = experiments.parse_argument(arg, ARGUMENTS)
  config = experiments.base_config()
  config.tasks = {"imagenet2012": experiments.task("imagenet2012")}
  experiments.natural_images(config, 224)
  config.data.eval_split = "validation"
  config.batch_size = config.eval_batch_size = 1024
  config.total_steps = 400_000
  config.eval_every = config.checkpoint_every = 10_000
  config.optimizer.update(learning_rate=0.04, warmup_steps=5_000)
  config.model.update(design="large", depth_multiplier=1.0, patch_size=8,
                      num_templates=args["K"], num_layers=args["L"],
                      signature="plain" if args["K"] == args["L"] else args["signature"],
                      # What fits 1024 images on 8 chips of 16 GiB (see above).
                      compute_dtype="bfloat16", remat="dots" if args["L"] > 16 else "none")
  if args["tiny"]:
    config.data.update(image_size=32, shuffle_buffer=64)
    config.model.update(design="small", depth_multiplier=0.2, patch_size=8,
                        num_templates=2, num_layers=2 if args["K"] == args["L"] else 4)
    experiments.make_tiny(config, total_steps=2, batch_size=16, eval_batch_size=16)
  return config
