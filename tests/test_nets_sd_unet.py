"""Stable Diffusion U-Net port (sid_jax.nets.sd_unet) against diffusers' PyTorch model.

Two tiny random diffusers `UNet2DConditionModel`s, an SD 1.x-like one (1x1-conv projections, one
head count for all blocks) and an SD 2.x-like one (linear projections, per-block head counts,
two transformer layers in the middle, two layers per block, odd spatial size so the decoder
upsamples to explicit sizes), go through the path users run: `save_pretrained` ->
`config.json` -> `unet_from_config`, `diffusion_pytorch_model.safetensors` ->
`safetensors.numpy.load_file` -> `unet_params`. Every parameter is re-randomised first (the output
convolution is zero-initialised in diffusers) so that every weight matters.
"""

from __future__ import annotations

import json
import pathlib
import types

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from diffusers.models.embeddings import get_timestep_embedding
from safetensors.numpy import load_file

from sid_jax.weights.sd_unet import expected_unet_shapes, torch_name, unet_params
from sid_jax.nets import sd_unet

PARITY_ATOL = 1e-4

TINY_CONFIGS = {
    "sd15_like": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                      block_out_channels=(32, 64),
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                      cross_attention_dim=32, attention_head_dim=4, norm_num_groups=32),
    "sd21_like": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
                      block_out_channels=(32, 64),
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                      cross_attention_dim=24, attention_head_dim=(2, 4),
                      transformer_layers_per_block=(1, 2), use_linear_projection=True,
                      upcast_attention=False, norm_num_groups=32),
}
# (batch, height, width, text length) of the test inputs.
INPUT_SHAPES = {"sd15_like": (3, 8, 8, 77), "sd21_like": (2, 7, 6, 13)}
TIMESTEPS = {"sd15_like": [20, 625, 979], "sd21_like": [999, 1]}


def _randomize(model: torch.nn.Module, seed: int) -> None:
  """Redraws every parameter.

  Weights ~ N(0, 1/fan_in) (activations stay O(1), attention softmaxes are not flat), norm
  scales ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2).
  """
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim >= 2:
        p.copy_(noise / np.sqrt(p[0].numel()))
      elif p.ndim == 1 and _is_norm_weight(model, p):
        p.copy_(1 + 0.1 * noise)
      else:
        p.copy_(0.1 * noise)


def _is_norm_weight(model: torch.nn.Module, param: torch.Tensor) -> bool:
  return any(m.weight is param for m in model.modules()
             if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)))


def _nhwc(a: np.ndarray) -> np.ndarray:
  return np.transpose(a, (0, 2, 3, 1))


def _build_case(name: str, directory: pathlib.Path) -> types.SimpleNamespace:
  torch.manual_seed(0)
  model = TorchUNet(**TINY_CONFIGS[name]).eval()
  _randomize(model, seed=1)
  model.save_pretrained(directory)

  config = json.loads((directory / "config.json").read_text())
  module = sd_unet.unet_from_config(config)
  state_dict = load_file(str(directory / "diffusion_pytorch_model.safetensors"))
  params = unet_params(state_dict, module)

  batch, height, width, length = INPUT_SHAPES[name]
  rng = np.random.default_rng(2)
  sample = rng.standard_normal((batch, 4, height, width)).astype(np.float32)
  timesteps = np.asarray(TIMESTEPS[name], np.int64)
  context = rng.standard_normal((batch, length, config["cross_attention_dim"])).astype(np.float32)
  with torch.no_grad():
    ref = model(torch.from_numpy(sample), torch.from_numpy(timesteps),
                torch.from_numpy(context)).sample.numpy()
  return types.SimpleNamespace(name=name, config=config, module=module, state_dict=state_dict,
                               params=params, sample=jnp.asarray(_nhwc(sample)),
                               timesteps=jnp.asarray(timesteps), context=jnp.asarray(context),
                               ref=_nhwc(ref), out=None)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
  """Builds (once per module) and returns the case of a tiny config name."""
  built = {}

  def get(name: str) -> types.SimpleNamespace:
    if name not in built:
      torch.set_num_threads(1)
      built[name] = _build_case(name, tmp_path_factory.mktemp(name))
    return built[name]

  return get


