"""bfloat16 compute with float32 master weights for the EDM and EDM2 networks.

`config.model.compute_dtype='bfloat16'` builds teacher and students whose image path (every
convolution, the attention matmuls over values) runs in bfloat16, while parameters, the
preconditioning, the noise embedding, normalisation statistics, softmax and D(x) stay float32.
'float32' (the default) builds exactly the networks built without a dtype.

Error bound. bfloat16 keeps 8 significant bits: rounding a value costs at most 2^-9 relative,
about 2^-9 / sqrt(3) ~ 1.1e-3 RMS for a uniformly distributed rounding error. Every layer rounds
its input, its weight and its output, and about 10-20 layers stand between input and output of
these tiny UNets, so errors of ~1e-2 of the output's spread are expected (measured: 1.0e-2 to
1.5e-2 RMS with these random weights, which unlike trained ones leave no layer at zero). The test
allows 3e-2 RMS, and asks for at least 1e-3, far above float32 rounding (~1e-6), to prove that
bfloat16 is really used.
"""

import functools

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from sid_jax import models
from sid_jax import run as run_lib
from tests import configs_util

RES = 8
MAX_RMS_ERROR = 3e-2  # of the float32 output's standard deviation; see the module docstring
MIN_RMS_ERROR = 1e-3

# name: (class_name, kwargs, img_channels, label_dim). DDPM++ with attention, labels and
# augmentation; NCSN++ (Fourier embedding, residual encoder, skip decoder, a 4-tap filter); ADM;
# EDM2 with its log-variance head.
NETS = {
    "ddpmpp": ("EDMPrecond", dict(model_type="SongUNet", model_channels=16, channel_mult=[1, 2],
                                  num_blocks=1, attn_resolutions=[4], augment_dim=9,
                                  dropout=0.1), 3, 10),
    "ncsnpp": ("VEPrecond", dict(model_type="SongUNet", model_channels=16, channel_mult=[1, 2],
                                 num_blocks=1, attn_resolutions=[], embedding_type="fourier",
                                 encoder_type="residual", decoder_type="skip",
                                 resample_filter=[1, 3, 3, 1], channel_mult_noise=2), 3, 0),
    "adm": ("EDMPrecond", dict(model_type="DhariwalUNet", model_channels=32, channel_mult=[1, 2],
                               num_blocks=1, attn_resolutions=[4], augment_dim=9), 3, 10),
    "edm2": ("Precond", dict(model_channels=16, channel_mult=[1, 2], num_blocks=1,
                             attn_resolutions=[4], channels_per_head=16, logvar_channels=16,
                             dropout=0.1), 4, 10),
}


def _spec(name):
  cls, kwargs, channels, label_dim = NETS[name]
  return {"class_name": cls, "kwargs": dict(kwargs, img_resolution=RES, img_channels=channels,
                                            label_dim=label_dim)}


@functools.lru_cache(maxsize=None)
def _case(name):
  """(float32 denoiser, bfloat16 denoiser, float32 params, inputs x, sigma, labels, aug)."""
  _, kwargs, channels, label_dim = NETS[name]
  f32 = models.build_denoiser(_spec(name))
  b16 = models.build_denoiser(_spec(name), jnp.bfloat16)
  params = models.random_network_params(f32, (RES, RES, channels), label_dim, seed=1)
  rs = np.random.RandomState(0)
  sigma = np.asarray([0.02, 0.3, 1.0, 5.0, 40.0], np.float32)
  x = 0.5 * rs.normal(size=(5, RES, RES, channels)) + sigma[:, None, None, None] * rs.normal(
      size=(5, RES, RES, channels))
  labels = np.eye(label_dim)[rs.randint(label_dim, size=5)] if label_dim else None
  aug = 0.3 * rs.normal(size=(5, 9)) if kwargs.get("augment_dim") else None
  as32 = lambda a: None if a is None else jnp.asarray(a, jnp.float32)
  return f32, b16, params, as32(x), as32(sigma), as32(labels), as32(aug)


def _raw(den, params, x, sigma, labels, aug):
  """The raw network F(c_in x, c_noise, ...) the denoiser wraps (jitted)."""
  _, _, c_in, c_noise = den.precond.coefficients(sigma.reshape(-1, 1, 1, 1))
  fn = lambda p: den.module.apply({"params": p}, c_in * x, c_noise.reshape(-1), labels, aug)
  return np.asarray(jax.jit(fn)(params))


def _denoise(den, params, x, sigma, labels, aug, **kw):
  return jax.jit(lambda p: den(p, x, sigma, labels, aug_labels=aug, **kw))(params)


