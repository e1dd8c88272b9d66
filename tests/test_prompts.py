"""The SiD-LSG prompt source: text/tfds/array_record stores, seeded epochs, hosts, resumption."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from sid_jax.data import prompts

# A line per case: BOM, empty line, CRLF, lone '\r' inside a line, unicode, an invalid byte,
# spaces (kept), an empty CRLF line, and a last line without a newline.
TRICKY_BYTES = (b"\xef\xbb\xbfa cat\n"
                b"\n"
                b"CRLF line\r\n"
                b"in\rside\n"
                b"\xe6\x97\xa5\xe6\x9c\xac \xf0\x9f\x98\x80\n"
                b"bad \xff byte\n"
                b"  spaced  \n"
                b"\r\n"
                b"last no newline")
TRICKY_LINES = ["a cat", "", "CRLF line", "in\rside", "日本 😀", "bad \ufffd byte", "  spaced  ",
                "", "last no newline"]


def _write(path, data: bytes) -> str:
  with open(path, "wb") as f:
    f.write(data)
  return str(path)


def _numbered(tmp_path, n: int, name: str = "prompts.txt") -> str:
  return _write(tmp_path / name, "".join(f"p{i}\n" for i in range(n)).encode())


def _drain(src: prompts.PromptSource, total: int, batch: int) -> list[str]:
  out = []
  while len(out) < total:
    out += src.next_batch(batch)
  return out[:total]


def test_text_file_lines_read_back_exactly(tmp_path, monkeypatch):
  monkeypatch.setattr(prompts, "_CHUNK_BYTES", 5)  # Newlines and CRLFs straddle chunks.
  path = _write(tmp_path / "tricky.txt", TRICKY_BYTES)
  src = prompts.PromptSource(path, seed=0, shuffle=False)
  assert len(src) == len(TRICKY_LINES)
  assert src.next_batch(len(TRICKY_LINES)) == TRICKY_LINES
  assert src.next_batch(len(TRICKY_LINES)) == TRICKY_LINES  # Epoch 1 is the identity too.
  # The whole-file reader with errors='replace' reads what the training stream reads; by default
  # it refuses the invalid byte, naming the file and the line.
  assert prompts.read_prompt_lines(path, errors="replace") == TRICKY_LINES
  with pytest.raises(ValueError, match=r"tricky.txt, line 6: not UTF-8"):
    prompts.read_prompt_lines(path)
  # A final newline does not add a prompt; a lone newline is one empty prompt.
  assert prompts.read_prompt_lines(_write(tmp_path / "a.txt", b"x\n\ny\n")) == ["x", "", "y"]
  assert len(prompts.PromptSource(str(tmp_path / "a.txt"), seed=0)) == 3
  one = prompts.PromptSource(_write(tmp_path / "b.txt", b"\n"), seed=0)
  assert len(one) == 1 and one.next_batch(3) == ["", "", ""]


def test_missing_and_empty_sources_raise(tmp_path):
  missing = str(tmp_path / "nope.txt")
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    prompts.PromptSource(missing, seed=0)
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    prompts.read_prompt_lines(missing)
  empty = _write(tmp_path / "empty.txt", b"")
  with pytest.raises(ValueError, match="empty.txt"):
    prompts.PromptSource(empty, seed=0)
  assert prompts.read_prompt_lines(empty) == []
  with pytest.raises(ValueError, match="process_index"):
    prompts.PromptSource(_numbered(tmp_path, 3), seed=0, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="seed"):
    prompts.PromptSource(_numbered(tmp_path, 3), seed=-1)


def test_epochs_are_seeded_permutations(tmp_path):
  n = 10
  path = _numbered(tmp_path, n)
  a = _drain(prompts.PromptSource(path, seed=3), 5 * n, 4)
  b = _drain(prompts.PromptSource(path, seed=3), 5 * n, 4)
  c = _drain(prompts.PromptSource(path, seed=4), 5 * n, 4)
  assert a == b
  assert a != c
  everything = sorted(f"p{i}" for i in range(n))
  epochs = [a[e * n:(e + 1) * n] for e in range(5)]
  for e, epoch in enumerate(epochs):
    assert sorted(epoch) == everything  # Each prompt exactly once per epoch.
    expected = np.random.default_rng([3, e]).permutation(n)
    assert epoch == [f"p{i}" for i in expected]
  assert len({tuple(epoch) for epoch in epochs}) > 1  # Epochs are reshuffled.
  assert a[:n] != [f"p{i}" for i in range(n)]


def test_sequence_does_not_depend_on_batch_size(tmp_path):
  path = _numbered(tmp_path, 11)
  runs = [_drain(prompts.PromptSource(path, seed=7), 70, b) for b in (3, 5, 7)]
  assert runs[0] == runs[1] == runs[2]
  src = prompts.PromptSource(path, seed=7)
  mixed = src.next_batch(0) + src.next_batch(13) + src.next_batch(2) + src.next_batch(55)
  assert mixed == runs[0]


def test_hosts_split_the_global_sequence_round_robin(tmp_path):
  path = _numbered(tmp_path, 10)
  hosts = [prompts.PromptSource(path, seed=1, process_index=h, process_count=4)
           for h in range(4)]
  single = prompts.PromptSource(path, seed=1)
  for per_host in (3, 3, 1, 5, 3):  # Steps of varying batch size, crossing epochs.
    batches = [src.next_batch(per_host) for src in hosts]
    interleaved = [batches[h][k] for k in range(per_host) for h in range(4)]
    assert interleaved == single.next_batch(4 * per_host)
  # Lockstep hosts have equal states, covering what the single stream consumed.
  assert all(src.state() == hosts[0].state() for src in hosts)
  assert hosts[0].position == single.position == 4 * 15


def test_state_restore_resumes_exactly(tmp_path):
  path = _numbered(tmp_path, 10)
  src = prompts.PromptSource(path, seed=5)
  for _ in range(7):
    src.next_batch(3)
  state = json.loads(json.dumps(src.state()))
  assert state["position"] == 21 and state["seed"] == 5 and state["num_prompts"] == 10
  uninterrupted = src.next_batch(25)
  fresh = prompts.PromptSource(path, seed=5)
  fresh.restore(state)
  assert fresh.next_batch(25) == uninterrupted

  # Host 0's state restores every host of a lockstep multi-host run.
  hosts = [prompts.PromptSource(path, seed=5, process_index=h, process_count=2)
           for h in range(2)]
  for src_h in hosts:
    src_h.next_batch(6)
  saved = json.loads(json.dumps(hosts[0].state()))
  expected = hosts[1].next_batch(9)
  resumed = prompts.PromptSource(path, seed=5, process_index=1, process_count=2)
  resumed.restore(saved)
  assert resumed.next_batch(9) == expected


def test_restore_mismatch_names_the_field(tmp_path):
  path = _numbered(tmp_path, 10)
  src = prompts.PromptSource(path, seed=5)
  src.next_batch(4)
  state = json.loads(json.dumps(src.state()))
  with pytest.raises(ValueError, match="'seed'"):
    prompts.PromptSource(path, seed=6).restore(state)
  with pytest.raises(ValueError, match="'process_count'"):
    prompts.PromptSource(path, seed=5, process_count=2).restore(state)
  with pytest.raises(ValueError, match="'shuffle'"):
    prompts.PromptSource(path, seed=5, shuffle=False).restore(state)
  with pytest.raises(ValueError, match="'num_prompts'"):
    prompts.PromptSource(_numbered(tmp_path, 11, "other.txt"), seed=5).restore(state)
  # Same number of prompts, different content.
  same_n = _write(tmp_path / "same_n.txt", "".join(f"q{i}x\n" for i in range(10)).encode())
  with pytest.raises(ValueError, match="'fingerprint'"):
    prompts.PromptSource(same_n, seed=5).restore(state)
  with pytest.raises(ValueError, match="position"):
    prompts.PromptSource(path, seed=5).restore({k: v for k, v in state.items()
                                                if k != "position"})
  odd = dict(state, process_count=2, position=3)
  with pytest.raises(ValueError, match="multiple of process_count"):
    prompts.PromptSource(path, seed=5, process_count=2).restore(odd)


def test_line_index_is_cached_reused_and_rebuilt(tmp_path, monkeypatch):
  path = _numbered(tmp_path, 6)
  cache = path + prompts.INDEX_SUFFIX
  scans = []
  real_scan = prompts._scan_line_bounds  # pylint: disable=protected-access

  def counting_scan(p):
    scans.append(p)
    return real_scan(p)

  monkeypatch.setattr(prompts, "_scan_line_bounds", counting_scan)
  first = prompts.PromptSource(path, seed=0, shuffle=False).next_batch(6)
  assert first == [f"p{i}" for i in range(6)]
  assert len(scans) == 1 and os.path.isfile(cache)
  cached = np.load(cache)
  assert cached.dtype == np.int64
  np.testing.assert_array_equal(cached[-7:], [0, 3, 6, 9, 12, 15, 18])

  # Reused: no second scan, same prompts.
  assert prompts.PromptSource(path, seed=0, shuffle=False).next_batch(6) == first
  assert len(scans) == 1

  # Rebuilt when the file changes, even at equal size (the mtime differs).
  _write(path, "".join(f"r{i}\n" for i in range(6)).encode())
  stat = os.stat(path)
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  assert prompts.PromptSource(path, seed=0, shuffle=False).next_batch(2) == ["r0", "r1"]
  assert len(scans) == 2
  _write(path, b"a\nbb\n")
  assert prompts.PromptSource(path, seed=0, shuffle=False).next_batch(2) == ["a", "bb"]
  assert len(scans) == 3
  assert prompts.PromptSource(path, seed=0, shuffle=False).next_batch(2) == ["a", "bb"]
  assert len(scans) == 3


def test_line_index_in_memory_when_directory_is_not_writable(tmp_path, monkeypatch):
  path = _numbered(tmp_path, 4)

  def refuse(*args, **kwargs):
    raise PermissionError("read-only directory")

  monkeypatch.setattr(prompts.tempfile, "mkstemp", refuse)
  src = prompts.PromptSource(path, seed=0, shuffle=False)
  assert src.next_batch(4) == ["p0", "p1", "p2", "p3"]
  assert not os.path.exists(path + prompts.INDEX_SUFFIX)
  assert sorted(os.listdir(tmp_path)) == ["prompts.txt"]


def test_bad_tfds_spec_explains_the_format():
  for spec in ("tfds:", "tfds:name", "tfds:a:b:c:d", "tfds::train", "tfds:na me:train",
               "tfds:x:train[:3"):
    with pytest.raises(ValueError, match=r"tfds:NAME\[/CONFIG\]:SPLIT\[:FEATURE\]"):
      prompts.PromptSource(spec, seed=0)
  assert prompts.parse_tfds_spec("tfds:ds/cfg:train[:10%]:caption") == (
      "ds/cfg", "train[:10%]", "caption")
  assert prompts.parse_tfds_spec("tfds:ds:train+test") == ("ds", "train+test", None)


def test_tfds_source_reads_a_prepared_dataset(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  captions = ["a photo of a cat", "", "日本", "last"]

  # Not registered, so `tfds.builder` reads it back from its files alone (as it would a dataset
  # prepared elsewhere).
  class SidTinyPrompts(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Four captions and an integer feature that must not be decoded."""

    VERSION = tfds.core.Version("1.0.0")
    # tfds derives checksum paths from the code path through `importlib_resources`, which this
    # environment lacks; there is nothing to download anyway.
    code_path = None

    def _info(self):
      return self.dataset_info_from_configs(
          features=tfds.features.FeaturesDict({
              "caption": tfds.features.Text(),
              "label": tfds.features.Scalar(dtype=np.int64),
          }),
          disable_shuffling=True)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, caption in enumerate(captions):
        yield i, {"caption": caption, "label": i}

  data_dir = str(tmp_path / "tfds")
  SidTinyPrompts(data_dir=data_dir).download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))

  src = prompts.PromptSource("tfds:sid_tiny_prompts:train", seed=0, shuffle=False,
                             data_dir=data_dir)
  assert len(src) == 4
  assert src.next_batch(6) == captions + captions[:2]
  shuffled = prompts.PromptSource("tfds:sid_tiny_prompts:train:caption", seed=2,
                                  data_dir=data_dir)
  expected = np.random.default_rng([2, 0]).permutation(4)
  assert shuffled.next_batch(4) == [captions[i] for i in expected]
  sliced = prompts.PromptSource("tfds:sid_tiny_prompts:train[1:3]", seed=0, shuffle=False,
                                data_dir=data_dir)
  assert sliced.next_batch(2) == ["", "日本"]
  with pytest.raises(ValueError, match="'text'"):
    prompts.PromptSource("tfds:sid_tiny_prompts:train:text", seed=0, data_dir=data_dir)
  with pytest.raises(FileNotFoundError, match="no_such_prompts"):
    prompts.PromptSource("tfds:no_such_prompts:train", seed=0, data_dir=data_dir)


