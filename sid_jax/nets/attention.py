"""Softmax attention that can run over blocks of queries, for the Stable Diffusion networks.

`dot_product_attention` is the attention of `sd_unet.Attention` and of the VAE's mid-block
attention: float32 logits (`preferred_element_type`), scaled after the matmul, a float32 softmax
over all keys, the probabilities cast to the value dtype for the second matmul.

With `query_chunk`, the queries are processed `query_chunk` at a time, one block after the other
(`jax.lax.map`), each block through a `jax.checkpoint`-ed function. Every query row still sees
every key, so the softmax is the same (no online softmax); only [B, H, chunk, K] scores exist at
once, in the forward pass and in the backward pass (which recomputes each block's scores). When
`query_chunk` does not divide Q, the leftover Q mod chunk queries form one smaller last block.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Queries per block used by the Stable Diffusion modules unless told otherwise. At 64x64 latents
# (SD 1.5 / 2.1-base at 512 px) the U-Net's first level attends over 4096 tokens: an 8-head
# float32 score tensor is then 8.6 GB at micro-batch 16, and the backward pass holds several.
# Blocks of 1024 queries cut that to a quarter per block at the 4096-token levels (VAE included);
# levels with at most 1024 tokens run whole, as before. The math is the same row by row.
DEFAULT_QUERY_CHUNK = 1024


def check_query_chunk(value: Any, what: str = "query_chunk") -> int | None:
  """`value` as queries per block: a positive int, or None for all queries (0 or None given).

  Raises:
    ValueError naming `what` and the value when it is neither.
  """
  if value is None:
    return None
  if (isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer))
      or value < 0):
    raise ValueError(f"{what} must be a positive int, or 0 / None for whole attention; got "
                     f"{value!r}.")
  return int(value) or None


def _attend(q: Array, k: Array, v: Array, scale: np.float32, precision: Any) -> Array:
  """Whole attention of q [B, Q, H, D] over k, v [B, K, H, D]."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=precision,
                      preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(logits * scale, axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, precision=precision)


def dot_product_attention(q: Array, k: Array, v: Array, *, scale: float | None = None,
                          precision: Any = None, query_chunk: int | None = None) -> Array:
  """softmax(q k^T * scale) v per head, the scores in float32.

  Args:
    q: [B, Q, H, D] queries.
    k: [B, K, H, D] keys (q's dtype, or float32 when the caller upcasts both).
    v: [B, K, H, Dv] values; the probabilities are cast to v's dtype for the second matmul.
    scale: multiplies the float32 logits; None means D ** -0.5 (rounded to float32).
    precision: `jax.lax.Precision` of both matmuls.
    query_chunk: queries per block (see the module docstring); None or 0, or a value of at least
      Q, computes the whole [B, H, Q, K] score tensor at once.

  Returns:
    [B, Q, H, Dv] in v's dtype.
  """
  chunk = check_query_chunk(query_chunk)
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [batch, tokens, heads, dim]; got shapes {q.shape}, "
                     f"{k.shape}, {v.shape}.")
  scale = np.float32(q.shape[-1] ** -0.5 if scale is None else scale)
  attend = lambda qc: _attend(qc, k, v, scale, precision)
  num_q = q.shape[1]
  if chunk is None or chunk >= num_q:
    return attend(q)
  # Closed over, k and v are loop constants of the map: one copy, not one per block.
  block = jax.checkpoint(attend, prevent_cse=False)
  full = num_q // chunk * chunk
  b, _, h, d = q.shape
  blocks = jnp.moveaxis(q[:, :full].reshape(b, full // chunk, chunk, h, d), 1, 0)
  out = jnp.moveaxis(jax.lax.map(block, blocks), 0, 1)
  out = out.reshape((b, full) + out.shape[3:])
  if full < num_q:
    out = jnp.concatenate([out, jax.checkpoint(attend)(q[:, full:])], axis=1)
  return out
