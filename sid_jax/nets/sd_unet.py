"""Stable Diffusion's conditional U-Net (diffusers `UNet2DConditionModel`) in Flax linen.

Scope. The SD 1.x and SD 2.x latent U-Nets: `CrossAttnDownBlock2D` / `DownBlock2D` encoders,
a `UNetMidBlock2DCrossAttn` middle, `UpBlock2D` / `CrossAttnUpBlock2D` decoders, sinusoidal
timestep features followed by a two-layer MLP, spatial transformers with self-attention,
cross-attention on the text encoder states and a GEGLU feed-forward, projected in and out by
1x1 convolutions (SD 1.x) or linear layers (SD 2.x, `use_linear_projection`). Everything else
diffusers can configure (class or additional embeddings, time-conditioned projections, encoder
projections, dual cross-attention, scale-shift ResNets, other block types, other kernel sizes)
is refused by `unet_from_config` / the module with a ValueError naming the setting.

Layout. Activations are NHWC: `sample` is [B, H, W, C] and the output [B, H, W, out_channels].

Names. Submodules are named after the diffusers attributes, with the index of a list entry
appended after an underscore, so a Flax parameter path maps one to one onto the diffusers name:
`down_blocks_0/attentions_1/transformer_blocks_0/attn1/to_q/kernel` is
`down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q.weight`. Leaves are `kernel`
(Dense [in, out], Conv HWIO), `scale` (GroupNorm/LayerNorm weight) and `bias`
(see `sid_jax.weights.sd_unet`).

Precision. Parameters are always float32. `dtype` is the compute dtype: each layer casts its
parameters to it, while GroupNorm/LayerNorm statistics and the attention softmax stay in float32
and the sinusoidal timestep features are computed from float32 timesteps. Matmuls and convolutions
use `precision` (HIGHEST by default, i.e. no TF32/bfloat16 passes for float32 compute).

Memory. `remat=True` rematerialises every ResNet block and every transformer block in the
backward pass (`nn.remat`); the forward values are the same. `attention_chunk` runs attention over
blocks of that many queries (`sid_jax.nets.attention`), so a 4096-token level never holds its
whole score tensor; the values agree with whole attention up to float32 rounding.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sid_jax import sharding
from sid_jax.nets import attention

Array = jax.Array
Dtype = Any

DEFAULT_PRECISION = jax.lax.Precision.HIGHEST

_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID_BLOCKS = ("UNetMidBlock2DCrossAttn",)
_ACTIVATIONS = ("silu", "swish")

# torch's default initialisation of Linear/Conv weights (kaiming-uniform with a = sqrt(5)) is a
# uniform law of variance 1 / (3 fan_in). Checkpoints overwrite it; it only matters for `init`.
_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


# ------------------------------------------------------------------------------------------------
# Layers.
# ------------------------------------------------------------------------------------------------


class Dense(nn.Module):
  """y = x W + b, with `kernel` W [in, out] and `bias` kept in float32 and cast to `dtype`."""
  features: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", _kernel_init, (x.shape[-1], self.features), jnp.float32)
    y = jnp.matmul(x.astype(self.dtype), kernel.astype(self.dtype), precision=self.precision)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


class Conv(nn.Module):
  """2-D convolution of NHWC input with an HWIO `kernel` and a `bias`, both float32 params.

  `padding` is torch's symmetric padding, except that `padding=0` with `stride=2` pads one
  row/column at the bottom/right, which is what diffusers' `Downsample2D(padding=0)` does.
  """
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: int = 1
  dtype: Dtype = jnp.float32
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = self.kernel_size
    kernel = self.param("kernel", _kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    if self.stride == 2 and self.padding == 0:
      pads = ((0, 1), (0, 1))
    else:
      pads = ((self.padding, self.padding), (self.padding, self.padding))
    y = jax.lax.conv_general_dilated(x.astype(self.dtype),
                                     kernel.astype(self.dtype),
                                     window_strides=(self.stride, self.stride),
                                     padding=pads,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=self.precision)
    return sharding.split_batch(y + bias.astype(self.dtype))


class GroupNorm(nn.Module):
  """torch.nn.GroupNorm over the channel axis of NHWC input, statistics in float32."""
  num_groups: int
  eps: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    channels = x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(f"GroupNorm: {channels} channels are not divisible into "
                       f"{self.num_groups} groups.")
    scale = self.param("scale", nn.initializers.ones_init(), (channels,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (channels,), jnp.float32)
    x32 = x.astype(jnp.float32)
    grouped = x32.reshape(x.shape[:-1] + (self.num_groups, channels // self.num_groups))
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    mean = jnp.mean(grouped, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(grouped - mean), axis=axes, keepdims=True)
    normed = ((grouped - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
    return (normed * scale + bias).astype(self.dtype)


class LayerNorm(nn.Module):
  """torch.nn.LayerNorm over the last axis, statistics in float32."""
  eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones_init(), (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (features,), jnp.float32)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (normed * scale + bias).astype(self.dtype)


def timestep_frequencies(dim: int, freq_shift: float, max_period: float = 10000.0) -> np.ndarray:
  """The dim // 2 float32 frequencies exp(-log(max_period) * i / (dim // 2 - freq_shift)).

  The exponent is formed in float32 in diffusers' order of operations; the exponential is taken
  in float64 and rounded once to float32. (XLA's float32 `exp` is off by one ulp more often than
  torch's, and an ulp of a frequency becomes ~timestep ulps of the angle: up to ~3e-5 at t=999.)
  """
  half = dim // 2
  exponent = np.arange(half, dtype=np.float32) * np.float32(-math.log(max_period))
  exponent = exponent / np.float32(half - freq_shift)
  return np.exp(exponent.astype(np.float64)).astype(np.float32)


def timestep_features(timesteps: Array, dim: int, flip_sin_to_cos: bool,
                      freq_shift: float, max_period: float = 10000.0) -> Array:
  """diffusers' `get_timestep_embedding` (scale 1): [B] timesteps -> [B, dim] float32.

  The features are [sin, cos] of float32(timestep) * `timestep_frequencies`, swapped to
  [cos, sin] when `flip_sin_to_cos`, zero-padded by one column when `dim` is odd.
  """
  freqs = jnp.asarray(timestep_frequencies(dim, freq_shift, max_period))
  angles = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  feats = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    feats = jnp.pad(feats, ((0, 0), (0, 1)))
  return feats


def _nearest_indices(size_in: int, size_out: int) -> np.ndarray:
  """Source rows of torch's `interpolate(mode='nearest', size=...)` along one axis."""
  scale = np.float32(size_in) / np.float32(size_out)
  src = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(src, size_in - 1)


def upsample_nearest(x: Array, size: tuple[int, int]) -> Array:
  """Nearest-neighbour resize of NHWC `x` to spatial `size`, as torch's nearest interpolation."""
  h, w = x.shape[1:3]
  if size == (2 * h, 2 * w):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  x = jnp.take(x, _nearest_indices(h, size[0]), axis=1)
  return jnp.take(x, _nearest_indices(w, size[1]), axis=2)


# ------------------------------------------------------------------------------------------------
# Building blocks.
# ------------------------------------------------------------------------------------------------


class TimestepEmbedding(nn.Module):
  """linear_1 -> SiLU -> linear_2 on the sinusoidal timestep features."""
  features: int
  dtype: Dtype = jnp.float32
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, feats: Array) -> Array:
    h = Dense(self.features, dtype=self.dtype, precision=self.precision, name="linear_1")(feats)
    h = nn.silu(h)
    return Dense(self.features, dtype=self.dtype, precision=self.precision, name="linear_2")(h)


