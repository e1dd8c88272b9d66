"""The Inception-v3 variant behind FID ("FID Inception"), in Flax linen, NHWC.

This is the network pytorch-fid's `InceptionV3(use_fid_inception=True)` evaluates: torchvision's
Inception-v3 layout with the 2015-12-05 TensorFlow graph's quirks (average pools that ignore the
zero padding in the A, C and first E block; a max pool in the last E block), 1008-way classifier.
Submodules carry torchvision's `Inception3` names (`Conv2d_1a_3x3`, `Mixed_5b`, ... `fc`; inside a
block `branch1x1`, ...; inside a BasicConv2d `conv` and `bn`), so the state-dict importer in
`sid_jax.weights.inception` maps names one to one.

Everything is inference-only: BatchNorm always uses `batch_stats` (eps 1e-3). Convolutions default
to `Precision.HIGHEST`, since FID is sensitive to the reduced-precision float32 convolutions some
accelerators use by default.

Input convention of `FIDInceptionV3` (as pytorch-fid): float images in [0, 1], any size, NHWC,
RGB; they are resized to 299x299 with torch-compatible bilinear interpolation (align_corners=False,
no antialiasing) and mapped to [-1, 1]. `preprocess` / `preprocess_uint8` do the same outside the
network.

The same weights serve three front-ends (`FRONT_ENDS`), which differ only in how uint8 images reach
the network's 299x299 input; run the network with `resize_input=False, normalize_input=False` on
their output:
  'tf1-bilinear'  NVIDIA's TorchScript `inception-2015-12-05.pt`, which EDM, StyleGAN3 and SiD
                  measure with: uint8 -> float [0, 255], TensorFlow 1's legacy bilinear resize
                  (`resize_bilinear_tf1`), then (x - 128) / 128 (`preprocess_uint8_tf1`).
  'pytorch-fid'   pytorch-fid: uint8 / 255, torch's bilinear resize, 2x - 1 (`preprocess_uint8`).
  'gigagan-clean-fid'  SiD-LSG's COCO FID (GigaGAN's evaluator calling clean-fid's "clean"
                  mode): resized to 299 on the host with PIL (see
                  `sid_jax.evaluation.features.gigagan_clean_fid_input`), then (x - 128) / 128
                  (`preprocess_resized`) on the device.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

FID_INPUT_SIZE = 299
BN_EPS = 1e-3
NUM_LOGITS = 1008
POOL_FEATURES = 2048
DEFAULT_PRECISION = jax.lax.Precision.HIGHEST


def _pair(value) -> tuple[int, int]:
  if isinstance(value, int):
    return (value, value)
  value = tuple(value)
  if len(value) != 2:
    raise ValueError(f"Expected an int or a pair, got {value!r}.")
  return value


# ---------------------------------------------------------------------------------------------
# Input preprocessing.
# ---------------------------------------------------------------------------------------------


def _bilinear_taps(in_size: int, out_size: int):
  """Source indices and weights of torch's bilinear resize (align_corners=False) along one axis.

  Computed in float64 on the host: the shapes are static, and float32 source coordinates would
  lose ~1e-5 near the far edge of large inputs.
  """
  src = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
  src = np.maximum(src, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  return lo, hi, frac


def resize_bilinear(images: Array, size: tuple[int, int]) -> Array:
  """Bilinear resize of NHWC images, equal to torch's `F.interpolate(mode='bilinear')`.

  Matches `align_corners=False, antialias=False` for both up- and downsampling (unlike
  `jax.image.resize`, which antialiases when downsampling). Separable over H then W.
  """
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"Expected NHWC images, got shape {images.shape}.")
  for axis, out_size in ((1, size[0]), (2, size[1])):
    in_size = images.shape[axis]
    if in_size == out_size:
      continue
    lo, hi, frac = _bilinear_taps(in_size, out_size)
    shape = [1] * images.ndim
    shape[axis] = out_size
    w_hi = jnp.asarray(frac.reshape(shape), images.dtype)
    w_lo = jnp.asarray((1.0 - frac).reshape(shape), images.dtype)
    images = (jnp.take(images, lo, axis=axis) * w_lo + jnp.take(images, hi, axis=axis) * w_hi)
  return images


def preprocess(images: Array, *, resize: bool = True, normalize: bool = True) -> Array:
  """pytorch-fid's input transform: NHWC float images in [0, 1] -> 299x299 in [-1, 1]."""
  images = jnp.asarray(images)
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(f"preprocess expects float images in [0, 1], got {images.dtype}; "
                    "use preprocess_uint8 for uint8 images.")
  if resize:
    images = resize_bilinear(images, (FID_INPUT_SIZE, FID_INPUT_SIZE))
  if normalize:
    images = 2 * images - 1
  return images


