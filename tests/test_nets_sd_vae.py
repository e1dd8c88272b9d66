"""Stable Diffusion VAE port (`sid_jax.nets.sd_vae`) against diffusers' PyTorch `AutoencoderKL`.

Tiny random diffusers VAEs (every parameter redrawn so that nothing is at its trivial init) are
saved with `save_pretrained` and read back the way users do: `config.json` through
`vae_from_config`, the safetensors weights through `safetensors.numpy` and `vae_params`. Both
sides then run in float32 on the same inputs (NCHW for torch, NHWC for us).
"""

from __future__ import annotations

import copy
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL

from sid_jax.weights import sd_vae as sd_vae_params
from sid_jax.nets import sd_vae

ATOL = 1e-4
TINY = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
            layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=16)
# Every optional part switched the other way, three resolutions, two ResNets per down block.
VARIANT = dict(TINY, down_block_types=("DownEncoderBlock2D",) * 3,
               up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 32, 64),
               layers_per_block=2, mid_block_add_attention=False, use_quant_conv=False,
               use_post_quant_conv=False, force_upcast=False, scaling_factor=0.13025)


def _nhwc(t: torch.Tensor) -> np.ndarray:
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _nchw(a: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def _max_err(ours, ref: np.ndarray) -> float:
  assert np.shape(ours) == ref.shape
  return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)))


def _random_torch_vae(seed: int, **kwargs) -> TorchAutoencoderKL:
  """A diffusers VAE whose parameters are all redrawn, seeded by `seed`.

  Weights ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2): activations stay
  O(1) and every parameter matters.
  """
  torch.manual_seed(seed)
  vae = TorchAutoencoderKL(**kwargs).eval()
  with torch.no_grad():
    for name, p in vae.named_parameters():
      noise = torch.randn_like(p)
      if p.ndim > 1:
        p.copy_(noise / np.sqrt(p[0].numel()))
      elif name.endswith(".weight"):
        p.copy_(1.0 + 0.1 * noise)
      else:
        p.copy_(0.1 * noise)
  return vae


class Ported:
  """A torch VAE, saved and re-imported through the user path, with jitted JAX methods."""

  def __init__(self, torch_vae: TorchAutoencoderKL, directory):
    torch_vae.save_pretrained(directory)
    self.torch = torch_vae
    self.config = json.loads((directory / "config.json").read_text())
    self.state_dict = safetensors.numpy.load_file(
        str(directory / "diffusion_pytorch_model.safetensors"))
    self.module = sd_vae.vae_from_config(self.config)
    self.variables = sd_vae_params.vae_params(self.state_dict, self.module)
    self.encode = self.jit("encode")
    self.decode = self.jit("decode")

  def jit(self, method: str, **overrides):
    """`method` of the module (with fields `overrides`) as a jitted `f(variables, x)`."""
    module = self.module.clone(**overrides) if overrides else self.module
    return jax.jit(lambda variables, x: module.apply(variables, x, method=method))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Ported:
  return Ported(_random_torch_vae(0, **TINY), tmp_path_factory.mktemp("tiny_vae"))


@pytest.fixture(scope="module")
def inputs() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(1)
  return {"x": rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32),
          "z": rng.standard_normal((2, 8, 8, 4)).astype(np.float32)}


# ---------------------------------------------------------------------------------------------
# Config and names.
# ---------------------------------------------------------------------------------------------


def test_config_is_read(tiny):
  m = tiny.module
  assert tiny.config["_class_name"] == "AutoencoderKL"
  assert (m.in_channels, m.out_channels, m.latent_channels) == (3, 3, 4)
  assert m.block_out_channels == (32, 64) and m.layers_per_block == 1
  assert (m.norm_num_groups, m.act_fn, m.scaling_factor) == (32, "silu", 0.18215)
  assert m.use_quant_conv and m.use_post_quant_conv and m.mid_block_add_attention
  assert m.force_upcast and m.dtype == jnp.float32
  assert m.precision == jax.lax.Precision.HIGHEST
  assert m.downsampling_factor == 2


