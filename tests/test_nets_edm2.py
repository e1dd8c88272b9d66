"""EDM2 U-Net port against the official PyTorch fixtures (tests/testdata/edm2_*.npz).

Each fixture holds a tiny official network (random, perturbed weights; every MPConv weight rescaled
per output channel), its constructor kwargs, inputs and the official forward evaluated in float64.
Everything goes through the registry (official class name + kwargs) and the strict converter.
"""

import json
import pathlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sid_jax.weights import edm2 as edm2_params
from sid_jax.nets import edm2
from sid_jax.models.edm2 import build_edm2_denoiser

TESTDATA = pathlib.Path(__file__).parent / "testdata"
CASES = ("edm2_unet", "edm2_generator", "edm2_precond_nvidia")


def _nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


def _nchw(a):
  return np.transpose(np.asarray(a), (0, 3, 1, 2))


def _assert_parity(ours, ref):
  ref = np.asarray(ref)
  np.testing.assert_allclose(np.asarray(ours, np.float64), ref, rtol=1e-5,
                             atol=1e-5 * np.max(np.abs(ref)))


class Case:
  """A loaded fixture: denoiser from the registry, params through the converter, jitted calls."""

  def __init__(self, name):
    data = np.load(TESTDATA / f"{name}.npz", allow_pickle=False)
    self.name = name
    self.data = data
    self.meta = json.loads(str(data["meta_json"]))
    self.config = json.loads(str(data["config_json"]))
    self.denoiser = build_edm2_denoiser(self.meta["cls"], self.config)
    self.state_dict = {k[len("param/"):]: data[k] for k in data.files if k.startswith("param/")}
    self.params = edm2_params.torch_state_dict_to_flax(self.state_dict, self.denoiser)
    self.x = jnp.asarray(_nhwc(data["in/x"]))
    self.sigma = jnp.asarray(data["in/sigma"])
    self.labels = jnp.asarray(data["in/class_labels"])
    self._fns = {}

  def call(self, params, output="decoder", return_logvar=False, x=None):
    key = (output, return_logvar)
    if key not in self._fns:
      self._fns[key] = jax.jit(lambda p, x, s, c: self.denoiser(
          p, x, s, c, output=output, return_logvar=return_logvar))
    return self._fns[key](params, self.x if x is None else x, self.sigma, self.labels)

  def official_call(self, params=None):
    """The fixture's own forward (its return_flag / return_logvar), outputs named as in meta."""
    kw = self.meta["forward_kwargs"]
    out = self.call(self.params if params is None else params,
                    output=kw.get("return_flag", "decoder"),
                    return_logvar=kw.get("return_logvar", False))
    out = out if isinstance(out, tuple) else (out,)
    assert len(out) == len(self.meta["outputs"])
    return dict(zip(self.meta["outputs"], out))


_CACHE = {}


def load(name) -> Case:
  if name not in _CACHE:
    _CACHE[name] = Case(name)
  return _CACHE[name]


def _to_ref_layout(name, value):
  value = np.asarray(value)
  return value if name == "logvar" else _nchw(value)


# ---------------------------------------------------------------------------------------------
# Golden parity.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_golden_parity_float32(name):
  case = load(name)
  outputs = case.official_call()
  assert set(outputs) == {k[len("out64/"):] for k in case.data.files if k.startswith("out64/")}
  for key, value in outputs.items():
    assert value.dtype == jnp.float32
    ref = case.data[f"out64/{key}"]
    ours = _to_ref_layout(key, value)
    assert ours.shape == ref.shape, (key, ours.shape, ref.shape)
    _assert_parity(ours, ref)


def test_golden_parity_float64_is_exact_up_to_rounding():
  """In float64 the port reproduces the float64 reference to reduction-order rounding."""
  case = load("edm2_unet")
  with jax.enable_x64(True):
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), case.params)
    fn = jax.jit(lambda p, x, s, c: case.denoiser(p, x, s, c, output="encoder_decoder",
                                                  return_logvar=True))
    d, logits, logvar = fn(params, jnp.asarray(case.x, jnp.float64),
                           jnp.asarray(case.sigma, jnp.float64),
                           jnp.asarray(case.labels, jnp.float64))
    assert d.dtype == jnp.float64
    for key, value in (("D", d), ("logits", logits), ("logvar", logvar)):
      ref = case.data[f"out64/{key}"]
      np.testing.assert_allclose(_to_ref_layout(key, value), ref, rtol=1e-11,
                                 atol=1e-12 * np.max(np.abs(ref)))


