"""Official EDM / SiDA torch `state_dict` -> Flax params for `SongUNet` and `DhariwalUNet`.

Name map (the precond's `model.` prefix is dropped, the `enc`/`dec` ModuleDict dot becomes `_`):

    model.enc.32x32_block0.conv0.weight [O, I, kh, kw] -> enc_32x32_block0/conv0/kernel [kh,kw,I,O]
    model.map_layer0.weight             [out, in]      -> map_layer0/kernel              [in, out]
    model.dec.32x32_aux_norm.weight     [C]            -> dec_32x32_aux_norm/scale       [C]
    model.<...>.bias                                   -> <...>/bias
    model.map_noise.freqs (NCSN++)                     -> map_noise/freqs (stop-gradient param)

The `resample_filter` buffers are constants of the Flax network; each one must be present and
equal to the filter the network uses, otherwise conversion fails. The conversion itself is
`sid_jax.weights.strict.convert_state_dict`: every missing, unexpected or mis-shaped entry and
every missing or wrong buffer is reported in one ValueError.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from sid_jax.nets.dhariwal import DhariwalUNet
from sid_jax.nets.songunet import SongUNet
from sid_jax.weights import strict

PREFIX = "model."
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias", "freqs": "freqs"}


def flax_path_to_torch_name(path: tuple[str, ...]) -> str:
  """('enc_32x32_block0', 'conv0', 'kernel') -> 'model.enc.32x32_block0.conv0.weight'."""
  head, *rest = path
  if head.startswith(("enc_", "dec_")):
    head = head[:3] + "." + head[4:]
  return PREFIX + ".".join([head, *rest[:-1], _LEAF_TO_TORCH[rest[-1]]])


def expected_param_shapes(module) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
  """The flattened parameter shapes of `module` (SongUNet/DhariwalUNet), without computing them."""
  x = jnp.zeros((1, module.img_resolution, module.img_resolution, module.in_channels), jnp.float32)
  noise = jnp.zeros((1,), jnp.float32)
  labels = jnp.zeros((1, module.label_dim), jnp.float32) if module.label_dim else None
  aug = jnp.zeros((1, module.augment_dim), jnp.float32) if module.augment_dim else None
  return strict.expected_shapes(
      lambda key: module.init({"params": key, "dropout": key}, x, noise, labels, aug)["params"])


def torch_state_dict_to_flax(state_dict: Mapping[str, Any], denoiser) -> dict:
  """Converts an official EDMPrecond/VPPrecond/VEPrecond/EDMPrecond_EncoderDecoder `state_dict`.

  `state_dict` maps official names to arrays (numpy or torch, torch layout). `denoiser` is the
  `NetworkDenoiser` from `build_edm_denoiser` (or its bare module). Returns the params tree for
  `denoiser` (nested dicts of float32 numpy arrays). Raises ValueError naming every missing,
  unexpected or mis-shaped entry and every missing or wrong `resample_filter` buffer.
  """
  module = getattr(denoiser, "module", denoiser)
  if not isinstance(module, (SongUNet, DhariwalUNet)):
    raise ValueError(f"Expected a SongUNet or DhariwalUNet network, got {type(module).__name__}.")
  buffers = {PREFIX + name: value for name, value in module.torch_buffers().items()}
  return strict.convert_state_dict(state_dict, expected_param_shapes(module),
                                   flax_path_to_torch_name, what=type(module).__name__,
                                   constants=buffers)
