"""Stable Diffusion 1.x / 2.x (epsilon prediction) as a sid_jax teacher.

One `StableDiffusion` holds the four pieces SiD-LSG uses (lsg_spec §1): the UNet (a DDPM epsilon
network, wrapped by `denoisers.DiscreteEpsDenoiser` into the EDM-convention denoiser every loss
takes), the CLIP text encoder (last hidden state after the final layer norm, causal mask only),
the VAE (decoding only) and the tokenizer (`transformers.CLIPTokenizer` from a local folder,
77-token max-length padding, truncation). Parameters are one tree
`{'unet': ..., 'text_encoder': ..., 'vae': ...}`.

Where the weights come from:
* `read_diffusers(folder)`: a local diffusers model folder (`unet/`, `vae/`, `text_encoder/`,
  `tokenizer/`, `scheduler/`; safetensors, or .bin with torch), read by
  `sid_jax.weights.diffusers` and converted by the key maps of `sid_jax.weights`;
* `load(directory)`: the network checkpoint `python -m sid_jax.convert sd` writes (spec JSON +
  Orbax params + the tokenizer folder), which needs neither torch nor diffusers;
* `tiny_spec()` + `random_params`: a tiny random model for tests and `:tiny` configs, with the
  byte-level tokenizer of `sid_jax.data.byte_tokenizer`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import tempfile
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import regex

from sid_jax import checkpoints, denoisers
from sid_jax.data import byte_tokenizer
from sid_jax.nets import attention, clip, sd_unet, sd_vae
from sid_jax.weights import clip as clip_weights
from sid_jax.weights import diffusers
from sid_jax.weights import sd_unet as sd_unet_weights
from sid_jax.weights import sd_vae as sd_vae_weights

CLASS_NAME = "StableDiffusion"
TOKENIZER_DIR = "tokenizer"
MAX_LENGTH = 77
# Runs of whitespace, as the slow CLIPTokenizer finds them (the `regex` module, its pattern).
_WHITESPACE = regex.compile(r"\s+")
# Tokenizer files copied from a diffusers folder into a converted checkpoint.
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "tokenizer.json", "added_tokens.json")


# ---------------------------------------------------------------------------------------------
# The scheduler: only what defines the noise grid.
# ---------------------------------------------------------------------------------------------


def scheduler_settings(config: dict[str, Any]) -> dict[str, Any]:
  """The DDPM grid settings of a diffusers `scheduler_config.json` (PNDM or DDPM).

  Only epsilon prediction is supported (SiD-LSG's teachers; the official v-prediction path is
  broken, lsg_spec §8.18). x0 is never clipped here, whatever `clip_sample` says (§8.1).
  """
  prediction = config.get("prediction_type", "epsilon")
  if prediction != "epsilon":
    raise ValueError(f"scheduler prediction_type={prediction!r} is not supported; SiD-LSG "
                     "distils epsilon-prediction teachers (SD 1.5, SD 2.1-base).")
  if config.get("trained_betas") is not None:
    raise ValueError("scheduler trained_betas are not supported.")
  if config.get("timestep_spacing", "leading") not in ("leading", "linspace", "trailing"):
    raise ValueError(f"Unknown timestep_spacing {config['timestep_spacing']!r}.")
  return {
      "num_train_timesteps": int(config.get("num_train_timesteps", 1000)),
      "beta_start": float(config.get("beta_start", 0.00085)),
      "beta_end": float(config.get("beta_end", 0.012)),
      "beta_schedule": str(config.get("beta_schedule", "scaled_linear")),
  }


# ---------------------------------------------------------------------------------------------
# The model.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class StableDiffusion:
  """Modules, schedule and tokenizer of one Stable Diffusion model (see the module docstring)."""
  spec: dict[str, Any]
  unet: sd_unet.UNet2DConditionModel
  text_encoder: clip.CLIPTextTransformer
  vae: sd_vae.AutoencoderKL
  alphas_cumprod: np.ndarray
  tokenizer: Any

  @property
  def denoiser(self) -> denoisers.DiscreteEpsDenoiser:
    return denoisers.DiscreteEpsDenoiser(self.unet, self.alphas_cumprod)

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    size = self.spec["kwargs"]["unet"].get("sample_size") or 64
    return (int(size), int(size), int(self.unet.in_channels))

  def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
    """[N, 77] int32 ids: the slow tokenizer's text cleaning (`clean_prompt`), max-length padding
    and truncation, as the official training and sampling code."""
    prompts = [clean_prompt(p) for p in prompts]
    if not prompts:
      return np.zeros((0, MAX_LENGTH), np.int32)
    ids = self.tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                         return_tensors="np")["input_ids"]
    return np.asarray(ids, np.int32)

  def encode_text(self, text_params, ids: jax.Array) -> jax.Array:
    """Text embeddings [N, 77, D]: the encoder's last hidden state (no attention mask)."""
    hidden, _ = self.text_encoder.apply({"params": text_params}, ids)
    return hidden.astype(jnp.float32)

  def decode(self, vae_params, latents: jax.Array) -> jax.Array:
    """Scaled latents (the generator's output space) -> images in about [-1, 1], NHWC."""
    return self.vae.apply({"params": vae_params}, latents,
                          method=sd_vae.AutoencoderKL.decode_scaled).astype(jnp.float32)


