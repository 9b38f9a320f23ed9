"""The one input path: a TFDS dataset (embedded or real) -> per-process batches of numpy arrays.

Every experiment, from the embedded digits on a laptop to ImageNet on a pod, reads data through
`get_builder` + `DataStream`, so multi-host sharding, padding of eval batches and checkpointing of
the input position are written (and tested) once.

Why it is built the way it is:
- Each process reads only its own share of a split (`tfds.even_splits`). Process index and count
  are arguments, not `jax.process_index()`, so tests can simulate several hosts and this package
  never needs to import JAX.
- A small training share (IN_MEMORY_MAX_BYTES decoded) is decoded once and held in memory; the
  shuffle buffer holds indices into it. Larger shares stay PNG/JPEG-encoded until after the
  shuffle buffer. Either way the buffer is small in memory and in input checkpoints.
- Random augmentation uses stateless ops seeded by (seed, process, batch counter). That keeps
  the stream reproducible and lets `tf.train.Checkpoint` save the iterator: stateful random ops
  and `from_generator` pipelines cannot be checkpointed. It runs on whole batches, after
  decoding: tf.data spends more on a small per-example op than the op itself does.
- Eval batches are padded, never dropped, and every process yields the same number of them, so
  metrics count each example exactly once and no host waits for another in a collective.
"""
import functools
import math

from absl import logging
import ml_collections
from ml_collections import config_dict
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from compmod_jax.data import embedded_digits, image_folder

