"""How alike the tasks' mixture weights are at each depth (paper §4.3, Fig. 2).

similarity[l, a, b] = sum_k sqrt(xi_a[l, k] * xi_b[l, k]), the Bhattacharyya coefficient of
the two tasks' template distributions at layer l: 1 when both use the same mixture, 0 when they
share no template. Shared early layers (same image domain) or shared late layers (same task on
different domains) show up as bright diagonal blocks.
"""
import numpy as np


def task_similarity(xi_by_task):
  """Returns (task names, similarity [L, T, T])."""
  tasks = sorted(xi_by_task)
  xi = np.stack([np.asarray(xi_by_task[t], np.float64) for t in tasks], axis=1)  # [L, T, K]
  roots = np.sqrt(np.clip(xi, 0.0, None))
  return tasks, np.einsum("ltk,lsk->lts", roots, roots)
