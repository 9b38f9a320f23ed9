"""Every command a user types reports a mistake the same way (compmod_jax/cli.py run_command):
one last line `<command>: <error>` that says what to change, exit code 1, no traceback; the
benchmarks end on argparse's one `error:` line. Nothing here reads data or compiles a step:
each mistake is found first."""
import json
import re
import shutil
import subprocess
import sys

import pytest

from helpers import REPO, subprocess_env

DIGITS = "--config=configs/digits.py"
# name -> (python -m arguments, the last line the user sees)
MISTAKES = {
    "main, a model field out of range": (
        ("compmod_jax.main", DIGITS, "--workdir={tmp}/w", "--config.model.num_layers=0"),
        r"^compmod_jax\.main: ValueError: config\.model\.num_layers must be a positive "
        r"integer, got 0$"),
    "main, a misspelt config argument": (
        ("compmod_jax.main", DIGITS + ":tyni=1", "--workdir={tmp}/w"),
        r"^compmod_jax\.main: flag --config=configs/digits\.py:tyni=1: .*Unknown config "
        r"argument 'tyni' .* takes tiny=<integer, default 0>"),
    "main, an override of a field the config lacks": (
        ("compmod_jax.main", DIGITS, "--workdir={tmp}/w", "--config.modle.num_layers=2"),
        r"^compmod_jax\.main: --config\.modle\.num_layers: config has no field 'modle'; did "
        r"you mean config\.model\?$"),
    "main, an unknown flag": (
        ("compmod_jax.main", DIGITS, "--workdir={tmp}/w", "--wrokdir=x"),
        r"^compmod_jax\.main: Unknown command line flag 'wrokdir'"),
    "plan, no devices": (
        ("compmod_jax.plan", DIGITS, "--num_devices=0"),
        r"^compmod_jax\.plan: CommandError: --num_devices=0: give the number of devices"),
    "surgery, prune without --keep": (
        ("compmod_jax.surgery", "prune", "{tmp}", "--out={tmp}/out"),
        r"^compmod_jax\.surgery: CommandError: prune needs --keep=<number of templates"),
    "surgery, a folder that is no run": (
        ("compmod_jax.surgery", "harden", "{tmp}", "--out={tmp}/out"),
        r"^compmod_jax\.surgery: SurgeryError: .* holds no checkpoints/ directory"),
    "perturb, a folder that is no run": (
        ("compmod_jax.analysis.perturb", "{tmp}"),
        r"^compmod_jax\.analysis\.perturb: SurgeryError: .* holds no checkpoints/ directory"),
    "tables, an unknown table": (
        ("compmod_jax.analysis.tables", "table3", "{tmp}"),
        r"^compmod_jax\.analysis\.tables: CommandError: usage: python -m "
        r"compmod_jax\.analysis\.tables \{transfer,da,domains,signatures,similarity,routing\} "
        r"WORKDIR\.\.\.$"),
    "tables, a run that has not evaluated": (
        ("compmod_jax.analysis.tables", "da", "{tmp}"),
        r"^compmod_jax\.analysis\.tables: FileNotFoundError: .*/results\.json does not exist"),
    "a benchmark, a value of the wrong type": (
        ("benchmarks.allocator", "--rounds=two"),
        r"allocator\.py: error: argument --rounds: invalid int value: 'two'$"),
}


@pytest.mark.parametrize("case", sorted(MISTAKES))
def test_a_mistake_is_one_last_line_saying_what_to_change(case, tmp_path):
  arguments, last_line = MISTAKES[case]
  result = subprocess.run(
      [sys.executable, "-m", *(arg.format(tmp=tmp_path) for arg in arguments)], cwd=REPO,
      env=subprocess_env(), capture_output=True, text=True, timeout=120)
  assert result.returncode != 0, result.stderr[-3000:]
  assert re.search(last_line, result.stderr.rstrip().splitlines()[-1]), result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert not (tmp_path / "w").exists() and not (tmp_path / "out").exists()  # nothing written


def run_command(*arguments):
  result = subprocess.run([sys.executable, "-m", *map(str, arguments)], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.mark.slow
def test_the_analysis_commands_agree_with_the_run_and_with_each_other(source_workdir, tmp_path):
  """surgery harden, analysis.perturb and analysis.tables as a user types them, on the shared
  two-domain model: the trained row of the perturbation table and the domains table are the
  run's own accuracies, and the perturbation's hardened row is what `surgery harden` measures
  for its exported compact model."""
  workdir = tmp_path / "run"
  shutil.copytree(source_workdir, workdir)
  trained = {task: values["test_accuracy"] for task, values in
             json.loads((workdir / "results.json").read_text())["tasks"].items()}
  printed = run_command("compmod_jax.analysis.perturb", workdir, "--permutations=1").stdout
  perturbed = json.loads((workdir / "perturbation.json").read_text())
  assert "| perturbation | mnist | mnist_blur |" in printed
  run_command("compmod_jax.surgery", "harden", workdir, f"--out={tmp_path / 'hard'}",
              "--timing_repeats=1")
  hardened = json.loads((tmp_path / "hard" / "results.json").read_text())["tasks"]
  run_command("compmod_jax.analysis.tables", "domains", workdir, f"--out={tmp_path / 'table'}")
  table = json.loads((tmp_path / "table" / "domains.json").read_text())["test_accuracy"]
  for task, accuracy in trained.items():
    assert perturbed[task]["trained"] == hardened[task]["mixed_test_accuracy"] == accuracy
    assert perturbed[task]["hardened"] == hardened[task]["test_accuracy"]
    assert [cell["mean"] for cell in table[task].values()] == [accuracy]
