"""sid_jax: Score identity Distillation (SiD, SiD-LSG, SiDA) in JAX/Flax."""

import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _requirements(name):
  with open(os.path.join(HERE, name)) as f:
    return [line.split("#")[0].strip() for line in f
            if line.split("#")[0].strip() and not line.startswith("-r")]


setup(
    name="sid_jax",
    version="0.1.0",
    description="One-step generators distilled from diffusion models with Score identity "
    "Distillation, in JAX/Flax on device meshes.",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["sid_jax", "sid_jax.*"]),
    # The digits demo's teacher, classifier and distilled generator (network checkpoints).
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=_requirements("requirements.txt"),
    extras_require={
        # Reading official PyTorch checkpoints (EDM/EDM2 pickles, state dicts). Exact pin: other
        # versions pull a multi-GB CUDA build.
        "convert": ["torch==2.13.0"],
        "test": _requirements("requirements-test.txt"),
        # `python -m sid_jax.plan --target=tpu:...` compiles for TPU topologies on any host with
        # libtpu; no TPU needed. Also what a TPU VM installs to run.
        "tpu": ["jax[tpu]==0.10.2"],
    },
    license="Apache-2.0",
)
