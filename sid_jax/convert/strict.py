"""Strict torch `state_dict` -> Flax params conversion driven by the Flax tree.

A converter for a new architecture only has to say, for every Flax parameter path, which torch
name holds it (`torch_name(path) -> str`). `convert_state_dict` then walks the Flax model's own
parameter shapes (from `jax.eval_shape(model.init)`), takes each torch tensor, changes its layout
(conv OIHW -> HWIO, linear [out, in] -> [in, out]) and checks its shape. Every missing, unexpected
or mis-shaped entry is collected and reported in one `ValueError` that names them all, so a
partial conversion can never pass silently.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np
from flax import traverse_util

Path = tuple[str, ...]


def to_numpy(value: Any) -> np.ndarray:
  """A torch tensor (any device, any dtype incl. bfloat16) or array-like -> numpy array."""
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    value = value.numpy()
  return np.asarray(value)


def default_layout(path: Path, array: np.ndarray, want_shape: tuple[int, ...]) -> np.ndarray:
  """torch layout -> Flax layout for the leaf `path[-1]`.

  `kernel` leaves: 4-D conv weights OIHW -> HWIO, 2-D linear weights [out, in] -> [in, out]; a
  torch 1x1 conv stored where Flax has a Dense kernel ([O, I, 1, 1] -> [I, O]) is accepted too,
  because diffusers' attention projections are convs in old checkpoints and linears in new ones.
  Every other leaf keeps its layout.
  """
  if path[-1] != "kernel":
    return array
  if array.ndim == 4 and len(want_shape) == 2 and array.shape[2:] == (1, 1):
    return array[:, :, 0, 0].T
  if array.ndim == 2 and len(want_shape) == 4 and want_shape[:2] == (1, 1):
    return array.T[None, None]
  if array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  if array.ndim == 2:
    return array.T
  return array


def expected_shapes(init_fn: Callable[[jax.Array], Any]) -> dict[Path, jax.ShapeDtypeStruct]:
  """Flattened parameter shapes of `init_fn(key) -> params`, computed abstractly."""
  return traverse_util.flatten_dict(jax.eval_shape(init_fn, jax.random.key(0)))


def convert_state_dict(state_dict: Mapping[str, Any],
                       expected: Mapping[Path, Any],
                       torch_name: Callable[[Path], str],
                       *,
                       what: str,
                       layout: Callable[[Path, np.ndarray, tuple], np.ndarray] = default_layout,
                       ignore: Iterable[str] = (),
                       dtype=np.float32) -> dict:
  """Builds the nested Flax params for `expected` from `state_dict`, strictly.

  Args:
    state_dict: torch names -> tensors/arrays (torch layout).
    expected: flattened Flax paths -> objects with `.shape` (see `expected_shapes`).
    torch_name: maps a Flax path to the torch name that holds it.
    what: the model's name for error messages, e.g. "UNet2DConditionModel".
    layout: torch -> Flax layout change, given (path, array, expected shape).
    ignore: torch names that may be present without a Flax counterpart (non-parameter buffers
      such as `text_model.embeddings.position_ids`). Anything else left over is an error.
    dtype: numpy dtype of the produced leaves.

  Raises:
    ValueError naming every missing, unexpected and mis-shaped entry.
  """
  ignore = set(ignore)
  flat, missing, misshaped, used = {}, [], [], set()
  for path, want in expected.items():
    name = torch_name(path)
    if name not in state_dict:
      missing.append(f"{name} (Flax {'/'.join(path)} {tuple(want.shape)})")
      continue
    used.add(name)
    array = to_numpy(state_dict[name])
    converted = layout(path, array, tuple(want.shape))
    if tuple(converted.shape) != tuple(want.shape):
      misshaped.append(f"{name}: torch shape {tuple(array.shape)} does not fit Flax "
                       f"{'/'.join(path)} {tuple(want.shape)}")
      continue
    flat[path] = np.asarray(converted, dtype=dtype)
  unexpected = sorted(f"{k} {tuple(np.shape(to_numpy(v)))}" for k, v in state_dict.items()
                      if k not in used and k not in ignore)
  problems = []
  for label, items in (("missing", missing), ("unexpected", unexpected),
                       ("mis-shaped", misshaped)):
    if items:
      shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
      problems.append(f"{len(items)} {label}:\n    " + "\n    ".join(shown))
  if problems:
    raise ValueError(f"The weights do not fit this {what}: " + "\n  ".join(problems))
  return traverse_util.unflatten_dict(flat)
