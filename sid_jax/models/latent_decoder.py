"""EDM2's latents -> pixels: Stable Diffusion's VAE decoder with EDM2's normalisation (spec §7.4).

EDM2 (and SiD / SiDA on EDM2) works on normalised SD-VAE latents: per channel,
`x = raw * scale + bias` with `scale = final_std / raw_std` and `bias = final_mean - raw_mean *
scale` (raw_mean = [5.81, 3.25, 0.12, -2.15], raw_std = [4.17, 4.62, 3.71, 3.28], final mean 0,
final std 0.5). Its `StabilityVAEEncoder.decode` undoes that, runs the VAE decoder
(`stabilityai/sd-vae-ft-mse`, whose pixels are in [0, 1] in EDM2's convention, not [-1, 1]) and
keeps `uint8(clamp(v, 0, 1) * 255)` (truncation).

`LatentDecoder` does the same in float32 and returns images in sid_jax's convention (about
[-1, 1]; `images.to_uint8(x) = uint8(clip(x * 127.5 + 128, 0, 255))`): `x = (255 v - 128) / 127.5`,
so that `images.to_uint8` of the result is EDM2's uint8 image (up to float rounding at exact
integer boundaries).

The VAE comes from a converted checkpoint directory (`python -m sid_jax.convert vae --src
sd-vae-ft-mse --dst DIR`: network.json {"class_name": "AutoencoderKL", "kwargs": the diffusers
config} and params/), or is a tiny random one (`"random"`, for tests and smoke runs).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sid_jax import checkpoints
from sid_jax.nets import sd_vae

Array = jax.Array

VAE_CLASS = "AutoencoderKL"
RAW_MEAN = (5.81, 3.25, 0.12, -2.15)
RAW_STD = (4.17, 4.62, 3.71, 3.28)
FINAL_MEAN = 0.0
FINAL_STD = 0.5
RANDOM = "random"  # config value: a tiny random VAE (tests, smoke runs)
KIND = "edm2-sd-vae"  # the "decoder" entry of a generator's network.json
SUBDIR = "decoder"  # where an exported generator keeps its VAE

# A tiny VAE for tests: 2 levels (latents 2x upsampled), 32 channels.
TINY_VAE_CONFIG = {
    "_class_name": VAE_CLASS, "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [32, 32], "layers_per_block": 1, "latent_channels": 4,
    "norm_num_groups": 32, "scaling_factor": 0.18215,
}


def check_vae_spec(spec: dict, where: str) -> None:
  if spec.get("class_name") != VAE_CLASS or not isinstance(spec.get("kwargs"), dict):
    raise ValueError(f"{where}: not a converted VAE (network.json must hold class_name "
                     f"{VAE_CLASS!r} and the diffusers config as 'kwargs'; convert one with "
                     "`python -m sid_jax.convert vae --src FOLDER --dst DIR`).")


def _example_image(module: sd_vae.AutoencoderKL) -> Array:
  return jnp.zeros((1,) + tuple(sd_vae.example_image(module).shape[1:]), jnp.float32)


def abstract_vae_params(module: sd_vae.AutoencoderKL) -> Any:
  return jax.eval_shape(lambda k: module.init(k, _example_image(module))["params"],
                        jax.random.key(0))


def random_vae(seed: int = 0) -> tuple[dict, Any]:
  """(spec, params) of the tiny random VAE: float32 weights from the module's own initialisers,
  biases and norm shifts perturbed so that no layer is the identity at initialisation."""
  spec = {"class_name": VAE_CLASS, "kwargs": dict(TINY_VAE_CONFIG)}
  module = sd_vae.vae_from_config(spec["kwargs"])
  params = module.init(jax.random.key(seed), _example_image(module))["params"]
  rs = np.random.RandomState(seed)

  def perturb(path, leaf):
    if str(getattr(path[-1], "key", path[-1])) == "bias":
      return np.asarray(leaf) + 0.1 * rs.standard_normal(leaf.shape).astype(np.float32)
    return np.asarray(leaf)

  return spec, jax.tree_util.tree_map_with_path(perturb, params)


def read_vae(directory: str) -> tuple[dict, Any]:
  """(spec, params) of a converted VAE directory."""
  spec = checkpoints.load_network_spec(directory)
  check_vae_spec(spec, f"{directory!r}")
  module = sd_vae.vae_from_config(spec["kwargs"])
  return spec, checkpoints.load_network_params(directory, abstract_vae_params(module))


class LatentDecoder:
  """EDM2's `StabilityVAEEncoder.decode` (see the module docstring); `params` on the host.

  Attributes:
    vae: the Flax `AutoencoderKL` (float32).
    params: its parameters.
    vae_spec: its network.json contents.
    source: where the VAE came from (a directory, or 'random').
    scale, bias: EDM2's per-channel normalisation of the raw latents, float32 [C].
  """

  def __init__(self, vae_spec: dict, params: Any, *, source: str,
               raw_mean: Sequence[float] = RAW_MEAN, raw_std: Sequence[float] = RAW_STD,
               final_mean: float = FINAL_MEAN, final_std: float = FINAL_STD):
    check_vae_spec(vae_spec, f"VAE {source!r}")
    self.vae_spec, self.params, self.source = vae_spec, params, source
    self.vae = sd_vae.vae_from_config(vae_spec["kwargs"])
    raw_mean = np.asarray(raw_mean, np.float32)
    raw_std = np.asarray(raw_std, np.float32)
    channels = self.vae.latent_channels
    if raw_mean.shape != (channels,) or raw_std.shape != (channels,):
      raise ValueError(f"raw_mean {raw_mean.tolist()} and raw_std {raw_std.tolist()} need one "
                       f"value per latent channel of the VAE ({channels}).")
    if np.any(raw_std <= 0) or not final_std > 0:
      raise ValueError(f"raw_std {raw_std.tolist()} and final_std {final_std} must be positive.")
    self.raw_mean, self.raw_std = raw_mean, raw_std
    self.final_mean, self.final_std = float(final_mean), float(final_std)
    self.scale = np.float32(final_std) / raw_std
    self.bias = np.float32(final_mean) - raw_mean * self.scale

  def image_shape(self, latent_shape: Sequence[int]) -> tuple[int, int, int]:
    h, w, c = (int(v) for v in latent_shape)
    if c != self.vae.latent_channels:
      raise ValueError(f"Latents with {c} channels cannot be decoded by a VAE with "
                       f"{self.vae.latent_channels} latent channels ({self.source}).")
    up = 2 ** (len(self.vae.block_out_channels) - 1)
    return (h * up, w * up, self.vae.out_channels)

  def raw_pixels(self, params, x: Array) -> Array:
    """Normalised latents NHWC -> the VAE's pixels NHWC (EDM2: nominally [0, 1]), float32."""
    x = jnp.asarray(x, jnp.float32)
    raw = (x - jnp.asarray(self.bias)) / jnp.asarray(self.scale)
    return jnp.asarray(self.vae.apply({"params": params}, raw, method=self.vae.decode),
                       jnp.float32)

  def __call__(self, params, x: Array) -> Array:
    """Normalised latents NHWC -> images in sid_jax's [-1, 1] convention (see the module)."""
    return (self.raw_pixels(params, x) * 255.0 - 128.0) / 127.5

  def record(self) -> dict:
    """The "decoder" entry of an exported generator's network.json."""
    return {"kind": KIND, "source": self.source, "raw_mean": self.raw_mean.tolist(),
            "raw_std": self.raw_std.tolist(), "final_mean": self.final_mean,
            "final_std": self.final_std}

  def save(self, generator_dir: str) -> None:
    """Writes the VAE into `generator_dir/decoder/` (the exported generator is self-contained)."""
    checkpoints.save_network(os.path.join(generator_dir, SUBDIR), self.params, self.vae_spec)