def test_output_modes_agree_and_encoder_skips_decoder():
  case = load("edm2_unet")
  d_both, logits_both, logvar_both = case.call(case.params, "encoder_decoder", True)
  d_dec = case.call(case.params, "decoder")
  logits_enc = case.call(case.params, "encoder")
  np.testing.assert_array_equal(np.asarray(d_dec), np.asarray(d_both))
  np.testing.assert_array_equal(np.asarray(logits_enc), np.asarray(logits_both))
  assert logits_enc.shape == (4, 8, 8, 1)
  _assert_parity(_nchw(logits_enc), case.data["out64/logits"])
  _assert_parity(logvar_both, case.data["out64/logvar"])

  # Encoder-only mode must not touch the decoder: it traces without any decoder parameter
  # (jax.eval_shape: tracing is enough to prove it, no compile needed).
  unet = {k: v for k, v in case.params["unet"].items()
          if not (k.startswith("dec_") or k == "out_conv")}
  assert len(unet) < len(case.params["unet"]) - 5

  def run(output):
    return jax.eval_shape(lambda p: case.denoiser(p, case.x, case.sigma, case.labels,
                                                  output=output), {"unet": unet})

  assert run("encoder").shape == (4, 8, 8, 1)
  with pytest.raises(flax.errors.ScopeParamNotFoundError):
    run("decoder")


def test_generator_from_teacher_state_dict_with_explicit_drop():
  """The generator class loads the teacher's weights minus logvar_* and gives the same D."""
  teacher, gen = load("edm2_unet"), load("edm2_generator")
  with pytest.raises(ValueError, match="logvar_linear.weight"):
    edm2_params.torch_state_dict_to_flax(teacher.state_dict, gen.denoiser)
  params = edm2_params.torch_state_dict_to_flax(teacher.state_dict, gen.denoiser,
                                                ignore_prefixes=("logvar_",))
  d = gen.call(params, x=teacher.x)  # sigma / labels are the same in both fixtures.
  np.testing.assert_array_equal(np.asarray(gen.sigma), np.asarray(teacher.sigma))
  np.testing.assert_array_equal(np.asarray(gen.labels), np.asarray(teacher.labels))
  _assert_parity(_nchw(d), teacher.data["out64/D"])
  with pytest.raises(ValueError, match="no log-variance head"):
    gen.denoiser(params, teacher.x, teacher.sigma, teacher.labels, return_logvar=True)


# ---------------------------------------------------------------------------------------------
# Converter strictness.
# ---------------------------------------------------------------------------------------------


def test_converter_layout_and_round_trip():
  case = load("edm2_unet")
  p = case.params
  np.testing.assert_array_equal(p["unet"]["enc_8x8_block0"]["conv_res0"]["weight"],
                                case.state_dict["unet.enc.8x8_block0.conv_res0.weight"])
  np.testing.assert_array_equal(p["unet"]["emb_fourier"]["freqs"],
                                case.state_dict["unet.emb_fourier.freqs"])
  np.testing.assert_array_equal(p["logvar_fourier"]["phases"],
                                case.state_dict["logvar_fourier.phases"])
  assert p["unet"]["out_gain"].shape == ()
  back = edm2_params.flax_to_torch_state_dict(p)
  assert sorted(back) == sorted(case.state_dict)
  for k, v in case.state_dict.items():
    np.testing.assert_array_equal(back[k], v)
  for k in case.state_dict:
    assert edm2_params.flax_path_to_torch_name(edm2_params.torch_name_to_flax_path(k)) == k


