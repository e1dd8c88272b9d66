"""EDM2's magnitude-preserving U-Net (Karras et al. 2024) in Flax linen, NHWC.

A port of `training/networks_edm2.py` (NVlabs/edm2) and of its SiDA variant
(`sida_training_edm2/*`, mingyuanzhou/SiD branch `sida`), which adds a `return_flag` that exposes
the encoder as a patch discriminator. The preconditioning itself (c_skip, c_out, c_in, c_noise) is
not here: `sid_jax.denoisers.NetworkDenoiser` does it; `EDM2Net` holds the learned parts of the
official `Precond` (the U-Net and the optional log-variance head).

Parameter layout. Module names follow the official `state_dict` names so the converter
(`sid_jax.weights.edm2`) is a renaming only: the U-Net lives under `unet`, the official
`unet.enc.<key>` / `unet.dec.<key>` modules are Flax children `enc_<key>` / `dec_<key>`, and each
`MPConv` keeps the official weight layout, `[out, in, kh, kw]` (convolution) or `[out, in]`
(fully connected). Gains are 0-d parameters (`emb_gain`, `out_gain`), as in torch.

Fixed buffers. The official `MPFourier` draws `freqs` and `phases` once from the global seed and
registers them as buffers. Here they are stored in `params` (keys `freqs` and `phases` of every
`MPFourier`) so that `NetworkDenoiser`, which passes only `{'params': ...}`, needs no extra
collection and a generator initialised from a teacher's params inherits them automatically. The
forward wraps them in `stop_gradient`, so their gradient is exactly zero: Adam without weight decay
and EMA leave them bit-identical. If an optimiser with weight decay (or any update that is not a
function of the gradient) is ever used, mask them with `trainable_mask(params)`.

Forced weight normalisation. `MPConv` normalises its weight at every forward (the "traditional"
weight normalisation), so outputs never depend on a weight's per-output-channel scale. The
in-place projection that EDM2 applies before train-mode forwards is the pure function
`project_mpconv_weights(params)`; calling it before a step and then running the forward reproduces
the official train-mode computation exactly, which normalises the already projected weight again.

Precision. Parameters stay float32. `dtype` (None: the input's dtype) is the compute dtype of the
U-Net's image path, EDM2's `use_fp16` scheme with `dtype` in place of float16: the input is cast to
it, every MPConv normalises its weight in float32 and casts it to `dtype`, while the noise/label
embedding, the log-variance head, the norms and the attention softmax (float16 in the official
code) stay float32. Outputs come back in the input's dtype.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sid_jax import sharding
from sid_jax.nets import layers

Array = jax.Array

_HIGHEST = jax.lax.Precision.HIGHEST
_EPS = 1e-4
_BUFFER_NAMES = ("freqs", "phases")

# ---------------------------------------------------------------------------------------------
# Magnitude-preserving primitives.
# ---------------------------------------------------------------------------------------------


def _compute_dtype(dtype) -> Any:
  """float32 or wider: the official layers always compute norms and weights in float32."""
  return jnp.promote_types(dtype, jnp.float32)


def normalize(x: Array, axis: int | Sequence[int] | None = None, eps: float = _EPS) -> Array:
  """Scales `x` to unit RMS over `axis` (default: every axis but the first).

  x / (eps + ||x||_axis * sqrt(n_kept / n_total)), i.e. the L2 norm over `axis` divided by the
  square root of the number of reduced elements. For a weight [out, ...] this normalises every
  output channel separately; with the channel axis of an activation it is the pixel norm.
  """
  if axis is None:
    axis = tuple(range(1, x.ndim))
  elif isinstance(axis, int):
    axis = (axis,)
  axis = tuple(a % x.ndim for a in axis)
  reduced = int(np.prod([x.shape[a] for a in axis]))
  norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(_compute_dtype(x.dtype))), axis=axis, keepdims=True))
  norm = eps + norm * np.sqrt(1.0 / reduced)
  return x / norm.astype(x.dtype)


def pixel_norm(x: Array, eps: float = _EPS) -> Array:
  """Unit RMS across channels at every pixel (NHWC: the last axis)."""
  return normalize(x, axis=-1, eps=eps)


def mp_silu(x: Array) -> Array:
  """SiLU rescaled to keep unit magnitude for unit-variance Gaussian input."""
  return jax.nn.silu(x) / 0.596


def mp_sum(a: Array, b: Array, t: float = 0.5) -> Array:
  """(1 - t) a + t b, divided by the norm of the blend weights."""
  # Python floats (weakly typed) keep a bfloat16 `a` bfloat16; NumPy scalars would promote it.
  return (a + t * (b - a)) / float(np.sqrt((1 - t)**2 + t**2))


def mp_cat(a: Array, b: Array, axis: int = -1, t: float = 0.5) -> Array:
  """Concatenation along `axis` with both parts weighted so the result keeps unit magnitude."""
  na, nb = a.shape[axis], b.shape[axis]
  scale = np.sqrt((na + nb) / ((1 - t)**2 + t**2))
  wa = float(scale / np.sqrt(na) * (1 - t))
  wb = float(scale / np.sqrt(nb) * t)
  return jnp.concatenate([wa * a, wb * b], axis=axis)


def resample(x: Array, f: Sequence[float] = (1, 1), mode: str = "keep") -> Array:
  """Depthwise 2x down- or upsampling of NHWC `x` with the separable filter outer(f, f)/sum(f)^2.

  'down' equals the stride-2 convolution, 'up' the stride-2 transposed convolution with the filter
  times 4, both with padding (len(f) - 1) // 2; with f = [1, 1]: 2x2 average pooling and
  nearest-neighbour upsampling. Computed without convolutions (`layers.downsample` / `upsample`).
  """
  if mode == "keep":
    return x
  f = np.asarray(f, np.float32)
  if f.ndim != 1 or len(f) % 2 != 0:
    raise ValueError(f"resample filter must be 1-D of even length, got {f.tolist()}.")
  pad = (len(f) - 1) // 2
  if mode == "down":
    return layers.downsample(x, f, pad)
  if mode == "up":
    return layers.upsample(x, f, pad)
  raise ValueError(f"Unknown resample mode {mode!r}; expected 'keep', 'down' or 'up'.")


# ---------------------------------------------------------------------------------------------
# Layers.
# ---------------------------------------------------------------------------------------------


def _fourier_freqs_init(bandwidth: float):

  def init(key, shape, dtype=jnp.float32):
    return (2 * np.pi * bandwidth) * jax.random.normal(key, shape, dtype)

  return init


def _fourier_phases_init(key, shape, dtype=jnp.float32):
  return (2 * np.pi) * jax.random.uniform(key, shape, dtype)


class MPFourier(nn.Module):
  """cos(2 pi (x f) + phi) * sqrt(2) with fixed random frequencies f and phases phi.

  `freqs` and `phases` are fixed buffers in the official code; here they are entries of `params`
  that the forward treats as constants (see the module docstring).
  """
  num_channels: int
  bandwidth: float = 1.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    freqs = self.param("freqs", _fourier_freqs_init(self.bandwidth), (self.num_channels,))
    phases = self.param("phases", _fourier_phases_init, (self.num_channels,))
    dtype = _compute_dtype(x.dtype)
    freqs = jax.lax.stop_gradient(freqs).astype(dtype)
    phases = jax.lax.stop_gradient(phases).astype(dtype)
    y = x.astype(dtype)[:, None] * freqs[None, :] + phases[None, :]
    return (jnp.cos(y) * np.sqrt(2)).astype(x.dtype)


class MPConv(nn.Module):
  """Magnitude-preserving convolution (kernel=(kh, kw)) or fully connected layer (kernel=()).

  The weight is stored as [out, in, *kernel] (the torch layout). Every call uses
  normalize(w) * gain / sqrt(fan_in) with fan_in = in * kh * kw, so each output channel has unit
  RMS before the magnitude-preserving scaling whatever the stored scale is.
  """
  in_channels: int
  out_channels: int
  kernel: tuple[int, ...] = ()

  @nn.compact
  def __call__(self, x: Array, gain: Array | float = 1.0) -> Array:
    shape = (self.out_channels, self.in_channels) + tuple(self.kernel)
    weight = self.param("weight", nn.initializers.normal(stddev=1.0), shape)
    dtype = _compute_dtype(x.dtype)
    w = normalize(weight.astype(dtype))
    fan_in = int(np.prod(shape[1:]))
    w = w * (jnp.asarray(gain, dtype) / np.sqrt(fan_in))
    w = w.astype(x.dtype)
    if w.ndim == 2:
      return jnp.matmul(x, w.T, precision=_HIGHEST)
    if w.ndim != 4:
      raise ValueError(f"MPConv kernel must be () or (kh, kw), got {self.kernel}.")
    pad = w.shape[-1] // 2
    return sharding.split_batch(
        jax.lax.conv_general_dilated(x, w, window_strides=(1, 1), padding=[(pad, pad), (pad, pad)],
                                     dimension_numbers=("NHWC", "OIHW", "NHWC"),
                                     precision=_HIGHEST))


class Block(nn.Module):
  """U-Net encoder ('enc') or decoder ('dec') block with optional self-attention."""
  in_channels: int
  out_channels: int
  emb_channels: int
  flavor: str = "enc"
  resample_mode: str = "keep"
  resample_filter: tuple[float, ...] = (1, 1)
  attention: bool = False
  channels_per_head: int = 64
  dropout: float = 0.0
  res_balance: float = 0.3
  attn_balance: float = 0.3
  clip_act: float | None = 256

  @property
  def num_heads(self) -> int:
    return self.out_channels // self.channels_per_head if self.attention else 0

  @nn.compact
  def __call__(self, x: Array, emb: Array, train: bool = False) -> Array:
    if self.flavor not in ("enc", "dec"):
      raise ValueError(f"Block flavor must be 'enc' or 'dec', got {self.flavor!r}.")
    cout = self.out_channels
    has_skip = self.in_channels != cout
    emb_gain = self.param("emb_gain", nn.initializers.zeros, ())
    conv_res0 = MPConv(cout if self.flavor == "enc" else self.in_channels, cout, (3, 3),
                       name="conv_res0")
    emb_linear = MPConv(self.emb_channels, cout, (), name="emb_linear")
    conv_res1 = MPConv(cout, cout, (3, 3), name="conv_res1")
    conv_skip = MPConv(self.in_channels, cout, (1, 1), name="conv_skip") if has_skip else None

    # Main branch.
    x = resample(x, f=self.resample_filter, mode=self.resample_mode)
    if self.flavor == "enc":
      if conv_skip is not None:
        x = conv_skip(x)
      x = pixel_norm(x)

    # Residual branch, modulated by the embedding.
    y = conv_res0(mp_silu(x))
    c = emb_linear(emb, gain=emb_gain) + 1
    y = mp_silu(y * c[:, None, None, :].astype(y.dtype))
    y = nn.Dropout(rate=self.dropout, deterministic=not train)(y)
    y = conv_res1(y)

    # Merge the branches.
    if self.flavor == "dec" and conv_skip is not None:
      x = conv_skip(x)
    x = mp_sum(x, y, t=self.res_balance)

    # Self-attention over all pixels, with pixel-normalised q, k, v per head.
    heads = self.num_heads
    if heads != 0:
      n, h, w, _ = x.shape
      ch = cout // heads
      qkv = MPConv(cout, cout * 3, (1, 1), name="attn_qkv")(x)
      # Official channel order of the 3C outputs: (head, channel-in-head, q/k/v).
      qkv = normalize(qkv.reshape(n, h * w, heads, ch, 3), axis=3)
      q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
      logits = jnp.einsum("nqhc,nkhc->nhqk", q, k / float(np.sqrt(ch)), precision=_HIGHEST,
                          preferred_element_type=_compute_dtype(q.dtype))
      attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
      y = jnp.einsum("nhqk,nkhc->nqhc", attn, v, precision=_HIGHEST).reshape(n, h, w, cout)
      y = MPConv(cout, cout, (1, 1), name="attn_proj")(y)
      x = mp_sum(x, y, t=self.attn_balance)

    if self.clip_act is not None:
      x = jnp.clip(x, -self.clip_act, self.clip_act)
    return x


def unet_layout(img_resolution: int, img_channels: int, model_channels: int,
                channel_mult: Sequence[int], num_blocks: int,
                attn_resolutions: Sequence[int]) -> tuple[list, list]:
  """The official U-Net's encoder and decoder, in call order.

  Returns (enc, dec): lists of (key, spec) with key as in the official `ModuleDict`
  ('16x16_conv', '8x8_down', '8x8_block0', '8x8_in0', '16x16_up', ...) and spec a dict with
  'in', 'out', and for blocks 'flavor', 'resample_mode', 'attention'.
  """
  cblock = [model_channels * m for m in channel_mult]
  enc = []
  cout = img_channels + 1
  for level, channels in enumerate(cblock):
    res = img_resolution >> level
    if level == 0:
      cin, cout = cout, channels
      enc.append((f"{res}x{res}_conv", dict(kind="conv", cin=cin, cout=cout)))
    else:
      enc.append((f"{res}x{res}_down",
                  dict(kind="block", cin=cout, cout=cout, flavor="enc", resample_mode="down",
                       attention=False)))
    for idx in range(num_blocks):
      cin, cout = cout, channels
      enc.append((f"{res}x{res}_block{idx}",
                  dict(kind="block", cin=cin, cout=cout, flavor="enc", resample_mode="keep",
                       attention=res in attn_resolutions)))
  dec = []
  skips = [spec["cout"] for _, spec in enc]
  for level, channels in reversed(list(enumerate(cblock))):
    res = img_resolution >> level
    if level == len(cblock) - 1:
      dec.append((f"{res}x{res}_in0",
                  dict(kind="block", cin=cout, cout=cout, flavor="dec", resample_mode="keep",
                       attention=True)))
      dec.append((f"{res}x{res}_in1",
                  dict(kind="block", cin=cout, cout=cout, flavor="dec", resample_mode="keep",
                       attention=False)))
    else:
      dec.append((f"{res}x{res}_up",
                  dict(kind="block", cin=cout, cout=cout, flavor="dec", resample_mode="up",
                       attention=False)))
    for idx in range(num_blocks + 1):
      cin, cout = cout + skips.pop(), channels
      dec.append((f"{res}x{res}_block{idx}",
                  dict(kind="block", cin=cin, cout=cout, flavor="dec", resample_mode="keep",
                       attention=res in attn_resolutions)))
  return enc, dec


class UNet(nn.Module):
  """The EDM2 U-Net F(x, c_noise, class_labels) on NHWC input, optionally encoder-only.

  `output`: 'decoder' -> F [B,H,W,C]; 'encoder' -> SiDA logits [B,h,w,1] (channel mean of the
  last encoder block; the decoder is not run); 'encoder_decoder' -> (F, logits).
  """
  img_resolution: int
  img_channels: int
  label_dim: int
  model_channels: int = 192
  channel_mult: tuple[int, ...] = (1, 2, 3, 4)
  channel_mult_noise: int | None = None
  channel_mult_emb: int | None = None
  num_blocks: int = 3
  attn_resolutions: tuple[int, ...] = (16, 8)
  label_balance: float = 0.5
  concat_balance: float = 0.5
  resample_filter: tuple[float, ...] = (1, 1)
  channels_per_head: int = 64
  dropout: float = 0.0
  res_balance: float = 0.3
  attn_balance: float = 0.3
  clip_act: float | None = 256
  dtype: Any = None  # Compute dtype of the image path (None: the input's); see the module doc.

  @nn.compact
  def __call__(self, x: Array, noise_labels: Array, class_labels: Array | None,
               train: bool = False, output: str = "decoder"):
    if output not in ("decoder", "encoder", "encoder_decoder"):
      raise ValueError(f"Unknown output {output!r}; expected 'decoder', 'encoder' or "
                       "'encoder_decoder'.")
    cblock = [self.model_channels * m for m in self.channel_mult]
    cnoise = (self.model_channels * self.channel_mult_noise
              if self.channel_mult_noise is not None else cblock[0])
    cemb = (self.model_channels * self.channel_mult_emb
            if self.channel_mult_emb is not None else max(cblock))
    out_gain = self.param("out_gain", nn.initializers.zeros, ())

    # Embedding.
    emb = MPFourier(cnoise, name="emb_fourier")(noise_labels)
    emb = MPConv(cnoise, cemb, (), name="emb_noise")(emb)
    if self.label_dim != 0:
      if class_labels is None:
        raise ValueError(f"label_dim={self.label_dim} but class_labels is None.")
      class_labels = class_labels.astype(emb.dtype)
      lab = MPConv(self.label_dim, cemb, (), name="emb_label")(
          class_labels * np.sqrt(class_labels.shape[1]))
      emb = mp_sum(emb, lab, t=self.label_balance)
    emb = mp_silu(emb)

    block_kwargs = dict(resample_filter=tuple(self.resample_filter),
                        channels_per_head=self.channels_per_head, dropout=self.dropout,
                        res_balance=self.res_balance, attn_balance=self.attn_balance,
                        clip_act=self.clip_act)
    enc, dec = unet_layout(self.img_resolution, self.img_channels, self.model_channels,
                           self.channel_mult, self.num_blocks, self.attn_resolutions)

    def make(prefix, key, spec):
      if spec["kind"] == "conv":
        return MPConv(spec["cin"], spec["cout"], (3, 3), name=f"{prefix}_{key}")
      return Block(spec["cin"], spec["cout"], cemb, flavor=spec["flavor"],
                   resample_mode=spec["resample_mode"], attention=spec["attention"],
                   name=f"{prefix}_{key}", **block_kwargs)

    # Encoder (input gets an all-ones channel).
    out_dtype = x.dtype
    x = x if self.dtype is None else x.astype(self.dtype)
    x = jnp.concatenate([x, jnp.ones_like(x[..., :1])], axis=-1)
    skips = []
    for key, spec in enc:
      layer = make("enc", key, spec)
      x = layer(x) if spec["kind"] == "conv" else layer(x, emb, train=train)
      skips.append(x)
    logits = (jnp.mean(x.astype(out_dtype), axis=-1, keepdims=True)
              if output != "decoder" else None)
    # At init the decoder is always built so that params are complete whatever `output` is.
    if output == "encoder" and not self.is_initializing():
      return logits

    # Decoder.
    for key, spec in dec:
      if "block" in key:
        x = mp_cat(x, skips.pop(), t=self.concat_balance)
      x = make("dec", key, spec)(x, emb, train=train)
    x = MPConv(dec[-1][1]["cout"], self.img_channels, (3, 3), name="out_conv")(x, gain=out_gain)
    x = x.astype(out_dtype)
    if output == "decoder":
      return x
    if output == "encoder":
      return logits
    return x, logits


class EDM2Net(nn.Module):
  """The learned parts of EDM2's `Precond`: the U-Net and (optionally) the log-variance head.

  Called by `NetworkDenoiser` as `(x_in, c_noise, class_labels, augment_labels, train=...,
  output=..., return_logvar=...)`. Returns the U-Net's output for `output` (see `UNet`); with
  `return_logvar=True` a tuple whose last element is u(sigma) = logvar_linear(logvar_fourier(
  c_noise)) of shape [B,1,1,1]. `logvar_channels=None` means no head (`EDM_2_Precond_Generator`).

  `use_fp16`, `force_normalization` and `use_gan` do not change the forward; they are kept so the
  training code can read them (the last two decide when `project_mpconv_weights` applies, spec
  §7.2). The U-Net computes in `dtype` (None: the input's, float32 or float64) whatever `use_fp16`
  says; the run chooses it with `config.model.compute_dtype`.
  """
  img_resolution: int
  img_channels: int
  label_dim: int
  logvar_channels: int | None = 128
  model_channels: int = 192
  channel_mult: tuple[int, ...] = (1, 2, 3, 4)
  channel_mult_noise: int | None = None
  channel_mult_emb: int | None = None
  num_blocks: int = 3
  attn_resolutions: tuple[int, ...] = (16, 8)
  label_balance: float = 0.5
  concat_balance: float = 0.5
  resample_filter: tuple[float, ...] = (1, 1)
  channels_per_head: int = 64
  dropout: float = 0.0
  res_balance: float = 0.3
  attn_balance: float = 0.3
  clip_act: float | None = 256
  use_fp16: bool = False
  force_normalization: bool = False
  use_gan: bool = False
  class_name: str = "Precond"
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array, c_noise: Array, class_labels: Array | None = None,
               augment_labels: Array | None = None, *, train: bool = False,
               output: str = "decoder", return_logvar: bool = False):
    if augment_labels is not None:
      raise ValueError("EDM2 networks take no augment_labels.")
    if return_logvar and self.logvar_channels is None:
      raise ValueError(f"{self.class_name} has no log-variance head (return_logvar=True).")
    if self.label_dim != 0 and class_labels is None:
      class_labels = jnp.zeros((x.shape[0], self.label_dim), x.dtype)
    unet = UNet(img_resolution=self.img_resolution, img_channels=self.img_channels,
                label_dim=self.label_dim, model_channels=self.model_channels,
                channel_mult=tuple(self.channel_mult), channel_mult_noise=self.channel_mult_noise,
                channel_mult_emb=self.channel_mult_emb, num_blocks=self.num_blocks,
                attn_resolutions=tuple(self.attn_resolutions), label_balance=self.label_balance,
                concat_balance=self.concat_balance, resample_filter=tuple(self.resample_filter),
                channels_per_head=self.channels_per_head, dropout=self.dropout,
                res_balance=self.res_balance, attn_balance=self.attn_balance,
                clip_act=self.clip_act, dtype=self.dtype, name="unet")
    result = unet(x, c_noise, class_labels if self.label_dim != 0 else None, train=train,
                  output=output)
    logvar = None
    if self.logvar_channels is not None and (return_logvar or self.is_initializing()):
      feats = MPFourier(self.logvar_channels, name="logvar_fourier")(c_noise)
      logvar = MPConv(self.logvar_channels, 1, (), name="logvar_linear")(feats)
      logvar = logvar.reshape(-1, 1, 1, 1)
    if not return_logvar:
      return result
    result = result if isinstance(result, tuple) else (result,)
    return result + (logvar,)


# ---------------------------------------------------------------------------------------------
# Parameter utilities.
# ---------------------------------------------------------------------------------------------


def _last_key(path) -> str | None:
  entry = path[-1] if path else None
  key = getattr(entry, "key", None)
  return key if isinstance(key, str) else None


def project_mpconv_weights(params):
  """Forced weight normalisation: every MPConv weight w -> normalize(w) (per output channel).

  MPConv weights are exactly the leaves named 'weight' in an EDM2 parameter tree (gains are
  'emb_gain'/'out_gain', the Fourier buffers 'freqs'/'phases'); all other leaves are returned
  unchanged. The norm is computed in float32 (or wider) and the result keeps each leaf's dtype.
  Pure and jit-compatible.
  """

  def project(path, leaf):
    if _last_key(path) != "weight":
      return leaf
    leaf = jnp.asarray(leaf)
    return normalize(leaf.astype(_compute_dtype(leaf.dtype))).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(project, params)


def trainable_mask(params):
  """A pytree of bools like `params`: False for the fixed MPFourier buffers, True elsewhere.

  For `optax.masked` (or similar) when an update would otherwise move freqs/phases.
  """
  return jax.tree_util.tree_map_with_path(lambda p, _: _last_key(p) not in _BUFFER_NAMES,
                                          params)
