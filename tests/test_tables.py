"""The tables over finished runs that docs/modules.md's studies quote
(compmod_jax/analysis/tables.py): Table 12's layout (`domains`) and the single-task signature
study (`signatures`), with the signature shapes of analysis/signatures.py."""
import json

import numpy as np
import pytest

from compmod_jax.analysis import signatures, tables
from configs import digits_multidomain


@pytest.mark.parametrize("signature, runs, contiguous, progressive", [
    ((1, 2, 2, 3, 3, 3, 3, 4), [(1, 1), (2, 2), (3, 4), (4, 1)], True, False),
    ((1, 2, 2, 3, 3, 3, 4, 4, 4, 4), [(1, 1), (2, 2), (3, 3), (4, 4)], True, True),
    ((1, 1, 2), [(1, 2), (2, 1)], True, False),
    ((1, 4, 1, 2, 4, 3, 3, 2), [(1, 1), (4, 1), (1, 1), (2, 1), (4, 1), (3, 2), (2, 1)],
     False, False),
    ((3, 3, 3), [(3, 3)], True, True),
])
def test_signature_runs_and_shapes(signature, runs, contiguous, progressive):
  """The paper's regularised example (1,2,2,3,3,3,3,4 begins like its 12-layer one) is
  contiguous; progressive also needs run lengths that never shrink."""
  assert signatures.runs(signature) == runs
  assert signatures.is_contiguous(signature) is contiguous
  assert signatures.is_progressive(signature) is progressive


def write_run(workdir, config, results):
  workdir.mkdir(parents=True)
  (workdir / "config.json").write_text(json.dumps(config))
  (workdir / "results.json").write_text(json.dumps(results))
  return workdir


def multidomain_run(tmp_path, argument, seed, accuracies):
  """A finished digits_multidomain run of the config built with `argument`."""
  config = digits_multidomain.get_config(argument).to_dict()
  config["seed"] = seed
  return write_run(tmp_path / f"{argument}_{seed}", config, {
      "step": 2000, "tasks": {t: {"test_accuracy": a} for t, a in accuracies.items()}})


def source_only_run(tmp_path, pretraining, xi_init, accuracy, picked):
  (pretraining / "checkpoints" / "2000").mkdir(parents=True)
  coefficients = {domain: float(domain == picked) for domain in ("mnist", "mnist_shear")}
  return write_run(tmp_path / f"uci_{xi_init}_{pretraining.name}", {"seed": 7}, {
      "step": 0, "tasks": {"uci_digits": {"test_accuracy": accuracy}},
      "init_from": {"checkpoint": str(pretraining / "checkpoints" / "2000"),
                    "trainable": "xi_head_bn", "new_tasks": {"uci_digits": {
                        "xi_init": xi_init, "coefficients": coefficients}}}})


def test_the_routing_table_gives_each_models_health_over_seeds(tmp_path):
  runs = []
  for seed, (information, usage) in enumerate(((0.1, 0.2), (0.3, 0.1))):
    config = digits_multidomain.get_config("setup=mixture_patches").to_dict()
    config["seed"] = seed
    runs.append(write_run(tmp_path / f"run_{seed}", config, {"step": 10, "tasks": {},
        "routing": {"mutual_information": [information, 3 * information],
                    "balance": [0.5, 1.0], "template_usage": [usage, 1 - usage],
                    "max_template_cosine": 0.5, "warnings": ["template 1 is unused"] * seed}}))
  markdown = tables.routing_table(runs)
  assert markdown.splitlines()[2:] == [
      "| | compositional + per-task BN |", "|---|---:|",
      "| mutual information (nats), mean over layers | 0.400 ± 0.283 (2) |",
      "| balance, mean over layers | 0.750 ± 0.000 (2) |",
      "| least-used template's share | 0.150 ± 0.071 (2) |",
      "| largest kernel cosine of two templates | 0.500 ± 0.000 (2) |",
      "| warnings (unused or collapsed templates) | 0.500 ± 0.707 (2) |"]