def test_converter_reports_every_bad_key_by_name():
  case = load("edm2_unet")
  sd = dict(case.state_dict)
  with pytest.raises(ValueError, match=r"1 missing:\n\s+unet\.dec\.8x8_in1\.emb_gain"):
    edm2_params.torch_state_dict_to_flax(
        {k: v for k, v in sd.items() if k != "unet.dec.8x8_in1.emb_gain"}, case.denoiser)
  with pytest.raises(ValueError, match=r"1 unexpected:\n\s+unet\.enc\.extra\.weight"):
    edm2_params.torch_state_dict_to_flax({**sd, "unet.enc.extra.weight": np.zeros(3)},
                                         case.denoiser)
  bad = {**sd, "unet.enc.16x16_conv.weight": np.zeros((16, 5, 3, 3), np.float32).transpose(
      2, 3, 1, 0)}
  with pytest.raises(ValueError, match=r"1 mis-shaped:\n\s+unet\.enc\.16x16_conv\.weight: shape "
                     r"\(3, 3, 5, 16\), expected \(16, 5, 3, 3\)"):
    edm2_params.torch_state_dict_to_flax(bad, case.denoiser)
  # All problems at once, buffers included.
  del bad["unet.emb_fourier.phases"]
  bad["unet.dec.8x8_in0.attn_qkv.weight"] = np.zeros((32, 32, 1, 1), np.float32)
  bad["unet.foo"] = np.zeros(())
  with pytest.raises(ValueError) as err:
    edm2_params.torch_state_dict_to_flax(bad, case.denoiser)
  msg = str(err.value)
  for name in ("unet.emb_fourier.phases", "unet.foo", "unet.enc.16x16_conv.weight",
               "unet.dec.8x8_in0.attn_qkv.weight"):
    assert name in msg, (name, msg)
  # The NVIDIA class wants the same names; its fixture's keys also match the SiDA class.
  nvidia = load("edm2_precond_nvidia")
  assert sorted(nvidia.state_dict) == sorted(sd)


def test_registry_rejects_unknown_classes_and_kwargs():
  cfg = load("edm2_unet").config
  with pytest.raises(ValueError, match="SongUNet"):
    build_edm2_denoiser("SongUNet", cfg)
  with pytest.raises(ValueError, match="force_normalization"):
    build_edm2_denoiser("Precond", cfg)  # NVIDIA's class has no such kwarg.
  with pytest.raises(ValueError, match="bogus"):
    build_edm2_denoiser("EDM_2_Precond_Generator", {**cfg, "bogus": 1})
  with pytest.raises(ValueError, match="use_gan"):
    build_edm2_denoiser("EDM_2_Precond_EncoderDecoder",
                        {k: v for k, v in cfg.items() if k != "use_gan"})
  with pytest.raises(ValueError, match="flavor"):
    build_edm2_denoiser("Precond", {"img_resolution": 8, "img_channels": 3, "label_dim": 0,
                                    "flavor": "dec"})
  den = build_edm2_denoiser("EDM_2_Precond_EncoderDecoder", cfg)
  assert den.label_dim == 10 and den.precond.sigma_data == 0.5
  assert den.module.force_normalization and den.module.use_gan
  assert den.module.channels_per_head == 16 and den.module.logvar_channels == 128
  assert build_edm2_denoiser("EDM_2_Precond_Generator", cfg).module.logvar_channels is None


# ---------------------------------------------------------------------------------------------
# Forced weight normalisation.
# ---------------------------------------------------------------------------------------------


