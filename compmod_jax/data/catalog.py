"""What the real TFDS datasets the experiment configs name hold, recorded from the TFDS catalog
and the builders' code (tensorflow-datasets 4.9): split names and sizes, classes, image shape,
and the splits whose labels are withheld (stored as -1).

It lets a config be checked before anyone has the data (tests/test_catalog.py checks every
config in configs/ against it), and the tests mock these datasets with exactly these splits,
so a config that reads a split the real dataset lacks fails in the tests, not on a pod.
"""
import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class DatasetFacts:
  splits: dict                      # {split name: examples}
  num_classes: int
  image_shape: tuple                # (height, width, channels); None for a side that varies
  unlabelled_splits: tuple = ()     # splits whose labels are all -1


def _domainnet(train, test):
  return DatasetFacts({"train": train, "test": test}, 345, (None, None, 3))


def _emnist(train, test, classes):
  return DatasetFacts({"train": train, "test": test}, classes, (28, 28, 1))


CATALOG = {
    # Table 1 and the five-dataset model (Table 8).
    "imagenet2012": DatasetFacts({"train": 1_281_167, "validation": 50_000, "test": 100_000},
                                 1000, (None, None, 3), unlabelled_splits=("test",)),
    "cifar100": DatasetFacts({"train": 50_000, "test": 10_000}, 100, (32, 32, 3)),
    "places365_small": DatasetFacts(
        {"train": 1_803_460, "validation": 36_500, "test": 328_500}, 365, (256, 256, 3),
        unlabelled_splits=("test",)),
    "sun397/tfds": DatasetFacts({"train": 76_128, "validation": 10_875, "test": 21_750}, 397,
                                (None, None, 3)),
    "food101": DatasetFacts({"train": 75_750, "validation": 25_250}, 101, (None, None, 3)),
    # Transfer targets (Tables 2, 10).
    "stanford_dogs": DatasetFacts({"train": 12_000, "test": 8_580}, 120, (None, None, 3)),
    "cars196": DatasetFacts({"train": 8_144, "test": 8_041}, 196, (None, None, 3)),
    "cifar10": DatasetFacts({"train": 50_000, "test": 10_000}, 10, (32, 32, 3)),
    "emnist/balanced": _emnist(112_800, 18_800, 47),
    "emnist/byclass": _emnist(697_932, 116_323, 62),
    "emnist/bymerge": _emnist(697_932, 116_323, 47),
    "emnist/digits": _emnist(240_000, 40_000, 10),
    "emnist/letters": _emnist(88_800, 14_800, 37),
    "emnist/mnist": _emnist(60_000, 10_000, 10),
    # Digits domains (Tables 3, 9).
    "mnist": DatasetFacts({"train": 60_000, "test": 10_000}, 10, (28, 28, 1)),
    # MNIST-C (Table 12's corrupted MNIST domains): every config has MNIST's splits.
    **{f"mnist_corrupted/{corruption}": DatasetFacts({"train": 60_000, "test": 10_000}, 10,
                                                     (28, 28, 1))
       for corruption in ("shot_noise", "shear", "scale")},
    "svhn_cropped": DatasetFacts({"train": 73_257, "test": 26_032, "extra": 531_131}, 10,
                                 (32, 32, 3)),
    # DomainNet (Tables 3, 4; the cleaned version).
    "domainnet/clipart": _domainnet(33_525, 14_604),
    "domainnet/infograph": _domainnet(36_023, 15_582),
    "domainnet/painting": _domainnet(50_416, 21_850),
    "domainnet/quickdraw": _domainnet(120_750, 51_750),
    "domainnet/real": _domainnet(120_906, 52_041),
    "domainnet/sketch": _domainnet(48_212, 20_916),
}


# The embedded digits (data/embedded_digits.py), built on this machine: recorded so that a
# config's batch can be checked against their splits before they are prepared.
CATALOG.update({f"embedded_digits/{config}": DatasetFacts({"train": 4_000, "test": 1_000}, 10,
                                                          (28, 28, 1))
                for config in ("mnist", "mnist_shear", "mnist_scale", "mnist_shot_noise",
                               "mnist_blur", "mnist_boundary")})
CATALOG["embedded_digits/uci_digits"] = DatasetFacts({"train": 1_438, "test": 359}, 10,
                                                     (28, 28, 1))
CATALOG.update({f"embedded_digits/{config}": DatasetFacts({"train": 4_000, "test": 1_000}, 10,
                                                          (28, 28, 3))
                for config in ("mnist_m", "syn_digits")})


def facts(name) -> Optional[DatasetFacts]:
  """The recorded facts of TFDS dataset `name` ('cifar100', 'sun397/tfds'), or None for a
  dataset not in the catalog."""
  return CATALOG.get(name)


def split_problem(name, split):
  """Why TFDS split string `split` ('validation', 'train[:80%]', 'train+validation') cannot be
  read from dataset `name` with labels, or None. Datasets outside the catalog pass."""
  recorded = facts(name)
  if recorded is None:
    return None
  return missing_split(name, split, recorded.splits, recorded.unlabelled_splits)


def missing_split(name, split, splits, unlabelled_splits=()):
  """Why `split` cannot be read with labels from dataset `name` that has `splits`, or None."""
  for part in split.split("+"):
    base = part.split("[")[0].strip()
    if base not in splits:
      return f"'{name}' has no split {base!r}; its splits are {sorted(splits)}"
    if base in unlabelled_splits:
      return (f"the {base!r} split of '{name}' has no labels (TFDS stores -1); evaluate on "
              f"one of {sorted(set(splits) - set(unlabelled_splits))}")
  return None
