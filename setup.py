"""sid_jax: Score identity Distillation (SiD, SiD-LSG, SiDA) in JAX/Flax.

Installs declare compatible ranges, so sid_jax can sit next to other libraries (e.g. in Colab);
requirements.txt is the exact lock CI tests. Every lower bound below is the lock's version (the
one tested); tests/test_install.py checks the lock lies inside these ranges and installs a built
wheel with the ranges resolved by pip. Upper bounds only where a known break exists: none today.

  pip install .              # CPU
  pip install ".[cuda12]"    # NVIDIA GPU, CUDA 12 (or .[cuda13])
  pip install ".[tpu]"       # Cloud TPU VM
"""

import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
JAX_VERSION = "0.10.2"  # the lock's jax/jaxlib; the accelerator plugins must match it exactly
# tensorflow-cpu 2.21 has wheels for Linux x86-64 and Windows only; macOS arm64 and Linux aarch64
# (e.g. GH200 GPU hosts) have only `tensorflow` wheels.
TF_CPU_PLATFORMS = ('(sys_platform == "linux" and platform_machine == "x86_64") or '
                    'sys_platform == "win32"')
TF_FULL_PLATFORMS = 'sys_platform == "darwin" or platform_machine == "aarch64"'

INSTALL_REQUIRES = [
    f"jax>={JAX_VERSION}",  # jax.set_mesh and jax.make_mesh(axis_types=...)
    f"jaxlib>={JAX_VERSION}",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "ml-collections>=1.1.0",
    "clu>=0.0.12",
    "absl-py>=2.5.1",
    "numpy>=2.4.6",
    "scipy>=1.17.1",
    "tensorflow-datasets>=4.9.10",
    # The real-data pipeline (sid_jax/data/real.py).
    "grain>=0.2.18",
    # clu.metric_writers / periodic_actions import TensorFlow and tensorboard (the training loop).
    # TensorFlow's CPU-only build where it is published; elsewhere the full one (same package).
    f"tensorflow-cpu>=2.21.0; {TF_CPU_PLATFORMS}",
    f"tensorflow>=2.21.0; {TF_FULL_PLATFORMS}",
    "tensorboard>=2.21.0",
    # CLIPTokenizer only; transformers 5 (no Flax classes), whose constructor rules we follow.
    "transformers>=5.23.0",
    # The text cleaning of the slow CLIPTokenizer SiD-LSG trained with.
    "ftfy>=6.3.1",
    "pillow>=13.0.0",
    "psutil>=7.2.2",
    # The digits demo reads scikit-learn's bundled UCI digits.
    "scikit-learn>=1.9.1",
]

EXTRAS_REQUIRE = {
    # NVIDIA GPUs: JAX's CUDA plugin built for the same jax version (CUDA, cuDNN, NCCL wheels).
    "cuda12": [f"jax[cuda12]=={JAX_VERSION}"],
    "cuda13": [f"jax[cuda13]=={JAX_VERSION}"],
    # Cloud TPU VMs (jax[tpu] brings its pinned libtpu). Also lets `python -m sid_jax.plan
    # --target=tpu:...` compile for TPU topologies on any host, no TPU needed.
    "tpu": [f"jax[tpu]=={JAX_VERSION}"],
    # Reading / writing official PyTorch checkpoints (convert, export). Exact pin: on the package
    # index other versions resolve to the multi-GB CUDA build.
    "convert": ["torch==2.13.0"],
    # The test suite (PyTorch/diffusers references, notebooks); requirements-test.txt is its lock.
    "test": [
        "torch==2.13.0",
        "diffusers>=0.42.1",
        "pytest>=9.2.0",
        "pytest-xdist>=3.8.0",
        f"jax[tpu]=={JAX_VERSION}",
        "nbclient>=0.11.0",
        "nbformat>=5.11.1",
        "ipykernel>=7.4.0",
    ],
}


def _readme():
  with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
    return f.read()


setup(
    name="sid_jax",
    version="0.1.0",
    description="One-step generators distilled from diffusion models with Score identity "
    "Distillation, in JAX/Flax on device meshes.",
    long_description=_readme(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["sid_jax", "sid_jax.*"]),
    # The digits demo's teacher, classifier and distilled generator (network checkpoints) and the
    # tiny prompt list: MANIFEST.in lists them, so they install inside the package.
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    license="Apache-2.0",
)
