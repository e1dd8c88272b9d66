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
  `torch.storage._load_from_bytes` -> numpy arrays (floating point ones as float32). Each storage
  is a small legacy `torch.save` blob, parsed here (its header pickles by the same restricted
  unpickler, its raw bytes counted against the declared element count), so torch is not needed.
* the `torch.nn.ModuleDict` / `ModuleList` / `Sequential` containers -> `PickledObject` records.
* plain data: `collections.OrderedDict`, `dnnlib.util.EasyDict` (EDM2 snapshots are one), and
  numpy arrays / scalars of numeric dtypes (EDM2's latent encoder stores some).

Any other global stops loading with `UnsafePickleError` naming it. A truncated, corrupted or
crafted file fails the same way, never with garbage values and never by allocating what it merely
declares:

* every read is checked against the bytes left in the file (a huge declared length fails before
  anything is allocated);
* every tensor record's storage offset, size and stride are checked against its storage's element
  count before the tensor is built: negative strides, overlapping layouts (which `torch.save`
  never writes) and extents past the storage are refused;
* BUILD (`__setstate__`) is applied only where official files use it, and never by calling a
  `__setstate__`: container modules take their state as a record; numpy arrays and dtypes are
  rebuilt from their state, whose dtype is checked again; any other object -- the loader's own
  helper classes and functions included -- refuses it, so a file cannot rebind them;
* protocol 5 out-of-band buffers are refused.

`load` logs its progress (bytes read, rate, ETA; `sid_jax.progress`) for files of 64 MiB or more.

`UnsafePickleError` is a `strict.WeightFileError` (a ValueError), the converters' one error type
for unreadable weight files; `load` puts the file's path in every message.

`check_torch_archive` and `check_torch_tensor` do the same checks for `torch.save` zip archives
read by `torch.load(weights_only=True)` (`readers.read_torch`): the zip's CRCs (torch does not
check them) and each loaded tensor's layout (torch accepts zero strides).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import zipfile
from typing import Any, Mapping

import numpy as np

from sid_jax import progress
from sid_jax.weights.strict import WeightFileError

RECONSTRUCT = ("torch_utils.persistence", "_reconstruct_persistent_obj")
_TORCH_CONTAINERS = ("ModuleDict", "ModuleList", "Sequential")
_NUMERIC_KINDS = "biufc"  # bool, signed, unsigned, float, complex.
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_TORCH_MAGIC = 0x1950a86a20f9469cfc6c  # First object of a pre-1.6 `torch.save` file.
PROGRESS_MIN_BYTES = 64 * 2**20  # `load` logs its progress (rate, ETA) for files this large
_REPORT_READS = 4096  # reads at least this long update the progress (the tensor storages)


class UnsafePickleError(WeightFileError, pickle.UnpicklingError):
  """The pickle needs something other than network data, is not an official snapshot, or is
  truncated or corrupted."""


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

# The storage classes of `torch.save` files -> the numpy dtype of their elements ('bfloat16' is
# ml_dtypes'; numpy has none). An UntypedStorage holds bytes.
_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "ByteStorage": "uint8", "CharStorage": "int8",
    "ShortStorage": "int16", "IntStorage": "int32", "LongStorage": "int64",
    "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "UntypedStorage": "uint8",
}
_LEGACY_PROTOCOL = 1001  # The second object of a legacy `torch.save` file.


def _storage_dtype(name: str) -> np.dtype:
  if name == "bfloat16":
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """What the global `torch.<X>Storage` resolves to: the storage's element dtype."""
  name: str


@dataclasses.dataclass(frozen=True)
class _Storage:
  """A tensor storage read from a legacy `torch.save` blob: its elements, one-dimensional."""
  elements: np.ndarray


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _int_tuple(value, what: str) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)) or not all(_is_int(v) for v in value):
    raise UnsafePickleError(f"A tensor's {what} is {value!r:.80}, not a tuple of integers.")
  return tuple(value)


