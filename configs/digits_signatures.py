r"""The paper's signature study (Table 5: fixed sequential, cyclic and random signatures against
learned mixture weights) on one hard embedded digit domain, the synthetic street-number digits
(or `domain=mnist_m`), with configs/digits.py's recipe: K templates, L layers, 24 channels, 4x4
patches, RMSProp with a cosine schedule, 1,500 steps of 128, EMA evaluation; 28x28 RGB. Deeper
than 8 layers the learning rate is 0.002 instead of 0.005 (docs/digits_five.md: at L=16, 0.005
sent all four signatures to chance in the first 100 steps).

  for L in 8 16; do for signature in sequential cyclic random mixture; do for seed in 0 1 2; do
    python -m compmod_jax.main --config=configs/digits_signatures.py:L=$L,signature=$signature \
        --config.seed=$seed --config.model.signature_seed=$seed \
        --workdir=workdirs/signatures_syn/L${L}_${signature}_seed$seed
  done; done; done

The random signature is a shuffle of the sequential one drawn from config.model.signature_seed
(the loop above passes each run's seed, so the three random runs have three signatures). A
learned run's mixture weights can be hardened and tabulated as in docs/modules.md (`surgery
harden`, `analysis.tables signatures`).
Results and commands: docs/digits_five.md. `tiny=1`: a seconds-long debug run.
"""
from compmod_jax import experiments

from configs import digits

ARGUMENTS = {"K": 4, "L": 8, "signature": "mixture", "domain": "syn_digits", "tiny": 0}
DOMAINS = ("syn_digits", "mnist_m")


def get_config(arg=None):
  args = experiments.parse_argument(arg, ARGUMENTS, {"domain": DOMAINS})
  config = digits.get_config(f"tiny={args['tiny']}")
  config.tasks = {args["domain"]: experiments.task(f"embedded_digits/{args['domain']}")}
  config.data.channels = 3
  if not args["tiny"]:
    config.model.update(num_templates=args["K"], num_layers=args["L"])
    if args["L"] > 8:
      # Every block adds a unit-variance branch to the residual stream, so at 16 layers the
      # first logits are large (loss 7.9 at step 1) and 0.005 left every signature at chance.
      config.optimizer.learning_rate = 0.002
  config.model.signature = args["signature"]
  return config