def test_model_columns_are_named_from_each_runs_model_config():
  names = {argument: tables.model_name(digits_multidomain.get_config(argument).model)
           for argument in ("setup=simple_baseline", "shared_mixture_layers=4",
                            "shared_mixture_layers=2", "setup=mixture_patches", "")}
  assert names == {"setup=simple_baseline": "isometric",
                   "shared_mixture_layers=4": "compositional half-shared",
                   "shared_mixture_layers=2": "compositional, first 2 layers' xi shared",
                   "setup=mixture_patches": "compositional + per-task BN",
                   "": "compositional"}
  task_free = {}
  for argument, routing in (("setup=simple_baseline", "task"), ("setup=mixture_patches", "task"),
                            ("setup=mixture_patches", "example")):
    model = digits_multidomain.get_config(argument).model
    model.update(task_free=True, routing=routing)
    task_free[argument, routing] = tables.model_name(model)
  assert task_free == {("setup=simple_baseline", "task"): "isometric, task-free",
                       ("setup=mixture_patches", "task"): "compositional, task-free",
                       ("setup=mixture_patches", "example"):
                           "compositional, task-free, routing=example"}


def test_table12_gives_each_domain_and_the_source_only_target_per_model(tmp_path):
  domains = "domains=table12"
  runs = [multidomain_run(tmp_path, f"{domains},setup=simple_baseline", seed,
                          {"mnist": 0.98 + seed / 100, "mnist_shear": 0.9})
          for seed in (0, 1)]
  runs.append(multidomain_run(tmp_path, f"{domains},shared_mixture_layers=4", 0,
                              {"mnist": 0.97, "mnist_shear": 0.95}))
  runs += [source_only_run(tmp_path, runs[0], "source:mnist", 0.7, "mnist"),
           source_only_run(tmp_path, runs[1], "best_source", 0.8, "mnist_shear")]
  markdown = tables.domains_table(runs, out=tmp_path / "table12")
  table = json.loads((tmp_path / "table12" / "domains.json").read_text())
  mnist = table["test_accuracy"]["mnist"]["isometric"]
  assert mnist["by_seed"] == {"0": 0.98, "1": 0.99}
  assert (mnist["mean"], mnist["std"]) == pytest.approx((0.985, 0.00707107))
  # The source-only rows take the model and seed of the run they started from.
  assert table["test_accuracy"]["uci_digits source-only, variables from best_source"] == {
      "isometric": {"mean": 0.8, "std": 0.0, "by_seed": {"1": 0.8}}}
  assert table["best_source_picked"] == {
      "uci_digits source-only, variables from best_source": {"isometric": {"1": "mnist_shear"}}}
  assert markdown.splitlines()[2:8] == [
      "| task | isometric | compositional half-shared |", "|---|---:|---:|",
      "| mnist | 98.50 ± 0.71 (2) | 97.00 |", "| mnist_shear | 90.00 ± 0.00 (2) | 95.00 |",
      "| uci_digits source-only, variables from best_source | 80.00 |  |",
      "| uci_digits source-only, variables from source:mnist | 70.00 |  |"]
  with pytest.raises(ValueError, match=r"Two runs for 'mnist', 'isometric' with seed 1"):
    tables.domains_table(runs + [multidomain_run(tmp_path / "again", f"{domains},setup="
                                                 f"simple_baseline", 1, {"mnist": 0.5})])


def hardened_dir(tmp_path, name, seed, regularizers, signature, max_xi, mixed, hardened):
  """The files `surgery harden` writes that the study reads."""
  return write_run(tmp_path / name, {"seed": seed, "regularizers": regularizers}, {
      "surgery": {"operation": "harden", "workdir": f"/runs/{name}", "step": 1000},
      "bn_statistics": "as trained (mixed model)", "signatures": {"mnist": signature},
      "max_xi": {"mnist": max_xi}, "tasks": {"mnist": {
          "mixed_test_accuracy": mixed, "test_accuracy": hardened}}})