def check_layout(offset, size, stride, numel: int, what: str = "A tensor") -> None:
  """Raises UnsafePickleError unless a tensor (`offset`, `size`, `stride`) lies in a storage of
  `numel` elements with a layout `torch.save` writes: no negative sizes or strides, no two
  elements at one place (no zero or overlapping strides), no element past the storage."""
  if not _is_int(offset) or offset < 0:
    raise UnsafePickleError(f"{what} has storage offset {offset!r:.40}.")
  if len(size) != len(stride):
    raise UnsafePickleError(f"{what} has size {size} but stride {stride}.")
  if any(s < 0 for s in size) or any(s < 0 for s in stride):
    raise UnsafePickleError(f"{what} has a negative size or stride: size {size}, stride "
                            f"{stride}.")
  if 0 in size:
    if offset > numel:
      raise UnsafePickleError(f"{what} starts at {offset}, past its storage of {numel} elements.")
    return
  span = 1  # elements covered by the dimensions of smaller stride, plus one
  for st, sz in sorted((st, sz) for sz, st in zip(size, stride) if sz > 1):
    if st < span:
      raise UnsafePickleError(f"{what} has overlapping strides {stride} for size {size}.")
    span += st * (sz - 1)
  if offset + span > numel:
    raise UnsafePickleError(f"{what} (offset {offset}, size {size}, stride {stride}) needs "
                            f"{offset + span} elements; its storage has {numel}.")


def _as_values(array: np.ndarray) -> np.ndarray:
  """A native-order copy; floating point values as float32 (bfloat16 included)."""
  if array.dtype.kind == "f" or array.dtype.name == "bfloat16":
    return np.array(array, dtype=np.float32)
  return np.array(array, dtype=array.dtype.newbyteorder("="))


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False,
                    backward_hooks=None, metadata=None) -> np.ndarray:
  """`torch._utils._rebuild_tensor_v2`, returning a numpy copy (float32 for floating dtypes)."""
  del requires_grad, backward_hooks, metadata  # Training-time details; not part of the values.
  if not isinstance(storage, _Storage):
    raise UnsafePickleError(f"A tensor was rebuilt from a {type(storage).__name__}, not a "
                            "storage.")
  size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
  elements = storage.elements
  check_layout(storage_offset, size, stride, elements.size)
  if 0 in size:
    return _as_values(np.zeros(size, elements.dtype))
  view = np.lib.stride_tricks.as_strided(
      elements[storage_offset:], shape=size,
      strides=tuple(s * elements.itemsize for s in stride), writeable=False)
  return _as_values(view)


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
  _check_numeric(dtype)
  return dtype


def _check_numeric(dtype) -> None:
  if (not isinstance(dtype, np.dtype) or dtype.kind not in _NUMERIC_KINDS or dtype.hasobject
      or dtype.names is not None or dtype.subdtype is not None):
    raise UnsafePickleError(f"numpy dtype {dtype!r:.80} is not a plain numeric dtype.")


def _numpy_scalar(dtype, data=None):
  """`numpy.core.multiarray.scalar` for numeric dtypes."""
  _check_numeric(dtype)
  if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
    raise UnsafePickleError(f"numpy scalar of dtype {dtype} has malformed data.")
  return np.frombuffer(bytes(data), dtype=dtype)[0]


class _NdarrayToken:
  """What the global `numpy.ndarray` resolves to: only a marker for `_numpy_reconstruct`."""


class _ArrayToBuild:
  """`numpy.core.multiarray._reconstruct(ndarray, shape, typecode)`: a placeholder that only
  BUILD turns into an array (from the shape, dtype and bytes of its state, all checked), so a
  declared shape is never allocated before its bytes are there."""


def _numpy_reconstruct(subtype, shape, typecode):
  """`numpy.core.multiarray._reconstruct`: a placeholder that BUILD replaces."""
  del shape, typecode  # The real shape and dtype arrive with the array's state.
  if subtype is not _NdarrayToken:
    raise UnsafePickleError(f"numpy array of type {subtype!r:.80} refused.")
  return _ArrayToBuild()


