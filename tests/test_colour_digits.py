"""The colour digit domains (data/colour_digits.py): MNIST-M and the synthetic digits, as the
embedded_digits builder stores them, and the five-domain config that mixes them with grayscale
MNIST domains."""
import hashlib
import json
import subprocess
import sys
import time

import numpy as np
import pytest

from compmod_jax.data import colour_digits, embedded_digits
from compmod_jax.data.streams import DataStream
from helpers import REPO, subprocess_env
from test_data import image_counts, load_split, make_data_config

COLOUR_DOMAINS = ("mnist_m", "syn_digits")
# Digest of the first DIGEST_IMAGES images each colour domain makes, computed in a process.
DIGEST_IMAGES = 60
DIGEST_SCRIPT = f"""
import hashlib
import numpy as np
from compmod_jax.data import colour_digits, embedded_digits
digits, labels = embedded_digits.load_mnist_source()
test_mask = np.zeros(len(labels), bool)
test_mask[embedded_digits.stratified_split(labels)[1]] = True
mnist_m = colour_digits.blend_mnist_m(digits[:{DIGEST_IMAGES}], test_mask[:{DIGEST_IMAGES}])
syn, _ = colour_digits.syn_digits(range({DIGEST_IMAGES}))
print(hashlib.sha256(mnist_m.tobytes()).hexdigest(), hashlib.sha256(syn.tobytes()).hexdigest())
"""


def builder_config(name):
  return next(config for config in embedded_digits.EmbeddedDigits.BUILDER_CONFIGS
              if config.name == name)


@pytest.fixture(scope="module")
def colour_domains():
  """{name: (images, labels, test mask, CPU seconds to make them)} of each colour domain."""
  domains = {}
  for name in COLOUR_DOMAINS:
    start = time.process_time()  # CPU time: a busy machine (xdist workers) does not inflate it
    images, labels, test_mask = embedded_digits.load_domain(builder_config(name))
    domains[name] = images, labels, test_mask, time.process_time() - start
  return domains


def test_each_colour_domain_is_the_same_in_two_processes():
  """Every random choice is seeded by (domain, index): no hash seed, order or machine state
  enters. Two fresh processes with different hash seeds make the same first images."""
  digests = {
      subprocess.run([sys.executable, "-c", DIGEST_SCRIPT], cwd=REPO, check=True, text=True,
                     capture_output=True, env=subprocess_env(PYTHONHASHSEED=str(seed))).stdout
      for seed in (1, 2)
  }
  assert len(digests) == 1
  mnist_m_digest, syn_digest = digests.pop().split()
  digits, labels = embedded_digits.load_mnist_source()
  _, test_indices = embedded_digits.stratified_split(labels)
  # Made here in another order, from the last image back: the same images.
  order = range(DIGEST_IMAGES - 1, -1, -1)
  mnist_m = np.stack([colour_digits.mnist_m_image(digits[index], index, index in test_indices)
                      for index in order])[::-1]
  assert hashlib.sha256(mnist_m.tobytes()).hexdigest() == mnist_m_digest
  syn = np.stack([colour_digits.render_syn_digit(index, index % 10) for index in order])[::-1]
  assert hashlib.sha256(syn.tobytes()).hexdigest() == syn_digest


def test_colour_domains_build_in_seconds(colour_domains):
  # Measured on the 2-core VM: about 4 CPU seconds for mnist_m, 7 for syn_digits; the bound
  # catches, e.g., fonts loaded per image (about 25 s more).
  for name, (_, _, _, seconds) in colour_domains.items():
    assert seconds < 20, (name, seconds)


@pytest.mark.parametrize("name", COLOUR_DOMAINS)
def test_stored_colour_splits_are_balanced_rgb_uint8(embedded_dir, name):
  for split, per_class in (("train", 400), ("test", 100)):
    images, labels = load_split(embedded_dir, name, split)
    assert images.shape == (10 * per_class, 28, 28, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [per_class] * 10)
    pixels = images.reshape(-1, 3).astype(np.float64)
    # Colour, not gray: the channels of most pixels differ (a gray image has spread 0).
    spread = pixels.max(1) - pixels.min(1)
    assert np.median(spread) > 20, name
    assert 70 < pixels.mean() < 190 and pixels.std() > 50, name
    # No blank image: every one has contrast (its digit on its background).
    assert images.reshape(len(images), -1).std(1).min() > 10, name


def test_mnist_m_is_each_digit_blended_into_a_photo_crop_per_channel(embedded_dir,
                                                                     colour_domains):
  """MNIST-M's definition, |photo - digit| per channel: where the MNIST digit is black the
  pixel is the photo, where it is white the photo's complement; labels and order are MNIST's."""
  images, labels, test_mask, _ = colour_domains["mnist_m"]
  digits, mnist_labels = embedded_digits.load_mnist_source()
  np.testing.assert_array_equal(labels, mnist_labels)
  for index in (0, 1, 2501, 4999):
    photo = colour_digits.crop_pixels(colour_digits.mnist_m_crop(index, test_mask[index]))
    black, white = digits[index] == 0, digits[index] == 255
    assert black.any() and white.any()
    np.testing.assert_array_equal(images[index][black], colour_digits.to_uint8(photo[black]))
    np.testing.assert_array_equal(images[index][white],
                                  colour_digits.to_uint8(255 - photo[white]))
  for split in ("train", "test"):
    _, stored_labels = load_split(embedded_dir, "mnist_m", split)
    _, mnist_stored_labels = load_split(embedded_dir, "mnist", split)
    np.testing.assert_array_equal(stored_labels, mnist_stored_labels)  # the same keys