def _weight_leaves(params):
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def test_project_mpconv_weights():
  case = load("edm2_unet")
  before = _weight_leaves(case.params)
  projected = jax.jit(edm2.project_mpconv_weights)(case.params)
  after = _weight_leaves(projected)
  assert after.keys() == before.keys()
  n_weights = 0
  for key, w in before.items():
    if key.endswith("['weight']"):
      n_weights += 1
      flat_w = w.reshape(w.shape[0], -1).astype(np.float64)
      rms = np.sqrt(np.mean(flat_w**2, axis=1))
      # The fixture rescaled every output channel by U(0.5, 2).
      assert np.ptp(rms) > 0.1 if w.shape[0] > 1 else abs(rms[0] - 1) > 0.1, key
      new_rms = np.sqrt(np.mean(after[key].reshape(w.shape[0], -1).astype(np.float64)**2, axis=1))
      # normalize(w) = w / (eps + rms): unit RMS per output channel up to eps = 1e-4.
      np.testing.assert_allclose(new_rms, rms / (rms + 1e-4), rtol=1e-6)
      np.testing.assert_allclose(new_rms, 1.0, atol=1e-3)
      assert after[key].dtype == np.float32
    else:  # gains and the Fourier buffers are untouched
      np.testing.assert_array_equal(after[key], w)
  assert n_weights == 48

  base = case.call(case.params, "encoder_decoder", True)
  proj = case.call(projected, "encoder_decoder", True)
  twice = case.call(edm2.project_mpconv_weights(projected), "encoder_decoder", True)
  for a, b, c in zip(base, proj, twice):
    scale = float(np.max(np.abs(np.asarray(a))))
    # The forward normalises anyway: projecting moves outputs only through eps (~1e-4 relative
    # here, as the stored channel RMS ranges over ~[0.5, 2]); once projected, the weights are a
    # fixed point up to float32 rounding.
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=5e-4 * scale)
    np.testing.assert_allclose(np.asarray(c), np.asarray(b), rtol=0, atol=2e-6 * scale)

  mask = edm2.trainable_mask(case.params)
  assert not mask["unet"]["emb_fourier"]["freqs"] and not mask["logvar_fourier"]["phases"]
  assert mask["unet"]["out_gain"] and mask["unet"]["enc_16x16_conv"]["weight"]


# ---------------------------------------------------------------------------------------------
# A small random net: init shapes, gradients, dropout, resampling.
# ---------------------------------------------------------------------------------------------

TINY = dict(img_resolution=8, img_channels=3, label_dim=0, force_normalization=True, use_gan=True,
            use_fp16=False, logvar_channels=16, model_channels=8, channel_mult=[1], num_blocks=1,
            attn_resolutions=[8], channels_per_head=8, dropout=0.5)


def _tiny(**overrides):
  """A one-level net with random params (numpy, through the converter; avoids slow RNG compiles)."""
  den = build_edm2_denoiser("EDM_2_Precond_EncoderDecoder", {**TINY, **overrides})
  rs = np.random.RandomState(0)
  sd = {}
  for name, shape in edm2_params.expected_shapes(den).items():
    if name.endswith("gain"):
      sd[name] = np.float32(rs.uniform(0.5, 1.0))
    elif name.endswith("phases"):
      sd[name] = (2 * np.pi * rs.uniform(size=shape)).astype(np.float32)
    else:
      sd[name] = rs.normal(size=shape).astype(np.float32)
  return den, edm2_params.torch_state_dict_to_flax(sd, den)


def test_init_shapes_follow_the_official_names():
  den, params = _tiny()
  shapes = edm2_params.expected_shapes(den)  # jax.eval_shape of NetworkDenoiser.init
  assert len(shapes) == 39
  for name, shape in {"unet.out_gain": (), "unet.emb_fourier.freqs": (8,),
                      "unet.emb_noise.weight": (8, 8), "unet.enc.8x8_conv.weight": (8, 4, 3, 3),
                      "unet.enc.8x8_block0.attn_qkv.weight": (24, 8, 1, 1),
                      "unet.dec.8x8_in0.attn_proj.weight": (8, 8, 1, 1),
                      "unet.dec.8x8_block0.conv_skip.weight": (8, 16, 1, 1),
                      "unet.dec.8x8_block1.conv_res0.weight": (8, 16, 3, 3),
                      "unet.out_conv.weight": (3, 8, 3, 3), "logvar_fourier.phases": (16,),
                      "logvar_linear.weight": (1, 16)}.items():
    assert shapes[name] == shape, name
  assert "unet.dec.8x8_in1.attn_qkv.weight" not in shapes  # in1 never has attention
  assert "unet.emb_label.weight" not in shapes  # unconditional
  assert edm2_params.flax_to_torch_state_dict(params).keys() == shapes.keys()