class ResnetBlock2D(nn.Module):
  """Pre-norm residual block with an additive time embedding ("default" time norm).

  GroupNorm -> SiLU -> conv3x3 -> + Dense(SiLU(temb)) -> GroupNorm -> SiLU -> conv3x3, added to
  the input (through a 1x1 `conv_shortcut` when the channel count changes) and divided by
  `output_scale_factor`.
  """
  out_channels: int
  groups: int
  eps: float
  output_scale_factor: float = 1.0
  dtype: Dtype = jnp.float32
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x: Array, temb: Array) -> Array:
    kw = dict(dtype=self.dtype, precision=self.precision)
    h = nn.silu(GroupNorm(self.groups, self.eps, self.dtype, name="norm1")(x))
    h = Conv(self.out_channels, name="conv1", **kw)(h)
    t = Dense(self.out_channels, name="time_emb_proj", **kw)(nn.silu(temb.astype(self.dtype)))
    h = h + t[:, None, None, :]
    h = nn.silu(GroupNorm(self.groups, self.eps, self.dtype, name="norm2")(h))
    h = Conv(self.out_channels, name="conv2", **kw)(h)
    skip = x.astype(self.dtype)
    if x.shape[-1] != self.out_channels:
      skip = Conv(self.out_channels, kernel_size=1, padding=0, name="conv_shortcut", **kw)(skip)
    out = skip + h
    if self.output_scale_factor != 1.0:
      out = out / jnp.asarray(self.output_scale_factor, self.dtype)
    return out