@pytest.fixture(params=sorted(TINY_CONFIGS))
def case(request, cases):
  return cases(request.param)


@pytest.fixture
def sd15_case(cases):
  return cases("sd15_like")


@pytest.fixture(scope="module")
def tiny():
  """A one-resolution module (mid-block transformer only) with random params, no torch.

  Eight GroupNorm groups of four channels: with diffusers' default of 32 groups on 32 channels each
  group is one channel, and the norm after the ResNets' per-channel time-embedding add removes it,
  so the output would not depend on the timestep at all.
  """
  module = sd_unet.UNet2DConditionModel(block_out_channels=(32,), down_block_types=("DownBlock2D",),
                                        up_block_types=("UpBlock2D",), layers_per_block=1,
                                        cross_attention_dim=8, attention_head_dim=2,
                                        norm_num_groups=8)
  sample = jax.random.normal(jax.random.key(0), (2, 4, 4, 4))
  context = jax.random.normal(jax.random.key(1), (2, 3, 8))
  rng = np.random.default_rng(2)  # random params without compiling `init`
  params = flax.traverse_util.unflatten_dict({
      path: 0.2 * rng.standard_normal(leaf.shape).astype(np.float32)
      for path, leaf in expected_unet_shapes(module).items()})
  return module, params, sample, context


def _apply(module, params, sample, timesteps, context):
  return jax.jit(module.apply)({"params": params}, sample, timesteps, context)


def _ours(case: types.SimpleNamespace) -> np.ndarray:
  """The port's float32 output on the case's inputs (computed once)."""
  if case.out is None:
    case.out = np.asarray(_apply(case.module, case.params, case.sample, case.timesteps,
                                 case.context))
  return case.out


def test_parity_with_diffusers(case):
  out = _ours(case)
  assert out.shape == case.ref.shape
  assert out.dtype == np.float32
  err = np.max(np.abs(out - case.ref))
  scale = np.max(np.abs(case.ref))
  print(f"{case.name}: max |out| {scale:.3g}, max abs error {err:.3g}")
  assert scale > 0.5  # a non-trivial output, not a zero-initialised head
  assert err <= PARITY_ATOL, f"{case.name}: max abs error {err}"


def test_config_fields(case):
  m = case.module
  assert m.block_out_channels == (32, 64)
  if case.name == "sd21_like":
    assert m.use_linear_projection and m.attention_head_dim == (2, 4)
    assert m.transformer_layers_per_block == (1, 2) and m.cross_attention_dim == 24
    block = case.params["mid_block"]["attentions_0"]
    assert block["proj_in"]["kernel"].shape == (64, 64)
    assert set(block) >= {"transformer_blocks_0", "transformer_blocks_1"}
  else:
    assert not m.use_linear_projection and m.attention_head_dim == 4
    assert case.params["mid_block"]["attentions_0"]["proj_in"]["kernel"].shape == (1, 1, 64, 64)


def test_remat_same_output(sd15_case):
  c = sd15_case
  out = _apply(c.module.clone(remat=True), c.params, c.sample, c.timesteps, c.context)
  np.testing.assert_array_equal(np.asarray(out), _ours(c))


def test_remat_same_input_gradient(tiny):
  module, params, sample, context = tiny
  weights = jax.random.normal(jax.random.key(3), sample.shape)
  timesteps = jnp.array([3, 700], jnp.int32)

  def grad(m):
    loss = lambda x: jnp.sum(m.apply({"params": params}, x, timesteps, context) * weights)
    return jax.grad(loss)(sample)

  g_plain, g_remat = jax.jit(lambda: (grad(module), grad(module.clone(remat=True))))()
  g_plain, g_remat = np.asarray(g_plain), np.asarray(g_remat)
  assert np.max(np.abs(g_plain)) > 0
  np.testing.assert_allclose(g_remat, g_plain, rtol=1e-5, atol=1e-6 * np.max(np.abs(g_plain)))


