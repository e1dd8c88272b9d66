"""Strict import of PyTorch FID-Inception weights into `sid_jax.nets.inception` modules.

Accepted key names (one state dict may not mix a tensor under two names):
  * torchvision `Inception3` names, as in pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`:
    `Conv2d_1a_3x3.conv.weight`, `Mixed_7c.branch_pool.bn.running_var`, `fc.weight`, ...;
  * pytorch-fid's `InceptionV3` wrapper names, `blocks.<i>.<j>.<...>`, translated to the above;
  * the names inside one block or BasicConv2d (`branch1x1.conv.weight`, `bn.bias`, ...) when the
    target module is that block.

Layout changes: conv weights OIHW -> HWIO, linear weights [out, in] -> [in, out]. BatchNorm
`weight` -> `scale`, `running_mean` / `running_var` -> `batch_stats` `mean` / `var`;
`num_batches_tracked` is dropped (its BatchNorm must still exist). The result is checked against
`jax.eval_shape` of the module's init: any missing, unexpected or mis-shaped entry raises a
ValueError naming all of them.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# pytorch-fid's InceptionV3 wrapper (`blocks.<i>.<j>`) -> torchvision Inception3 layer names.
WRAPPER_TO_INCEPTION3 = {
    "blocks.0.0": "Conv2d_1a_3x3",
    "blocks.0.1": "Conv2d_2a_3x3",
    "blocks.0.2": "Conv2d_2b_3x3",
    "blocks.1.0": "Conv2d_3b_1x1",
    "blocks.1.1": "Conv2d_4a_3x3",
    "blocks.2.0": "Mixed_5b",
    "blocks.2.1": "Mixed_5c",
    "blocks.2.2": "Mixed_5d",
    "blocks.2.3": "Mixed_6a",
    "blocks.2.4": "Mixed_6b",
    "blocks.2.5": "Mixed_6c",
    "blocks.2.6": "Mixed_6d",
    "blocks.2.7": "Mixed_6e",
    "blocks.3.0": "Mixed_7a",
    "blocks.3.1": "Mixed_7b",
    "blocks.3.2": "Mixed_7c",
}
_INCEPTION3_TO_WRAPPER = {v: k for k, v in WRAPPER_TO_INCEPTION3.items()}

# BatchNorm entries: torch name -> (flax collection, flax leaf name).
_BN_LEAVES = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}
_BN_LEAVES_INV = {v: k for k, v in _BN_LEAVES.items()}


def _canonical_name(key: str) -> str:
  """Translates a wrapper name `blocks.i.j.rest` to its Inception3 name; others pass through."""
  if key.startswith("blocks."):
    parts = key.split(".")
    prefix = ".".join(parts[:3])
    if prefix in WRAPPER_TO_INCEPTION3 and len(parts) > 3:
      return ".".join([WRAPPER_TO_INCEPTION3[prefix]] + parts[3:])
  return key


def _target(name: str):
  """Flax (collection, *path) and layout of an Inception3-style torch name, or None."""
  parts = name.split(".")
  if len(parts) < 2 or not all(parts):
    return None
  *modules, leaf = parts
  if modules[-1] == "bn":
    if leaf not in _BN_LEAVES:
      return None
    collection, flax_leaf = _BN_LEAVES[leaf]
    return (collection, *modules, flax_leaf), "vector"
  if leaf == "weight":
    return ("params", *modules, "kernel"), "kernel"
  if leaf == "bias":
    return ("params", *modules, "bias"), "vector"
  return None


def _torch_name(target: tuple[str, ...], wrapper_names: bool) -> str:
  """The torch name a Flax leaf is imported from (inverse of `_target`)."""
  collection, *modules, leaf = target
  if modules and modules[-1] == "bn":
    leaf = _BN_LEAVES_INV.get((collection, leaf), leaf)
  elif leaf == "kernel":
    leaf = "weight"
  if wrapper_names and modules and modules[0] in _INCEPTION3_TO_WRAPPER:
    modules = [_INCEPTION3_TO_WRAPPER[modules[0]]] + modules[1:]
  return ".".join(modules + [leaf])


def _to_flax_layout(array: np.ndarray, layout: str, ndim: int) -> np.ndarray | None:
  """OIHW -> HWIO for conv kernels, [out, in] -> [in, out] for dense ones; None if impossible."""
  if layout == "kernel":
    if array.ndim != ndim:
      return None
    if ndim == 4:
      return np.transpose(array, (2, 3, 1, 0))
    if ndim == 2:
      return np.transpose(array, (1, 0))
    return None
  return array


def _torch_shape(flax_shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
  if layout == "kernel" and len(flax_shape) == 4:
    h, w, i, o = flax_shape
    return (o, i, h, w)
  if layout == "kernel" and len(flax_shape) == 2:
    return (flax_shape[1], flax_shape[0])
  return tuple(flax_shape)


def expected_variables(module: nn.Module, input_shape) -> dict[tuple[str, ...], Any]:
  """Flattened {(collection, *path): ShapeDtypeStruct} of `module.init` on float32 inputs."""
  abstract = jax.eval_shape(module.init, jax.random.key(0),
                            jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(abstract))


def torch_state_dict_to_flax(state_dict: Mapping[str, np.ndarray], module: nn.Module,
                             input_shape=None) -> dict[str, Any]:
  """Converts a torch state dict (name -> array) into `{'params', 'batch_stats'}` for `module`.

  Args:
    state_dict: torch names to numpy arrays (anything `np.asarray` accepts).
    module: the Flax module the variables are for (FIDInceptionV3, a block or BasicConv2d).
    input_shape: the NHWC input shape used to build the expected tree with `jax.eval_shape`;
      defaults to [1, 299, 299, 3] (fine for FIDInceptionV3, which resizes).

  Returns:
    Nested dicts of float numpy arrays, with exactly the collections and leaves of
    `module.init`, cast to their dtypes.

  Raises:
    ValueError: listing, by torch name, every missing, unexpected and mis-shaped entry.
  """
  if input_shape is None:
    input_shape = (1, 299, 299, 3)
  expected = expected_variables(module, input_shape)
  bn_paths = {key[1:-1] for key in expected if key[0] == "batch_stats"}
  wrapper_names = any(k.startswith("blocks.") for k in state_dict)

  converted: dict[tuple[str, ...], np.ndarray] = {}
  source: dict[tuple[str, ...], str] = {}
  unexpected: list[str] = []
  misshaped: list[str] = []
  rejected: set[tuple[str, ...]] = set()  # Targets already reported as mis-shaped.

  for key in state_dict:
    name = _canonical_name(key)
    parts = tuple(name.split("."))
    if parts[-1] == "num_batches_tracked":
      if len(parts) < 2 or parts[-2] != "bn" or parts[:-1] not in bn_paths:
        unexpected.append(key)
      continue
    found = _target(name)
    if found is None or found[0] not in expected:
      unexpected.append(key)
      continue
    target, layout = found
    if target in converted:
      unexpected.append(f"{key} (same tensor as {source[target]})")
      continue
    want = expected[target]
    array = np.asarray(state_dict[key])
    if not np.issubdtype(array.dtype, np.floating):
      misshaped.append(f"{key}: dtype {array.dtype}, expected a float array")
      rejected.add(target)
      continue
    flax_array = _to_flax_layout(array, layout, len(want.shape))
    if flax_array is None or flax_array.shape != tuple(want.shape):
      misshaped.append(f"{key}: shape {tuple(array.shape)}, expected "
                       f"{_torch_shape(tuple(want.shape), layout)}")
      rejected.add(target)
      continue
    converted[target] = np.ascontiguousarray(flax_array, dtype=want.dtype)
    source[target] = key

  missing = [
      f"{_torch_name(t, wrapper_names)} ({'/'.join(t)})"
      for t in expected
      if t not in converted and t not in rejected
  ]
  if missing or unexpected or misshaped:
    lines = [f"State dict does not match {type(module).__name__} "
             f"({len(missing)} missing, {len(unexpected)} unexpected, "
             f"{len(misshaped)} mis-shaped):"]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("mis-shaped", misshaped)):
      lines.extend(f"  {title}: {item}" for item in items)
    raise ValueError("\n".join(lines))
  return flax.traverse_util.unflatten_dict(converted)


def load_pytorch_fid_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a torch state dict (e.g. `pt_inception-2015-12-05-6726825d.pth`) as numpy arrays.

  Uses `torch.load(..., weights_only=True)`; torch is an optional dependency, imported here only.
  """
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("Reading .pth weights needs PyTorch (optional dependency): "
                      "pip install torch") from e
  state_dict = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
  if not isinstance(state_dict, Mapping):
    raise ValueError(f"{path} does not hold a state dict (got {type(state_dict).__name__}).")
  result = {}
  for key, value in state_dict.items():
    if not isinstance(value, torch.Tensor):
      raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor.")
    result[str(key)] = value.detach().cpu().numpy()
  return result
