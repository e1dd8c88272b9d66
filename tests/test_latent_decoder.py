"""EDM2 latents -> pixels (`sid_jax.models.latent_decoder`): the converted SD VAE with EDM2's
normalisation against diffusers' `AutoencoderKL` run as EDM2's `StabilityVAEEncoder.decode` does,
the `convert vae` command, and a class generator that decodes its latents."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL

from sid_jax import generators, images, models
from sid_jax.convert import __main__ as convert_cli
from sid_jax.models import latent_decoder
from tests import test_nets_sd_vae

# Two levels: 8x8x4 latents -> 16x16x3 images. Every parameter redrawn (not diffusers' init).
CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
              layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=16)
ATOL = 1e-4  # float32, as tests/test_nets_sd_vae.py


def _torch_vae(seed: int) -> TorchAutoencoderKL:
  return test_nets_sd_vae._random_torch_vae(seed, **CONFIG)


def _edm2_decode(vae: TorchAutoencoderKL, x_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """EDM2's `StabilityVAEEncoder.decode` (training/encoders.py), transcribed: float32, raw =
  (x - bias) / scale per channel, the VAE decoder, uint8(clamp(v, 0, 1) * 255). Returns (v NHWC,
  uint8 NHWC)."""
  scale = np.float32(0.5) / np.asarray(latent_decoder.RAW_STD, np.float32)
  bias = np.float32(0.0) - np.asarray(latent_decoder.RAW_MEAN, np.float32) * scale
  x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
  x = x - torch.from_numpy(bias).reshape(1, -1, 1, 1)
  x = x / torch.from_numpy(scale).reshape(1, -1, 1, 1)
  with torch.no_grad():
    v = vae.decode(x).sample
  u8 = v.clamp(0, 1).mul(255).to(torch.uint8)
  return v.numpy().transpose(0, 2, 3, 1), u8.numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """A tiny diffusers VAE saved as a VAE repository and converted with `convert vae`."""
  vae = _torch_vae(0)
  src = tmp_path_factory.mktemp("sd-vae-ft-mse")
  vae.save_pretrained(src)
  dst = tmp_path_factory.mktemp("converted") / "vae"
  assert convert_cli.main(["vae", "--src", str(src), "--dst", str(dst)]) == 0
  return vae, src, dst


@pytest.fixture(scope="module")
def latents():
  # EDM2's normalised latents have std 0.5; wider values exercise the clamp at 0 and 1.
  return np.random.default_rng(3).normal(0, 1.0, (3, 8, 8, 4)).astype(np.float32)


def test_decoded_pixels_and_uint8_images_match_edm2(converted, latents):
  vae, _, dst = converted
  decoder = latent_decoder.from_source(str(dst))
  ref_v, ref_u8 = _edm2_decode(vae, latents)
  v = np.asarray(jax.jit(decoder.raw_pixels)(decoder.params, latents))
  assert ref_v.shape == v.shape == (3, 16, 16, 3) and ref_v.std() > 0.3
  assert (ref_v < 0).any() and (ref_v > 1).any()  # both clamps are exercised
  assert float(np.max(np.abs(v - ref_v))) <= ATOL
  # In sid_jax's convention, images.to_uint8 gives EDM2's truncated uint8 of our pixels ...
  x = np.asarray(jax.jit(decoder)(decoder.params, latents))
  ours_u8 = images.to_uint8(x)
  np.testing.assert_array_equal(ours_u8, (np.clip(v, 0, 1) * 255).astype(np.uint8))
  # ... and EDM2's own uint8 image wherever the two float results do not straddle an integer.
  straddles = np.floor(np.clip(v, 0, 1) * 255) != np.floor(np.clip(ref_v, 0, 1) * 255)
  assert straddles.mean() < 0.01
  np.testing.assert_array_equal(ours_u8[~straddles], ref_u8[~straddles])


def test_convert_vae_writes_a_vae_checkpoint(converted, tmp_path):
  _, src, dst = converted
  spec = json.loads((dst / "network.json").read_text())
  assert spec["class_name"] == "AutoencoderKL"
  assert spec["kwargs"]["block_out_channels"] == [32, 64]
  record = json.loads((dst / "source.json").read_text())
  assert record["source"] == str(src) and len(record["weights_sha256"]) == 1
  # A whole Stable Diffusion folder's vae/ subfolder is found as well.
  whole = tmp_path / "sd"
  (whole / "vae").mkdir(parents=True)
  for f in src.iterdir():
    (whole / "vae" / f.name).write_bytes(f.read_bytes())
  assert convert_cli.main(["vae", "--src", str(whole), "--dst", str(tmp_path / "out")]) == 0
  assert (tmp_path / "out" / "params").is_dir()


def test_convert_vae_errors_name_the_problem(tmp_path, capsys):
  assert convert_cli.main(["vae", "--src", str(tmp_path), "--dst", str(tmp_path / "o")]) == 1
  assert "holds no VAE" in capsys.readouterr().err
  assert convert_cli.main(["vae", "--src", str(tmp_path), "--dst", str(tmp_path / "o"),
                           "--key", "ema"]) == 2
  assert "--key is only for" in capsys.readouterr().err


def test_decoder_settings_are_checked(converted):
  _, _, dst = converted
  with pytest.raises(FileNotFoundError, match="no such directory"):
    latent_decoder.from_source(str(dst) + "-missing")
  with pytest.raises(ValueError, match="one value per latent channel"):
    latent_decoder.from_source(str(dst), raw_mean=(0.0, 0.0, 0.0))
  with pytest.raises(ValueError, match="must be positive"):
    latent_decoder.from_source(str(dst), raw_std=(1.0, 1.0, 0.0, 1.0))
  decoder = latent_decoder.from_source(latent_decoder.RANDOM)
  with pytest.raises(ValueError, match="3 channels cannot be decoded"):
    decoder.image_shape((8, 8, 3))
  with pytest.raises(ValueError, match="not a converted VAE"):
    latent_decoder.check_vae_spec({"class_name": "Precond", "kwargs": {}}, "x")


def test_class_generator_decodes_its_latents():
  """The generator's images are the decoder applied to the network's latents, per seed."""
  spec = {"class_name": "Precond", "kwargs": dict(
      img_resolution=8, img_channels=4, label_dim=10, model_channels=16, channel_mult=[1, 2],
      num_blocks=1, attn_resolutions=[], channels_per_head=32, logvar_channels=16)}
  den = models.build_denoiser(spec)
  params = models.init_params(den, jax.random.key(0), (8, 8, 4), 10)
  decoder = latent_decoder.from_source(latent_decoder.RANDOM)
  plain = generators.ClassGenerator(den, params, sigma_init=2.5, image_shape=(8, 8, 4),
                                    label_dim=10)
  decoding = generators.ClassGenerator(den, params, sigma_init=2.5, image_shape=(8, 8, 4),
                                       label_dim=10, decoder=decoder)
  assert decoding.latent_shape == (8, 8, 4) and decoding.image_shape == (16, 16, 3)
  seeds = [5, 7, 9]
  lat = plain.generate(seeds, [1, 2, 3])
  x = decoding.generate(seeds, [1, 2, 3], batch=2)
  assert x.shape == (3, 16, 16, 3)
  np.testing.assert_allclose(x, np.asarray(decoder(decoder.params, lat)), atol=1e-5)
  assert np.std(x) > 0.01