def _array_from_state(state) -> np.ndarray:
  """The array of an ndarray's pickled state (version, shape, dtype, fortran order, bytes)."""
  if not isinstance(state, tuple) or len(state) != 5:
    raise UnsafePickleError("A numpy array's state is malformed.")
  _, shape, dtype, fortran, data = state
  shape = _int_tuple(shape, "numpy shape")
  _check_numeric(dtype)  # again: the dtype actually used, whatever REDUCE named before
  if not isinstance(data, (bytes, bytearray)):
    raise UnsafePickleError(f"A numpy array's data is a {type(data).__name__}, not bytes.")
  if any(s < 0 for s in shape) or int(np.prod(shape, dtype=object)) * dtype.itemsize != len(data):
    raise UnsafePickleError(f"A numpy array of shape {shape} and dtype {dtype} has {len(data)} "
                            "bytes of data.")
  array = np.frombuffer(bytes(data), dtype=dtype).reshape(shape, order="F" if fortran else "C")
  return np.array(array, dtype=dtype.newbyteorder("="))  # numpy values keep their dtype


def _dtype_from_state(dtype: np.dtype, state) -> np.dtype:
  """A numeric dtype after its pickled state: only the byte order may change."""
  if (not isinstance(state, tuple) or len(state) < 5 or state[1] not in ("<", ">", "|", "=")
      or any(s is not None for s in state[2:5])):
    raise UnsafePickleError(f"The state of numpy dtype {dtype} is malformed.")
  out = dtype.newbyteorder(state[1]) if state[1] in "<>" else dtype
  _check_numeric(out)
  return out


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