class Attention(nn.Module):
  """Multi-head (self- or cross-) attention: to_q/to_k/to_v without bias, to_out_0 with bias.

  Scores are accumulated and soft-maxed in float32 and scaled by head_dim ** -0.5.
  `upcast_attention` additionally casts queries and keys to float32 before the score matmul.
  `attention_chunk` queries are attended at a time (None: all at once).
  """
  heads: int
  head_dim: int
  upcast_attention: bool = False
  dtype: Dtype = jnp.float32
  precision: Any = DEFAULT_PRECISION
  attention_chunk: int | None = attention.DEFAULT_QUERY_CHUNK

  @nn.compact
  def __call__(self, x: Array, context: Array | None = None) -> Array:
    kw = dict(use_bias=False, dtype=self.dtype, precision=self.precision)
    inner = self.heads * self.head_dim
    context = x if context is None else context
    q = Dense(inner, name="to_q", **kw)(x)
    k = Dense(inner, name="to_k", **kw)(context)
    v = Dense(inner, name="to_v", **kw)(context)
    split = lambda t: t.reshape(t.shape[:2] + (self.heads, self.head_dim))
    q, k, v = split(q), split(k), split(v)
    if self.upcast_attention:
      q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    out = attention.dot_product_attention(q, k, v, scale=self.head_dim**-0.5,
                                          precision=self.precision,
                                          query_chunk=self.attention_chunk)
    out = out.reshape(out.shape[:2] + (inner,))
    return Dense(x.shape[-1], dtype=self.dtype, precision=self.precision, name="to_out_0")(out)


