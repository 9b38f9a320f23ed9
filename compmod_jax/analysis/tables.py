r"""Tables over finished runs, from their results.json files.

  python -m compmod_jax.analysis.tables transfer workdirs/transfer_* [--task=uci_digits]
  python -m compmod_jax.analysis.tables da workdirs/da_auto/* --out=workdirs/table3_auto
  python -m compmod_jax.analysis.tables domains workdirs/table12/* --out=workdirs/table12
  python -m compmod_jax.analysis.tables signatures workdirs/signatures/*.hard --out=...
  python -m compmod_jax.analysis.tables similarity workdirs/five/compositional_seed* \
      --group=mnist,mnist_scale,mnist_shear --out=...
  python -m compmod_jax.analysis.tables routing workdirs/task_unknown/* --out=...

`transfer`: one row per run started from a pretrained checkpoint: xi initialisation, trainable
set, the new task's test accuracy before and after fine-tuning, the parameters it added to the
model and the parameters the run trained.
`da`: the paper's Table 3 layout, target test accuracy per adaptation method (rows) and model
(columns), from runs of the domain adaptation configs (configs/digits_da.py and the configs
built like it by configs/common.py) that start from the same target variables; runs of one cell
with different seeds give their mean and standard deviation. With --out also written as
table3.md and table3.json in that directory.
`domains`: the paper's Table 12 layout, each task's test accuracy (rows) per model (columns:
isometric, compositional half-shared, compositional, ... named from each run's config.model)
from multi-task runs, plus rows for runs started from one of them (config.init_from) that
evaluate a new task, e.g. source-only (0 steps) on a domain none of them trained on; mean and
standard deviation over seeds (the pretraining run's); a run from a checkpoint of its own
tasks (0 steps: a re-evaluation) is a column as a run from scratch. Runs of several depths or
template counts (the signature study) get K and L in their column. --out: domains.md and
domains.json.
`signatures`: the single-task signature study, from the output folders of
`python -m compmod_jax.surgery harden`: per run its regularisers, seed, mixed and hardened test
accuracy, mean largest mixture weight per layer, hardened signature, and whether that is
contiguous and progressive (analysis/signatures.py); then per regulariser setting the mean and
standard deviation over seeds. --out: signatures.md and signatures.json.
`similarity`: the paper's Fig. 2 question on multi-task runs with learned mixture weights: per
layer, the Bhattacharyya similarity of two tasks' xi (analysis/similarity.py; the EMA weights of
the newest checkpoint) averaged over the pairs of tasks within --group and over every other pair,
then mean and standard deviation over the runs. --out: similarity.md and similarity.json.
`routing`: the routing health of each run's final evaluation (results.json "routing";
analysis/routing.py) per model (columns, named as `domains` names them), mean and standard
deviation over seeds: the mutual information and balance averaged over layers, the least-used
template's share, the largest kernel cosine of two templates and the number of warnings.
--out: routing.md and routing.json.
"""
import json
import sys

import numpy as np
from absl import flags
from etils import epath

from compmod_jax import cli
from compmod_jax.analysis import signatures, similarity
from compmod_jax.finetune import pretrained
from compmod_jax.methods import adaptation as adaptation_methods
from compmod_jax.models import templates
from compmod_jax.workdir import RunStart, Workdir

flags.DEFINE_string("task", None, "The new task to tabulate (default: each run's only one).")
flags.DEFINE_list("group", [], "similarity: the tasks whose pairs are compared with the others.")
flags.DEFINE_string("out", None, "da, domains, signatures: directory to write the table into "
                    "(Markdown and JSON).")
MODES = ("transfer", "da", "domains", "signatures", "similarity", "routing")
FLAGS = flags.FLAGS


def read_results(workdir):
  return _read_json(Workdir(workdir).results_json, f"has the run in {workdir} evaluated yet?")


def read_config(workdir):
  return _read_json(Workdir(workdir).config_json, f"{workdir} is not a run's workdir.")


def run_start(results):
  """How the run whose results.json is `results` started (workdir.RunStart; empty when from
  scratch)."""
  return RunStart.from_dict(results.get("init_from"))


def _read_json(path, missing_hint):
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: {missing_hint}")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise ValueError(f"{path} is not complete JSON ({error}); is its run still writing it? "
                     f"Leave that workdir out or wait for the run.") from None


