"""Input pipeline: TFDS builders for the embedded digit domains and the one path to batches.

Importing this package registers the `embedded_digits` TFDS builder, so
`get_builder('embedded_digits/mnist_blur', data_dir)` works like any TFDS name. The package does
not import JAX: processes and devices are passed in, which keeps it usable from tests that
configure JAX's devices first.
"""
import os

# TF only reads data here; its C++ info logs would drown the training logs. Must precede the import.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from compmod_jax.data.embedded_digits import EmbeddedDigits  # noqa: E402  (registers the builder)
from compmod_jax.data.pipeline import (  # noqa: E402
    DataStream, DatasetNotFoundError, dataset_size, default_data_config, get_builder, num_classes,
)

__all__ = [
    "DataStream",
    "DatasetNotFoundError",
    "EmbeddedDigits",
    "dataset_size",
    "default_data_config",
    "get_builder",
    "num_classes",
]
