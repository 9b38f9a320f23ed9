"""The one input path: a TFDS dataset (embedded or real) -> per-process batches of numpy arrays.

Every experiment, from the embedded digits on a laptop to ImageNet on a pod, reads data through
`DataStream`, so multi-host sharding, padding of eval batches and checkpointing of the input
position are written (and tested) once.

Why it is built the way it is:
- A small training split (IN_MEMORY_MAX_BYTES decoded) is decoded once and held in memory by
  every process, which runs the one global stream (shuffle of indices into it, global batches,
  augmentation seeded by the batch) and keeps its own rows of each batch. So any layout of
  processes and devices trains on the same batches, a run can resume on another layout, and one
  process computes what several do (tests/test_processes.py). The price, each process augmenting
  every global batch, is small for such splits.
- A larger split stays PNG/JPEG-encoded until after the shuffle buffer, and each process reads
  only its own share of it (`tfds.even_splits`), shuffled and augmented with its own seed: the
  batches depend on the number of processes (a resume on another number of processes starts the
  input over, with a warning). Either way the buffer is small in memory and in input
  checkpoints. Process index and count are arguments, not `jax.process_index()`, so tests can
  simulate several hosts and this package never needs to import JAX.
- Random augmentation uses stateless ops seeded by (seed, process, batch counter). That keeps
  the stream reproducible and lets `tf.train.Checkpoint` save the iterator: stateful random ops
  and `from_generator` pipelines cannot be checkpointed. It runs on whole batches, after
  decoding: tf.data spends more on a small per-example op than the op itself does.
- Eval batches are padded, never dropped, and every process yields the same number of them, so
  metrics count each example exactly once and no host waits for another in a collective.
"""
import math

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from compmod_jax.data.classes import kept_classes, label_counts
from compmod_jax.data.datasets import dataset_size, get_builder, traced
from compmod_jax.data.preprocess import augment_and_normalize, normalize, prepare_example

# A training share whose decoded images take at most this many bytes is decoded once and held in
# memory (the digits: 3 MB; CIFAR-100: 150 MB); larger ones, and images of varied sizes, are
# decoded example by example after the shuffle.
IN_MEMORY_MAX_BYTES = 1 << 30
DECODE_BATCH = 4096


