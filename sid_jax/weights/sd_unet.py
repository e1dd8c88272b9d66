"""diffusers `UNet2DConditionModel` state dict -> Flax params of `sid_jax.nets.sd_unet`.

Naming. The Flax module tree mirrors diffusers' attribute tree; entries of torch `ModuleList`s
(`down_blocks`, `up_blocks`, `resnets`, `attentions`, `transformer_blocks`, `downsamplers`,
`upsamplers`, the feed-forward `net` and the attention `to_out`) are Flax children named
`<list>_<index>`. Leaves: Dense/Conv `kernel` and norm `scale` are torch `weight`, `bias` is
`bias`. So `down_blocks_0/attentions_1/transformer_blocks_0/attn1/to_q/kernel` is
`down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q.weight`.

Layout. Conv weights OIHW -> HWIO, Linear [out, in] -> [in, out]; a 1x1 conv given where the
module has a Dense (or the reverse) is accepted, so SD 2.x checkpoints whose `proj_in` /
`proj_out` were saved as convolutions load into `use_linear_projection=True` too
(`sid_jax.weights.strict.default_layout`).

Strictness. The expected tree comes from `jax.eval_shape` of the module's init; every missing,
unexpected or mis-shaped entry is reported in one ValueError naming the torch keys.

Typical use, from a diffusers `unet/` folder:

  config = json.load(open("unet/config.json"))
  module = unet_from_config(config)
  params = unet_params(safetensors.numpy.load_file(
      "unet/diffusion_pytorch_model.safetensors"), module)
  eps = module.apply({"params": params}, latents_nhwc, timesteps, text_states)
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import jax.numpy as jnp

from sid_jax.weights.strict import Path, convert_state_dict, expected_shapes
from sid_jax.nets.sd_unet import UNet2DConditionModel

# Flax children named `<list>_<index>` that are entries of a torch ModuleList.
_LISTS = ("down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks",
          "downsamplers", "upsamplers", "net", "to_out")
_LIST_ENTRY = re.compile(r"^(" + "|".join(_LISTS) + r")_(\d+)$")
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def torch_name(path: Path) -> str:
  """Flax parameter path -> diffusers state-dict name (see the module docstring)."""
  parts = []
  for part in path[:-1]:
    match = _LIST_ENTRY.match(part)
    parts.extend(match.groups() if match else (part,))
  leaf = path[-1]
  if leaf not in _LEAVES:
    raise ValueError(f"Unexpected Flax leaf {'/'.join(path)}.")
  parts.append(_LEAVES[leaf])
  return ".".join(parts)


def expected_unet_shapes(module: UNet2DConditionModel,
                         sample_size: int | None = None) -> dict[Path, Any]:
  """Flattened Flax path -> abstract parameter of `module` (nothing is computed or allocated).

  Parameter shapes do not depend on the spatial size; `sample_size` (default: the smallest
  size every downsampling divides) only sets the traced input.
  """
  size = sample_size or 2**(len(module.block_out_channels) - 1)
  sample = jnp.zeros((1, size, size, module.in_channels), jnp.float32)
  timesteps = jnp.zeros((1,), jnp.int32)
  context = jnp.zeros((1, 1, module.cross_attention_dim), jnp.float32)
  return expected_shapes(lambda key: module.init(key, sample, timesteps, context)["params"])


def unet_params(state_dict: Mapping[str, Any],
                module: UNet2DConditionModel,
                *,
                ignore: Iterable[str] = ()) -> dict:
  """Converts a diffusers UNet state dict (torch tensors or numpy arrays) to `module`'s params.

  Args:
    state_dict: diffusers names -> tensors, e.g. `safetensors.numpy.load_file(...)` of
      `diffusion_pytorch_model.safetensors` or `UNet2DConditionModel.state_dict()`.
    module: the Flax module (e.g. from `unet_from_config` on the same folder's config.json).
    ignore: names allowed in `state_dict` without a Flax counterpart.

  Returns:
    The nested float32 params for `module.apply({"params": params}, ...)`.

  Raises:
    ValueError naming every missing, unexpected and mis-shaped key.
  """
  return convert_state_dict(state_dict,
                            expected_unet_shapes(module),
                            torch_name,
                            what="UNet2DConditionModel",
                            ignore=ignore)
