"""Text prompts for data-free text-to-image distillation (SiD-LSG).

The official SiD-LSG code trains on the prompts of `aesthetics_6_plus.txt` (LAION-Aesthetics 6+,
about 12 million lines, one prompt per line) drawn by an infinite, shuffled sampler seeded by the
run seed. `PromptSource` reproduces that contract for a multi-host JAX run:

* **Prompt store.** A prompt is one line of a UTF-8 text file: the line without its trailing
  `'\\n'` and without one trailing `'\\r'` (CRLF files), nothing else stripped. Empty lines are
  empty (unconditional) prompts and are kept; bytes that are not UTF-8 are replaced by U+FFFD; a
  UTF-8 byte order mark at the start of the file is dropped. The file is never loaded as Python
  strings: one streaming pass records the byte offset at which every line starts (a numpy int64
  array, 8 bytes a line, ~100 MB for 12M lines), cached beside the file as `<file>.idx.npy` and
  keyed by the file's size and mtime (kept in memory when the directory is not writable); lines
  are then read by seeking. `read_prompt_lines` (a whole file at once: the prompts to sample, the
  captions to score) splits lines by the same rule but stops, naming the file and line, at bytes
  that are not UTF-8. Alternatively a prepared TensorFlow Datasets split
  (`tfds:NAME[/CONFIG]:SPLIT[:FEATURE]`, read whole into memory) or an `.array_record` file (one
  UTF-8 prompt a record, random access).
* **Order.** An infinite sequence of epochs; epoch `e` is the permutation of all `N` prompt indices
  drawn by `np.random.default_rng([seed, e])` (the identity when `shuffle=False`). The *global
  sequence* is the concatenation of the epochs and does not depend on batch sizes.
* **Hosts.** Host `process_index` of `process_count` takes the global positions `process_index,
  process_index + process_count, ...` (round robin). When every host draws `n` prompts per step,
  the union of their batches is exactly the next `n * process_count` prompts of the global
  sequence (host `h` holding positions `h, h + P, ...` of that window).
* **Resumption.** `state()` is a small JSON-serialisable dict whose `position` counts the global
  positions covered so far (`process_count` times the prompts this host drew). Hosts consuming in
  lockstep therefore have equal states, and the one saved by host 0 restores every host.
"""

from __future__ import annotations

import os
import re
import tempfile
import zlib
from typing import Any

from absl import logging
import numpy as np

TFDS_PREFIX = "tfds:"
TFDS_FORMAT = "tfds:NAME[/CONFIG]:SPLIT[:FEATURE]"
INDEX_SUFFIX = ".idx.npy"
DEFAULT_TEXT_FEATURES = ("text", "caption")
STATE_VERSION = 1

# Bytes read at a time when indexing a text file.
_CHUNK_BYTES = 1 << 24
# First element of a cached index file: "SIDPRMPT" as a little-endian int64.
_INDEX_MAGIC = int.from_bytes(b"SIDPRMPT", "little")
# Layout of a cached index: [magic, file size, file mtime_ns, N, bounds[0], ..., bounds[N]].
_INDEX_HEADER = 4
_UTF8_BOM = b"\xef\xbb\xbf"
_ARRAY_RECORD_RE = re.compile(r"\.array_record(-\d+-of-\d+)?$")
_FEATURE_RE = re.compile(r"[A-Za-z_][\w./-]*")


# ---------------------------------------------------------------------------------------------
# Line handling shared by the text-file store and `read_prompt_lines`.
# ---------------------------------------------------------------------------------------------


def _decode_line(raw: bytes, errors: str = "replace") -> str:
  """A prompt from the raw bytes of one line (its newline included or not)."""
  if raw.endswith(b"\n"):
    raw = raw[:-1]
  if raw.endswith(b"\r"):
    raw = raw[:-1]
  return raw.decode("utf-8", errors=errors)


def _check_file(path: str) -> None:
  if not os.path.exists(path):
    raise FileNotFoundError(f"Prompt file not found: {path}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Prompt source is not a regular file: {path}")


