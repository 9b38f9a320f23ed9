"""Tests of the input pipeline: the embedded digit builder and DataStream, all offline."""
import collections
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from compmod_jax.data import embedded_digits
from compmod_jax.data.pipeline import (
    DataStream,
    DatasetNotFoundError,
    dataset_size,
    default_data_config,
    get_builder,
    num_classes,
)

MNIST_CONFIGS = [
    config.name
    for config in embedded_digits.EmbeddedDigits.BUILDER_CONFIGS
    if config.source == "mnist"
]
MNIST_VARIANTS = [name for name in MNIST_CONFIGS if name != "mnist"]
UCI_TEST_PER_CLASS = [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]


def make_data_config(data_dir, **overrides):
  config = default_data_config()
  config.data_dir = str(data_dir)
  config.update(overrides)
  return config


def load_split(data_dir, config_name, split):
  """All (images, labels) of a prepared split, in stored order."""
  builder = get_builder(f"embedded_digits/{config_name}", str(data_dir))
  arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  return arrays["image"], arrays["label"]


def image_counts(images):
  """Multiset of images, to compare collections regardless of order."""
  return collections.Counter(image.tobytes() for image in images)


def to_uint8_pixels(unit_images):
  return np.rint(unit_images * 255).astype(np.uint8)


@pytest.fixture(scope="session")
def embedded_splits(embedded_dir):
  """{(config name, split): (images, labels)} of every prepared split."""
  return {
      (config.name, split): load_split(embedded_dir, config.name, split)
      for config in embedded_digits.EmbeddedDigits.BUILDER_CONFIGS for split in ("train", "test")
  }


def test_mnist_splits_are_stratified_and_partition_the_source(embedded_splits):
  source_images, _ = embedded_digits.load_mnist_source()
  for name in MNIST_CONFIGS:
    (train_images, train_labels), (test_images, test_labels) = (embedded_splits[name, "train"],
                                                                embedded_splits[name, "test"])
    assert train_images.shape == (4000, 28, 28, 1) and test_images.shape == (1000, 28, 28, 1)
    assert train_images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(train_labels, minlength=10), [400] * 10)
    np.testing.assert_array_equal(np.bincount(test_labels, minlength=10), [100] * 10)
  train_images, _ = embedded_splits["mnist", "train"]
  test_images, _ = embedded_splits["mnist", "test"]
  stored = image_counts(np.concatenate([train_images, test_images])[..., 0])
  assert stored == image_counts(source_images)


def test_uci_splits_are_stratified_80_20(embedded_splits, embedded_dir):
  (train_images, train_labels), (test_images, test_labels) = (embedded_splits["uci_digits",
                                                                              "train"],
                                                              embedded_splits["uci_digits", "test"])
  assert (len(train_labels), len(test_labels)) == (1438, 359)
  assert train_images.shape[1:] == test_images.shape[1:] == (28, 28, 1)
  np.testing.assert_array_equal(np.bincount(test_labels, minlength=10), UCI_TEST_PER_CLASS)
  _, source_labels = embedded_digits.load_uci_source()
  np.testing.assert_array_equal(
      np.bincount(train_labels, minlength=10) + UCI_TEST_PER_CLASS, np.bincount(source_labels))
  builder = get_builder("embedded_digits/uci_digits", str(embedded_dir))
  assert dataset_size(builder, "train") == 1438 and num_classes(builder) == 10


def test_mnist_variants_change_pixels_but_keep_labels_in_place(embedded_splits):
  for split in ("train", "test"):
    plain_images, plain_labels = embedded_splits["mnist", split]
    for name in MNIST_VARIANTS:
      images, labels = embedded_splits[name, split]
      np.testing.assert_array_equal(labels, plain_labels)
      changed = np.any(images != plain_images, axis=(1, 2, 3))
      assert changed.mean() > 0.95, name
      assert 0 <= labels.min() and labels.max() <= 9


def test_mnist_variants_have_their_corruption(embedded_splits):
  plain, _ = embedded_splits["mnist", "test"]
  noisy, _ = embedded_splits["mnist_shot_noise", "test"]
  assert np.all(noisy[plain == 0] == 0)  # Shot noise needs light: the background stays black.
  outline, _ = embedded_splits["mnist_boundary", "test"]
  assert set(np.unique(outline)) == {0, 255}
  assert not np.any((outline == 255) & (plain > 127))  # The outline surrounds the strokes.
  blurred, _ = embedded_splits["mnist_blur", "test"]
  assert total_variation(blurred) < 0.8 * total_variation(plain)
  for name in ("mnist_shear", "mnist_scale"):
    moved, _ = embedded_splits[name, "test"]
    moved_ink = np.mean(np.abs(moved.astype(float) - plain), axis=(1, 2, 3))
    assert np.median(moved_ink) > 10, name