NORMALIZATIONS = ("unit", "standard")
AUGMENTATIONS = ("none", "crop", "crop_flip")
# Other labelings of the same images, as new tasks (the 9-task set-up of paper Fig. 2b uses
# several labelings of one image domain): name -> (number of classes or None to keep the
# dataset's, function of the int label tensor).
LABEL_MAPS = {
    "identity": (None, lambda label: label),
    "parity": (2, lambda label: label % 2),
    "at_least_5": (2, lambda label: tf.cast(label >= 5, label.dtype)),
}
# 'standard' statistics: ImageNet's for RGB (what models transferred from ImageNet expect); for
# grayscale digits a dataset mean would differ per domain, so map [0, 1] to [-1, 1] instead.
STANDARD_MEAN_STD = {
    1: ((0.5,), (0.5,)),
    3: ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# crop and crop_flip pad each side by this fraction of the image side (4 px at 32 px, CIFAR's
# standard; 3 px at 28 px).
CROP_PADDING_FRACTION = 1 / 8
# A training share whose decoded images take at most this many bytes is decoded once and held in
# memory (the digits: 3 MB; CIFAR-100: 150 MB); larger ones, and images of varied sizes, are
# decoded example by example after the shuffle.
IN_MEMORY_MAX_BYTES = 1 << 30
DECODE_BATCH = 4096
# Labels per batch when counting the examples of each class (labels only: images stay encoded).
LABEL_COUNT_BATCH = 8192


def _keep_tensorflow_off_accelerators():
  """TF only feeds data here; if it grabbed the GPU/TPU memory, JAX could not have it."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF already initialised its devices; too late to change, keep going.
    pass


_keep_tensorflow_off_accelerators()


class DatasetNotFoundError(tfds.core.DatasetNotFoundError):
  """A dataset that is unknown or not prepared in the data_dir (a ValueError)."""


def default_data_config():
  """Returns the `config.data` fields (the base config's) with defaults for the embedded
  digits.

  Fields:
    name: TFDS name, e.g. 'embedded_digits/mnist_blur', 'cifar100', 'mnist_corrupted/shear',
        or 'folder:<path>' for your own images in class folders per split (image_folder.py).
    data_dir: TFDS data_dir (None: TFDS's default, ~/tensorflow_datasets or $TFDS_DATA_DIR).
    download: allow TFDS to download and prepare a missing real dataset (needs network).
    train_split, eval_split: TFDS split strings, e.g. 'train[:90%]'.
    image_size: side of the square output image (default 28, the digits'); None keeps the
        stored size.
    channels: 1 or 3; grayscale and RGB are converted into each other as needed.
    normalization: 'unit' -> [0, 1]; 'standard' -> (x / 255 - mean) / std (STANDARD_MEAN_STD).
    augment: 'none', 'crop' (random translation: pad by 1/8 and crop back; for digits) or
        'crop_flip' (also random horizontal flips; for natural images). Training only.
    shuffle_buffer: examples in the training shuffle buffer.
    most_frequent_classes: k > 1 keeps only the k classes with the most train_split examples
        (paper App. D.2: DomainNet's 100 most frequent classes), renumbered 0..k-1 in increasing
        order of their original label; examples of other classes are dropped from every split.
        0 keeps all classes. Not combinable with a task's label_map (see `kept_classes`).
    class_frequency_datasets: TFDS names whose train_split labels are counted, summed, to rank
        the classes (ties: the smaller label first); () counts the task's own dataset. Name all
        the tasks' datasets here so that every task keeps the same classes.
  """
  return ml_collections.ConfigDict({
      "name": "embedded_digits/mnist",
      "data_dir": config_dict.placeholder(str),
      "download": False,
      "train_split": "train",
      "eval_split": "test",
      "image_size": config_dict.FieldReference(28, field_type=int),
      "channels": 1,
      "normalization": "unit",
      "augment": "none",
      "shuffle_buffer": 10_000,
      "most_frequent_classes": 0,
      "class_frequency_datasets": (),
  })


def get_builder(name, data_dir=None, download=False):
  """Returns a prepared TFDS builder for `name`, or raises DatasetNotFoundError at once.

  `embedded_digits/*` is prepared locally when missing (seconds, no network). A real dataset
  that is missing is downloaded only if `download` is True; otherwise the error says how to
  prepare it, instead of TFDS hanging on a network that is not there.
  """
  builder = check_dataset(name, data_dir, download)
  if not builder.is_prepared():
    builder.download_and_prepare()
  return builder


def check_dataset(name, data_dir=None, download=False):
  """Returns the (maybe unprepared) builder `get_builder` would prepare, or raises
  DatasetNotFoundError at once; reads at most the dataset's metadata, prepares nothing."""
  builder = dataset_builder(name, data_dir)
  # Embedded digits and image folders are prepared from files already on this machine.
  preparable = download or builder.name in (embedded_digits.EmbeddedDigits.name,
                                            image_folder.ImageFolderDataset.name)
  if not (preparable or builder.is_prepared()):
    raise DatasetNotFoundError(_not_prepared_message(builder, name, data_dir))
  return builder


def dataset_builder(name, data_dir=None):
  """The TFDS builder of `name`, prepared or not: its features (classes, image shape) come
  from the builder's code (a `folder:<path>` dataset's from listing its folder).
  DatasetNotFoundError for a name TFDS does not know, ImageFolderError for a bad folder."""
  if image_folder.is_folder_name(name):
    return image_folder.ImageFolderDataset(name[len(image_folder.PREFIX):], data_dir=data_dir)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError as error:
    raise DatasetNotFoundError(
        f"'{name}' is not a TFDS dataset. Use a TFDS name such as 'cifar100' or "
        f"'mnist_corrupted/shear', or 'embedded_digits/<config>' with a config in "
        f"{[config.name for config in embedded_digits.EmbeddedDigits.BUILDER_CONFIGS]}.") from error
  configs = [config.name for config in type(builder).BUILDER_CONFIGS or ()]
  if len(configs) > 1 and "/" not in name.partition(":")[0]:
    # TFDS would silently read its first config: another dataset than the user may think.
    raise ValueError(f"Dataset '{name}' has {len(configs)} configs; name one, as "
                     f"'{builder.name}/<config>' with <config> one of {configs}.")
  return builder


def _not_prepared_message(builder, name, data_dir):
  """Tells the user where the dataset was looked for and the ways to put it there."""
  data_dir_flag = f" --data_dir={data_dir}" if data_dir else ""
  data_root = data_dir or tfds.core.constants.DATA_DIR
  message = (f"Dataset '{name}' is not prepared in data_dir={data_root} (looked for "
             f"{builder.data_dir}) and config.data.download is False. Either run "
             f"`tfds build {name}{data_dir_flag}` on a machine with network access (and copy the "
             f"folder to data_dir), or set config.data.download=True on such a machine.")
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    message += (f" '{name}' also needs files that you download yourself, placed in "
                f"{data_root}/downloads/manual before building: "
                f"{' '.join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split())}")
  return message


def num_classes(builder, data_config):
  """Classes the model predicts for `builder`'s labels under `data_config`: the label_map's,
  else config.data.most_frequent_classes when set, else the dataset's own. Reads no data."""
  check_data_config(data_config)
  _check_subset_size(builder, data_config)
  return (LABEL_MAPS[data_config.get("label_map", "identity")][0]
          or data_config.most_frequent_classes or builder.info.features["label"].num_classes)


def kept_classes(builder, data_config):
  """Original label ids of the classes `data_config` keeps, increasing, or None to keep all.

  The ranking counts the train_split labels of config.data.class_frequency_datasets (one pass
  per dataset and process, kept for the process's lifetime). A task's label_map other than
  'identity' is refused with a subset (`check_data_config`): label maps relabel the original
  classes (digit parity), which the subset's renumbering would scramble.
  """
  check_data_config(data_config)
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
  counts = sum(_label_counts(name, data_dir, split) for name in frequency_datasets)
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
def _label_counts(name, data_dir, split):
  """Examples per class in `split` of the prepared dataset `name` (read-only array). One pass
  over the labels, images left encoded; cached, since every stream of a run asks."""
  builder = dataset_builder(name, data_dir)
  num_labels = builder.info.features["label"].num_classes
  examples = builder.as_dataset(split=split,
                                decoders={"image": tfds.decode.SkipDecoding()},
                                read_config=tfds.ReadConfig(try_autocache=False))
  labels = examples.map(_traced(lambda example: example["label"]),
                        num_parallel_calls=tf.data.AUTOTUNE)
  counts = np.zeros(num_labels, np.int64)
  for batch in labels.batch(LABEL_COUNT_BATCH).as_numpy_iterator():
    counts += np.bincount(batch, minlength=num_labels)
  counts.flags.writeable = False
  return counts


def dataset_size(builder, split):
  """Number of examples in `split`, which may be sliced ('train[:10%]') or an even split."""
  return builder.info.splits[split].num_examples


def _prepare_example(example, data_config):
  """What must happen to an example (or a batch of them) before the augmentation: the
  channels, the size, the label."""
  check_data_config(data_config)
  image = _convert_channels(tf.cast(example["image"], tf.float32), data_config.channels)
  size = data_config.image_size
  # Resizing to the size an image has returns it unchanged, at a cost (most of the digits'
  # input time went into 28 -> 28).
  if size and tuple(image.shape[-3:-1]) != (size, size):
    image = _resize_smaller_side_and_center_crop(image, size)
  relabel = LABEL_MAPS[data_config.get("label_map", "identity")][1]
  return {"image": image, "label": relabel(tf.cast(example["label"], tf.int32))}


def augment_and_normalize(images, data_config, *, train, seed=None):
  """A batch of prepared images (float32 pixels [B, H, W, C]) -> the model's input: with
  `train`, the configured augmentation (seeded by `seed`, int [2]), then the normalisation.
  Done on whole batches: per-example ops cost tf.data more in overhead than in arithmetic."""
  if train and data_config.augment != "none":
    images = _random_crop_and_flip(images, seed, flip=data_config.augment == "crop_flip")
  return _normalize(images, data_config.normalization)


def check_data_config(data_config):
  """Fails on config values that would otherwise be silently ignored."""
  for field, allowed in (("normalization", NORMALIZATIONS), ("augment", AUGMENTATIONS),
                         ("channels", tuple(STANDARD_MEAN_STD))):
    _check_choice(field, data_config[field], allowed)
  _check_choice("label_map", data_config.get("label_map", "identity"), tuple(LABEL_MAPS))
  _check_class_subset_fields(data_config)
  if not image_folder.is_folder_name(data_config.name):  # a folder slices its own splits
    _check_split_strings(data_config)
  if not _is_int(data_config.shuffle_buffer) or data_config.shuffle_buffer < 1:
    raise ValueError(f"config.data.shuffle_buffer must be a positive integer (1 = no "
                     f"shuffling), got {data_config.shuffle_buffer!r}")
  if data_config.image_size is not None and (not _is_int(data_config.image_size)
                                             or data_config.image_size < 0):
    raise ValueError(f"config.data.image_size must be a positive integer (or None or 0 to keep "
                     f"the dataset's own size), got {data_config.image_size!r}")


def _check_split_strings(data_config):
  for field in ("train_split", "eval_split"):
    try:
      tfds.core.ReadInstruction.from_spec(data_config[field])
    except (ValueError, AssertionError, NotImplementedError) as error:
      raise ValueError(f"config.data.{field}={data_config[field]!r} is not a TFDS split: "
                       f"{str(error).splitlines()[0]} (e.g. 'train', 'train[:90%]', "
                       f"'train[:1000]+validation').") from None


def _is_int(value):
  return isinstance(value, int) and not isinstance(value, bool)


def _check_class_subset_fields(data_config):
  """The class subset's errors that need no data and no dataset metadata."""
  k = data_config.most_frequent_classes
  if not _is_int(k) or k < 0 or k == 1:
    raise ValueError(f"config.data.most_frequent_classes={k!r}; use 0 to keep all classes or "
                     f"an int k >= 2 to keep the k most frequent (one class is no task).")
  datasets = data_config.class_frequency_datasets
  if isinstance(datasets, str) or not all(isinstance(name, str) and name for name in datasets):
    raise ValueError(f"config.data.class_frequency_datasets={datasets!r}; use a tuple of TFDS "
                     f"names, e.g. ('domainnet/real', 'domainnet/sketch'), or () to count the "
                     f"task's own dataset.")
  if datasets and not k:
    raise ValueError(f"config.data.class_frequency_datasets={tuple(datasets)} only ranks classes "
                     f"for config.data.most_frequent_classes, which is 0 (all classes): set "
                     f"most_frequent_classes, or set class_frequency_datasets=().")
  label_map = data_config.get("label_map", "identity")
  if k and label_map != "identity":
    raise ValueError(f"config.data.most_frequent_classes={k} renumbers the kept classes, which "
                     f"label_map={label_map!r} (config.tasks.<task>.label_map) would relabel "
                     f"as if they were the original ones: use label_map='identity' with the "
                     f"subset, or most_frequent_classes=0.")


def _check_choice(field, value, allowed):
  if value not in allowed:
    raise ValueError(f"config.data.{field}={value!r}; use one of {allowed}.")


def _convert_channels(image, channels):
  """Grayscale <-> RGB, so one model input can take digits and natural images alike."""
  if image.shape[-1] == channels:
    return image
  if channels == 3:
    return tf.image.grayscale_to_rgb(image)
  return tf.image.rgb_to_grayscale(image)


def _resize_smaller_side_and_center_crop(image, size):
  """Keeps the aspect ratio of natural images; a square image is simply resized. `image` is
  [H, W, C] or a batch [B, H, W, C] of one size."""
  height, width = tf.shape(image)[-3], tf.shape(image)[-2]
  scale = size / tf.cast(tf.minimum(height, width), tf.float32)
  # Round, not ceil: 28 * (32 / 28) is 32.000002 in float32.
  resized_shape = tf.cast(tf.round(tf.cast(tf.stack([height, width]), tf.float32) * scale),
                          tf.int32)
  image = tf.image.resize(image, resized_shape, antialias=True)
  return tf.image.resize_with_crop_or_pad(image, size, size)


def crop_padding(height, width):
  """Pixels of zero padding per side for the random crop."""
  return int(max(height, width) * CROP_PADDING_FRACTION)


def _random_crop_and_flip(images, seed, flip):
  """Pads each side of every image [B, H, W, C] by `crop_padding` pixels and crops back at an
  offset of its own (a random translation); with `flip`, also mirrors about half the images
  (natural images, never digits)."""
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
  count, height, width = tf.shape(images)[0], images.shape[1], images.shape[2]
  padding = crop_padding(height, width)
  padded = tf.pad(images, [[0, 0], [padding, padding], [padding, padding], [0, 0]])
  offsets = tf.random.stateless_uniform([count, 2], crop_seed, minval=0, maxval=2 * padding + 1,
                                        dtype=tf.int32)
  rows = offsets[:, :1] + tf.range(height)[None]
  columns = offsets[:, 1:] + tf.range(width)[None]
  cropped = tf.gather(tf.gather(padded, rows, axis=1, batch_dims=1), columns, axis=2,
                      batch_dims=1)
  if not flip:
    return cropped
  mirrored = tf.random.stateless_uniform([count], flip_seed) < 0.5
  return tf.where(mirrored[:, None, None, None], tf.reverse(cropped, axis=[2]), cropped)


def _normalize(image, normalization):
  """Scales 0..255 pixels; see STANDARD_MEAN_STD for the 'standard' statistics."""
  image = image / 255.0
  if normalization == "unit":
    return image
  mean, std = STANDARD_MEAN_STD[image.shape[-1]]
  return (image - mean) / std


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
      data_config: the `config.data` ConfigDict (see `default_data_config`).
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
      self._seeds = (seed, process_index)
      self._in_memory = self._decoded_in_memory()
      self._dataset = self._training_dataset(self._in_memory)
    else:
      self._dataset = self._eval_dataset()
    self._iterator = iter(self._dataset)

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
    counts = _label_counts(self.data_config.name, self.data_config.data_dir, share)
    return int(counts[list(self.kept_classes)].sum())

  def __iter__(self):
    if not self.train:
      self._iterator = iter(self._dataset)
    return self

  def __next__(self):
    return {key: value.numpy() for key, value in next(self._iterator).items()}

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

  def _read_encoded(self, shuffle_files, seed, try_autocache):
    """This process's examples (of the kept classes, renumbered) with the image still encoded,
    labels decoded."""
    dataset = self.builder.as_dataset(
        split=self.process_split,
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

    return dataset.map(_traced(renumber)).filter(
        _traced(lambda example: example["label"] >= 0))

  def _decode_and_prepare(self, example):
    image = self.builder.info.features["image"].decode_example(example["image"])
    return _prepare_example({"image": image, "label": example["label"]}, self.data_config)

  def _decode_for_eval(self, example):
    prepared = self._decode_and_prepare(example)
    return {"image": _normalize(prepared["image"], self.data_config.normalization),
            "label": prepared["label"], "mask": tf.constant(1.0)}

  def _training_dataset(self, held):
    """The endless training batches: from `held` (images, labels) of `_decoded_in_memory`, or
    streamed and decoded example by example where it is None."""
    seed, process_index = self._seeds
    process_seed = tf.constant([seed, process_index], tf.int64)

    def augment_with_own_seed(batch_count, batch):
      batch_seed = tf.random.experimental.stateless_fold_in(process_seed, batch_count)
      images = augment_and_normalize(batch["image"], self.data_config, train=True,
                                     seed=batch_seed)
      return {"image": images, "label": batch["label"],
              "mask": tf.ones([self.batch_size], tf.float32)}

    if held is None:
      # No autocache: a cache in front of the shuffle would be written into every checkpoint.
      dataset = self._shuffled(self._read_encoded(shuffle_files=True, seed=seed,
                                                  try_autocache=False), seed)
      dataset = dataset.map(_traced(self._decode_and_prepare),
                            num_parallel_calls=tf.data.AUTOTUNE)
      _check_fixed_image_shape(dataset.element_spec)
      make_batch = augment_with_own_seed
    else:
      images, labels = held
      # The buffer shuffles indices into the decoded share: the same order as shuffling the
      # examples themselves, and an input checkpoint holds integers, not images.
      dataset = self._shuffled(tf.data.Dataset.range(len(labels)), seed)

      def make_batch(batch_count, indices):
        prepared = _prepare_example({"image": tf.gather(images, indices),
                                     "label": tf.gather(labels, indices)}, self.data_config)
        return augment_with_own_seed(batch_count, prepared)

    dataset = dataset.batch(self.batch_size, drop_remainder=True).enumerate()
    return dataset.map(_traced(make_batch),
                       num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

  def _shuffled(self, dataset, seed):
    # Shuffle before repeat: each epoch then sees every example of this share exactly once.
    return dataset.shuffle(self.data_config.shuffle_buffer, seed=seed,
                           reshuffle_each_iteration=True).repeat()

  def _decoded_in_memory(self):
    """(images, labels) of this process's share, decoded once, in stored order, when its images
    have one stored shape and take at most IN_MEMORY_MAX_BYTES; else None (streamed). Decoding
    every example at every epoch cost a CPU run a large share of its cores
    (docs/performance.md, input pipeline)."""
    feature = self.builder.info.features["image"]
    if any(side is None for side in feature.shape):
      return None
    decoded_bytes = self.num_examples * math.prod(feature.shape) * np.dtype(
        feature.np_dtype).itemsize
    if decoded_bytes > IN_MEMORY_MAX_BYTES:
      return None
    dataset = self._read_encoded(shuffle_files=False, seed=None, try_autocache=False)
    dataset = dataset.map(_traced(lambda example: {
        "image": feature.decode_example(example["image"]), "label": example["label"]}),
                          num_parallel_calls=tf.data.AUTOTUNE)
    parts = list(dataset.batch(DECODE_BATCH).as_numpy_iterator())
    return (tf.constant(np.concatenate([part["image"] for part in parts])),
            tf.constant(np.concatenate([part["label"] for part in parts])))

  def _eval_dataset(self):
    dataset = self._read_encoded(shuffle_files=False, seed=None, try_autocache=True)
    dataset = dataset.map(_traced(self._decode_for_eval),
                          num_parallel_calls=tf.data.AUTOTUNE)
    _check_fixed_image_shape(dataset.element_spec)
    padding = tf.data.Dataset.from_tensors(_zero_example(dataset.element_spec)).repeat()
    dataset = dataset.concatenate(padding).take(self.num_batches * self.batch_size)
    # No autotuning: its background thread sleeps longer the longer the iterator lives, and
    # replacing the iterator at the next pass waited for it to wake up (up to a minute per
    # task between two evaluations of a long run).
    options = tf.data.Options()
    options.autotune.enabled = False
    dataset = dataset.batch(self.batch_size, drop_remainder=True).prefetch(2)
    return dataset.with_options(options)


def _traced(function):
  """`function` for tf.data.Dataset.map, traced as plain Python: its branches depend on the
  config and on static shapes only, never on a tensor's value, so AutoGraph's rewriting of it
  (and of every TF and TFDS function it calls) would change nothing and cost ~2 s per run."""
  return tf.autograph.experimental.do_not_convert(function)


def _check_fixed_image_shape(element_spec):
  """Batching needs one image shape; natural images of varied sizes need a resize."""
  if not element_spec["image"].shape.is_fully_defined():
    raise ValueError(
        f"Batches need one image shape, but the images are {element_spec['image'].shape}: "
        "set config.data.image_size.")


def _zero_example(element_spec):
  """An all-zero example (mask 0) shaped like the real ones, to pad eval batches with."""
  return {key: tf.zeros(spec.shape, spec.dtype) for key, spec in element_spec.items()}