def read_prompt_lines(path: str, *, errors: str = "strict") -> list[str]:
  """All prompts (or captions) of a text file, in order: line i is entry i.

  The one reader of a whole prompt or caption file (`sid_jax.sample --prompts`, where seed s
  takes line s, and `sid_jax.evaluate --captions`, where image i pairs with line i):

  * lines end at `'\\n'`; a line loses its `'\\n'` or `'\\r\\n'` (so LF and CRLF files read
    alike), nothing else is stripped, and a lone `'\\r'` stays inside its line;
  * empty lines are kept as empty prompts, so line numbers never shift; a final newline does not
    start an extra, empty entry; an empty file has no entries;
  * a UTF-8 byte order mark at the start of the file is dropped;
  * text must be UTF-8: with `errors='strict'` (the default) a line that is not raises a
    ValueError naming the file and the line number. `errors='replace'` reads every line exactly
    as `PromptSource` (the training stream, which replaces invalid bytes by U+FFFD) does.

  Args:
    path: the text file.
    errors: 'strict' or 'replace' (how bytes that are not UTF-8 are handled).

  Returns:
    The prompts, one per line.

  Raises:
    FileNotFoundError: if `path` does not exist.
    ValueError: for a line that is not UTF-8 (errors='strict').
  """
  _check_file(path)
  with open(path, "rb") as f:
    data = f.read()
  if data.startswith(_UTF8_BOM):
    data = data[len(_UTF8_BOM):]
  if not data:
    return []
  lines = data.split(b"\n")
  if data.endswith(b"\n"):
    lines.pop()
  out = []
  for number, line in enumerate(lines, start=1):
    try:
      out.append(_decode_line(line, errors))
    except UnicodeDecodeError as e:
      raise ValueError(f"{path}, line {number}: not UTF-8 text ({e.reason} at byte {e.start} of "
                       "the line); save the file as UTF-8.") from None
  return out


# ---------------------------------------------------------------------------------------------
# Stores: N prompts addressable by index.
# ---------------------------------------------------------------------------------------------


class _Store:
  """N prompts with random access by index."""

  description: str = ""
  fingerprint: str = ""

  def __len__(self) -> int:
    raise NotImplementedError

  def get(self, indices: np.ndarray) -> list[str]:
    """The prompts at `indices` (int64, each in [0, N)), in that order."""
    raise NotImplementedError


def _scan_line_bounds(path: str) -> np.ndarray:
  """One streaming pass over `path`: int64 `bounds` with line `i` at bytes [bounds[i], bounds[i+1]).

  `bounds[:-1]` are the line start offsets and `bounds[-1]` is the file size, so the array has
  N + 1 entries for N lines (N = 0 for an empty file).
  """
  pieces = [np.zeros(1, np.int64)]
  offset = 0
  with open(path, "rb") as f:
    while True:
      chunk = f.read(_CHUNK_BYTES)
      if not chunk:
        break
      newlines = np.flatnonzero(np.frombuffer(chunk, np.uint8) == ord("\n"))
      pieces.append(newlines.astype(np.int64) + (offset + 1))
      offset += len(chunk)
  bounds = np.concatenate(pieces)
  if bounds[-1] != offset:  # The last line has no newline.
    bounds = np.append(bounds, np.int64(offset))
  return bounds


def _load_index_cache(cache_path: str, size: int, mtime_ns: int) -> np.ndarray | None:
  """The cached bounds if `cache_path` holds an index for a file of this size and mtime."""
  if not os.path.isfile(cache_path):
    return None
  try:
    arr = np.load(cache_path, allow_pickle=False)
  except (OSError, ValueError, EOFError) as e:
    logging.warning("Ignoring unreadable prompt index %s: %s", cache_path, e)
    return None
  if arr.dtype != np.int64 or arr.ndim != 1 or len(arr) < _INDEX_HEADER + 1:
    return None
  magic, cached_size, cached_mtime, n = (int(v) for v in arr[:_INDEX_HEADER])
  if (magic != _INDEX_MAGIC or cached_size != size or cached_mtime != mtime_ns
      or len(arr) != _INDEX_HEADER + n + 1):
    return None
  return arr[_INDEX_HEADER:]


def _save_index_cache(cache_path: str, bounds: np.ndarray, size: int, mtime_ns: int) -> bool:
  """Writes the index atomically (temporary file + rename); False if the directory refuses it."""
  header = np.array([_INDEX_MAGIC, size, mtime_ns, len(bounds) - 1], np.int64)
  directory = os.path.dirname(os.path.abspath(cache_path))
  tmp_path = None
  try:
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".prompt_index.", suffix=".npy")
    with os.fdopen(fd, "wb") as f:
      np.save(f, np.concatenate([header, bounds]), allow_pickle=False)
    os.chmod(tmp_path, 0o644)  # mkstemp makes it private; other users may share the cache.
    os.replace(tmp_path, cache_path)
    return True
  except OSError as e:
    logging.warning("Cannot cache the prompt index at %s (%s); keeping it in memory.",
                    cache_path, e)
    if tmp_path is not None and os.path.exists(tmp_path):
      try:
        os.remove(tmp_path)
      except OSError:
        pass
    return False


