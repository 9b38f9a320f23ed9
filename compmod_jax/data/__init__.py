"""Input: TFDS builders by name (`datasets`; the embedded digit domains and image folders are
builders too), which classes a task predicts (`classes`), preprocessing (`preprocess`), the
`config.data` fields and their check (`fields`), and the one path to batches (`streams`).

Importing `compmod_jax.data.datasets` registers the `embedded_digits` TFDS builder, so
`datasets.get_builder('embedded_digits/mnist_blur', data_dir)` works like any TFDS name.
"""
import os

# TF only reads data here; its C++ info logs would drown the training logs. Set before any module
# of the package imports TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
