"""How each step's batch is shared among the tasks (config.tasks.<task>.batch_size and
sampling_weight)."""


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
