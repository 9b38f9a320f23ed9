"""The real datasets the configs name (data/catalog.py): every config reads only splits its
datasets have, with labels; the catalog agrees with the installed TFDS builders."""
import pytest
import tensorflow_datasets as tfds

from compmod_jax import experiments
from compmod_jax.data import catalog, datasets, image_folder
from compmod_jax.train import context, validation
from helpers import configs_to_check

EMBEDDED = "embedded_digits/"


@pytest.mark.parametrize("name, facts", sorted(catalog.CATALOG.items()))
def test_catalog_agrees_with_the_tfds_builders(name, facts):
  info = tfds.builder(name, data_dir="/nonexistent").info  # the builder's code, no data
  assert info.features["label"].num_classes == facts.num_classes
  assert tuple(info.features["image"].shape) == facts.image_shape
  assert set(facts.unlabelled_splits) <= set(facts.splits)


@pytest.mark.parametrize("label, config", list(configs_to_check()),
                         ids=[label for label, _ in configs_to_check()])
def test_every_config_reads_splits_its_datasets_have(label, config):
  for task in config.tasks:
    data_config = context.task_data_config(config, task)
    name = data_config.name
    if name.startswith(EMBEDDED):
      continue  # built here: train and test (data/embedded_digits.py)
    if image_folder.is_folder_name(name):  # a user's folder: its splits are its sub-folders
      splits = datasets.dataset_builder(name).split_names
      for field in ("train_split", "eval_split"):
        assert catalog.missing_split(name, data_config[field], splits) is None, (label, task)
      continue
    facts = catalog.facts(name)
    assert facts, f"{label}: task {task} reads {name!r}, which data/catalog.py does not record"
    for field in ("train_split", "eval_split"):
      assert catalog.split_problem(name, data_config[field]) is None, (label, task, field)
    assert data_config.most_frequent_classes <= facts.num_classes, (label, task)


def test_a_split_the_dataset_lacks_is_refused_naming_the_splits_it_has():
  config = experiments.base_config()
  config.tasks = {"food101": experiments.task("food101", eval_split="test")}
  with pytest.raises(ValueError, match=r"Task 'food101' reads eval_split='test' "
                                       r"\(config.tasks.food101.eval_split, else "
                                       r"config.data.eval_split\), but 'food101' has no split "
                                       r"'test'; its splits are \['train', 'validation'\]"):
    validation.validate(config)
  config.tasks = {"imagenet": experiments.task("imagenet2012", train_split="train[:90%]")}
  config.data.eval_split = "test"
  with pytest.raises(ValueError, match=r"the 'test' split of 'imagenet2012' has no labels"):
    validation.validate(config)
  config.data.eval_split = "train[90%:]+validation"
  validation.validate(config)  # slices and sums of existing, labelled splits are fine
