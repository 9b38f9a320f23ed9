"""Runs of several processes over loopback (issue 27): a lost worker, a worker that fails at
start-up, and layouts of processes and devices that must compute the same thing.
docs/reliability.md tables what each run does. Every test here starts processes: slow tier."""
import json
import random
import re
import shutil
import signal
import time

import jax
import numpy as np
import pytest

from helpers import (COMPARED, TOTAL_STEPS, assert_same_state, built_once_per_run,
                     committed_steps, driver_runs, free_port, one_at_a_time, saved_state,
                     scalar_summaries)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("several_processes")]


def start_processes(start_run, workdir, *hooks, count=2, devices=1, only=None):
  """`count` processes of one run (each with `devices` CPU devices); `only` maps a process
  index to flags for it alone."""
  port = free_port()
  env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  return [start_run(workdir, *hooks, env=env, flags=(
      f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={count}",
      f"--process_id={index}", *(only or {}).get(index, ()))) for index in range(count)]


def last_line(run):
  return run.output().rstrip().splitlines()[-1]


def run_to_the_end(start_run, workdir, count=1, devices=1):
  """A run of `count` processes of `devices` devices each, to its end (or on from the
  workdir's last checkpoint)."""
  if count == 1:
    runs = [start_run(workdir, env={
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"})]
  else:
    runs = start_processes(start_run, workdir, count=count, devices=devices)
  for run in runs:
    assert run.finish() == 0, run.output()[-3000:]
  return runs


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, embedded_dir):
  """Uninterrupted runs of one config on 1 process x 4 devices and 2 processes x 2 devices:
  {"1x4": workdir, "2x2": workdir}."""
  def train(folder):
    with one_at_a_time(tmp_path_factory, "several_processes"), driver_runs(
        embedded_dir) as start_run:
      run_to_the_end(start_run, folder / "1x4", devices=4)
      run_to_the_end(start_run, folder / "2x2", count=2, devices=2)
  folder = built_once_per_run(tmp_path_factory, "layouts", train)
  return {name: folder / name for name in ("1x4", "2x2")}


@pytest.mark.parametrize("victim", [1, 0], ids=["worker", "coordinator"])
def test_a_lost_process_stops_every_other_with_one_line_and_the_rerun_resumes_exactly(
    tmp_path, start_run, layouts, victim):
  workdir = tmp_path / "work"
  runs = start_processes(start_run, workdir, "announce", devices=2)
  kill_at = random.Random().randint(2, TOTAL_STEPS - 2)
  runs[victim].wait_for(f"STEP {kill_at}")
  time.sleep(random.Random().uniform(0, 0.5))  # anywhere in the step
  runs[victim].send(signal.SIGKILL)
  killed = time.monotonic()
  survivor = runs[1 - victim]
  assert survivor.finish(timeout=300) == 1, survivor.output()[-3000:]
  assert time.monotonic() - killed < 60  # --heartbeat_timeout=30 by default
  lost = ("process 1 stopped responding" if victim == 1
          else "process 0 (the coordinator) cannot be reached")
  last = committed_steps(workdir)[-1] if committed_steps(workdir) else None
  where = (f"step {last} in {workdir / 'checkpoints'}" if last
           else "none was saved: it starts over")
  assert re.fullmatch(
      rf"compmod_jax\.main: process {1 - victim} of 2 stops: {re.escape(lost)} \(killed, out "
      rf"of memory, or its host went down\), and every process stops with it; rerun the same "
      rf"command on every process to resume from the last complete checkpoint "
      rf"\({re.escape(where)}\)\.",
      last_line(survivor)), (kill_at, survivor.output()[-3000:])
  for run in run_to_the_end(start_run, workdir, count=2, devices=2):
    if last:
      assert f"at step {last}." in run.output()
  assert_same_state(saved_state(workdir), saved_state(layouts["2x2"]))


@pytest.mark.parametrize("failing", [1, 0], ids=["worker", "coordinator"])
def test_a_process_failing_at_start_up_stops_the_others_with_its_error(tmp_path, start_run,
                                                                        failing):
  workdir = tmp_path / "work"
  not_a_folder = tmp_path / "data"  # its data_dir is a file: this process fails at start-up
  not_a_folder.write_text("not a folder")
  runs = start_processes(start_run, workdir, only={
      failing: (f"--config.data.data_dir={not_a_folder}",)})
  ended = {}
  deadline = time.monotonic() + 400
  while len(ended) < 2 and time.monotonic() < deadline:
    ended.update({index: time.monotonic() for index, run in enumerate(runs)
                  if index not in ended and run.process.poll() is not None})
    time.sleep(0.2)
  for run in runs:
    assert run.finish(timeout=1) == 1, run.output()[-3000:]
  assert abs(ended[0] - ended[1]) < 20  # together, not after the heartbeat limit (30 s)
  error = last_line(runs[failing])
  assert error.startswith("compmod_jax.main: ") and f"data_dir='{not_a_folder}' is a file" in error, error
  assert last_line(runs[1 - failing]) == (
      f"compmod_jax.main: process {1 - failing} of 2 stops because process {failing} failed: "
      f"{error.removeprefix('compmod_jax.main: ')}")
  assert committed_steps(workdir) == []


def assert_same_run_up_to_summation_order(workdir, reference):
  """The same training to float rounding. Layouts sum across devices in different orders
  (in-process, or gloo across processes): the first logged loss agrees to 1e-7 and the tiny
  config's unstable first steps (its loss rises) amplify that to about 1e-4 by step 8, and to a
  few percent in the smallest arrays, where RMSProp divides a near-zero gradient by its own tiny
  scale (measured 2026-12-07). Other data, or a lost data position, moves the losses by 1e-2."""
  losses, expected = scalar_summaries(workdir), scalar_summaries(reference)
  assert ("total_loss", TOTAL_STEPS) in losses and losses.keys() <= expected.keys()
  for (tag, step), value in losses.items():
    if tag.endswith("accuracy"):  # of the same batch: the same count of right answers
      assert value == expected[tag, step], (tag, step)
    elif tag.endswith("loss") or tag == "grad_norm":
      np.testing.assert_allclose(value, expected[tag, step], rtol=1e-5 if step == 2 else 1e-3,
                                 err_msg=f"{tag} at step {step}")
  state, expected_state = saved_state(workdir), saved_state(reference)
  for name in COMPARED:
    for array, expected_array in zip(jax.tree.leaves(state[name]),
                                     jax.tree.leaves(expected_state[name])):
      scale = max(np.linalg.norm(expected_array), 1e-3)
      assert np.linalg.norm(array - expected_array) <= 0.1 * scale, name


def test_two_processes_of_two_devices_compute_what_one_process_of_four_computes(layouts):
  """The same global batches (tests/test_data.py) on the same 4-way sharding, and every eval
  example counted once."""
  assert_same_run_up_to_summation_order(layouts["2x2"], layouts["1x4"])
  results = {name: json.loads((workdir / "results.json").read_text())["tasks"]["mnist"]
             for name, workdir in layouts.items()}
  assert results["2x2"]["test_examples"] == results["1x4"]["test_examples"] == 200
  assert results["2x2"]["test_accuracy"] == results["1x4"]["test_accuracy"]


def resumable_copy(workdir, to, step):
  """A copy of `workdir` as it was after saving `step` (later checkpoints removed), without
  its TensorBoard files: what is logged there is the resumed run's."""
  shutil.copytree(workdir, to, ignore=shutil.ignore_patterns("events.out.tfevents*"))
  for later in committed_steps(to):
    if later > step:
      shutil.rmtree(to / "checkpoints" / str(later))
      shutil.rmtree(to / "data_state" / str(later))
  return to


@pytest.mark.parametrize("saved_on, resumed_on", [("1x4", "2x2"), ("2x2", "1x4"), ("2x2", "1x1")])
def test_a_checkpoint_resumes_on_another_layout(tmp_path, start_run, layouts, saved_on,
                                                resumed_on):
  workdir = resumable_copy(layouts[saved_on], tmp_path / "work", step=4)
  count, devices = map(int, resumed_on.split("x"))
  for run in run_to_the_end(start_run, workdir, count=count, devices=devices):
    assert "at step 4." in run.output()
  assert_same_run_up_to_summation_order(workdir, layouts[resumed_on if devices == 4 else "1x4"])
