"""Runs of several processes over loopback (issue 27): a lost worker, a worker that fails at
start-up, and layouts of processes and devices that must compute the same thing.
docs/reliability.md tables what each run does. Every test here starts processes: slow tier."""
import random
import re
import signal
import time

import pytest

from helpers import (TOTAL_STEPS, assert_same_state, built_once_per_run, committed_steps,
                     driver_runs, free_port, saved_state)

pytestmark = pytest.mark.slow


def start_processes(start_run, workdir, *hooks, count=2, devices=1, flags=(), only=None):
  """`count` processes of one run (each with `devices` CPU devices); `only` maps a process
  index to flags for it alone."""
  port = free_port()
  env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  return [start_run(workdir, *hooks, env=env, flags=(
      *flags, f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={count}",
      f"--process_id={index}", *(only or {}).get(index, ()))) for index in range(count)]


def last_line(run):
  return run.output().rstrip().splitlines()[-1]


@pytest.fixture(scope="module")
def two_process_reference(tmp_path_factory, embedded_dir):
  """An uninterrupted run of 2 processes x 1 device: its workdir."""
  def train(workdir):
    with driver_runs(embedded_dir) as start_run:
      for run in start_processes(start_run, workdir):
        assert run.finish() == 0, run.output()[-3000:]
  return built_once_per_run(tmp_path_factory, "two_process_reference", train)


@pytest.mark.parametrize("victim", [1, 0], ids=["worker", "coordinator"])
def test_a_lost_process_stops_every_other_with_one_line_and_the_rerun_resumes_exactly(
    tmp_path, start_run, two_process_reference, victim):
  workdir = tmp_path / "work"
  runs = start_processes(start_run, workdir, "announce")
  kill_at = random.Random().randint(2, TOTAL_STEPS - 2)
  runs[victim].wait_for(f"STEP {kill_at}")
  time.sleep(random.Random().uniform(0, 0.5))  # anywhere in the step
  runs[victim].send(signal.SIGKILL)
  killed = time.monotonic()
  survivor = runs[1 - victim]
  assert survivor.finish(timeout=120) == 1, survivor.output()[-3000:]
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
  for run in start_processes(start_run, workdir):
    assert run.finish() == 0, run.output()[-3000:]
    if last:
      assert f"at step {last}." in run.output()
  assert_same_state(saved_state(workdir), saved_state(two_process_reference))


@pytest.mark.parametrize("failing", [1, 0], ids=["worker", "coordinator"])
def test_a_process_failing_at_start_up_stops_the_others_with_its_error(tmp_path, start_run,
                                                                        failing):
  workdir = tmp_path / "work"
  not_a_folder = tmp_path / "data"  # its data_dir is a file: this process fails at start-up
  not_a_folder.write_text("not a folder")
  started = time.monotonic()
  runs = start_processes(start_run, workdir, only={
      failing: (f"--config.data.data_dir={not_a_folder}",)})
  for run in runs:
    assert run.finish(timeout=120) == 1, run.output()[-3000:]
  assert time.monotonic() - started < 90  # not the heartbeat's limit: at once
  error = last_line(runs[failing])
  assert error.startswith("compmod_jax.main: ") and f"data_dir='{not_a_folder}' is a file" in error, error
  assert last_line(runs[1 - failing]) == (
      f"compmod_jax.main: process {1 - failing} of 2 stops because process {failing} failed: "
      f"{error.removeprefix('compmod_jax.main: ')}")
  assert committed_steps(workdir) == []