def _eqns(jaxpr):
  """Every equation of a closed jaxpr, sub-jaxprs (jit, remat, ...) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (list, tuple)) else (value,)):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _eqns(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _eqns(sub)


def _operand_dtypes(den, params, x, sigma, labels, aug, primitive):
  jaxpr = jax.make_jaxpr(lambda p: den(p, x, sigma, labels, aug_labels=aug))(params)
  return [tuple(str(v.aval.dtype) for v in eqn.invars)
          for eqn in _eqns(jaxpr.jaxpr) if eqn.primitive.name == primitive]


@pytest.mark.parametrize("name", list(NETS))
def test_float32_is_the_network_built_without_a_dtype(name):
  """The default: config 'float32' means no dtype; an explicit float32 forward is identical."""
  f32, _, params, *inputs = _case(name)
  assert models.COMPUTE_DTYPES["float32"] is None and f32.module.dtype is None
  explicit = models.build_denoiser(_spec(name), jnp.float32)
  np.testing.assert_array_equal(_raw(f32, params, *inputs), _raw(explicit, params, *inputs))
  jaxpr = jax.make_jaxpr(lambda p: f32(p, *inputs[:3], aug_labels=inputs[3]))(params)
  assert "bf16" not in str(jaxpr)


@pytest.mark.parametrize("name", list(NETS))
def test_bfloat16_is_close_to_float32_but_not_equal(name):
  f32, b16, params, *inputs = _case(name)
  ref, low = _raw(f32, params, *inputs), _raw(b16, params, *inputs)
  assert low.dtype == np.float32  # outputs come back in the input's dtype
  rel = np.sqrt(np.mean((low - ref)**2)) / np.std(ref)
  assert MIN_RMS_ERROR < rel < MAX_RMS_ERROR, rel


@pytest.mark.parametrize("name", list(NETS))
def test_bfloat16_keeps_float32_params_and_outputs(name):
  f32, b16, params, *inputs = _case(name)
  _, _, channels, label_dim = NETS[name]
  init = models.abstract_params(b16, (RES, RES, channels), label_dim)
  assert {leaf.dtype for leaf in jax.tree.leaves(init)} == {jnp.dtype(jnp.float32)}
  kw = dict(output="encoder_decoder")
  if name == "edm2":
    kw["return_logvar"] = True
  outs = _denoise(b16, params, *inputs, **kw)
  assert all(o.dtype == jnp.float32 for o in outs)
  if name == "edm2":  # the log-variance head runs in float32: bit-identical
    np.testing.assert_array_equal(outs[-1], _denoise(f32, params, *inputs, **kw)[-1])


@pytest.mark.parametrize("name", list(NETS))
def test_bfloat16_convolutions_in_the_jaxpr(name):
  _, b16, params, *inputs = _case(name)
  convs = _operand_dtypes(b16, params, *inputs, "conv_general_dilated")
  assert len(convs) > 20
  assert all(dtypes == ("bfloat16", "bfloat16") for dtypes in convs), convs
  dots = _operand_dtypes(b16, params, *inputs, "dot_general")
  assert ("bfloat16", "bfloat16") in dots  # attention over the values


@pytest.mark.parametrize("name", ["ddpmpp", "edm2"])
def test_bfloat16_gradient_is_float32_and_finite(name):
  _, b16, params, x, sigma, labels, aug = _case(name)

  def loss(p):
    d = b16(p, x, sigma, labels, aug_labels=aug, train=True, rng=jax.random.key(0))
    return jnp.mean(jnp.square(d - x))

  grads = jax.jit(jax.grad(loss))(params)
  leaves = jax.tree.leaves(grads)
  assert all(g.dtype == jnp.float32 for g in leaves)
  assert all(np.all(np.isfinite(g)) for g in leaves)
  assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0


@pytest.mark.parametrize("value", ["float16", "bf16", "fp32", ""])
def test_bad_compute_dtype_is_named(value):
  config = configs_util.load("gmm_sid.py", "tiny", **{"model.compute_dtype": value})
  with pytest.raises(ValueError, match=r"config\.model\.compute_dtype=.*'float32', 'bfloat16'"):
    models.build_teacher(config)
  with pytest.raises(ValueError, match=r"config\.model\.compute_dtype"):
    run_lib.build_run(config, jax.devices()[:1])


def test_teacher_and_students_share_the_setting():
  config = configs_util.load("sid_edm.py", "dataset=cifar10_cond,tiny",
                             **{"model.compute_dtype": "bfloat16"})
  teacher = models.build_teacher(config)
  student, params, _ = models.build_students(config, teacher, jax.random.key(0))
  assert teacher.denoiser.module.dtype == jnp.bfloat16
  assert student.module.dtype == jnp.bfloat16
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  edm2 = configs_util.load("sid_edm2.py", "size=xs,tiny", **{"model.compute_dtype": "bfloat16"})
  assert models.build_teacher(edm2).denoiser.module.dtype == jnp.bfloat16


def test_bfloat16_run_takes_a_finite_step():
  """The tiny GMM run (SongUNet generator and fake score, one level to compile faster) in
  bfloat16: one compiled step."""
  config = configs_util.load("gmm_sid.py", "tiny", **{"model.compute_dtype": "bfloat16",
                                                      "model.kwargs.channel_mult": [1],
                                                      "training.global_batch": 16})
  run = run_lib.build_run(config, jax.devices()[:1])
  assert run.setup.fake_score.module.dtype == jnp.bfloat16
  state = run_lib.initial_state(run)
  assert {leaf.dtype for leaf in jax.tree.leaves(state.generator)} == {jnp.dtype(jnp.float32)}
  teacher = run_lib.teacher_on_mesh(run)
  key = jax.random.key(0)
  step = run_lib.compile_train_step(run, state, teacher, key)
  state, metrics = step(state, teacher, key, None)
  assert np.isfinite(float(metrics["fake_loss"])) and np.isfinite(float(metrics["gen_loss"]))
  for tree in (state.generator, state.fake_score):
    leaves = jax.tree.leaves(tree)
    assert all(leaf.dtype == jnp.float32 and np.all(np.isfinite(leaf)) for leaf in leaves)
