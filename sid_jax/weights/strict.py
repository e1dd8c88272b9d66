"""Strict torch `state_dict` -> Flax params conversion driven by the Flax tree.

A converter for a new architecture only has to say, for every Flax parameter path, which torch
name holds it (`torch_name(path) -> str`). `convert_state_dict` then walks the Flax model's own
parameter shapes (from `jax.eval_shape(model.init)`), takes each torch tensor, changes its layout
(`default_layout`: conv OIHW -> HWIO, linear [out, in] -> [in, out], by the Flax leaf name, so
every family shares it) and checks its shape and dtype. A family's
special rules are small functions given to it: another naming of the state dict (`rename`),
entries that may be present without a Flax counterpart (`ignore`), constant buffers that must be
present and equal to the network's own (`constants`).

Every missing, unexpected or mis-shaped entry is collected and reported in one `ValueError`
that names them all, in one format for every family (`report`), so a partial conversion can
never pass silently.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import jax
import numpy as np
from flax import traverse_util

Path = tuple[str, ...]
Shape = tuple[int, ...]


class WeightFileError(ValueError):
  """A weight file that cannot be read as the data it should hold (truncated, corrupted,
  crafted, or of another format). The message names the file; every reader raises this one type,
  so a converter's callers need to handle no parser's own exceptions."""


# torch dtypes numpy has: kept as they are. Other floating dtypes (bfloat16, float8) -> float32.
_NUMPY_FLOATS = ("torch.float16", "torch.float32", "torch.float64")
_SHOWN = 20  # entries shown per kind of problem


def to_numpy(value: Any) -> np.ndarray:
  """A torch tensor (any device, any dtype incl. bfloat16) or array-like -> numpy array.

  Floating point tensors of a dtype numpy lacks (bfloat16, float8) become float32; every other
  dtype is kept.
  """
  if hasattr(value, "detach"):  # A torch tensor.
    value = value.detach().cpu()
    if value.is_floating_point() and str(value.dtype) not in _NUMPY_FLOATS:
      value = value.float()
    value = value.numpy()
  return np.asarray(value)


def _shape(value: Any) -> Shape:
  return tuple(int(s) for s in getattr(value, "shape", np.shape(value)))


# ---------------------------------------------------------------------------------------------
# Layout.
# ---------------------------------------------------------------------------------------------


def default_layout(path: Path, array: np.ndarray, want_shape: Shape) -> np.ndarray:
  """torch layout -> Flax layout for the leaf `path[-1]`.

  `kernel` leaves: 4-D conv weights OIHW -> HWIO, 2-D linear weights [out, in] -> [in, out]; a
  torch 1x1 conv stored where Flax has a Dense kernel ([O, I, 1, 1] -> [I, O]) is accepted too,
  because diffusers' attention projections are convs in old checkpoints and linears in new ones.
  Every other leaf (EDM2's torch-layout `weight`s included) keeps its layout.
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


def torch_shape(path: Path, flax_shape: Shape) -> Shape:
  """The torch shape that `default_layout` turns into `flax_shape` (for messages)."""
  flax_shape = tuple(int(s) for s in flax_shape)
  if path[-1] == "kernel" and len(flax_shape) == 4:
    h, w, i, o = flax_shape
    return (o, i, h, w)
  if path[-1] == "kernel" and len(flax_shape) == 2:
    return flax_shape[::-1]
  return flax_shape


def expected_shapes(init_fn: Callable[[jax.Array], Any]) -> dict[Path, jax.ShapeDtypeStruct]:
  """Flattened parameter shapes of `init_fn(key) -> params`, computed abstractly."""
  return traverse_util.flatten_dict(jax.eval_shape(init_fn, jax.random.key(0)))


# ---------------------------------------------------------------------------------------------
# What does not fit, and how it is reported.
# ---------------------------------------------------------------------------------------------


class Entry(NamedTuple):
  """One state-dict entry that does not fit, named by its torch name.

  `path` is the Flax path it belongs to (() if none), `got` the given torch shape, `want` the
  expected torch shape (None where not known) and `note` anything else to say (a dtype, a second
  name of the same tensor, a constant that differs).
  """
  name: str
  path: Path = ()
  got: Shape | None = None
  want: Shape | None = None
  note: str = ""


@dataclasses.dataclass
class Misfit:
  """Everything in one state dict that does not fit a model."""
  what: str
  missing: list[Entry] = dataclasses.field(default_factory=list)
  unexpected: list[Entry] = dataclasses.field(default_factory=list)
  misshaped: list[Entry] = dataclasses.field(default_factory=list)
  wrong_buffers: list[Entry] = dataclasses.field(default_factory=list)

  def __bool__(self) -> bool:
    return bool(self.missing or self.unexpected or self.misshaped or self.wrong_buffers)

  def kinds(self) -> list[tuple[str, list[Entry]]]:
    """(label, entries) of every kind of problem, in report order."""
    return [("missing", self.missing), ("unexpected", self.unexpected),
            ("mis-shaped", self.misshaped), ("wrong buffers", self.wrong_buffers)]


def _flax(path: Path) -> str:
  return "/".join(path)


def describe(entry: Entry, kind: str) -> str:
  """One line about `entry` (see `report`)."""
  name, path, got, want, note = entry
  if kind == "missing":
    return f"{name} ({note or f'Flax {_flax(path)}, torch shape {want}'})"
  if kind == "unexpected":
    return f"{name} {got}" + (f" ({note})" if note else "")
  if note:
    return f"{name}: {note}"
  return f"{name}: shape {got}, expected {want}" + (f" (Flax {_flax(path)})" if path else "")


def report(misfit: Misfit) -> str:
  """The default message: a header, then each kind of problem with one entry a line:

      The weights do not fit this UNet2DConditionModel:
      1 missing:
        conv_in.bias (Flax conv_in/bias, torch shape (32,))
      1 mis-shaped:
        conv_out.weight: shape (4, 32, 1, 1), expected (4, 32, 3, 3) (Flax conv_out/kernel)
  """
  lines = [f"The weights do not fit this {misfit.what}:"]
  for kind, entries in misfit.kinds():
    if entries:
      lines.append(f"{len(entries)} {kind}:")
      lines += [f"  {describe(e, kind)}" for e in entries[:_SHOWN]]
      if len(entries) > _SHOWN:
        lines.append(f"  ... and {len(entries) - _SHOWN} more")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The converter.
# ---------------------------------------------------------------------------------------------


def convert_state_dict(state_dict: Mapping[str, Any],
                       expected: Mapping[Path, Any],
                       torch_name: Callable[[Path], str],
                       *,
                       what: str,
                       rename: Callable[[str], str] | None = None,
                       ignore: Iterable[str] | Callable[[str], bool] = (),
                       constants: Mapping[str, np.ndarray] | None = None) -> dict:
  """Builds the nested Flax params for `expected` from `state_dict`, strictly.

  Args:
    state_dict: torch names -> tensors/arrays (torch layout).
    expected: flattened Flax paths -> objects with `.shape` and `.dtype` (see `expected_shapes`);
      the produced leaves are numpy arrays of those dtypes.
    torch_name: maps a Flax path to the torch name that holds it.
    what: the model's name for error messages, e.g. "UNet2DConditionModel".
    rename: maps a given name to the one `torch_name` uses (another naming scheme of the same
      tensors). A tensor given under two names that rename alike is reported as unexpected
      under the second one.
    ignore: names (after `rename`) that may be present without a Flax counterpart (non-parameter
      buffers such as `text_model.embeddings.position_ids`), or a predicate on names. Anything
      else left over is an error.
    constants: names of buffers that are constants of the Flax network -> their values; each
      must be present with exactly that value.

  Raises:
    ValueError naming every missing, unexpected, mis-shaped (or not floating point) entry and
      every missing or wrong constant.
  """
  ignored = ignore if callable(ignore) else frozenset(ignore).__contains__
  constants = constants or {}
  misfit = Misfit(what)
  given: dict[str, Any] = {}
  source: dict[str, str] = {}  # name used here -> name in `state_dict`
  for key, value in state_dict.items():
    name = rename(key) if rename else key
    if name in given:
      misfit.unexpected.append(Entry(key, got=_shape(value),
                                     note=f"same tensor as {source[name]}"))
      continue
    given[name], source[name] = value, key

  flat, used = {}, set()
  for path, want in expected.items():
    name = torch_name(path)
    want_torch = torch_shape(path, want.shape)
    if name not in given:
      misfit.missing.append(Entry(name, path, want=want_torch))
      continue
    used.add(name)
    array = to_numpy(given[name])
    if array.dtype.kind in "biu":
      misfit.misshaped.append(Entry(source[name], path, note=f"dtype {array.dtype} is not "
                                    "floating point"))
      continue
    converted = default_layout(path, array, tuple(want.shape))
    if tuple(converted.shape) != tuple(want.shape):
      misfit.misshaped.append(Entry(source[name], path, _shape(array), want_torch))
      continue
    flat[path] = np.asarray(converted, dtype=want.dtype, order="C")

  for name, value in constants.items():
    if name not in given:
      misfit.missing.append(Entry(name, want=value.shape, note="constant buffer"))
      continue
    used.add(name)
    array = to_numpy(given[name])
    if array.shape != value.shape:
      misfit.wrong_buffers.append(Entry(source[name], got=array.shape, want=value.shape))
    elif not np.array_equal(array.astype(value.dtype), value):
      diff = float(np.max(np.abs(array.astype(np.float64) - value)))
      misfit.wrong_buffers.append(Entry(source[name], note="differs from the network's own "
                                        f"constant (max abs diff {diff:.3g})"))

  misfit.unexpected += [Entry(source[n], got=_shape(v)) for n, v in given.items()
                        if n not in used and not ignored(n)]
  misfit.unexpected.sort(key=lambda e: e.name)
  if misfit:
    raise ValueError(report(misfit))
  return traverse_util.unflatten_dict(flat)
