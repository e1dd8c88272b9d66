"""Reads official EDM / EDM2 / SiD network pickles as data, without running any of their code.

The official training loops save `network-snapshot-*.pkl` with plain `pickle.dump`. Their networks
are instances of classes decorated with EDM's `torch_utils.persistence.persistent_class`, which
pickle as a call `torch_utils.persistence._reconstruct_persistent_obj(meta)` where `meta` is

    {'type': 'class', 'version': 6, 'module_src': <source text of the defining .py file>,
     'class_name': 'EDMPrecond', 'state': <the object's __dict__>}

and the state of a `torch.nn.Module` holds `_parameters`, `_buffers`, `_modules` (children),
`_non_persistent_buffers_set` and, recorded by the decorator, `_init_args` / `_init_kwargs` (the
constructor arguments). The official loader `exec`s `module_src`: loading such a pickle runs code
that came with the file. This module never does. Its unpickler resolves only an explicit list of
globals (below); each one is replaced by a function of ours that builds data:

* `torch_utils.persistence._reconstruct_persistent_obj` -> a `PickledObject` record (class name,
  constructor arguments, state_dict as float32 numpy arrays, the rest of the state). The pickled
  source text is kept as a string for inspection and is never executed.
* tensors: `torch._utils._rebuild_tensor_v2`, `torch._utils._rebuild_parameter(_with_state)` and
  `torch.storage._load_from_bytes` (each storage is a small legacy `torch.save` blob, read with
  `torch.load(weights_only=True)`) -> numpy arrays (floating point ones as float32).
* the `torch.nn.ModuleDict` / `ModuleList` / `Sequential` containers -> `PickledObject` records.
* plain data: `collections.OrderedDict`, `dnnlib.util.EasyDict` (EDM2 snapshots are one), and
  numpy arrays / scalars of numeric dtypes (EDM2's latent encoder stores some).

Any other global stops loading with `UnsafePickleError` naming it. torch is needed only to read
tensor storages and is imported lazily.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import warnings
from typing import Any, Mapping

import numpy as np

RECONSTRUCT = ("torch_utils.persistence", "_reconstruct_persistent_obj")
_TORCH_CONTAINERS = ("ModuleDict", "ModuleList", "Sequential")
_NUMERIC_KINDS = "biufc"  # bool, signed, unsigned, float, complex.
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_TORCH_MAGIC = 0x1950a86a20f9469cfc6c  # First object of a pre-1.6 `torch.save` file.


class UnsafePickleError(pickle.UnpicklingError):
  """The pickle needs something other than network data (or is not an official snapshot)."""


# ---------------------------------------------------------------------------------------------
# Records.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PickledObject:
  """One object of the pickle, as data.

  Attributes:
    class_name: the class name, e.g. 'EDMPrecond', 'Precond', 'ModuleDict'.
    module_name: the module that defines the class, when the pickle names it ('torch.nn.modules.
      container' for the containers). None for persistent classes: their pickles carry the
      module's source text (`source`) instead of its name.
    init_args: positional constructor arguments recorded by the persistence decorator (None if
      not recorded).
    init_kwargs: keyword constructor arguments recorded by the decorator (None if not recorded).
    state_dict: what `module.state_dict()` would return: parameters and persistent buffers of
      this object and, recursively, of its children, by dotted name. Floating point values are
      float32 numpy arrays; other dtypes keep theirs. Empty for objects that are not modules.
    state: the object's pickled `__dict__` (children are `PickledObject`s, tensors numpy arrays).
    source: the pickled source text of the defining module (never executed), or None.
    version: the persistence format version (6 for EDM / EDM2), or None.
  """
  class_name: str
  module_name: str | None = None
  init_args: tuple | None = None
  init_kwargs: dict | None = None
  state_dict: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)
  state: dict = dataclasses.field(default_factory=dict, repr=False)
  source: str | None = dataclasses.field(default=None, repr=False)
  version: int | None = None

  @property
  def is_module(self) -> bool:
    return "_parameters" in self.state or "_modules" in self.state

  def children(self) -> dict[str, "PickledObject"]:
    return {k: v for k, v in (self.state.get("_modules") or {}).items() if v is not None}


class EasyDict(dict):
  """Stand-in for `dnnlib.util.EasyDict`: a dict whose items are also attributes."""

  def __getattr__(self, name):
    try:
      return self[name]
    except KeyError:
      raise AttributeError(name) from None


def _collect_state_dict(state: Mapping[str, Any], where: str) -> dict[str, np.ndarray]:
  """Parameters, then persistent buffers, then children's entries: torch's state_dict order."""
  out = {}
  skip = set(state.get("_non_persistent_buffers_set") or ())
  for kind in ("_parameters", "_buffers"):
    entries = state.get(kind) or {}
    if not isinstance(entries, Mapping):
      raise UnsafePickleError(f"{where}: {kind} is a {type(entries).__name__}, not a mapping.")
    for name, value in entries.items():
      if value is None or (kind == "_buffers" and name in skip):
        continue
      if not isinstance(value, np.ndarray):
        raise UnsafePickleError(f"{where}: {kind[1:-1]} {name!r} is a {type(value).__name__}, "
                                "not a tensor.")
      out[name] = value
  children = state.get("_modules") or {}
  if not isinstance(children, Mapping):
    raise UnsafePickleError(f"{where}: _modules is a {type(children).__name__}, not a mapping.")
  for name, child in children.items():
    if child is None:
      continue
    if not isinstance(child, PickledObject):
      raise UnsafePickleError(f"{where}: submodule {name!r} is a {type(child).__name__}.")
    for key, value in child.state_dict.items():
      out[f"{name}.{key}"] = value
  return out


def _record_from_state(record: PickledObject, state: Any) -> None:
  if state is None:
    state = {}
  if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
    state = state[0]  # (dict state, slot state) with no slots.
  if not isinstance(state, Mapping):
    raise UnsafePickleError(f"The state of {record.class_name} is a {type(state).__name__}, "
                            "not a dict.")
  record.state = dict(state)
  args = record.state.get("_init_args")
  kwargs = record.state.get("_init_kwargs")
  record.init_args = None if args is None else tuple(args)
  record.init_kwargs = None if kwargs is None else dict(kwargs)
  record.state_dict = (_collect_state_dict(record.state, record.class_name)
                       if record.is_module else {})


def _reconstruct_persistent(meta: Any) -> PickledObject:
  """Our replacement of `torch_utils.persistence._reconstruct_persistent_obj`."""
  if not isinstance(meta, Mapping):
    raise UnsafePickleError(f"{'.'.join(RECONSTRUCT)} was called with a {type(meta).__name__}, "
                            "not the persistence meta dict.")
  missing = sorted({"type", "class_name", "state"} - set(meta))
  if missing:
    raise UnsafePickleError(f"Persistence meta dict lacks {missing}; keys are {sorted(meta)}.")
  if meta["type"] != "class":
    raise UnsafePickleError(f"Unsupported persistent object type {meta['type']!r} (expected "
                            "'class').")
  record = PickledObject(class_name=str(meta["class_name"]), source=meta.get("module_src"),
                         version=meta.get("version"))
  _record_from_state(record, meta["state"])
  return record


_CONTAINER_CLASSES: dict[str, type] = {}


def _container_class(name: str) -> type:
  """A `PickledObject` subclass standing in for torch.nn.<name> (built by NEWOBJ + BUILD)."""
  if name not in _CONTAINER_CLASSES:

    def __new__(cls, *args, **kwargs):
      del args, kwargs
      obj = object.__new__(cls)
      PickledObject.__init__(obj, class_name=name, module_name="torch.nn.modules.container")
      return obj

    def __setstate__(self, state):
      _record_from_state(self, state)

    _CONTAINER_CLASSES[name] = type(f"Pickled{name}", (PickledObject,),
                                    {"__new__": __new__, "__setstate__": __setstate__})
  return _CONTAINER_CLASSES[name]


# ---------------------------------------------------------------------------------------------
# Tensors and numpy values.
# ---------------------------------------------------------------------------------------------


def _load_storage(data: bytes):
  """A tensor storage: `torch.storage._load_from_bytes` with torch's own weights-only loader."""
  import torch  # pylint: disable=g-import-not-at-top
  if not isinstance(data, (bytes, bytearray)):
    raise UnsafePickleError(f"A tensor storage must be bytes, got {type(data).__name__}.")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TypedStorage deprecation notices.
    storage = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
  if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
    raise UnsafePickleError(f"A tensor storage blob held a {type(storage).__name__}.")
  return storage


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False,
                    backward_hooks=None, metadata=None) -> np.ndarray:
  """`torch._utils._rebuild_tensor_v2`, returning a numpy copy (float32 for floating dtypes)."""
  del requires_grad, backward_hooks, metadata  # Training-time details; not part of the values.
  import torch  # pylint: disable=g-import-not-at-top
  if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
    raise UnsafePickleError(f"A tensor was rebuilt from a {type(storage).__name__}, not a "
                            "storage.")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    dtype = storage.dtype if isinstance(storage, torch.TypedStorage) else torch.uint8
    untyped = (storage.untyped() if isinstance(storage, torch.TypedStorage) else storage)
  tensor = torch.empty((0,), dtype=dtype).set_(untyped, int(storage_offset),
                                               tuple(int(s) for s in size),
                                               tuple(int(s) for s in stride))
  tensor = tensor.detach()
  if tensor.is_floating_point():
    tensor = tensor.to(torch.float32)
  return np.array(tensor.contiguous().numpy(), copy=True)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  """`torch._utils._rebuild_parameter(_with_state)`: a parameter is just its values here."""
  del requires_grad, backward_hooks, state
  if not isinstance(data, np.ndarray):
    raise UnsafePickleError(f"A parameter was rebuilt from a {type(data).__name__}.")
  return data


