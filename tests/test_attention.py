"""Query-blocked attention (`sid_jax.nets.attention`) and its use in the SD U-Net and VAE.

Blocked and whole attention agree (values and gradients) up to float32 rounding; the blocked
gradient program needs less scratch memory than one whole score tensor while the whole one needs
more; the tiny U-Net and VAE give the same outputs with small blocks as without.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sid_jax.methods import lsg
from sid_jax.nets import attention, sd_unet, sd_vae
from sid_jax.weights.sd_unet import expected_unet_shapes
from tests import configs_util

HIGHEST = jax.lax.Precision.HIGHEST
# Whole networks, blocked vs whole attention: relative to the largest value.
NET_TOL = 1e-5


def _reference(q, k, v):
  """The U-Net's attention before blocking, written out: float32 scores scaled after the matmul."""
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=HIGHEST,
                      preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(scores * np.float32(q.shape[-1]**-0.5), axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, precision=HIGHEST)


def _inputs(batch, num_q, num_k, heads, dim, dtype, seed=0, value_dim=None):
  rng = np.random.default_rng(seed)
  shapes = [(batch, num_q, heads, dim), (batch, num_k, heads, dim),
            (batch, num_k, heads, value_dim or dim)]
  # Scaled so that the softmaxes are far from flat.
  return [jnp.asarray(2 * rng.standard_normal(s), dtype) for s in shapes]


def _value_and_grads(chunk, q, k, v):
  """Output and d(sum(out * w))/d(q, k, v) of attention with `chunk` queries per block."""
  w = jnp.asarray(np.random.default_rng(9).standard_normal(q.shape[:3] + v.shape[-1:]), v.dtype)

  def loss(q, k, v):
    out = attention.dot_product_attention(q, k, v, precision=HIGHEST, query_chunk=chunk)
    return jnp.sum(out.astype(jnp.float32) * w.astype(jnp.float32)), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


def _assert_close(actual, desired, rel):
  actual, desired = np.asarray(actual, np.float32), np.asarray(desired, np.float32)
  scale = np.max(np.abs(desired))
  assert scale > 0
  np.testing.assert_allclose(actual, desired, rtol=rel, atol=rel * scale)


# (batch, queries, keys, heads, head dim, value dim, chunk, dtype)
CASES = [
    (2, 64, 64, 4, 8, 8, 16, jnp.float32),  # self-attention, chunk divides Q
    (2, 70, 70, 2, 8, 8, 16, jnp.float32),  # a 6-query last block
    (2, 50, 77, 3, 8, 8, 16, jnp.float32),  # cross-attention, K != Q
    (1, 33, 5, 1, 16, 12, 32, jnp.float32),  # a 1-query last block, Dv != D
    (3, 40, 40, 1, 32, 32, 1, jnp.float32),  # one query per block (the VAE's single head)
    (2, 48, 20, 2, 8, 8, 16, jnp.bfloat16),
    (2, 45, 45, 2, 8, 8, 16, jnp.bfloat16),
]


@pytest.mark.parametrize("batch, num_q, num_k, heads, dim, value_dim, chunk, dtype", CASES)
def test_blocked_equals_whole(batch, num_q, num_k, heads, dim, value_dim, chunk, dtype):
  q, k, v = _inputs(batch, num_q, num_k, heads, dim, dtype, value_dim=value_dim)
  out, grads = _value_and_grads(chunk, q, k, v)
  ref_out, ref_grads = _value_and_grads(None, q, k, v)
  assert out.shape == (batch, num_q, heads, value_dim) and out.dtype == dtype
  # bfloat16: a float32 logit that rounds differently may move a probability by one bf16 ulp.
  rel = 1e-6 if dtype == jnp.float32 else 2.0**-7
  _assert_close(out, ref_out, rel)
  for grad, ref_grad in zip(grads, ref_grads):
    assert grad.dtype == dtype
    _assert_close(grad, ref_grad, rel if dtype == jnp.float32 else 2.0**-6)


@pytest.mark.parametrize("chunk", [None, 0, 64, 1000])
def test_whole_is_the_unet_formula(chunk):
  """No blocking (None, 0, or a block of at least Q) runs exactly the former U-Net code."""
  q, k, v = _inputs(2, 64, 24, 4, 8, jnp.float32)
  out = jax.jit(lambda q, k, v: attention.dot_product_attention(
      q, k, v, precision=HIGHEST, query_chunk=chunk))(q, k, v)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(jax.jit(_reference)(q, k, v)))


def test_explicit_scale():
  q, k, v = _inputs(1, 12, 12, 1, 16, jnp.float32)
  out = attention.dot_product_attention(q, k, v, scale=0.5, precision=HIGHEST, query_chunk=5)
  ref = attention.dot_product_attention(q * 2.0, k, v, precision=HIGHEST)  # 0.5 = 2 * 16**-0.5
  _assert_close(out, ref, 1e-6)


@pytest.mark.parametrize("value", [-1, 1.5, True, "8", (8,)])
def test_bad_chunk_raises(value):
  with pytest.raises(ValueError, match="must be a positive int"):
    attention.check_query_chunk(value)
  q, k, v = _inputs(1, 4, 4, 1, 4, jnp.float32)
  with pytest.raises(ValueError, match="query_chunk"):
    attention.dot_product_attention(q, k, v, query_chunk=value)


