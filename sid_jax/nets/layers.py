"""Building blocks of the EDM networks (DDPM++, NCSN++, ADM) in Flax linen.

Everything here is NHWC. Each layer computes in the dtype of its input (float32 normally,
float64 when jax x64 is on), casting its parameters to that dtype, like the reference PyTorch code
does. Parameter names follow the official torch layers so that a converter can map them one to
one: `weight` -> `kernel` (Linear `[in, out]`, Conv2d HWIO) or `scale` (GroupNorm);
`bias` -> `bias`.

The initialisers reproduce the official distributions (not the official random streams): the EDM
code draws every weight and bias from one of four laws scaled by `init_weight` / `init_bias`,
see `InitSpec`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sid_jax import sharding

Array = jax.Array

# The reference implementation runs in full float32 (EDM disables TF32), so by default every
# matmul and convolution asks for the highest precision. On CPU this is also the default; on
# GPU/TPU it avoids TF32/bfloat16 passes. Callers that prefer speed can pass precision=None.
DEFAULT_PRECISION = jax.lax.Precision.HIGHEST


class InitSpec(NamedTuple):
  """How a weight/bias pair is initialised: `mode` law, times `weight` (kernel) and `bias`."""
  mode: str = "kaiming_normal"
  weight: float = 1.0
  bias: float = 0.0


def edm_initializer(mode: str, fan_in: int, fan_out: int, scale: float):
  """An initialiser drawing from the EDM law `mode` (fan-in/out as given) times `scale`."""
  if mode not in ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal"):
    raise ValueError(f"Invalid init mode {mode!r}.")

  def init(key, shape, dtype=jnp.float32):
    if scale == 0:
      return jnp.zeros(shape, dtype)
    if mode == "xavier_uniform":
      std, uniform = math.sqrt(6 / (fan_in + fan_out)), True
    elif mode == "xavier_normal":
      std, uniform = math.sqrt(2 / (fan_in + fan_out)), False
    elif mode == "kaiming_uniform":
      std, uniform = math.sqrt(3 / fan_in), True
    else:
      std, uniform = math.sqrt(1 / fan_in), False
    if uniform:
      draw = jax.random.uniform(key, shape, dtype, minval=-1.0, maxval=1.0)
    else:
      draw = jax.random.normal(key, shape, dtype)
    return (std * scale) * draw

  return init


def resample_filter_2d(taps: Sequence[float]) -> np.ndarray:
  """The separable 2-D resampling kernel `outer(f, f) / sum(f)^2`, float32 like the reference."""
  f = np.asarray(taps, dtype=np.float32)
  if f.ndim != 1 or f.size == 0:
    raise ValueError(f"resample_filter must be a non-empty 1-D sequence, got {taps!r}.")
  return np.outer(f, f) / np.square(f.sum(dtype=np.float32))


def num_groups_for(num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4) -> int:
  """EDM's GroupNorm rule: at most `num_groups` groups, at least 4 channels per group."""
  groups = min(num_groups, num_channels // min_channels_per_group)
  if groups < 1 or num_channels % groups:
    raise ValueError(f"GroupNorm: {num_channels} channels cannot be split into {groups} groups.")
  return groups


def _conv(x: Array, kernel: Array, padding: int, precision, stride: int = 1,
          groups: int = 1) -> Array:
  return sharding.split_batch(jax.lax.conv_general_dilated(x,
                                      kernel,
                                      window_strides=(stride, stride),
                                      padding=((padding, padding), (padding, padding)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=groups,
                                      precision=precision))


def _normalized_taps(taps: Sequence[float]) -> np.ndarray:
  """The 1-D taps `f / sum(f)`; `outer` of them is `resample_filter_2d(taps)`."""
  f = np.asarray(taps, dtype=np.float64)
  if f.ndim != 1 or f.size == 0:
    raise ValueError(f"resample filter must be a non-empty 1-D sequence, got {taps!r}.")
  return f / f.sum()


def _is_box(taps: np.ndarray, padding: int) -> bool:
  return taps.size == 2 and taps[0] == taps[1] and padding == 0


def _pad_axis(x: Array, axis: int, lo: int, hi: int) -> Array:
  if lo == hi == 0:
    return x
  config = [(0, 0, 0)] * x.ndim
  config[axis] = (lo, hi, 0)
  return jax.lax.pad(x, jnp.zeros((), x.dtype), config)


def _resized(shape: tuple[int, ...], axis: int, size: int) -> tuple[int, ...]:
  return shape[:axis] + (size,) + shape[axis + 1:]


def _weighted_sum(terms, shape, dtype) -> Array:
  """sum(w * t) over (w, t) pairs of arrays of `shape`, skipping zero weights and factors 1."""
  out = None
  for weight, term in terms:
    if weight == 0:
      continue
    term = term if weight == 1 else term * float(weight)
    out = term if out is None else out + term
  return jnp.zeros(shape, dtype) if out is None else out


def _down_1d(x: Array, taps: np.ndarray, padding: int, axis: int) -> Array:
  """Correlation with `taps` at stride 2 along `axis` (torch conv1d semantics, zero padding)."""
  k = taps.size
  n_out = (x.shape[axis] + 2 * padding - k) // 2 + 1
  if n_out <= 0:
    raise ValueError(f"downsample: {x.shape[axis]} pixels are too few for a {k}-tap filter.")
  xp = _pad_axis(x, axis, padding, padding)
  terms = [(taps[i], jax.lax.slice_in_dim(xp, i, i + 2 * n_out - 1, 2, axis)) for i in range(k)]
  return _weighted_sum(terms, _resized(x.shape, axis, n_out), x.dtype)


def _up_1d(x: Array, taps: np.ndarray, padding: int, axis: int) -> Array:
  """Transposed correlation with `taps` at stride 2 along `axis` (torch conv_transpose1d).

  Output j sums x[i] * taps[t] over 2 i + t - padding = j. Outputs of one parity r take the taps
  of one parity, so each phase is a short sum of shifted copies of x; the phases are interleaved.
  """
  n, k = x.shape[axis], taps.size
  length = 2 * (n - 1) + k - 2 * padding
  if padding > k - 1 or length <= 0:
    raise ValueError(f"upsample: padding {padding} too large for a {k}-tap filter.")
  phases = []
  for r in range(2):
    size = (length - r + 1) // 2
    # Output 2 m + r takes x[m + d] * taps[t] for every tap t with r + padding - t = 2 d.
    shifts = [(t, (r + padding - t) // 2) for t in range(k) if (r + padding - t) % 2 == 0]
    lo = max([0] + [-d for _, d in shifts])
    hi = max([0] + [d + size - n for _, d in shifts])
    xp = _pad_axis(x, axis, lo, hi)
    terms = [(taps[t], jax.lax.slice_in_dim(xp, lo + d, lo + d + size, 1, axis))
             for t, d in shifts]
    phases.append(_weighted_sum(terms, _resized(x.shape, axis, size), x.dtype))
  even, odd = phases
  odd = _pad_axis(odd, axis, 0, even.shape[axis] - odd.shape[axis])
  both = jnp.stack([even, odd], axis=axis + 1)
  both = both.reshape(_resized(x.shape, axis, 2 * even.shape[axis]))
  return jax.lax.slice_in_dim(both, 0, length, 1, axis)


def downsample(x: Array, taps: Sequence[float], padding: int) -> Array:
  """2x downsampling of NHWC `x` with the filter `resample_filter_2d(taps)`.

  The same values (up to float rounding) as the per-channel stride-2 convolution, torch
  `conv2d(x, f, stride=2, padding=padding, groups=C)`, computed without a convolution: a box filter
  ([1, 1], no padding) is a 2x2 mean, any other filter two separable 1-D passes of shifted,
  strided slices. Sums run in at least float32; the result has the dtype of `x`.
  """
  f = _normalized_taps(taps)
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  y = x.astype(dtype)
  if _is_box(f, padding):
    _, h, w, _ = y.shape
    y = _sum_2x2(y[:, :2 * (h // 2), :2 * (w // 2)]) * 0.25
  else:
    y = _down_1d(_down_1d(y, f, padding, 1), f, padding, 2)
  return y.astype(x.dtype)


def _sum_2x2(y: Array) -> Array:
  """[B, 2H, 2W, C] -> [B, H, W, C]: the sum of each 2x2 block, as four strided slices added
  elementwise (a reduction over the two inner window axes ran ~100x slower on XLA:CPU)."""
  b, h2, w2, c = y.shape
  y = y.reshape(b, h2 // 2, 2, w2 // 2, 2, c)
  return y[:, :, 0, :, 0] + y[:, :, 0, :, 1] + y[:, :, 1, :, 0] + y[:, :, 1, :, 1]


@jax.custom_vjp
def _repeat_2x2(y: Array) -> Array:
  """Nearest-neighbour 2x upsampling of NHWC `y` (each pixel repeated over a 2x2 block)."""
  b, h, w, c = y.shape
  return jnp.broadcast_to(y[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


def _repeat_2x2_fwd(y):
  return _repeat_2x2(y), None


def _repeat_2x2_bwd(_, g):
  return (_sum_2x2(g),)


_repeat_2x2.defvjp(_repeat_2x2_fwd, _repeat_2x2_bwd)


def upsample(x: Array, taps: Sequence[float], padding: int) -> Array:
  """2x upsampling of NHWC `x` with the filter `4 * resample_filter_2d(taps)`.

  The same values (up to float rounding) as torch `conv_transpose2d(x, 4 f, stride=2,
  padding=padding, groups=C)`, without a convolution: a box filter ([1, 1], no padding) is
  nearest-neighbour repetition, any other filter two separable 1-D polyphase passes with taps
  `2 f / sum(f)`. Sums run in at least float32; the result has the dtype of `x`.
  """
  f = _normalized_taps(taps)
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  y = x.astype(dtype)  # also for the box filter: its gradient sums 4 values
  if _is_box(f, padding):
    y = _repeat_2x2(y)
  else:
    y = _up_1d(_up_1d(y, 2 * f, padding, 1), 2 * f, padding, 2)
  return y.astype(x.dtype)


class Linear(nn.Module):
  """y = x W + b with W stored as `kernel` [in, out] (the transpose of torch's [out, in])."""
  features: int
  use_bias: bool = True
  init: InitSpec = InitSpec()
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x: Array) -> Array:
    fan_in = x.shape[-1]
    kernel = self.param("kernel",
                        edm_initializer(self.init.mode, fan_in, self.features, self.init.weight),
                        (fan_in, self.features))
    y = jnp.matmul(x, kernel.astype(x.dtype), precision=self.precision)
    if self.use_bias:
      bias = self.param("bias",
                        edm_initializer(self.init.mode, fan_in, self.features, self.init.bias),
                        (self.features,))
      y = y + bias.astype(x.dtype)
    return y


class Conv2d(nn.Module):
  """EDM's 2-D convolution with optional 2x up/down resampling through a fixed FIR filter.

  `kernel_size=0` means no learned weight at all (pure resampling). Without `fused_resample`,
  resampling happens before the convolution; with it, upsampling is folded in front of a
  convolution with reduced padding, and downsampling follows a convolution with enlarged padding.
  The filter is `resample_filter_2d(resample_filter)` (times 4 when upsampling); it is a constant,
  not a parameter (the torch `resample_filter` buffer).
  """
  features: int
  kernel_size: int
  use_bias: bool = True
  up: bool = False
  down: bool = False
  resample_filter: Sequence[float] = (1, 1)
  fused_resample: bool = False
  init: InitSpec = InitSpec()
  precision: Any = DEFAULT_PRECISION

  @property
  def has_filter(self) -> bool:
    return self.up or self.down

  def filter_2d(self) -> np.ndarray:
    return resample_filter_2d(self.resample_filter)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.up and self.down:
      raise ValueError("Conv2d cannot both upsample and downsample.")
    cin = x.shape[-1]
    k = self.kernel_size
    w = b = None
    if k:
      fan_in, fan_out = cin * k * k, self.features * k * k
      w = self.param("kernel", edm_initializer(self.init.mode, fan_in, fan_out, self.init.weight),
                     (k, k, cin, self.features)).astype(x.dtype)
      if self.use_bias:
        b = self.param("bias", edm_initializer(self.init.mode, fan_in, fan_out, self.init.bias),
                       (self.features,)).astype(x.dtype)
    elif self.features != cin:
      raise ValueError(f"Conv2d without a kernel must keep the channel count ({cin} vs "
                       f"{self.features}).")
    f = tuple(self.resample_filter)
    w_pad = k // 2 if w is not None else 0
    f_pad = (len(f) - 1) // 2 if self.has_filter else 0

    if self.fused_resample and self.up and w is not None:
      x = upsample(x, f, max(f_pad - w_pad, 0))
      x = _conv(x, w, max(w_pad - f_pad, 0), self.precision)
    elif self.fused_resample and self.down and w is not None:
      x = _conv(x, w, w_pad + f_pad, self.precision)
      x = downsample(x, f, 0)
    else:
      if self.up:
        x = upsample(x, f, f_pad)
      if self.down:
        x = downsample(x, f, f_pad)
      if w is not None:
        x = _conv(x, w, w_pad, self.precision)
    if b is not None:
      x = x + b
    return x


class GroupNorm(nn.Module):
  """Group normalisation with EDM's group count `min(num_groups, C // min_channels_per_group)`.

  Statistics are two-pass (mean, then mean squared deviation) over H, W and the channels of a
  group, in at least float32. The full tensor is never split into [..., groups, C / groups]: each
  pass reduces over H, W to per-channel values [B, C], which are combined into groups on that small
  tensor, and the output is `(x - mean) * a + bias` with a per-channel `a`. Parameters: `scale`
  (torch `weight`, ones) and `bias` (zeros).
  """
  num_groups: int = 32
  min_channels_per_group: int = 4
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    groups = num_groups_for(c, self.num_groups, self.min_channels_per_group)
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    xf = x.astype(dtype)
    lead, per_group = x.shape[0], c // groups
    spatial = tuple(range(1, x.ndim - 1))
    stat_shape = (lead,) + (1,) * len(spatial) + (c,)

    def per_channel_group_mean(v):  # [B, C] -> the mean of each group, repeated per channel
      g = jnp.mean(v.reshape(lead, groups, per_group), axis=-1, keepdims=True)
      return jnp.broadcast_to(g, (lead, groups, per_group)).reshape(stat_shape)

    mean = per_channel_group_mean(jnp.mean(xf, axis=spatial))
    centred = xf - mean
    var = per_channel_group_mean(jnp.mean(jnp.square(centred), axis=spatial))
    a = scale.astype(dtype) / jnp.sqrt(var + self.eps)
    y = centred * a + bias.astype(dtype)
    return y.astype(x.dtype)


def attention(qkv: Array, num_heads: int, precision=DEFAULT_PRECISION) -> Array:
  """Multi-head self-attention over the pixels of `qkv` [B, H, W, 3C], returning [B, H, W, C].

  The 3C channels are interleaved as (head, C / head, 3): channel `(h * C/head + c) * 3 + s`
  holds component s (q, k, v) of channel c of head h. Keys are scaled by `1/sqrt(C/head)` in the
  input dtype; the logits and the softmax over keys are computed in at least float32.
  """
  b, h, w, c3 = qkv.shape
  c = c3 // 3
  head_dim = c // num_heads
  t = qkv.reshape(b, h * w, num_heads, head_dim, 3)
  q, k, v = t[..., 0], t[..., 1], t[..., 2]
  k = k / np.sqrt(head_dim)
  dtype = jnp.promote_types(qkv.dtype, jnp.float32)
  logits = jnp.einsum("bqnc,bknc->bnqk", q.astype(dtype), k.astype(dtype), precision=precision)
  weights = jax.nn.softmax(logits, axis=-1).astype(qkv.dtype)
  out = jnp.einsum("bnqk,bknc->bqnc", weights, v, precision=precision)
  return out.reshape(b, h, w, c)


class PositionalEmbedding(nn.Module):
  """Sinusoidal embedding [cos(x f_k), sin(x f_k)] with f_k = (1/max_positions)^(k/(N/2 - e)).

  `endpoint=True` (e = 1, DDPM++) makes the last frequency exactly 1/max_positions. No parameters.
  """
  num_channels: int
  max_positions: int = 10000
  endpoint: bool = False

  def __call__(self, x: Array) -> Array:
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    half = self.num_channels // 2
    freqs = jnp.arange(half, dtype=dtype) / (half - (1 if self.endpoint else 0))
    freqs = jnp.power(jnp.asarray(1 / self.max_positions, dtype), freqs)
    x = jnp.outer(x, freqs.astype(x.dtype))
    return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


class FourierEmbedding(nn.Module):
  """Random Fourier features [cos(2 pi x f), sin(2 pi x f)] (NCSN++).

  The frequencies `freqs` [N/2] (initialised N(0, scale^2)) are a fixed buffer in the reference.
  They live in the params tree here so that they can be loaded from a checkpoint, and they are
  wrapped in `stop_gradient`, so they get a zero gradient and an optimiser never moves them.
  """
  num_channels: int
  scale: float = 16.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    freqs = self.param("freqs", lambda key, shape: self.scale * jax.random.normal(key, shape),
                       (self.num_channels // 2,))
    freqs = jax.lax.stop_gradient(freqs)
    x = jnp.outer(x, (2 * np.pi * freqs).astype(x.dtype))
    return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


class UNetBlock(nn.Module):
  """EDM's unified residual block (DDPM++, NCSN++ and ADM), optionally with self-attention.

  norm0 -> silu -> conv0 (with up/down) -> add affine(emb) or adaptive scale/shift -> norm1 ->
  silu -> dropout -> conv1; plus the (possibly projected/resampled) skip, times `skip_scale`;
  then optionally norm2 -> qkv -> attention -> proj, added and scaled by `skip_scale` again.
  The input channel count is taken from `x`.
  """
  out_channels: int
  up: bool = False
  down: bool = False
  attention: bool = False
  num_heads: int | None = None
  channels_per_head: int = 64
  dropout: float = 0.0
  skip_scale: float = 1.0
  eps: float = 1e-5
  resample_filter: Sequence[float] = (1, 1)
  resample_proj: bool = False
  adaptive_scale: bool = True
  init: InitSpec = InitSpec()
  init_zero: InitSpec = InitSpec(weight=0.0)
  init_attn: InitSpec | None = None
  precision: Any = DEFAULT_PRECISION

  @property
  def heads(self) -> int:
    if not self.attention:
      return 0
    if self.num_heads is not None:
      return self.num_heads
    return self.out_channels // self.channels_per_head

  def has_skip(self, in_channels: int) -> bool:
    return self.out_channels != in_channels or self.up or self.down

  @nn.compact
  def __call__(self, x: Array, emb: Array, train: bool = False) -> Array:
    cin = x.shape[-1]
    cout = self.out_channels
    conv = lambda features, kernel, init, name, **kw: Conv2d(
        features, kernel, init=init, resample_filter=tuple(self.resample_filter),
        precision=self.precision, name=name, **kw)

    orig = x
    x = GroupNorm(eps=self.eps, name="norm0")(x)
    x = conv(cout, 3, self.init, "conv0", up=self.up, down=self.down)(nn.silu(x))

    params = Linear(cout * (2 if self.adaptive_scale else 1), init=self.init,
                    precision=self.precision, name="affine")(emb)
    params = params[:, None, None, :].astype(x.dtype)
    norm1 = GroupNorm(eps=self.eps, name="norm1")
    if self.adaptive_scale:
      scale, shift = jnp.split(params, 2, axis=-1)
      x = nn.silu(shift + norm1(x) * (scale + 1))
    else:
      x = nn.silu(norm1(x + params))

    x = nn.Dropout(rate=self.dropout, deterministic=not train)(x)
    x = conv(cout, 3, self.init_zero, "conv1")(x)
    if self.has_skip(cin):
      kernel = 1 if (self.resample_proj or cout != cin) else 0
      skip = conv(cout, kernel, self.init, "skip", up=self.up, down=self.down)(orig)
    else:
      skip = orig
    x = (x + skip) * self.skip_scale

    heads = self.heads
    if heads:
      init_attn = self.init_attn if self.init_attn is not None else self.init
      qkv = conv(cout * 3, 1, init_attn, "qkv")(GroupNorm(eps=self.eps, name="norm2")(x))
      a = attention(qkv, heads, self.precision)
      x = (conv(cout, 1, self.init_zero, "proj")(a) + x) * self.skip_scale
    return x