def test_signature_study_summarises_each_regulariser_over_seeds(tmp_path):
  none = {"entropy_weight": 0.0, "clustering_weight": 0.0}
  clustering = {"entropy_weight": 0.0, "clustering_weight": 1e-5, "clustering_g": "square"}
  dirs = [hardened_dir(tmp_path, "none0", 0, none, [1, 4, 1, 2], [0.5, 0.9, 0.6, 0.8], 0.98,
                       0.10),
          hardened_dir(tmp_path, "none1", 1, none, [1, 1, 1, 2], [0.7, 0.9, 0.6, 0.8], 0.96,
                       0.20),
          hardened_dir(tmp_path, "clus0", 0, clustering, [1, 2, 2, 2], [1.0] * 4, 0.97, 0.97)]
  markdown = tables.signatures_table(dirs, out=tmp_path / "study")
  study = json.loads((tmp_path / "study" / "signatures.json").read_text())
  summary = study["summary"]["none"]["as trained (mixed model)"]["mnist"]
  assert summary["runs"] == 2 and summary["contiguous"] == 1 and summary["progressive"] == 0
  assert summary["mean_max_xi"]["mean"] == pytest.approx((0.7 + 0.75) / 2)
  assert summary["hardened_test_accuracy"]["by_seed"] == {"0": 0.10, "1": 0.20}
  clustered = study["summary"]["clustering 1e-05 (g=square)"]["as trained (mixed model)"]
  assert clustered["mnist"]["progressive"] == 1
  assert ("| clustering 1e-05 (g=square) | as trained (mixed model) | mnist | 0 | 97.00 | 97.00 "
          "| 1.00 | 1.00 1.00 1.00 1.00 | 1,2,2,2 | yes | yes |") in markdown
  with pytest.raises(ValueError, match=r"is not the output of `python -m compmod_jax.surgery "
                                       r"harden`"):
    tables.signatures_table([write_run(tmp_path / "plain", {"seed": 0}, {"tasks": {}})])


def test_a_half_written_results_file_is_one_line_naming_it(tmp_path):
  run = write_run(tmp_path / "running", {"seed": 0}, {})
  (run / "results.json").write_text('{"tasks": {"mnist": ')
  with pytest.raises(ValueError, match=r"running/results\.json is not complete JSON \(.*\); is "
                                       r"its run still writing it\?"):
    tables.domains_table([run])


def test_a_task_posterior_run_gives_its_accuracy_with_the_task_inferred_and_given(tmp_path):
  runs = []
  for seed in (0, 1):
    config = digits_multidomain.get_config("setup=mixture_patches").to_dict()
    config["seed"] = seed
    config["model"]["routing"] = "task_posterior"
    runs.append(write_run(tmp_path / f"posterior_{seed}", config, {"step": 2000, "tasks": {
        "mnist": {"test_accuracy": 0.9 + seed / 100, "task_given_accuracy": 0.95,
                  "domain_accuracy": 0.5 + seed / 10, "domain_mass": 0.4}}}))
  markdown = tables.domains_table(runs)
  column = "compositional + per-task BN, routing=task_posterior"
  assert "infers each image's task" in markdown.splitlines()[0]
  assert markdown.splitlines()[2:5] == [
      f"| task | {column} | {column}, task given | {column}: domain inferred | "
      f"{column}: own-domain mass |",
      "|---|---:|---:|---:|---:|",
      "| mnist | 90.50 ± 0.71 (2) | 95.00 ± 0.00 (2) | 55.00 ± 7.07 (2) | 40.00 ± 0.00 (2) |"]


def test_a_checkpoint_of_the_same_tasks_re_evaluated_is_its_models_column(tmp_path):
  """A 0-step run from a checkpoint of its own tasks adds no row: it is a column, as the run
  that trained it; a run from that checkpoint that adds a task gives that task's row."""
  pretraining = multidomain_run(tmp_path, "setup=simple_baseline", 1, {"mnist": 0.9})
  config = json.loads((pretraining / "config.json").read_text())
  new_task = source_only_run(tmp_path, pretraining, "best_source", 0.5, "mnist")
  re_evaluated = write_run(tmp_path / "re_evaluated", config, {
      "step": 0, "tasks": {"mnist": {"test_accuracy": 0.9, "domain_mass": 0.25}},
      "init_from": {"checkpoint": str(pretraining / "checkpoints" / "2000"),
                    "trainable": "all", "new_tasks": {}}})
  cells, _ = tables.domains_results([re_evaluated, new_task])
  assert cells == {
      "mnist": {"isometric": {1: 0.9}, "isometric: own-domain mass": {1: 0.25}},
      "uci_digits source-only, variables from best_source": {"isometric": {1: 0.5}}}


