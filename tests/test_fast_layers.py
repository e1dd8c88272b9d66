"""The convolution-free resampling and the per-channel GroupNorm against their plain formulations.

`layers.downsample` / `layers.upsample` (and `edm2.resample`) must give the values and gradients
of the per-channel (transposed) stride-2 convolution with the filter, and `layers.GroupNorm` those
of normalising a [..., groups, C / groups] view, to float rounding; in bfloat16 to one rounding
of the float32 result. The fast programs must also stay fast: no convolution in the resampling,
no reshape of the full tensor in GroupNorm. Last, the timing workloads of configs/bench.py build.
"""

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from sid_jax import run as run_lib
from sid_jax.nets import edm2, layers
from tests import configs_util

BF16_REL = 2.0**-7  # twice the largest relative error of one rounding to bfloat16 (2^-8)

# ---------------------------------------------------------------------------------------------
# References: the formulations the fast code replaced.
# ---------------------------------------------------------------------------------------------


def _depthwise(x, f2d, **kw):
  c = x.shape[-1]
  kernel = jnp.asarray(np.tile(f2d[:, :, None, None], (1, 1, 1, c)), x.dtype)
  return jax.lax.conv_general_dilated(x, kernel, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=c,
                                      precision=jax.lax.Precision.HIGHEST, **kw)


def _filter(taps):
  f = np.asarray(taps, np.float64)
  return np.outer(f, f) / f.sum()**2


def ref_downsample(x, taps, padding):
  """torch conv2d(x, f, stride=2, padding=padding, groups=C)."""
  return _depthwise(x, _filter(taps), window_strides=(2, 2),
                    padding=((padding, padding), (padding, padding)))


def ref_upsample(x, taps, padding):
  """torch conv_transpose2d(x, 4 f, stride=2, padding=padding, groups=C)."""
  f2d = 4 * _filter(taps)[::-1, ::-1]
  edge = f2d.shape[0] - 1 - padding
  return _depthwise(x, f2d, window_strides=(1, 1), padding=((edge, edge), (edge, edge)),
                    lhs_dilation=(2, 2))