def preprocess_uint8(images_uint8_nhwc: Array) -> Array:
  """uint8 NHWC RGB images -> float32 [B, 299, 299, 3] in [-1, 1], the network's own input.

  Divides by 255 as torchvision's `ToTensor` does in pytorch-fid's data loader, then applies
  `preprocess`. Feed the result to `FIDInceptionV3(resize_input=False, normalize_input=False)`;
  the default `FIDInceptionV3()` instead takes `images_uint8 / 255` directly.
  """
  images = jnp.asarray(images_uint8_nhwc)
  if images.dtype != jnp.uint8:
    raise TypeError(f"preprocess_uint8 expects uint8 images, got {images.dtype}.")
  # A table of correctly rounded v / 255: XLA's float division on CPU can be off by one ulp.
  table = jnp.asarray(np.arange(256, dtype=np.float32) / np.float32(255))
  return preprocess(jnp.take(table, images.astype(jnp.int32)))


def _tf1_bilinear_taps(in_size: int, out_size: int):
  """Source indices and weights of TensorFlow 1's legacy bilinear resize along one axis.

  `tf.compat.v1.image.resize_bilinear(align_corners=False, half_pixel_centers=False)`: the output
  cell i samples the input at i * in_size / out_size (no half-pixel offset, so the image shifts by
  half a cell), clamped to the last cell. The coordinates are computed in float32 exactly as TF's
  kernel does (scale = float(in) / out, position = float(i) * scale), so the weights are TF's.
  NVIDIA's TorchScript Inception samples the same positions with `grid_sample` on a shifted
  affine grid (border padding).
  """
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.arange(out_size, dtype=np.float32) * scale
  floor = np.floor(src)
  lo = np.clip(floor.astype(np.int64), 0, in_size - 1).astype(np.int32)
  hi = np.minimum(np.ceil(src).astype(np.int64), in_size - 1).astype(np.int32)
  frac = (src - floor).astype(np.float32)
  return lo, hi, frac


def resize_bilinear_tf1(images: Array, size: tuple[int, int]) -> Array:
  """TensorFlow 1's legacy bilinear resize of NHWC float images (no antialiasing).

  Equal to `tf.compat.v1.image.resize_bilinear(images, size, align_corners=False,
  half_pixel_centers=False)` to float32 rounding: the width is interpolated first, then the
  height, each as `a + (b - a) * t` with TF's float32 weights (`_tf1_bilinear_taps`). This is the
  resize inside the TF 2015-12-05 Inception graph and NVIDIA's TorchScript port of it.
  """
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"Expected NHWC images, got shape {images.shape}.")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(f"resize_bilinear_tf1 expects float images, got {images.dtype}.")
  for axis, out_size in ((2, size[1]), (1, size[0])):
    in_size = images.shape[axis]
    if in_size == out_size:
      continue
    lo, hi, frac = _tf1_bilinear_taps(in_size, out_size)
    shape = [1] * images.ndim
    shape[axis] = out_size
    t = jnp.asarray(frac.reshape(shape), images.dtype)
    a = jnp.take(images, lo, axis=axis)
    b = jnp.take(images, hi, axis=axis)
    images = a + (b - a) * t
  return images


def preprocess_resized(images_0_255: Array) -> Array:
  """The TF graph's own input mapping, (x - 128) / 128, of float images in [0, 255]."""
  return (jnp.asarray(images_0_255, jnp.float32) - 128.0) / 128.0


def preprocess_uint8_tf1(images_uint8_nhwc: Array) -> Array:
  """NVIDIA's TorchScript front-end: uint8 NHWC -> float32 [B, 299, 299, 3] network input.

  uint8 -> float [0, 255] (exact), `resize_bilinear_tf1` to 299x299, then (x - 128) / 128, in the
  order of the TorchScript module (and of the TF graph it was exported from). Feed the result to
  `FIDInceptionV3(resize_input=False, normalize_input=False)`.
  """
  images = jnp.asarray(images_uint8_nhwc)
  if images.dtype != jnp.uint8:
    raise TypeError(f"preprocess_uint8_tf1 expects uint8 images, got {images.dtype}.")
  x = resize_bilinear_tf1(images.astype(jnp.float32), (FID_INPUT_SIZE, FID_INPUT_SIZE))
  return preprocess_resized(x)


# How uint8 images reach the network (see the module docstring). 'gigagan-clean-fid' resizes on
# the host, so its device part takes float [B, 299, 299, 3] images in [0, 255].
FRONT_ENDS = ("tf1-bilinear", "pytorch-fid", "gigagan-clean-fid")


