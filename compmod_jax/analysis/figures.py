"""Pictures of what the mixture weights learned: one layers x templates heatmap per task, task
similarity per layer, and the accuracy change under signature perturbations; and of the data:
sample images of every embedded digit domain.

  python -m compmod_jax.analysis.figures docs/images/digit_domains.png   # the domains' samples
"""
import io
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def mixture_heatmaps(xi_by_task, step):
  """Per-task heatmaps of xi (rows: layers, columns: templates) side by side.

  Returns the figure as an RGB uint8 array [H, W, 3], for PNG files and TensorBoard.
  """
  tasks = sorted(xi_by_task)
  num_layers, num_templates = np.asarray(xi_by_task[tasks[0]]).shape
  width = 1.2 + len(tasks) * max(2.0, 0.35 * num_templates + 1.0)
  fig, axes = plt.subplots(1, len(tasks), figsize=(width, 1.0 + 0.28 * num_layers),
                           squeeze=False, constrained_layout=True)
  for ax, task in zip(axes[0], tasks):
    image = ax.imshow(np.asarray(xi_by_task[task]), vmin=0.0, vmax=1.0, cmap="viridis",
                      aspect="auto", interpolation="nearest")
    ax.set_title(task, fontsize=9)
    ax.set_xlabel("template")
    ax.set_xticks(range(num_templates), [str(k + 1) for k in range(num_templates)], fontsize=7)
    ax.set_yticks(range(num_layers), [str(l + 1) for l in range(num_layers)], fontsize=7)
  axes[0][0].set_ylabel("layer")
  fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="mixture weight")
  fig.suptitle(f"mixture weights at step {step}", fontsize=10)
  return _to_rgb(fig)


def task_similarity_grid(tasks, similarity, step):
  """One tasks x tasks similarity matrix per layer, in a grid of panels."""
  num_layers = similarity.shape[0]
  columns = int(np.ceil(np.sqrt(num_layers)))
  rows = int(np.ceil(num_layers / columns))
  panel = max(1.6, 0.28 * len(tasks) + 0.8)
  fig, axes = plt.subplots(rows, columns, figsize=(1.5 + columns * panel, 0.8 + rows * panel),
                           squeeze=False, constrained_layout=True)
  for layer, ax in enumerate(axes.flat):
    if layer >= num_layers:
      ax.axis("off")
      continue
    image = ax.imshow(similarity[layer], vmin=0.0, vmax=1.0, cmap="magma",
                      interpolation="nearest")
    ax.set_title(f"layer {layer + 1}", fontsize=8)
    ax.set_xticks(range(len(tasks)), tasks, rotation=90, fontsize=5)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=5)
  fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="mixture similarity")
  fig.suptitle(f"task similarity of mixture weights per layer, step {step}", fontsize=10)
  return _to_rgb(fig)


def perturbation_figure(table, num_layers, path):
  """Per task (one row of panels): the accuracy change from the trained model when two
  adjacent layers swap their mixture weights, with the random orders' and the hardened
  model's changes as lines; and a layers x layers map of the change when layer l takes layer
  m's weights. `table`: {task: {perturbation: accuracy}} (analysis/perturb.py). Writes a PNG."""
  tasks = sorted(table)
  fig, axes = plt.subplots(len(tasks), 2, figsize=(9.5, 0.6 + 3.2 * len(tasks)),
                           squeeze=False, constrained_layout=True)
  for (swaps, replaced), task in zip(axes, tasks):
    row = table[task]
    change = lambda name, row=row: 100 * (row[name] - row["trained"])
    pairs = range(1, num_layers)
    swaps.bar(list(pairs), [change(f"swap {l},{l + 1}") for l in pairs], color="tab:blue")
    permuted = [change(name) for name in row if name.startswith("permutation")]
    if permuted:
      swaps.axhline(np.mean(permuted), color="tab:red", linestyle="--",
                    label=f"random order (mean of {len(permuted)})")
    swaps.axhline(change("hardened"), color="tab:green", linestyle=":", label="hardened")
    swaps.axhline(0.0, color="black", linewidth=0.5)
    swaps.set_xticks(list(pairs), [f"{l},{l + 1}" for l in pairs], fontsize=7)
    swaps.set_xlabel("layers whose mixture weights swap")
    swaps.set_ylabel("accuracy change (points)")
    swaps.set_title(f"{task}: trained {100 * row['trained']:.2f}%", fontsize=9)
    swaps.legend(fontsize=7)
    grid = np.zeros((num_layers, num_layers))
    for layer in range(num_layers):
      for other in range(num_layers):
        if other != layer:
          grid[layer, other] = change(f"{layer + 1}<-{other + 1}")
    bound = max(np.abs(grid).max(), 1e-9)
    image = replaced.imshow(grid, cmap="RdBu", vmin=-bound, vmax=bound, interpolation="nearest")
    replaced.set_xticks(range(num_layers), [str(l + 1) for l in range(num_layers)], fontsize=7)
    replaced.set_yticks(range(num_layers), [str(l + 1) for l in range(num_layers)], fontsize=7)
    replaced.set_xlabel("layer m whose weights are copied")
    replaced.set_ylabel("layer l")
    replaced.set_title("layer l takes layer m's mixture weights", fontsize=9)
    fig.colorbar(image, ax=replaced, shrink=0.8, label="accuracy change (points)")
  fig.savefig(str(path), dpi=100)
  plt.close(fig)


def _to_rgb(fig):
  fig.canvas.draw()
  rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  plt.close(fig)
  return rgb


def png_bytes(rgb):
  buffer = io.BytesIO()
  plt.imsave(buffer, rgb, format="png")
  return buffer.getvalue()


def digit_domain_samples(path):
  """Every embedded digit domain's first test image of each class, one row per domain;
  written as a PNG to `path`."""
  from compmod_jax.data import embedded_digits  # Imported here: it imports TFDS.

  configs = embedded_digits.EmbeddedDigits.BUILDER_CONFIGS
  num_classes = embedded_digits.NUM_CLASSES
  fig, axes = plt.subplots(len(configs), num_classes, squeeze=False,
                           figsize=(0.6 * num_classes + 1.4, 0.62 * len(configs)))
  for row, config in zip(axes, configs):
    images, labels, test_mask = embedded_digits.load_domain(config)
    for label, ax in enumerate(row):
      image = images[np.flatnonzero(test_mask & (labels == label))[0]]
      ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0,
                vmax=255, interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
    row[0].set_ylabel(config.name, rotation=0, ha="right", va="center", fontsize=7)
  fig.subplots_adjust(left=0.2, right=0.99, top=0.99, bottom=0.01, wspace=0.08, hspace=0.1)
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  digit_domain_samples(sys.argv[1])