def test_mnist_m_train_and_test_share_no_digit_and_no_background_pixel(embedded_dir,
                                                                       colour_domains):
  images, _, test_mask, _ = colour_domains["mnist_m"]
  _, test_indices = embedded_digits.stratified_split(embedded_digits.load_mnist_source()[1])
  np.testing.assert_array_equal(np.flatnonzero(test_mask), test_indices)  # MNIST's split
  photos = colour_digits.load_photos()
  for test in (False, True):
    indices = np.flatnonzero(test_mask == test)
    crops = [colour_digits.mnist_m_crop(index, test) for index in indices]
    for crop in crops:
      height, width, _ = photos[crop.photo].shape
      boundary = colour_digits.first_test_column(width)
      assert crop.top + crop.side <= height
      if test:
        assert boundary <= crop.left and crop.left + crop.side <= width
      else:
        assert 0 <= crop.left and crop.left + crop.side <= boundary
    assert {crop.photo for crop in crops} == set(range(len(photos)))
    # What the builder stored is exactly these crops' images.
    stored, _ = load_split(embedded_dir, "mnist_m", "test" if test else "train")
    assert image_counts(stored) == image_counts(images[indices])


def test_syn_digits_train_and_test_come_from_disjoint_seeds(embedded_dir, colour_domains):
  images, labels, test_mask, _ = colour_domains["syn_digits"]
  seeds = {split: set(np.flatnonzero(test_mask == (split == "test"))) for split in
           ("train", "test")}
  assert seeds["train"] == set(range(4000)) and seeds["test"] == set(range(4000, 5000))
  np.testing.assert_array_equal(labels, np.arange(5000) % 10)
  for split, split_seeds in seeds.items():
    stored, _ = load_split(embedded_dir, "syn_digits", split)
    assert image_counts(stored) == image_counts(images[sorted(split_seeds)])
  assert not image_counts(images[:4000]) & image_counts(images[4000:])


def test_every_font_draws_ten_different_digits():
  """A font without digits would draw its missing-glyph box for each: ten equal masks."""
  for font in colour_digits.SYN_FONTS:
    masks = colour_digits.glyph_masks(font)
    assert len(masks) == 10
    heights = [mask.shape[0] for mask in masks]
    assert min(heights) > 0.45 * colour_digits.GLYPH_PIXELS, font
    for first in range(10):
      for second in range(first + 1, 10):
        assert (masks[first].shape != masks[second].shape or
                np.abs(masks[first] - masks[second]).mean() > 0.05), (font, first, second)


def test_syn_digits_vary_colour_and_show_cut_neighbours(colour_domains):
  """Each image draws its own colours and neighbours: the same digit differs from image to
  image, and many images show pieces of other digits at their edges, where the centre digit
  (at most 22 px tall and jittered by 2.5 px) never reaches."""
  images, labels, _, _ = colour_domains["syn_digits"]
  sevens = images[labels == 7].astype(np.float64)
  assert np.abs(sevens[1:] - sevens[:-1]).mean() > 40
  edges = np.array([np.concatenate([coverage[:, :2], coverage[:, -2:]], axis=1).max()
                    for coverage in (colour_digits.syn_digit_coverage(index, index % 10)
                                     for index in range(300))])
  # Each side has a neighbour with odds 0.6, so most images have one; a wide gap or a narrow
  # neighbour may stay off the canvas.
  assert 0.4 < (edges > 0.5).mean() < 0.95


def test_grayscale_domains_enter_a_colour_config_as_three_equal_channels(embedded_dir):
  for name, gray in (("mnist", True), ("mnist_m", False)):
    config = make_data_config(embedded_dir, name=f"embedded_digits/{name}", channels=3)
    batch = next(iter(DataStream(config, batch_size=16, train=False)))
    assert batch["image"].shape == (16, 28, 28, 3)
    channels_equal = np.all(batch["image"] == batch["image"][..., :1])
    assert channels_equal == gray, name


@pytest.mark.slow
def test_the_five_domain_config_trains_a_tiny_model_on_gray_and_colour_domains(
    embedded_dir, tmp_path):
  from compmod_jax.train import loop
  from configs import digits_five

  config = digits_five.get_config("tiny=1")
  config.data.data_dir = str(embedded_dir)
  config.data.eval_split = "test[:64]"
  loop.train_and_evaluate(config, str(tmp_path))
  results = json.loads((tmp_path / "results.json").read_text())
  assert set(results["tasks"]) == set(digits_five.SOURCES)
  for task in digits_five.SOURCES:
    assert results["tasks"][task]["test_examples"] == 64
    assert 0 <= results["tasks"][task]["test_accuracy"] <= 1
  assert results["step"] == config.total_steps