def from_source(source: str, **normalisation) -> LatentDecoder:
  """A decoder over a converted VAE directory, or 'random' (the tiny random VAE)."""
  if source == RANDOM:
    spec, params = random_vae()
  else:
    if not os.path.isdir(source):
      raise FileNotFoundError(f"VAE {source!r}: no such directory (convert sd-vae-ft-mse with "
                              "`python -m sid_jax.convert vae --src FOLDER --dst DIR`).")
    spec, params = read_vae(source)
  return LatentDecoder(spec, params, source=source, **normalisation)


def from_config(config) -> LatentDecoder | None:
  """`config.decoder` -> a decoder, or None when `config.decoder.vae` is empty (raw latents)."""
  d = config.get("decoder")
  if d is None or not d.get("vae"):
    return None
  return from_source(str(d.vae), raw_mean=tuple(d.raw_mean), raw_std=tuple(d.raw_std),
                     final_mean=float(d.final_mean), final_std=float(d.final_std))


def from_generator(directory: str, record: dict) -> LatentDecoder:
  """The decoder an exported generator recorded (its VAE in `directory/decoder/`)."""
  if record.get("kind") != KIND:
    raise ValueError(f"{directory!r}: unknown decoder kind {record.get('kind')!r} in "
                     f"network.json (expected {KIND!r}).")
  spec, params = read_vae(os.path.join(directory, SUBDIR))
  return LatentDecoder(spec, params, source=record.get("source", ""),
                       raw_mean=record["raw_mean"], raw_std=record["raw_std"],
                       final_mean=record["final_mean"], final_std=record["final_std"])