class GEGLU(nn.Module):
  """`proj` to 2 * features, then value * GELU(gate) with the exact (erf) GELU."""
  features: int
  dtype: Dtype = jnp.float32
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = Dense(2 * self.features, dtype=self.dtype, precision=self.precision, name="proj")(x)
    value, gate = jnp.split(h, 2, axis=-1)
    return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """GEGLU feed-forward with a 4x hidden width: `net_0` (GEGLU) then `net_2` (Dense)."""
  mult: int = 4
  dtype: Dtype = jnp.float32
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dim = x.shape[-1]
    h = GEGLU(dim * self.mult, dtype=self.dtype, precision=self.precision, name="net_0")(x)
    return Dense(dim, dtype=self.dtype, precision=self.precision, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
  """Pre-LayerNorm block: self-attention, cross-attention on `context`, GEGLU feed-forward."""
  heads: int
  head_dim: int
  upcast_attention: bool = False
  dtype: Dtype = jnp.float32
  precision: Any = DEFAULT_PRECISION
  attention_chunk: int | None = attention.DEFAULT_QUERY_CHUNK

  @nn.compact
  def __call__(self, x: Array, context: Array) -> Array:
    kw = dict(dtype=self.dtype, precision=self.precision)
    attn = dict(heads=self.heads, head_dim=self.head_dim, upcast_attention=self.upcast_attention,
                attention_chunk=self.attention_chunk, **kw)
    x = x + Attention(name="attn1", **attn)(LayerNorm(1e-5, self.dtype, name="norm1")(x))
    x = x + Attention(name="attn2", **attn)(LayerNorm(1e-5, self.dtype, name="norm2")(x), context)
    return x + FeedForward(name="ff", **kw)(LayerNorm(1e-5, self.dtype, name="norm3")(x))


_RematTransformerBlock = nn.remat(BasicTransformerBlock)


class Transformer2DModel(nn.Module):
  """Spatial transformer: GroupNorm, proj_in, `num_layers` transformer blocks, proj_out, residual.

  The projections are 1x1 convolutions, or Dense layers on the flattened tokens when
  `use_linear_projection` (SD 2.x). The GroupNorm uses eps 1e-6 as in diffusers.
  """
  heads: int
  head_dim: int
  num_layers: int
  groups: int
  use_linear_projection: bool = False
  upcast_attention: bool = False
  remat: bool = False
  dtype: Dtype = jnp.float32
  precision: Any = DEFAULT_PRECISION
  attention_chunk: int | None = attention.DEFAULT_QUERY_CHUNK

  @nn.compact
  def __call__(self, x: Array, context: Array) -> Array:
    kw = dict(dtype=self.dtype, precision=self.precision)
    b, h, w, c = x.shape
    inner = self.heads * self.head_dim
    residual = x.astype(self.dtype)
    y = GroupNorm(self.groups, 1e-6, self.dtype, name="norm")(x)
    if self.use_linear_projection:
      y = Dense(inner, name="proj_in", **kw)(y.reshape(b, h * w, c))
    else:
      y = Conv(inner, kernel_size=1, padding=0, name="proj_in", **kw)(y).reshape(b, h * w, inner)
    block_cls = _RematTransformerBlock if self.remat else BasicTransformerBlock
    for i in range(self.num_layers):
      y = block_cls(self.heads, self.head_dim, self.upcast_attention,
                    attention_chunk=self.attention_chunk, name=f"transformer_blocks_{i}",
                    **kw)(y, context)
    if self.use_linear_projection:
      y = Dense(c, name="proj_out", **kw)(y).reshape(b, h, w, c)
    else:
      y = Conv(c, kernel_size=1, padding=0, name="proj_out", **kw)(y.reshape(b, h, w, inner))
    return y + residual


_RematResnetBlock2D = nn.remat(ResnetBlock2D)


class Downsample2D(nn.Module):
  """Stride-2 3x3 convolution `conv`."""
  out_channels: int
  padding: int = 1
  dtype: Dtype = jnp.float32
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return Conv(self.out_channels, stride=2, padding=self.padding, dtype=self.dtype,
                precision=self.precision, name="conv")(x)


class Upsample2D(nn.Module):
  """Nearest-neighbour 2x upsampling (or to an explicit size), then the 3x3 convolution `conv`."""
  out_channels: int
  dtype: Dtype = jnp.float32
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x: Array, size: tuple[int, int] | None = None) -> Array:
    size = (2 * x.shape[1], 2 * x.shape[2]) if size is None else tuple(size)
    x = upsample_nearest(x, size)
    return Conv(self.out_channels, dtype=self.dtype, precision=self.precision, name="conv")(x)


class _BlockSettings(nn.Module):
  """Fields shared by the down, mid and up blocks."""
  out_channels: int
  num_layers: int
  groups: int
  eps: float
  cross_attention: bool = False
  heads: int = 1
  transformer_layers: int = 1
  use_linear_projection: bool = False
  upcast_attention: bool = False
  remat: bool = False
  dtype: Dtype = jnp.float32
  precision: Any = DEFAULT_PRECISION
  attention_chunk: int | None = attention.DEFAULT_QUERY_CHUNK

  def _resnet(self, name: str, output_scale_factor: float = 1.0) -> nn.Module:
    cls = _RematResnetBlock2D if self.remat else ResnetBlock2D
    return cls(self.out_channels, self.groups, self.eps, output_scale_factor, dtype=self.dtype,
               precision=self.precision, name=name)

  def _transformer(self, name: str) -> nn.Module:
    return Transformer2DModel(heads=self.heads,
                              head_dim=self.out_channels // self.heads,
                              num_layers=self.transformer_layers,
                              groups=self.groups,
                              use_linear_projection=self.use_linear_projection,
                              upcast_attention=self.upcast_attention,
                              remat=self.remat,
                              dtype=self.dtype,
                              precision=self.precision,
                              attention_chunk=self.attention_chunk,
                              name=name)