def test_bfloat16_compute_close(sd15_case):
  """A sanity check of the dtype switch (not parity): bfloat16 has an 8-bit mantissa."""
  c = sd15_case
  module = c.module.clone(dtype=jnp.bfloat16)
  out = _apply(module, c.params, c.sample, c.timesteps, c.context)
  assert out.dtype == jnp.bfloat16
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(c.params))
  out = np.asarray(out, np.float32)
  rel = np.linalg.norm(out - c.ref) / np.linalg.norm(c.ref)
  print(f"bfloat16 relative error {rel:.3g}")
  assert rel < 5e-2


def test_timestep_features_match_diffusers():
  """Same features as diffusers up to float32 `exp` rounding.

  torch's float32 exp is not correctly rounded either, so a frequency may differ by one ulp
  (<= 2^-24 for frequencies below 1). That moves the exact angle t * f by up to t * 2^-24, the
  two float32 products may then round one ulp of t * f apart, and sin/cos add about one ulp of
  their own.
  """
  t = np.array([0.0, 1.0, 20.0, 333.5, 999.0], np.float32)
  for dim, flip, shift in ((32, True, 0), (33, False, 1), (320, True, 0)):
    half = dim // 2
    ref_freqs = torch.exp(-np.log(10000.0) * torch.arange(half, dtype=torch.float32)
                          / (half - shift)).numpy()
    freqs = sd_unet.timestep_frequencies(dim, shift)
    np.testing.assert_array_max_ulp(freqs, ref_freqs, maxulp=1)
    ref = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip,
                                 downscale_freq_shift=shift).numpy()
    ours = np.asarray(sd_unet.timestep_features(jnp.asarray(t), dim, flip, shift))
    assert ours.shape == ref.shape == (5, dim)
    angles = t[:, None] * freqs[None, :]
    bound = t[:, None] * 2.0**-24 + np.spacing(angles) + 1e-7
    bound = np.concatenate([bound, bound] + ([np.full((5, 1), 0.0)] if dim % 2 else []), axis=1)
    assert np.all(np.abs(ours - ref) <= bound), np.max(np.abs(ours - ref) - bound)
    np.testing.assert_array_equal(ours[0], ref[0])  # t = 0: sin 0 and cos 0 exactly


def test_scalar_timestep_broadcasts(tiny):
  module, params, sample, context = tiny
  fn = jax.jit(lambda t: module.apply({"params": params}, sample, t, context))
  out = np.asarray(fn(jnp.int32(625)))
  np.testing.assert_array_equal(out, np.asarray(fn(jnp.array([625, 625], jnp.int32))))
  mixed = np.asarray(fn(jnp.array([625, 20], jnp.int32)))
  np.testing.assert_array_equal(mixed[0], out[0])  # each sample keeps its own timestep
  assert np.abs(mixed[1] - out[1]).max() > 1e-2 * np.abs(out[1]).max()  # and t matters


def test_flax_paths_map_to_diffusers_names():
  pairs = {
      "down_blocks_0/attentions_1/transformer_blocks_0/attn1/to_q/kernel":
          "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q.weight",
      "up_blocks_1/attentions_2/transformer_blocks_0/ff/net_0/proj/bias":
          "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj.bias",
      "mid_block/attentions_0/transformer_blocks_0/attn2/to_out_0/kernel":
          "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.weight",
      "time_embedding/linear_1/kernel": "time_embedding.linear_1.weight",
      "conv_norm_out/scale": "conv_norm_out.weight",
      "down_blocks_1/downsamplers_0/conv/kernel": "down_blocks.1.downsamplers.0.conv.weight",
  }
  for flax_path, name in pairs.items():
    assert torch_name(tuple(flax_path.split("/"))) == name