def clean_prompt(text: str) -> str:
  """A prompt as the official SiD-LSG tokenised it (lsg_spec §1.1).

  Training and sampling used transformers 4's slow `CLIPTokenizer`, which with ftfy installed
  (ftfy 6.2.0 in the official environment) cleans each text before splitting it into words:
  `ftfy.fix_text`, runs of whitespace to one space, ends stripped, lower case. transformers 5 only
  has the fast tokenizer, which skips ftfy: curly quotes, mojibake, full-width letters, ligatures
  and HTML entities (frequent in LAION prompts) would get other tokens than the generator was
  trained with.
  """
  if not isinstance(text, str):
    raise TypeError(f"A prompt must be a str, got {type(text).__name__}: {text!r}.")
  return _WHITESPACE.sub(" ", _ftfy().fix_text(text)).strip().lower()


def _ftfy():
  try:
    import ftfy  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("Tokenising prompts needs ftfy (requirements.txt: ftfy==6.3.1), as the "
                      "official SiD-LSG tokenizer cleaned text with it.") from e
  return ftfy


def _tokenizer(directory: str):
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(os.path.join(directory, "vocab.json")):
    raise FileNotFoundError(f"No CLIP tokenizer in {directory!r} (vocab.json and merges.txt are "
                            "needed; a diffusers folder has them in tokenizer/).")
  return CLIPTokenizer.from_pretrained(directory, local_files_only=True)


def build(spec: dict[str, Any], tokenizer_dir: str, *, dtype=jnp.float32, remat: bool = False,
          attention_chunk: int | None = attention.DEFAULT_QUERY_CHUNK) -> StableDiffusion:
  """Modules from a spec `{'class_name': 'StableDiffusion', 'kwargs': {'unet', 'vae',
  'text_encoder', 'scheduler'}}` (each a diffusers / transformers config dict).

  `dtype` is the compute dtype of all three networks (parameters stay float32); `remat`
  rematerialises the UNet's blocks in the backward pass; the UNet and VAE attend
  `attention_chunk` queries at a time (None or 0: all at once; see `sid_jax.nets.attention`).
  """
  if spec.get("class_name") != CLASS_NAME:
    raise ValueError(f"Not a Stable Diffusion spec: class_name={spec.get('class_name')!r}.")
  kw = spec["kwargs"]
  missing = sorted({"unet", "vae", "text_encoder", "scheduler"} - set(kw))
  if missing:
    raise ValueError(f"The Stable Diffusion spec lacks {missing}.")
  unet = sd_unet.unet_from_config(kw["unet"], dtype=dtype, remat=remat,
                                  attention_chunk=attention_chunk)
  text = clip.text_model_from_hf_config(kw["text_encoder"], dtype=dtype)
  vae = sd_vae.vae_from_config(kw["vae"], dtype=dtype, attention_chunk=attention_chunk)
  acp = denoisers.ddpm_alphas_cumprod(**scheduler_settings(kw["scheduler"]))
  if text.hidden_size != unet.cross_attention_dim:
    raise ValueError(f"The text encoder's width {text.hidden_size} differs from the UNet's "
                     f"cross_attention_dim {unet.cross_attention_dim}.")
  return StableDiffusion(spec=spec, unet=unet, text_encoder=text, vae=vae, alphas_cumprod=acp,
                         tokenizer=_tokenizer(tokenizer_dir))


