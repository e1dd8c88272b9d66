"""Parity of the Flax EDM networks (SongUNet DDPM++/NCSN++, DhariwalUNet ADM) with official EDM.

The golden fixtures in tests/testdata, copied from the project's shared golden fixtures
(shared/golden/README.md beside the repository), hold tiny official networks with perturbed random
weights, their torch `state_dict`, inputs and the official forward evaluated in float64. Every
case goes through the real loading path: `build_edm_denoiser(class, config)` +
`torch_state_dict_to_flax(state_dict)`, with NCHW <-> NHWC transposes at the boundary.
"""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sid_jax.weights.edm import torch_state_dict_to_flax
from sid_jax.nets import layers
from sid_jax.nets.dhariwal import DhariwalUNet
from sid_jax.models.edm import build_edm_denoiser
from sid_jax.nets.songunet import SongUNet

TESTDATA = pathlib.Path(__file__).parent / "testdata"
CASES = [
    "edm_songunet_ddpmpp",
    "edm_songunet_ncsnpp",
    "edm_dhariwalunet_adm",
    "vp_songunet",
    "ve_songunet",
    "sida_encoder_ddpmpp",
    "sida_encoder_adm",
]


@functools.lru_cache(maxsize=None)
def load(name):
  with np.load(TESTDATA / f"{name}.npz", allow_pickle=False) as z:
    data = {k: z[k] for k in z.files}
  return {
      "config": json.loads(str(data["config_json"])),
      "meta": json.loads(str(data["meta_json"])),
      "state_dict": {k[len("param/"):]: v for k, v in data.items() if k.startswith("param/")},
      "x": data["in/x"].transpose(0, 2, 3, 1),  # NCHW -> NHWC.
      "sigma": data["in/sigma"],
      "labels": data.get("in/class_labels"),
      "aug": data.get("in/augment_labels"),
      "out64": {k[len("out64/"):]: v for k, v in data.items() if k.startswith("out64/")},
  }


@functools.lru_cache(maxsize=None)
def converted(name):
  case = load(name)
  denoiser = build_edm_denoiser(case["meta"]["cls"], case["config"])
  return denoiser, torch_state_dict_to_flax(case["state_dict"], denoiser)


def run(denoiser, params, case, dtype=jnp.float32, output="encoder_decoder", **kwargs):
  """The denoiser on the case's inputs; returns (D, logits) as NCHW numpy arrays."""
  cast = lambda a: None if a is None else jnp.asarray(a, dtype)
  params = jax.tree.map(cast, params)
  out = denoiser(params, cast(case["x"]), case["sigma"], cast(case["labels"]),
                 aug_labels=cast(case["aug"]), output=output, **kwargs)
  out = out if isinstance(out, tuple) else (out,)
  return tuple(np.asarray(o).transpose(0, 3, 1, 2) for o in out)


def assert_close(ours, ref, rel):
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  np.testing.assert_allclose(ours, ref, rtol=rel, atol=rel * np.max(np.abs(ref)))


# ---------------------------------------------------------------------------------------------
# Golden parity.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_golden_float32(name):
  case = load(name)
  denoiser, params = converted(name)
  d, logits = run(denoiser, params, case)
  assert d.dtype == np.float32
  assert_close(d, case["out64"]["D"], 1e-5)
  if name.startswith("sida_"):
    assert set(case["out64"]) == {"D", "logits"}
    assert_close(logits, case["out64"]["logits"], 1e-5)


@pytest.mark.parametrize("name", CASES)
def test_golden_float64(name):
  """In float64 the port reproduces the official float64 forward up to summation order."""
  case = load(name)
  denoiser, params = converted(name)
  with jax.enable_x64(True):
    d, logits = run(denoiser, params, case, dtype=jnp.float64)
  assert d.dtype == np.float64
  assert_close(d, case["out64"]["D"], 1e-12)
  if name.startswith("sida_"):
    assert_close(logits, case["out64"]["logits"], 1e-12)