def transfer_rows(workdirs, task=None):
  """[(workdir, xi_init, trainable, before, after, added, trained)] for runs with an
  "init_from"."""
  rows = []
  for workdir in workdirs:
    results = read_results(workdir)
    start = run_start(results)
    if not start.checkpoint:
      raise ValueError(f"{workdir} was not started from a pretrained checkpoint (its "
                       f"results.json has no 'init_from').")
    new_tasks = sorted(start.new_tasks)
    name = task or (new_tasks[0] if len(new_tasks) == 1 else None)
    if name not in start.new_tasks:
      raise ValueError(f"{workdir}: pass --task, one of its new tasks {new_tasks}")
    result = results["tasks"][name]
    rows.append((str(workdir), start.xi_init, start.trainable,
                 result["accuracy_before_finetune"], result["test_accuracy"],
                 result["added_parameters"], start.trainable_parameters))
  return rows


def transfer_table(workdirs, task=None):
  lines = ["| xi init | trainable | test accuracy before fine-tuning | after | parameters added "
           "| trained | workdir |", "|---|---|---:|---:|---:|---:|---|"]
  for workdir, xi_init, trainable, before, after, added, trained in transfer_rows(workdirs, task):
    lines.append(f"| {xi_init} | {trainable} | {100 * before:.2f} | {100 * after:.2f} | "
                 f"{added:,} | {trained:,} | {workdir} |")
  return "\n".join(lines) + "\n"


def da_results(workdirs):
  """(xi_init, {method: {model: {seed: target test accuracy}}}, {model: sources copied}) of
  domain-adaptation runs; each run's target, method, model and seed come from its config.json
  (config.adaptation; a trainable set other than the model's default,
  adaptation.TABLE3_MODELS, is added to the method's name). All runs must start from the same
  target variables (config.xi_init): cells compare methods, not starting points."""
  table, starts, copied = {}, {}, {}
  for workdir in workdirs:
    results, config = read_results(workdir), read_config(workdir)
    adaptation = config.get("adaptation") or {}
    if not adaptation.get("method_name") or adaptation["target"] not in results["tasks"]:
      raise ValueError(f"{workdir} is not a domain-adaptation run (its config.json has no "
                       f"adaptation.method_name, or results.json no result of its target).")
    starts.setdefault(config["xi_init"], []).append(str(workdir))
    method, model = adaptation["method_name"], adaptation["model_name"]
    if adaptation.get("joint"):  # the paper's: sources trained in the same step
      method += " (joint)"
    elif config["trainable"] != adaptation_methods.TABLE3_MODELS[model][1]:  # what else trained
      method += f" ({config['trainable']})"
    _add_seed(table, method, model, config["seed"],
              results["tasks"][adaptation["target"]]["test_accuracy"], workdir)
    start = run_start(results).new_tasks.get(adaptation["target"], {})
    # The source whose variables were copied has coefficient 1 (a best_source or
    # min_entropy_source start names no domain in config.xi_init).
    copied.setdefault(model, set()).update(
        source for source, weight in start.get("coefficients", {}).items() if weight == 1.0)
  if len(starts) > 1:
    raise ValueError(f"The runs start from different target variables (config.xi_init: "
                     f"{starts}); make one table per starting point.")
  return next(iter(starts), None), table, {m: sorted(s) for m, s in copied.items() if s}


def _summary(by_seed):
  accuracies = np.array(list(by_seed.values()))
  return {"mean": float(accuracies.mean()),
          "std": float(accuracies.std(ddof=1)) if len(accuracies) > 1 else 0.0,
          "by_seed": {str(seed): accuracy for seed, accuracy in sorted(by_seed.items())}}


def _cell(summary, scale=100, digits=2):
  """A summary as "mean ± std (runs)", in percent unless `scale` says otherwise."""
  mean, std = scale * summary["mean"], scale * summary["std"]
  if len(summary["by_seed"]) == 1:
    return f"{mean:.{digits}f}"
  return f"{mean:.{digits}f} ± {std:.{digits}f} ({len(summary['by_seed'])})"


def _add_seed(cells, row, column, seed, accuracy, workdir):
  seeds = cells.setdefault(row, {}).setdefault(column, {})
  if seed in seeds:
    raise ValueError(f"Two runs for {row!r}, {column!r} with seed {seed} ({workdir} is the "
                     f"second); pass one workdir per seed.")
  seeds[seed] = accuracy


def _write(out, name, markdown, table):
  if out:
    out = epath.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(markdown)
    (out / f"{name}.json").write_text(json.dumps(table, indent=2, sort_keys=True))
  return markdown


def da_table(workdirs, out=None):
  xi_init, runs, copied = da_results(workdirs)
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
  if copied:
    lines += ["", "The source domain whose variables the target copied: " +
              "; ".join(f"{model}: {', '.join(sources)}" for model, sources in
                        sorted(copied.items())) + "."]
  return _write(out, "table3", "\n".join(lines) + "\n",
                {"xi_init": xi_init, "target_test_accuracy": table, "source_copied": copied})