def total_variation(images):
  images = images.astype(float)
  return np.abs(np.diff(images, axis=1)).mean() + np.abs(np.diff(images, axis=2)).mean()


def test_random_corruptions_prepare_identically_twice(embedded_dir, tmp_path):
  for name in ("mnist_shot_noise", "mnist_scale"):
    first_images, first_labels = load_split(embedded_dir, name, "test")
    second_images, second_labels = load_split(tmp_path, name, "test")
    np.testing.assert_array_equal(first_images, second_images)
    np.testing.assert_array_equal(first_labels, second_labels)


def test_uci_digits_are_centred_digits_of_their_class(embedded_splits):
  train_images, train_labels = embedded_splits["uci_digits", "train"]
  test_images, test_labels = embedded_splits["uci_digits", "test"]
  ink = test_images[..., 0].astype(float)
  outside_box = ink.copy()
  outside_box[:, 4:24, 4:24] = 0
  assert not outside_box.any()
  assert ink.sum(axis=(1, 2)).min() > 10 * 255  # Every image has strokes.
  rows, cols = np.mgrid[:28, :28]
  total = ink.sum(axis=(1, 2))
  centre_rows = (ink * rows).sum(axis=(1, 2)) / total
  centre_cols = (ink * cols).sum(axis=(1, 2)) / total
  assert np.all(np.abs(centre_rows - 13.5) < 4) and np.all(np.abs(centre_cols - 13.5) < 4)
  # Digits of a class resemble each other: the nearest class mean is usually right.
  class_means = np.stack([train_images[train_labels == c].mean(0) for c in range(10)])
  distances = ((test_images[:, None].astype(float) - class_means[None])**2).sum((2, 3, 4))
  assert np.mean(distances.argmin(1) == test_labels) > 0.85


def test_two_processes_train_on_disjoint_shares_covering_the_split(embedded_dir, embedded_splits):
  config = make_data_config(embedded_dir, shuffle_buffer=500)
  seen_images, seen_labels = [], []
  for process_index in range(2):
    stream = DataStream(config,
                        batch_size=50,
                        train=True,
                        seed=3,
                        process_index=process_index,
                        process_count=2)
    assert stream.num_examples == 2000 and stream.num_batches == 40
    first_epoch = [next(stream) for _ in range(stream.num_batches)]
    labels = np.concatenate([batch["label"] for batch in first_epoch])
    assert len(np.unique(labels)) == 10
    seen_labels.append(labels)
    seen_images.append(np.concatenate([batch["image"] for batch in first_epoch]))
  stored_images, stored_labels = embedded_splits["mnist", "train"]
  assert not image_counts(to_uint8_pixels(seen_images[0])) & image_counts(
      to_uint8_pixels(seen_images[1]))
  assert image_counts(to_uint8_pixels(np.concatenate(seen_images))) == image_counts(stored_images)
  np.testing.assert_array_equal(np.bincount(np.concatenate(seen_labels)),
                                np.bincount(stored_labels))
  stored_order = to_uint8_pixels(seen_images[0][:100]) == stored_images[:100]
  assert not stored_order.all()  # Shuffled.


def test_eval_stream_pads_last_batch_and_masks_exactly_the_split(embedded_dir, embedded_splits):
  config = make_data_config(embedded_dir, name="embedded_digits/uci_digits")
  stored_images, stored_labels = embedded_splits["uci_digits", "test"]
  share_sizes = (180, 179)
  offset = 0
  for process_index, share_size in enumerate(share_sizes):
    stream = DataStream(config,
                        batch_size=64,
                        train=False,
                        process_index=process_index,
                        process_count=2)
    batches = list(stream)
    assert len(batches) == stream.num_batches == 3  # Same count on both processes.
    for batch in batches:
      assert batch["image"].shape == (64, 28, 28, 1) and batch["image"].dtype == np.float32
      assert batch["label"].dtype == np.int32
    mask = np.concatenate([batch["mask"] for batch in batches])
    assert mask.sum() == share_size
    assert np.all(mask[:share_size] == 1) and np.all(mask[share_size:] == 0)
    images = np.concatenate([batch["image"] for batch in batches])
    labels = np.concatenate([batch["label"] for batch in batches])
    assert not images[share_size:].any() and not labels[share_size:].any()
    np.testing.assert_array_equal(  # In stored order.
        to_uint8_pixels(images[:share_size]), stored_images[offset:offset + share_size])
    np.testing.assert_array_equal(labels[:share_size], stored_labels[offset:offset + share_size])
    assert len(list(stream)) == 3  # Iterating again makes a new full pass.
    offset += share_size
  assert offset == len(stored_labels)