def load_line_index(path: str) -> np.ndarray:
  """Line bounds of the text file `path` (see `_scan_line_bounds`), from its cache if valid.

  The cache `<path>.idx.npy` is used when it was written for a file of the same size and
  modification time; otherwise the file is scanned and the cache (re)written if possible.

  Args:
    path: the text file.

  Returns:
    int64 array of N + 1 offsets.

  Raises:
    FileNotFoundError: if `path` does not exist.
  """
  _check_file(path)
  stat = os.stat(path)
  cache_path = path + INDEX_SUFFIX
  bounds = _load_index_cache(cache_path, stat.st_size, stat.st_mtime_ns)
  if bounds is not None:
    return bounds
  logging.info("Indexing the lines of %s (%d bytes).", path, stat.st_size)
  bounds = _scan_line_bounds(path)
  after = os.stat(path)
  if (after.st_size, after.st_mtime_ns) != (stat.st_size, stat.st_mtime_ns):
    raise RuntimeError(f"Prompt file changed while it was being indexed: {path}")
  _save_index_cache(cache_path, bounds, stat.st_size, stat.st_mtime_ns)
  return bounds


class _TextFileStore(_Store):
  """Lines of a UTF-8 text file, read by seeking to their cached start offsets."""

  def __init__(self, path: str):
    self.path = path
    self._bounds = load_line_index(path)
    size = int(self._bounds[-1])
    self._bom = 0
    if len(self._bounds) > 1:
      with open(path, "rb") as f:
        if f.read(len(_UTF8_BOM)) == _UTF8_BOM:
          self._bom = len(_UTF8_BOM)
    crc = zlib.crc32(np.ascontiguousarray(self._bounds).tobytes())
    self.description = f"text file {path}"
    self.fingerprint = f"text:lines={len(self)}:bytes={size}:crc32={crc:08x}"

  def __len__(self) -> int:
    return len(self._bounds) - 1

  def get(self, indices: np.ndarray) -> list[str]:
    out = [""] * len(indices)
    order = np.argsort(indices, kind="stable")  # Read front to back.
    with open(self.path, "rb") as f:
      for j in order:
        i = int(indices[j])
        start, end = int(self._bounds[i]), int(self._bounds[i + 1])
        if i == 0:
          start = min(start + self._bom, end)
        f.seek(start)
        out[j] = _decode_line(f.read(end - start))
    return out


class _InMemoryStore(_Store):
  """Prompts held as a Python list (used for tfds splits)."""

  def __init__(self, prompts: list[str], description: str, kind: str):
    self._prompts = prompts
    self.description = description
    crc = 0
    total = 0
    for p in prompts:
      raw = p.encode("utf-8", errors="replace")
      crc = zlib.crc32(raw + b"\0", crc)
      total += len(raw)
    self.fingerprint = f"{kind}:records={len(prompts)}:bytes={total}:crc32={crc:08x}"

  def __len__(self) -> int:
    return len(self._prompts)

  def get(self, indices: np.ndarray) -> list[str]:
    return [self._prompts[int(i)] for i in indices]


class _ArrayRecordStore(_Store):
  """Records of an ArrayRecord file, each the UTF-8 bytes of one prompt."""

  def __init__(self, path: str):
    _check_file(path)
    try:
      from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          f"Reading the prompt source {path} needs the `array_record` package "
          "(pip install array_record), which is not importable here.") from e
    self.path = path
    # No read-ahead: prompts are read at random positions.
    self._reader = array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0")
    self._n = int(self._reader.num_records())
    self.description = f"array_record file {path}"
    self.fingerprint = f"array_record:records={self._n}:bytes={os.path.getsize(path)}"

  def __len__(self) -> int:
    return self._n

  def get(self, indices: np.ndarray) -> list[str]:
    if not len(indices):
      return []
    records = self._reader.read([int(i) for i in indices])
    return [r.decode("utf-8", errors="replace") for r in records]