class DataStream:
  """Batches of one process's share of a split, as dicts of numpy arrays.

  Training streams shuffle (seeded), repeat forever and drop partial batches; their position
  is saved with `save` and resumed exactly with `restore`. Eval streams make one pass in
  stored order: each time iteration starts, a new pass starts; every process yields
  `num_batches` batches, the last ones padded with zeros. Every batch holds 'image' float32
  [B, H, W, C], 'label' int32 [B] and 'mask' float32 [B] (1 for real examples, 0 for padding).
  With config.data.most_frequent_classes, both hold only the kept classes, renumbered.
  """

  def __init__(self,
               data_config,
               *,
               batch_size,
               train,
               split=None,
               seed=0,
               process_index=0,
               process_count=1):
    """Args:
      data_config: the `config.data` ConfigDict (see `fields.default_data_config`).
      batch_size: examples per batch on this process.
      train: training stream (shuffled, augmented, endless) or eval stream (one pass).
      split: TFDS split; None takes data_config.train_split or data_config.eval_split.
      seed: seed of the shuffle and the augmentation.
      process_index, process_count: this process and how many read the split together.
    """
    self.data_config = data_config
    self.batch_size = batch_size
    self.train = train
    self.builder = get_builder(data_config.name, data_config.data_dir, data_config.download)
    split = split or (data_config.train_split if train else data_config.eval_split)
    self._process_splits = tfds.even_splits(split, n=process_count, drop_remainder=False)
    self.process_split = self._process_splits[process_index]
    self.kept_classes = kept_classes(self.builder, data_config)
    if train and self.kept_classes and not self.num_examples:
      # The class subset can empty a share; repeating nothing would hang the first next().
      raise ValueError(f"Process {process_index} of {process_count} has no training examples "
                       f"of the kept classes in {split!r} of '{data_config.name}'; use a "
                       f"larger config.data.train_split.")
    if train:
      self._seed, self._process = seed, (process_index, process_count)
      self._in_memory = self._decoded_in_memory(split)
      self._dataset = self._training_dataset(self._in_memory)
    else:
      self._dataset = self._eval_dataset()
    self._iterator = iter(self._dataset)

  @property
  def same_on_every_layout(self):
    """Whether this stream's batches are rows of one global stream that does not depend on
    the number of processes (a training split held in memory)."""
    return self.train and self._in_memory is not None

  @property
  def num_examples(self):
    """Examples (of the kept classes) in this process's share of the split."""
    return self._share_size(self.process_split)

  @property
  def num_batches(self):
    """Eval: batches per pass, equal on all processes. Train: full batches per epoch here."""
    if self.train:
      return self.num_examples // self.batch_size
    largest_share = max(self._share_size(share) for share in self._process_splits)
    return math.ceil(largest_share / self.batch_size)

  def _share_size(self, share):
    """The metadata's count, or with a class subset the kept classes' (one cached label pass
    per share: every process must know every share's size to pad to the same batch count)."""
    if self.kept_classes is None:
      return dataset_size(self.builder, share)
    counts = label_counts(self.data_config.name, self.data_config.data_dir, share)
    return int(counts[list(self.kept_classes)].sum())

  def __iter__(self):
    if not self.train:
      self._iterator = iter(self._dataset)
    return self

  def __next__(self):
    # This process's rows of a global batch are taken here, after tf.data: the position then
    # holds (in its prefetch buffer) global batches, which any layout can resume from.
    rows = slice(None)
    if self.same_on_every_layout:
      process_index = self._process[0]
      rows = slice(process_index * self.batch_size, (process_index + 1) * self.batch_size)
    return {key: value.numpy()[rows] for key, value in next(self._iterator).items()}

  def save(self, path_prefix):
    """Writes the stream position (and shuffle buffer) to `path_prefix`; returns the path."""
    return tf.train.Checkpoint(iterator=self._iterator).write(path_prefix)

  def restore(self, path_prefix):
    """Resumes the stream at the position written by `save` to `path_prefix`."""
    try:
      tf.train.Checkpoint(iterator=self._iterator).read(path_prefix).assert_consumed()
    except tf.errors.OpError as error:
      if not self.train or self._in_memory is None:
        raise
      # A position saved before small shares were held in memory (compmod_jax before
      # 2026-12-03) is one in the streamed pipeline, which yields the same batches: stream.
      # Anything else (a damaged position) keeps the stream as it was and raises its error.
      streamed = self._training_dataset(None)
      iterator = iter(streamed)
      try:
        tf.train.Checkpoint(iterator=iterator).read(path_prefix).assert_consumed()
      except tf.errors.OpError:
        raise error from None
      self._in_memory, self._dataset, self._iterator = None, streamed, iterator
      logging.info("Resumed the input of %s from a position saved by the streamed pipeline; "
                   "it streams from here on.", self.data_config.name)

  def _read_encoded(self, shuffle_files, seed, try_autocache, split=None):
    """The examples of `split` (default: this process's share) of the kept classes,
    renumbered, with the image still encoded, labels decoded."""
    dataset = self.builder.as_dataset(
        split=split or self.process_split,
        shuffle_files=shuffle_files,
        decoders={"image": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(shuffle_seed=seed, try_autocache=try_autocache),
    )
    if self.kept_classes is None:
      return dataset
    # Filtered before the shuffle buffer and the decoding: dropped examples take neither.
    new_labels = np.full(self.builder.info.features["label"].num_classes, -1)
    new_labels[list(self.kept_classes)] = np.arange(len(self.kept_classes))
    new_labels = tf.constant(new_labels, dataset.element_spec["label"].dtype)

    def renumber(example):
      return {**example, "label": tf.gather(new_labels, example["label"])}

    return dataset.map(traced(renumber)).filter(
        traced(lambda example: example["label"] >= 0))

  def _decode_and_prepare(self, example):
    image = self.builder.info.features["image"].decode_example(example["image"])
    return prepare_example({"image": image, "label": example["label"]}, self.data_config)

  def _decode_for_eval(self, example):
    prepared = self._decode_and_prepare(example)
    return {"image": normalize(prepared["image"], self.data_config.normalization),
            "label": prepared["label"], "mask": tf.constant(1.0)}

  def _training_dataset(self, held):
    """The endless training batches: from `held` (images, labels) of `_decoded_in_memory`, or
    streamed and decoded example by example where it is None."""
    process_index, process_count = self._process
    if held is None:  # this process's share, with a seed of its own
      process_seed, batch_size = [self._seed, process_index], self.batch_size
    else:  # the global stream, as one process would run it (__next__ keeps this one's rows)
      process_seed, batch_size = [self._seed, 0], self.batch_size * process_count
    process_seed = tf.constant(process_seed, tf.int64)

    def augment_with_own_seed(batch_count, batch):
      batch_seed = tf.random.experimental.stateless_fold_in(process_seed, batch_count)
      images = augment_and_normalize(batch["image"], self.data_config, train=True,
                                     seed=batch_seed)
      return {"image": images, "label": batch["label"],
              "mask": tf.ones([batch_size], tf.float32)}

    if held is None:
      # No autocache: a cache in front of the shuffle would be written into every checkpoint.
      dataset = self._shuffled(self._read_encoded(shuffle_files=True, seed=self._seed,
                                                  try_autocache=False), self._seed)
      dataset = dataset.map(traced(self._decode_and_prepare),
                            num_parallel_calls=tf.data.AUTOTUNE)
      _check_fixed_image_shape(dataset.element_spec)
      make_batch = augment_with_own_seed
    else:
      images, labels = held
      # The buffer shuffles indices into the decoded share: the same order as shuffling the
      # examples themselves, and an input checkpoint holds integers, not images.
      dataset = self._shuffled(tf.data.Dataset.range(len(labels)), self._seed)

      def make_batch(batch_count, indices):
        prepared = prepare_example({"image": tf.gather(images, indices),
                                     "label": tf.gather(labels, indices)}, self.data_config)
        return augment_with_own_seed(batch_count, prepared)

    dataset = dataset.batch(batch_size, drop_remainder=True).enumerate()
    return _without_autotuning(dataset.map(traced(make_batch),
                                           num_parallel_calls=tf.data.AUTOTUNE).prefetch(2))

  def _shuffled(self, dataset, seed):
    # Shuffle before repeat: each epoch then sees every example of this share exactly once.
    return dataset.shuffle(self.data_config.shuffle_buffer, seed=seed,
                           reshuffle_each_iteration=True).repeat()

  def _decoded_in_memory(self, split):
    """(images, labels) of the whole `split`, decoded once, in stored order, when its images
    have one stored shape and take at most IN_MEMORY_MAX_BYTES; else None (streamed). Decoding
    every example at every epoch cost a CPU run a large share of its cores
    (docs/performance.md, input pipeline)."""
    feature = self.builder.info.features["image"]
    if any(side is None for side in feature.shape):
      return None
    decoded_bytes = self._share_size(split) * math.prod(feature.shape) * np.dtype(
        feature.np_dtype).itemsize
    if decoded_bytes > IN_MEMORY_MAX_BYTES:
      return None
    dataset = self._read_encoded(shuffle_files=False, seed=None, try_autocache=False,
                                 split=split)
    dataset = dataset.map(traced(lambda example: {
        "image": feature.decode_example(example["image"]), "label": example["label"]}),
                          num_parallel_calls=tf.data.AUTOTUNE)
    parts = list(dataset.batch(DECODE_BATCH).as_numpy_iterator())
    return (tf.constant(np.concatenate([part["image"] for part in parts])),
            tf.constant(np.concatenate([part["label"] for part in parts])))

  def _eval_dataset(self):
    dataset = self._read_encoded(shuffle_files=False, seed=None, try_autocache=True)
    dataset = dataset.map(traced(self._decode_for_eval),
                          num_parallel_calls=tf.data.AUTOTUNE)
    _check_fixed_image_shape(dataset.element_spec)
    padding = tf.data.Dataset.from_tensors(_zero_example(dataset.element_spec)).repeat()
    dataset = dataset.concatenate(padding).take(self.num_batches * self.batch_size)
    return _without_autotuning(
        dataset.batch(self.batch_size, drop_remainder=True).prefetch(2))


def _without_autotuning(dataset):
  """`dataset` with tf.data's autotuning off; AUTOTUNE parallelism then means one call per
  core. Autotuning's background thread sleeps longer the longer an iterator lives, and
  destroying the iterator waits for it to wake up: a new eval pass waited up to a minute per
  task, and a finished training run up to a minute per task before the process could exit
  (a training stream of the embedded MNIST held the exit of a 90 s script for 50 s)."""
  options = tf.data.Options()
  options.autotune.enabled = False
  return dataset.with_options(options)


def _check_fixed_image_shape(element_spec):
  """Batching needs one image shape; natural images of varied sizes need a resize."""
  if not element_spec["image"].shape.is_fully_defined():
    raise ValueError(
        f"Batches need one image shape, but the images are {element_spec['image'].shape}: "
        "set config.data.image_size.")


def _zero_example(element_spec):
  """An all-zero example (mask 0) shaped like the real ones, to pad eval batches with."""
  return {key: tf.zeros(spec.shape, spec.dtype) for key, spec in element_spec.items()}
