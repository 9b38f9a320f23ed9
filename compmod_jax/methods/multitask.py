"""Multi-task set-ups of App. C and how each step's batch is shared among the tasks.

Every task always has its own head and its own BN moving statistics; the set-ups differ in
what else is private to a task (Table 8):

  simple_baseline   one shared body (plain isometric network, no templates)
  baseline_patches  shared body, per-task BN scale/bias ("linear patches", Mudrakarta et al.)
  mixture           per-task mixture weights; BN scale/bias mixed with the same xi
  mixture_patches   per-task mixture weights and per-task BN scale/bias
"""
SETUPS = {
    "simple_baseline": {"signature": "plain", "batch_norm": "per_layer"},
    "baseline_patches": {"signature": "plain", "batch_norm": "per_task"},
    "mixture": {"signature": "mixture", "batch_norm": "mixed"},
    "mixture_patches": {"signature": "mixture", "batch_norm": "per_task"},
}


def apply_setup(model_config, setup):
  """Sets the model fields that define one of the paper's multi-task set-ups."""
  if setup not in SETUPS:
    raise ValueError(f"Multi-task set-up must be one of {tuple(SETUPS)}, got {setup!r}")
  model_config.update(SETUPS[setup])
  return model_config


def task_batch_sizes(config, device_count):
  """Global examples per step for each task.

  A task's `batch_size` wins when set; the others share `config.batch_size` in proportion to
  their `sampling_weight`, rounded to a multiple of the device count (at least one example
  per device), so every task is in every step.
  """
  tasks = sorted(config.tasks)
  fixed = {t: config.tasks[t].batch_size for t in tasks if config.tasks[t].get("batch_size")}
  shared = [t for t in tasks if t not in fixed]
  weights = {t: config.tasks[t].get("sampling_weight", 1.0) for t in shared}
  if any(w <= 0 for w in weights.values()):
    raise ValueError(f"config.tasks.*.sampling_weight must be > 0, got {weights}")
  total = sum(weights.values())
  sizes = dict(fixed)
  for task in shared:
    share = config.batch_size * weights[task] / total
    sizes[task] = max(device_count, int(round(share / device_count)) * device_count)
  for task, size in sizes.items():
    if size <= 0 or size % device_count:
      raise ValueError(f"Task {task!r} gets {size} examples per step, which must be a positive "
                       f"multiple of the device count ({device_count}).")
  return sizes
