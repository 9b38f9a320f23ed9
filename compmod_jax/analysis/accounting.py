"""Parameter accounting per component, against the paper's Table 7.

Counts come from the shapes the network actually creates (`jax.eval_shape` of its init, so
nothing is allocated), and tests check them against the closed-form counts below.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp

from compmod_jax.models.network import CompositionalIsometricNet
from compmod_jax.models.network_spec import NetworkSpec

# Table 7 (approximate counts): rows of (component, small design rho=0.6, large design rho=1);
# the logits row is per class (c2 per class plus a bias).
PAPER_TABLE7 = {
    "input adapter": (1200, 2000),
    "block with SE": (20000, 52000),
    "block without SE": (9000, 22000),
    "output adapter": (37000, 1.27e6),
    "logits per class": (256, 1280),
}


def count(tree):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def parameter_shapes(spec):
  """The network's variables as shape structs (no arrays are allocated)."""
  model = CompositionalIsometricNet(spec)
  images = jax.ShapeDtypeStruct((1, 4 * spec.patch_size, 4 * spec.patch_size,
                                 spec.input_channels), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)


def component_counts(spec):
  """Parameters of each component of `spec`'s network, as the network creates them.

  "block" is one template plus the BN scale/bias of one layer, i.e. the parameters of one
  block of a plain isometric network.
  """
  counts = {}
  for use_se in (True, False):
    variant = dataclasses.replace(spec, use_se=use_se)
    params = parameter_shapes(variant)["params"]
    template = count(params["templates"]) // variant.bank_size
    bn = count(params["block_bn"]) // (math.prod(params["block_bn"]["project"]["scale"].shape)
                                       // variant.width)
    counts["block with SE" if use_se else "block without SE"] = template + bn
  counts["input adapter"] = count(params["input_adapter"])
  counts["output adapter"] = count(params["output_adapter"])
  head = params["heads"][spec.tasks[0][0]]
  counts["logits per class"] = count(head) // spec.tasks[0][1]
  return counts


def formula_counts(spec):
  """Closed-form counts of the same components (App. A.1 with this project's choices)."""
  width, expanded, squeezed = spec.width, spec.expanded, spec.squeezed
  c1, c2 = spec.output_adapter_channels
  block_input = 2 * width if spec.input_skip else width
  convs = block_input * expanded + 9 * expanded + expanded * width
  squeeze_excite = 2 * expanded * squeezed + squeezed + expanded
  bn = 2 * (2 * expanded + width)
  return {
      "input adapter": spec.patch_size ** 2 * spec.input_channels * width + width,
      "block with SE": convs + squeeze_excite + bn,
      "block without SE": convs + bn,
      "output adapter": width * c1 + c1 + c1 * c2 + c2,
      # c2 weights per class; the bias adds one more per class.
      "logits per class": c2 + 1,
  }


def table7_specs():
  """The two designs of Table 7: small (rho=0.6) and large (rho=1), 4x4 RGB patches."""
  common = dict(tasks=(("table7", 1000),), input_channels=3, patch_size=4, num_layers=2,
                num_templates=1)
  return {"small": NetworkSpec(depth_multiplier=0.6, design="small", **common),
          "large": NetworkSpec(depth_multiplier=1.0, design="large", **common)}


def format_table7():
  """A printable comparison of this implementation's counts with Table 7."""
  ours = {design: component_counts(spec) for design, spec in table7_specs().items()}
  lines = [f"{'component':<18} {'small (ours)':>13} {'Table 7':>9} {'large (ours)':>13} "
           f"{'Table 7':>9}"]
  for component, (paper_small, paper_large) in PAPER_TABLE7.items():
    lines.append(f"{component:<18} {ours['small'][component]:>13,} {paper_small:>9,.0f} "
                 f"{ours['large'][component]:>13,} {paper_large:>9,.0f}")
  return "\n".join(lines)


def format_model_summary(spec, params):
  """Parameters per top-level group of a concrete model, with the total."""
  lines = [f"{'group':<16} {'parameters':>12}"]
  for name in sorted(params):
    lines.append(f"{name:<16} {count(params[name]):>12,}")
  lines.append(f"{'total':<16} {count(params):>12,}")
  signatures = spec.fixed_signatures
  shown = ("" if signatures is None else
           " per task" if len(set(signatures)) > 1 else f" {tuple(t + 1 for t in signatures[0])}")
  lines.append(f"L={spec.num_layers} K={spec.bank_size} width={spec.width} "
               f"signature={spec.signature}{shown}")
  return "\n".join(lines)


if __name__ == "__main__":
  print(format_table7())
