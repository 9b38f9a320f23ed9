"""Which classes a task predicts: other labelings of the same images (label maps) and the
subset of a dataset's most frequent classes (paper App. D.2), chosen from label counts before
any image is decoded."""
import functools

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from compmod_jax.data.datasets import DatasetNotFoundError, dataset_builder, get_builder, traced

# Other labelings of the same images, as new tasks (the 9-task set-up of paper Fig. 2b uses
# several labelings of one image domain): name -> (number of classes or None to keep the
# dataset's, function of the int label tensor).
LABEL_MAPS = {
    "identity": (None, lambda label: label),
    "parity": (2, lambda label: label % 2),
    "at_least_5": (2, lambda label: tf.cast(label >= 5, label.dtype)),
}
# Labels per batch when counting the examples of each class (labels only: images stay encoded).
LABEL_COUNT_BATCH = 8192


def num_classes(builder, data_config):
  """Classes the model predicts for `builder`'s labels under `data_config`: the label_map's,
  else config.data.most_frequent_classes when set, else the dataset's own. Reads no data."""
  _check_subset_size(builder, data_config)
  return (LABEL_MAPS[data_config.get("label_map", "identity")][0]
          or data_config.most_frequent_classes or builder.info.features["label"].num_classes)


def kept_classes(builder, data_config):
  """Original label ids of the classes `data_config` keeps, increasing, or None to keep all.

  The ranking counts the train_split labels of config.data.class_frequency_datasets (one pass
  per dataset and process, kept for the process's lifetime). A task's label_map other than
  'identity' is refused with a subset (`fields.check_data_config`): label maps relabel the
  original classes (digit parity), which the subset's renumbering would scramble.
  """
  if not data_config.most_frequent_classes:
    return None
  _check_subset_size(builder, data_config)
  return _most_frequent_classes(
      data_config.name, tuple(data_config.class_frequency_datasets) or (data_config.name,),
      data_config.data_dir, data_config.download, data_config.train_split,
      data_config.most_frequent_classes)


def _check_subset_size(builder, data_config):
  dataset_classes = builder.info.features["label"].num_classes
  if data_config.most_frequent_classes > dataset_classes:
    raise ValueError(
        f"config.data.most_frequent_classes={data_config.most_frequent_classes}, but "
        f"'{data_config.name}' has only {dataset_classes} classes; set at most "
        f"{dataset_classes}, or 0 to keep all.")


@functools.lru_cache(maxsize=None)
def _most_frequent_classes(task_dataset, frequency_datasets, data_dir, download, split, k):
  """The `k` classes with the most `split` examples summed over `frequency_datasets`, as
  increasing label ids (so the renumbering does not depend on the ranking). Cached: every
  stream of a task asks, and the log says once what was kept."""
  task_classes = dataset_builder(task_dataset, data_dir).info.features["label"]
  for name in frequency_datasets:
    _check_frequency_dataset(name, data_dir, download, task_dataset, task_classes.num_classes)
  counts = sum(label_counts(name, data_dir, split) for name in frequency_datasets)
  # A stable sort of the negated counts puts the smaller label first among equal counts.
  kept = tuple(sorted(np.argsort(-counts, kind="stable")[:k].tolist()))
  logging.info(
      "Task dataset %s keeps the %d classes with the most '%s' examples in %s (%d of %d "
      "examples there), renumbered 0..%d in this order (id name: examples): %s", task_dataset,
      k, split, ", ".join(frequency_datasets), counts[list(kept)].sum(), counts.sum(), k - 1,
      ", ".join(f"{label} {task_classes.int2str(label)}: {counts[label]}" for label in kept))
  return kept


def _check_frequency_dataset(name, data_dir, download, task_dataset, task_num_classes):
  """A class_frequency_datasets entry must be prepared (or preparable) and share the task
  dataset's labels; checked on metadata, before any label is counted."""
  try:
    builder = get_builder(name, data_dir, download)
  except DatasetNotFoundError as error:
    raise DatasetNotFoundError(f"config.data.class_frequency_datasets: {error}") from error
  if builder.info.features["label"].num_classes != task_num_classes:
    raise ValueError(
        f"config.data.class_frequency_datasets names '{name}' with "
        f"{builder.info.features['label'].num_classes} classes, but the task's dataset "
        f"'{task_dataset}' has {task_num_classes}; name only datasets with the task's labels.")


@functools.lru_cache(maxsize=None)
def label_counts(name, data_dir, split):
  """Examples per class in `split` of the prepared dataset `name` (read-only array). One pass
  over the labels, images left encoded; cached, since every stream of a run asks."""
  builder = dataset_builder(name, data_dir)
  num_labels = builder.info.features["label"].num_classes
  examples = builder.as_dataset(split=split,
                                decoders={"image": tfds.decode.SkipDecoding()},
                                read_config=tfds.ReadConfig(try_autocache=False))
  labels = examples.map(traced(lambda example: example["label"]),
                        num_parallel_calls=tf.data.AUTOTUNE)
  counts = np.zeros(num_labels, np.int64)
  for batch in labels.batch(LABEL_COUNT_BATCH).as_numpy_iterator():
    counts += np.bincount(batch, minlength=num_labels)
  counts.flags.writeable = False
  return counts