@pytest.mark.parametrize("name", ["sida_encoder_ddpmpp", "sida_encoder_adm"])
def test_output_modes_agree(name):
  case = load(name)
  denoiser, params = converted(name)
  d_both, logits_both = run(denoiser, params, case, output="encoder_decoder")
  (d_dec,) = run(denoiser, params, case, output="decoder")
  (logits_enc,) = run(denoiser, params, case, output="encoder")
  np.testing.assert_array_equal(d_dec, d_both)
  np.testing.assert_array_equal(logits_enc, logits_both)
  n_levels = len(case["config"]["channel_mult"])
  size = case["config"]["img_resolution"] >> (n_levels - 1)
  assert logits_enc.shape == (4, 1, size, size)
  # The encoder-only pass never touches the decoder: it runs without any decoder parameter.
  encoder_params = {k: v for k, v in params.items() if not k.startswith(("dec_", "out_"))}
  assert len(encoder_params) < len(params)
  (logits_alone,) = run(denoiser, encoder_params, case, output="encoder")
  np.testing.assert_array_equal(logits_alone, logits_both)


def test_default_call_returns_denoised_image():
  case = load("edm_songunet_ddpmpp")
  denoiser, params = converted("edm_songunet_ddpmpp")
  d = denoiser(params, case["x"], case["sigma"], case["labels"], aug_labels=case["aug"])
  assert_close(np.asarray(d).transpose(0, 3, 1, 2), case["out64"]["D"], 1e-5)


# ---------------------------------------------------------------------------------------------
# Dropout.
# ---------------------------------------------------------------------------------------------


def _ddpmpp_with(**overrides):
  case = load("edm_songunet_ddpmpp")
  denoiser = build_edm_denoiser(case["meta"]["cls"], {**case["config"], **overrides})
  return case, denoiser, torch_state_dict_to_flax(case["state_dict"], denoiser)


@pytest.mark.parametrize("model_type", ["SongUNet", "DhariwalUNet"])
def test_dropout_only_in_training(model_type):
  # A small network keeps this cheap: one resolution and three blocks, with the widths of the
  # golden networks' first level (so most operations are already compiled).
  config = dict(img_resolution=16, img_channels=3, label_dim=0, use_fp16=False,
                model_type=model_type, model_channels=16 if model_type == "SongUNet" else 32,
                channel_mult=[1], channel_mult_emb=4 if model_type == "SongUNet" else 2,
                num_blocks=0, attn_resolutions=[], label_dropout=0)
  build = lambda rate: build_edm_denoiser("EDMPrecond", dict(config, dropout=rate))
  denoiser, reference = build(0.3), build(0.0)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32)
  # Random values for every parameter (numpy, to avoid compiling a sampler per shape), so that
  # the zero-initialised layers and therefore every path count.
  shapes = jax.eval_shape(lambda k: denoiser.init(k, x), jax.random.key(1))
  params = jax.tree.map(lambda s: jnp.asarray(0.2 * rng.normal(size=s.shape), jnp.float32), shapes)
  sigma = jnp.asarray([0.02, 0.3, 3.0, 30.0])
  key1, key2 = jax.random.split(jax.random.key(3))
  d = lambda train, rng=None: np.asarray(denoiser(params, x, sigma, train=train, rng=rng))
  d_ref = np.asarray(reference(params, x, sigma))
  np.testing.assert_array_equal(d(False), d_ref)  # Inactive in evaluation...
  np.testing.assert_array_equal(d(False, key1), d_ref)  # ...whatever the key.
  np.testing.assert_array_equal(d(True, key1), d(True, key1))  # Deterministic given the key.
  assert np.max(np.abs(d(True, key1) - d_ref)) > 1e-2  # Active in training.
  assert np.max(np.abs(d(True, key1) - d(True, key2))) > 1e-2
  d_ref_train = np.asarray(reference(params, x, sigma, train=True, rng=key1))
  np.testing.assert_array_equal(d_ref_train, d_ref)  # Rate 0: nothing to drop.