def front_end_input(images: Array, front_end: str) -> Array:
  """The network input of `front_end`: uint8 NHWC images, or for 'gigagan-clean-fid' float
  [B, 299, 299, 3] images in [0, 255] already resized on the host."""
  if front_end == "tf1-bilinear":
    return preprocess_uint8_tf1(images)
  if front_end == "pytorch-fid":
    return preprocess_uint8(images)
  if front_end == "gigagan-clean-fid":
    images = jnp.asarray(images)
    if images.shape[1:3] != (FID_INPUT_SIZE, FID_INPUT_SIZE):
      raise ValueError(f"The gigagan-clean-fid front-end takes images resized to {FID_INPUT_SIZE}x"
                       f"{FID_INPUT_SIZE} on the host, got shape {images.shape}.")
    return preprocess_resized(images)
  raise ValueError(f"Unknown Inception front-end {front_end!r}; expected one of {FRONT_ENDS}.")


# ---------------------------------------------------------------------------------------------
# Building blocks.
# ---------------------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
  """Convolution without bias, BatchNorm (eps 1e-3, running statistics) and ReLU.

  `padding` is torch's symmetric explicit padding: an int or (pad_h, pad_w).
  """
  features: int
  kernel_size: int | tuple[int, int] = 1
  strides: int | tuple[int, int] = 1
  padding: int | tuple[int, int] = 0
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x: Array) -> Array:
    pad_h, pad_w = _pair(self.padding)
    x = nn.Conv(self.features,
                _pair(self.kernel_size),
                strides=_pair(self.strides),
                padding=((pad_h, pad_h), (pad_w, pad_w)),
                use_bias=False,
                precision=self.precision,
                name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3_excluding_pad(x: Array) -> Array:
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s1(x: Array) -> Array:
  # flax pads max pools with -inf, so padded cells never win.
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_s2(x: Array) -> Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class _Block(nn.Module):
  """Shared helper: a named BasicConv2d with this block's precision."""
  precision: Any = DEFAULT_PRECISION

  def conv(self, name: str, features: int, kernel_size=1, strides=1, padding=0):
    return BasicConv2d(features, kernel_size, strides, padding, precision=self.precision, name=name)


class FIDInceptionA(_Block):
  """Mixed_5b/5c/5d: output 224 + pool_features channels, same spatial size."""
  pool_features: int = 32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b1 = self.conv("branch1x1", 64)(x)
    b5 = self.conv("branch5x5_1", 48)(x)
    b5 = self.conv("branch5x5_2", 64, 5, padding=2)(b5)
    b3 = self.conv("branch3x3dbl_1", 64)(x)
    b3 = self.conv("branch3x3dbl_2", 96, 3, padding=1)(b3)
    b3 = self.conv("branch3x3dbl_3", 96, 3, padding=1)(b3)
    bp = self.conv("branch_pool", self.pool_features)(_avg_pool_3x3_excluding_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
  """Mixed_6a: stride-2 reduction, output 480 + C channels."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b3 = self.conv("branch3x3", 384, 3, strides=2)(x)
    bd = self.conv("branch3x3dbl_1", 64)(x)
    bd = self.conv("branch3x3dbl_2", 96, 3, padding=1)(bd)
    bd = self.conv("branch3x3dbl_3", 96, 3, strides=2)(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionC(_Block):
  """Mixed_6b..6e: factorised 7x7 convolutions, output 768 channels."""
  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c7 = self.channels_7x7
    b1 = self.conv("branch1x1", 192)(x)
    b7 = self.conv("branch7x7_1", c7)(x)
    b7 = self.conv("branch7x7_2", c7, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7)
    bd = self.conv("branch7x7dbl_1", c7)(x)
    bd = self.conv("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(bd)
    bd = self.conv("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(bd)
    bd = self.conv("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(bd)
    bd = self.conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(bd)
    bp = self.conv("branch_pool", 192)(_avg_pool_3x3_excluding_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
  """Mixed_7a: stride-2 reduction, output 512 + C channels."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b3 = self.conv("branch3x3_1", 192)(x)
    b3 = self.conv("branch3x3_2", 320, 3, strides=2)(b3)
    b7 = self.conv("branch7x7x3_1", 192)(x)
    b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
    b7 = self.conv("branch7x7x3_4", 192, 3, strides=2)(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class _FIDInceptionE(_Block):
  """Mixed_7b/7c: output 2048 channels; subclasses choose the pool of the pool branch."""

  def pool(self, x: Array) -> Array:
    raise NotImplementedError

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b1 = self.conv("branch1x1", 320)(x)
    b3 = self.conv("branch3x3_1", 384)(x)
    b3a = self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3)
    b3b = self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3)
    bd = self.conv("branch3x3dbl_1", 448)(x)
    bd = self.conv("branch3x3dbl_2", 384, 3, padding=1)(bd)
    bda = self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd)
    bdb = self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd)
    bp = self.conv("branch_pool", 192)(self.pool(x))
    return jnp.concatenate([b1, b3a, b3b, bda, bdb, bp], axis=-1)