def test_flax_paths_name_the_torch_tensors(tiny):
  p = tiny.variables["params"]
  np.testing.assert_array_equal(
      p["decoder"]["up_blocks_0"]["resnets_1"]["conv1"]["kernel"],
      tiny.state_dict["decoder.up_blocks.0.resnets.1.conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      p["encoder"]["mid_block"]["attentions_0"]["to_out_0"]["kernel"],
      tiny.state_dict["encoder.mid_block.attentions.0.to_out.0.weight"].T)
  np.testing.assert_array_equal(
      p["encoder"]["down_blocks_0"]["downsamplers_0"]["conv"]["bias"],
      tiny.state_dict["encoder.down_blocks.0.downsamplers.0.conv.bias"])
  np.testing.assert_array_equal(p["decoder"]["conv_norm_out"]["scale"],
                                tiny.state_dict["decoder.conv_norm_out.weight"])
  leaves = jax.tree_util.tree_leaves(tiny.variables)
  assert len(leaves) == len(tiny.state_dict)
  assert all(leaf.dtype == np.float32 for leaf in leaves)


# ---------------------------------------------------------------------------------------------
# Parity with diffusers.
# ---------------------------------------------------------------------------------------------


def test_encode_matches_diffusers(tiny, inputs):
  with torch.no_grad():
    posterior = tiny.torch.encode(_nchw(inputs["x"])).latent_dist
  ref_mean, ref_logvar = _nhwc(posterior.mean), _nhwc(posterior.logvar)
  assert ref_mean.shape == (2, 8, 8, 4) and ref_mean.std() > 0.3 and ref_logvar.std() > 0.3
  mean, logvar = tiny.encode(tiny.variables, inputs["x"])
  assert mean.dtype == logvar.dtype == jnp.float32
  assert _max_err(mean, ref_mean) <= ATOL
  assert _max_err(logvar, ref_logvar) <= ATOL


def test_decode_matches_diffusers(tiny, inputs):
  with torch.no_grad():
    ref = _nhwc(tiny.torch.decode(_nchw(inputs["z"])).sample)
  assert ref.shape == (2, 16, 16, 3) and ref.std() > 0.3
  assert _max_err(tiny.decode(tiny.variables, inputs["z"]), ref) <= ATOL


def test_call_and_decode_scaled_match_diffusers(tiny, inputs):
  latents = inputs["z"] * tiny.module.scaling_factor
  with torch.no_grad():
    ref_call = _nhwc(tiny.torch(_nchw(inputs["x"]), sample_posterior=False).sample)
    ref_scaled = _nhwc(tiny.torch.decode(_nchw(latents) / tiny.config["scaling_factor"]).sample)
  assert _max_err(tiny.jit("__call__")(tiny.variables, inputs["x"]), ref_call) <= ATOL
  assert _max_err(tiny.jit("decode_scaled")(tiny.variables, latents), ref_scaled) <= ATOL


def test_logvar_is_clamped_like_diffusers(tiny, inputs):
  """Push two log-variance channels far out of [-30, 20] through `quant_conv`'s bias."""
  shift = np.array([0, 0, 0, 0, 100, -100, 0, 0], np.float32)
  torch_vae = copy.deepcopy(tiny.torch)
  with torch.no_grad():
    torch_vae.quant_conv.bias += torch.from_numpy(shift)
    posterior = torch_vae.encode(_nchw(inputs["x"])).latent_dist
  variables = jax.tree_util.tree_map(np.array, tiny.variables)
  variables["params"]["quant_conv"]["bias"] += shift
  mean, logvar = tiny.encode(variables, inputs["x"])
  np.testing.assert_array_equal(logvar[..., 0], 20.0)
  np.testing.assert_array_equal(logvar[..., 1], -30.0)
  assert _max_err(logvar, _nhwc(posterior.logvar)) <= ATOL
  assert _max_err(mean, _nhwc(posterior.mean)) <= ATOL


def test_variant_without_attention_or_quant_convs(tmp_path_factory, inputs):
  """mid_block_add_attention / use_quant_conv / use_post_quant_conv False, 3 blocks, torch input."""
  ported = Ported(_random_torch_vae(2, **VARIANT), tmp_path_factory.mktemp("variant_vae"))
  m = ported.module
  assert not (m.mid_block_add_attention or m.use_quant_conv or m.use_post_quant_conv)
  assert (m.block_out_channels, m.layers_per_block, m.downsampling_factor) == ((32, 32, 64), 2, 4)
  params = ported.variables["params"]
  assert "quant_conv" not in params and "post_quant_conv" not in params
  assert "attentions_0" not in params["encoder"]["mid_block"]
  # The torch module's own state dict (torch tensors) converts to the same params.
  from_torch = sd_vae_params.vae_params(ported.torch.state_dict(), m)
  jax.tree_util.tree_map(np.testing.assert_array_equal, from_torch, ported.variables)
  with torch.no_grad():
    ref = _nhwc(ported.torch(_nchw(inputs["x"]), sample_posterior=False).sample)
  assert ref.std() > 0.3
  assert _max_err(ported.jit("__call__")(ported.variables, inputs["x"]), ref) <= ATOL


# ---------------------------------------------------------------------------------------------
# Compute dtypes.
# ---------------------------------------------------------------------------------------------


def test_bfloat16_compute_stays_close_to_float32(tiny, inputs):
  ours = tiny.jit("decode", dtype=jnp.bfloat16)(tiny.variables, inputs["z"])
  assert ours.dtype == jnp.bfloat16
  ref = np.asarray(tiny.decode(tiny.variables, inputs["z"]))
  # bfloat16 keeps 8 significant bits (relative step 2^-8 ~ 0.4%) through ~20 layers.
  assert _max_err(ours, ref) <= 0.05 * np.max(np.abs(ref))
  init = jax.eval_shape(tiny.module.clone(dtype=jnp.bfloat16).init, jax.random.key(0),
                        inputs["x"])
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(init)} == {jnp.dtype(jnp.float32)}


