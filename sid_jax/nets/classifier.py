"""A small CNN classifier for 8x8 digits; its penultimate layer is the feature space of the
digits Fréchet distance (the role Inception plays for FID on natural images)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class DigitsClassifier(nn.Module):
  num_classes: int = 10
  width: int = 32
  feature_dim: int = 64

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    """x: [B, 8, 8, 1] in [-1, 1] -> {'features': [B, feature_dim], 'logits': [B, classes]}."""
    h = nn.gelu(nn.Conv(self.width, (3, 3))(x))
    h = nn.gelu(nn.Conv(self.width, (3, 3))(h))
    h = nn.avg_pool(h, (2, 2), (2, 2))
    h = nn.gelu(nn.Conv(2 * self.width, (3, 3))(h))
    h = nn.avg_pool(h, (2, 2), (2, 2))
    h = h.reshape(h.shape[0], -1)
    h = nn.Dropout(0.2, deterministic=not train)(h)
    features = jnp.tanh(nn.Dense(self.feature_dim)(h))
    return {"features": features, "logits": nn.Dense(self.num_classes)(features)}