class DownBlock(_BlockSettings):
  """`CrossAttnDownBlock2D` (with `cross_attention`) or `DownBlock2D`.

  Returns the block output and the skip tensors it hands to the decoder: the output of every
  layer, plus the downsampled output when `add_downsample`.
  """
  add_downsample: bool = True
  downsample_padding: int = 1

  @nn.compact
  def __call__(self, x: Array, temb: Array,
               context: Array | None) -> tuple[Array, tuple[Array, ...]]:
    skips = []
    for i in range(self.num_layers):
      x = self._resnet(f"resnets_{i}")(x, temb)
      if self.cross_attention:
        x = self._transformer(f"attentions_{i}")(x, context)
      skips.append(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, self.downsample_padding, dtype=self.dtype,
                       precision=self.precision, name="downsamplers_0")(x)
      skips.append(x)
    return x, tuple(skips)


class MidBlock(_BlockSettings):
  """`UNetMidBlock2DCrossAttn`: ResNet, then `num_layers` x (transformer, ResNet)."""
  output_scale_factor: float = 1.0

  @nn.compact
  def __call__(self, x: Array, temb: Array, context: Array) -> Array:
    x = self._resnet("resnets_0", self.output_scale_factor)(x, temb)
    for i in range(self.num_layers):
      x = self._transformer(f"attentions_{i}")(x, context)
      x = self._resnet(f"resnets_{i + 1}", self.output_scale_factor)(x, temb)
    return x


class UpBlock(_BlockSettings):
  """`CrossAttnUpBlock2D` (with `cross_attention`) or `UpBlock2D`.

  Each layer concatenates the last remaining skip tensor on the channel axis before its ResNet.
  The final upsampling goes to `upsample_size` (the next skip's spatial size).
  """
  add_upsample: bool = True

  @nn.compact
  def __call__(self, x: Array, skips: Sequence[Array], temb: Array, context: Array | None,
               upsample_size: tuple[int, int] | None = None) -> Array:
    if len(skips) != self.num_layers:
      raise ValueError(f"{self.name}: {len(skips)} skip tensors for {self.num_layers} layers.")
    skips = list(skips)
    for i in range(self.num_layers):
      skip = skips.pop()
      x = jnp.concatenate([x.astype(self.dtype), skip.astype(self.dtype)], axis=-1)
      x = self._resnet(f"resnets_{i}")(x, temb)
      if self.cross_attention:
        x = self._transformer(f"attentions_{i}")(x, context)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, dtype=self.dtype, precision=self.precision,
                     name="upsamplers_0")(x, upsample_size)
    return x


# ------------------------------------------------------------------------------------------------
# The U-Net.
# ------------------------------------------------------------------------------------------------


def _per_block(value: Any, n: int, what: str) -> tuple:
  """An int (or None) repeated `n` times, or a length-`n` sequence as a tuple."""
  if value is None or isinstance(value, (int, np.integer)):
    return (value,) * n
  value = tuple(value)
  if len(value) != n:
    raise ValueError(f"{what} has {len(value)} entries for {n} blocks: {value!r}.")
  return value


