"""The weight-file readers under corrupted, truncated and crafted input.

Fuzz: seeded byte-flipped and truncated copies of a small official EDM network pickle and of a
`torch.save` zip archive of the same weights. Each copy must either convert to exactly the
original weights or fail with the converter's error (a ValueError) naming the file: never other
weights, never another exception type, never a crash. In the pickle, flips go everywhere except
the raw tensor bytes: a pickle carries no checksum, so a flipped weight byte is a different weight
and no reader can tell. The zip archive's records carry CRCs, so its flips go anywhere.

Crafted files: a huge declared size, negative / overlapping strides, extents past the storage,
BUILD on the loader's own helpers, dtypes swapped in by an array's state.
"""

import collections
import io
import json
import os
import pickle
import pickletools
import tracemalloc
import warnings
import zipfile

import jax
import numpy as np
import pytest
import torch

from sid_jax.models import official
from sid_jax.weights import pickles, readers
from sid_jax.weights.strict import WeightFileError
from tests import test_convert

FIXTURE = "edm_songunet_ddpmpp"
NUM_FLIPS = 150
NUM_TRUNCATIONS = 50


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """The original pickle and zip, their reference conversion and the spec of the .pt."""
  fx = test_convert._fixture(FIXTURE)  # pylint: disable=protected-access
  folder = tmp_path_factory.mktemp("fuzz")
  pkl = test_convert.write_official_pickle(folder / "net.pkl",
                                           test_convert._edm_snapshot(fx))  # pylint: disable=protected-access
  pt = folder / "net.pt"
  torch.save({k: torch.from_numpy(v.copy()) for k, v in fx.state_dict.items()}, pt)
  spec = folder / "spec.json"
  spec.write_text(json.dumps({"class_name": fx.cls, "kwargs": fx.config}))
  ref_spec, ref_params, _ = official.read_official("edm", pkl)
  return dict(pkl=pkl, pt=str(pt), spec=str(spec), fx=fx, ref_spec=ref_spec,
              ref_params=ref_params, folder=folder)


def _same_tree(a, b) -> bool:
  fa = dict(jax.tree_util.tree_flatten_with_path(a)[0])
  fb = dict(jax.tree_util.tree_flatten_with_path(b)[0])
  return fa.keys() == fb.keys() and all(
      np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype and
      np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])) for k in fa)