@pytest.mark.parametrize("config, params_count", [
    (sd_unet.SD15_UNET_CONFIG, 859_520_964),
    (sd_unet.SD21_BASE_UNET_CONFIG, 865_910_724),
])
def test_full_size_configs_fit_diffusers_state_dicts(config, params_count):
  """SD 1.5 / SD 2.1-base: every diffusers name and shape, without allocating any weight."""
  with torch.device("meta"):
    model = TorchUNet.from_config(config)
  zero = np.zeros((), np.float32)
  state_dict = {k: np.broadcast_to(zero, tuple(v.shape)) for k, v in model.state_dict().items()}
  module = sd_unet.unet_from_config(config)
  params = unet_params(state_dict, module)
  assert sum(leaf.size for leaf in jax.tree.leaves(params)) == params_count
  attn = params["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]
  assert attn["attn2"]["to_k"]["kernel"].shape == (config["cross_attention_dim"], 320)
  assert attn["ff"]["net_0"]["proj"]["kernel"].shape == (320, 2560)
  assert module.block_settings()["heads"] == (
      (8, 8, 8, 8) if config is sd_unet.SD15_UNET_CONFIG else (5, 10, 20, 20))


def test_state_dict_strictness(sd15_case):
  c = sd15_case
  state_dict = dict(c.state_dict)
  missing = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
  del state_dict[missing]
  state_dict["down_blocks.0.attentions.0.extra.weight"] = np.zeros((3,), np.float32)
  state_dict["conv_in.weight"] = np.zeros((32, 4, 1, 1), np.float32)
  with pytest.raises(ValueError) as info:
    unet_params(state_dict, c.module)
  message = str(info.value)
  assert "1 missing" in message and missing in message
  assert "1 unexpected" in message and "down_blocks.0.attentions.0.extra.weight" in message
  assert "1 mis-shaped" in message and "conv_in.weight" in message


def test_state_dict_strictness_wrong_architecture(sd15_case):
  """Weights of a model with another text-encoder width are refused, naming the keys."""
  c = sd15_case
  wider = sd_unet.unet_from_config({**c.config, "cross_attention_dim": 16})
  with pytest.raises(ValueError, match=r"attn2\.to_k\.weight"):
    unet_params(c.state_dict, wider)


@pytest.mark.parametrize("key, value", [
    ("class_embed_type", "timestep"),
    ("num_class_embeds", 10),
    ("addition_embed_type", "text_time"),
    ("time_cond_proj_dim", 256),
    ("encoder_hid_dim", 768),
    ("encoder_hid_dim_type", "text_proj"),
    ("dual_cross_attention", True),
    ("only_cross_attention", True),
    ("resnet_time_scale_shift", "scale_shift"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("mid_block_type", None),
    ("conv_in_kernel", 1),
    ("conv_out_kernel", 1),
    ("time_embedding_type", "fourier"),
    ("class_embeddings_concat", True),
    ("attention_type", "gated"),
    ("dropout", 0.1),
    ("act_fn", "gelu"),
    ("norm_num_groups", None),
    ("down_block_types", ["AttnDownBlock2D", "DownBlock2D"]),
    ("transformer_layers_per_block", [[1, 2], [1, 2]]),
    ("cross_attention_dim", [32, 64]),
    ("some_future_option", 1),
])
def test_unsupported_config_rejected(key, value):
  config = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1",
            **TINY_CONFIGS["sd15_like"], key: value}
  with pytest.raises(ValueError, match=key) as info:
    sd_unet.unet_from_config(config)
  assert f"{key}={value!r}" in str(info.value)


def test_config_overrides_and_defaults():
  module = sd_unet.unet_from_config({"block_out_channels": [32, 64],
                                     "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                                     "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]},
                                    remat=True, dtype=jnp.bfloat16)
  assert module.remat and module.dtype == jnp.bfloat16
  # Missing keys take diffusers' defaults.
  assert module.cross_attention_dim == 1280 and module.attention_head_dim == 8
  with pytest.raises(ValueError, match="attention_head_dim"):
    sd_unet.unet_from_config({**TINY_CONFIGS["sd15_like"], "attention_head_dim": [4, 4, 4]})
  with pytest.raises(ValueError, match="not_a_field"):
    sd_unet.unet_from_config(TINY_CONFIGS["sd15_like"], not_a_field=1)
  shapes = expected_unet_shapes(sd_unet.unet_from_config(TINY_CONFIGS["sd15_like"]))
  assert shapes[("conv_in", "kernel")].shape == (3, 3, 4, 32)
