r"""Tables over finished runs, from their results.json files.

  python -m compmod_jax.analysis.tables transfer workdirs/transfer_* [--task=uci_digits]
  python -m compmod_jax.analysis.tables da workdirs/da_mnist/* --out=workdirs/table3_mnist

`transfer`: one row per run started from a pretrained checkpoint: xi initialisation, trainable
set, the new task's test accuracy before and after fine-tuning, the parameters it added to the
model and the parameters the run trained.
`da`: the paper's Table 3 layout, target test accuracy per adaptation method (rows) and model
(columns), from runs of the domain adaptation configs (configs/digits_da.py and the configs
built like it by configs/common.py) that start from the same target variables; runs of one cell
with different seeds give their mean and standard deviation. With --out also written as
table3.md and table3.json in that directory.
"""
import json
import sys

import numpy as np
from absl import app, flags
from etils import epath

from compmod_jax.methods import adaptation as adaptation_methods

flags.DEFINE_string("task", None, "The new task to tabulate (default: each run's only one).")
flags.DEFINE_string("out", None, "da: directory to write table3.md and table3.json into.")
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


def da_results(workdirs):
  """(xi_init, {method: {model: {seed: target test accuracy}}}) of domain-adaptation runs; each
  run's target, method, model and seed come from its config.json (config.adaptation; a
  trainable set other than the model's default, adaptation.TABLE3_MODELS, is added to the
  method's name). All runs
  must start from the same target variables (config.xi_init): cells compare methods, not
  starting points."""
  table, starts = {}, {}
  for workdir in workdirs:
    results = read_results(workdir)
    config = json.loads((epath.Path(workdir) / "config.json").read_text())
    adaptation = config.get("adaptation") or {}
    if not adaptation.get("method_name") or adaptation["target"] not in results["tasks"]:
      raise ValueError(f"{workdir} is not a domain-adaptation run (its config.json has no "
                       f"adaptation.method_name, or results.json no result of its target).")
    starts.setdefault(config["xi_init"], []).append(str(workdir))
    method, model = adaptation["method_name"], adaptation["model_name"]
    if config["trainable"] != adaptation_methods.TABLE3_MODELS[model][1]:  # what else trained
      method += f" ({config['trainable']})"
    seeds = table.setdefault(method, {}).setdefault(model, {})
    if config["seed"] in seeds:
      raise ValueError(f"Two runs for method {method!r}, model {model!r} with seed "
                       f"{config['seed']}; pass one workdir per seed.")
    seeds[config["seed"]] = results["tasks"][adaptation["target"]]["test_accuracy"]
  if len(starts) > 1:
    raise ValueError(f"The runs start from different target variables (config.xi_init: "
                     f"{starts}); make one table per starting point.")
  return next(iter(starts), None), table


def _summary(by_seed):
  accuracies = np.array(list(by_seed.values()))
  return {"mean": float(accuracies.mean()),
          "std": float(accuracies.std(ddof=1)) if len(accuracies) > 1 else 0.0,
          "by_seed": {str(seed): accuracy for seed, accuracy in sorted(by_seed.items())}}


def _cell(summary):
  if len(summary["by_seed"]) == 1:
    return f"{100 * summary['mean']:.2f}"
  return f"{100 * summary['mean']:.2f} ± {100 * summary['std']:.2f} ({len(summary['by_seed'])})"


def da_table(workdirs, out=None):
  xi_init, runs = da_results(workdirs)
  table = {method: {model: _summary(by_seed) for model, by_seed in row.items()}
           for method, row in runs.items()}
  models = sorted({model for row in table.values() for model in row})
  order = adaptation_methods.TABLE3_METHODS
  methods = sorted(table, key=lambda m: (order.index(m.split(" ")[0]), m)
                   if m.split(" ")[0] in order else (len(order), m))
  lines = [f"Target test accuracy (%), the target's variables copied from {xi_init}; a cell of "
           f"several runs: mean ± standard deviation (runs) over their seeds.", "",
           "| method | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
  for method in methods:
    cells = [_cell(table[method][m]) if m in table[method] else "" for m in models]
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  markdown = "\n".join(lines) + "\n"
  if out:
    out = epath.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table3.md").write_text(markdown)
    (out / "table3.json").write_text(json.dumps(
        {"xi_init": xi_init, "target_test_accuracy": table}, indent=2, sort_keys=True))
  return markdown


def main(argv):
  if len(argv) < 3 or argv[1] not in ("transfer", "da"):
    raise app.UsageError("usage: python -m compmod_jax.analysis.tables {transfer,da} WORKDIR...")
  if argv[1] == "transfer":
    sys.stdout.write(transfer_table(argv[2:], FLAGS.task))
  else:
    sys.stdout.write(da_table(argv[2:], FLAGS.out))


if __name__ == "__main__":
  app.run(main)