def _storage_globals() -> dict[tuple[str, str], Any]:
  """The globals of a legacy storage blob's header: storage classes only."""
  out = {("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()}
  out[("torch.storage", "UntypedStorage")] = _StorageType("uint8")
  return out


class _BoundedReader:
  """A file whose reads never go past its end: a read of more bytes than are left (a truncated
  file, or a corrupted or crafted length) fails before anything is allocated."""

  def __init__(self, f, size: int, report: progress.Progress | None = None):
    self._f, self._size, self._report = f, size, report

  def left(self) -> int:
    return self._size - self._f.tell()

  def read(self, n: int = -1) -> bytes:
    left = self.left()
    if n is None or n < 0:
      n = left
    if n > left:
      raise UnsafePickleError(f"truncated: a record needs {n} bytes, {left} are left.")
    data = self._f.read(n)
    if len(data) != n:
      raise UnsafePickleError(f"truncated: read {len(data)} of {n} bytes.")
    if self._report is not None and n >= _REPORT_READS:
      self._report.update(self._size - self.left())
    return data

  def readline(self) -> bytes:
    return self._f.readline()

  def readinto(self, buf) -> int:
    data = self.read(len(buf))
    buf[:] = data
    return len(data)


def _refuse_buffers(unpickler):
  raise UnsafePickleError(f"{unpickler.source_name} uses protocol 5 out-of-band buffers, which "
                          "no network pickle has.")


class _DataOnlyUnpickler(pickle._Unpickler):  # pylint: disable=protected-access
  """An Unpickler that resolves only the given globals and applies BUILD only to records.

  The pure-Python unpickler, so that its BUILD can be replaced (the C one calls `__setstate__`
  or writes `__dict__` of whatever object the file names) and its reads bounded.
  """
  dispatch = dict(pickle._Unpickler.dispatch)  # pylint: disable=protected-access

  def __init__(self, file, source_name: str, allowed: Mapping[tuple[str, str], Any],
               persistent_load=None):
    super().__init__(file)
    self.source_name = source_name
    self._allowed = allowed
    self._persistent = persistent_load
    self._built: set[int] = set()

  def find_class(self, module, name):
    try:
      return self._allowed[(module, name)]
    except (KeyError, TypeError):
      raise UnsafePickleError(
          f"{self.source_name} references the global {module!s:.80}.{name!s:.80}, which sid_jax "
          "refuses to load. A pickle is a program: unpickling runs the functions it names, so "
          "sid_jax only rebuilds network data (persistent EDM classes as records, torch tensors, "
          "a few plain containers). If this file really is an official EDM / EDM2 / SiD "
          "snapshot, load it with the official code in a trusted environment, save "
          "`net.state_dict()` with torch.save, and convert that .pt file with --spec.") from None

  def persistent_load(self, pid):
    if self._persistent is not None:
      return self._persistent(pid)
    raise UnsafePickleError(
        f"{self.source_name} uses persistent ids (e.g. {str(pid)[:80]}); it is a torch.save "
        "file, not an official network pickle. Convert it as a .pt file with --spec.")

  def _replace(self, old, new) -> None:
    """Puts `new` where BUILD's target `old` is: on the stack and in the memo."""
    self.stack[-1] = new
    for key, value in list(self.memo.items()):
      if value is old:
        self.memo[key] = new

  def load_build(self):
    state = self.stack.pop()
    if not self.stack:
      raise UnsafePickleError("BUILD with nothing to build.")
    inst = self.stack[-1]
    if type(inst) in _CONTAINER_CLASSES.values() and id(inst) not in self._built:
      _record_from_state(inst, state)
      self._built.add(id(inst))
    elif type(inst) is _ArrayToBuild:  # pylint: disable=unidiomatic-typecheck
      self._replace(inst, _array_from_state(state))
    elif isinstance(inst, np.dtype):
      self._replace(inst, _dtype_from_state(inst, state))
    elif (type(inst) is collections.OrderedDict  # pylint: disable=unidiomatic-typecheck
          and isinstance(state, dict) and set(state) <= {"_metadata"}):
      pass  # a torch state_dict's per-module version metadata: not values
    else:
      raise UnsafePickleError(f"{self.source_name} sets the state of a "
                              f"{type(inst).__name__!s:.80} (BUILD); network pickles do that only "
                              "for torch containers and numpy arrays.")

  dispatch[pickle.BUILD[0]] = load_build
  for _op in (pickle.BYTEARRAY8, pickle.NEXT_BUFFER, pickle.READONLY_BUFFER):
    dispatch[_op[0]] = _refuse_buffers
  del _op


def _load_storage(data: bytes) -> _Storage:
  """`torch.storage._load_from_bytes`: a legacy `torch.save(storage)` blob, parsed as data.

  The blob is five pickles (magic number, protocol version, system info, the storage's persistent
  id ('storage', class, key, location, numel, None), the list of keys) and then, for its one
  storage, the element count as int64 and the raw elements. Every part is checked: a blob whose
  counts disagree or whose bytes do not end exactly after the elements is refused.
  """
  if not isinstance(data, (bytes, bytearray)):
    raise UnsafePickleError(f"A tensor storage must be bytes, got {type(data).__name__}.")
  f = io.BytesIO(bytes(data))
  reader = _BoundedReader(f, len(data))
  ids = []

  def part(what, persistent=None):
    return _DataOnlyUnpickler(reader, f"a tensor storage's {what}", _storage_globals(),
                              persistent).load()

  if part("magic number") != _LEGACY_TORCH_MAGIC or part("version") != _LEGACY_PROTOCOL:
    raise UnsafePickleError("A tensor storage is not a legacy torch.save blob.")
  info = part("system info")
  if not isinstance(info, Mapping) or not isinstance(info.get("little_endian", True), bool):
    raise UnsafePickleError("A tensor storage's system info is malformed.")
  order = "<" if info.get("little_endian", True) else ">"
  root = part("header", lambda pid: ids.append(pid) or pid)
  if len(ids) != 1 or root is not ids[0]:
    raise UnsafePickleError("A tensor storage blob holds something other than one storage.")
  pid = ids[0]
  if (not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage"
      or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str)
      or not _is_int(pid[4]) or pid[4] < 0 or (len(pid) == 6 and pid[5] is not None)):
    raise UnsafePickleError(f"A tensor storage's id {str(pid)[:80]} is malformed.")
  keys = part("keys")
  if keys != [pid[2]]:
    raise UnsafePickleError("A tensor storage's key list does not match its id.")
  dtype = _storage_dtype(pid[1].name).newbyteorder(order)
  count = int(np.frombuffer(reader.read(8), dtype=order + "i8")[0])
  if count != pid[4] or count * dtype.itemsize != reader.left():
    raise UnsafePickleError(f"A tensor storage declares {pid[4]} elements, records {count} and "
                            f"holds {reader.left()} bytes of {dtype.itemsize}-byte elements.")
  return _Storage(np.frombuffer(reader.read(), dtype=dtype))


def _load_stream(f, size: int, source_name: str, report: progress.Progress | None = None) -> Any:
  if size == 0:
    raise UnsafePickleError(f"{source_name} is empty (0 bytes), not a network pickle.")
  if f.read(4) == _ZIP_MAGIC:
    raise UnsafePickleError(
        f"{source_name} is a torch.save archive (zip), not a network pickle. Give it a .pt "
        "extension and pass --spec.")
  f.seek(0)
  reader = _BoundedReader(f, size, report)
  obj = _DataOnlyUnpickler(reader, source_name, _allowed_globals()).load()
  if isinstance(obj, int) and obj == _LEGACY_TORCH_MAGIC:
    raise UnsafePickleError(
        f"{source_name} is a legacy torch.save file, not a network pickle. Give it a .pt "
        "extension and pass --spec.")
  if reader.left():
    raise UnsafePickleError(f"{source_name} has {reader.left()} bytes after the pickle's end.")
  return obj


def _named(source_name: str, fn):
  """Runs `fn()`; any failure becomes one UnsafePickleError whose message names the file."""
  try:
    return fn()
  except UnsafePickleError as e:
    if source_name in str(e):
      raise
    raise UnsafePickleError(f"{source_name}: {e}") from None
  except RecursionError:
    raise UnsafePickleError(f"{source_name} is nested too deeply to be a network pickle.") from None
  except Exception as e:  # pylint: disable=broad-except
    # Whatever the parser trips over in a truncated or corrupted file (EOFError, struct.error,
    # KeyError of a missing memo entry, TypeError of a call with wrong arguments, MemoryError...).
    raise UnsafePickleError(f"{source_name} is not a readable network pickle (truncated or "
                            f"corrupted?): {type(e).__name__}: {str(e)[:200]}") from None


def loads(data: bytes, source_name: str = "<bytes>") -> Any:
  """Unpickles `data` with the restricted unpickler (see the module docstring)."""
  return _named(source_name, lambda: _load_stream(io.BytesIO(data), len(data), source_name))


def load(path: str | os.PathLike) -> Any:
  """Reads an official network pickle (e.g. `{'ema': PickledObject, ...}`) as data.

  Raises:
    FileNotFoundError: no such file.
    UnsafePickleError (a `strict.WeightFileError`) naming the file: anything else.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No such file: {path!r}.")

  def read():
    with open(path, "rb") as f:
      size = os.fstat(f.fileno()).st_size
      report = (progress.Progress(f"reading {os.path.basename(path)}", size, unit="bytes")
                if size >= PROGRESS_MIN_BYTES else None)
      obj = _load_stream(f, size, path, report)
      if report is not None:
        report.finish()
      return obj

  return _named(path, read)


# ---------------------------------------------------------------------------------------------
# torch.save zip archives (read by torch.load in `readers.read_torch`).
# ---------------------------------------------------------------------------------------------


def check_torch_archive(path: str) -> None:
  """Raises WeightFileError naming `path` unless every record of the zip archive reads back
  with its CRC (torch.load does not check them: a flipped byte would load as another value)."""
  try:
    with zipfile.ZipFile(path) as z:
      bad = z.testzip()
  except Exception as e:  # pylint: disable=broad-except
    raise WeightFileError(f"{path} is not a readable torch.save archive (truncated or "
                          f"corrupted?): {type(e).__name__}: {str(e)[:200]}") from None
  if bad is not None:
    raise WeightFileError(f"{path} is corrupted: its record {bad!r} fails its CRC check.")


def check_torch_tensor(path: str, name: str, tensor) -> None:
  """Raises WeightFileError naming `path` and entry `name` unless the loaded torch tensor has a
  layout `torch.save` writes (see `check_layout`)."""
  storage = tensor.untyped_storage()
  numel = storage.nbytes() // max(tensor.element_size(), 1)
  try:
    check_layout(int(tensor.storage_offset()), tuple(tensor.shape), tuple(tensor.stride()), numel,
                 what=f"Entry {name!r}")
  except UnsafePickleError as e:
    raise WeightFileError(f"{path}: {e}") from None