def _same_state_dict(a, b) -> bool:
  return a.keys() == b.keys() and all(
      a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def _outcome(path, spec_path, src) -> str:
  """'same' (converts to the original weights) or 'error' (the converter's error naming the
  file); anything else fails the test."""
  try:
    # The converter is a pure function of (spec, state dict): a read that gives back the original
    # pair converts to the original weights, so only a different read is converted in full.
    spec, state_dict, _ = official.read_source(path, "ema", spec_path)
    if spec == src["ref_spec"] and _same_state_dict(state_dict, src["fx"].state_dict):
      return "same"
    _, params, _ = official.read_official("edm", path, key="ema", spec_path=spec_path)
  except ValueError as e:
    assert path in str(e), f"the error does not name the file: {e}"
    return "error"
  assert _same_tree(params, src["ref_params"]), f"{path} converted into other weights"
  return "same"


def _pickle_value_ranges(data: bytes) -> list[tuple[int, int]]:
  """Byte ranges of the raw tensor elements (the tail of each storage blob) in `data`."""
  ranges = []
  for op, arg, pos in pickletools.genops(data):
    if op.name in ("BINBYTES", "SHORT_BINBYTES", "BINBYTES8"):
      header = {"SHORT_BINBYTES": 1, "BINBYTES": 4, "BINBYTES8": 8}[op.name]
      end = pos + 1 + header + len(arg)
      nbytes = pickles._load_storage(arg).elements.nbytes  # pylint: disable=protected-access
      ranges.append((end - nbytes, end))
  return ranges


def _copies(data: bytes, allowed: np.ndarray, rng: np.random.Generator):
  """NUM_FLIPS copies with one to three bytes changed at `allowed` positions, then
  NUM_TRUNCATIONS truncated ones (the empty file among them)."""
  for _ in range(NUM_FLIPS):
    b = bytearray(data)
    for pos in rng.choice(allowed, size=rng.integers(1, 4), replace=False):
      b[pos] ^= int(rng.integers(1, 256))
    yield "flip", bytes(b)
  for n in [0] + sorted(rng.integers(1, len(data), NUM_TRUNCATIONS - 1).tolist()):
    yield "truncation", data[:n]


def _fuzz(src, original: str, allowed: np.ndarray, seed: int, spec_path=None):
  data = open(original, "rb").read()
  rng = np.random.default_rng(seed)
  counts = collections.Counter()
  ext = os.path.splitext(original)[1]
  for i, (kind, copy) in enumerate(_copies(data, allowed, rng)):
    path = str(src["folder"] / f"{kind}{i}{ext}")
    with open(path, "wb") as f:
      f.write(copy)
    counts[kind, _outcome(path, spec_path, src)] += 1
    os.remove(path)
  return counts


def test_fuzzed_network_pickles_convert_exactly_or_fail_naming_the_file(sources):
  data = open(sources["pkl"], "rb").read()
  values = np.zeros(len(data), bool)
  for lo, hi in _pickle_value_ranges(data):
    values[lo:hi] = True
  counts = _fuzz(sources, sources["pkl"], np.flatnonzero(~values), seed=0)
  assert counts["truncation", "error"] == NUM_TRUNCATIONS  # a pickle ends with STOP
  assert counts["flip", "error"] > NUM_FLIPS // 3, counts  # most flips break the structure
  assert sum(counts.values()) == NUM_FLIPS + NUM_TRUNCATIONS


def test_fuzzed_torch_archives_convert_exactly_or_fail_naming_the_file(sources):
  size = os.path.getsize(sources["pt"])
  # Half the positions anywhere, half outside the tensor records (headers and data.pkl).
  with zipfile.ZipFile(sources["pt"]) as z:
    values = np.zeros(size, bool)
    for info in z.infolist():
      if "/data/" in info.filename:
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        values[start:start + info.compress_size] = True
  structure = np.flatnonzero(~values)
  allowed = np.concatenate([np.arange(size), np.repeat(structure, size // len(structure))])
  counts = _fuzz(sources, sources["pt"], allowed, seed=1, spec_path=sources["spec"])
  assert counts["truncation", "error"] == NUM_TRUNCATIONS
  assert counts["flip", "error"] > NUM_FLIPS // 3, counts
  assert sum(counts.values()) == NUM_FLIPS + NUM_TRUNCATIONS


# ---------------------------------------------------------------------------------------------
# Crafted files.
# ---------------------------------------------------------------------------------------------


class _Call:
  """Pickles as `fn(*args)` (fn must be importable under its own name)."""

  def __init__(self, fn, *args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


def _storage_blob(values) -> bytes:
  b = io.BytesIO()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.save(torch.tensor(values, dtype=torch.float32).storage(), b,
               _use_new_zipfile_serialization=False)
  return b.getvalue()


def _tensor_pickle(values, offset, size, stride) -> bytes:
  storage = _Call(torch.storage._load_from_bytes, _storage_blob(values))  # pylint: disable=protected-access
  return pickle.dumps(_Call(torch._utils._rebuild_tensor_v2, storage, offset, size, stride,  # pylint: disable=protected-access
                            False, collections.OrderedDict()))


def test_tensor_records_read_like_torch():
  # A transposed view and a view at an offset: the layouts torch.save writes for views.
  base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
  for t in (base.t(), base[1:, 1:3], torch.zeros(0, 3)):
    np.testing.assert_array_equal(pickles.loads(pickle.dumps(t)), t.numpy())
  np.testing.assert_array_equal(pickles.loads(_tensor_pickle(range(6), 2, (2, 2), (1, 2))),
                                np.array([[2, 4], [3, 5]], np.float32))


@pytest.mark.parametrize("offset,size,stride,match", [
    (0, (4, 2), (2, 1), "needs 8 elements; its storage has 6"),
    (5, (2,), (1,), "needs 7 elements"),
    (0, (2, 3), (-3, 1), "negative size or stride"),
    (0, (-2, 3), (3, 1), "negative size or stride"),
    (0, (2, 3), (0, 1), "overlapping strides"),
    (0, (2, 3), (2, 1), "overlapping strides"),
    (0, (2,), (1, 1), "size"),
    (7, (0,), (1,), "past its storage"),
])
def test_tensor_records_outside_their_storage_are_refused(offset, size, stride, match):
  with pytest.raises(pickles.UnsafePickleError, match=match) as e:
    pickles.loads(_tensor_pickle(range(6), offset, size, stride), "crafted.pkl")
  assert "crafted.pkl" in str(e.value) and isinstance(e.value, WeightFileError)


def test_huge_declared_sizes_fail_without_allocating():
  tracemalloc.start()
  try:
    cases = [
        _tensor_pickle(range(6), 0, (2**40, 2**20), (2**20, 1)),  # 2^60 elements
        b"\x80\x04\x8e" + (2**62).to_bytes(8, "little") + b"xx.",  # BINBYTES8 of 2^62 bytes
        b"\x80\x04B" + (2**31).to_bytes(4, "little") + b"xx.",  # BINBYTES of 2 GiB
    ]
    for data in cases:
      with pytest.raises(pickles.UnsafePickleError, match="crafted.pkl"):
        pickles.loads(data, "crafted.pkl")
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert peak < 16 * 2**20, peak


def test_storage_blobs_with_wrong_counts_are_refused():
  blob = _storage_blob([1.0, 2.0, 3.0])
  for bad in (blob[:-4], blob + b"\0\0\0\0", blob.replace(b"K\x03N", b"K\x04N")):
    storage = _Call(torch.storage._load_from_bytes, bad)  # pylint: disable=protected-access
    data = pickle.dumps(_Call(torch._utils._rebuild_tensor_v2, storage, 0, (3,), (1,), False,  # pylint: disable=protected-access
                              collections.OrderedDict()))
    with pytest.raises(pickles.UnsafePickleError, match="crafted.pkl"):
      pickles.loads(data, "crafted.pkl")


def _build(target_global: bytes, state: bytes) -> bytes:
  """GLOBAL target, state, BUILD: sets the state of the loader's own helper `target`."""
  return b"\x80\x02c" + target_global + b"\n" + state + b"b."


@pytest.mark.parametrize("target", [b"dnnlib.util\nEasyDict", b"numpy\nndarray",
                                    b"torch_utils.persistence\n_reconstruct_persistent_obj",
                                    b"torch._utils\n_rebuild_tensor_v2",
                                    b"torch.nn.modules.container\nModuleDict"])
def test_build_on_the_loaders_own_helpers_is_refused(target):
  before = {name: dict(vars(obj)) for name, obj in
            [("EasyDict", pickles.EasyDict), ("PickledObject", pickles.PickledObject),
             ("rebuild", pickles._rebuild_tensor)]}  # pylint: disable=protected-access
  # state (None, {'__getattr__': 1}): a slot state, applied with setattr on the target.
  for state in (b"N}X\x0b\x00\x00\x00__getattr__K\x01s\x86", b"}X\x03\x00\x00\x00fooK\x01s"):
    with pytest.raises(pickles.UnsafePickleError, match="BUILD"):
      pickles.loads(_build(target, state), "crafted.pkl")
  after = {name: dict(vars(obj)) for name, obj in
           [("EasyDict", pickles.EasyDict), ("PickledObject", pickles.PickledObject),
            ("rebuild", pickles._rebuild_tensor)]}  # pylint: disable=protected-access
  assert before == after


def test_records_take_their_state_once():
  module = torch.nn.ModuleDict()
  data = pickle.dumps(module)
  assert isinstance(pickles.loads(data), pickles.PickledObject)
  # A second BUILD on the same container (rebinding a loaded record) is refused.
  twice = data[:-1] + b"}b."
  with pytest.raises(pickles.UnsafePickleError, match="BUILD"):
    pickles.loads(twice, "crafted.pkl")


def test_array_dtypes_are_checked_after_their_state():
  good = pickle.dumps(np.arange(3, dtype=">f4"), protocol=4)
  assert good[2:3] == pickle.FRAME
  good = good[:2] + good[11:]  # without the frame, so that parts can change length
  out = pickles.loads(good)
  np.testing.assert_array_equal(out, [0, 1, 2])
  assert out.dtype == np.float32 and out.dtype.isnative
  start = good.index(b"h\x03\x8c\x05dtype")
  end = good.index(b"t\x94b", start) + 3  # through the dtype's BUILD
  # The array's state names its dtype: swap in something that is not a numeric dtype, or give
  # the dtype's own state fields (a record dtype).
  for bad in (good[:start] + b"\x8c\x01O" + good[end:], good.replace(b"NNNJ", b"N}NJ")):
    assert bad != good
    with pytest.raises(pickles.UnsafePickleError, match="dtype"):
      pickles.loads(bad, "crafted.pkl")
  # Shape and bytes must agree.
  with pytest.raises(pickles.UnsafePickleError, match="bytes of data"):
    pickles.loads(good.replace(b"K\x03\x85", b"K\x04\x85"), "crafted.pkl")


def test_torch_archive_with_zero_strides_is_refused(tmp_path):
  # torch.load accepts a zero stride (a broadcast view of one row): other values than saved.
  path = tmp_path / "w.pt"
  torch.save({"w": torch.arange(12, dtype=torch.float32).reshape(4, 3)}, path)
  with zipfile.ZipFile(path) as z:
    records = {i.filename: z.read(i) for i in z.infolist()}
  name = next(n for n in records if n.endswith("data.pkl"))
  assert b"K\x03K\x01\x86" in records[name]
  records[name] = records[name].replace(b"K\x03K\x01\x86", b"K\x03K\x00\x86")
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:  # valid CRCs for the new bytes
    for n, data in records.items():
      z.writestr(n, data)
  with pytest.raises(WeightFileError, match="overlapping strides") as e:
    readers.read_torch(path)
  assert str(path) in str(e.value)


def test_torch_archive_crc_mismatch_is_refused(tmp_path):
  path = tmp_path / "w.pt"
  torch.save({"w": torch.arange(12, dtype=torch.float32)}, path)
  data = bytearray(path.read_bytes())
  pos = data.find(np.arange(12, dtype=np.float32).tobytes())
  data[pos + 5] ^= 1
  path.write_bytes(bytes(data))
  with pytest.raises(WeightFileError, match="CRC") as e:
    readers.read_torch(path)
  assert str(path) in str(e.value)