def _array_record_importable() -> bool:
  try:
    import array_record.python.array_record_module  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return True


def test_array_record_source(tmp_path, monkeypatch):
  path = str(tmp_path / "prompts.array_record")
  records = ["a red bus", "", "café ☕"]
  if _array_record_importable():
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for r in records:
      writer.write(r.encode("utf-8"))
    writer.write(b"bad \xff")
    writer.close()
    src = prompts.PromptSource(path, seed=0, shuffle=False)
    assert len(src) == 4
    assert src.next_batch(5) == records + ["bad \ufffd", "a red bus"]
    shuffled = prompts.PromptSource(path, seed=9)
    assert shuffled.next_batch(4) == [(records + ["bad \ufffd"])[i]
                                      for i in np.random.default_rng([9, 0]).permutation(4)]
  else:
    _write(path, b"not really an array_record file")
  # Without the package: a clear error naming it (simulated by hiding the modules).
  for name in ("array_record", "array_record.python", "array_record.python.array_record_module"):
    monkeypatch.setitem(sys.modules, name, None)
  with pytest.raises(ImportError, match="array_record"):
    prompts.PromptSource(path, seed=0)


def test_sample_prompts_and_evaluate_captions_are_read_by_one_function(tmp_path, monkeypatch):
  """`sid_jax.sample --prompts` and `sid_jax.evaluate --captions` read a file the same way: one
  entry per line, LF or CRLF, a leading BOM dropped, empty lines kept (line i = seed i = image i),
  no extra entry for the final newline, a lone CR kept inside its line, strict UTF-8."""
  from sid_jax import evaluate  # pylint: disable=g-import-not-at-top
  path = _write(tmp_path / "captions.txt", "\ufeffa cat\r\n\r\n  two dogs \nin\rside\r\n日本\r\n"
                .encode("utf-8"))
  expected = ["a cat", "", "  two dogs ", "in\rside", "日本"]
  calls = []
  reader = prompts.read_prompt_lines

  def spy(*args, **kwargs):
    calls.append(args)
    return reader(*args, **kwargs)

  monkeypatch.setattr(prompts, "read_prompt_lines", spy)
  assert prompts.read_prompt_lines(path) == evaluate.read_captions(path) == expected
  assert calls == [(path,), (path,)]  # evaluate's path goes through the same function
  bad = _write(tmp_path / "bad.txt", b"ok\r\n\r\nbad \xff\r\n")
  with pytest.raises(ValueError, match=r"bad.txt, line 3: not UTF-8"):
    prompts.read_prompt_lines(bad)
  with pytest.raises(evaluate.EvaluationError, match=r"--captions .*bad.txt, line 3: not UTF-8"):
    evaluate.read_captions(bad)
