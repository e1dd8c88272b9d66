"""Official EDM2 / SiDA-EDM2 torch `state_dict` <-> Flax params of `sid_jax.nets.edm2.EDM2Net`.

Naming. The Flax tree mirrors the torch module tree, with one renaming: the official
`unet.enc` / `unet.dec` `ModuleDict`s are flattened into children `enc_<key>` / `dec_<key>` of
`unet`. So `unet.enc.8x8_block0.conv_res0.weight` is params['unet']['enc_8x8_block0']
['conv_res0']['weight'] and `logvar_fourier.freqs` is params['logvar_fourier']['freqs'].

Layout. No transposition: our MPConv is written by hand and keeps the torch layout
([out, in, kh, kw] for convolutions, [out, in] for fully connected layers), because the weight
normalisation is per output channel = per leading axis; its leaves are called `weight`, which
`strict.default_layout` leaves alone. Gains stay 0-d. The MPFourier buffers `freqs` / `phases`
are carried into params (see `sid_jax.nets.edm2`).

Strictness. `sid_jax.weights.strict.convert_state_dict` compares the state dict with
`jax.eval_shape` of the denoiser's init; any missing, unexpected or mis-shaped entry raises one
ValueError that lists all of them by their torch names. Nothing is skipped unless the
caller names it in `ignore_prefixes`.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sid_jax.weights import strict

_DICT_MODULES = ("enc", "dec")


def flax_path_to_torch_name(path: tuple[str, ...]) -> str:
  """('unet', 'enc_8x8_block0', 'conv_res0', 'weight') -> 'unet.enc.8x8_block0.conv_res0.weight'."""
  parts = []
  for i, part in enumerate(path):
    if i > 0 and path[i - 1] == "unet" and part.split("_", 1)[0] in _DICT_MODULES and "_" in part:
      parts.extend(part.split("_", 1))
    else:
      parts.append(part)
  return ".".join(parts)


def torch_name_to_flax_path(name: str) -> tuple[str, ...]:
  """Inverse of `flax_path_to_torch_name`."""
  parts = name.split(".")
  path = []
  i = 0
  while i < len(parts):
    if (i > 0 and parts[i - 1] == "unet" and parts[i] in _DICT_MODULES and i + 1 < len(parts)):
      path.append(f"{parts[i]}_{parts[i + 1]}")
      i += 2
    else:
      path.append(parts[i])
      i += 1
  return tuple(path)


def _expected(denoiser) -> dict[tuple[str, ...], Any]:
  """Flattened Flax path -> abstract parameter of the denoiser's params (jax.eval_shape)."""
  module = denoiser.module
  res, ch = int(module.img_resolution), int(module.img_channels)
  x = jnp.zeros((1, res, res, ch), jnp.float32)
  labels = jnp.zeros((1, module.label_dim), jnp.float32) if module.label_dim else None
  return strict.expected_shapes(lambda key: dict(denoiser.init(key, x, labels)))


def expected_shapes(denoiser) -> dict[str, tuple[int, ...]]:
  """torch name -> shape of every entry the denoiser's params need (from jax.eval_shape)."""
  return {flax_path_to_torch_name(path): tuple(leaf.shape)
          for path, leaf in _expected(denoiser).items()}


def torch_state_dict_to_flax(state_dict: Mapping[str, Any], denoiser, *,
                             ignore_prefixes: Iterable[str] = ()) -> dict:
  """Converts an official EDM2 `state_dict` (torch names, numpy or torch values) to params.

  `denoiser` is what `build_edm2_denoiser` returns; its module defines the expected tree.
  `ignore_prefixes` allows state_dict entries whose names start with one of the given prefixes
  to have no counterpart (e.g. ('logvar_',) to initialise a generator from a teacher, the
  official `require_all=False` load). Raises ValueError naming every missing, unexpected and
  mis-shaped key. Returns a nested dict of float32 numpy arrays for `{'params': ...}`.
  """
  prefixes = tuple(ignore_prefixes)
  return strict.convert_state_dict(state_dict, _expected(denoiser), flax_path_to_torch_name,
                                   what=denoiser.module.class_name,
                                   ignore=lambda name: name.startswith(prefixes))


def flax_to_torch_state_dict(params) -> dict[str, np.ndarray]:
  """Params of an EDM2Net -> {official torch name: float32 numpy array} (same layouts)."""
  flat = traverse_util.flatten_dict(dict(params))
  return {flax_path_to_torch_name(tuple(path)): np.asarray(leaf, np.float32)
          for path, leaf in flat.items()}
