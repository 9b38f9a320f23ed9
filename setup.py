"""Installs compmod_jax: compositional (template-mixing) isometric networks in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="compmod_jax",
    version="0.1.0",
    description="Compositional models: isometric networks whose blocks mix shared templates.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.12",
    packages=find_packages(include=["compmod_jax", "compmod_jax.*"]),
    # The CPU kernels' C++ source, compiled on first use (compmod_jax/models/cpu_kernels).
    package_data={"compmod_jax.models.cpu_kernels": ["*.cc"]},
    install_requires=[
        "jax>=0.10,<0.11",  # jax 0.11 drops Python 3.11
        "flax>=0.12,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "tensorflow-cpu>=2.18,<2.22",
        "tensorflow-datasets>=4.9.8,<5",
        "tensorboard>=2.18,<2.22",
        "ml-collections>=1.0,<2",
        "clu==0.0.12",
        "chex>=0.1.89,<0.2",
        "scikit-learn>=1.5,<2",
        "mlxtend>=0.23,<0.26",
        "matplotlib>=3.8,<4",
        "numpy>=1.26,<3",
        "absl-py>=2.1",
        # tensorflow-datasets 4.9.x imports it without declaring it (tensorflow/datasets#11212).
        "importlib_resources>=6",
    ],
    extras_require={"test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4"]},
    entry_points={"console_scripts": ["compmod=compmod_jax.main:run"]},
)