def _numeric_dtype(spec, align=False, copy=True) -> np.dtype:
  """`numpy.dtype` restricted to plain numeric dtypes (no objects, no records)."""
  del copy
  if not isinstance(spec, str):
    raise UnsafePickleError(f"numpy.dtype was called with a {type(spec).__name__}; only numeric "
                            "dtype codes are accepted.")
  dtype = np.dtype(spec, align=bool(align), copy=True)
  if dtype.kind not in _NUMERIC_KINDS or dtype.hasobject or dtype.names is not None:
    raise UnsafePickleError(f"numpy dtype {spec!r} is not a plain numeric dtype.")
  return dtype


def _numpy_scalar(dtype, data=None):
  """`numpy.core.multiarray.scalar` for numeric dtypes."""
  if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMERIC_KINDS or dtype.hasobject:
    raise UnsafePickleError(f"numpy scalar of dtype {dtype!r} refused.")
  if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
    raise UnsafePickleError(f"numpy scalar of dtype {dtype} has malformed data.")
  return np.frombuffer(bytes(data), dtype=dtype)[0]


class _NdarrayToken:
  """What the global `numpy.ndarray` resolves to: only a marker for `_numpy_reconstruct`."""


def _numpy_reconstruct(subtype, shape, typecode):
  """`numpy.core.multiarray._reconstruct`: an empty ndarray that BUILD then fills."""
  del typecode  # A placeholder; the real dtype arrives with the array's state.
  if subtype is not _NdarrayToken:
    raise UnsafePickleError(f"numpy array of type {subtype!r} refused.")
  return np.ndarray(tuple(int(s) for s in shape), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# The unpickler.
# ---------------------------------------------------------------------------------------------


def _allowed_globals() -> dict[tuple[str, str], Any]:
  allowed = {
      RECONSTRUCT: _reconstruct_persistent,
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
      ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
      ("torch.storage", "_load_from_bytes"): _load_storage,
      ("collections", "OrderedDict"): collections.OrderedDict,
      ("dnnlib.util", "EasyDict"): EasyDict,
      ("numpy", "dtype"): _numeric_dtype,
      ("numpy", "ndarray"): _NdarrayToken,
  }
  for core in ("numpy.core.multiarray", "numpy._core.multiarray"):
    allowed[(core, "scalar")] = _numpy_scalar
    allowed[(core, "_reconstruct")] = _numpy_reconstruct
  for name in _TORCH_CONTAINERS:
    allowed[("torch.nn.modules.container", name)] = _container_class(name)
  return allowed


class _DataOnlyUnpickler(pickle.Unpickler):
  """An Unpickler that resolves only the globals of `_allowed_globals`."""

  def __init__(self, file, source_name: str):
    super().__init__(file)
    self._source_name = source_name
    self._allowed = _allowed_globals()

  def find_class(self, module, name):
    try:
      return self._allowed[(module, name)]
    except KeyError:
      raise UnsafePickleError(
          f"{self._source_name} references the global {module}.{name}, which sid_jax refuses to "
          "load. A pickle is a program: unpickling runs the functions it names, so sid_jax only "
          "rebuilds network data (persistent EDM classes as records, torch tensors, a few plain "
          "containers). If this file really is an official EDM / EDM2 / SiD snapshot, load it "
          "with the official code in a trusted environment, save `net.state_dict()` with "
          "torch.save, and convert that .pt file with --spec.") from None

  def persistent_load(self, pid):
    raise UnsafePickleError(
        f"{self._source_name} uses persistent ids (e.g. {str(pid)[:80]}); it is a torch.save "
        "file, not an official network pickle. Convert it as a .pt file with --spec.")


def _load_stream(f, source_name: str) -> Any:
  if f.read(4) == _ZIP_MAGIC:
    raise UnsafePickleError(
        f"{source_name} is a torch.save archive (zip), not a network pickle. Give it a .pt "
        "extension and pass --spec.")
  f.seek(0)
  obj = _DataOnlyUnpickler(f, source_name).load()
  if isinstance(obj, int) and obj == _LEGACY_TORCH_MAGIC:
    raise UnsafePickleError(
        f"{source_name} is a legacy torch.save file, not a network pickle. Give it a .pt "
        "extension and pass --spec.")
  return obj


def loads(data: bytes, source_name: str = "<bytes>") -> Any:
  """Unpickles `data` with the restricted unpickler (see the module docstring)."""
  return _load_stream(io.BytesIO(data), source_name)


def load(path: str | os.PathLike) -> Any:
  """Reads an official network pickle (e.g. `{'ema': PickledObject, ...}`) as data."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No such file: {path!r}.")
  with open(path, "rb") as f:
    return _load_stream(f, path)
