"""sid_jax: Score identity Distillation (SiD, SiD-LSG, SiDA) in JAX/Flax."""

from sid_jax import xla_cpu as _xla_cpu

_xla_cpu.apply()  # before JAX's CPU backend starts: see sid_jax/xla_cpu.py

__version__ = "0.1.0"
