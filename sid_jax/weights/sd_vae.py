"""Strict import of a diffusers `AutoencoderKL` state dict into `sid_jax.nets.sd_vae` params.

Accepted names are diffusers' (`encoder.down_blocks.0.resnets.1.conv1.weight`, ...), as written
to `vae/diffusion_pytorch_model.safetensors` (or `.bin`). Checkpoints saved before diffusers
renamed its attention layers call the middle blocks' attention projections
`query` / `key` / `value` / `proj_attn`, sometimes stored as 1x1 convolution weights
([out, in, 1, 1]); both spellings and both layouts are accepted. (The original CompVis/ldm names,
`encoder.mid.attn_1.q.weight` etc., are not: convert those with diffusers first.)

Each Flax path names its torch tensor (see `sid_jax.nets.sd_vae`): `_<i>` suffixes become `.<i>`,
`kernel` and `scale` become `weight`. Layouts change by `strict.default_layout` (conv OIHW -> HWIO,
linear [out, in] -> [in, out], 1x1 conv -> Dense). Every missing, unexpected or mis-shaped entry
is reported in one ValueError.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from sid_jax.nets import sd_vae
from sid_jax.weights import strict

_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_LEGACY_ATTENTION = re.compile(
    r"^(?P<block>.*\.attentions\.\d+)\.(?P<old>query|key|value|proj_attn)\.(?P<leaf>weight|bias)$")
_LEGACY_TO_CURRENT = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_INDEX_SUFFIX = re.compile(r"_(\d+)$")


def torch_name(path: tuple[str, ...]) -> str:
  """Flax param path -> diffusers name, e.g. ('decoder', 'up_blocks_0', 'conv', 'kernel')."""
  *modules, leaf = path
  if leaf not in _LEAF_NAMES:
    raise ValueError(f"Unexpected Flax leaf {'/'.join(path)}.")
  return ".".join([_INDEX_SUFFIX.sub(r".\1", m) for m in modules] + [_LEAF_NAMES[leaf]])


def current_name(name: str) -> str:
  """The current diffusers name of a legacy `query`/`key`/`value`/`proj_attn` entry (others
  unchanged)."""
  match = _LEGACY_ATTENTION.match(name)
  if not match:
    return name
  return f"{match['block']}.{_LEGACY_TO_CURRENT[match['old']]}.{match['leaf']}"


def expected_shapes(module: sd_vae.AutoencoderKL) -> dict[tuple[str, ...], Any]:
  """Flattened shapes of `module`'s params (no 'params' prefix), computed abstractly."""
  x = sd_vae.example_image(module)
  return strict.expected_shapes(lambda key: module.init(key, x)["params"])


def vae_params(state_dict: Mapping[str, Any], module: sd_vae.AutoencoderKL) -> dict:
  """A diffusers `AutoencoderKL` state dict -> `{'params': ...}` for `module.apply`.

  Args:
    state_dict: diffusers names -> torch tensors or numpy arrays, e.g. from
      `sid_jax.weights.readers.read_file(".../vae/diffusion_pytorch_model.safetensors")`.
    module: the target, e.g. `vae_from_config(config)` of the same checkpoint.

  Returns:
    `{'params': nested dict of float32 numpy arrays}`, ready for
    `module.apply(variables, x, method='encode')` and friends.

  Raises:
    ValueError naming every missing, unexpected and mis-shaped entry; a tensor given under both
      its legacy and its current attention name is unexpected under the second one.
  """
  params = strict.convert_state_dict(state_dict, expected_shapes(module), torch_name,
                                     what=f"AutoencoderKL {module.block_out_channels}",
                                     rename=current_name)
  return {"params": params}