def model_name(model):
  """A column name for a run's config.model, in Table 12's words."""
  if model["signature"] == "plain":
    name = "isometric"
  elif model["signature"] == "mixture":
    shared = model.get("shared_mixture_layers", 0)
    name = ("compositional half-shared" if shared and 2 * shared == model["num_layers"] else
            f"compositional, first {shared} layers' xi shared" if shared else "compositional")
  else:
    name = f"signature {model['signature']}"
  routing = model.get("routing", "task")
  if model.get("task_free"):  # one network for all tasks: its "per-task" BN is one row
    return name + ", task-free" + ("" if routing == "task" else f", routing={routing}")
  return (name + (" + per-task BN" if model["batch_norm"] == "per_task" else "")
          + ("" if routing == "task" else f", routing={routing}"))


# What a run with routing='task_posterior' adds per task beside its accuracy with the task
# inferred: {result field: column suffix}.
_TASK_POSTERIOR_COLUMNS = {"task_given_accuracy": ", task given",
                           "domain_accuracy": ": domain inferred",
                           "domain_mass": ": own-domain mass"}


def domains_results(workdirs):
  """({row: {model: {seed: test accuracy}}}, {row: {model: {seed: source}}}) of multi-task runs
  (a row per task) and of runs started from one of them (a row per new task and way it was
  started; the model and seed are the pretraining run's). The second dict says which source a
  best_source start copied."""
  cells, picked = {}, {}
  runs = [(workdir, read_results(workdir), read_config(workdir)) for workdir in workdirs]
  sizes = {_model_size(config["model"]) for _, results, config in runs
           if not run_start(results).new_tasks}
  for workdir, results, config in runs:
    start = run_start(results)
    # A run that started from a checkpoint of its own tasks (0 steps: that checkpoint
    # re-evaluated) is a column of its own model, as a run from scratch.
    if not start.checkpoint or not start.new_tasks:
      column, seed = model_name(config["model"]), config["seed"]
      if len(sizes) > 1:
        column += ", K={}, L={}".format(*_model_size(config["model"]))
      for task, values in results["tasks"].items():
        _add_seed(cells, task, column, seed, values["test_accuracy"], workdir)
        for field, suffix in _TASK_POSTERIOR_COLUMNS.items():
          if field in values:
            _add_seed(cells, task, column + suffix, seed, values[field], workdir)
      continue
    pretraining = read_config(epath.Path(start.checkpoint).parent.parent)
    column, seed = model_name(pretraining["model"]), pretraining["seed"]
    how = ("source-only" if results["step"] == 0 else
           f"{results['step']} steps of {start.trainable}")
    for task, info in start.new_tasks.items():
      row = f"{task} {how}, variables from {info['xi_init']}"
      _add_seed(cells, row, column, seed, results["tasks"][task]["test_accuracy"], workdir)
      chosen = [source for source, weight in info["coefficients"].items() if weight == 1.0]
      if info["xi_init"] == "best_source" and chosen:
        picked.setdefault(row, {}).setdefault(column, {})[seed] = chosen[0]
  return cells, picked


def _model_size(model):
  return model["num_templates"], model["num_layers"]


_MODEL_ORDER = ("isometric", "compositional half-shared", "compositional")