def test_restored_training_stream_continues_with_identical_batches(embedded_dir, tmp_path):
  # A 300-example split in batches of 64 crosses epoch boundaries, reshuffling and augmenting.
  config = make_data_config(embedded_dir,
                            train_split="train[:300]",
                            shuffle_buffer=100,
                            augment="crop_flip",
                            normalization="standard")
  stream = DataStream(config, batch_size=64, train=True, seed=7)
  first_batches = [next(stream) for _ in range(6)]
  checkpoint_path = stream.save(str(tmp_path / "input" / "position"))
  expected = [next(stream) for _ in range(6)]

  resumed = DataStream(config, batch_size=64, train=True, seed=7)
  resumed.restore(checkpoint_path)
  for expected_batch in expected:
    batch = next(resumed)
    for key in ("image", "label", "mask"):
      np.testing.assert_array_equal(batch[key], expected_batch[key])

  same_seed_batch = next(DataStream(config, batch_size=64, train=True, seed=7))
  np.testing.assert_array_equal(same_seed_batch["image"], first_batches[0]["image"])
  other_seed_batch = next(DataStream(config, batch_size=64, train=True, seed=8))
  assert not np.array_equal(other_seed_batch["image"], first_batches[0]["image"])


def test_grayscale_digits_as_rgb_resized_and_standardised(embedded_dir):
  config = make_data_config(embedded_dir, channels=3, image_size=32, normalization="standard")
  batch = next(DataStream(config, batch_size=8, train=False))
  assert batch["image"].shape == (8, 32, 32, 3)
  # The same gray value in each channel, standardised with each channel's ImageNet statistics.
  unit_pixels = batch["image"] * np.array([0.229, 0.224, 0.225]) + np.array([0.485, 0.456, 0.406])
  np.testing.assert_allclose(unit_pixels[..., 0], unit_pixels[..., 2], atol=1e-5)
  assert unit_pixels.min() > -1e-5 and unit_pixels.max() < 1 + 1e-5


def test_invalid_config_value_names_the_field(embedded_dir):
  with pytest.raises(ValueError, match="augment"):
    DataStream(make_data_config(embedded_dir, augment="mixup"), batch_size=8, train=True)


def test_missing_real_dataset_fails_fast_with_instructions(tmp_path):
  empty_dir = tmp_path / "empty"
  start = time.perf_counter()
  with pytest.raises(DatasetNotFoundError) as error:
    DataStream(make_data_config(empty_dir, name="cifar100"), batch_size=8, train=True)
  assert time.perf_counter() - start < 5
  assert "'cifar100'" in str(error.value) and str(empty_dir) in str(error.value)
  assert f"tfds build cifar100 --data_dir={empty_dir}" in str(error.value)
  assert isinstance(error.value, ValueError)
  assert not empty_dir.exists()  # Failing must not leave folders behind.

  with pytest.raises(DatasetNotFoundError, match="downloads/manual"):
    get_builder("imagenet2012", str(empty_dir))
  with pytest.raises(DatasetNotFoundError, match="not a TFDS dataset"):
    get_builder("no_such_dataset", str(empty_dir))


@pytest.fixture
def mocked_cifar100(monkeypatch, tmp_path):
  """cifar100 as random TFDS mock data, taken as prepared (mock_data mocks only the reads)."""
  monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda builder: True)
  with tfds.testing.mock_data(num_examples=64):
    yield make_data_config(tmp_path, name="cifar100", channels=3, normalization="standard")


def test_cifar100_batches_from_mock_data(mocked_cifar100):
  plain_stream = DataStream(mocked_cifar100, batch_size=16, train=True, seed=0)
  assert num_classes(plain_stream.builder) == 100
  plain = next(plain_stream)
  mocked_cifar100.augment = "crop_flip"
  augmented = next(DataStream(mocked_cifar100, batch_size=16, train=True, seed=0))
  for batch in (plain, augmented):
    assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32
    assert 0 <= batch["label"].min() and batch["label"].max() < 100
    np.testing.assert_array_equal(batch["mask"], np.ones(16, np.float32))
  np.testing.assert_array_equal(plain["label"], augmented["label"])
  assert not np.allclose(plain["image"], augmented["image"])

  mocked_cifar100.image_size = 24
  resized = next(DataStream(mocked_cifar100, batch_size=16, train=True, seed=0))
  assert resized["image"].shape == (16, 24, 24, 3)
