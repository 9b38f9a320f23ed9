"""Tests of the input pipeline: the embedded digit builder and DataStream, all offline."""
import collections

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from compmod_jax.data import classes, embedded_digits, streams
from compmod_jax.data.classes import kept_classes, num_classes
from compmod_jax.data.datasets import DatasetNotFoundError, dataset_size, get_builder
from compmod_jax.data.fields import check_data_config, default_data_config
from compmod_jax.data.preprocess import augment_and_normalize, crop_padding
from compmod_jax.data.streams import DataStream
from mock_tfds import labelled_mock_dataset, stored_indices, write_mock_metadata

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
  assert dataset_size(builder, "train") == 1438
  uci_config = make_data_config(embedded_dir, name="embedded_digits/uci_digits")
  assert num_classes(builder, uci_config) == 10


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


def first_epochs(config, batch_size, process_count):
  """Each process's first epoch of training batches (images, labels), concatenated."""
  epochs = []
  for process_index in range(process_count):
    stream = DataStream(config, batch_size=batch_size, train=True, seed=3,
                        process_index=process_index, process_count=process_count)
    batches = [next(stream) for _ in range(4000 // (batch_size * process_count))]
    epochs.append(tuple(np.concatenate([batch[key] for batch in batches])
                        for key in ("image", "label")))
  return epochs


def test_two_processes_train_on_the_rows_of_one_process_s_batches(embedded_dir, embedded_splits):
  """A split held in memory: process i's batch of 50 is rows 50i..50i+49 of the batch of 100
  that one process reads, augmentation included, so every layout trains on the same data."""
  config = make_data_config(embedded_dir, shuffle_buffer=500, augment="crop")
  (alone_images, alone_labels), = first_epochs(config, 100, 1)
  halves = first_epochs(config, 50, 2)
  for process_index, (images, labels) in enumerate(halves):
    rows = (np.arange(len(labels)) // 50) * 100 + np.arange(len(labels)) % 50 + 50 * process_index
    np.testing.assert_array_equal(images, alone_images[rows])
    np.testing.assert_array_equal(labels, alone_labels[rows])
  np.testing.assert_array_equal(np.bincount(alone_labels), np.bincount(
      embedded_splits["mnist", "train"][1]))  # an epoch is the split, shuffled


def test_two_processes_stream_disjoint_shares_of_a_large_split(embedded_dir, embedded_splits,
                                                               monkeypatch):
  """A split too large to hold: each process reads its own half, shuffled with its own seed."""
  monkeypatch.setattr(streams, "IN_MEMORY_MAX_BYTES", 0)
  config = make_data_config(embedded_dir, shuffle_buffer=500)
  epochs = first_epochs(config, 50, 2)
  seen_images = [to_uint8_pixels(images) for images, _ in epochs]
  stored_images, stored_labels = embedded_splits["mnist", "train"]
  assert not image_counts(seen_images[0]) & image_counts(seen_images[1])
  assert image_counts(np.concatenate(seen_images)) == image_counts(stored_images)
  np.testing.assert_array_equal(np.bincount(np.concatenate([labels for _, labels in epochs])),
                                np.bincount(stored_labels))
  assert not (seen_images[0][:100] == stored_images[:100]).all()  # Shuffled.


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


def test_a_small_split_is_decoded_once_into_memory_in_stored_order(embedded_dir, embedded_splits,
                                                                   monkeypatch):
  config = make_data_config(embedded_dir)
  stream = DataStream(config, batch_size=50, train=True, process_index=1, process_count=2)
  assert stream.same_on_every_layout
  split_bytes = 4000 * 28 * 28  # uint8 pixels: the whole split, on every process
  monkeypatch.setattr(streams, "IN_MEMORY_MAX_BYTES", split_bytes)
  images, labels = stream._decoded_in_memory("train")
  stored_images, stored_labels = embedded_splits["mnist", "train"]
  np.testing.assert_array_equal(images.numpy(), stored_images)
  np.testing.assert_array_equal(labels.numpy(), stored_labels)
  monkeypatch.setattr(streams, "IN_MEMORY_MAX_BYTES", split_bytes - 1)
  assert stream._decoded_in_memory("train") is None  # streamed


@pytest.mark.parametrize("overrides", [
    {"augment": "crop"},
    {"augment": "crop_flip", "channels": 3, "image_size": 32, "normalization": "standard"},
])
def test_training_batches_from_memory_equal_the_streamed_ones(embedded_dir, monkeypatch,
                                                              overrides):
  """Shuffling indices into the decoded share gives the batches that shuffling the encoded
  examples gives (one stored shard), epoch after epoch, and preparing whole batches (channels,
  resize) gives what preparing each example gave."""
  config = make_data_config(embedded_dir, train_split="train[:300]", shuffle_buffer=120,
                            **overrides)
  in_memory = DataStream(config, batch_size=64, train=True, seed=5)
  monkeypatch.setattr(streams, "IN_MEMORY_MAX_BYTES", 0)
  streamed = DataStream(config, batch_size=64, train=True, seed=5)
  for _ in range(10):  # two reshuffled epochs
    expected, batch = next(streamed), next(in_memory)
    for key in ("image", "label", "mask"):
      np.testing.assert_array_equal(batch[key], expected[key])


def test_no_stream_autotunes(embedded_dir):
  """tf.data's autotuning thread sleeps longer the longer an iterator lives, and destroying the
  iterator waits for it: with it, a training stream of the embedded MNIST that lived 90 s held
  its process's exit for 50 s (streams._without_autotuning), and an eval pass up to a minute."""
  config = make_data_config(embedded_dir, train_split="train[:300]")
  for train in (True, False):
    stream = DataStream(config, batch_size=64, train=train, seed=5)
    assert stream._dataset.options().autotune.enabled is False, train


def test_a_position_saved_by_the_streamed_pipeline_resumes_in_it(embedded_dir, tmp_path,
                                                                  monkeypatch):
  """Runs checkpointed before small shares were held in memory resume where they stopped."""
  config = make_data_config(embedded_dir, train_split="train[:300]", shuffle_buffer=120,
                            augment="crop")
  with monkeypatch.context() as patch:
    patch.setattr(streams, "IN_MEMORY_MAX_BYTES", 0)
    streamed = DataStream(config, batch_size=64, train=True, seed=5)
    for _ in range(3):
      next(streamed)
    path = streamed.save(str(tmp_path / "position"))
    expected = [next(streamed) for _ in range(5)]
  resumed = DataStream(config, batch_size=64, train=True, seed=5)
  resumed.restore(path)
  for expected_batch in expected:
    np.testing.assert_array_equal(next(resumed)["image"], expected_batch["image"])


def test_grayscale_digits_as_rgb_resized_and_standardised(embedded_dir):
  config = make_data_config(embedded_dir, channels=3, image_size=32, normalization="standard")
  batch = next(DataStream(config, batch_size=8, train=False))
  assert batch["image"].shape == (8, 32, 32, 3)
  # The same gray value in each channel, standardised with each channel's ImageNet statistics.
  unit_pixels = batch["image"] * np.array([0.229, 0.224, 0.225]) + np.array([0.485, 0.456, 0.406])
  np.testing.assert_allclose(unit_pixels[..., 0], unit_pixels[..., 2], atol=1e-5)
  assert unit_pixels.min() > -1e-5 and unit_pixels.max() < 1 + 1e-5


@pytest.mark.parametrize("field, value", [("augment", "mixup"), ("normalization", "imagenet"),
                                          ("channels", 2), ("shuffle_buffer", 0),
                                          ("image_size", -1), ("train_split", "train[:5%")])
def test_invalid_config_value_names_the_field(embedded_dir, field, value):
  with pytest.raises(ValueError, match=rf"config\.data\.{field}"):
    check_data_config(make_data_config(embedded_dir, **{field: value}))


def test_missing_real_dataset_fails_without_downloading_with_instructions(tmp_path,
                                                                          monkeypatch):
  empty_dir = tmp_path / "empty"

  def download(*args, **kwargs):
    raise AssertionError("a download started")
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", download)
  with pytest.raises(DatasetNotFoundError) as error:
    DataStream(make_data_config(empty_dir, name="cifar100"), batch_size=8, train=True)
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
  write_mock_metadata("cifar100", str(tmp_path), 64)  # the split sizes a prepared dataset has
  with tfds.testing.mock_data(num_examples=64, data_dir=str(tmp_path)):
    yield make_data_config(tmp_path, name="cifar100", channels=3, normalization="standard",
                           image_size=None)  # the stored 32x32


def test_cifar100_batches_from_mock_data(mocked_cifar100):
  plain_stream = DataStream(mocked_cifar100, batch_size=16, train=True, seed=0)
  assert num_classes(plain_stream.builder, mocked_cifar100) == 100
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


# Class counts of two mocked DomainNet domains (345 classes each). Summed: 300: 18, 7: 15,
# 100: 12, then 2, 9 and 50 tie at 9, so the top 5 take 2 and 9 (smaller ids) and drop 50.
DOMAIN_CLASS_COUNTS = {
    "domainnet/sketch": {7: 15, 300: 9, 2: 6, 50: 6, 11: 3},
    "domainnet/real": {100: 12, 300: 9, 9: 9, 2: 3, 50: 3, 12: 3},
}
TOP_5_OF_BOTH = (2, 7, 9, 100, 300)


def shuffled_labels(class_counts, seed):
  labels = np.repeat(list(class_counts), list(class_counts.values()))
  return np.random.default_rng(seed).permutation(labels)


@pytest.fixture
def mocked_domainnet(tmp_path):
  """{domain dataset: stored labels (train and test alike)} under TFDS mock data, and the data
  config of the sketch task keeping the 5 classes most frequent over both domains."""
  labels = {name: shuffled_labels(counts, seed)
            for seed, (name, counts) in enumerate(DOMAIN_CLASS_COUNTS.items())}
  for name, domain_labels in labels.items():
    write_mock_metadata(name, str(tmp_path), len(domain_labels))
  with tfds.testing.mock_data(as_dataset_fn=labelled_mock_dataset(labels),
                              policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(tmp_path)):
    yield labels, make_data_config(tmp_path, name="domainnet/sketch", channels=3, image_size=4,
                                   most_frequent_classes=5,
                                   class_frequency_datasets=tuple(DOMAIN_CLASS_COUNTS))


def renumbered(original_labels):
  """Kept labels 2, 7, 9, 100, 300 -> 0..4, in the order of the original ids."""
  return np.searchsorted(TOP_5_OF_BOTH, original_labels)


def test_most_frequent_classes_rank_summed_counts_and_are_the_same_for_every_domain(
    mocked_domainnet):
  _, config = mocked_domainnet
  for name in DOMAIN_CLASS_COUNTS:
    config.name = name
    builder = get_builder(name, config.data_dir)
    assert kept_classes(builder, config) == TOP_5_OF_BOTH
    assert num_classes(builder, config) == 5
  # () ranks by the task's own dataset: ties at 1 example keep 2 and 12, not 50.
  config.class_frequency_datasets = ()
  assert kept_classes(builder, config) == (2, 9, 12, 100, 300)
  config.most_frequent_classes = 0
  assert kept_classes(builder, config) is None and num_classes(builder, config) == 345


def test_eval_over_two_processes_yields_each_kept_example_once_renumbered(mocked_domainnet):
  labels, config = mocked_domainnet
  sketch_labels = labels["domainnet/sketch"]
  kept_indices = np.flatnonzero(np.isin(sketch_labels, TOP_5_OF_BOTH))
  assert len(kept_indices) == 30  # 7, 300 and 2 of sketch; 9 and 100 occur in real only.
  streams = [DataStream(config, batch_size=4, train=False, process_index=index, process_count=2)
             for index in range(2)]
  # tfds.even_splits gives the processes 20 and 19 stored examples, of which these are kept:
  assert [np.isin(share, TOP_5_OF_BOTH).sum() for share in np.split(sketch_labels, [20])] == [
      stream.num_examples for stream in streams] == [17, 13]
  seen_indices = []
  for stream in streams:
    batches = list(stream)
    assert len(batches) == stream.num_batches == 5  # ceil(17 / 4) on both, though 13 needs 4.
    mask = np.concatenate([batch["mask"] for batch in batches])
    assert mask.sum() == stream.num_examples and np.all(mask[:stream.num_examples] == 1)
    images = np.concatenate([batch["image"] for batch in batches])[mask == 1]
    indices = stored_indices(images)
    np.testing.assert_array_equal(  # Renumbered, each image with its own label.
        np.concatenate([batch["label"] for batch in batches])[mask == 1],
        renumbered(sketch_labels[indices]))
    seen_indices.append(indices)
  np.testing.assert_array_equal(np.sort(np.concatenate(seen_indices)), kept_indices)
  counted = classes.label_counts.cache_info().misses
  DataStream(config, batch_size=4, train=False, process_index=1, process_count=2)
  assert classes.label_counts.cache_info().misses == counted  # Labels counted once.


def test_training_stream_yields_only_kept_classes_and_resumes(mocked_domainnet, tmp_path):
  labels, config = mocked_domainnet
  config.update(name="domainnet/real", shuffle_buffer=64)
  real_labels = labels["domainnet/real"]
  stream = DataStream(config, batch_size=8, train=True, seed=1)
  assert stream.num_examples == np.isin(real_labels, TOP_5_OF_BOTH).sum() == 33
  assert stream.num_batches == 4
  batches = [next(stream) for _ in range(8)]  # Two shuffled epochs.
  original_labels = real_labels[stored_indices(np.concatenate([b["image"] for b in batches]))]
  assert np.isin(original_labels, TOP_5_OF_BOTH).all()
  batch_labels = np.concatenate([batch["label"] for batch in batches])
  np.testing.assert_array_equal(batch_labels, renumbered(original_labels))
  assert set(batch_labels) == {0, 2, 3, 4}  # 7 (new label 1) has no example in real.
  path = stream.save(str(tmp_path / "position"))
  expected = next(stream)
  resumed = DataStream(config, batch_size=8, train=True, seed=1)
  resumed.restore(path)
  np.testing.assert_array_equal(next(resumed)["image"], expected["image"])


@pytest.mark.parametrize("overrides, message", [
    ({"most_frequent_classes": -1}, r"most_frequent_classes=-1; use 0"),
    ({"most_frequent_classes": 1}, r"most_frequent_classes=1; use 0"),
    ({"class_frequency_datasets": ("domainnet/real",)}, r"class_frequency_datasets=.*is 0"),
    ({"most_frequent_classes": 5, "label_map": "parity"}, r"label_map='parity'.*'identity'"),
    ({"most_frequent_classes": 5, "class_frequency_datasets": "domainnet/real"},
     r"class_frequency_datasets='domainnet/real'; use a tuple"),
])
def test_class_subset_config_errors_without_reading_data(tmp_path, overrides, message):
  config = ml_collections.ConfigDict({**make_data_config(tmp_path).to_dict(), **overrides})
  with pytest.raises(ValueError, match=message):
    check_data_config(config)


def test_class_subset_dataset_errors_name_the_field(mocked_domainnet):
  _, config = mocked_domainnet
  builder = get_builder(config.name, config.data_dir)
  config.most_frequent_classes = 346
  with pytest.raises(ValueError, match=r"most_frequent_classes=346.*only 345 classes"):
    num_classes(builder, config)
  with pytest.raises(ValueError, match=r"most_frequent_classes=346.*only 345 classes"):
    DataStream(config, batch_size=4, train=True)
  config.most_frequent_classes = 5
  for datasets, message in (
      (("domainnet/real", "no_such_dataset"), r"class_frequency_datasets: .*not a TFDS dataset"),
      (("domainnet/real", "domainnet/clipart"), r"class_frequency_datasets: .*not prepared"),
  ):
    config.class_frequency_datasets = datasets
    with pytest.raises(DatasetNotFoundError, match=message):
      kept_classes(builder, config)
  write_mock_metadata("cifar100", config.data_dir, 8)
  config.class_frequency_datasets = ("domainnet/real", "cifar100")
  with pytest.raises(ValueError, match=r"class_frequency_datasets names 'cifar100' with 100 "
                                       r"classes, but .*'domainnet/sketch' has 345"):
    DataStream(config, batch_size=4, train=False)


def test_training_augmentation_translates_each_image_within_the_padding_and_mirrors_some():
  """The batch-level crop is a translation of each padded image by its own offset in
  [0, 2 * padding]; crop_flip also mirrors some of them; the normalisation comes after."""
  data_config = default_data_config()
  data_config.update(augment="crop_flip", normalization="unit")
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, size=(64, 24, 20, 3)).astype(np.float32)  # no zero pixel
  augmented = augment_and_normalize(tf.constant(images), data_config, train=True,
                                    seed=tf.constant([3, 0], tf.int64)).numpy()
  padding = crop_padding(24, 20)
  assert padding == 3  # 1/8 of the longer side
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  offsets, mirrored = set(), 0
  for image, padded_image, result in zip(images, padded, augmented * 255.0):
    matches = [(dy, dx, mirror) for dy in range(2 * padding + 1)
               for dx in range(2 * padding + 1) for mirror in (False, True)
               if np.allclose(result[:, ::-1] if mirror else result,
                              padded_image[dy:dy + 24, dx:dx + 20], rtol=0, atol=1e-3)]
    assert len(matches) == 1, matches
    offsets.add(matches[0][:2])
    mirrored += matches[0][2]
  assert len(offsets) > 20 and 10 < mirrored < 54  # offsets of their own, about half mirrored
  data_config.augment = "none"
  np.testing.assert_allclose(augment_and_normalize(tf.constant(images), data_config, train=True),
                             images / 255.0, rtol=1e-6)