def domains_table(workdirs, out=None):
  cells, picked = domains_results(workdirs)
  table = {row: {model: _summary(by_seed) for model, by_seed in by_model.items()}
           for row, by_model in cells.items()}
  models = sorted({model for row in table.values() for model in row},
                  key=lambda m: (_MODEL_ORDER.index(m) if m in _MODEL_ORDER else
                                 len(_MODEL_ORDER), m))
  rows = sorted(table, key=lambda row: (" " in row, row))  # the trained tasks first
  note = (" A routing=task_posterior column infers each image's task; its ', task given' "
          "column is the same model given the task, its ': domain inferred' column the share "
          "of the task's images whose inferred task is right, its ': own-domain mass' column "
          "the mean p(task|image) over them."
          if any("routing=task_posterior" in model for model in models) else "")
  lines = ["Test accuracy (%) per task and model; a cell of several runs: mean ± standard "
           "deviation (runs) over the pretraining's seeds." + note, "",
           "| task | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
  for row in rows:
    lines.append(f"| {row} | " + " | ".join(_cell(table[row][m]) if m in table[row] else ""
                                            for m in models) + " |")
  for row, by_model in sorted(picked.items()):
    choices = "; ".join(f"{model}: " + ", ".join(f"seed {seed} {source}" for seed, source in
                                                 sorted(by_seed.items()))
                        for model, by_seed in by_model.items())
    lines += ["", f"{row}: the source each run copied (chosen by target labels): {choices}."]
  return _write(out, "domains", "\n".join(lines) + "\n",
                {"test_accuracy": table, "best_source_picked": picked})


# The routing table's rows: {row: the value of a results.json "routing" record}.
ROUTING_ROWS = {
    "mutual information (nats), mean over layers":
        lambda health: np.mean(health["mutual_information"]),
    "balance, mean over layers": lambda health: np.mean(health["balance"]),
    "least-used template's share": lambda health: min(health["template_usage"]),
    "largest kernel cosine of two templates": lambda health: health["max_template_cosine"],
    "warnings (unused or collapsed templates)": lambda health: len(health["warnings"]),
}


def routing_table(workdirs, out=None):
  cells = {}
  for workdir in workdirs:
    results, config = read_results(workdir), read_config(workdir)
    if "routing" not in results:
      raise ValueError(f"{workdir}/results.json has no routing health: its model has no "
                       f"templates shared across layers (signature='plain').")
    for row, value in ROUTING_ROWS.items():
      _add_seed(cells, row, model_name(config["model"]), config["seed"],
                float(value(results["routing"])), workdir)
  table = {row: {model: _summary(by_seed) for model, by_seed in by_model.items()}
           for row, by_model in cells.items()}
  models = sorted({model for row in table.values() for model in row})
  lines = ["Routing health at the end of each run (results.json \"routing\"); a cell of several "
           "runs: mean ± standard deviation (runs) over seeds.", "",
           "| | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
  for row in ROUTING_ROWS:
    lines.append(f"| {row} | " + " | ".join(
        _cell(table[row][m], scale=1, digits=3) if m in table[row] else "" for m in models)
        + " |")
  return _write(out, "routing", "\n".join(lines) + "\n", table)


def regularizer_name(config):
  weights = config.get("regularizers") or {}
  parts = []
  if weights.get("entropy_weight"):
    parts.append(f"entropy {weights['entropy_weight']:g}")
  if weights.get("clustering_weight"):
    parts.append(f"clustering {weights['clustering_weight']:g} "
                 f"(g={weights.get('clustering_g', 'square')})")
  return " + ".join(parts) or "none"


def signature_rows(hardened_dirs):
  """One row per hardened run and task: a dict of what the study table shows."""
  rows = []
  for directory in hardened_dirs:
    results, config = read_results(directory), read_config(directory)
    if results.get("surgery", {}).get("operation") != "harden":
      raise ValueError(f"{directory} is not the output of `python -m compmod_jax.surgery "
                       f"harden` (its results.json has no surgery.operation 'harden').")
    for task, signature in results["signatures"].items():
      max_xi = results["max_xi"][task]
      rows.append({
          "regularizers": regularizer_name(config), "bn_statistics": results["bn_statistics"],
          "seed": config["seed"], "task": task, "workdir": results["surgery"]["workdir"],
          "mixed_test_accuracy": results["tasks"][task]["mixed_test_accuracy"],
          "hardened_test_accuracy": results["tasks"][task]["test_accuracy"],
          "max_xi": max_xi, "mean_max_xi": float(np.mean(max_xi)), "signature": signature,
          "contiguous": signatures.is_contiguous(signature),
          "progressive": signatures.is_progressive(signature)})
  return sorted(rows, key=lambda r: (r["regularizers"], r["bn_statistics"], r["task"], r["seed"]))


def signatures_table(hardened_dirs, out=None):
  rows = signature_rows(hardened_dirs)
  lines = ["| regularizers | BN statistics | task | seed | test accuracy, mixed | hardened | "
           "mean largest xi | largest xi per layer | signature | contiguous | progressive |",
           "|---|---|---|---:|---:|---:|---:|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['regularizers']} | {r['bn_statistics']} | {r['task']} | {r['seed']} | "
        f"{100 * r['mixed_test_accuracy']:.2f} | {100 * r['hardened_test_accuracy']:.2f} | "
        f"{r['mean_max_xi']:.2f} | {' '.join(f'{x:.2f}' for x in r['max_xi'])} | "
        f"{','.join(map(str, r['signature']))} | {'yes' if r['contiguous'] else 'no'} | "
        f"{'yes' if r['progressive'] else 'no'} |")
  groups = {}
  for r in rows:
    groups.setdefault((r["regularizers"], r["bn_statistics"], r["task"]), []).append(r)
  summary = {}
  lines += ["", "| regularizers | BN statistics | task | runs | test accuracy, mixed | hardened "
            "| mean largest xi | contiguous | progressive |", "|---|---|---|---:|---:|---:|---:|"
            "---:|---:|"]
  for (regularizers, bn, task), group in sorted(groups.items()):
    stats = {key: _summary({r["seed"]: r[key] for r in group}) for key in
             ("mixed_test_accuracy", "hardened_test_accuracy", "mean_max_xi")}
    counts = {key: sum(r[key] for r in group) for key in ("contiguous", "progressive")}
    summary.setdefault(regularizers, {}).setdefault(bn, {})[task] = {**stats, **counts,
                                                                      "runs": len(group)}
    mean_xi = stats["mean_max_xi"]
    lines.append(
        f"| {regularizers} | {bn} | {task} | {len(group)} | "
        f"{_cell(stats['mixed_test_accuracy'])} | {_cell(stats['hardened_test_accuracy'])} | "
        f"{mean_xi['mean']:.2f} ± {mean_xi['std']:.2f} | {counts['contiguous']} of "
        f"{len(group)} | {counts['progressive']} of {len(group)} |")
  return _write(out, "signatures", "\n".join(lines) + "\n", {"runs": rows, "summary": summary})


def run_mixture_weights(workdir):
  """{task: xi [L, K]} of the newest intact checkpoint's EMA weights in `workdir`."""
  params = pretrained.load(workdir).variables["params"]
  if "mixture_logits" not in params:
    raise ValueError(f"{workdir}: its model has no learned mixture weights (a fixed signature "
                     f"or the plain network); the similarity table needs them.")
  xi = np.asarray(templates.mixture_weights(templates.task_mixture_logits(params)))
  return dict(zip(sorted(params["heads"]), xi))  # the model's task rows are in name order


def similarity_results(workdirs, group):
  """{workdir: {"within": [L], "others": [L]}}: per layer the mean similarity of the pairs of
  tasks both in `group` and of the other pairs."""
  by_run = {}
  for workdir in workdirs:
    tasks, similarities = similarity.task_similarity(run_mixture_weights(workdir))
    missing = sorted(set(group) - set(tasks))
    if missing or len(group) < 2:
      raise ValueError(f"--group must name at least two of the run's tasks {tasks}; "
                       f"{workdir} has no {missing}.")
    pairs = [(a, b) for a in range(len(tasks)) for b in range(a + 1, len(tasks))]
    within = [(a, b) for a, b in pairs if tasks[a] in group and tasks[b] in group]
    others = [pair for pair in pairs if pair not in within]
    by_run[workdir] = {name: [float(np.mean([layer[a, b] for a, b in chosen]))
                              for layer in similarities]
                       for name, chosen in (("within", within), ("others", others))}
  return by_run


def similarity_table(workdirs, group, out=None):
  by_run = similarity_results(workdirs, group)
  runs = list(by_run.values())
  num_layers = len(runs[0]["within"])
  lines = [f"Bhattacharyya similarity of the tasks' mixture weights per layer: pairs within "
           f"{', '.join(group)} vs the other pairs; mean ± standard deviation over {len(runs)} "
           f"run(s).", "", "| layer | within the group | other pairs | difference |",
           "|---:|---:|---:|---:|"]
  summary = []
  for layer in range(num_layers):
    values = {name: np.array([run[name][layer] for run in runs])
              for name in ("within", "others")}
    values["difference"] = values["within"] - values["others"]
    row = {name: {"mean": float(v.mean()), "std": float(v.std())} for name, v in values.items()}
    summary.append(row)
    lines.append(f"| {layer + 1} | " + " | ".join(
        f"{row[name]['mean']:.2f} ± {row[name]['std']:.2f}"
        for name in ("within", "others", "difference")) + " |")
  return _write(out, "similarity", "\n".join(lines) + "\n",
                {"group": list(group), "per_layer": summary, "runs": by_run})


def main(argv):
  if len(argv) < 3 or argv[1] not in MODES:
    raise cli.CommandError(f"usage: python -m compmod_jax.analysis.tables "
                           f"{{{','.join(MODES)}}} WORKDIR...")
  if argv[1] == "transfer":
    sys.stdout.write(transfer_table(argv[2:], FLAGS.task))
  elif argv[1] == "similarity":
    sys.stdout.write(similarity_table(argv[2:], FLAGS.group, FLAGS.out))
  else:
    table = {"da": da_table, "domains": domains_table, "signatures": signatures_table,
             "routing": routing_table}[argv[1]]
    sys.stdout.write(table(argv[2:], FLAGS.out))


if __name__ == "__main__":
  cli.run_command("compmod_jax.analysis.tables", main)