def test_fourier_buffers_get_no_gradient():
  den, params = _tiny(dropout=0.0)
  x = jnp.asarray(np.random.RandomState(1).normal(size=(2, 8, 8, 3)), jnp.float32)
  sigma = jnp.asarray([0.3, 2.0])

  def loss(p):
    d, logvar = den(p, x, sigma, return_logvar=True)
    return jnp.sum(d**2) + jnp.sum(logvar**2)

  grads = jax.jit(jax.grad(loss))(params)
  for fourier in (grads["unet"]["emb_fourier"], grads["logvar_fourier"]):
    np.testing.assert_array_equal(fourier["freqs"], 0.0)
    np.testing.assert_array_equal(fourier["phases"], 0.0)
  assert np.all(np.abs(np.asarray(grads["unet"]["emb_noise"]["weight"])) > 0)
  assert np.all(np.abs(np.asarray(grads["logvar_linear"]["weight"])) > 0)
  assert abs(float(grads["unet"]["out_gain"])) > 0


def test_dropout_only_in_train_mode():
  den, params = _tiny()
  x = jnp.asarray(np.random.RandomState(1).normal(size=(2, 8, 8, 3)), jnp.float32)
  sigma = jnp.asarray([0.3, 2.0])
  fn = jax.jit(lambda p, train, rng: den(p, x, sigma, train=train, rng=rng), static_argnums=1)
  k1, k2 = jax.random.PRNGKey(11), jax.random.PRNGKey(12)
  eval1, eval2 = fn(params, False, k1), fn(params, False, k2)
  np.testing.assert_array_equal(np.asarray(eval1), np.asarray(eval2))
  train1, train1b, train2 = fn(params, True, k1), fn(params, True, k1), fn(params, True, k2)
  np.testing.assert_array_equal(np.asarray(train1), np.asarray(train1b))
  assert float(jnp.max(jnp.abs(train1 - train2))) > 1e-3
  assert float(jnp.max(jnp.abs(train1 - eval1))) > 1e-3

  no_drop, _ = _tiny(dropout=0.0)
  fn0 = jax.jit(lambda p, train, rng: no_drop(p, x, sigma, train=train, rng=rng),
                static_argnums=1)
  np.testing.assert_array_equal(np.asarray(fn0(params, True, k1)), np.asarray(eval1))


def test_resample_matches_pooling_and_nearest_upsampling():
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 6, 6, 5))
  down = edm2.resample(x, (1, 1), "down")
  ref_down = np.asarray(x).reshape(2, 3, 2, 3, 2, 5).mean(axis=(2, 4))
  np.testing.assert_allclose(np.asarray(down), ref_down, rtol=1e-6, atol=1e-6)
  up = edm2.resample(x, (1, 1), "up")
  ref_up = np.repeat(np.repeat(np.asarray(x), 2, axis=1), 2, axis=2)
  np.testing.assert_allclose(np.asarray(up), ref_up, rtol=1e-6, atol=1e-6)
  # A longer filter (no fixture uses one) against torch's depthwise (transposed) convolution
  # with the official filter and padding.
  f = np.array([1, 3, 3, 1], np.float32)
  f2 = np.outer(f, f) / f.sum()**2
  kernel = torch.from_numpy(np.tile(f2[None, None], (5, 1, 1, 1)))
  x_t = torch.from_numpy(_nchw(x).copy())
  ref = torch.nn.functional.conv2d(x_t, kernel, groups=5, stride=2, padding=1).numpy()
  np.testing.assert_allclose(_nchw(edm2.resample(x, f, "down")), ref, rtol=1e-5, atol=1e-6)
  ref = torch.nn.functional.conv_transpose2d(x_t, kernel * 4, groups=5, stride=2,
                                             padding=1).numpy()
  np.testing.assert_allclose(_nchw(edm2.resample(x, f, "up")), ref, rtol=1e-5, atol=1e-6)
  assert ref.shape == (2, 5, 12, 12)
  with pytest.raises(ValueError):
    edm2.resample(x, (1, 2, 1), "down")
