r"""Tables over finished runs, from their results.json files.

  python -m compmod_jax.analysis.tables transfer workdirs/transfer_* [--task=uci_digits]

`transfer`: one row per run started from a pretrained checkpoint: xi initialisation, trainable
set, the new task's test accuracy before and after fine-tuning, the parameters it added to the
model and the parameters the run trained.
"""
import json
import sys

from absl import app, flags
from etils import epath

flags.DEFINE_string("task", None, "The new task to tabulate (default: each run's only one).")
FLAGS = flags.FLAGS


def read_results(workdir):
  path = epath.Path(workdir) / "results.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: has the run in {workdir} evaluated yet?")
  return json.loads(path.read_text())


def transfer_rows(workdirs, task=None):
  """[(workdir, xi_init, trainable, before, after, added, trained)] for runs with an
  "init_from"."""
  rows = []
  for workdir in workdirs:
    results = read_results(workdir)
    info = results.get("init_from")
    if not info:
      raise ValueError(f"{workdir} was not started from a pretrained checkpoint (its "
                       f"results.json has no 'init_from').")
    new_tasks = sorted(info["new_tasks"])
    name = task or (new_tasks[0] if len(new_tasks) == 1 else None)
    if name not in info["new_tasks"]:
      raise ValueError(f"{workdir}: pass --task, one of its new tasks {new_tasks}")
    result = results["tasks"][name]
    rows.append((str(workdir), info["xi_init"], info["trainable"],
                 result["accuracy_before_finetune"], result["test_accuracy"],
                 result["added_parameters"], info["trainable_parameters"]))
  return rows


def transfer_table(workdirs, task=None):
  lines = ["| xi init | trainable | test accuracy before fine-tuning | after | parameters added "
           "| trained | workdir |", "|---|---|---:|---:|---:|---:|---|"]
  for workdir, xi_init, trainable, before, after, added, trained in transfer_rows(workdirs, task):
    lines.append(f"| {xi_init} | {trainable} | {100 * before:.2f} | {100 * after:.2f} | "
                 f"{added:,} | {trained:,} | {workdir} |")
  return "\n".join(lines) + "\n"


TABLES = {"transfer": transfer_table}


def main(argv):
  if len(argv) < 3 or argv[1] not in TABLES:
    raise app.UsageError(f"usage: python -m compmod_jax.analysis.tables {{{','.join(TABLES)}}} "
                         f"WORKDIR...")
  sys.stdout.write(TABLES[argv[1]](argv[2:], FLAGS.task))


if __name__ == "__main__":
  app.run(main)