class UNet2DConditionModel(nn.Module):
  """diffusers' `UNet2DConditionModel` for SD 1.x / 2.x, NHWC.

  The fields carry the diffusers config names and defaults (build from a `unet/config.json`
  with `unet_from_config`). As in diffusers, `attention_head_dim` is the NUMBER of heads per
  block unless `num_attention_heads` is given; each transformer's head dimension is the block
  width divided by that number (SD 1.x: 8 heads everywhere; SD 2.x: [5, 10, 20, 20] heads,
  i.e. 64 channels each).

  Attributes:
    sample_size: the latent resolution the model was trained at (informative only).
    in_channels: channels of `sample`.
    out_channels: channels of the output.
    center_input_sample: map the input x to 2x - 1 first.
    flip_sin_to_cos: timestep features ordered [cos, sin] instead of [sin, cos].
    freq_shift: `downscale_freq_shift` of the timestep features.
    down_block_types: per resolution, "CrossAttnDownBlock2D" or "DownBlock2D".
    mid_block_type: only "UNetMidBlock2DCrossAttn".
    up_block_types: per resolution, "UpBlock2D" or "CrossAttnUpBlock2D".
    block_out_channels: channels per resolution.
    layers_per_block: ResNet layers per encoder block (int or one per block); decoder blocks
      have one more.
    downsample_padding: padding of the stride-2 downsampling convolutions (0 pads bottom/right).
    mid_block_scale_factor: output scale divisor of the middle ResNets.
    act_fn: "silu" (alias "swish"); the only activation supported.
    norm_num_groups: GroupNorm groups of the ResNets, transformers and output norm.
    norm_eps: GroupNorm eps of the ResNets and of the output norm.
    cross_attention_dim: feature size of `encoder_hidden_states`.
    transformer_layers_per_block: transformer blocks per spatial transformer (int or per block).
    attention_head_dim: heads per block when `num_attention_heads` is None (int or per block).
    num_attention_heads: heads per block (int or per block), overriding `attention_head_dim`.
    use_linear_projection: Dense proj_in/proj_out (SD 2.x) instead of 1x1 convolutions.
    upcast_attention: compute attention scores from float32 queries and keys.
    time_embedding_dim: width of the time embedding; None means 4 * block_out_channels[0].
    dtype: compute dtype (float32 or bfloat16); parameters stay float32.
    precision: precision of matmuls and convolutions.
    remat: rematerialise each ResNet block and each transformer block in the backward pass.
    attention_chunk: queries attended at a time (a positive int), or None (or 0) for all at
      once; see `sid_jax.nets.attention.DEFAULT_QUERY_CHUNK` for the default.
  """
  sample_size: int | None = None
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                       "CrossAttnDownBlock2D", "DownBlock2D")
  mid_block_type: str = "UNetMidBlock2DCrossAttn"
  up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                     "CrossAttnUpBlock2D")
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int | tuple[int, ...] = 2
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  act_fn: str = "silu"
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int = 1280
  transformer_layers_per_block: int | tuple[int, ...] = 1
  attention_head_dim: int | tuple[int, ...] = 8
  num_attention_heads: int | tuple[int, ...] | None = None
  use_linear_projection: bool = False
  upcast_attention: bool = False
  time_embedding_dim: int | None = None
  dtype: Dtype = jnp.float32
  precision: Any = DEFAULT_PRECISION
  remat: bool = False
  attention_chunk: int | None = attention.DEFAULT_QUERY_CHUNK

  def block_settings(self) -> dict[str, tuple]:
    """Validated per-block settings: heads, layers, transformer_layers (encoder order)."""
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError(f"block_out_channels {self.block_out_channels}, down_block_types "
                       f"{self.down_block_types} and up_block_types {self.up_block_types} must "
                       "have the same length.")
    for kind in self.down_block_types:
      if kind not in _DOWN_BLOCKS:
        raise ValueError(f"Unsupported down_block_types entry {kind!r} (supported: "
                         f"{_DOWN_BLOCKS}).")
    for kind in self.up_block_types:
      if kind not in _UP_BLOCKS:
        raise ValueError(f"Unsupported up_block_types entry {kind!r} (supported: {_UP_BLOCKS}).")
    if self.mid_block_type not in _MID_BLOCKS:
      raise ValueError(f"Unsupported mid_block_type {self.mid_block_type!r} (supported: "
                       f"{_MID_BLOCKS}).")
    if self.act_fn not in _ACTIVATIONS:
      raise ValueError(f"Unsupported act_fn {self.act_fn!r} (supported: {_ACTIVATIONS}).")
    if self.downsample_padding not in (0, 1):
      raise ValueError(f"Unsupported downsample_padding {self.downsample_padding!r} (0 or 1).")
    attention.check_query_chunk(self.attention_chunk, "attention_chunk")
    if not isinstance(self.cross_attention_dim, (int, np.integer)):
      raise ValueError(f"cross_attention_dim must be one int, got {self.cross_attention_dim!r}.")
    heads = self.num_attention_heads
    heads = _per_block(self.attention_head_dim if heads is None else heads, n,
                       "attention_head_dim" if heads is None else "num_attention_heads")
    layers = _per_block(self.layers_per_block, n, "layers_per_block")
    transformer_layers = _per_block(self.transformer_layers_per_block, n,
                                    "transformer_layers_per_block")
    for what, values in (("heads", heads), ("layers_per_block", layers),
                         ("transformer_layers_per_block", transformer_layers)):
      if not all(isinstance(v, (int, np.integer)) and v > 0 for v in values):
        raise ValueError(f"{what} must be positive ints (one or one per block), got {values!r}.")
    return dict(heads=heads, layers=layers, transformer_layers=transformer_layers)

  @nn.compact
  def __call__(self, sample: Array, timesteps: Array | int | float,
               encoder_hidden_states: Array) -> Array:
    """The noise (or v) prediction.

    Args:
      sample: [B, H, W, in_channels] latents.
      timesteps: [B] (or a scalar, broadcast to B) integer or float timesteps.
      encoder_hidden_states: [B, L, cross_attention_dim] text encoder states.

    Returns:
      [B, H, W, out_channels] in the compute dtype.
    """
    settings = self.block_settings()
    channels = self.block_out_channels
    n = len(channels)
    common = dict(groups=self.norm_num_groups, eps=self.norm_eps,
                  use_linear_projection=self.use_linear_projection,
                  upcast_attention=self.upcast_attention, remat=self.remat, dtype=self.dtype,
                  precision=self.precision,
                  attention_chunk=attention.check_query_chunk(self.attention_chunk))
    batch = sample.shape[0]

    timesteps = jnp.asarray(timesteps)
    if timesteps.ndim == 0:
      timesteps = timesteps[None]
    timesteps = jnp.broadcast_to(timesteps, (batch,))
    feats = timestep_features(timesteps, channels[0], self.flip_sin_to_cos, self.freq_shift)
    temb_dim = self.time_embedding_dim or 4 * channels[0]
    temb = TimestepEmbedding(temb_dim, dtype=self.dtype, precision=self.precision,
                             name="time_embedding")(feats.astype(self.dtype))
    context = encoder_hidden_states.astype(self.dtype)

    x = sample.astype(self.dtype)
    if self.center_input_sample:
      x = 2 * x - 1
    x = Conv(channels[0], dtype=self.dtype, precision=self.precision, name="conv_in")(x)

    skips = [x]
    for i, kind in enumerate(self.down_block_types):
      x, block_skips = DownBlock(out_channels=channels[i],
                                 num_layers=settings["layers"][i],
                                 cross_attention=kind == "CrossAttnDownBlock2D",
                                 heads=settings["heads"][i],
                                 transformer_layers=settings["transformer_layers"][i],
                                 add_downsample=i < n - 1,
                                 downsample_padding=self.downsample_padding,
                                 name=f"down_blocks_{i}",
                                 **common)(x, temb, context)
      skips.extend(block_skips)

    x = MidBlock(out_channels=channels[-1],
                 num_layers=1,
                 cross_attention=True,
                 heads=settings["heads"][-1],
                 transformer_layers=settings["transformer_layers"][-1],
                 output_scale_factor=float(self.mid_block_scale_factor),
                 name="mid_block",
                 **common)(x, temb, context)

    for i, kind in enumerate(self.up_block_types):
      j = n - 1 - i  # the encoder block at this resolution
      num_layers = settings["layers"][j] + 1
      block_skips, skips = skips[-num_layers:], skips[:-num_layers]
      upsample_size = tuple(skips[-1].shape[1:3]) if i < n - 1 else None
      x = UpBlock(out_channels=channels[j],
                  num_layers=num_layers,
                  cross_attention=kind == "CrossAttnUpBlock2D",
                  heads=settings["heads"][j],
                  transformer_layers=settings["transformer_layers"][j],
                  add_upsample=i < n - 1,
                  name=f"up_blocks_{i}",
                  **common)(x, block_skips, temb, context, upsample_size)

    x = nn.silu(GroupNorm(self.norm_num_groups, self.norm_eps, self.dtype, name="conv_norm_out")(x))
    return Conv(self.out_channels, dtype=self.dtype, precision=self.precision, name="conv_out")(x)


