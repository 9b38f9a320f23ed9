"""Real TFDS datasets under tfds.testing.mock_data, in a form the training loop can use:
the dataset's real split names (data/catalog.py) with small sizes in the metadata (eval pads to
them), and a checkpointable mock reader."""
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from compmod_jax.data import catalog

# Stand-in side for datasets whose images have no fixed size (imagenet2012, sun397, ...).
UNKNOWN_SIDE = 40


def mock_split_names(name):
  """The real dataset's splits; train and test for one outside the catalog (the embedded
  digits')."""
  facts = catalog.facts(name)
  return tuple(sorted(facts.splits)) if facts else ("train", "test")


def write_mock_metadata(name, data_dir, num_examples):
  """Dataset metadata with `num_examples` in each of the real dataset's splits, as a prepared
  dataset has (mock_data reads it): a split the dataset lacks cannot be read."""
  builder = tfds.builder(name, data_dir=data_dir)
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=split, shard_lengths=[num_examples], num_bytes=0)
      for split in mock_split_names(name)]))
  os.makedirs(builder.data_dir, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)


def checkpointable_mock_dataset(num_examples):
  """A mock `_as_dataset` from tensor slices (mock_data's own uses from_generator, whose
  position cannot be checkpointed): random images and labels shaped like the real features;
  a split whose labels the real dataset withholds has labels -1, as there."""
  def as_dataset(builder, split, decoders=None, read_config=None, **kwargs):
    del read_config, kwargs
    features = builder.info.features
    shape = tuple(UNKNOWN_SIDE if side is None else side for side in features["image"].shape)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (num_examples,) + shape, dtype=np.uint8)
    labels = rng.integers(0, features["label"].num_classes, num_examples)
    facts = catalog.facts(builder.info.full_name.rsplit("/", 1)[0])
    if facts and str(split).split("[")[0] in facts.unlabelled_splits:
      labels = np.full(num_examples, -1)
    if decoders and "image" in decoders:
      images = [tf.io.encode_png(image).numpy() for image in images]
    return tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
  return as_dataset


def labelled_mock_dataset(labels_by_dataset, side=4):
  """A checkpointable mock `_as_dataset` with chosen labels: {dataset name ('domainnet/real'):
  labels of each split}, sliced like the requested split (process shares included). Example i
  of a split is a side x side image of the constant colour (i % 256, i // 256, 0), so a test can
  tell which stored example it got."""
  def as_dataset(builder, split, decoders=None, read_config=None, **kwargs):
    del read_config, kwargs
    labels = np.asarray(labels_by_dataset[builder.info.full_name.rsplit("/", 1)[0]])
    (instruction,) = builder.info.splits[split].file_instructions
    indices = np.arange(instruction.skip, instruction.skip + instruction.take)

    def example(index, label):
      colour = tf.cast(tf.stack([index % 256, index // 256, tf.zeros_like(index)]), tf.uint8)
      image = tf.broadcast_to(colour, (side, side, 3))
      if decoders and "image" in decoders:
        image = tf.io.encode_png(image)
      return {"image": image, "label": label}

    return tf.data.Dataset.from_tensor_slices((indices, labels[indices])).map(example)
  return as_dataset


def stored_indices(images):
  """The stored example index behind each image of `labelled_mock_dataset` (unit-scaled)."""
  pixels = np.rint(images[:, 0, 0, :2] * 255).astype(np.int64)
  return pixels[:, 0] + 256 * pixels[:, 1]
