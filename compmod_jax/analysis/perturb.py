"""How much a trained model depends on the order of its modules (paper App. B): each task is
evaluated with its signature perturbed, the templates and every other parameter unchanged.

  python -m compmod_jax.analysis.perturb <workdir> [--permutations=5] [--seed=0]
      [--max_examples=N] [--data_dir=...]

Per task (the tasks the run has data for), on its test split:
  trained       the model as trained (equals the run's own test accuracy)
  swap l,l+1    the mixture weights of two adjacent layers exchanged
  l<-m          layer l's mixture weights replaced by layer m's (every pair)
  permutation   the layers' mixture weights in a random order (seeded, several)
  hardened      each layer's weights made one-hot on their largest template
                (`python -m compmod_jax.surgery harden` exports that model)
Only xi moves: each layer keeps its BN parameters and statistics, so two layers with the same
xi swapped give the trained model exactly. Writes perturbation.json, perturbation.md and
perturbation.png into the workdir (the only files it writes there).

The perturbations are pure functions of the mixture logits; the command evaluates them
through the workdir tools of compmod_jax/surgery.py (loading, data, evaluation): the one
analysis module that reaches the trainer, and only through that tool layer.
"""
import json
import sys

import numpy as np
from absl import app, flags, logging
from etils import epath

from compmod_jax import cli
from compmod_jax.analysis import figures

FLAGS = flags.FLAGS


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


def perturb_workdir(workdir, *, permutations=5, seed=0, max_examples=0, data_dir=None):
  """Evaluates every perturbation of every task of the run in `workdir`; writes and returns
  the table {task: {perturbation: test accuracy}}."""
  from compmod_jax import surgery  # the tool layer: loading, data and evaluation
  run = surgery.load_learned_run(workdir, data_dir, "perturbed")
  evaluate = surgery.SignatureEvaluator(run, max_examples)
  table = {}
  for task in sorted(run.config.tasks):
    table[task] = {name: evaluate(task, logits) for name, logits in
                   perturbations(evaluate.mixture_logits(task), permutations, seed).items()}
    logging.info("%s: trained %.4f, hardened %.4f", task, table[task]["trained"],
                 table[task]["hardened"])
  out = epath.Path(workdir)
  (out / "perturbation.json").write_text(json.dumps(table, indent=2))
  (out / "perturbation.md").write_text(markdown_table(table))
  figures.perturbation_figure(table, run.config.model.num_layers, out / "perturbation.png")
  return table


def define_flags():
  """The command's flags (defined only when it runs: importing the module defines none)."""
  flags.DEFINE_integer("permutations", 5, "Random layer orders evaluated per task.")
  flags.DEFINE_integer("seed", 0, "Seed of the random layer orders.")
  flags.DEFINE_integer("max_examples", 0, "Test examples per evaluation (0: the whole split).")
  flags.DEFINE_string("data_dir", None, "Where the datasets are, when not where the run read "
                      "them.")


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("usage: python -m compmod_jax.analysis.perturb <workdir> [flags]")
  from compmod_jax import surgery  # the tool layer (see the module docstring)
  cli.quiet_library_logs()
  try:
    table = perturb_workdir(argv[1], permutations=FLAGS.permutations, seed=FLAGS.seed,
                            max_examples=FLAGS.max_examples, data_dir=FLAGS.data_dir)
  except surgery.USER_ERRORS as error:
    sys.exit(f"compmod_jax.analysis.perturb: {error}")
  print(markdown_table(table))


if __name__ == "__main__":
  define_flags()
  app.run(main)