def ref_group_norm(x, scale, bias, groups, eps):
  """Two-pass statistics over H, W and the channels of a [..., groups, C / groups] view."""
  c = x.shape[-1]
  xg = x.reshape(x.shape[:-1] + (groups, c // groups))
  axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
  mean = jnp.mean(xg, axis=axes, keepdims=True)
  centred = xg - mean
  var = jnp.mean(jnp.square(centred), axis=axes, keepdims=True)
  return (centred / jnp.sqrt(var + eps)).reshape(x.shape) * scale + bias


# ---------------------------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------------------------


def _value_and_grads(fn, args, ct):
  """fn(*args) and the gradients of sum(fn(*args) * ct) with respect to every argument."""
  out, vjp = jax.vjp(fn, *args)
  return out, vjp(ct.astype(out.dtype))


def _close(ours, ref, dtype, rel32=1e-6):
  """float32: within a few roundings of `ref`; bfloat16: one rounding of the float32 `ref`."""
  ours = np.asarray(jnp.asarray(ours, jnp.float32))
  ref = np.asarray(ref, np.float32)
  assert ours.shape == ref.shape
  scale = float(np.max(np.abs(ref))) or 1.0
  if dtype == jnp.bfloat16:
    np.testing.assert_allclose(ours, ref, rtol=BF16_REL, atol=1e-6 * scale)
  else:
    np.testing.assert_allclose(ours, ref, rtol=rel32, atol=rel32 * scale)


def _primitives(fn, *args):
  """Every primitive of fn's jaxpr (nested jaxprs included) with its output shapes."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      found.append((eqn.primitive.name, [tuple(v.aval.shape) for v in eqn.outvars]))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


# ---------------------------------------------------------------------------------------------
# Resampling.
# ---------------------------------------------------------------------------------------------

SHAPES = [(2, 8, 8, 4), (3, 6, 10, 5), (1, 7, 9, 3)]
# Each filter with no padding (the fused paths), EDM's (len - 1) // 2 and the largest, len - 1.
RESAMPLINGS = [(taps, pad) for taps in [(1, 1), (1, 3, 3, 1), (1, 2, 1), (2, 2)]
               for pad in sorted({0, (len(taps) - 1) // 2, len(taps) - 1})]


@pytest.mark.parametrize("mode", ["down", "up"])
@pytest.mark.parametrize("taps, padding", RESAMPLINGS)
def test_resampling_matches_depthwise_convolution(mode, taps, padding):
  fast = {"down": layers.downsample, "up": layers.upsample}[mode]
  ref = {"down": ref_downsample, "up": ref_upsample}[mode]
  rng = np.random.default_rng(len(taps) * 10 + padding)
  for shape in SHAPES:
    x32 = jnp.asarray(rng.normal(size=shape) + 0.5, jnp.float32)
    out_shape = jax.eval_shape(lambda x: ref(x, taps, padding), x32).shape
    ct = jnp.asarray(rng.normal(size=out_shape), jnp.bfloat16).astype(jnp.float32)
    for dtype in (jnp.float32, jnp.bfloat16):
      x = x32.astype(dtype)
      y, (dx,) = _value_and_grads(lambda x: fast(x, taps, padding), (x,), ct)
      y_ref, (dx_ref,) = _value_and_grads(lambda x: ref(x, taps, padding),
                                          (x.astype(jnp.float32),), ct)
      assert y.dtype == dtype and dx.dtype == dtype
      _close(y, y_ref, dtype)
      _close(dx, dx_ref, dtype)


def test_box_filter_is_mean_and_repetition():
  x = jax.random.normal(jax.random.key(0), (2, 6, 4, 3))
  down = np.asarray(x).reshape(2, 3, 2, 2, 2, 3).mean(axis=(2, 4))
  np.testing.assert_allclose(np.asarray(layers.downsample(x, (1, 1), 0)), down, rtol=1e-6,
                             atol=1e-7)
  up = np.repeat(np.repeat(np.asarray(x), 2, axis=1), 2, axis=2)
  np.testing.assert_array_equal(np.asarray(layers.upsample(x, (1, 1), 0)), up)


@pytest.mark.parametrize("taps", [(1, 1), (1, 3, 3, 1)])
def test_resampling_has_no_convolution(taps):
  x = jnp.zeros((2, 8, 8, 16))
  pad = (len(taps) - 1) // 2
  for fn in (lambda x: layers.downsample(x, taps, pad), lambda x: layers.upsample(x, taps, pad),
             lambda x: edm2.resample(x, taps, "down"), lambda x: edm2.resample(x, taps, "up")):
    names = [name for name, _ in _primitives(jax.grad(lambda x: jnp.sum(fn(x) ** 2)), x)]
    assert "conv_general_dilated" not in names


@pytest.mark.parametrize("mode", ["down", "up"])
def test_box_resampling_and_its_gradient_add_slices_instead_of_reducing(mode):
  # A reduce_sum over the 2x2 window axes (what autodiff makes of the repetition) ran ~100x slower
  # than four strided slices added elementwise on XLA:CPU (bench B: 0.3 s of a 6 s iteration).
  fn = {"down": layers.downsample, "up": layers.upsample}[mode]
  x = jnp.zeros((2, 8, 8, 16))
  ct = jnp.ones(jax.eval_shape(lambda x: fn(x, (1, 1), 0), x).shape)
  names = [name for name, _ in _primitives(jax.grad(lambda x: jnp.vdot(fn(x, (1, 1), 0), ct)), x)]
  assert "reduce_sum" not in names and "add" in names, names


@pytest.mark.parametrize("taps", [(1, 1), (1, 3, 3, 1)])
def test_edm2_resample_matches_depthwise_convolution(taps):
  x = jax.random.normal(jax.random.key(1), (2, 8, 6, 5))
  pad = (len(taps) - 1) // 2
  _close(edm2.resample(x, taps, "down"), ref_downsample(x, taps, pad), jnp.float32)
  _close(edm2.resample(x, taps, "up"), ref_upsample(x, taps, pad), jnp.float32)


@pytest.mark.parametrize("taps", [(1, 1), (1, 3, 3, 1)])
@pytest.mark.parametrize("up, down, fused, kernel", [
    (True, False, False, 3), (False, True, False, 3), (True, False, True, 3),
    (False, True, True, 3), (True, False, False, 0), (False, True, False, 1)])
def test_conv2d_resampling_keeps_only_learned_convolutions(taps, up, down, fused, kernel):
  """Every Conv2d path: the old composition's values, and no convolution besides the kernel's."""
  rng = np.random.default_rng(3)
  cin = 4
  cout = cin if kernel == 0 else 6
  x = jnp.asarray(rng.normal(size=(2, 8, 8, cin)), jnp.float32)
  conv = layers.Conv2d(cout, kernel, up=up, down=down, resample_filter=taps,
                       fused_resample=fused)
  params = {"params": {}}
  if kernel:  # (`Conv2d.init` is its initialiser spec, so the parameters are made here.)
    params["params"] = {
        "kernel": jnp.asarray(rng.normal(size=(kernel, kernel, cin, cout)), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=(cout,)), jnp.float32)}
  ours = conv.apply(params, x)
  f_pad = (len(taps) - 1) // 2
  w_pad = kernel // 2
  conv_w = lambda y, pad: layers._conv(y, params["params"]["kernel"], pad, None)
  if fused and up:
    ref = conv_w(ref_upsample(x, taps, max(f_pad - w_pad, 0)), max(w_pad - f_pad, 0))
  elif fused:
    ref = ref_downsample(conv_w(x, w_pad + f_pad), taps, 0)
  else:
    ref = ref_upsample(x, taps, f_pad) if up else ref_downsample(x, taps, f_pad)
    ref = conv_w(ref, w_pad) if kernel else ref
  if kernel:
    ref = ref + params["params"]["bias"]
  _close(ours, ref, jnp.float32, rel32=1e-5)
  names = [name for name, _ in _primitives(lambda x: conv.apply(params, x), x)]
  assert names.count("conv_general_dilated") == (1 if kernel else 0)


# ---------------------------------------------------------------------------------------------
# GroupNorm.
# ---------------------------------------------------------------------------------------------

# (shape, num_groups): EDM's rule gives 4 groups of 4 (16 channels), 16 of 4 (64), 32 of 8
# (256); 3 groups of 16 by request; one spatial axis; none.
NORMS = [((2, 8, 8, 16), 32), ((3, 5, 7, 64), 32), ((2, 4, 4, 256), 32), ((2, 6, 6, 48), 3),
         ((4, 10, 24), 32), ((5, 32), 32)]


@pytest.mark.parametrize("shape, num_groups", NORMS)
def test_group_norm_matches_grouped_view(shape, num_groups):
  rng = np.random.default_rng(shape[-1])
  c = shape[-1]
  groups = layers.num_groups_for(c, num_groups)
  # Channel means far apart and unequal spreads, so that mixing up groups shows.
  x32 = jnp.asarray(rng.normal(size=shape) * rng.uniform(0.5, 3, size=c) +
                    rng.normal(size=c) * 4, jnp.float32)
  scale = jnp.asarray(rng.normal(size=c), jnp.float32)
  bias = jnp.asarray(rng.normal(size=c), jnp.float32)
  ct = jnp.asarray(rng.normal(size=shape), jnp.bfloat16).astype(jnp.float32)
  norm = layers.GroupNorm(num_groups=num_groups, eps=1e-5)
  for dtype in (jnp.float32, jnp.bfloat16):
    x = x32.astype(dtype)
    fast = lambda x, s, b: norm.apply({"params": {"scale": s, "bias": b}}, x)
    ref = lambda x, s, b: ref_group_norm(x, s, b, groups, 1e-5)
    y, (dx, ds, db) = _value_and_grads(fast, (x, scale, bias), ct)
    y_ref, (dx_ref, ds_ref, db_ref) = _value_and_grads(ref, (x.astype(jnp.float32), scale,
                                                             bias), ct)
    assert y.dtype == dtype and dx.dtype == dtype and ds.dtype == jnp.float32
    _close(y, y_ref, dtype, rel32=1e-5)
    _close(dx, dx_ref, dtype, rel32=1e-5)
    _close(ds, ds_ref, jnp.float32, rel32=1e-5)
    _close(db, db_ref, jnp.float32, rel32=1e-5)


def test_group_norm_never_reshapes_the_full_tensor():
  x = jnp.zeros((2, 8, 8, 64))
  norm = layers.GroupNorm()
  params = norm.init(jax.random.key(0), x)
  loss = lambda p, x: jnp.sum(norm.apply(p, x) ** 2)
  for name, shapes in _primitives(jax.grad(loss, argnums=(0, 1)), params, x):
    if name == "reshape":
      assert all(np.prod(s) < x.size for s in shapes), shapes


# ---------------------------------------------------------------------------------------------
# The benchmark workloads.
# ---------------------------------------------------------------------------------------------

# arg: (image shape, label_dim, batch, parameters of one network, channels of the first conv,
# modules with attention: every encoder block at the attention resolution, the decoder's first
# block at the lowest resolution and its last block at the attention resolution, as in EDM).
BENCH = {
    "A": ((32, 32, 3), 0, 8, 2_207_235, 32,
          {"enc_16x16_block0", "enc_16x16_block1", "dec_8x8_in0", "dec_16x16_block2"}),
    "B": ((32, 32, 3), 0, 8, 8_797_187, 64,
          {"enc_16x16_block0", "enc_16x16_block1", "dec_8x8_in0", "dec_16x16_block2"}),
    "C": ((8, 8, 1), 10, 64, 749_089, 32,
          {"enc_4x4_block0", "dec_4x4_in0", "dec_4x4_block1"}),
}


@pytest.mark.parametrize("arg", sorted(BENCH))
def test_bench_configs_build(arg):
  image_shape, label_dim, batch, count, first, attention = BENCH[arg]
  config = configs_util.load("bench.py", arg)
  run = run_lib.build_run(config, jax.devices()[:1])
  assert run.setup.image_shape == image_shape and run.setup.label_dim == label_dim
  assert config.training.global_batch == config.training.micro_batch == batch
  params = run.init_params
  assert params is run.teacher.params  # the students start as the teacher
  assert sum(np.size(leaf) for leaf in jax.tree.leaves(params)) == count
  res, cin = image_shape[0], image_shape[2]
  assert params[f"enc_{res}x{res}_conv"]["kernel"].shape == (3, 3, cin, first)
  assert params[f"dec_{res}x{res}_aux_conv"]["kernel"].shape[-1] == cin
  assert {name for name, p in params.items() if "qkv" in p} == attention
  assert ("map_label" in params) == (label_dim > 0)
  if label_dim:
    assert params["map_label"]["kernel"].shape[0] == label_dim


def test_bench_config_rejects_unknown_workload():
  with pytest.raises(ValueError, match="bench.py"):
    configs_util.load("bench.py", "D")
