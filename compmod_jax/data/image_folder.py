"""Your own images as a dataset: a folder of class sub-folders per split, e.g. FGVC-Aircraft or
Office-Caltech10 (paper Tables 2, 3, 11), which are not in the TFDS catalog.

    <folder>/<split>/<class>/<image>.jpg|.jpeg|.png     e.g. aircraft/all/A320/0001.jpg

A task names it as `folder:<folder>` (a local path or gs://...). The first run prepares it into
the data_dir like any TFDS dataset (`<data_dir>/image_folder/<name>_<fingerprint>/1.0.0`), so it
takes the same input path as TFDS data: per-process shares, split slicing such as
`all[:80%]`, a shuffle and a position that checkpoints. tfds.folder_dataset.ImageFolder reads the
files directly instead, but supports neither slicing nor even splits.

Class names are the sub-folder names, sorted, and every split must have the same classes (a
class missing from one split would silently shift the labels of the others). The fingerprint
covers every file's path and size: a folder that changes is prepared again under a new name,
never read stale.
"""
import functools
import hashlib
import os
import re

import tensorflow as tf
import tensorflow_datasets as tfds

PREFIX = "folder:"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class ImageFolderError(ValueError):
  """A folder that cannot be a dataset (missing, no images, classes that differ by split)."""


def is_folder_name(name):
  return name.startswith(PREFIX)


def scan(folder):
  """{split: [(image path, class name)]} sorted, and the sorted class names; raises
  ImageFolderError naming what to change. Lists files only, reads no image."""
  if not tf.io.gfile.isdir(folder):
    raise ImageFolderError(f"Image folder {folder!r} does not exist (or is not a folder).")
  splits = {}
  for split in sorted(_subfolders(folder)):
    split_dir = os.path.join(folder, split)
    splits[split] = {name: sorted(_images(os.path.join(split_dir, name)))
                     for name in _subfolders(split_dir)}
  layout = f"expected {folder}/<split>/<class>/<image>{'|'.join(IMAGE_SUFFIXES)}"
  if not splits:
    raise ImageFolderError(f"Image folder {folder!r} has no split folders; {layout}.")
  for split, classes in splits.items():
    if not sum(map(len, classes.values())):
      raise ImageFolderError(f"Split folder {folder}/{split} holds no images; {layout}.")
  names = {split: set(classes) for split, classes in splits.items()}
  first = min(names)
  for split in names:
    if names[split] != names[first]:
      raise ImageFolderError(
          f"The class folders of {folder} differ between splits: '{first}' has "
          f"{sorted(names[first] - names[split])} that '{split}' lacks and '{split}' has "
          f"{sorted(names[split] - names[first])} that '{first}' lacks; every split needs the "
          "same class folders (an empty one is fine).")
  examples = {split: [(path, name) for name in sorted(classes) for path in classes[name]]
              for split, classes in splits.items()}
  return examples, sorted(names[first])


@functools.lru_cache(maxsize=None)
def listing(folder):
  """scan(folder) and its fingerprint, once per process: listing a large folder (on GCS, say)
  takes a while, and every check and stream of a run builds the builder again (a builder made
  before another process prepared the dataset would not see its splits)."""
  examples, classes = scan(folder)
  return examples, classes, _fingerprint(examples)


def _subfolders(path):
  return [entry.rstrip("/") for entry in tf.io.gfile.listdir(path)
          if tf.io.gfile.isdir(os.path.join(path, entry))]


def _images(path):
  return [os.path.join(path, entry) for entry in tf.io.gfile.listdir(path)
          if entry.lower().endswith(IMAGE_SUFFIXES)]


def _fingerprint(examples):
  digest = hashlib.sha256()
  for split, items in sorted(examples.items()):
    for path, name in items:
      digest.update(f"{split}/{name}/{os.path.basename(path)}:"
                    f"{tf.io.gfile.stat(path).length}\n".encode())
  return digest.hexdigest()[:12]


class ImageFolderDataset(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A TFDS builder over one image folder (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  name = "image_folder"

  def __init__(self, folder, *, data_dir=None):
    self.folder = folder.rstrip("/")
    self._examples, self._classes, fingerprint = listing(self.folder)
    slug = re.sub(r"[^a-z0-9_]+", "_", os.path.basename(self.folder).lower()).strip("_")
    config = tfds.core.BuilderConfig(name=f"{slug or 'images'}_{fingerprint}",
                                     description=f"Images of {self.folder}")
    super().__init__(config=config, data_dir=data_dir)

  @property
  def split_names(self):
    """The folder's splits, known from its listing before it is prepared."""
    return tuple(sorted(self._examples))

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"Image classification folder {self.folder}.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=self._classes),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the images are already here
    return {split: self._generate_examples(items) for split, items in self._examples.items()}

  def _generate_examples(self, items):
    for path, name in items:
      # The path within the folder is a unique key; TFDS shuffles examples by its hash.
      key = os.path.relpath(path, self.folder)
      yield key, {"image": _checked_bytes(path), "label": name}


def _checked_bytes(path):
  """The file's bytes, stored as they are (re-encoding photos as PNG would triple the data),
  once they are known to decode: a broken file fails here, naming it, not hours into a run.
  Grayscale files are fine: the feature decodes every image to 3 channels."""
  encoded = tf.io.read_file(path)
  try:
    tf.io.decode_image(encoded, channels=3, expand_animations=False)
  except tf.errors.InvalidArgumentError as error:
    raise ImageFolderError(f"{path} is not a readable JPEG or PNG image ({error.message}); "
                           "remove or replace it.") from None
  return encoded.numpy()
