"""`config.data`: its fields, their defaults and the one check of their values (called by
the trainer's validation before anything is read)."""
import ml_collections
from ml_collections import config_dict
import tensorflow_datasets as tfds

from compmod_jax.data import image_folder
from compmod_jax.data.classes import LABEL_MAPS
from compmod_jax.data.preprocess import STANDARD_MEAN_STD

NORMALIZATIONS = ("unit", "standard")
AUGMENTATIONS = ("none", "crop", "crop_flip")


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
