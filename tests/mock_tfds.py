"""Real TFDS datasets under tfds.testing.mock_data, in a form the training loop can use:
split sizes in the metadata (eval pads to them) and a checkpointable mock reader."""
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

# Stand-in side for datasets whose images have no fixed size (imagenet2012, sun397, ...).
UNKNOWN_SIDE = 40


def write_mock_metadata(name, data_dir, num_examples):
  """Dataset metadata with split sizes, as a prepared dataset has (mock_data reads it)."""
  builder = tfds.builder(name, data_dir=data_dir)
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=split, shard_lengths=[num_examples], num_bytes=0)
      for split in ("train", "test")]))
  os.makedirs(builder.data_dir, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)


def checkpointable_mock_dataset(num_examples):
  """A mock `_as_dataset` from tensor slices (mock_data's own uses from_generator, whose
  position cannot be checkpointed): random images and labels shaped like the real features."""
  def as_dataset(builder, split, decoders=None, read_config=None, **kwargs):
    del split, read_config, kwargs
    features = builder.info.features
    shape = tuple(UNKNOWN_SIDE if side is None else side for side in features["image"].shape)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (num_examples,) + shape, dtype=np.uint8)
    labels = rng.integers(0, features["label"].num_classes, num_examples)
    if decoders and "image" in decoders:
      images = [tf.io.encode_png(image).numpy() for image in images]
    return tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
  return as_dataset