def parse_tfds_spec(spec: str) -> tuple[str, str, str | None]:
  """`tfds:NAME[/CONFIG]:SPLIT[:FEATURE]` -> (NAME[/CONFIG], SPLIT, FEATURE or None).

  SPLIT may use the tfds slicing syntax (`train[:10%]`, `train+validation`); a colon inside
  brackets belongs to the split.

  Args:
    spec: the source string, starting with `tfds:`.

  Returns:
    The builder name (with its config), the split and the feature (None for the default).

  Raises:
    ValueError: if the spec does not have the expected format.
  """
  bad = ValueError(f"Bad tfds prompt source {spec!r}: expected {TFDS_FORMAT}, e.g. "
                   "'tfds:my_prompts:train' or 'tfds:my_captions/cfg:validation:caption'.")
  if not spec.startswith(TFDS_PREFIX):
    raise bad
  rest = spec[len(TFDS_PREFIX):]
  # Colons outside brackets separate the fields.
  fields, depth, start = [], 0, 0
  for k, ch in enumerate(rest):
    if ch == "[":
      depth += 1
    elif ch == "]":
      depth -= 1
    elif ch == ":" and depth == 0:
      fields.append(rest[start:k])
      start = k + 1
  fields.append(rest[start:])
  if len(fields) not in (2, 3) or depth != 0 or not all(f.strip() for f in fields):
    raise bad
  name, split = fields[0].strip(), fields[1].strip()
  feature = fields[2].strip() if len(fields) == 3 else None
  if not re.fullmatch(r"[A-Za-z0-9_]+(/[A-Za-z0-9_.+-]+)?", name):
    raise bad
  if feature is not None and not _FEATURE_RE.fullmatch(feature):
    raise bad
  return name, split, feature


def _load_tfds_store(spec: str, data_dir: str | None) -> _InMemoryStore:
  """Reads every prompt of a prepared tfds split into memory (never downloads or prepares)."""
  name, split, feature = parse_tfds_spec(spec)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  where = data_dir or "the default tfds data_dir"
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except  # tfds raises several kinds.
    raise FileNotFoundError(
        f"No prepared tfds dataset {name!r} in {where} (prompt source {spec!r}): {e}") from e
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"The tfds dataset {name!r} is not prepared in {builder.data_dir} (prompt source "
        f"{spec!r}); prepare it beforehand, prompts are never downloaded.")
  features = builder.info.features
  names = list(features.keys()) if hasattr(features, "keys") else []
  if feature is None:
    feature = next((f for f in DEFAULT_TEXT_FEATURES if f in names), None)
    if feature is None:
      raise ValueError(f"The tfds dataset {name!r} has no 'text' or 'caption' feature (it has "
                       f"{names}); name one: {TFDS_FORMAT}.")
  elif feature not in names:
    raise ValueError(f"The tfds dataset {name!r} has no feature {feature!r} (it has {names}).")
  try:
    ds = builder.as_dataset(split=split, shuffle_files=False,
                            decoders=tfds.decode.PartialDecoding({feature: True}))
  except (ValueError, KeyError) as e:
    raise ValueError(f"Cannot read split {split!r} of the tfds dataset {name!r}: {e}") from e
  prompts = []
  for batch in tfds.as_numpy(ds.batch(4096)):
    for value in np.asarray(batch[feature]).reshape(-1):
      prompts.append(value.decode("utf-8", errors="replace") if isinstance(value, bytes)
                     else str(value))
  return _InMemoryStore(prompts, f"tfds split {spec} (data_dir={where})", "tfds")


def _open_store(source: str, data_dir: str | None) -> _Store:
  if source.startswith(TFDS_PREFIX):
    return _load_tfds_store(source, data_dir)
  if _ARRAY_RECORD_RE.search(source):
    return _ArrayRecordStore(source)
  return _TextFileStore(source)


# ---------------------------------------------------------------------------------------------
# The sampler.
# ---------------------------------------------------------------------------------------------


def _as_int(value: Any, field: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"PromptSource: {field!r} must be an integer, got {value!r}.")
  return int(value)


