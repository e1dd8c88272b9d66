"""EDM's `AugmentPipe` (Karras et al. 2022, `training/augment.py`) in pure JAX, NHWC.

SiD augments the generator samples that train the fake score network (spec §4.8) exactly the way
the EDM teachers were trained: x-flip (multiplier 1e8, so a flip happens with probability 1/2),
y-flip, isotropic scale, fractional rotation, anisotropic scale and fractional translation, each
gated with probability `p`. The network sees the 9 augment labels

    [xflip, yflip, scale w, cos(rot) - 1, sin(rot), w cos r, w sin r, w_tx, w_ty].

Every op of the official pipe is here (also the integer rotation/translation and the colour ops,
which EDM defines but SiD does not enable), with the official op order, label layout and
per-op gating `u < multiplier * p`. Randomness is split from execution: `AugmentPipe.draw(key, n)`
returns a dict of named draws (uniform, normal and integer arrays, one per official random call)
and `AugmentPipe.apply(x, draws)` is deterministic, so recorded draws of the official code can be
replayed exactly. `AugmentPipe(...)(key, x)` does both and is what `SiDSetup.augment` expects.

Geometric ops follow the official execution: reflect padding by a margin that covers the
transformed image, 2x upsampling with the `sym6` wavelet low-pass filter, bilinear sampling with
zeros outside (align_corners=False), 2x `sym6` downsampling and a crop. The official margin is a
data-dependent shape; here the image is reflect-padded by the largest possible margin (size - 1)
and everything outside the official margin is zeroed, which reproduces the official arithmetic at
static shapes (the margin is still computed like the official one: the maximum over the batch,
unless `batch_margin=False`). The sampling positions are computed directly in pixels of that
padded, upsampled array (algebraically the official affine_grid/grid_sample chain, with fewer
float32 roundings), and the sym6 filters run as shifted sums (XLA:CPU runs convolutions with input
dilation very slowly). Replaying the official draws matches the official float64 result to 1e-14
in float64 and to its own float32 error (<= 3e-6) in float32 (tests/test_augment.py).

Our draws come from JAX keys, so they follow the official distributions but not torch's numbers.
At p = 0 nothing fires, the 1e8 xflip included (its threshold is 1e8 * p = 0), but the geometric
path still runs with the identity transform, as in the official code (the result equals the input
to float32 rounding).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

_HIGHEST = lax.Precision.HIGHEST

# Low-pass decomposition filter of the `sym6` wavelet (PyWavelets' `dec_lo`), rounded to float32
# as the official pipe does before using it.
SYM6 = np.asarray([
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148
], np.float32)

# Random draws of every op, in the order of the official random calls. The kind says how a draw is
# made: "bit" = integer in {0, 1}, "quarter" = integer in {0, 1, 2, 3}, "uniform" = U[0, 1),
# "normal" = N(0, 1); "2" marks a [2, N] draw (x, y), everything else is [N].
_DRAWS = {
    "xflip": (("xflip", "bit"), ("xflip_gate", "uniform")),
    "yflip": (("yflip", "bit"), ("yflip_gate", "uniform")),
    "rotate_int": (("rotate_int", "quarter"), ("rotate_int_gate", "uniform")),
    "translate_int": (("translate_int", "uniform2"), ("translate_int_gate", "uniform")),
    "scale": (("scale", "normal"), ("scale_gate", "uniform")),
    "rotate_frac": (("rotate_frac", "uniform"), ("rotate_frac_gate", "uniform")),
    "aniso": (("aniso", "normal"), ("aniso_angle", "uniform"), ("aniso_gate", "uniform"),
              ("aniso_angle_gate", "uniform")),
    "translate_frac": (("translate_frac", "normal2"), ("translate_frac_gate", "uniform")),
    "brightness": (("brightness", "normal"), ("brightness_gate", "uniform")),
    "contrast": (("contrast", "normal"), ("contrast_gate", "uniform")),
    "lumaflip": (("lumaflip", "bit"), ("lumaflip_gate", "uniform")),
    "hue": (("hue", "uniform"), ("hue_gate", "uniform")),
    "saturation": (("saturation", "normal"), ("saturation_gate", "uniform")),
}
OPS = tuple(_DRAWS)
_LABEL_WIDTH = {"rotate_int": 2, "translate_int": 2, "rotate_frac": 2, "aniso": 2,
                "translate_frac": 2, "hue": 2}
_GEOMETRIC = ("scale", "rotate_frac", "aniso", "translate_frac")
_COLOUR = ("brightness", "contrast", "lumaflip", "hue", "saturation")


# ---------------------------------------------------------------------------------------------
# Batched homogeneous 2-D / 3-D matrices ([N, 3, 3] and [N, 4, 4]).
# ---------------------------------------------------------------------------------------------


def _stack_matrix(rows, like: Array) -> Array:
  """[N, R, C] from nested rows of per-sample vectors [N] or Python numbers."""
  full = lambda v: jnp.broadcast_to(jnp.asarray(v, like.dtype), like.shape)
  return jnp.stack([jnp.stack([full(v) for v in row], axis=-1) for row in rows], axis=-2)


def _translate2d(tx, ty, like):
  return _stack_matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], like)


def _scale2d(sx, sy, like):
  return _stack_matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], like)


def _rotate2d(theta):
  c, s = jnp.cos(theta), jnp.sin(theta)
  return _stack_matrix([[c, -s, 0], [s, c, 0], [0, 0, 1]], theta)


def _matmul(a: Array, b: Array) -> Array:
  return jnp.matmul(a, b, precision=_HIGHEST)


# ---------------------------------------------------------------------------------------------
# The separable sym6 resampling used by the geometric ops.
# ---------------------------------------------------------------------------------------------


def _shifted_sum(x: Array, taps, axis: int, starts, length: int, stride: int = 1) -> Array:
  """sum_j taps[j] * x[starts[j] + stride * i] along `axis`, i = 0 .. length - 1."""
  out = None
  for tap, start in zip(taps, starts):
    part = lax.slice_in_dim(x, start, start + stride * (length - 1) + 1, stride, axis)
    out = part * tap if out is None else out + part * tap
  return out


def _upsample_axis(x: Array, axis: int) -> Array:
  """Length L -> 2L: zero-interleave, then filter with the reversed sym6 (zeros outside).

  In polyphase form the output is up[2m] = sum_j h[2j + 5] x[m - j] (j = -2..3) and
  up[2m + 1] = sum_j h[2j + 6] x[m - j] (j = -3..2), with h the sym6 taps; written as shifted
  sums, which XLA:CPU runs far faster than a convolution with input dilation.
  """
  length = x.shape[axis]
  pads = [(0, 0)] * x.ndim
  pads[axis] = (3, 3)
  xp = jnp.pad(x, pads)
  h = [x.dtype.type(v) for v in SYM6]
  even = _shifted_sum(xp, [h[2 * j + 5] for j in range(-2, 4)], axis,
                      [3 - j for j in range(-2, 4)], length)
  odd = _shifted_sum(xp, [h[2 * j + 6] for j in range(-3, 3)], axis,
                     [3 - j for j in range(-3, 3)], length)
  out = jnp.stack([even, odd], axis=axis + 1)
  return out.reshape(x.shape[:axis] + (2 * length,) + x.shape[axis + 1:])


def _downsample_axis(x: Array, axis: int, crop: int) -> Array:
  """Length 2L -> L - 2 crop: out[d] = sum_j h[j] x[2d - 5 + j] for crop <= d < L - crop.

  x is zero outside its range (the official convolution's zero padding).
  """
  length = x.shape[axis] // 2 - 2 * crop
  pad = (len(SYM6) - 1) // 2
  pads = [(0, 0)] * x.ndim
  pads[axis] = (pad, pad)
  xp = jnp.pad(x, pads)
  h = [x.dtype.type(v) for v in SYM6]
  return _shifted_sum(xp, h, axis, [2 * crop + j for j in range(len(h))], length, stride=2)


def _upsample2x(x: Array) -> Array:
  """[N, h, w, C] -> [N, 2h, 2w, C] with the sym6 synthesis filter (along W, then H)."""
  return _upsample_axis(_upsample_axis(x, 2), 1)


def _downsample2x(x: Array, crop: int) -> Array:
  """sym6 low-pass with stride 2 (along W, then H), dropping `crop` pixels on every side."""
  return _downsample_axis(_downsample_axis(x, 2, crop), 1, crop)


def _bilinear(image: Array, iy: Array, ix: Array, lo: Array, hi: Array) -> Array:
  """Bilinear samples of NHWC `image` at pixel coordinates (iy, ix) [N, h, w].

  A corner contributes only if it lies in the per-sample box lo <= (y, x) <= hi (lo, hi: [N, 2]
  integer corners, y first); outside it reads zero (grid_sample's zeros padding).
  """
  n, height, width, channels = image.shape
  flat = image.reshape(n, height * width, channels)
  y0 = jnp.floor(iy)
  x0 = jnp.floor(ix)
  y1 = y0 + 1
  x1 = x0 + 1
  weights = {
      (0, 0): (x1 - ix) * (y1 - iy),
      (0, 1): (ix - x0) * (y1 - iy),
      (1, 0): (x1 - ix) * (iy - y0),
      (1, 1): (ix - x0) * (iy - y0),
  }
  box = lambda v, i: (lo[:, i, None, None] <= v) & (v <= hi[:, i, None, None])
  out = jnp.zeros(iy.shape + (channels,), image.dtype)
  for (dy, dx), weight in weights.items():
    yc = y1 if dy else y0
    xc = x1 if dx else x0
    inside = box(yc, 0) & box(xc, 1)
    yi = jnp.clip(yc, 0, height - 1).astype(jnp.int32)
    xi = jnp.clip(xc, 0, width - 1).astype(jnp.int32)
    index = (yi * width + xi).reshape(n, -1, 1)
    values = jnp.take_along_axis(flat, index, axis=1).reshape(iy.shape + (channels,))
    out = out + values * jnp.where(inside, weight, 0)[..., None]
  return out


# ---------------------------------------------------------------------------------------------
# The pipe.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AugmentPipe:
  """EDM's AugmentPipe; all ops off by default, an op is on when its multiplier is > 0.

  Attributes have the official names and defaults: `p` is the overall probability, each op
  multiplier scales it (an op fires for a sample when a U[0, 1) draw is < multiplier * p), the
  `*_std`/`*_max` settings give the strength. `batch_margin=True` computes the geometric padding
  margin over the whole batch like the official pipe (a sample's border pixels then depend, very
  slightly, on the other samples); False uses each sample's own margin.
  """
  p: float = 1.0
  # Pixel blitting.
  xflip: float = 0.0
  yflip: float = 0.0
  rotate_int: float = 0.0
  translate_int: float = 0.0
  translate_int_max: float = 0.125
  # Geometric transformations.
  scale: float = 0.0
  rotate_frac: float = 0.0
  aniso: float = 0.0
  translate_frac: float = 0.0
  scale_std: float = 0.2
  rotate_frac_max: float = 1.0
  aniso_std: float = 0.2
  aniso_rotate_prob: float = 0.5
  translate_frac_std: float = 0.125
  # Colour transformations.
  brightness: float = 0.0
  contrast: float = 0.0
  lumaflip: float = 0.0
  hue: float = 0.0
  saturation: float = 0.0
  brightness_std: float = 0.2
  contrast_std: float = 0.5
  hue_max: float = 1.0
  saturation_std: float = 1.0
  batch_margin: bool = True

  def __post_init__(self):
    for name in ("p",) + OPS:
      if getattr(self, name) < 0:
        raise ValueError(f"AugmentPipe.{name} must be >= 0, got {getattr(self, name)}.")

  # -- structure --

  @property
  def enabled_ops(self) -> tuple[str, ...]:
    """The ops that run, in the official order."""
    return tuple(op for op in OPS if getattr(self, op) > 0)

  @property
  def label_dim(self) -> int:
    """Width of the augment labels (9 for the EDM/SiD configuration)."""
    return sum(_LABEL_WIDTH.get(op, 1) for op in self.enabled_ops)

  def draw_order(self) -> tuple[str, ...]:
    """Names of the draws `apply` reads, in the call order of the official code."""
    return tuple(name for op in self.enabled_ops for name, _ in _DRAWS[op])

  # -- randomness --

  def draw(self, key: Array, n: int) -> dict[str, Array]:
    """Every random number for a batch of `n`: [n] arrays, [2, n] for the translations.

    One uniform, one normal and one integer array are drawn and split into the named draws
    (each row is an independent stream; fewer random-number kernels compile faster).
    """
    order = [(name, kind) for op in self.enabled_ops for name, kind in _DRAWS[op]]
    rows = lambda kind: 2 if kind.endswith("2") else 1
    groups = {"uniform": [], "normal": [], "int": []}
    for name, kind in order:
      group = "int" if kind in ("bit", "quarter") else kind.rstrip("2")
      groups[group].append((name, kind))
    k_uniform, k_normal, k_int = jax.random.split(key, 3)
    count = lambda group: sum(rows(kind) for _, kind in groups[group])
    uniform = jax.random.uniform(k_uniform, (count("uniform"), n), jnp.float32)
    normal = jax.random.normal(k_normal, (count("normal"), n), jnp.float32)
    high = np.asarray([2 if kind == "bit" else 4 for _, kind in groups["int"]], np.int32)
    ints = jax.random.randint(k_int, (len(high), n), 0, high[:, None])
    draws = {}
    for group, values in (("uniform", uniform), ("normal", normal), ("int", ints)):
      row = 0
      for name, kind in groups[group]:
        draws[name] = values[row:row + rows(kind)].reshape((2, n) if rows(kind) == 2 else (n,))
        row += rows(kind)
    return draws

  def __call__(self, key: Array, x: Array) -> tuple[Array, Array]:
    """(key, images NHWC) -> (augmented images, augment labels [N, label_dim])."""
    return self.apply(x, self.draw(key, x.shape[0]))

  # -- execution --

  def _gate(self, op: str, draws, value: Array) -> Array:
    """The op's value where its gate fires (u < multiplier * p), zero elsewhere."""
    gate = draws[op + "_gate"] < getattr(self, op) * self.p
    return jnp.where(gate, value, jnp.zeros_like(value))

  def apply(self, x: Array, draws: dict[str, Array]) -> tuple[Array, Array]:
    """Deterministic augmentation of NHWC images `x` with the given draws (see `draw`)."""
    n, height, width, channels = x.shape
    dtype = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    x = x.astype(dtype)
    ref = jnp.zeros((n,), dtype)  # shape/dtype template for per-sample scalars
    draws = {k: _reshape_draw(k, v, n) for k, v in draws.items()}
    labels = []
    ops = set(self.enabled_ops)

    # Pixel blitting.
    if "xflip" in ops:
      w = self._gate("xflip", draws, draws["xflip"])
      x = jnp.where((w == 1)[:, None, None, None], x[:, :, ::-1], x)
      labels.append(w)
    if "yflip" in ops:
      w = self._gate("yflip", draws, draws["yflip"])
      x = jnp.where((w == 1)[:, None, None, None], x[:, ::-1], x)
      labels.append(w)
    if "rotate_int" in ops:
      if height != width:
        raise ValueError(f"rotate_int needs square images, got {height}x{width}.")
      w = self._gate("rotate_int", draws, draws["rotate_int"])
      bcast = lambda m: m[:, None, None, None]
      x = jnp.where(bcast((w == 1) | (w == 2)), x[:, :, ::-1], x)
      x = jnp.where(bcast((w == 2) | (w == 3)), x[:, ::-1], x)
      x = jnp.where(bcast((w == 1) | (w == 3)), jnp.swapaxes(x, 1, 2), x)
      labels += [(w == 1) | (w == 2), (w == 2) | (w == 3)]
    if "translate_int" in ops:
      w = self._gate("translate_int", draws, draws["translate_int"].astype(dtype) * 2 - 1)
      tx = jnp.round(w[0] * (width * self.translate_int_max)).astype(jnp.int32)
      ty = jnp.round(w[1] * (height * self.translate_int_max)).astype(jnp.int32)
      cols = jnp.arange(width)[None, :]
      rows = jnp.arange(height)[None, :]
      src_x = width - 1 - jnp.abs(width - 1 - jnp.mod(cols - tx[:, None], 2 * width - 2))
      src_y = height - 1 - jnp.abs(height - 1 - jnp.mod(rows + ty[:, None], 2 * height - 2))
      x = jnp.take_along_axis(x, src_y[:, :, None, None], axis=1)
      x = jnp.take_along_axis(x, src_x[:, None, :, None], axis=2)
      labels += [tx / (width * self.translate_int_max), ty / (height * self.translate_int_max)]

    # Geometric transformations: the inverse map G_inv from output to input coordinates.
    if any(op in ops for op in _GEOMETRIC):
      g_inv = jnp.broadcast_to(jnp.eye(3, dtype=dtype), (n, 3, 3))
      if "scale" in ops:
        w = self._gate("scale", draws, draws["scale"].astype(dtype))
        s = jnp.exp2(w * self.scale_std)
        g_inv = _matmul(g_inv, _scale2d(1 / s, 1 / s, ref))
        labels.append(w)
      if "rotate_frac" in ops:
        w = (draws["rotate_frac"].astype(dtype) * 2 - 1) * (np.pi * self.rotate_frac_max)
        w = self._gate("rotate_frac", draws, w)
        g_inv = _matmul(g_inv, _rotate2d(w))
        labels += [jnp.cos(w) - 1, jnp.sin(w)]
      if "aniso" in ops:
        w = self._gate("aniso", draws, draws["aniso"].astype(dtype))
        r = (draws["aniso_angle"].astype(dtype) * 2 - 1) * np.pi
        r = jnp.where(draws["aniso_angle_gate"] < self.aniso_rotate_prob, r, jnp.zeros_like(r))
        s = jnp.exp2(w * self.aniso_std)
        inv_s = 1 / s
        g_inv = _matmul(_matmul(_matmul(g_inv, _rotate2d(-r)), _scale2d(inv_s, 1 / inv_s, ref)),
                        _rotate2d(r))
        labels += [w * jnp.cos(r), w * jnp.sin(r)]
      if "translate_frac" in ops:
        w = self._gate("translate_frac", draws, draws["translate_frac"].astype(dtype))
        tx = w[0] * (width * self.translate_frac_std)
        ty = w[1] * (height * self.translate_frac_std)
        g_inv = _matmul(g_inv, _translate2d(-tx, -ty, ref))
        labels += [w[0], w[1]]
      x = self._warp(x, g_inv)

    # Colour transformations: a 4x4 homogeneous matrix M acting on RGB.
    if any(op in ops for op in _COLOUR):
      eye = jnp.eye(4, dtype=dtype)
      m = jnp.broadcast_to(eye, (n, 4, 4))
      axis = jnp.asarray(np.asarray([1, 1, 1, 0]) / np.sqrt(3), dtype)
      outer = jnp.outer(axis, axis)
      if "brightness" in ops:
        w = self._gate("brightness", draws, draws["brightness"].astype(dtype))
        b = w * self.brightness_std
        m = _matmul(_stack_matrix([[1, 0, 0, b], [0, 1, 0, b], [0, 0, 1, b], [0, 0, 0, 1]], ref),
                    m)
        labels.append(w)
      if "contrast" in ops:
        w = self._gate("contrast", draws, draws["contrast"].astype(dtype))
        c = jnp.exp2(w * self.contrast_std)
        m = _matmul(_stack_matrix([[c, 0, 0, 0], [0, c, 0, 0], [0, 0, c, 0], [0, 0, 0, 1]], ref),
                    m)
        labels.append(w)
      if "lumaflip" in ops:
        w = self._gate("lumaflip", draws, draws["lumaflip"])
        m = _matmul(eye - 2 * outer * w[:, None, None].astype(dtype), m)
        labels.append(w)
      if "hue" in ops:
        w = (draws["hue"].astype(dtype) * 2 - 1) * (np.pi * self.hue_max)
        w = self._gate("hue", draws, w)
        m = _matmul(_rotate3d(axis, w), m)
        labels += [jnp.cos(w) - 1, jnp.sin(w)]
      if "saturation" in ops:
        w = self._gate("saturation", draws, draws["saturation"].astype(dtype))
        factor = jnp.exp2(w * self.saturation_std)[:, None, None]
        m = _matmul(outer + (eye - outer) * factor, m)
        labels.append(w)
      if channels == 3:
        x = (jnp.einsum("nij,nhwj->nhwi", m[:, :3, :3], x, precision=_HIGHEST) +
             m[:, None, None, :3, 3])
      elif channels == 1:
        rows = jnp.mean(m[:, :3, :], axis=1)  # [N, 4]
        x = x * jnp.sum(rows[:, :3], axis=1)[:, None, None, None] + rows[:, None, None, 3:]
      else:
        raise ValueError(f"Colour augmentations need RGB or L images, got {channels} channels.")

    if labels:
      out_labels = jnp.stack([jnp.asarray(v).astype(dtype).reshape(n) for v in labels], axis=1)
    else:
      out_labels = jnp.zeros((n, 0), dtype)
    return x, out_labels

  def _warp(self, x: Array, g_inv: Array) -> Array:
    """Resamples NHWC `x` at G_inv (output -> input, centred pixel coordinates) like EDM."""
    n, height, width, _ = x.shape
    dtype = x.dtype
    border = len(SYM6) // 4  # output pixels kept beyond the image for the downsampling filter
    cx, cy = (width - 1) / 2, (height - 1) / 2

    # Padding margin: where the transformed image corners land, plus room for the filter.
    corners = jnp.asarray([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]], dtype)
    mapped = jnp.einsum("nij,kj->nik", g_inv, corners, precision=_HIGHEST)[:, :2]  # [N, xy, 4]
    margin = jnp.concatenate([jnp.max(-mapped, axis=2), jnp.max(mapped, axis=2)], axis=1)
    if self.batch_margin:
      margin = jnp.broadcast_to(jnp.max(margin, axis=0, keepdims=True), margin.shape)
    margin = margin + jnp.asarray([border * 2 - cx, border * 2 - cy] * 2, dtype)
    margin = jnp.maximum(margin, 0)
    margin = jnp.minimum(margin, jnp.asarray([width - 1, height - 1] * 2, dtype))
    mx0, my0, mx1, my1 = [v for v in jnp.ceil(margin).astype(jnp.int32).T]  # each [N]

    # Reflect-pad by the largest margin, then zero what lies outside the official padding.
    pad_y, pad_x = height - 1, width - 1
    padded = jnp.pad(x, ((0, 0), (pad_y, pad_y), (pad_x, pad_x), (0, 0)), mode="reflect")
    rows = jnp.arange(padded.shape[1])[None, :]
    cols = jnp.arange(padded.shape[2])[None, :]
    keep_rows = (rows >= (pad_y - my0)[:, None]) & (rows < (pad_y + height + my1)[:, None])
    keep_cols = (cols >= (pad_x - mx0)[:, None]) & (cols < (pad_x + width + mx1)[:, None])
    keep = keep_rows[:, :, None, None] & keep_cols[:, None, :, None]
    padded = jnp.where(keep, padded, jnp.zeros_like(padded))
    up = _upsample2x(padded)  # the official upsampled image sits at offset 2 * (pad - m0)

    # Output grid: (H + 2 border) * 2 pixels per side, in centred input coordinates at the
    # original resolution, v = ((j + 1) / 2 - (H + 2 border) / 2); mapped by G_inv, then to the
    # upsampled padded array: index = 2 v' + 3 (size - 1).
    out_h, out_w = (height + border * 2) * 2, (width + border * 2) * 2
    vx = (jnp.arange(out_w, dtype=dtype) + 1) / 2 - (width + border * 2) / 2
    vy = (jnp.arange(out_h, dtype=dtype) + 1) / 2 - (height + border * 2) / 2
    gx = (g_inv[:, 0, 0, None, None] * vx[None, None, :] +
          g_inv[:, 0, 1, None, None] * vy[None, :, None] + g_inv[:, 0, 2, None, None])
    gy = (g_inv[:, 1, 0, None, None] * vx[None, None, :] +
          g_inv[:, 1, 1, None, None] * vy[None, :, None] + g_inv[:, 1, 2, None, None])
    ix = 2 * gx + 3 * pad_x
    iy = 2 * gy + 3 * pad_y
    # Pixels of the official upsampled image (zeros padding outside it).
    lo = jnp.stack([2 * (pad_y - my0), 2 * (pad_x - mx0)], axis=1)
    hi = jnp.stack([2 * (pad_y + height + my1) - 1, 2 * (pad_x + width + mx1) - 1], axis=1)
    sampled = _bilinear(up, iy, ix, lo, hi)
    return _downsample2x(sampled, border)


def _reshape_draw(name: str, value, n: int) -> Array:
  """Recorded draws may carry singleton axes ([N, 1, 1, 1], [2, N, 1, 1, 1], [1, N])."""
  value = jnp.asarray(value)
  pair = name in ("translate_int", "translate_frac")
  return value.reshape((2, n) if pair else (n,))


def _rotate3d(v: Array, theta: Array) -> Array:
  """[N, 4, 4] rotation by `theta` about the unit axis `v` (first three entries)."""
  vx, vy, vz = v[0], v[1], v[2]
  s, c = jnp.sin(theta), jnp.cos(theta)
  cc = 1 - c
  return _stack_matrix([
      [vx * vx * cc + c, vx * vy * cc - vz * s, vx * vz * cc + vy * s, 0],
      [vy * vx * cc + vz * s, vy * vy * cc + c, vy * vz * cc - vx * s, 0],
      [vz * vx * cc - vy * s, vz * vy * cc + vx * s, vz * vz * cc + c, 0],
      [0, 0, 0, 1],
  ], theta)


def sid_augment_pipe(p: float = 0.12, **overrides) -> AugmentPipe:
  """The EDM/SiD training configuration (spec §4.8): 9 labels, every op gated by `p`.

  xflip's multiplier 1e8 makes its gate pass for any p >= 1e-8, so half of the images are mirrored
  whatever p is; at p = 0 exactly, the gate threshold is 0 and nothing fires (flips included), as
  in the official pipe. SiD's CIFAR-10 default is p = 0.12, FFHQ/AFHQ 0.15.
  """
  kwargs = dict(p=p, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
  kwargs.update(overrides)
  return AugmentPipe(**kwargs)