# ------------------------------------------------------------------------------------------------
# diffusers config.json -> module.
# ------------------------------------------------------------------------------------------------

# Config keys that become module fields (same names).
_FIELDS = ("sample_size", "in_channels", "out_channels", "center_input_sample", "flip_sin_to_cos",
           "freq_shift", "down_block_types", "mid_block_type", "up_block_types",
           "block_out_channels", "layers_per_block", "downsample_padding",
           "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps",
           "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim",
           "num_attention_heads", "use_linear_projection", "upcast_attention",
           "time_embedding_dim")

# Config keys this port implements only at one value (diffusers' default): anything else
# changes the architecture or the computation.
_FIXED = {
    "dropout": 0.0,
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "resnet_time_scale_shift": "default",
    "reverse_transformer_layers_per_block": None,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
}

# Config keys that cannot affect the supported blocks: they configure only SimpleCrossAttn /
# ResnetDownsample blocks or embeddings that `_FIXED` already rules out.
_NO_EFFECT = ("resnet_skip_time_act", "resnet_out_scale_factor", "cross_attention_norm",
              "mid_block_only_cross_attention", "addition_embed_type_num_heads",
              "projection_class_embeddings_input_dim")


def _as_tuple(value: Any) -> Any:
  """JSON lists -> tuples (hashable module fields); nested lists are kept as nested tuples."""
  if isinstance(value, list):
    return tuple(_as_tuple(v) for v in value)
  return value


