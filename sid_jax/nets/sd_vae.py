"""Stable Diffusion's variational autoencoder (diffusers `AutoencoderKL`) in Flax linen, NHWC.

The network is the KL-regularised autoencoder of latent diffusion as diffusers configures it for
Stable Diffusion: an encoder of `DownEncoderBlock2D`s (ResNet blocks, then a stride-2 convolution
on a bottom/right zero-padded input except after the last block), a middle block (ResNet, one
single-head self-attention with its own GroupNorm and a residual connection, ResNet), GroupNorm,
SiLU and a 3x3 convolution to `2 * latent_channels` channels (posterior mean and log-variance);
the decoder mirrors it with `UpDecoderBlock2D`s (`layers_per_block + 1` ResNet blocks, then a
nearest-neighbour 2x upsampling and a 3x3 convolution except after the last block). Optional 1x1
`quant_conv` / `post_quant_conv` sit between the encoder, the latent and the decoder. Every
GroupNorm has eps 1e-6.

Naming. Submodules are named like diffusers' attributes, with a list index `i` appended as `_i`,
so a Flax path maps to the torch name by turning `_<digits>` suffixes into `.<digits>` and the
leaf `kernel` / `scale` into `weight`: `decoder/up_blocks_0/resnets_1/conv1/kernel` is
`decoder.up_blocks.0.resnets.1.conv1.weight` and `encoder/mid_block/attentions_0/to_out_0/kernel`
is `encoder.mid_block.attentions.0.to_out.0.weight`. The importer lives in
`sid_jax.weights.sd_vae`.

Precision. Parameters are float32. Convolutions and projections compute in the module's `dtype`
(float32 by default, bfloat16 allowed) with `precision` (HIGHEST by default); GroupNorm statistics
and the attention softmax are always computed in float32. As in diffusers' pipelines, a VAE whose
config says `force_upcast` computes in float32 when asked for float16 (its activations overflow
float16); bfloat16 has float32's range and is kept.

Memory. The mid-block attention runs over blocks of `attention_chunk` queries
(`sid_jax.nets.attention`): a 64x64 latent (512 px images) has 4096 tokens, whose whole score
tensor is 64 MiB per image.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sid_jax.nets import attention
from sid_jax.nets import sd_unet

Array = jax.Array

DEFAULT_PRECISION = jax.lax.Precision.HIGHEST
NORM_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)

DOWN_BLOCK_TYPE = "DownEncoderBlock2D"
UP_BLOCK_TYPE = "UpDecoderBlock2D"
_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {"silu": nn.silu, "swish": nn.silu}


class _Spec(NamedTuple):
  """What every layer shares: compute dtype, precision, groups, activation, attention blocks."""
  dtype: Any
  precision: Any
  groups: int
  act_fn: str
  attention_chunk: int | None = attention.DEFAULT_QUERY_CHUNK

  def act(self, x: Array) -> Array:
    return _ACTIVATIONS[self.act_fn](x)

  def conv(self, features: int, size: int, name: str, stride: int = 1,
           padding: Any = None) -> nn.Conv:
    """A `size`x`size` convolution, 'same' padded unless `padding` says otherwise."""
    if padding is None:
      padding = ((size // 2, size // 2),) * 2
    return nn.Conv(features, (size, size), strides=(stride, stride), padding=padding,
                   dtype=self.dtype, param_dtype=jnp.float32, precision=self.precision,
                   name=name)

  def dense(self, features: int, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=self.dtype, param_dtype=jnp.float32,
                    precision=self.precision, name=name)

  def norm(self, name: str) -> sd_unet.GroupNorm:
    # The UNet's GroupNorm (statistics in float32), with the VAE's eps.
    return sd_unet.GroupNorm(self.groups, NORM_EPS, self.dtype, name=name)


class ResnetBlock(nn.Module):
  """diffusers `ResnetBlock2D` without time embedding: two norm-act-conv stages plus a skip.

  The skip is a 1x1 `conv_shortcut` when the channel count changes, the identity otherwise.
  """
  out_channels: int
  spec: _Spec

  @nn.compact
  def __call__(self, x: Array) -> Array:
    s = self.spec
    h = s.conv(self.out_channels, 3, "conv1")(s.act(s.norm("norm1")(x)))
    h = s.conv(self.out_channels, 3, "conv2")(s.act(s.norm("norm2")(h)))
    if x.shape[-1] != self.out_channels:
      x = s.conv(self.out_channels, 1, "conv_shortcut")(x)
    return x + h


class SelfAttention(nn.Module):
  """The middle block's attention: GroupNorm, one head over all pixels, projection, residual.

  Parameter names follow diffusers' `Attention` (`group_norm`, `to_q`, `to_k`, `to_v`,
  `to_out.0`); the head dimension is the channel count, so scores are scaled by C^-1/2.
  """
  spec: _Spec

  @nn.compact
  def __call__(self, x: Array) -> Array:
    s = self.spec
    batch, height, width, channels = x.shape
    h = s.norm("group_norm")(x).reshape(batch, height * width, channels)
    # One head: [B, T, C] -> [B, T, 1, C].
    q = s.dense(channels, "to_q")(h)[:, :, None]
    k = s.dense(channels, "to_k")(h)[:, :, None]
    v = s.dense(channels, "to_v")(h)[:, :, None]
    h = attention.dot_product_attention(q, k, v, scale=channels**-0.5, precision=s.precision,
                                        query_chunk=s.attention_chunk)[:, :, 0]
    h = s.dense(channels, "to_out_0")(h).reshape(x.shape)
    return x + h


class MidBlock(nn.Module):
  """diffusers `UNetMidBlock2D` as the VAE uses it: ResNet, [attention], ResNet."""
  spec: _Spec
  add_attention: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    channels = x.shape[-1]
    x = ResnetBlock(channels, self.spec, name="resnets_0")(x)
    if self.add_attention:
      x = SelfAttention(self.spec, name="attentions_0")(x)
    return ResnetBlock(channels, self.spec, name="resnets_1")(x)


class Downsample(nn.Module):
  """Zero-pads one row/column at the bottom/right, then a 3x3 stride-2 convolution `conv`."""
  spec: _Spec

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return self.spec.conv(x.shape[-1], 3, "conv", stride=2, padding=((0, 1), (0, 1)))(x)


class Upsample(nn.Module):
  """Nearest-neighbour 2x upsampling, then a 3x3 convolution `conv`."""
  spec: _Spec

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self.spec.conv(x.shape[-1], 3, "conv")(x)


class DownEncoderBlock(nn.Module):
  """diffusers `DownEncoderBlock2D`: `num_layers` ResNet blocks, then optionally `Downsample`."""
  out_channels: int
  num_layers: int
  add_downsample: bool
  spec: _Spec

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for i in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.spec, name=f"resnets_{i}")(x)
    if self.add_downsample:
      x = Downsample(self.spec, name="downsamplers_0")(x)
    return x


class UpDecoderBlock(nn.Module):
  """diffusers `UpDecoderBlock2D`: `num_layers` ResNet blocks, then optionally `Upsample`."""
  out_channels: int
  num_layers: int
  add_upsample: bool
  spec: _Spec

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for i in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.spec, name=f"resnets_{i}")(x)
    if self.add_upsample:
      x = Upsample(self.spec, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """Image -> `2 * latent_channels` posterior parameters (before `quant_conv`)."""
  latent_channels: int
  block_out_channels: tuple[int, ...]
  layers_per_block: int
  mid_block_add_attention: bool
  spec: _Spec

  @nn.compact
  def __call__(self, x: Array) -> Array:
    s = self.spec
    chans = self.block_out_channels
    x = s.conv(chans[0], 3, "conv_in")(x)
    for i, channels in enumerate(chans):
      x = DownEncoderBlock(channels, self.layers_per_block, i < len(chans) - 1, s,
                           name=f"down_blocks_{i}")(x)
    x = MidBlock(s, self.mid_block_add_attention, name="mid_block")(x)
    x = s.act(s.norm("conv_norm_out")(x))
    return s.conv(2 * self.latent_channels, 3, "conv_out")(x)


class Decoder(nn.Module):
  """Latent (after `post_quant_conv`) -> image with `out_channels` channels."""
  out_channels: int
  block_out_channels: tuple[int, ...]
  layers_per_block: int
  mid_block_add_attention: bool
  spec: _Spec

  @nn.compact
  def __call__(self, z: Array) -> Array:
    s = self.spec
    chans = tuple(reversed(self.block_out_channels))
    x = s.conv(chans[0], 3, "conv_in")(z)
    x = MidBlock(s, self.mid_block_add_attention, name="mid_block")(x)
    for i, channels in enumerate(chans):
      x = UpDecoderBlock(channels, self.layers_per_block + 1, i < len(chans) - 1, s,
                         name=f"up_blocks_{i}")(x)
    x = s.act(s.norm("conv_norm_out")(x))
    return s.conv(self.out_channels, 3, "conv_out")(x)


class AutoencoderKL(nn.Module):
  """Stable Diffusion's VAE (diffusers `AutoencoderKL` with Down/UpEncoder/DecoderBlock2D).

  Images are NHWC in [-1, 1]; latents are NHWC with `latent_channels` channels at
  1 / 2^(len(block_out_channels) - 1) of the image resolution. The defaults are SD 1.x/2.x's.

  Attributes:
    in_channels: image channels fed to the encoder.
    out_channels: image channels produced by the decoder.
    latent_channels: channels of the latent.
    block_out_channels: channels of each down block (the up blocks use them reversed).
    layers_per_block: ResNet blocks per down block (up blocks have one more).
    norm_num_groups: GroupNorm groups everywhere.
    act_fn: 'silu' (alias 'swish').
    mid_block_add_attention: whether the middle blocks have their self-attention.
    use_quant_conv: whether a 1x1 `quant_conv` follows the encoder.
    use_post_quant_conv: whether a 1x1 `post_quant_conv` precedes the decoder.
    scaling_factor: latents fed to the diffusion model are `z * scaling_factor`.
    force_upcast: the config's flag that the VAE overflows in float16 (see `compute_dtype`).
    dtype: requested compute dtype; parameters stay float32.
    precision: `jax.lax.Precision` of convolutions and matmuls.
    attention_chunk: queries the mid-block attention takes at a time (a positive int), or None
      (or 0) for all at once.
  """
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  act_fn: str = "silu"
  mid_block_add_attention: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  scaling_factor: float = 0.18215
  force_upcast: bool = True
  dtype: Any = jnp.float32
  precision: Any = DEFAULT_PRECISION
  attention_chunk: int | None = attention.DEFAULT_QUERY_CHUNK

  @property
  def compute_dtype(self) -> Any:
    """`dtype`, except float32 when `force_upcast` is set and float16 is asked for."""
    if self.force_upcast and jnp.dtype(self.dtype) == jnp.float16:
      return jnp.float32
    return self.dtype

  @property
  def downsampling_factor(self) -> int:
    """Image resolution / latent resolution."""
    return 2 ** (len(self.block_out_channels) - 1)

  def setup(self):
    if self.act_fn not in _ACTIVATIONS:
      raise ValueError(f"act_fn={self.act_fn!r} is not supported (use one of "
                       f"{sorted(_ACTIVATIONS)}).")
    chunk = attention.check_query_chunk(self.attention_chunk, "attention_chunk")
    spec = _Spec(self.compute_dtype, self.precision, self.norm_num_groups, self.act_fn, chunk)
    chans = tuple(self.block_out_channels)
    self.encoder = Encoder(self.latent_channels, chans, self.layers_per_block,
                           self.mid_block_add_attention, spec)
    self.decoder = Decoder(self.out_channels, chans, self.layers_per_block,
                           self.mid_block_add_attention, spec)
    self.quant_conv = (spec.conv(2 * self.latent_channels, 1, "quant_conv")
                       if self.use_quant_conv else None)
    self.post_quant_conv = (spec.conv(self.latent_channels, 1, "post_quant_conv")
                            if self.use_post_quant_conv else None)

  def encode(self, x: Array) -> tuple[Array, Array]:
    """Images NHWC in [-1, 1] -> (mean, logvar) of the diagonal Gaussian posterior.

    `logvar` is clipped to [-30, 20] like diffusers' `DiagonalGaussianDistribution`. Both are in
    the compute dtype, NHWC with `latent_channels` channels, unscaled (multiply a sample by
    `scaling_factor` to get diffusion-model latents).
    """
    h = self.encoder(jnp.asarray(x, self.compute_dtype))
    if self.quant_conv is not None:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z: Array) -> Array:
    """Unscaled latents NHWC -> images NHWC (nominally in [-1, 1], not clipped)."""
    z = jnp.asarray(z, self.compute_dtype)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def decode_scaled(self, latents: Array) -> Array:
    """Diffusion-model latents (`z * scaling_factor`) -> images: `decode(latents / factor)`."""
    return self.decode(jnp.asarray(latents, self.compute_dtype) / self.scaling_factor)

  def __call__(self, x: Array) -> Array:
    """Reconstruction through the posterior mean; touches (and so initialises) every parameter."""
    mean, _ = self.encode(x)
    return self.decode(mean)


def to_uint8(images: Array) -> Array:
  """Decoded images in [-1, 1] -> uint8 like SiD-LSG: clip(x * 127.5 + 128, 0, 255), truncated.

  The arithmetic is float32 (the reference's dtype); the cast truncates toward zero, so -1 maps
  to 0 (0.5 truncated), 0 to 128 and 1 to 255 (255.5 clipped).
  """
  x = jnp.asarray(images, jnp.float32)
  return jnp.clip(x * 127.5 + 128.0, 0.0, 255.0).astype(jnp.uint8)


# Config keys of diffusers' AutoencoderKL that change nothing here.
_IGNORED_KEYS = frozenset({"sample_size"})
# Config keys that must be null: the features they switch on are not implemented.
_MUST_BE_NULL = ("shift_factor", "latents_mean", "latents_std")
_FIELD_KEYS = ("in_channels", "out_channels", "latent_channels", "block_out_channels",
               "layers_per_block", "norm_num_groups", "act_fn", "mid_block_add_attention",
               "use_quant_conv", "use_post_quant_conv", "scaling_factor", "force_upcast")


def vae_from_config(config: Mapping[str, Any], **overrides) -> AutoencoderKL:
  """An `AutoencoderKL` from the contents of a diffusers `vae/config.json`.

  Keys starting with '_' (`_class_name`, `_diffusers_version`, ...) and `sample_size` are
  ignored; diffusers' defaults apply to absent keys. Anything this port cannot reproduce raises.

  Args:
    config: the parsed config.
    **overrides: module fields to set on top of the config, e.g. `dtype=jnp.bfloat16` or
      `attention_chunk=None`.

  Raises:
    ValueError naming the key and value of any unsupported entry: an unknown key, a block type
      other than DownEncoderBlock2D / UpDecoderBlock2D, block-type lists whose lengths differ from
      `block_out_channels`, an unsupported `act_fn`, or a non-null `shift_factor` /
      `latents_mean` / `latents_std`.
  """
  # diffusers' AutoencoderKL defaults, where they differ from the SD defaults of the module.
  fields: dict[str, Any] = {"block_out_channels": (64,), "layers_per_block": 1}
  # diffusers' default is one block of each type.
  block_types = {"down_block_types": [DOWN_BLOCK_TYPE], "up_block_types": [UP_BLOCK_TYPE]}
  for key, value in config.items():
    if key.startswith("_") or key in _IGNORED_KEYS:
      continue
    if key in _MUST_BE_NULL:
      if value is not None:
        raise ValueError(f"Unsupported VAE config {key}={value!r}: only null is supported.")
    elif key in ("down_block_types", "up_block_types"):
      want = DOWN_BLOCK_TYPE if key == "down_block_types" else UP_BLOCK_TYPE
      for block_type in value:
        if block_type != want:
          raise ValueError(f"Unsupported VAE config {key}={list(value)!r}: every block must be "
                           f"{want!r}, got {block_type!r}.")
      block_types[key] = list(value)
    elif key == "act_fn":
      if value not in _ACTIVATIONS:
        raise ValueError(f"Unsupported VAE config act_fn={value!r}: use one of "
                         f"{sorted(_ACTIVATIONS)}.")
      fields[key] = value
    elif key == "block_out_channels":
      fields[key] = tuple(int(c) for c in value)
    elif key in _FIELD_KEYS:
      fields[key] = value
    else:
      raise ValueError(f"Unsupported VAE config key {key}={value!r}.")
  channels = fields["block_out_channels"]
  for key, types in block_types.items():
    if len(types) != len(channels):
      raise ValueError(f"Unsupported VAE config {key}={types!r}: {len(types)} blocks, but "
                       f"block_out_channels={list(channels)!r} has {len(channels)}.")
  fields.update(overrides)
  return AutoencoderKL(**fields)


def example_image(module: AutoencoderKL, batch: int = 1) -> np.ndarray:
  """The smallest image batch `module` accepts (one latent pixel), e.g. for `init`."""
  size = module.downsampling_factor
  return np.zeros((batch, size, size, module.in_channels), np.float32)