def _init_fns(sd: StableDiffusion):
  h, w, c = sd.latent_shape
  latents = jnp.zeros((1, h, w, c), jnp.float32)
  ids = jnp.zeros((1, MAX_LENGTH), jnp.int32)
  emb = jnp.zeros((1, MAX_LENGTH, sd.unet.cross_attention_dim), jnp.float32)
  image = jnp.zeros((1,) + tuple(sd_vae.example_image(sd.vae).shape[1:]), jnp.float32)
  return {
      "unet": lambda k: sd.unet.init(k, latents, jnp.zeros((1,), jnp.int32), emb)["params"],
      "text_encoder": lambda k: sd.text_encoder.init(k, ids)["params"],
      "vae": lambda k: sd.vae.init(k, image)["params"],
  }


def abstract_params(sd: StableDiffusion) -> dict[str, Any]:
  return {name: jax.eval_shape(fn, jax.random.key(0)) for name, fn in _init_fns(sd).items()}


def random_params(sd: StableDiffusion, seed: int) -> dict[str, Any]:
  """Random weights for tiny test models: kernels and embeddings N(0, 1 / fan_in), norm scales
  1, biases 0 (filled on the host from the abstract shapes; tracing `init` costs seconds)."""
  rs = np.random.RandomState(seed)

  def leaf(path, a):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "scale":
      return np.ones(a.shape, np.float32)
    if name == "bias":
      return np.zeros(a.shape, np.float32)
    fan_in = int(np.prod(a.shape[:-1])) if len(a.shape) > 1 else a.shape[0]
    return (rs.standard_normal(a.shape) / np.sqrt(max(fan_in, 1))).astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, abstract_params(sd))


# ---------------------------------------------------------------------------------------------
# Tiny random models (tests, :tiny configs).
# ---------------------------------------------------------------------------------------------


def tiny_spec(*, sd2: bool = False) -> dict[str, Any]:
  """An SD-shaped model small enough for a CPU test: 8x8x4 latents, 16x16 images, a 2-layer
  text encoder on the 514-token byte-level vocabulary. `sd2` uses SD 2.x's settings (linear
  projections, head dim instead of head count, GELU text encoder, '!' padding)."""
  unet = {
      "_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4,
      "out_channels": 4, "layers_per_block": 1, "block_out_channels": [32, 64],
      "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
      "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 32,
      "attention_head_dim": [2, 4] if sd2 else 4, "norm_num_groups": 32,
      "use_linear_projection": sd2,
  }
  vae = {
      "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
      "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
      "block_out_channels": [32, 32], "layers_per_block": 1, "latent_channels": 4,
      "norm_num_groups": 32, "scaling_factor": 0.18215,
  }
  text = {
      "model_type": "clip_text_model", "vocab_size": byte_tokenizer.VOCAB_SIZE,
      "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
      "num_attention_heads": 4, "max_position_embeddings": MAX_LENGTH,
      "hidden_act": "gelu" if sd2 else "quick_gelu", "bos_token_id": byte_tokenizer.BOS_ID,
      "eos_token_id": byte_tokenizer.EOS_ID, "pad_token_id": 0 if sd2 else byte_tokenizer.EOS_ID,
  }
  scheduler = {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000,
               "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
               "prediction_type": "epsilon", "clip_sample": False}
  return {"class_name": CLASS_NAME,
          "kwargs": {"unet": unet, "vae": vae, "text_encoder": text, "scheduler": scheduler,
                     "pad_token": "!" if sd2 else byte_tokenizer.EOS}}