def unet_from_config(config: Mapping[str, Any], **overrides: Any) -> UNet2DConditionModel:
  """A `UNet2DConditionModel` from the contents of a diffusers `unet/config.json`.

  Missing keys take diffusers' defaults. Keys starting with "_" (`_class_name`,
  `_diffusers_version`, `_name_or_path`) are ignored, and so are the keys listed in
  `_NO_EFFECT`. Keys in `_FIXED` must have the value this port implements. `overrides` are module
  fields (e.g. `dtype=jnp.bfloat16`, `remat=True`, `attention_chunk=None`) that replace the
  config's.

  Raises:
    ValueError naming the key and the value of an unsupported or unknown setting.
  """
  class_name = config.get("_class_name", "UNet2DConditionModel")
  if class_name != "UNet2DConditionModel":
    raise ValueError(f"Unsupported _class_name {class_name!r}: expected 'UNet2DConditionModel'.")
  kwargs: dict[str, Any] = {}
  for key, raw in config.items():
    if key.startswith("_") or key in _NO_EFFECT:
      continue

    def reject(why: str, key: str = key, raw: Any = raw) -> ValueError:
      return ValueError(f"Unsupported UNet config {key}={raw!r}: {why}")

    if key in _FIXED:
      wanted = _FIXED[key]
      value = any(raw) if key == "only_cross_attention" and isinstance(raw, list) else raw
      if value != wanted:
        raise reject(f"this port implements only {key}={wanted!r}.")
      continue
    if key not in _FIELDS:
      raise ValueError(f"Unknown UNet config key {key}={raw!r}.")
    value = _as_tuple(raw)
    if key == "cross_attention_dim" and isinstance(value, tuple):
      if len(set(value)) != 1:
        raise reject("one encoder width for all blocks is required.")
      value = value[0]
    if key == "norm_num_groups" and value is None:
      raise reject("GroupNorm is required.")
    if key == "transformer_layers_per_block" and isinstance(value, tuple) and any(
        isinstance(v, tuple) for v in value):
      raise reject("per-layer (asymmetric) lists are not supported.")
    if key == "mid_block_type" and value not in _MID_BLOCKS:
      raise reject(f"supported: {_MID_BLOCKS}.")
    if key in ("down_block_types", "up_block_types"):
      allowed = _DOWN_BLOCKS if key == "down_block_types" else _UP_BLOCKS
      bad = [v for v in value if v not in allowed]
      if bad:
        raise reject(f"{bad} not in {allowed}.")
    if key == "act_fn" and value not in _ACTIVATIONS:
      raise reject(f"supported: {_ACTIVATIONS}.")
    kwargs[key] = value
  unknown = set(overrides) - set(UNet2DConditionModel.__dataclass_fields__) - {"parent", "name"}
  if unknown:
    raise ValueError(f"Unknown UNet2DConditionModel fields in overrides: {sorted(unknown)}.")
  kwargs.update(overrides)
  module = UNet2DConditionModel(**kwargs)
  module.block_settings()  # fail now, not at the first call
  return module


# The architecture settings of the SD 1.5 and SD 2.1-base `unet/config.json` files, to build the
# full-size modules without a download.
SD15_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
}

SD21_BASE_UNET_CONFIG: dict[str, Any] = {
    **SD15_UNET_CONFIG,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "resnet_time_scale_shift": "default",
    "upcast_attention": False,
    "use_linear_projection": True,
}
