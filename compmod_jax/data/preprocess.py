"""From a decoded image to the model's input: channels, size and label, then (training only)
the random crop and flip, then the normalisation. Written for whole batches: tf.data spends
more on a small per-example op than the op itself costs."""
import tensorflow as tf

from compmod_jax.data.classes import LABEL_MAPS

# 'standard' statistics: ImageNet's for RGB (what models transferred from ImageNet expect); for
# grayscale digits a dataset mean would differ per domain, so map [0, 1] to [-1, 1] instead.
STANDARD_MEAN_STD = {
    1: ((0.5,), (0.5,)),
    3: ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# crop and crop_flip pad each side by this fraction of the image side (4 px at 32 px, CIFAR's
# standard; 3 px at 28 px).
CROP_PADDING_FRACTION = 1 / 8


def prepare_example(example, data_config):
  """What must happen to an example (or a batch of them) before the augmentation: the
  channels, the size, the label."""
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
  return normalize(images, data_config.normalization)


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


def normalize(image, normalization):
  """Scales 0..255 pixels; see STANDARD_MEAN_STD for the 'standard' statistics."""
  image = image / 255.0
  if normalization == "unit":
    return image
  mean, std = STANDARD_MEAN_STD[image.shape[-1]]
  return (image - mean) / std
