"""Flax params -> official PyTorch state dicts: the import key maps run backwards.

Nothing here names a parameter or decides a layout on its own. Each family's torch name comes
from the function its importer uses (`edm.flax_path_to_torch_name`, `edm2.flax_path_to_torch_name`,
`sd_unet.torch_name`, `sd_vae.torch_name`, `clip.torch_name`), and `torch_layout` undoes
`strict.default_layout` for the layouts sid_jax networks hold:

    conv `kernel`   [kh, kw, I, O] (HWIO) -> [O, I, kh, kw] (OIHW)
    dense `kernel`  [in, out]             -> [out, in]
    anything else (biases, norm scales, embeddings, EDM2's torch-layout `weight`s and 0-d gains,
    Fourier `freqs` / `phases`)            unchanged

EDM's `resample_filter` buffers, constants of the Flax network rather than parameters, are added
from `module.torch_buffers()`. Values keep their dtype (float32) and are copied into C order, so
the result can go straight to `torch.from_numpy` or `safetensors.numpy.save_file`.

`check_inverse` runs a state dict back through the family's strict importer and demands the same
params bit for bit: a name or layout that the importer would not read back is an error here too.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
from flax import traverse_util

from sid_jax.weights import clip, edm, edm2, sd_unet, sd_vae, strict

StateDict = dict[str, np.ndarray]


def torch_layout(path: strict.Path, array: np.ndarray) -> np.ndarray:
  """Flax layout -> torch layout of the leaf `path[-1]` (the inverse of `default_layout`)."""
  if path[-1] != "kernel":
    return array
  if array.ndim == 4:
    return array.transpose(3, 2, 0, 1)
  if array.ndim == 2:
    return array.T
  return array


def state_dict(params: Mapping[str, Any], torch_name: Callable[[strict.Path], str], *,
               buffers: Mapping[str, np.ndarray] | None = None) -> StateDict:
  """{torch name: array in torch layout} of a nested Flax params tree.

  Args:
    params: the nested params (numpy or jax arrays; no 'params' level).
    torch_name: the importer's Flax path -> torch name map.
    buffers: torch name -> value of constant buffers the torch module also stores.

  Raises:
    ValueError if two leaves (or a leaf and a buffer) get the same torch name.
  """
  out: StateDict = {}
  owner: dict[str, str] = {}
  for path, leaf in traverse_util.flatten_dict(dict(params)).items():
    path = tuple(str(p) for p in path)
    name = torch_name(path)
    if name in out:
      raise ValueError(f"Flax {'/'.join(path)} and {owner[name]} both map to {name}.")
    owner[name] = "/".join(path)
    out[name] = np.array(torch_layout(path, np.asarray(leaf)), order="C", copy=True)
  for name, value in (buffers or {}).items():
    if name in out:
      raise ValueError(f"The buffer {name} is also the name of Flax {owner[name]}.")
    out[name] = np.array(value, np.float32, order="C", copy=True)
  return out


def differences(params: Mapping[str, Any], read_back: Mapping[str, Any]) -> list[str]:
  """What differs between two params trees, a line per leaf ([] when equal bit for bit)."""
  a = traverse_util.flatten_dict(dict(params))
  b = traverse_util.flatten_dict(dict(read_back))
  lines = [f"{'/'.join(p)} is not read back" for p in a if p not in b]
  lines += [f"{'/'.join(p)} is read back but not exported" for p in b if p not in a]
  for path in a.keys() & b.keys():
    x, y = np.asarray(a[path]), np.asarray(b[path])
    name = "/".join(path)
    if x.shape != y.shape or x.dtype != y.dtype:
      lines.append(f"{name}: {x.dtype}{x.shape} exported, {y.dtype}{y.shape} read back")
    elif x.tobytes() != y.tobytes():
      lines.append(f"{name}: read back with other values")
  return sorted(lines)


def check_inverse(params: Mapping[str, Any], exported: StateDict,
                  read: Callable[[StateDict], Mapping[str, Any]], what: str) -> None:
  """Raises ValueError unless `read(exported)` (the importer) gives `params` back bit for bit."""
  lines = differences(params, read(exported))
  if lines:
    shown = "\n  ".join(lines[:20])
    raise ValueError(f"The exported {what} state dict does not read back as the same params:\n"
                     f"  {shown}")


# ---------------------------------------------------------------------------------------------
# The families.
# ---------------------------------------------------------------------------------------------


def edm_state_dict(params: Mapping[str, Any], module) -> StateDict:
  """An EDMPrecond / VPPrecond / VEPrecond / EDMPrecond_EncoderDecoder state dict (with the
  `model.` prefix and the `resample_filter` buffers) of a SongUNet / DhariwalUNet's params."""
  buffers = {edm.PREFIX + name: value for name, value in module.torch_buffers().items()}
  return state_dict(params, edm.flax_path_to_torch_name, buffers=buffers)


def edm2_state_dict(params: Mapping[str, Any]) -> StateDict:
  """A Precond / EDM_2_Precond_EncoderDecoder / EDM_2_Precond_Generator state dict."""
  return state_dict(params, edm2.flax_path_to_torch_name)


def unet_state_dict(params: Mapping[str, Any]) -> StateDict:
  """A diffusers `UNet2DConditionModel` state dict."""
  return state_dict(params, sd_unet.torch_name)


def vae_state_dict(params: Mapping[str, Any]) -> StateDict:
  """A diffusers `AutoencoderKL` state dict (current attention names: to_q, ..., to_out.0)."""
  return state_dict(params, sd_vae.torch_name)


def text_encoder_state_dict(params: Mapping[str, Any],
                            prefix: str = clip.TEXT_PREFIX) -> StateDict:
  """A transformers `CLIPTextModel` state dict, named as Stable Diffusion folders name it
  (`text_model.` prefix; transformers 4 and 5 both read it)."""
  return state_dict(params, lambda path: clip.torch_name(path, prefix))
