"""Perturbed signatures (paper App. B): pure functions of one task's mixture logits, and the
table of their accuracies. `python -m compmod_jax.analysis.perturb` evaluates them."""
import numpy as np


def perturbations(logits, permutations, seed):
  """{name: logits'} for one task's mixture logits [L, K]: "trained", "swap l,l+1", "l<-m",
  "permutation i", "hardened" (layers numbered from 1). Rows move whole, so each layer's xi
  is exactly a trained layer's xi; "hardened" is 0 on the arg-max and -inf elsewhere, whose
  softmax is exactly one-hot."""
  num_layers = logits.shape[0]
  perturbed = {"trained": logits}
  for layer in range(num_layers - 1):
    order = np.arange(num_layers)
    order[[layer, layer + 1]] = order[[layer + 1, layer]]
    perturbed[f"swap {layer + 1},{layer + 2}"] = logits[order]
  for layer in range(num_layers):
    for other in range(num_layers):
      if other != layer:
        replaced = logits.copy()
        replaced[layer] = logits[other]
        perturbed[f"{layer + 1}<-{other + 1}"] = replaced
  rng = np.random.default_rng(seed)
  for index in range(permutations):
    perturbed[f"permutation {index + 1}"] = logits[rng.permutation(num_layers)]
  one_hot = np.eye(logits.shape[1], dtype=bool)[np.argmax(logits, axis=-1)]
  perturbed["hardened"] = np.where(one_hot, 0.0, -np.inf).astype(np.float32)
  return perturbed


def markdown_table(table):
  """One row per perturbation, one accuracy column per task (change from trained beside it)."""
  tasks = sorted(table)
  lines = ["| perturbation | " + " | ".join(tasks) + " |",
           "|---|" + "---:|" * len(tasks)]
  for name in table[tasks[0]]:
    cells = []
    for task in tasks:
      accuracy, trained = table[task][name], table[task]["trained"]
      change = "" if name == "trained" else f" ({100 * (accuracy - trained):+.2f})"
      cells.append(f"{100 * accuracy:.2f}{change}")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"
