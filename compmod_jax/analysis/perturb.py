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

The perturbations are pure functions of the mixture logits (analysis/perturbation.py); this
command evaluates them through the workdir tools of compmod_jax/finetune/surgery.py (loading,
data, evaluation).
"""
import json

from absl import flags, logging

from compmod_jax import cli
from compmod_jax.analysis import figures
from compmod_jax.analysis.perturbation import markdown_table, perturbations
from compmod_jax.finetune import surgery
from compmod_jax.workdir import Workdir

FLAGS = flags.FLAGS


def perturb_workdir(workdir, *, permutations=5, seed=0, max_examples=0, data_dir=None):
  """Evaluates every perturbation of every task of the run in `workdir`; writes and returns
  the table {task: {perturbation: test accuracy}}."""
  run = surgery.load_learned_run(workdir, data_dir, "perturbed")
  evaluate = surgery.SignatureEvaluator(run, max_examples)
  table = {}
  for task in sorted(run.config.tasks):
    table[task] = {name: evaluate(task, logits) for name, logits in
                   perturbations(evaluate.mixture_logits(task), permutations, seed).items()}
    logging.info("%s: trained %.4f, hardened %.4f", task, table[task]["trained"],
                 table[task]["hardened"])
  out = Workdir(workdir)
  out.perturbation("json").write_text(json.dumps(table, indent=2))
  out.perturbation("md").write_text(markdown_table(table))
  figures.perturbation_figure(table, run.config.model.num_layers, out.perturbation("png"))
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
    raise cli.CommandError("usage: python -m compmod_jax.analysis.perturb <workdir> [flags]")
  table = perturb_workdir(argv[1], permutations=FLAGS.permutations, seed=FLAGS.seed,
                          max_examples=FLAGS.max_examples, data_dir=FLAGS.data_dir)
  print(markdown_table(table))


if __name__ == "__main__":
  define_flags()
  cli.run_command("compmod_jax.analysis.perturb", main)