def test_label_dropout_only_in_training():
  case, denoiser, params = _ddpmpp_with(label_dropout=1.0)
  (d_eval,) = run(denoiser, params, case, output="decoder", train=False)
  (d_train,) = run(denoiser, params, case, output="decoder", train=True, rng=jax.random.key(1))
  (d_no_labels,) = run(denoiser, params, dict(case, labels=np.zeros_like(case["labels"])),
                       output="decoder", train=False)
  assert_close(d_eval, case["out64"]["D"], 1e-5)
  np.testing.assert_allclose(d_train, d_no_labels, rtol=0, atol=1e-6)  # All labels dropped.
  assert np.max(np.abs(d_eval - d_no_labels)) > 1e-2


# ---------------------------------------------------------------------------------------------
# Converter strictness.
# ---------------------------------------------------------------------------------------------


def _convert_modified(change):
  case = load("edm_songunet_ddpmpp")
  denoiser, _ = converted("edm_songunet_ddpmpp")
  state = dict(case["state_dict"])
  change(state)
  return torch_state_dict_to_flax(state, denoiser)


def test_converter_layouts():
  case = load("edm_songunet_ddpmpp")
  _, params = converted("edm_songunet_ddpmpp")
  sd = case["state_dict"]
  np.testing.assert_array_equal(params["enc_16x16_conv"]["kernel"],
                                sd["model.enc.16x16_conv.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["map_layer0"]["kernel"], sd["model.map_layer0.weight"].T)
  np.testing.assert_array_equal(params["dec_8x8_block1"]["norm2"]["scale"],
                                sd["model.dec.8x8_block1.norm2.weight"])
  np.testing.assert_array_equal(params["dec_16x16_aux_conv"]["bias"],
                                sd["model.dec.16x16_aux_conv.bias"])
  n_buffers = sum(k.endswith("resample_filter") for k in sd)
  assert n_buffers == 8
  assert len(jax.tree.leaves(params)) == len(sd) - n_buffers


def test_converter_rejects_missing_key():
  with pytest.raises(ValueError, match=r"1 missing:\n  model\.enc\.16x16_block0\.conv0\.weight"):
    _convert_modified(lambda s: s.pop("model.enc.16x16_block0.conv0.weight"))


def test_converter_rejects_unexpected_keys():
  def change(s):
    s["model.enc.16x16_block0.conv2.weight"] = np.zeros((16, 16, 3, 3), np.float32)
    s["map_layer0.weight"] = s["model.map_layer0.weight"]  # No `model.` prefix.
    s["model.enc_16x16_conv.weight"] = s["model.enc.16x16_conv.weight"]  # Flax-style name.

  with pytest.raises(ValueError, match="3 unexpected") as info:
    _convert_modified(change)
  for key in ("model.enc.16x16_block0.conv2.weight", "map_layer0.weight",
              "model.enc_16x16_conv.weight"):
    assert key in str(info.value)


def test_converter_rejects_misshaped_key():
  with pytest.raises(ValueError, match=r"mis-shaped:\n  model\.map_layer0\.weight: shape "
                     r"\(64, 17\), expected \(64, 16\)"):
    _convert_modified(
        lambda s: s.update({"model.map_layer0.weight": np.zeros((64, 17), np.float32)}))


def test_converter_reports_every_problem_at_once():
  def change(s):
    s.pop("model.dec.4x4_in1.affine.bias")
    s["model.dec.4x4_in1.extra.bias"] = np.zeros((32,), np.float32)
    s["model.dec.8x8_block1.qkv.weight"] = np.zeros((96, 32, 3, 3), np.float32)

  with pytest.raises(ValueError) as info:
    _convert_modified(change)
  msg = str(info.value)
  assert "1 missing" in msg and "model.dec.4x4_in1.affine.bias" in msg
  assert "1 unexpected" in msg and "model.dec.4x4_in1.extra.bias" in msg
  assert "1 mis-shaped" in msg and "model.dec.8x8_block1.qkv.weight" in msg


def test_converter_checks_resample_buffers():
  name = "model.enc.8x8_down.conv0.resample_filter"
  with pytest.raises(ValueError, match=r"wrong buffers:\n  model\.enc\.8x8_down\.conv0"):
    _convert_modified(lambda s: s.update({name: 2 * s[name]}))
  with pytest.raises(ValueError, match=r"model\.enc\.8x8_down\.conv0\.resample_filter: shape"):
    _convert_modified(lambda s: s.update({name: np.full((1, 1, 4, 4), 1 / 16, np.float32)}))
  with pytest.raises(ValueError, match=r"missing:\n  model\.dec\.8x8_up\.skip\.resample_filter"):
    _convert_modified(lambda s: s.pop("model.dec.8x8_up.skip.resample_filter"))


def test_ncsnpp_fourier_frequencies_are_loaded_and_frozen():
  case = load("edm_songunet_ncsnpp")
  denoiser, params = converted("edm_songunet_ncsnpp")
  np.testing.assert_array_equal(params["map_noise"]["freqs"],
                                case["state_dict"]["model.map_noise.freqs"])
  # Two `resample_filter` buffers per resampling block, one per fused aux_residual conv.
  assert sum(k.endswith("resample_filter") for k in case["state_dict"]) == 10
  # The buffer semantics: `freqs` gets a zero gradient, so an optimiser never moves it.
  embed = layers.FourierEmbedding(32)  # noise_channels = 16 * channel_mult_noise 2.
  freqs = {"freqs": params["map_noise"]["freqs"]}
  noise = jnp.asarray([0.3, -1.2])
  loss = lambda p, t: jnp.sum(jnp.sin(3 * embed.apply({"params": p}, t)))
  assert not np.any(np.asarray(jax.grad(loss)(freqs, noise)["freqs"]))
  assert np.all(np.asarray(jax.grad(loss, argnums=1)(freqs, noise)) != 0)


# ---------------------------------------------------------------------------------------------
# Registry.
# ---------------------------------------------------------------------------------------------


def test_registry_builds_the_right_networks():
  cases = {name: converted(name)[0] for name in ("edm_songunet_ncsnpp", "sida_encoder_adm")}
  song = cases["edm_songunet_ncsnpp"].module
  assert isinstance(song, SongUNet)
  assert song.embedding_type == "fourier" and song.encoder_type == "residual"
  assert song.channel_mult_noise == 2
  assert song.resample_filter == (1, 3, 3, 1)
  adm = cases["sida_encoder_adm"]
  assert isinstance(adm.module, DhariwalUNet) and adm.label_dim == 10
  assert build_edm_denoiser("VPPrecond", load("vp_songunet")["config"]).precond.num_steps == 1000


@pytest.mark.parametrize("class_name, changes, pattern", [
    ("iDDPMPrecond", {}, "iDDPMPrecond"),
    ("EDMPrecond", {"bogus_option": 1}, "bogus_option"),
    ("EDMPrecond", {"in_channels": 3}, "in_channels"),
    ("EDMPrecond", {"model_type": "EDM2UNet"}, "EDM2UNet"),
    ("EDMPrecond", {"model_type": "SongUNet_EncoderDecoder"}, "SongUNet_EncoderDecoder"),
    ("EDMPrecond_EncoderDecoder", {"model_type": "SongUNet"}, "SongUNet"),
    ("EDMPrecond", {"beta_d": 19.9}, "beta_d"),
    ("VEPrecond", {}, "sigma_data"),  # The EDM config carries sigma_data.
    ("EDMPrecond", {"embedding_type": "learned"}, "learned"),
    ("EDMPrecond", {"img_resolution": None}, "img_resolution"),
])
def test_registry_rejects_unknown_names(class_name, changes, pattern):
  config = dict(load("edm_songunet_ddpmpp")["config"])
  config.update(changes)
  config = {k: v for k, v in config.items() if v is not None}
  with pytest.raises(ValueError, match=pattern):
    build_edm_denoiser(class_name, config)


# ---------------------------------------------------------------------------------------------
# Layers not fully exercised by the fixtures.
# ---------------------------------------------------------------------------------------------


def test_group_norm_group_rule_and_values():
  assert [layers.num_groups_for(c) for c in (16, 48, 128, 256, 512)] == [4, 12, 32, 32, 32]
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 5, 256)).astype(np.float32) * 3 + 1
  scale = rng.normal(size=(256,)).astype(np.float32)
  bias = rng.normal(size=(256,)).astype(np.float32)
  ours = layers.GroupNorm(eps=1e-6).apply({"params": {"scale": scale, "bias": bias}}, x)
  ref = torch.nn.functional.group_norm(torch.from_numpy(x.transpose(0, 3, 1, 2)), 32,
                                       torch.from_numpy(scale), torch.from_numpy(bias), eps=1e-6)
  np.testing.assert_allclose(np.asarray(ours), ref.numpy().transpose(0, 2, 3, 1), rtol=1e-5,
                             atol=1e-5)


