"""Reliability (issue 7): faults injected into real training runs, each checked for what is
kept, what is lost (nothing) and what the run says. docs/reliability.md tables the faults.

Runs in subprocesses (tests/fault_driver.py) get SIGTERM and SIGKILL at announced steps and in
the middle of an asynchronous save; checkpoints of a real run get a changed value, a flipped
byte, a truncated file or a deleted item; NaNs come in through the input batches. Every run
that must lose nothing ends with parameters bit-identical to an uninterrupted run of the same
config.
"""
import collections
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorstore as ts

from compmod_jax import supervisor
from compmod_jax.data import datasets, streams
from compmod_jax.finetune import pretrained
from compmod_jax.train import checkpoint, loop, nonfinite, preemption, steps
from helpers import (FAULT_RUN, TOTAL_STEPS, REPO, assert_same_state, built_once_per_run,
                     committed_steps, driver_env, fault_config, free_port, half_written,
                     run_main, saved_state, scalar_summaries, subprocess_env)

# A failed orbax read leaves coroutines whose errors surface when they are garbage-collected,
# during whichever test runs then; they are orbax's, and expected here.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

@pytest.fixture(scope="module")
def reference(embedded_dir, tmp_path_factory):
  """One uninterrupted run, once per test run: its workdir (checkpoints 4, 6, 8; tests copy it
  before changing anything) and its final state."""
  def train(workdir):
    results = loop.train_and_evaluate(fault_config(embedded_dir), str(workdir))
    assert results["step"] == TOTAL_STEPS and committed_steps(workdir) == [4, 6, 8]
  workdir = built_once_per_run(tmp_path_factory, "reliability_reference", train)
  return workdir, saved_state(workdir)


# --- 1 and 2: SIGTERM and SIGKILL in subprocesses -------------------------------------------

@pytest.fixture
def logs(caplog):
  """The run's absl log messages (absl logs through Python's logging), INFO and up."""
  caplog.set_level(logging.INFO, logger="absl")
  return lambda containing="": "\n".join(
      r.getMessage() for r in caplog.records if containing in r.getMessage())


@pytest.mark.slow
def test_sigterm_saves_at_the_next_step_exits_0_and_resume_loses_nothing(
    embedded_dir, reference, tmp_path, start_run):
  workdir = tmp_path / "work"
  stops = []
  for signal_at in (2, 5):  # preempted twice in the life of the run
    run = start_run(workdir, "announce")
    run.wait_for(f"STEP {signal_at}")
    run.send(signal.SIGTERM)
    assert run.finish() == 0, run.output()[-3000:]
    assert "SIGTERM received" in run.output()
    stops.append(run.stopped_at())
    assert signal_at <= stops[-1] < TOTAL_STEPS
    assert stops[-1] in committed_steps(workdir)
  assert stops[0] < stops[1]
  results = loop.train_and_evaluate(fault_config(embedded_dir), str(workdir))
  assert results["step"] == TOTAL_STEPS
  assert_same_state(saved_state(workdir), reference[1])


STOP_AT_ONCE = {
    "sigint_in_start_up": ("stuck_startup", "STUCK", (signal.SIGINT,), 128 + signal.SIGINT,
                           "SIGINT before the first training step: stopping now."),
    "second_sigterm_in_start_up": (
        "stuck_startup", "STUCK", (signal.SIGTERM, signal.SIGTERM), 128 + signal.SIGTERM,
        "Second SIGTERM: stopping now without saving"),
    "sigint_in_training": ("announce", "STEP 3", (signal.SIGINT,), 128 + signal.SIGINT,
                           "SIGINT: stopping now; rerun the same command to resume"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(STOP_AT_ONCE))
def test_ctrl_c_or_a_second_sigterm_stops_the_run_within_seconds_leaving_nothing_half_written(
    tmp_path, start_run, case):
  """Even blocked in native code, where Python runs no signal handler (stuck_startup: libc's
  sleep). The first SIGTERM there only asks for a save after the first step."""
  hook, ready, signals, exit_code, message = STOP_AT_ONCE[case]
  workdir = tmp_path / "work"
  run = start_run(workdir, hook)
  run.wait_for(ready)
  for signum in signals:
    run.send(signum)
    time.sleep(0.5)
  assert run.finish(timeout=10) == exit_code, run.output()[-3000:]
  assert message in run.output()
  if hook == "stuck_startup":  # the log ends on why the run stopped
    assert message in run.output().rstrip().splitlines()[-1]
  assert not half_written(workdir)
  json.loads((workdir / "config.json").read_text())  # complete
  assert set(committed_steps(workdir)) <= {2}  # nothing but what was saved before the signal


def test_ctrl_c_during_training_unwinds_at_the_step_boundary_not_inside_the_input_pipeline():
  """The handler runs wherever the main thread is, tf.data's C++ included (it runs Python's
  handlers while it waits for a batch): it only marks the run; stop_at raises."""
  with preemption.PreemptionWatcher() as watcher:
    assert not watcher.stop_at(1)
    watcher._in_main_thread(signal.SIGINT, None)  # what Python runs on Ctrl-C: no raise here
    with pytest.raises(KeyboardInterrupt):
      watcher.stop_at(2)


@pytest.mark.slow
def test_sigkill_at_any_moment_resumes_from_the_last_complete_checkpoint(
    embedded_dir, reference, tmp_path, start_run, logs):
  workdir = tmp_path / "work"
  run = start_run(workdir, "announce")  # killed between two checkpoints
  run.wait_for("STEP 3")
  run.send(signal.SIGKILL)
  assert run.finish() == -signal.SIGKILL
  assert committed_steps(workdir) in ([], [2])
  run = start_run(workdir, "announce", "slow_commit=6")  # killed mid-save
  run.wait_for("SAVING 6")
  run.send(signal.SIGKILL)
  assert run.finish() == -signal.SIGKILL
  assert 6 not in committed_steps(workdir) and half_written(workdir)
  assert (workdir / "data_state" / "6").exists()  # the data position is written first
  last_complete = committed_steps(workdir)[-1]
  results = loop.train_and_evaluate(fault_config(embedded_dir), str(workdir))
  assert f"at step {last_complete}." in logs("Resumed from")
  assert "half-written checkpoint(s) ['6.orbax-checkpoint-tmp" in logs()
  assert results["step"] == TOTAL_STEPS
  assert not half_written(workdir)
  assert sorted(map(int, os.listdir(workdir / "data_state"))) == committed_steps(workdir)
  assert_same_state(saved_state(workdir), reference[1])


@pytest.fixture
def small_disk(tmp_path):
  """A 64 MiB tmpfs of its own (mounting needs root, as on the project's machines)."""
  disk = tmp_path / "disk"
  disk.mkdir()
  if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M", "tmpfs",
                                          str(disk)]).returncode:
    pytest.skip("mounting a small tmpfs needs root")
  yield disk
  subprocess.run(["chattr", "-R", "-i", str(disk)], check=False)
  subprocess.run(["umount", "--lazy", str(disk)], check=False)


