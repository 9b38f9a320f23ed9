"""Input pipeline: TFDS builders for the embedded digit domains and the one path to batches.

`compmod_jax.data.pipeline` registers the `embedded_digits` TFDS builder when it is imported,
so `pipeline.get_builder('embedded_digits/mnist_blur', data_dir)` works like any TFDS name. The
package does not import JAX: processes and devices are passed in, which keeps it usable from
tests that configure JAX's devices first.
"""
import os

# TF only reads data here; its C++ info logs would drown the training logs. Set before any module
# of the package imports TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
