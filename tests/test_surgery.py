"""Module surgery on the session's two-domain model (compmod_jax/surgery.py and
analysis/perturb.py): hardening keeps each layer's arg-max template and the compact export
computes exactly what the hardened model computes; pruning keeps the most used templates with
xi renormalised; the perturbation table's rows agree with the run's own evaluation; every
result is a workdir that loads like a run's."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compmod_jax.analysis import perturb, perturbation, tables
from compmod_jax.finetune import pretrained, surgery
from compmod_jax.models import bank, templates
from compmod_jax.train import start
from helpers import built_once_per_run, read_checkpoint, with_one_hot_xi

HARDENINGS = ("as_trained", "reestimated")


@pytest.fixture(scope="module")
def hardened(source_workdir, tmp_path_factory):
  """`surgery harden` of the two-domain model, without and with re-estimated BN, once per
  test run: (folder of the two exports, {kind: its results.json})."""
  def build(folder):
    for kind in HARDENINGS:
      surgery.harden(str(source_workdir), str(folder / kind), reestimate=kind == "reestimated",
                     bn_batches=3, timing_repeats=2)
  out = built_once_per_run(tmp_path_factory, "hardened", build)
  return out, {kind: json.loads((out / kind / "results.json").read_text())
               for kind in HARDENINGS}


def test_hardening_takes_each_layers_largest_mixture_weight():
  xi = np.array([[[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]], [[0.1, 0.1, 0.8], [0.4, 0.4, 0.2]]])
  np.testing.assert_array_equal(bank.hardened_signatures(xi), [[1, 0], [2, 0]])
  variables = {"params": {"mixture_logits": np.zeros((2, 2, 3)),
                          "templates": {"kernel": np.arange(3.0)[:, None] * np.ones((3, 4))}},
               "batch_stats": {}}
  compact, signatures = bank.compact_variables(variables, np.array([[2, 0], [2, 2]]))
  assert "mixture_logits" not in compact["params"]
  np.testing.assert_array_equal(compact["params"]["templates"]["kernel"][:, 0], [0.0, 2.0])
  np.testing.assert_array_equal(signatures, [[1, 0], [1, 1]])  # template 3 became template 2


def test_the_compact_model_computes_the_hardened_models_logits_exactly(source_workdir):
  run = surgery.load_run(str(source_workdir))
  tasks = {name: 10 for name in ("mnist", "mnist_blur")}
  mixed_model = start.model_for(run.config, tasks)
  xi = templates.mixture_weights(run.variables["params"]["mixture_logits"])
  signatures = bank.hardened_signatures(xi)
  one_hot = with_one_hot_xi(run.variables, signatures)
  compact, compact_signatures = bank.compact_variables(run.variables, signatures)
  compact_model = start.model_for(surgery.fixed_signature_config(run.config, compact_signatures),
                                  tasks)
  assert "mixture_logits" not in compact["params"]
  images = jax.random.uniform(jax.random.key(0), (16, 28, 28, 1))
  for task in tasks:
    np.testing.assert_array_equal(
        mixed_model.apply(one_hot, images, task=task),
        compact_model.apply(compact, images, task=task))


def test_batch_statistics_are_what_a_training_step_folds_into_the_moving_ones(source_workdir):
  run = surgery.load_run(str(source_workdir))
  model = start.model_for(run.config, {name: 10 for name in ("mnist", "mnist_blur")})
  images = jax.random.uniform(jax.random.key(1), (16, 28, 28, 1))
  batch = model.apply(run.variables, images, task="mnist_blur", method=model.batch_statistics)
  _, updated = model.apply(jax.tree.map(jnp.asarray, run.variables), images,
                           task="mnist_blur", train=True,
                           mutable=["batch_stats"], rngs={"dropout": jax.random.key(2)})
  momentum, row = model.spec.bn_momentum, model.spec.task_index("mnist_blur")
  jax.tree.map(lambda new, old, b: np.testing.assert_allclose(
      new[row], momentum * old[row] + (1 - momentum) * b, rtol=1e-6, atol=1e-7),
      updated["batch_stats"]["block_bn"], run.variables["batch_stats"]["block_bn"], batch)


def test_harden_writes_a_compact_workdir_that_loads_like_a_run(hardened, source_workdir):
  out, results = hardened
  trained = json.loads((source_workdir / "results.json").read_text())["tasks"]
  for kind, result in results.items():
    # The mixed model's accuracy is the run's own final evaluation, to the digit.
    assert {task: values["mixed_test_accuracy"] for task, values in result["tasks"].items()} == {
        task: values["test_accuracy"] for task, values in trained.items()}
    assert result["parameters"]["hardened"] < result["parameters"]["mixed"]
    assert set(result["inference_step_seconds"]) == {"mixed", "hardened"}
    loaded = pretrained.load(str(out / kind))
    assert "mixture_logits" not in loaded.variables["params"]
    assert loaded.config["model"]["signature"] == "explicit"
    kept = len(result["kept_templates"])
    assert loaded.config["model"]["num_templates"] == kept
    assert loaded.variables["params"]["templates"]["expand_kernel"].shape[0] == kept
  # Only the hardened model's statistics differ between the two.
  original = surgery.load_run(str(source_workdir)).variables
  exported = pretrained.load(str(out / "as_trained")).variables
  jax.tree.map(np.testing.assert_array_equal, exported["batch_stats"], original["batch_stats"])
  assert not np.array_equal(
      pretrained.load(str(out / "reestimated")).variables["batch_stats"]["block_bn"]["expand"][
          "mean"], original["batch_stats"]["block_bn"]["expand"]["mean"])


def test_the_written_hardened_checkpoint_computes_the_one_hot_mixed_models_logits(
    hardened, source_workdir):
  """What `surgery harden` writes, loaded back as a run, is the mixed model with each layer's
  xi replaced by the one-hot of its largest weight (np.argmax here): the same logits, bit for
  bit, with the BN statistics as trained."""
  out, _ = hardened
  source = surgery.load_run(str(source_workdir))
  tasks = {name: 10 for name in ("mnist", "mnist_blur")}
  mixed_model = start.model_for(source.config, tasks)
  one_hot = with_one_hot_xi(source.variables,
                            np.argmax(source.variables["params"]["mixture_logits"], -1))
  written = surgery.load_run(str(out / "as_trained"))
  written_model = start.model_for(written.config, tasks)
  images = jax.random.uniform(jax.random.key(3), (16, 28, 28, 1))
  for task in tasks:
    np.testing.assert_array_equal(written_model.apply(written.variables, images, task=task),
                                  mixed_model.apply(one_hot, images, task=task))


def test_the_signature_study_reads_each_tasks_arg_max_and_largest_xi_from_a_hardening(
    hardened, source_workdir):
  out, _ = hardened
  xi = np.asarray(templates.mixture_weights(templates.task_mixture_logits(
      surgery.load_run(str(source_workdir)).variables["params"])))
  rows = {(row["bn_statistics"], row["task"]): row for row in tables.signature_rows(
      [out / kind for kind in HARDENINGS])}
  assert len(rows) == 4
  for (_, task), row in rows.items():
    index = ["mnist", "mnist_blur"].index(task)  # the model's tasks, sorted
    assert row["signature"] == (np.argmax(xi[index], -1) + 1).tolist()
    assert row["mean_max_xi"] == pytest.approx(xi[index].max(-1).mean(), abs=1e-4)
    assert row["regularizers"] == "none" and row["seed"] == 0


def test_harden_refuses_what_it_cannot_use(hardened, source_workdir, tmp_path):
  out, _ = hardened
  with pytest.raises(surgery.SurgeryError, match="only a model with mixture weights"):
    surgery.harden(str(out / "as_trained"), str(tmp_path / "again"))
  with pytest.raises(surgery.SurgeryError, match="not empty; surgery never overwrites"):
    surgery.harden(str(source_workdir), str(out / "as_trained"))
  with pytest.raises(surgery.SurgeryError, match="holds no checkpoints"):
    surgery.harden(str(tmp_path), str(tmp_path / "out"))


def test_signature_perturbations_move_whole_rows_of_mixture_logits():
  logits = np.arange(12.0, dtype=np.float32).reshape(3, 4)
  table = perturbation.perturbations(logits, permutations=2, seed=0)
  assert len(table) == 1 + 2 + 3 * 2 + 2 + 1
  np.testing.assert_array_equal(table["swap 1,2"], logits[[1, 0, 2]])
  np.testing.assert_array_equal(table["3<-1"], logits[[0, 1, 0]])
  assert sorted(map(tuple, table["permutation 2"])) == sorted(map(tuple, logits))
  xi = jax.nn.softmax(table["hardened"], axis=-1)
  np.testing.assert_array_equal(xi, np.eye(4)[[3, 3, 3]])
  same_first_two = logits[[0, 0, 2]]
  np.testing.assert_array_equal(perturbation.perturbations(same_first_two, 0, 0)["swap 1,2"],
                                same_first_two)


def test_the_perturbation_command_writes_its_table_and_its_rows_match_the_runs(
    hardened, source_workdir, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(source_workdir, workdir)
  table = perturb.perturb_workdir(str(workdir), permutations=2)
  results = json.loads((workdir / "results.json").read_text())
  _, hardened_results = hardened
  for task in ("mnist", "mnist_blur"):
    # The model as trained is the run's own evaluation; the hardened row is the exported
    # compact model's (exactly the same logits).
    assert table[task]["trained"] == results["tasks"][task]["test_accuracy"]
    assert table[task]["hardened"] == hardened_results["as_trained"]["tasks"][task][
        "test_accuracy"]
  assert json.loads((workdir / "perturbation.json").read_text()) == table
  rows = (workdir / "perturbation.md").read_text().splitlines()
  assert rows[0] == "| perturbation | mnist | mnist_blur |" and len(rows) == 2 + 12
  assert (workdir / "perturbation.png").stat().st_size > 1000
  with pytest.raises(surgery.SurgeryError, match="only a model with mixture weights can be perturbed"):
    perturb.perturb_workdir(str(hardened[0] / "as_trained"))


def test_pruning_keeps_the_most_used_templates_and_renormalises_xi():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 4)).astype(np.float32)
  shared = rng.normal(size=(1, 4)).astype(np.float32)
  params = {"mixture_logits": logits, "shared_mixture_logits": shared,
            "templates": {"kernel": np.arange(4.0)[:, None] * np.ones((4, 3))}}
  xi = np.asarray(templates.mixture_weights(templates.task_mixture_logits(params)))
  pruned, kept, usage = bank.pruned_variables({"params": params, "batch_stats": {}}, keep=2)
  np.testing.assert_allclose(usage, xi.sum(axis=(0, 1)), rtol=1e-6)
  assert list(kept) == sorted(np.argsort(-usage)[:2])
  np.testing.assert_array_equal(pruned["params"]["templates"]["kernel"][:, 0], kept)
  new_xi = np.asarray(templates.mixture_weights(templates.task_mixture_logits(pruned["params"])))
  np.testing.assert_allclose(new_xi.sum(-1), 1.0, rtol=1e-6)
  renormalised = xi[..., kept] / xi[..., kept].sum(-1, keepdims=True)
  np.testing.assert_allclose(new_xi, renormalised, rtol=1e-5)


def test_prune_writes_a_smaller_model_that_loads_like_a_run_and_refits_it(source_workdir,
                                                                          tmp_path):
  results = surgery.prune(str(source_workdir), str(tmp_path / "pruned"), keep=1,
                          refit_steps=2)
  loaded = pretrained.load(str(tmp_path / "pruned"))
  assert loaded.config["model"]["num_templates"] == 1
  kept = results["kept_templates"]
  assert len(kept) == 1 and loaded.variables["params"]["mixture_logits"].shape[-1] == 1
  original = surgery.load_run(str(source_workdir)).variables["params"]["templates"]
  jax.tree.map(lambda pruned, full: np.testing.assert_array_equal(pruned, full[kept[0] - 1:
                                                                              kept[0]]),
               loaded.variables["params"]["templates"], original)
  assert results["parameters"]["pruned"] < results["parameters"]["unpruned"]
  run_results = json.loads((source_workdir / "results.json").read_text())
  for task, values in results["tasks"].items():
    assert values["unpruned_test_accuracy"] == run_results["tasks"][task]["test_accuracy"]
  # The re-fit trains xi and BN from the pruned checkpoint; the templates stay as pruned.
  refit = read_checkpoint(tmp_path / "pruned" / "refit")
  assert refit[0] == 2 and set(results["refit"]["tasks"]) == set(results["tasks"])
  jax.tree.map(np.testing.assert_array_equal, refit[1]["state"]["params"]["templates"],
               loaded.variables["params"]["templates"])
  with pytest.raises(surgery.SurgeryError, match="keep between 1 and 1"):
    surgery.prune(str(source_workdir), str(tmp_path / "again"), keep=2)
