"""sid_jax: Score identity Distillation (SiD, SiD-LSG, SiDA) in JAX/Flax."""

__version__ = "0.1.0"