def test_force_upcast_keeps_float16_requests_in_float32(tiny, inputs):
  upcast = tiny.module.clone(dtype=jnp.float16)
  assert upcast.compute_dtype == jnp.float32
  out = jax.eval_shape(lambda v, z: upcast.apply(v, z, method="decode"), tiny.variables,
                       inputs["z"])
  assert out.dtype == jnp.float32
  no_upcast = tiny.module.clone(dtype=jnp.float16, force_upcast=False)
  out = jax.eval_shape(lambda v, z: no_upcast.apply(v, z, method="decode"), tiny.variables,
                       inputs["z"])
  assert out.dtype == jnp.float16
  assert tiny.module.clone(dtype=jnp.bfloat16).compute_dtype == jnp.bfloat16


# ---------------------------------------------------------------------------------------------
# uint8 conversion.
# ---------------------------------------------------------------------------------------------


def test_to_uint8_follows_sid_lsg_rule():
  edges = {-1.0: 0, 1.0: 255, 0.0: 128, -0.0039: 127, 0.0039: 128, -1.5: 0, 1.5: 255,
           -0.004: 127, 0.996: 254, 0.997: 255, -0.9961: 0, -0.9960: 1}
  values = np.array(list(edges), np.float32)
  got = np.asarray(sd_vae.to_uint8(jnp.asarray(values)))
  assert got.dtype == np.uint8
  np.testing.assert_array_equal(got, np.array(list(edges.values()), np.uint8))
  # The rule itself, as torch evaluates it, on the edges and a dense random sweep.
  sweep = np.concatenate([values, np.random.default_rng(3).uniform(-1.2, 1.2, 10_000)])
  sweep = sweep.astype(np.float32)
  ref = (torch.from_numpy(sweep) * 127.5 + 128).clip(0, 255).to(torch.uint8).numpy()
  np.testing.assert_array_equal(np.asarray(sd_vae.to_uint8(sweep)), ref)


# ---------------------------------------------------------------------------------------------
# Legacy names and strictness.
# ---------------------------------------------------------------------------------------------