def test_runs_of_several_depths_get_their_size_in_the_column(tmp_path):
  runs = [multidomain_run(tmp_path / f"L{layers}", "", 0, {"mnist": accuracy})
          for layers, accuracy in ((8, 0.9), (16, 0.8))]
  for run, layers in zip(runs, (8, 16)):
    config = json.loads((run / "config.json").read_text())
    config["model"]["num_layers"] = layers
    (run / "config.json").write_text(json.dumps(config))
  table = json.loads(tables.domains_table(runs, out=tmp_path / "t") and
                     (tmp_path / "t" / "domains.json").read_text())
  assert table["test_accuracy"]["mnist"] == {
      "compositional, K=4, L=8": {"mean": 0.9, "std": 0.0, "by_seed": {"0": 0.9}},
      "compositional, K=4, L=16": {"mean": 0.8, "std": 0.0, "by_seed": {"0": 0.8}}}
  one_depth = json.loads(tables.domains_table(runs[:1], out=tmp_path / "u") and
                         (tmp_path / "u" / "domains.json").read_text())
  assert list(one_depth["test_accuracy"]["mnist"]) == ["compositional"]


def test_similarity_compares_the_pairs_within_the_group_with_the_others(tmp_path, monkeypatch):
  """Layer 1: a and b use template 1, c template 2 (within 1, others 0); layer 2: all mix the
  two evenly (1 everywhere). Bhattacharyya coefficients of one-hot and even rows are exact."""
  xi = {"a": [[1.0, 0.0], [0.5, 0.5]], "b": [[1.0, 0.0], [0.5, 0.5]],
        "c": [[0.0, 1.0], [0.5, 0.5]], "d": [[0.0, 1.0], [0.5, 0.5]]}
  runs = {"run0": xi, "run1": dict(xi, d=[[1.0, 0.0], [0.5, 0.5]])}
  monkeypatch.setattr(tables, "run_mixture_weights", lambda workdir: runs[workdir])
  by_run = tables.similarity_results(["run0", "run1"], ["a", "b"])
  # run0: others are (a,c), (a,d), (b,c), (b,d): 0, and (c,d): 1 -> 1/5.
  assert by_run["run0"]["within"] == pytest.approx([1.0, 1.0])
  assert by_run["run0"]["others"] == pytest.approx([0.2, 1.0])
  # run1: d uses template 1 like a and b: (a,d), (b,d) are 1 -> 2/5.
  assert by_run["run1"]["others"] == pytest.approx([0.4, 1.0])
  markdown = tables.similarity_table(["run0", "run1"], ["a", "b"], out=tmp_path / "s")
  assert "| 1 | 1.00 ± 0.00 | 0.30 ± 0.10 | 0.70 ± 0.10 |" in markdown
  with pytest.raises(ValueError, match=r"--group must name at least two of the run's tasks "
                                       r"\['a', 'b', 'c', 'd'\]; run0 has no \['e'\]"):
    tables.similarity_results(["run0"], ["a", "e"])


def test_a_runs_mixture_weights_are_read_from_its_checkpoint_by_task(source_workdir):
  xi = tables.run_mixture_weights(source_workdir)
  assert sorted(xi) == ["mnist", "mnist_blur"]
  for rows in xi.values():
    assert rows.shape == (3, 2)  # the tiny model: 3 layers, 2 templates
    np.testing.assert_allclose(rows.sum(-1), 1.0, rtol=1e-6)
  assert not np.allclose(xi["mnist"], xi["mnist_blur"])  # each task's own row
