"""Optimisers as the official code configures them (spec §4.2).

torch.optim.Adam (not AdamW), constant learning rate, no weight decay; gradients first pass
through nan_to_num (NaN -> 0, ±inf -> ±1e5) and, for SiDA's fake score, an element-wise value clip.
With beta1 = 0 (every SiD configuration but FFHQ's generator) Adam's first moment equals the
gradient, so `adam` then keeps no first-moment buffer: the same updates with one parameter-sized
buffer less.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


def nan_to_num_grads(bound: float = 1e5) -> optax.GradientTransformation:
  """Replaces NaN by 0 and ±inf by ±bound in every gradient leaf."""

  def update_fn(updates, state, params=None):
    del params
    fix = lambda g: jnp.nan_to_num(g, nan=0.0, posinf=bound, neginf=-bound)
    return jax.tree.map(fix, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


class ScaleByAdamNoMomentumState(NamedTuple):
  count: jax.Array
  nu: optax.Updates


def scale_by_adam_no_momentum(b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
  """Adam with beta1 = 0: g / (sqrt(nu / (1 - b2^t)) + eps), bias-corrected like torch."""

  def init_fn(params):
    return ScaleByAdamNoMomentumState(
        count=jnp.zeros([], jnp.int32), nu=jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    del params
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)
    count = optax.safe_increment(state.count)
    correction = 1 - b2**count.astype(jnp.float32)
    out = jax.tree.map(lambda g, v: g / (jnp.sqrt(v / correction.astype(v.dtype)) + eps), updates,
                       nu)
    return out, ScaleByAdamNoMomentumState(count=count, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def adam(learning_rate: float | optax.Schedule, b1: float, b2: float, eps: float,
         clip_value: float | None = None) -> optax.GradientTransformation:
  """nan_to_num -> [value clip] -> Adam(b1, b2, eps) -> -lr."""
  if not callable(learning_rate) and learning_rate <= 0:
    raise ValueError(f"learning rate must be positive, got {learning_rate}.")
  if not 0 <= b1 < 1 or not 0 <= b2 < 1:
    raise ValueError(f"Adam betas must lie in [0, 1), got b1={b1}, b2={b2}.")
  if eps <= 0:
    raise ValueError(f"Adam eps must be positive, got {eps}.")
  parts = [nan_to_num_grads()]
  if clip_value is not None:
    parts.append(optax.clip(clip_value))
  if b1 == 0:
    parts.append(scale_by_adam_no_momentum(b2=b2, eps=eps))
  else:
    parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
  if callable(learning_rate):  # a schedule of the step
    parts.append(optax.scale_by_learning_rate(learning_rate))
  else:
    parts.append(optax.scale(-learning_rate))
  return optax.chain(*parts)