class PromptSource:
  """An infinite, seeded, host-sharded stream of prompts (see the module docstring).

  Example:
    src = PromptSource("aesthetics_6_plus.txt", seed=run_seed,
                       process_index=jax.process_index(), process_count=jax.process_count())
    prompts = src.next_batch(per_host_batch)   # list[str], this host's share of the step
    meta["prompts"] = src.state()              # JSON; later: src.restore(meta["prompts"])
  """

  def __init__(self, source: str, *, seed: int, process_index: int = 0,
               process_count: int = 1, shuffle: bool = True, data_dir: str | None = None):
    """Opens the prompt store.

    Args:
      source: a UTF-8 text file (one prompt a line), an `.array_record` file (one UTF-8 prompt a
        record) or `tfds:NAME[/CONFIG]:SPLIT[:FEATURE]` (a tfds split already prepared on disk,
        read whole into memory; FEATURE defaults to 'text', else 'caption').
      seed: the run seed (a non-negative integer); epoch `e` is ordered by
        `np.random.default_rng([seed, e])`.
      process_index: this host's index in [0, process_count).
      process_count: the number of hosts sharing the stream.
      shuffle: False keeps every epoch in file order.
      data_dir: the tfds data directory (tfds sources only; None for tfds' default).

    Raises:
      FileNotFoundError: the file (or the prepared tfds dataset) does not exist.
      ValueError: the source holds no prompt, or an argument is out of range.
    """
    seed = _as_int(seed, "seed")
    if seed < 0:
      raise ValueError(f"seed must be a non-negative integer, got {seed}.")
    if _as_int(process_count, "process_count") < 1:
      raise ValueError(f"process_count must be >= 1, got {process_count}.")
    if not 0 <= _as_int(process_index, "process_index") < process_count:
      raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}.")
    self.source = source
    self.seed = seed
    self.process_index = int(process_index)
    self.process_count = int(process_count)
    self.shuffle = bool(shuffle)
    self._store = _open_store(source, data_dir)
    self._n = len(self._store)
    if self._n == 0:
      raise ValueError(f"The prompt source {self._store.description} holds no prompt.")
    # Global positions covered by this host's stream; its next prompt is at position + index.
    self._position = 0
    self._perm_epoch: int | None = None
    self._perm: np.ndarray | None = None

  def __len__(self) -> int:
    """N, the number of prompts in one epoch."""
    return self._n

  def __repr__(self) -> str:
    return (f"PromptSource({self._store.description}, N={self._n}, seed={self.seed}, "
            f"host {self.process_index}/{self.process_count}, position={self._position})")

  @property
  def position(self) -> int:
    """Global positions covered so far (process_count x the prompts this host drew)."""
    return self._position

  @property
  def epoch(self) -> int:
    """The epoch of this host's next prompt."""
    return (self._position + self.process_index) // self._n

  @property
  def fingerprint(self) -> str:
    """Identifies the prompt store's content (count, size, checksum); not its path."""
    return self._store.fingerprint

  def _permutation(self, epoch: int) -> np.ndarray:
    if self._perm_epoch != epoch:
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(self._n)
      self._perm_epoch = epoch
    return self._perm

  def indices_at(self, positions: np.ndarray) -> np.ndarray:
    """Prompt indices at the given positions of the global sequence."""
    positions = np.asarray(positions, np.int64)
    epochs, offsets = np.divmod(positions, self._n)
    if not self.shuffle:
      return offsets
    out = np.empty_like(offsets)
    for e in np.unique(epochs):
      mask = epochs == e
      out[mask] = self._permutation(int(e))[offsets[mask]]
    return out

  def next_batch(self, n: int) -> list[str]:
    """This host's next `n` prompts; advances the stream.

    Args:
      n: the number of prompts (the per-host batch size).

    Returns:
      The prompts at global positions `position + process_index + process_count * k`,
      k = 0..n-1.
    """
    n = _as_int(n, "n")
    if n < 0:
      raise ValueError(f"next_batch needs n >= 0, got {n}.")
    positions = (self._position + self.process_index
                 + self.process_count * np.arange(n, dtype=np.int64))
    prompts = self._store.get(self.indices_at(positions))
    self._position += n * self.process_count
    return prompts

  def state(self) -> dict[str, Any]:
    """A JSON-serialisable snapshot; `restore` on an equal source resumes exactly."""
    return {
        "version": STATE_VERSION,
        "position": int(self._position),
        "seed": int(self.seed),
        "num_prompts": int(self._n),
        "process_count": int(self.process_count),
        "shuffle": bool(self.shuffle),
        "fingerprint": str(self._store.fingerprint),
    }

  def restore(self, state: dict[str, Any]) -> None:
    """Resumes from `state()` of a source over the same prompts, seed and host count.

    Args:
      state: a dict from `state()` (possibly after a JSON round trip).

    Raises:
      ValueError: a field is missing or does not match this source (the message names it).
    """
    required = ("version", "position", "seed", "num_prompts", "process_count", "shuffle",
                "fingerprint")
    missing = [k for k in required if k not in state]
    if missing:
      raise ValueError(f"Prompt source state lacks the field(s) {missing}.")
    if _as_int(state["version"], "version") != STATE_VERSION:
      raise ValueError(f"Prompt source state: 'version' {state['version']} is not "
                       f"{STATE_VERSION}.")
    mine = self.state()
    for field in ("num_prompts", "fingerprint", "seed", "shuffle", "process_count"):
      if state[field] != mine[field]:
        raise ValueError(
            f"Prompt source state mismatch in {field!r}: the state has {state[field]!r}, this "
            f"source ({self._store.description}) has {mine[field]!r}.")
    position = _as_int(state["position"], "position")
    if position < 0 or position % self.process_count:
      raise ValueError(f"Prompt source state: 'position' {position} is not a non-negative "
                       f"multiple of process_count={self.process_count}.")
    self._position = position