def fill(disk):
  subprocess.run(["dd", "if=/dev/zero", f"of={disk / 'filler'}", "bs=1M"], capture_output=True)


def chattr(sign):
  return lambda disk: subprocess.run(["chattr", "-R", f"{sign}i", str(disk / "work")], check=True)


def remove_checkpoints(disk):
  """`rm -rf checkpoints` under the run, made atomic by a rename first: the run may create a
  file in the directory while rmtree empties it, and rmtree then fails ("Directory not
  empty"). What the run still writes into the renamed tree is removed once it has stopped."""
  (disk / "work" / "checkpoints").rename(disk / "removed")
  shutil.rmtree(disk / "removed", ignore_errors=True)


# How to break the disk under a running run, how to mend it, and what the run must say.
STORAGE_FAULTS = {
    "disk_full": (fill, lambda disk: (disk / "filler").unlink(),
                  "the disk is full; free space on it"),
    # Immutable (chattr +i): even root cannot create files there, as on a read-only mount
    # (which cannot be remounted read-only while the run holds files open for writing).
    "workdir_read_only": (chattr("+"), chattr("-"),
                          "the workdir cannot be written any more; make it writable again"),
    "checkpoints_removed": (remove_checkpoints,
                            lambda disk: shutil.rmtree(disk / "removed", ignore_errors=True),
                            "was removed during the run"),
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", sorted(STORAGE_FAULTS))
def test_a_storage_fault_stops_the_run_with_one_line_and_the_rerun_resumes(
    embedded_dir, reference, tmp_path, small_disk, start_run, logs, fault):
  break_disk, mend_disk, says = STORAGE_FAULTS[fault]
  workdir = small_disk / "work"
  run = start_run(workdir, "announce", log_dir=tmp_path)  # the log where there is room
  run.wait_for("STEP 5")  # step 4's asynchronous save in flight or done, 6 to come
  break_disk(small_disk)
  assert run.finish() == 1, run.output()[-3000:]
  last = run.output().rstrip().splitlines()[-1]
  assert re.fullmatch(rf"compmod_jax\.main: SaveFailedError: Saving checkpoint step [46] in "
                      rf"{re.escape(str(workdir))} failed \(.+\): .*{says}.*; (the checkpoints "
                      rf"already written \(steps \[[\d, ]+\]\) are intact: rerun the same "
                      rf"command to resume from step \d|no checkpoint is left: rerun the same "
                      rf"command to start over)\.", last), last
  mend_disk(small_disk)
  kept = committed_steps(workdir)
  assert (fault == "checkpoints_removed") == (not kept), kept
  if kept:
    assert f"resume from step {kept[-1]}." in last
  results = loop.train_and_evaluate(fault_config(embedded_dir), str(workdir))
  if kept:  # read back against its checksums: intact
    assert f"at step {kept[-1]}." in logs("Resumed from")
  assert "corrupt" not in logs() and results["step"] == TOTAL_STEPS
  assert_same_state(saved_state(workdir), reference[1])


@pytest.mark.slow
def test_a_process_whose_peers_never_start_gives_up_with_one_line(embedded_dir, tmp_path):
  port = free_port()
  started = time.monotonic()
  run = subprocess.run(
      [sys.executable, "-m", "compmod_jax.main", "--config=configs/digits.py:tiny",
       f"--workdir={tmp_path / 'run'}", f"--config.data.data_dir={embedded_dir}",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", "--process_id=0",
       "--initialization_timeout=5"],
      cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
  assert run.returncode == 1
  assert run.stderr.strip().splitlines()[-1] == (
      f"compmod_jax.main: process 0 of 2 waited 5 s at 127.0.0.1:{port} and not every process "
      f"joined; start the same command with --process_id 0 to 1, check the address, or wait "
      f"longer with --initialization_timeout.")
  assert time.monotonic() - started < 60  # JAX alone would wait its own limit, then abort
  assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("preemption_service", [True, False],
                         ids=["jax_preemption_service", "own_sigterm_flag_allgather"])
def test_two_processes_stop_at_the_same_step_on_sigterm_to_one(tmp_path, start_run,
                                                               several_processes,
                                                               preemption_service):
  """Both ways of agreeing on the step; the resume (the same code for both) is run once. 16
  steps leave the preemption protocol time to agree before the end."""
  workdir = tmp_path / "work"
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "JAX_ENABLE_PREEMPTION_SERVICE": str(preemption_service).lower()}

  def start(*hooks):
    port = free_port()
    return [start_run(workdir, *hooks, env=env, flags=(
        "--config.total_steps=16", f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2", f"--process_id={i}")) for i in range(2)]

  runs = start("announce")
  runs[1].wait_for("STEP 3")
  runs[1].send(signal.SIGTERM)  # only one process gets the notice
  for run in runs:
    assert run.finish() == 0, run.output()[-3000:]
  stop = runs[0].stopped_at()
  assert runs[1].stopped_at() == stop and 3 <= stop < 16
  assert stop in committed_steps(workdir)
  assert sorted(os.listdir(workdir / "data_state" / str(stop) / "mnist")) == [
      "process_0", "process_1"]
  if not preemption_service:
    return
  runs = start()
  for run in runs:
    assert run.finish() == 0, run.output()[-3000:]
    assert f"at step {stop}." in run.output()
  assert "JAX process 1/2" in runs[1].output()
  # The two processes trained and evaluated together: each example of the eval split once.
  results = json.loads((workdir / "results.json").read_text())
  assert results["step"] == 16 and results["tasks"]["mnist"]["test_examples"] == 200


# --- 3: checkpoint integrity -----------------------------------------------------------------

def largest_array_file(step_dir):
  files = [os.path.join(root, name) for root, _, names in os.walk(step_dir / "state")
           for name in names]
  return max(files, key=os.path.getsize)


def change_a_stored_value(step_dir):
  """Adds 1 to one value of the first parameter array, written through tensorstore into the
  checkpoint's OCDBT store: a change that still decodes, which only the checksums can catch. (A
  byte flipped in the zstd-compressed file may instead make the chunk undecodable, depending on
  where it lands: that is the truncation fault's path.)"""
  base = {"driver": "ocdbt", "base": f"file://{step_dir / 'state'}"}
  keys = [key.decode() for key in ts.KvStore.open(base).result().list().result()]
  first_array = min(key.split("/")[0] for key in keys if key.startswith("params."))
  array = ts.open({"driver": "zarr", "kvstore": {**base, "path": f"{first_array}/"}}).result()
  index = (0,) * array.rank
  array[index] = array[index].read().result() + 1


def flip_byte(path):
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0xFF
  open(path, "wb").write(data)


def truncate(path):
  with open(path, "r+b") as file:
    file.truncate(os.path.getsize(path) // 2)


# name -> (fault applied to the workdir's step 8, the path the message names, its reason)
CORRUPTIONS = {
    "changed_value_in_an_array": (
        lambda w: change_a_stored_value(w / "checkpoints" / "8"),
        "checkpoints/8", r"checksum mismatch in \.params\['\w+'\]"),
    "truncated_array_file": (
        lambda w: truncate(largest_array_file(w / "checkpoints" / "8")),
        "checkpoints/8", r"its state cannot be read"),
    "deleted_meta_item": (
        lambda w: shutil.rmtree(w / "checkpoints" / "8" / "meta"),
        "checkpoints/8", r"its meta cannot be read"),
    "deleted_data_position": (
        lambda w: shutil.rmtree(w / "data_state" / "8"),
        "data_state/8/mnist/process_0",
        r"the data-stream position of task 'mnist' cannot be read"),
    "flipped_byte_in_the_data_position": (
        lambda w: flip_byte(w / "data_state/8/mnist/process_0/position.data-00000-of-00001"),
        "data_state/8/mnist/process_0",
        r"the data-stream position of task 'mnist' cannot be read \(DataLossError"),
}


def copy_of(reference_workdir, tmp_path):
  workdir = tmp_path / "work"
  shutil.copytree(reference_workdir, workdir)
  return workdir


@pytest.mark.parametrize("fault", sorted(CORRUPTIONS))
def test_corrupt_checkpoint_is_reported_and_the_previous_good_one_is_used(
    embedded_dir, reference, tmp_path, logs, fault):
  corrupt_step_8, named_path, reason = CORRUPTIONS[fault]
  workdir = copy_of(reference[0], tmp_path)
  corrupt_step_8(workdir)
  results = loop.train_and_evaluate(fault_config(embedded_dir), str(workdir))
  assert re.search(rf"Checkpoint step 8 at {re.escape(str(workdir / named_path))} is corrupt: "
                   rf"{reason}", logs()), logs("is corrupt")
  assert "at step 6." in logs("Resumed from")
  assert (workdir / "corrupt_checkpoints" / "8").exists()
  assert results["step"] == TOTAL_STEPS
  assert_same_state(saved_state(workdir), reference[1])


def test_corrupt_checkpoint_with_refuse_policy_stops_and_changes_nothing(
    embedded_dir, reference, tmp_path):
  workdir = copy_of(reference[0], tmp_path)
  change_a_stored_value(workdir / "checkpoints" / "8")
  config = fault_config(embedded_dir, on_corrupt_checkpoint="refuse")
  with pytest.raises(checkpoint.CorruptCheckpointError,
                     match=rf"Checkpoint step 8 at {re.escape(str(workdir))}/checkpoints/8 is "
                           r"corrupt: checksum mismatch(.|\n)*'refuse', so nothing was changed"):
    loop.train_and_evaluate(config, str(workdir))
  assert committed_steps(workdir) == [4, 6, 8]
  assert not (workdir / "corrupt_checkpoints").exists()


# name -> (command-line flags after the config's, the last line the user sees)
CLI_MISTAKES = {
    "override_of_a_missing_field": (
        ("--config.optimizer.lr=0.1",),
        r"^compmod_jax\.main: --config\.optimizer\.lr: config\.optimizer has no field "
        r"'lr'; its fields are \["),
    "processes_without_a_coordinator": (
        ("--num_processes=2",), r"--num_processes and --process_id need --coordinator_address"),
    "empty_workdir": (("--workdir=",), r"^compmod_jax\.main: ValueError: --workdir is empty"),
    "model_that_cannot_fit": (("--config.model.depth_multiplier=1000",),
                              r"^compmod_jax\.main: ValueError: One training step needs at least "
                              r"[\d,.]+ GiB per device"),
    "damaged_checkpoint_refused": (
        ("--config.on_corrupt_checkpoint=refuse",),
        r"^config\.on_corrupt_checkpoint='refuse', so nothing was changed\. Set it to "
        r"'fall_back'"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CLI_MISTAKES))
def test_the_command_line_ends_on_one_line_saying_what_to_change(embedded_dir, reference,
                                                                 tmp_path, case):
  """No traceback (--traceback asks for it) and no background-thread noise after it."""
  flags, last_line = CLI_MISTAKES[case]
  workdir = copy_of(reference[0], tmp_path)
  truncate(largest_array_file(workdir / "checkpoints" / "8"))
  started = time.time()
  result = subprocess.run(
      [sys.executable, "-m", "compmod_jax.main", "--config=configs/digits.py:tiny",
       f"--workdir={workdir}", f"--config.data.data_dir={embedded_dir}",
       *(f"--config.{key}={value}" for key, value in FAULT_RUN.items()), *flags],
      cwd=REPO, env=driver_env(), capture_output=True, text=True, timeout=120)
  assert result.returncode == 1, result.stderr[-3000:]
  assert time.time() - started < 60
  assert re.search(last_line, result.stderr.rstrip().splitlines()[-1]), result.stderr[-3000:]
  assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr


@pytest.mark.slow
def test_a_pretrained_workdir_with_every_step_damaged_ends_on_that_error_without_tracebacks(
    embedded_dir, reference, tmp_path):
  """Each failed read left tensorstore callbacks into a closed event loop, whose ~190
  tracebacks buried the error (cli._drop_closed_loop_callbacks)."""
  pretrained = copy_of(reference[0], tmp_path)
  for step in committed_steps(pretrained):
    truncate(largest_array_file(pretrained / "checkpoints" / str(step)))
  result = run_main("--config=configs/digits.py:tiny", f"--workdir={tmp_path / 'new'}",
                    f"--config.data.data_dir={embedded_dir}", f"--config.init_from={pretrained}",
                    timeout=120)
  assert result.returncode == 1, result.stderr[-3000:]
  assert result.stderr.rstrip().splitlines()[-1] == (
      f"compmod_jax.main: PretrainedCheckpointError: config.init_from: no checkpoint in "
      f"{pretrained / 'checkpoints'} reads back intact (steps [4, 6, 8]; errors above).")
  assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr
  assert result.stderr.count("is corrupt: its state cannot be read") == 3


def test_when_every_checkpoint_is_corrupt_the_run_stops_and_moves_nothing(
    embedded_dir, reference, tmp_path):
  workdir = copy_of(reference[0], tmp_path)
  for step in (4, 6, 8):
    shutil.rmtree(workdir / "checkpoints" / str(step) / "meta")
  with pytest.raises(checkpoint.CorruptCheckpointError,
                     match=r"No checkpoint .* reads back intact \(steps \[4, 6, 8\]"):
    loop.train_and_evaluate(fault_config(embedded_dir), str(workdir))
  assert committed_steps(workdir) == [4, 6, 8]


def test_old_checkpoint_is_deleted_only_after_a_newer_one_is_verified(
    embedded_dir, reference, tmp_path, monkeypatch):
  workdir = tmp_path / "work"
  config = fault_config(embedded_dir, keep_checkpoints=1)
  verify = checkpoint.Checkpointer._verify_last_save

  def corrupt_step_4_on_disk_then_verify(self):
    if self._unverified and self._unverified[0] == 4:
      self.manager.wait_until_finished()
      change_a_stored_value(workdir / "checkpoints" / "4")
    verify(self)

  with monkeypatch.context() as patch:
    patch.setattr(checkpoint.Checkpointer, "_verify_last_save",
                  corrupt_step_4_on_disk_then_verify)
    with pytest.raises(checkpoint.CorruptCheckpointError,
                       match=r"step 4 .* checksum mismatch(.|\n)*right after the save. The "
                             r"older checkpoints are kept"):
      loop.train_and_evaluate(config, str(workdir))
  assert committed_steps(workdir) == [2, 4]  # keep_checkpoints=1, yet step 2 survives
  loop.train_and_evaluate(config, str(workdir))
  assert committed_steps(workdir) == [TOTAL_STEPS]
  assert os.listdir(workdir / "corrupt_checkpoints") == ["4"]
  assert_same_state(saved_state(workdir), reference[1])


# --- 4: non-finite values --------------------------------------------------------------------

# NaN images make the gradients NaN; the jitted XLA:CPU step gives a finite loss for them (log 10,
# as if the activations were zeros), other backends may not: the first bad quantity is either.
FIRST_NONFINITE = "(total_loss|grad_norm)"


def poison_training_batches(monkeypatch, bad_steps):
  """Makes the images of the training batches of `bad_steps` (1-based) all NaN."""
  next_batch = streams.DataStream.__next__
  batches_read = collections.Counter()

  def next_with_nan(stream):
    batch = next_batch(stream)
    if stream.train:
      batches_read[id(stream)] += 1
      if batches_read[id(stream)] in bad_steps:
        batch["image"] = np.full_like(batch["image"], np.nan)
    return batch

  monkeypatch.setattr(streams.DataStream, "__next__", next_with_nan)


def all_saved_states_are_finite(workdir):
  return all(nonfinite.first_nonfinite_leaf(saved_state(workdir, step)) is None
             for step in committed_steps(workdir))


def test_nan_update_is_skipped_within_the_allowed_count(embedded_dir, tmp_path, monkeypatch,
                                                        logs):
  poison_training_batches(monkeypatch, {3})
  results = loop.train_and_evaluate(fault_config(embedded_dir, max_nonfinite_skips=1),
                                    str(tmp_path))
  assert re.search(rf"Step 3: {FIRST_NONFINITE} is nan, not finite; update skipped \(1 of at "
                   r"most 1 in this run\)\.", logs()), logs("Step ")
  assert results["step"] == TOTAL_STEPS
  assert committed_steps(tmp_path) == [4, 6, 8] and all_saved_states_are_finite(tmp_path)


def test_too_many_nonfinite_steps_stop_the_run_naming_step_and_quantity(
    embedded_dir, tmp_path, monkeypatch):
  poison_training_batches(monkeypatch, {3, 4})
  with pytest.raises(nonfinite.NonFiniteError,
                     match=rf"Step 4: {FIRST_NONFINITE} is nan, not finite; 2 updates skipped "
                           r"in this run, more than config\.max_nonfinite_skips=1"):
    loop.train_and_evaluate(fault_config(embedded_dir, max_nonfinite_skips=1), str(tmp_path))
  assert committed_steps(tmp_path) == [2] and all_saved_states_are_finite(tmp_path)


def test_a_state_holding_nan_is_never_saved(embedded_dir, tmp_path, monkeypatch):
  jit_train_step = steps.jit_train_step

  def jit_step_breaking_batch_stats(*args, **kwargs):
    """Puts a NaN where the step does not look (its loss and norms stay finite)."""
    train_step = jit_train_step(*args, **kwargs)

    def step_then_break(state, batch):
      new_state, metrics = train_step(state, batch)
      return new_state.replace(batch_stats=jax.tree.map(lambda x: x * np.nan,
                                                        new_state.batch_stats)), metrics
    return step_then_break

  monkeypatch.setattr(steps, "jit_train_step", jit_step_breaking_batch_stats)
  with pytest.raises(nonfinite.NonFiniteError,
                     match=r"Refusing to save step 2: \.batch_stats\[.*\] holds NaN or Inf"):
    loop.train_and_evaluate(fault_config(embedded_dir), str(tmp_path))
  assert committed_steps(tmp_path) == []


# --- 5: bad input ----------------------------------------------------------------------------

BAD_CONFIGS = {
    "K_not_positive": ({"model.num_templates": 0}, ValueError,
                       r"config\.model\.num_templates must be a positive integer, got 0"),
    "signature_longer_than_L": (
        {"model.signature": "explicit", "model.explicit_signature": "1,2,1,2,1"}, ValueError,
        r"explicit_signature has 5 entries but num_layers is 4"),
    "signature_shorter_than_L": (
        {"model.signature": "explicit", "model.explicit_signature": "1,2,1"}, ValueError,
        r"explicit_signature has 3 entries but num_layers is 4"),
    "unknown_signature_type": ({"model.signature": "zigzag"}, ValueError,
                               r"config\.model\.signature must be one of \('mixture'"),
    "unknown_dataset": ({"tasks.mnist.dataset": "no_such_dataset"},
                        datasets.DatasetNotFoundError,
                        r"'no_such_dataset' is not a TFDS dataset"),
    "unknown_labeling": ({"tasks.mnist.label_map": "primes"}, ValueError,
                         r"config\.data\.label_map='primes'; use one of"),
    "batch_not_divisible_by_devices": ({"batch_size": 33}, ValueError,
                                       r"config\.batch_size=33 must be divisible by the "
                                       r"number of devices \(8\); try 32"),
    "learning_rate_not_positive": ({"optimizer.learning_rate": 0.0}, ValueError,
                                   r"config\.optimizer\.learning_rate must be in "
                                   r"\(0, infinity\), got 0\.0"),
    "learning_rate_nan": ({"optimizer.learning_rate": float("nan")}, ValueError,
                          r"config\.optimizer\.learning_rate must be a finite number in "
                          r"\(0, infinity\), got nan"),
    "negative_final_lr_fraction": ({"optimizer.final_lr_fraction": -1.0}, ValueError,
                                   r"config\.optimizer\.final_lr_fraction must be in \[0, 1\], "
                                   r"got -1\.0"),
    "adam_b1_above_one": ({"optimizer.adam_b1": 1.5}, ValueError,
                          r"config\.optimizer\.adam_b1 must be in \[0, 1\), got 1\.5"),
    "zero_decay_steps": ({"optimizer.decay_steps": 0}, ValueError,
                         r"config\.optimizer\.decay_steps must be in \(0, infinity\), got 0"),
    "negative_bn_eps": ({"model.bn_eps": -1.0}, ValueError,
                        r"config\.model\.bn_eps must be in \(0, infinity\), got -1\.0"),
    "negative_task_weight": ({"tasks.mnist.weight": -1.0}, ValueError,
                             r"config\.tasks\.mnist\.weight must be in \(0, infinity\), "
                             r"got -1\.0"),
    "batch_larger_than_the_training_split": (
        {"batch_size": 10_000_000}, ValueError,
        r"Task 'mnist' gets 10000000 training examples per step .* train_split 'train' of "
        r"'embedded_digits/mnist' has 4000; use a batch of at most 4000"),
    "dropout_of_one": ({"model.dropout_rate": 1.0}, ValueError,
                       r"config\.model\.dropout_rate must be in \[0, 1\), got 1\.0"),
    "unknown_optimizer": ({"optimizer.name": "lamb"}, ValueError,
                          r"config\.optimizer\.name must be one of \('rmsprop'"),
    "every_group_frozen": (
        {f"optimizer.lr_multipliers.{group}": 0.0 for group in
         ("batch_norm", "templates", "mixture_logits", "router", "input_adapter",
          "output_adapter", "heads")}, ValueError,
        r"lr_multipliers trains nothing in this model: the groups with a multiplier > 0 are "
        r"\[\]"),
    "trainable_group_absent_from_model": (
        {"model.signature": "cyclic", **{f"optimizer.lr_multipliers.{group}": 0.0 for group in
                                         ("batch_norm", "templates", "input_adapter",
                                          "output_adapter", "heads")}},
        ValueError, r"multiplier > 0 are \['mixture_logits', 'router'\], and this model's "
                    r"parameters "
                    r"are in \['batch_norm', 'heads', 'input_adapter', 'output_adapter', "
                    r"'templates'\]"),
    "unknown_optimizer_group": ({"optimizer.lr_multipliers.template": 1.0}, ValueError,
                                r"names unknown group\(s\) \['template'\]"),
    "negative_nonfinite_skips": ({"max_nonfinite_skips": -1}, ValueError,
                                 r"config\.max_nonfinite_skips must be >= 0"),
    "unknown_corrupt_policy": ({"on_corrupt_checkpoint": "ignore"}, ValueError,
                               r"config\.on_corrupt_checkpoint must be one of \('fall_back', "
                               r"'refuse'\)"),
    # Names and choices.
    "dataset_without_its_config": (
        {"tasks.mnist.dataset": "embedded_digits"}, ValueError,
        r"Dataset 'embedded_digits' has 9 configs; name one, as 'embedded_digits/<config>' with "
        r"<config> one of \['mnist', "),
    "empty_dataset_name": ({"tasks.mnist.dataset": ""}, ValueError,
                           r"config\.tasks\.mnist\.dataset must name a TFDS dataset"),
    "no_tasks": ({"tasks": {}}, ValueError, r"config\.tasks is empty"),
    "unknown_method": ({"method": "mmd"}, ValueError,
                       r"config\.method must be one of \('adversarial', 'moment_matching', "
                       r"'supervised'.*\), got 'mmd'"),  # and any plug-in a test registered
    "unknown_trainable_preset": ({"trainable": "everything"}, ValueError,
                                 r"config\.trainable must be one of \('xi', .* got 'everything'"),
    "trainable_subset_of_a_fresh_model": ({"trainable": "xi"}, ValueError,
                                          r"config\.trainable='xi' freezes the rest of a "
                                          r"freshly initialised model; set config\.init_from"),
    "unknown_design": ({"model.design": "huge"}, ValueError,
                       r"config\.model\.design must be one of \('small', 'large'\), got 'huge'"),
    "unknown_activation": ({"model.activation": "tanh"}, ValueError,
                           r"config\.model\.activation must be one of \('relu'"),
    "unknown_batch_norm": ({"model.batch_norm": "group"}, ValueError,
                           r"config\.model\.batch_norm must be one of \('per_layer'"),
    "unknown_input_adapter": ({"model.input_adapter": "none"}, ValueError,
                              r"config\.model\.input_adapter must be one of \('shared'"),
    "unknown_layer_iteration": ({"model.layer_iteration": "unroll"}, ValueError,
                                r"config\.model\.layer_iteration must be one of \('auto'"),
    "unknown_conv_impl": ({"model.conv_impl": "cudnn"}, ValueError,
                          r"config\.model\.conv_impl must be one of \('shifted'"),
    "unknown_compute_dtype": ({"model.compute_dtype": "float16"}, ValueError,
                              r"config\.model\.compute_dtype must be one of \('float32', "
                              r"'bfloat16'\), got 'float16'"),
    "unknown_remat": ({"model.remat": "all"}, ValueError,
                      r"config\.model\.remat must be one of \('none', 'full', 'dots'\), "
                      r"got 'all'"),
    "unknown_mixture_init": ({"model.mixture_init": "ones"}, ValueError,
                             r"config\.model\.mixture_init must be one of \('normal'"),
    "unknown_schedule": ({"optimizer.schedule": "step"}, ValueError,
                         r"config\.optimizer\.schedule must be one of \('constant'"),
    "unknown_clustering_g": ({"regularizers.clustering_g": "cube"}, ValueError,
                             r"config\.regularizers\.clustering_g must be one of \("),
    "unknown_augmentation": ({"data.augment": "rotate"}, ValueError,
                             r"config\.data\.augment='rotate'; use one of \('none'"),
    "unknown_normalization": ({"data.normalization": "zscore"}, ValueError,
                              r"config\.data\.normalization='zscore'; use one of"),
    "two_channels": ({"data.channels": 2}, ValueError, r"config\.data\.channels=2; use one of"),
    "task_name_with_slash": ({"tasks": {"a/b": {"dataset": "embedded_digits/mnist"}}},
                             ValueError, r"Task name 'a/b' may not contain '/'"),
    # Splits.
    "split_the_dataset_lacks": ({"data.train_split": "validation"}, ValueError,
                                r"Task 'mnist' reads train_split='validation' .* has no split "
                                r"'validation'; its splits are \['test', 'train'\]"),
    "split_that_does_not_parse": ({"data.eval_split": "test[:abc]"}, ValueError,
                                  r"config\.data\.eval_split='test\[:abc\]' is not a TFDS "
                                  r"split"),
    # Sizes and counts.
    "batch_size_zero": ({"batch_size": 0}, ValueError,
                        r"config\.batch_size must be a positive integer, got 0"),
    "eval_batch_size_negative": ({"eval_batch_size": -8}, ValueError,
                                 r"config\.eval_batch_size must be a positive integer"),
    "log_every_zero": ({"log_every": 0}, ValueError, r"config\.log_every must be a positive"),
    "eval_every_zero": ({"eval_every": 0}, ValueError, r"config\.eval_every must be a positive"),
    "checkpoint_every_zero": ({"checkpoint_every": 0}, ValueError,
                              r"config\.checkpoint_every must be a positive"),
    "keep_no_checkpoint": ({"keep_checkpoints": 0}, ValueError,
                           r"config\.keep_checkpoints must be a positive"),
    "negative_total_steps": ({"total_steps": -1}, ValueError,
                             r"config\.total_steps must be a positive integer"),
    "zero_steps_of_a_fresh_model": ({"total_steps": 0}, ValueError,
                                    r"0 only evaluates a model started from config\.init_from"),
    "zero_layers": ({"model.num_layers": 0}, ValueError,
                    r"config\.model\.num_layers must be a positive integer, got 0"),
    "zero_expansion": ({"model.expansion": 0}, ValueError,
                       r"config\.model\.expansion must be a positive integer, got 0"),
    "zero_patch_size": ({"model.patch_size": 0}, ValueError,
                        r"config\.model\.patch_size must be a positive integer, got 0"),
    "zero_scan_unroll": ({"model.scan_unroll": 0}, ValueError,
                         r"config\.model\.scan_unroll must be a positive integer, got 0"),
    "explicit_template_beyond_K": (
        {"model.signature": "explicit", "model.explicit_signature": "1,2,5,1"}, ValueError,
        r"explicit_signature entries are 1-based template indices in 1\.\.2, got \(1, 2, 5, 1\)"),
    "every_layers_xi_shared": ({"model.shared_mixture_layers": 4}, ValueError,
                               r"config\.model\.shared_mixture_layers must be in 0\.\.3"),
    "zero_shuffle_buffer": ({"data.shuffle_buffer": 0}, ValueError,
                            r"config\.data\.shuffle_buffer must be a positive integer"),
    "negative_image_size": ({"data.image_size": -28}, ValueError,
                            r"config\.data\.image_size must be a positive integer"),
    "one_class_subset": ({"data.most_frequent_classes": 1}, ValueError,
                         r"config\.data\.most_frequent_classes=1; use 0 to keep all classes"),
    "mesh_of_another_device_count": ({"mesh_shape": (3,)}, ValueError,
                                     r"config\.mesh_shape=\(3,\) must be \(-1,\) or \(8,\)"),
    # Memory that cannot fit: refused from the shapes instead of compiling for minutes.
    "depth_multiplier_1000": ({"model.depth_multiplier": 1000.0}, ValueError,
                              r"One training step needs at least [\d,.]+ GiB per device "
                              r"\(estimated from the shapes"),
    "expansion_100000": ({"model.expansion": 100_000}, ValueError,
                         r"One training step needs at least [\d,.]+ GiB per device"),
    "ten_thousand_layers": ({"model.num_layers": 10_000, "batch_size": 256}, ValueError,
                            r"through 10000 layers .* Lower config\.batch_size, "
                            r"config\.model\.num_layers"),
    # Numbers outside their interval (validation.NUMBER_RANGES).
    "ema_decay_of_one": ({"ema_decay": 1.0}, ValueError,
                         r"config\.ema_decay must be in \[0, 1\), got 1\.0"),
    "ema_decay_nan": ({"ema_decay": float("nan")}, ValueError,
                      r"config\.ema_decay must be a finite number in \[0, 1\), got nan"),
    "infinite_learning_rate": ({"optimizer.learning_rate": float("inf")}, ValueError,
                               r"learning_rate must be a finite number in \(0, infinity\), "
                               r"got inf"),
    "negative_warmup": ({"optimizer.warmup_steps": -1}, ValueError,
                        r"config\.optimizer\.warmup_steps must be in \[0, infinity\)"),
    "zero_decay_rate": ({"optimizer.decay_rate": 0.0}, ValueError,
                        r"config\.optimizer\.decay_rate must be in \(0, 1\]"),
    "momentum_of_one": ({"optimizer.momentum": 1.0}, ValueError,
                        r"config\.optimizer\.momentum must be in \[0, 1\)"),
    "negative_rmsprop_decay": ({"optimizer.rmsprop_decay": -0.1}, ValueError,
                               r"config\.optimizer\.rmsprop_decay must be in \[0, 1\)"),
    "zero_eps": ({"optimizer.eps": 0.0}, ValueError,
                 r"config\.optimizer\.eps must be in \(0, infinity\)"),
    "adam_b2_of_one": ({"optimizer.adam_b2": 1.0}, ValueError,
                       r"config\.optimizer\.adam_b2 must be in \[0, 1\)"),
    "negative_weight_decay": ({"optimizer.weight_decay": -1e-5}, ValueError,
                              r"config\.optimizer\.weight_decay must be in \[0, infinity\)"),
    "negative_grad_clip": ({"optimizer.grad_clip_norm": -1.0}, ValueError,
                           r"config\.optimizer\.grad_clip_norm must be in \[0, infinity\)"),
    "zero_se_ratio": ({"model.se_ratio": 0.0}, ValueError,
                      r"config\.model\.se_ratio must be in \(0, 1\]"),
    "negative_mixture_init_scale": ({"model.mixture_init_scale": -1.0}, ValueError,
                                    r"config\.model\.mixture_init_scale must be in \[0, "),
    "bn_momentum_of_one": ({"model.bn_momentum": 1.0}, ValueError,
                           r"config\.model\.bn_momentum must be in \(0, 1\)"),
    "patch_that_does_not_tile_the_input": ({"model.patch_size": 3}, ValueError,
                                           r"config\.model\.patch_size=3 does not divide the "
                                           r"28-pixel input .* the last 1 rows and columns"),
    "negative_dropout": ({"model.dropout_rate": -0.1}, ValueError,
                         r"config\.model\.dropout_rate must be in \[0, 1\)"),
    "negative_entropy_weight": ({"regularizers.entropy_weight": -1.0}, ValueError,
                                r"config\.regularizers\.entropy_weight must be in \[0, "),
    "clustering_weight_nan": ({"regularizers.clustering_weight": float("nan")}, ValueError,
                              r"clustering_weight must be a finite number in \[0, infinity\)"),
    "zero_sampling_weight": ({"tasks.mnist.sampling_weight": 0.0}, ValueError,
                             r"config\.tasks\.mnist\.sampling_weight must be in \(0, "),
    # Start-up paths that need a trained model.
    "init_from_nothing": ({"init_from": "/nonexistent/run"}, pretrained.PretrainedCheckpointError,
                          r"config\.init_from='/nonexistent/run' is neither a workdir"),
    "growth_without_init_from": ({"transfer.add_templates": 1}, ValueError,
                                 r"config\.transfer\.add_templates=1 grows a trained model: set "
                                 r"config\.init_from"),
    "deltas_without_init_from": ({"deltas": ("/a/delta",)}, ValueError,
                                 r"config\.deltas apply to a base checkpoint: set "
                                 r"config\.init_from"),
    "save_delta_without_init_from": ({"save_delta": True}, ValueError,
                                     r"config\.save_delta=True writes what a run changed"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_fails_first_with_one_clear_error(tmp_path, no_heavy_work, case):
  overrides, error, message = BAD_CONFIGS[case]
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  config = fault_config(data_dir, **overrides)
  with pytest.raises(error, match=message):
    loop.train_and_evaluate(config, str(tmp_path / "work"))
  assert os.listdir(data_dir) == []  # no dataset was prepared


def test_missing_dataset_fails_before_heavy_work(tmp_path, no_heavy_work):
  config = fault_config(tmp_path / "empty")
  config.tasks.mnist.dataset = "mnist"  # a real TFDS dataset, not prepared there
  with pytest.raises(datasets.DatasetNotFoundError,
                     match=r"Dataset 'mnist' is not prepared in data_dir=.*empty"):
    loop.train_and_evaluate(config, str(tmp_path / "work"))


def test_unwritable_workdir_fails_before_heavy_work(embedded_dir, tmp_path, no_heavy_work):
  (tmp_path / "a_file").write_text("not a directory")
  with pytest.raises(ValueError, match=r"The workdir .*a_file/work' cannot be created or "
                                       r"written.*Pass --workdir="):
    loop.train_and_evaluate(fault_config(embedded_dir), str(tmp_path / "a_file" / "work"))


def test_an_empty_workdir_is_refused_and_nothing_is_written_here(embedded_dir, tmp_path,
                                                                 monkeypatch, no_heavy_work):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match=r"--workdir is empty .* never used by default"):
    loop.train_and_evaluate(fault_config(embedded_dir), "")
  assert os.listdir(tmp_path) == []


def test_a_run_failing_on_its_data_dir_leaves_a_finished_workdir_as_it_was(reference, tmp_path,
                                                                           no_heavy_work):
  workdir = copy_of(reference[0], tmp_path)
  before = {path: path.read_bytes() for path in workdir.rglob("*") if path.is_file()}
  (tmp_path / "a_file").write_text("not a directory")
  with pytest.raises(ValueError, match=r"config\.data\.data_dir='.*a_file' is a file"):
    loop.train_and_evaluate(fault_config(tmp_path / "a_file"), str(workdir))
  assert {path: path.read_bytes() for path in workdir.rglob("*") if path.is_file()} == before


def test_checkpoint_of_another_model_fails_before_heavy_work(reference, tmp_path,
                                                              no_heavy_work):
  config = fault_config(tmp_path / "empty", **{"model.num_templates": 3})
  with pytest.raises(ValueError, match=r"another config; refusing to resume:\n  "
                                       r"model\.num_templates: checkpoint has 2, new config "
                                       r"has 3"):
    loop.train_and_evaluate(config, str(reference[0]))


# --- 6: determinism --------------------------------------------------------------------------

def test_same_config_and_seed_give_identical_metrics_and_parameters(embedded_dir, reference,
                                                                    tmp_path):
  results = loop.train_and_evaluate(fault_config(embedded_dir), str(tmp_path))
  again, first = scalar_summaries(tmp_path), scalar_summaries(reference[0])
  assert ("total_loss", TOTAL_STEPS) in first and ("mnist/test_accuracy", TOTAL_STEPS) in first
  assert again == first, {key: (again.get(key), value) for key, value in first.items()
                          if again.get(key) != value}
  assert results["tasks"] == json.loads((reference[0] / "results.json").read_text())["tasks"]
  assert_same_state(saved_state(tmp_path), reference[1])


# What jaxlib 0.10.2's coordination service and gloo printed when a peer of a two-process run
# was SIGKILLed (2026-12-07), shortened.
HEARTBEATS_STOPPED = """\
E1207 02:47:01.705947 coordination_service.cc:1549] Use error polling to propagate the \
following error to all tasks: UNAVAILABLE: The following tasks are unhealthy (stopped sending \
heartbeats):
1
The tasks have crashed. Check the task logs for an earlier error
F1207 02:47:01.707081 client.h:80] Terminating process because the JAX distributed service \
detected fatal errors.
"""
COORDINATOR_GONE = """\
F1207 02:47:07.066862 client.h:80] Terminating process because the JAX distributed service \
detected fatal errors. absl::Status: UNAVAILABLE: Failed to send RPC to coordination service. \
Either the leader task was preempted/died/restarted unexpectedly
"""
GLOO_CLOSED = ("compmod_jax.main: ValueError: UNKNOWN: Gloo AllGather failed: [external/gloo/"
               "gloo/transport/tcp/pair.cc:547] Connection closed by peer [127.0.0.1]:3267\n")


def test_the_supervisor_names_the_lost_process_from_the_services_last_words(tmp_path):
  assert supervisor.lost_peer("log\n" + HEARTBEATS_STOPPED) == [1]
  assert supervisor.lost_peer(HEARTBEATS_STOPPED.replace(":\n1\n", ":\n2, 3\n")) == [2, 3]
  assert supervisor.lost_peer(GLOO_CLOSED + COORDINATOR_GONE) == "coordinator"
  assert supervisor.lost_peer(GLOO_CLOSED) == "unknown"
  assert supervisor.lost_peer("compmod_jax.main: ValueError: config.data.data_dir ...") is None
  (tmp_path / "checkpoints" / "4").mkdir(parents=True)
  (tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1").mkdir()
  argv = ["main", "--process_id=0", "--num_processes", "3", f"--workdir={tmp_path}"]
  assert supervisor.ending(argv, [2], 134) == (
      f"process 0 of 3 stops: process 2 stopped responding (killed, out of memory, or its host "
      f"went down), and every process stops with it; rerun the same command on every process "
      f"to resume from the last complete checkpoint (step 4 in {tmp_path / 'checkpoints'}).")
  assert supervisor.ending(argv, None, -9).startswith(
      "process 0 of 3 was ended by SIGKILL (the out-of-memory killer sends it); rerun")
  assert [supervisor.distributed(["main", *flags]) for flags in (
      ["--coordinator_address=h:1"], ["--distributed"], ["--distributed=false"],
      ["--nodistributed"], ["--workdir=w"])] == [True, True, False, False, False]


def test_two_sigterms_within_a_quarter_second_are_one_notice(monkeypatch):
  """A shutdown that signals every process reaches a supervised worker twice (directly and
  forwarded by its parent): that is one notice to save, not the second SIGTERM that stops at
  once. A SIGTERM later than that still stops at once."""
  stopped = []
  monkeypatch.setattr(preemption, "_stop_now", lambda message, code: stopped.append(code))
  watcher = preemption.PreemptionWatcher()
  watcher._on_signal(signal.SIGTERM)
  watcher._on_signal(signal.SIGTERM)
  assert watcher.requested and not stopped
  time.sleep(preemption.SAME_NOTICE_SECONDS + 0.05)
  watcher._on_signal(signal.SIGTERM)
  assert stopped == [128 + signal.SIGTERM]