def test_chunk_values_accepted():
  assert attention.check_query_chunk(None) is None
  assert attention.check_query_chunk(0) is None
  assert attention.check_query_chunk(np.int64(8)) == 8


def test_blocked_gradient_needs_less_than_one_score_tensor():
  """Compiled (not run) gradient of 4096-token, 8-head attention at batch 2, as in SD's first
  U-Net level: the whole version's scratch exceeds one float32 [B, H, Q, K] tensor (it keeps
  several), the version with 512-query blocks stays below it."""
  batch, tokens, heads, dim = 2, 4096, 8, 40
  shape = jax.ShapeDtypeStruct((batch, tokens, heads, dim), jnp.float32)
  score_bytes = batch * heads * tokens * tokens * 4

  def temp_bytes(chunk):
    def loss(q, k, v):
      out = attention.dot_product_attention(q, k, v, precision=HIGHEST, query_chunk=chunk)
      return jnp.sum(out**2)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  blocked, whole = temp_bytes(512), temp_bytes(None)
  print(f"temp bytes: blocked {blocked}, whole {whole}, one score tensor {score_bytes}")
  assert blocked < score_bytes < whole


# ------------------------------------------------------------------------------------------------
# The networks.
# ------------------------------------------------------------------------------------------------

TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                 block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                 attention_head_dim=4, norm_num_groups=32)


@pytest.fixture(scope="module")
def tiny_unet():
  """The tiny U-Net (42 tokens at the first level, 12 in the middle), random params and inputs."""
  module = sd_unet.unet_from_config(TINY_UNET, attention_chunk=None)
  rng = np.random.default_rng(0)
  params = flax.traverse_util.unflatten_dict({
      path: (rng.standard_normal(leaf.shape) / np.sqrt(max(np.prod(leaf.shape[:-1]), 1)))
      .astype(np.float32)
      for path, leaf in expected_unet_shapes(module).items()})
  sample = jnp.asarray(rng.standard_normal((2, 7, 6, 4)), jnp.float32)
  context = jnp.asarray(rng.standard_normal((2, 9, 16)), jnp.float32)
  timesteps = jnp.asarray([30, 700])
  return module, params, sample, timesteps, context


def test_unet_default_chunk_and_validation():
  assert sd_unet.UNet2DConditionModel().attention_chunk == attention.DEFAULT_QUERY_CHUNK
  assert sd_unet.unet_from_config(TINY_UNET).attention_chunk == attention.DEFAULT_QUERY_CHUNK
  with pytest.raises(ValueError, match="attention_chunk"):
    sd_unet.unet_from_config(TINY_UNET, attention_chunk=-8)


@pytest.mark.parametrize("remat", [False, True])
def test_unet_blocked_equals_whole(tiny_unet, remat):
  """8-query blocks (several per level, a 2-query last block) against whole attention: outputs
  and input gradients, with and without the U-Net's own rematerialisation."""
  module, params, sample, timesteps, context = tiny_unet
  weights = jnp.asarray(np.random.default_rng(1).standard_normal(sample.shape), jnp.float32)

  def run(m):
    def loss(x):
      out = m.apply({"params": params}, x, timesteps, context)
      return jnp.sum(out * weights), out
    return jax.value_and_grad(loss, has_aux=True)(sample)

  blocked = module.clone(attention_chunk=8, remat=remat)
  ((_, out), grad), ((_, ref), ref_grad) = jax.jit(
      lambda: (run(blocked), run(module.clone(remat=remat))))()
  # Attention's float32 rounding differences pass through the following layers and norms:
  # measured 1.1e-6 (output) and 2.4e-6 (gradient) of the largest value.
  _assert_close(out, ref, NET_TOL)
  _assert_close(grad, ref_grad, NET_TOL)


def test_vae_blocked_equals_whole():
  config = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 32],
                layers_per_block=1, latent_channels=4, norm_num_groups=32)
  whole = sd_vae.vae_from_config(config, attention_chunk=None)
  blocked = sd_vae.vae_from_config(config, attention_chunk=5)  # 64 latent pixels: 13 blocks
  assert sd_vae.vae_from_config(config).attention_chunk == attention.DEFAULT_QUERY_CHUNK
  images = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  params = jax.jit(whole.init)(jax.random.key(0), images)
  out, ref = jax.jit(lambda: (blocked.apply(params, images), whole.apply(params, images)))()
  _assert_close(out, ref, NET_TOL)  # measured 2.2e-6 of the largest value
  with pytest.raises(ValueError, match="attention_chunk"):
    sd_vae.vae_from_config(config, attention_chunk=2.5).init(jax.random.key(0), images)


def test_lsg_config_threads_and_checks_the_setting():
  config = configs_util.load("sid_lsg.py", "teacher=sd15,kappa=1.5,tiny")
  assert config.lsg.attention_chunk == attention.DEFAULT_QUERY_CHUNK
  config.lsg.attention_chunk = 8
  lsg.check_config(config)
  sd, _, _ = lsg.load_sd(config)
  assert sd.unet.attention_chunk == 8 and sd.vae.attention_chunk == 8
  config.lsg.attention_chunk = -3
  with pytest.raises(ValueError, match=r"config\.lsg\.attention_chunk"):
    lsg.check_config(config)
