"""TFDS builders by name: the embedded digits, real TFDS datasets and image folders, prepared
(or refused with a message that says how to prepare them) before any data is read.

The package never imports JAX: processes and devices are passed in, which keeps it usable from
tests that configure JAX's devices first.
"""
import tensorflow as tf
import tensorflow_datasets as tfds

from compmod_jax.data import embedded_digits, image_folder


def _keep_tensorflow_off_accelerators():
  """TF only feeds data here; if it grabbed the GPU/TPU memory, JAX could not have it."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF already initialised its devices; too late to change, keep going.
    pass


_keep_tensorflow_off_accelerators()


class DatasetNotFoundError(tfds.core.DatasetNotFoundError):
  """A dataset that is unknown or not prepared in the data_dir (a ValueError)."""


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


def dataset_size(builder, split):
  """Number of examples in `split`, which may be sliced ('train[:10%]') or an even split."""
  return builder.info.splits[split].num_examples


def traced(function):
  """`function` for tf.data.Dataset.map, traced as plain Python: its branches depend on the
  config and on static shapes only, never on a tensor's value, so AutoGraph's rewriting of it
  (and of every TF and TFDS function it calls) would change nothing and cost ~2 s per run."""
  return tf.autograph.experimental.do_not_convert(function)
