"""The one input path: a TFDS dataset (embedded or real) -> per-process batches of numpy arrays.

Every experiment, from the embedded digits on a laptop to ImageNet on a pod, reads data through
`get_builder` + `DataStream`, so multi-host sharding, padding of eval batches and checkpointing of
the input position are written (and tested) once.

Why it is built the way it is:
- Each process reads only its own share of a split (`tfds.even_splits`). Process index and count
  are arguments, not `jax.process_index()`, so tests can simulate several hosts and this package
  never needs to import JAX.
- Images stay PNG/JPEG-encoded until after the shuffle buffer: a buffer of encoded images is
  small in memory and in input checkpoints.
- Random augmentation uses stateless ops seeded by (seed, process, example counter). That keeps
  the stream reproducible and lets `tf.train.Checkpoint` save the iterator: stateful random ops
  and `from_generator` pipelines cannot be checkpointed.
- Eval batches are padded, never dropped, and every process yields the same number of them, so
  metrics count each example exactly once and no host waits for another in a collective.
"""
import math

import ml_collections
from ml_collections import config_dict
import tensorflow as tf
import tensorflow_datasets as tfds

from compmod_jax.data import embedded_digits

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
  """Returns the `config.data` fields with defaults for the embedded MNIST domain.

  Fields:
    name: TFDS name, e.g. 'embedded_digits/mnist_blur', 'cifar100', 'mnist_corrupted/shear'.
    data_dir: TFDS data_dir (None: TFDS's default, ~/tensorflow_datasets or $TFDS_DATA_DIR).
    download: allow TFDS to download and prepare a missing real dataset (needs network).
    train_split, eval_split: TFDS split strings, e.g. 'train[:90%]'.
    image_size: side of the square output image; None keeps the stored size.
    channels: 1 or 3; grayscale and RGB are converted into each other as needed.
    normalization: 'unit' -> [0, 1]; 'standard' -> (x / 255 - mean) / std (STANDARD_MEAN_STD).
    augment: 'none', 'crop' (random translation: pad by 1/8 and crop back; for digits) or
        'crop_flip' (also random horizontal flips; for natural images). Training only.
    shuffle_buffer: examples in the training shuffle buffer.
  """
  return ml_collections.ConfigDict({
      "name": "embedded_digits/mnist",
      "data_dir": config_dict.placeholder(str),
      "download": False,
      "train_split": "train",
      "eval_split": "test",
      "image_size": config_dict.placeholder(int),
      "channels": 1,
      "normalization": "unit",
      "augment": "none",
      "shuffle_buffer": 10_000,
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
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError as error:
    raise DatasetNotFoundError(
        f"'{name}' is not a TFDS dataset. Use a TFDS name such as 'cifar100' or "
        f"'mnist_corrupted/shear', or 'embedded_digits/<config>' with a config in "
        f"{[config.name for config in embedded_digits.EmbeddedDigits.BUILDER_CONFIGS]}.") from error
  preparable = download or builder.name == embedded_digits.EmbeddedDigits.name
  if not (preparable or builder.is_prepared()):
    raise DatasetNotFoundError(_not_prepared_message(builder, name, data_dir))
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


def num_classes(builder, label_map="identity"):
  """Number of classes of the builder's `label` feature after `label_map`."""
  _check_choice("label_map", label_map, tuple(LABEL_MAPS))
  return LABEL_MAPS[label_map][0] or builder.info.features["label"].num_classes


def dataset_size(builder, split):
  """Number of examples in `split`, which may be sliced ('train[:10%]') or an even split."""
  return builder.info.splits[split].num_examples


def preprocess_example(example, data_config, *, train, seed=None):
  """Maps a decoded {'image': uint8 [H, W, C], 'label'} to {'image': float32, 'label': int32}.

  `seed` (int [2]) drives the training augmentation with stateless ops; eval is deterministic.
  """
  check_data_config(data_config)
  image = _convert_channels(tf.cast(example["image"], tf.float32), data_config.channels)
  if data_config.image_size:
    image = _resize_smaller_side_and_center_crop(image, data_config.image_size)
  if train and data_config.augment != "none":
    image = _random_crop_and_flip(image, seed, flip=data_config.augment == "crop_flip")
  relabel = LABEL_MAPS[data_config.get("label_map", "identity")][1]
  return {
      "image": _normalize(image, data_config.normalization),
      "label": relabel(tf.cast(example["label"], tf.int32)),
  }


def check_data_config(data_config):
  """Fails on config values that would otherwise be silently ignored."""
  for field, allowed in (("normalization", NORMALIZATIONS), ("augment", AUGMENTATIONS),
                         ("channels", tuple(STANDARD_MEAN_STD))):
    _check_choice(field, data_config[field], allowed)
  _check_choice("label_map", data_config.get("label_map", "identity"), tuple(LABEL_MAPS))


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
  """Keeps the aspect ratio of natural images; a square image is simply resized."""
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  scale = size / tf.cast(tf.minimum(height, width), tf.float32)
  # Round, not ceil: 28 * (32 / 28) is 32.000002 in float32.
  resized_shape = tf.cast(tf.round(tf.cast(tf.stack([height, width]), tf.float32) * scale),
                          tf.int32)
  image = tf.image.resize(image, resized_shape, antialias=True)
  return tf.image.resize_with_crop_or_pad(image, size, size)


def _random_crop_and_flip(image, seed, flip):
  """Pads each side by CROP_PADDING_FRACTION of the image and crops back at random (a random
  translation); with `flip`, also mirrors half the images (natural images, never digits)."""
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
  shape = tf.shape(image)
  padding = tf.cast(tf.cast(tf.reduce_max(shape[:2]), tf.float32) * CROP_PADDING_FRACTION, tf.int32)
  padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
  cropped = tf.image.stateless_random_crop(padded, shape, seed=crop_seed)
  cropped.set_shape(image.shape)
  if not flip:
    return cropped
  return tf.image.stateless_random_flip_left_right(cropped, seed=flip_seed)


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
    if train:
      self._dataset = self._training_dataset(seed, process_index)
    else:
      self._dataset = self._eval_dataset()
    self._iterator = iter(self._dataset)

  @property
  def num_examples(self):
    """Examples in this process's share of the split."""
    return dataset_size(self.builder, self.process_split)

  @property
  def num_batches(self):
    """Eval: batches per pass, equal on all processes. Train: full batches per epoch here."""
    if self.train:
      return self.num_examples // self.batch_size
    largest_share = max(dataset_size(self.builder, share) for share in self._process_splits)
    return math.ceil(largest_share / self.batch_size)

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
    tf.train.Checkpoint(iterator=self._iterator).read(path_prefix).assert_consumed()

  def _read_encoded(self, shuffle_files, seed, try_autocache):
    """This process's examples with the image still encoded, labels decoded."""
    return self.builder.as_dataset(
        split=self.process_split,
        shuffle_files=shuffle_files,
        decoders={"image": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(shuffle_seed=seed, try_autocache=try_autocache),
    )

  def _decode_and_preprocess(self, example, train, seed=None):
    image = self.builder.info.features["image"].decode_example(example["image"])
    decoded = {"image": image, "label": example["label"]}
    processed = preprocess_example(decoded, self.data_config, train=train, seed=seed)
    return {**processed, "mask": tf.constant(1.0)}

  def _training_dataset(self, seed, process_index):
    # No autocache: a cache in front of the shuffle would be written into every checkpoint.
    dataset = self._read_encoded(shuffle_files=True, seed=seed, try_autocache=False)
    # Shuffle before repeat: each epoch then sees every example of this share exactly once.
    dataset = dataset.shuffle(self.data_config.shuffle_buffer,
                              seed=seed,
                              reshuffle_each_iteration=True).repeat()
    process_seed = tf.constant([seed, process_index], tf.int64)

    def preprocess_with_own_seed(example_count, example):
      example_seed = tf.random.experimental.stateless_fold_in(process_seed, example_count)
      return self._decode_and_preprocess(example, train=True, seed=example_seed)

    dataset = dataset.enumerate().map(preprocess_with_own_seed, num_parallel_calls=tf.data.AUTOTUNE)
    _check_fixed_image_shape(dataset.element_spec)
    return dataset.batch(self.batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

  def _eval_dataset(self):
    dataset = self._read_encoded(shuffle_files=False, seed=None, try_autocache=True)
    dataset = dataset.map(lambda example: self._decode_and_preprocess(example, train=False),
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


def _check_fixed_image_shape(element_spec):
  """Batching needs one image shape; natural images of varied sizes need a resize."""
  if not element_spec["image"].shape.is_fully_defined():
    raise ValueError(
        f"Batches need one image shape, but the images are {element_spec['image'].shape}: "
        "set config.data.image_size.")


def _zero_example(element_spec):
  """An all-zero example (mask 0) shaped like the real ones, to pad eval batches with."""
  return {key: tf.zeros(spec.shape, spec.dtype) for key, spec in element_spec.items()}
