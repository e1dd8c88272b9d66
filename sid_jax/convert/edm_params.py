"""Official EDM / SiDA torch `state_dict` -> Flax params for `SongUNet` and `DhariwalUNet`.

Name map (the precond's `model.` prefix is dropped, the `enc`/`dec` ModuleDict dot becomes `_`):

    model.enc.32x32_block0.conv0.weight [O, I, kh, kw] -> enc_32x32_block0/conv0/kernel [kh,kw,I,O]
    model.map_layer0.weight             [out, in]      -> map_layer0/kernel              [in, out]
    model.dec.32x32_aux_norm.weight     [C]            -> dec_32x32_aux_norm/scale       [C]
    model.<...>.bias                                   -> <...>/bias
    model.map_noise.freqs (NCSN++)                     -> map_noise/freqs (stop-gradient param)

The `resample_filter` buffers are constants of the Flax network; each one must be present and
equal to the filter the network uses, otherwise conversion fails. The result is checked against the
network's own parameter shapes, and every missing, unexpected or mis-shaped entry is reported.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sid_jax.nets.dhariwal import DhariwalUNet
from sid_jax.nets.songunet import SongUNet

PREFIX = "model."
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias", "freqs": "freqs"}


def _as_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # A torch tensor.
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def flax_path_to_torch_name(path: tuple[str, ...]) -> str:
  """('enc_32x32_block0', 'conv0', 'kernel') -> 'model.enc.32x32_block0.conv0.weight'."""
  head, *rest = path
  if head.startswith(("enc_", "dec_")):
    head = head[:3] + "." + head[4:]
  return PREFIX + ".".join([head, *rest[:-1], _LEAF_TO_TORCH[rest[-1]]])


def _torch_layout_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  if path[-1] == "kernel" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if path[-1] == "kernel" and len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def _to_flax_layout(leaf: str, arr: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and arr.ndim == 4:
    return arr.transpose(2, 3, 1, 0)  # OIHW -> HWIO.
  if leaf == "kernel" and arr.ndim == 2:
    return arr.T  # [out, in] -> [in, out].
  return arr


def _flax_path(name: str, expected: Mapping[tuple[str, ...], Any]) -> tuple[str, ...] | None:
  """The Flax path of official name `name` (no `model.` prefix), or None if it has none."""
  parts = name.split(".")
  if len(parts) < 2:
    return None
  if parts[0] in ("enc", "dec"):
    if len(parts) < 3:
      return None
    parts = [f"{parts[0]}_{parts[1]}"] + parts[2:]
  prefix, leaf = tuple(parts[:-1]), parts[-1]
  if leaf == "weight":
    candidates = [prefix + ("kernel",), prefix + ("scale",)]
  elif leaf in ("bias", "freqs"):
    candidates = [prefix + (leaf,)]
  else:
    return None
  for path in candidates:
    # The round trip rejects look-alike names (e.g. 'enc_8x8_block0.conv0.weight').
    if path in expected and flax_path_to_torch_name(path) == PREFIX + name:
      return path
  return None


def expected_param_shapes(module) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
  """The flattened parameter shapes of `module` (SongUNet/DhariwalUNet), without computing them."""
  x = jnp.zeros((1, module.img_resolution, module.img_resolution, module.in_channels), jnp.float32)
  noise = jnp.zeros((1,), jnp.float32)
  labels = jnp.zeros((1, module.label_dim), jnp.float32) if module.label_dim else None
  aug = jnp.zeros((1, module.augment_dim), jnp.float32) if module.augment_dim else None

  def init(key):
    return module.init({"params": key, "dropout": key}, x, noise, labels, aug)["params"]

  shapes = jax.eval_shape(init, jax.random.key(0))
  return traverse_util.flatten_dict(shapes)


def torch_state_dict_to_flax(state_dict: Mapping[str, Any], denoiser) -> dict:
  """Converts an official EDMPrecond/VPPrecond/VEPrecond/EDMPrecond_EncoderDecoder `state_dict`.

  `state_dict` maps official names to arrays (numpy or torch, torch layout). `denoiser` is the
  `NetworkDenoiser` from `build_edm_denoiser` (or its bare module). Returns the params tree for
  `denoiser` (nested dicts of float32 jax arrays). Raises ValueError naming every missing,
  unexpected or mis-shaped entry and every missing or wrong `resample_filter` buffer.
  """
  module = getattr(denoiser, "module", denoiser)
  if not isinstance(module, (SongUNet, DhariwalUNet)):
    raise ValueError(f"Expected a SongUNet or DhariwalUNet network, got {type(module).__name__}.")
  expected = expected_param_shapes(module)
  buffers = module.torch_buffers()

  flat = {}
  unexpected, misshaped, bad_buffers = [], [], []
  misshaped_paths = set()
  seen_buffers = set()
  for key, value in state_dict.items():
    arr = _as_numpy(value)
    name = key[len(PREFIX):] if key.startswith(PREFIX) else None
    if name is not None and name in buffers:
      seen_buffers.add(name)
      want = buffers[name]
      if arr.shape != want.shape:
        bad_buffers.append(f"{key}: shape {arr.shape}, expected {want.shape}")
      elif not np.array_equal(arr.astype(np.float32), want):
        diff = float(np.max(np.abs(arr.astype(np.float64) - want)))
        bad_buffers.append(f"{key}: differs from the network's filter (max abs diff {diff:.3g})")
      continue
    path = _flax_path(name, expected) if name is not None else None
    if path is None:
      unexpected.append(f"{key} {tuple(arr.shape)}")
      continue
    want = expected[path]
    converted = _to_flax_layout(path[-1], arr)
    if converted.shape != tuple(want.shape):
      misshaped_paths.add(path)
      misshaped.append(f"{key}: shape {tuple(arr.shape)}, expected "
                       f"{_torch_layout_shape(path, want.shape)} (Flax {'/'.join(path)} "
                       f"{tuple(want.shape)})")
      continue
    if not np.issubdtype(arr.dtype, np.floating):
      misshaped_paths.add(path)
      misshaped.append(f"{key}: dtype {arr.dtype} is not floating point")
      continue
    flat[path] = jnp.asarray(converted, dtype=want.dtype)

  missing = [f"{flax_path_to_torch_name(p)} (Flax {'/'.join(p)} {tuple(expected[p].shape)})"
             for p in expected if p not in flat and p not in misshaped_paths]
  missing += [f"{PREFIX}{name} (resample_filter buffer)" for name in buffers
              if name not in seen_buffers]

  problems = []
  for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped),
                       ("wrong buffers", bad_buffers)):
    if items:
      problems.append(f"{len(items)} {title}:\n  " + "\n  ".join(items))
  if problems:
    raise ValueError(f"state_dict does not match {type(module).__name__}:\n" + "\n".join(problems))
  return traverse_util.unflatten_dict(flat)
