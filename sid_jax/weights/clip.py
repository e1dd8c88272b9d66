"""Strict import of Hugging Face CLIP weights into `sid_jax.nets.clip` modules.

Accepted formats:
  * `CLIPTextModel` state dicts (Stable Diffusion's `text_encoder/`), with or without the
    `text_model.` prefix: transformers 4 saves `text_model.embeddings.token_embedding.weight`,
    transformers 5 saves `embeddings.token_embedding.weight`. One state dict may not mix the two.
  * `CLIPModel` state dicts: `text_model.*`, `vision_model.*`, `text_projection.weight`,
    `visual_projection.weight`, `logit_scale`.

The Flax modules carry the torch names, so a Flax path maps to its torch name by joining with
dots, turning `layers_<i>` into `layers.<i>` and renaming the leaf (`kernel` / `scale` /
`embedding` -> `weight`). The conversion itself is `sid_jax.weights.strict.convert_state_dict`:
linear weights [out, in] -> [in, out], the patch conv OIHW -> HWIO, every missing, unexpected or
mis-shaped tensor reported in one ValueError. Only the `position_ids` buffers older checkpoints
store are ignored.

`load_text_encoder` / `load_clip_model` read a Hugging Face folder with
`sid_jax.weights.readers.read_folder`: `model.safetensors` (or a sharded
`model.safetensors.index.json`), else `pytorch_model.bin` (or its sharded index), with an optional
variant (`model.fp16.safetensors`). Reading `.bin` files, and bfloat16 safetensors, needs PyTorch.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import jax.numpy as jnp

from sid_jax.nets import clip
from sid_jax.weights import strict
from sid_jax.weights.readers import read_config, read_folder

Path = strict.Path

TEXT_PREFIX = "text_model."
# Non-parameter buffers some checkpoints carry.
IGNORED_BUFFERS = (
    "text_model.embeddings.position_ids",
    "embeddings.position_ids",
    "vision_model.embeddings.position_ids",
)

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
_LAYER = re.compile(r"^layers_(\d+)$")


def torch_name(path: Path, prefix: str = "") -> str:
  """The Hugging Face name of the Flax parameter at `path`.

  E.g. ('encoder', 'layers_3', 'self_attn', 'q_proj', 'kernel') ->
  'encoder.layers.3.self_attn.q_proj.weight' (after `prefix`).
  """
  *modules, leaf = path
  parts = [f"layers.{m.group(1)}" if (m := _LAYER.match(p)) else p for p in modules]
  return prefix + ".".join(parts + [_LEAF_TO_TORCH.get(leaf, leaf)])


def _text_shapes(module: clip.CLIPTextTransformer) -> dict[Path, Any]:
  ids = jnp.zeros((1, module.max_position_embeddings), jnp.int32)
  return strict.expected_shapes(lambda key: module.init(key, ids)["params"])


def _clip_shapes(module: clip.CLIPModel) -> dict[Path, Any]:
  text, vision = module.text_model, module.vision_model
  ids = jnp.zeros((1, text.max_position_embeddings), jnp.int32)
  pixels = jnp.zeros((1, vision.image_size, vision.image_size, vision.num_channels), jnp.float32)
  return strict.expected_shapes(lambda key: module.init(key, ids, pixels)["params"])


def text_encoder_params(state_dict: Mapping[str, Any],
                        module: clip.CLIPTextTransformer) -> dict[str, Any]:
  """Flax params of `module` from a `CLIPTextModel` state dict.

  Args:
    state_dict: torch names -> tensors / arrays, with or without the `text_model.` prefix.
    module: the `CLIPTextTransformer` the params are for.

  Returns:
    The nested 'params' collection (numpy float32 leaves):
    `module.apply({'params': params}, input_ids)`.

  Raises:
    ValueError naming every missing, unexpected and mis-shaped tensor.
  """
  prefix = TEXT_PREFIX if any(k.startswith(TEXT_PREFIX) for k in state_dict) else ""
  return strict.convert_state_dict(state_dict, _text_shapes(module),
                                   lambda path: torch_name(path, prefix),
                                   what="CLIPTextModel", ignore=IGNORED_BUFFERS)


def clip_model_params(state_dict: Mapping[str, Any], module: clip.CLIPModel) -> dict[str, Any]:
  """Flax params of `module` from a Hugging Face `CLIPModel` state dict.

  Returns:
    The nested 'params' collection (numpy float32 leaves).

  Raises:
    ValueError naming every missing, unexpected and mis-shaped tensor.
  """
  return strict.convert_state_dict(state_dict, _clip_shapes(module), torch_name,
                                   what="CLIPModel", ignore=IGNORED_BUFFERS)


# ---------------------------------------------------------------------------------------------
# Hugging Face folders.
# ---------------------------------------------------------------------------------------------


def load_text_encoder(folder: str | os.PathLike, variant: str | None = None, **kw
                      ) -> tuple[clip.CLIPTextTransformer, dict[str, Any]]:
  """(module, params) of a `CLIPTextModel` folder, e.g. Stable Diffusion's `text_encoder/`.

  Args:
    folder: a folder with config.json and the weights (see `readers.read_folder`).
    variant: weight file variant, e.g. 'fp16' for `model.fp16.safetensors`.
    **kw: module overrides such as `dtype=jnp.bfloat16`.
  """
  module = clip.text_model_from_hf_config(read_config(folder), **kw)
  return module, text_encoder_params(read_folder(folder, variant), module)


def load_clip_model(folder: str | os.PathLike, variant: str | None = None, **kw
                    ) -> tuple[clip.CLIPModel, dict[str, Any]]:
  """(module, params) of a Hugging Face `CLIPModel` folder (config.json + weights).

  Args:
    folder: e.g. a local copy of laion/CLIP-ViT-g-14-laion2B-s12B-b42K.
    variant: weight file variant.
    **kw: `dtype` / `precision` overrides.
  """
  module = clip.clip_model_from_hf_config(read_config(folder), **kw)
  return module, clip_model_params(read_folder(folder, variant), module)