# The architectures of Stable Diffusion 1.5 and 2.1-base (their diffusers / transformers config
# files, architecture keys only), to build full-size modules without weights: shape checks,
# tracing, memory estimates. The SD 2.1 text encoder is OpenCLIP-H truncated to 23 layers.
_SD_VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
    "norm_num_groups": 32, "act_fn": "silu", "sample_size": 512, "scaling_factor": 0.18215,
}
_SD15_TEXT_CONFIG = {
    "model_type": "clip_text_model", "vocab_size": 49408, "hidden_size": 768,
    "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "max_position_embeddings": MAX_LENGTH, "hidden_act": "quick_gelu", "bos_token_id": 0,
    "eos_token_id": 2,
}
_SD21_TEXT_CONFIG = dict(_SD15_TEXT_CONFIG, hidden_size=1024, intermediate_size=4096,
                         num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu")
_SD_SCHEDULER_CONFIG = {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000,
                        "beta_start": 0.00085, "beta_end": 0.012,
                        "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
                        "clip_sample": False}


def reference_spec(name: str) -> dict[str, Any]:
  """The full-size spec of 'sd15' or 'sd21base' (architecture only; weights come from
  `python -m sid_jax.convert sd`)."""
  unets = {"sd15": sd_unet.SD15_UNET_CONFIG, "sd21base": sd_unet.SD21_BASE_UNET_CONFIG}
  texts = {"sd15": _SD15_TEXT_CONFIG, "sd21base": _SD21_TEXT_CONFIG}
  if name not in unets:
    raise ValueError(f"Unknown Stable Diffusion reference {name!r}; expected sd15 or sd21base.")
  return {"class_name": CLASS_NAME, "kwargs": {
      "unet": dict(unets[name], sample_size=64), "vae": dict(_SD_VAE_CONFIG),
      "text_encoder": dict(texts[name]), "scheduler": dict(_SD_SCHEDULER_CONFIG)}}


def tiny_tokenizer_dir(spec: dict[str, Any]) -> str:
  """A byte-level tokenizer folder for a tiny spec (written once per process, in /tmp)."""
  pad = spec["kwargs"].get("pad_token", byte_tokenizer.EOS)
  directory = os.path.join(tempfile.gettempdir(), "sid_jax_tiny_tokenizer",
                           "bang" if pad == "!" else "eos")
  if not os.path.isfile(os.path.join(directory, "vocab.json")):
    tmp = tempfile.mkdtemp(dir=os.path.dirname(directory) if os.path.isdir(
        os.path.dirname(directory)) else None)
    byte_tokenizer.write_tiny_clip_tokenizer(tmp, pad_token=pad)
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    try:
      os.replace(tmp, directory)
    except OSError:  # another process won the race
      shutil.rmtree(tmp, ignore_errors=True)
  return directory


# ---------------------------------------------------------------------------------------------
# Reading a diffusers folder; writing and reading converted checkpoints.
# ---------------------------------------------------------------------------------------------


def read_diffusers(folder: str, *, variant: str | None = None, unet_state_dict=None
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(spec, params) of a local diffusers folder (files read by `sid_jax.weights.diffusers`),
  converted strictly.

  Args:
    folder: the model folder (e.g. a local copy of stable-diffusion-v1-5).
    variant: weight variant such as 'fp16' (`diffusion_pytorch_model.fp16.safetensors`).
    unet_state_dict: use these UNet weights instead of `unet/` (a released SiD-LSG generator).
  """
  folder = diffusers.check_folder(folder)
  spec = {"class_name": CLASS_NAME, "kwargs": diffusers.read_configs(folder)}
  sd = build(spec, os.path.join(folder, TOKENIZER_DIR))
  if unet_state_dict is None:
    unet_state_dict = diffusers.read_state_dict(folder, "unet", variant)
  params = {
      "unet": sd_unet_weights.unet_params(unet_state_dict, sd.unet),
      "vae": sd_vae_weights.vae_params(diffusers.read_state_dict(folder, "vae", variant),
                                       sd.vae)["params"],
      "text_encoder": clip_weights.text_encoder_params(
          diffusers.read_state_dict(folder, "text_encoder", variant), sd.text_encoder),
  }
  return spec, params


def save(directory: str, spec: dict[str, Any], params: dict[str, Any], tokenizer_dir: str) -> None:
  """Writes a converted model: network.json, params/ (Orbax) and tokenizer/."""
  checkpoints.save_network(directory, params, spec)
  dst = os.path.join(directory, TOKENIZER_DIR)
  os.makedirs(dst, exist_ok=True)
  copied = 0
  for name in TOKENIZER_FILES:
    src = os.path.join(tokenizer_dir, name)
    if os.path.isfile(src):
      shutil.copyfile(src, os.path.join(dst, name))
      copied += 1
  if not copied:
    raise FileNotFoundError(f"No tokenizer files in {tokenizer_dir}.")


def load(directory: str, *, dtype=jnp.float32, remat: bool = False,
         attention_chunk: int | None = attention.DEFAULT_QUERY_CHUNK
         ) -> tuple[StableDiffusion, dict[str, Any]]:
  """A model written by `save` (`python -m sid_jax.convert sd`): modules and params (`build`'s
  keyword arguments)."""
  spec = checkpoints.load_network_spec(directory)
  sd = build(spec, os.path.join(directory, TOKENIZER_DIR), dtype=dtype, remat=remat,
             attention_chunk=attention_chunk)
  abstract = abstract_params(sd)
  params = checkpoints.load_network_params(directory, abstract)
  return sd, params
