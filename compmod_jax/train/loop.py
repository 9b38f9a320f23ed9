"""train_and_evaluate(config, workdir): the one loop every experiment runs.

config -> validation -> run context (per-task data streams, each process reading its own share;
the model; the method config.method names, methods/registry.py) -> global batches sharded over
the mesh's "data" axis -> jitted train step (the method's loss + regularisers, partitioned
optimizer, EMA) -> metrics, mixture-weight pictures, results.json, checkpoints.

The loop knows no method: a method plugs in its loss, its own variables and the tasks it
trains. What the run does on SIGTERM, crashes, corrupt checkpoints, NaNs and bad config:
docs/reliability.md.
"""
import time

import jax
import ml_collections
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions

from compmod_jax.analysis import accounting
from compmod_jax.finetune import deltas, init_from
from compmod_jax.train import checkpoint, context, nonfinite, preemption, report, start
from compmod_jax.train import validation
from compmod_jax.workdir import RunStart, Workdir, prepare


def stop_requested(watcher, step):
  """Whether to save and stop after `step` (tests patch this to simulate an interruption)."""
  return watcher.stop_at(step)


def train_and_evaluate(config, workdir):
  """Trains and evaluates `config` in `workdir`, resuming from its newest good checkpoint.

  Config errors, an unusable workdir, a checkpoint made with another config and a missing
  dataset all fail before any data is read or anything is compiled. Returns the final
  results.json payload.
  """
  validation.validate(config)
  workdir = prepare(workdir)
  if config.get("pretrain") and not config.init_from:
    config = _after_pretraining(config, workdir)
  checkpointer = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
  try:
    own_meta = start.refuse_other_config(config, workdir, checkpointer)
    # A run resumes from its own checkpoints; the pretrained one is read only at the start.
    source = init_from.pretrained_source(config) if config.init_from and not own_meta else None
    context.check_and_prepare_datasets(config)
    # Written once the run has decided to use the workdir: a run that fails on its data leaves
    # a finished run's config.json as it was.
    if jax.process_index() == 0:  # one writer: processes share the workdir
      Workdir(workdir).write_config(config)
    # From here on SIGTERM means: save at the next step boundary and exit cleanly.
    with preemption.PreemptionWatcher() as watcher:
      source_tasks = (source.tasks if source else
                      RunStart.from_dict((own_meta or {}).get("run_info")).source_tasks)
      ctx = start.make_context(config, workdir, source_tasks)
      state, optimization = start.create_train_state(ctx, start.example_images(config))
      state, meta = start.resume(ctx, checkpointer, state)
      ctx.run_start, start_results = RunStart.from_dict(meta.get("run_info")), None
      if source:
        state, start_results = init_from.from_pretrained(ctx, state, source,
                                                     optimization.trainable)
      if int(state.step) >= config.total_steps:
        logging.info("Run in %s is at step %d of config.total_steps=%d: evaluating only.",
                     workdir, int(state.step), config.total_steps)
        if source:  # the started model (e.g. a source-only target) as a checkpoint to go on from
          checkpointer.save(int(state.step), state, {
              "config": config.to_dict(), "step": int(state.step),
              "run_info": ctx.run_start.to_dict(),
              "wall_time_s": 0.0}, ctx.train_streams)
        results = Workdir(workdir).read_results() or report.write_results(
            ctx, state, start_results or ctx.evaluate(state), meta.get("wall_time_s", 0.0))
      else:
        state, results = _train(ctx, state, optimization, checkpointer, watcher,
                                meta.get("wall_time_s", 0.0))
      if (config.save_delta and int(state.step) >= config.total_steps
          and not deltas.written(workdir)):
        deltas.save(ctx, state, source or init_from.pretrained_source(config))
      return results
  finally:
    checkpointer.close()


def _after_pretraining(config, workdir):
  """Runs (or resumes, or finds finished) config.pretrain in <workdir>/pretrained and returns
  a copy of `config` that starts from it."""
  pretrain_dir = Workdir(workdir).pretrained
  logging.info("No config.init_from: pretraining config.pretrain in %s first.", pretrain_dir)
  config = ml_collections.ConfigDict(config.to_dict())
  config.pretrain.data.data_dir = config.data.data_dir  # the same datasets
  train_and_evaluate(config.pretrain, str(pretrain_dir))
  config.init_from = str(pretrain_dir)
  return config


def _train(ctx, state, optimization, checkpointer, watcher, wall_time_before):
  """The step loop from state.step to config.total_steps: log, evaluate, checkpoint, and stop
  at a step boundary when asked to. Returns the last state and results.json payload."""
  config = ctx.config
  writer = metric_writers.create_default_writer(ctx.workdir,
                                                just_logging=jax.process_index() > 0)
  if int(state.step) == 0:
    parameter_overview.log_parameter_overview(state.params)
    logging.info("Parameters per group:\n%s", accounting.format_model_summary(
        ctx.model.spec, state.params))
  train_step = start.train_step(ctx, state, optimization)
  progress = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer)
  started = time.time()
  wall_time = lambda: wall_time_before + time.time() - started
  pending_metrics = []
  results = Workdir(ctx.workdir).read_results()
  train_iterators = {task: iter(stream) for task, stream in ctx.train_streams.items()}
  nonfinite_guard = nonfinite.NonFiniteGuard(config.max_nonfinite_skips)
  first_step = int(state.step) + 1
  for step in range(first_step, config.total_steps + 1):
    local_batch = {task: next(it) for task, it in train_iterators.items()}
    state, metrics = train_step(state, ctx.global_batch(local_batch))
    if step == first_step:
      jax.block_until_ready(metrics)
      logging.info("First step (%d) done %.1f s after the loop started: compiling it (or "
                   "reading it from config.compilation_cache_dir) and running it.", step,
                   time.time() - started)
    nonfinite_guard.observe(step, metrics)
    pending_metrics.append(metrics)
    progress(step)
    last = step == config.total_steps
    if step % config.log_every == 0 or last:
      report.write_train_metrics(ctx, writer, step, pending_metrics,
                                 optimization.schedule(step - 1), state)
      pending_metrics = []
    if step % config.eval_every == 0 or last:
      nonfinite_guard.flush()  # past the allowed skips, stop before reporting
      results = report.evaluate_and_report(ctx, writer, step, state, wall_time())
    stopping = stop_requested(watcher, step)
    if step % config.checkpoint_every == 0 or last or stopping:
      nonfinite_guard.flush()  # past the allowed skips, stop before saving
      meta = {"config": config.to_dict(), "step": step, "run_info": ctx.run_start.to_dict(),
              "wall_time_s": wall_time()}
      checkpointer.save(step, state, meta, ctx.train_streams)
    if stopping:
      logging.warning("Stopped at step %d after saving; rerun the same command to resume.",
                      step)
      break
  writer.flush()
  return state, results