def test_multi_head_attention_channel_layout():
  """The (head, C/head, 3) interleaving with 2 heads, against an NCHW numpy reference."""
  rng = np.random.default_rng(1)
  n, c, heads, h, w = 2, 8, 2, 3, 4
  qkv = rng.normal(size=(n, 3 * c, h, w))
  t = qkv.reshape(n * heads, c // heads, 3, h * w)
  q, k, v = t[:, :, 0], t[:, :, 1], t[:, :, 2]
  logits = np.einsum("ncq,nck->nqk", q, k / np.sqrt(c // heads))
  weights = np.exp(logits - logits.max(axis=2, keepdims=True))
  weights /= weights.sum(axis=2, keepdims=True)
  ref = np.einsum("nqk,nck->ncq", weights, v).reshape(n, c, h, w)
  ours = layers.attention(jnp.asarray(qkv.transpose(0, 2, 3, 1), jnp.float32), heads)
  np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("taps", [(1, 1), (1, 3, 3, 1)])
@pytest.mark.parametrize("mode, fused", [("up", False), ("up", True), ("down", False),
                                         ("down", True)])
def test_resampling_conv_matches_torch(taps, mode, fused):
  """Conv2d resampling (incl. fused up, which no EDM network uses) against torch's ops."""
  rng = np.random.default_rng(2)
  cin, cout, k = 4, 5, 3
  x = rng.normal(size=(2, cin, 8, 8)).astype(np.float32)
  w = rng.normal(size=(cout, cin, k, k)).astype(np.float32)
  b = rng.normal(size=(cout,)).astype(np.float32)
  f1 = torch.tensor(taps, dtype=torch.float32)
  f = (torch.outer(f1, f1) / f1.sum() ** 2)[None, None]
  fp = (f.shape[-1] - 1) // 2
  xt, wt = torch.from_numpy(x), torch.from_numpy(w)
  F = torch.nn.functional
  if mode == "up" and fused:
    y = F.conv_transpose2d(xt, (4 * f).tile(cin, 1, 1, 1), groups=cin, stride=2,
                           padding=max(fp - 1, 0))
    y = F.conv2d(y, wt, padding=max(1 - fp, 0))
  elif mode == "up":
    y = F.conv_transpose2d(xt, (4 * f).tile(cin, 1, 1, 1), groups=cin, stride=2, padding=fp)
    y = F.conv2d(y, wt, padding=1)
  elif fused:
    y = F.conv2d(F.conv2d(xt, wt, padding=1 + fp), f.tile(cout, 1, 1, 1), groups=cout, stride=2)
  else:
    y = F.conv2d(F.conv2d(xt, f.tile(cin, 1, 1, 1), groups=cin, stride=2, padding=fp), wt,
                 padding=1)
  y = y + torch.from_numpy(b)[None, :, None, None]
  conv = layers.Conv2d(cout, k, up=mode == "up", down=mode == "down", resample_filter=taps,
                       fused_resample=fused)
  ours = conv.apply({"params": {"kernel": w.transpose(2, 3, 1, 0), "bias": b}},
                    x.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), y.numpy(), rtol=1e-5,
                             atol=1e-5)


def test_fresh_init_matches_converter_tree():
  """`NetworkDenoiser.init` creates exactly the tree the converter fills (incl. map_augment)."""
  for name in ("edm_songunet_ddpmpp", "edm_dhariwalunet_adm"):
    case = load(name)
    denoiser, params = converted(name)
    x = jnp.zeros((1,) + case["x"].shape[1:], jnp.float32)
    labels = jnp.zeros((1, 10), jnp.float32)
    shapes = jax.eval_shape(lambda k: denoiser.init(k, x, labels), jax.random.key(0))
    assert jax.tree.structure(shapes) == jax.tree.structure(params)
    assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(lambda a: a.shape, params)
