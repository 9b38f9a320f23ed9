"""Your own images as a dataset (data/image_folder.py): a folder of class folders per split
takes the TFDS input path (classes, splits, slicing, per-process shares), trains and resumes
exactly, and a bad folder gets one clear error before anything heavy starts."""
import os
import shutil

import jax
import numpy as np
import pytest
import tensorflow as tf

from compmod_jax import experiments
from compmod_jax.data import datasets, fields, image_folder, streams
from compmod_jax.train import loop
from helpers import read_checkpoint, tiny_digits

CLASSES = tuple(f"class_{c}" for c in range(10))  # the digits' 10: tiny_digits' shapes


def pixel_value(class_index, image_index):
  """Every image is one flat grey level that encodes its class and its number, so a decoded
  image tells which file it came from (and a model can learn the classes)."""
  return 20 * class_index + image_index


def write_image_folder(root, per_class, classes=CLASSES):
  """root/<split>/<class>/<i>.png|.jpg with per_class[split] images per class: flat images
  (pixel_value), in varied sizes, RGB and grayscale, PNG and JPEG."""
  for split, count in per_class.items():
    for class_index, name in enumerate(classes):
      os.makedirs(root / split / name, exist_ok=True)
      for image_index in range(count):
        side = 28 + 4 * (image_index % 3)
        channels = 1 if image_index % 2 else 3
        image = tf.fill([side, side + 2, channels],
                        np.uint8(pixel_value(class_index, image_index)))
        encoded = (tf.io.encode_png(image) if image_index % 4 < 2 else
                   tf.io.encode_jpeg(image, quality=100))
        suffix = ".png" if image_index % 4 < 2 else ".jpg"
        (root / split / name / f"{image_index}{suffix}").write_bytes(encoded.numpy())
  return root


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  return write_image_folder(tmp_path_factory.mktemp("images"), {"train": 10, "test": 2})


def folder_config(images, data_dir, **overrides):
  """configs/digits.py:tiny (grayscale, 28 px) with one task that reads the image folder."""
  config = tiny_digits(data_dir, **overrides)
  config.tasks = {"planes": experiments.task(f"folder:{images}")}
  return config


def labelled_values(stream):
  """(label, decoded grey level) of every real example a DataStream yields."""
  pairs = []
  for batch in stream:
    for image, label, mask in zip(batch["image"], batch["label"], batch["mask"]):
      if mask:
        pairs.append((int(label), int(round(float(image.mean()) * 255))))
  return pairs


def test_a_folder_is_a_dataset_of_its_class_folders_split_as_asked(images, tmp_path):
  builder = datasets.get_builder(f"folder:{images}", str(tmp_path))
  assert builder.info.features["label"].names == list(CLASSES)
  assert {split: info.num_examples for split, info in builder.info.splits.items()} == {
      "train": 100, "test": 20}
  data_config = fields.default_data_config()
  data_config.update(name=f"folder:{images}", data_dir=str(tmp_path), channels=1)
  expected = {(c, pixel_value(c, i)) for c in range(10) for i in range(10)}
  shares = []
  for split in ("train[:80%]", "train[80%:]"):
    stream = streams.DataStream(data_config, batch_size=16, train=False, split=split)
    shares.append(labelled_values(stream))
  # Labels follow the folders, images decode to what was written (JPEG of a flat image too,
  # grayscale and RGB alike), and the two slices partition the split.
  assert sorted(shares[0] + shares[1]) == sorted(expected)
  assert len(shares[0]) == 80
  two_processes = [labelled_values(streams.DataStream(
      data_config, batch_size=8, train=False, process_index=index, process_count=2))
                   for index in range(2)]
  assert sorted(two_processes[0] + two_processes[1]) == sorted(
      (c, pixel_value(c, i)) for c in range(10) for i in range(2))


def test_a_tiny_model_trains_on_a_folder_and_resumes_exactly(images, tmp_path):
  config = folder_config(images, tmp_path / "data", total_steps=40, checkpoint_every=20,
                         eval_every=40)
  results = loop.train_and_evaluate(config, str(tmp_path / "reference"))
  assert results["tasks"]["planes"]["test_examples"] == 20
  # Flat grey levels are an easy task: 40 steps are far above chance (0.1).
  assert results["tasks"]["planes"]["test_accuracy"] >= 0.5
  # The run as if stopped after its step-20 checkpoint (mid-epoch: 100 images, 32 a step),
  # then resumed.
  shutil.copytree(tmp_path / "reference", tmp_path / "resumed")
  for folder in ("checkpoints/40", "data_state/40"):
    shutil.rmtree(tmp_path / "resumed" / folder)
  (tmp_path / "resumed" / "results.json").unlink()
  assert read_checkpoint(tmp_path / "resumed")[0] == 20
  loop.train_and_evaluate(config, str(tmp_path / "resumed"))
  (step, resumed), (_, reference) = (read_checkpoint(tmp_path / name)
                                     for name in ("resumed", "reference"))
  assert step == 40
  for name in ("params", "batch_stats", "opt_state"):
    jax.tree.map(np.testing.assert_array_equal, resumed["state"][name],
                 reference["state"][name])


def damage_missing(root):
  return root / "nowhere"


def damage_no_splits(root):
  (root / "empty").mkdir()
  return root / "empty"


def damage_empty_split(root):
  write_image_folder(root / "images", {"train": 1})
  (root / "images" / "test" / "class_0").mkdir(parents=True)
  return root / "images"


def damage_classes_differ(root):
  write_image_folder(root / "images", {"train": 1})
  write_image_folder(root / "images", {"test": 1}, classes=CLASSES[:9] + ("class_x",))
  return root / "images"


def damage_broken_image(root):
  write_image_folder(root / "images", {"train": 2, "test": 1})
  (root / "images" / "train" / "class_3" / "1.png").write_bytes(b"not a png")
  return root / "images"


BAD_FOLDERS = {
    damage_missing: r"Image folder '.*nowhere' does not exist",
    damage_no_splits: r"has no split folders; expected .*/<split>/<class>/<image>",
    damage_empty_split: r"Split folder .*/test holds no images",
    damage_classes_differ: (r"differ between splits: 'test' has \['class_x'\] that 'train' "
                            r"lacks and 'train' has \['class_9'\] that 'test' lacks"),
    damage_broken_image: r"train/class_3/1.png is not a readable JPEG or PNG image",
}


@pytest.mark.parametrize("damage", BAD_FOLDERS, ids=lambda damage: damage.__name__)
def test_a_bad_folder_is_refused_with_one_clear_line(damage, tmp_path, no_heavy_work):
  config = folder_config(damage(tmp_path), tmp_path / "data")
  with pytest.raises(image_folder.ImageFolderError, match=BAD_FOLDERS[damage]) as error:
    loop.train_and_evaluate(config, str(tmp_path / "work"))
  assert "\n" not in str(error.value)


def test_a_split_the_folder_lacks_is_refused_naming_its_splits(images, tmp_path):
  config = folder_config(images, tmp_path / "data")
  config.tasks.planes.eval_split = "validation"
  with pytest.raises(ValueError, match=r"has no split 'validation'; its splits are "
                                       r"\['test', 'train'\]"):
    loop.train_and_evaluate(config, str(tmp_path / "work"))