class FIDInceptionE_1(_FIDInceptionE):  # pylint: disable=invalid-name
  """Mixed_7b: the pool branch averages over the unpadded cells only."""

  def pool(self, x: Array) -> Array:
    return _avg_pool_3x3_excluding_pad(x)


class FIDInceptionE_2(_FIDInceptionE):  # pylint: disable=invalid-name
  """Mixed_7c: the pool branch uses a 3x3 stride-1 max pool (the TF graph's quirk)."""

  def pool(self, x: Array) -> Array:
    return _max_pool_3x3_s1(x)


# ---------------------------------------------------------------------------------------------
# The full network.
# ---------------------------------------------------------------------------------------------


class FIDInceptionV3(nn.Module):
  """pytorch-fid's `InceptionV3` with the FID weights' structure, NHWC.

  Attributes:
    resize_input: bilinearly resize the input to 299x299 first (torch-compatible, see
      `resize_bilinear`).
    normalize_input: map the input from [0, 1] to [-1, 1].
    last_block: the last of pytorch-fid's four output blocks to compute (0: after the first max
      pool, 64 channels; 1: after the second, 192; 2: after Mixed_6e, 768; 3: pooled 2048-d
      features and the classifier). Layers past it are not created, so their parameters are not
      expected either.
    block_outputs: spatial outputs of blocks 0..2 to return as well, e.g. (0, 1); block 3 is
      always returned, pooled, as 'pool'.
    precision: convolution precision.

  Returns a dict. With last_block == 3 it holds
    'pool': [B, 2048] the FID features (mean over H, W after Mixed_7c),
    'logits': [B, 1008] = pool @ fc.kernel + fc.bias,
    'logits_unbiased': [B, 1008] = pool @ fc.kernel (what Inception Score implementations based
      on these weights use);
  plus 'block{i}' [B, H, W, C] for each i in block_outputs.
  """
  resize_input: bool = True
  normalize_input: bool = True
  last_block: int = 3
  block_outputs: Sequence[int] = ()
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, images: Array) -> dict[str, Array]:
    if not 0 <= self.last_block <= 3:
      raise ValueError(f"last_block must be in 0..3, got {self.last_block}.")
    wanted = set(self.block_outputs)
    if not wanted <= set(range(min(self.last_block, 2) + 1)):
      raise ValueError(f"block_outputs {tuple(self.block_outputs)} must lie in "
                       f"0..min(last_block, 2) (block 3 is returned as 'pool').")
    x = jnp.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"Expected NHWC RGB images [B, H, W, 3], got shape {x.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"FIDInceptionV3 expects float images, got {x.dtype} (divide uint8 "
                      "images by 255, or use preprocess_uint8 with resize/normalize off).")
    x = preprocess(x.astype(jnp.float32), resize=self.resize_input,
                   normalize=self.normalize_input)

    p = self.precision
    out = {}

    def emit(index, value):
      if index in wanted:
        out[f"block{index}"] = value

    # Block 0.
    x = BasicConv2d(32, 3, strides=2, precision=p, name="Conv2d_1a_3x3")(x)
    x = BasicConv2d(32, 3, precision=p, name="Conv2d_2a_3x3")(x)
    x = BasicConv2d(64, 3, padding=1, precision=p, name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)
    emit(0, x)
    if self.last_block == 0:
      return out
    # Block 1.
    x = BasicConv2d(80, 1, precision=p, name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, 3, precision=p, name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_s2(x)
    emit(1, x)
    if self.last_block == 1:
      return out
    # Block 2.
    x = FIDInceptionA(pool_features=32, precision=p, name="Mixed_5b")(x)
    x = FIDInceptionA(pool_features=64, precision=p, name="Mixed_5c")(x)
    x = FIDInceptionA(pool_features=64, precision=p, name="Mixed_5d")(x)
    x = InceptionB(precision=p, name="Mixed_6a")(x)
    x = FIDInceptionC(channels_7x7=128, precision=p, name="Mixed_6b")(x)
    x = FIDInceptionC(channels_7x7=160, precision=p, name="Mixed_6c")(x)
    x = FIDInceptionC(channels_7x7=160, precision=p, name="Mixed_6d")(x)
    x = FIDInceptionC(channels_7x7=192, precision=p, name="Mixed_6e")(x)
    emit(2, x)
    if self.last_block == 2:
      return out
    # Block 3.
    x = InceptionD(precision=p, name="Mixed_7a")(x)
    x = FIDInceptionE_1(precision=p, name="Mixed_7b")(x)
    x = FIDInceptionE_2(precision=p, name="Mixed_7c")(x)
    pool = jnp.mean(x, axis=(1, 2))
    fc = nn.Dense(NUM_LOGITS, precision=p, name="fc")
    out["pool"] = pool
    out["logits"] = fc(pool)
    out["logits_unbiased"] = jnp.dot(pool, fc.variables["params"]["kernel"], precision=p)
    return out