_CURRENT_TO_LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _legacy_state_dict(state_dict):
  """Old-diffusers attention names: encoder's as 1x1 convolutions, decoder's as linears."""
  legacy = {}
  for name, value in state_dict.items():
    match = re.fullmatch(r"(.*\.attentions\.0)\.(to_q|to_k|to_v|to_out\.0)\.(weight|bias)", name)
    if match:
      block, layer, leaf = match.groups()
      if leaf == "weight" and block.startswith("encoder."):
        value = value[:, :, None, None]
      name = f"{block}.{_CURRENT_TO_LEGACY[layer]}.{leaf}"
    legacy[name] = value
  return legacy


def test_legacy_attention_names_convert_to_the_same_params(tiny):
  legacy = _legacy_state_dict(tiny.state_dict)
  assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
  assert legacy["encoder.mid_block.attentions.0.query.weight"].shape == (64, 64, 1, 1)
  assert not any(".to_q." in name or ".to_out." in name for name in legacy)
  converted = sd_vae_params.vae_params(legacy, tiny.module)
  assert (jax.tree_util.tree_structure(converted)
          == jax.tree_util.tree_structure(tiny.variables))
  jax.tree_util.tree_map(np.testing.assert_array_equal, converted, tiny.variables)


def test_legacy_and_current_name_together_raise(tiny):
  both = dict(tiny.state_dict)
  both["decoder.mid_block.attentions.0.key.bias"] = both["decoder.mid_block.attentions.0.to_k.bias"]
  with pytest.raises(ValueError, match=re.escape("decoder.mid_block.attentions.0.to_k.bias")):
    sd_vae_params.vae_params(both, tiny.module)


@pytest.mark.parametrize("change, named", [
    ("drop", "decoder.up_blocks.1.resnets.0.conv_shortcut.bias"),
    ("drop", "encoder.mid_block.attentions.0.group_norm.weight"),
    ("add", "encoder.mid_block.attentions.1.to_q.weight"),
    ("add", "decoder.up_blocks.0.upsamplers.0.conv.weight_orig"),
    ("reshape", "encoder.conv_in.weight"),
    ("reshape", "decoder.mid_block.attentions.0.to_v.weight"),
])
def test_mismatched_weights_raise_naming_the_key(tiny, change, named):
  state_dict = dict(tiny.state_dict)
  if change == "drop":
    del state_dict[named]
    label = "1 missing"
  elif change == "add":
    state_dict[named] = np.zeros((64, 64), np.float32)
    label = "1 unexpected"
  else:
    shape = state_dict[named].shape
    state_dict[named] = np.zeros(shape[:1] + (shape[1] + 1,) + shape[2:], np.float32)
    label = "1 mis-shaped"
  with pytest.raises(ValueError, match=re.escape(named)) as error:
    sd_vae_params.vae_params(state_dict, tiny.module)
  assert label in str(error.value)


def test_weights_for_another_config_raise(tiny):
  other = sd_vae.vae_from_config(dict(tiny.config, layers_per_block=2))
  with pytest.raises(ValueError, match=re.escape("encoder.down_blocks.0.resnets.1.conv1.weight")):
    sd_vae_params.vae_params(tiny.state_dict, other)


@pytest.mark.parametrize("key, value", [
    ("latents_mean", [0.1, 0.2, 0.3, 0.4]),
    ("latents_std", [1.0, 1.0, 1.0, 1.0]),
    ("shift_factor", 0.1159),
    ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
    ("up_block_types", ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]),
    ("down_block_types", ["DownEncoderBlock2D"]),
    ("act_fn", "gelu"),
    ("norm_type", "spatial"),
])
def test_unsupported_config_raises_naming_key_and_value(tiny, key, value):
  with pytest.raises(ValueError) as error:
    sd_vae.vae_from_config(dict(tiny.config, **{key: value}))
  message = str(error.value)
  assert key in message
  bad = value[-1] if isinstance(value, list) and key.endswith("block_types") else value
  assert repr(bad) in message or str(bad) in message


def test_ignored_config_keys_and_overrides(tiny):
  config = dict(tiny.config, _name_or_path="somewhere", _use_default_values=["x"],
                sample_size=512)
  module = sd_vae.vae_from_config(config, dtype=jnp.bfloat16, precision=None)
  assert module == tiny.module.clone(dtype=jnp.bfloat16, precision=None)
