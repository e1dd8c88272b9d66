"""Progress lines (rate, ETA) of long command-line work: sid_jax.progress, and its use by `sample`,
`evaluate`'s feature extraction and `convert`'s pickle reader."""

import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest

from sid_jax import evaluate, progress
from sid_jax.evaluation import sources
from sid_jax.weights import pickles
from tests import configs_util

ROOT = configs_util.ROOT
DIGITS_GENERATOR = os.path.join(ROOT, "sid_jax", "assets", "digits_generator")
# "sample: 41.2 images/s, 40.0% (400/1000), ETA: 0m14s", as main's progress line.
LINE = re.compile(r"(?P<what>[^\]\s][^\]]*?): (?P<rate>[\d.e+]+) (?P<unit>\w+)/s, (?P<pct>[\d.]+)% "
                  r"\((?P<done>\d+)/(?P<total>\d+)\), ETA: (?P<eta>\S+)")


class _Clock:

  def __init__(self):
    self.t = 100.0

  def __call__(self):
    return self.t


def test_format_secs():
  assert progress.format_secs(0) == "0m00s"
  assert progress.format_secs(754) == "12m34s"
  assert progress.format_secs(3 * 3600 + 5 * 60 + 9) == "3h05m"
  assert progress.format_secs(123456.7) == "1d10h17m"


def test_lines_have_rate_and_eta_at_the_cadence():
  clock, lines = _Clock(), []
  p = progress.Progress("sample", 100, every_secs=10, log=lines.append, clock=clock)
  clock.t += 50  # loading and compiling, before the first batch: not in the rate
  p.update(10)
  assert lines == []  # the first update only starts the rate
  clock.t += 5
  p.update(20)
  assert lines == []  # under every_secs since the last line
  clock.t += 5
  p.update(30)  # 20 images in 10 s since the first update
  assert lines == ["sample: 2 images/s, 30.0% (30/100), ETA: 0m35s"]
  clock.t += 35
  p.update(100)
  assert lines[-1] == "sample: done, 100 images in 1m35s (1.05 images/s)"
  p.finish()
  assert len(lines) == 2  # the closing line once


def test_every_update_with_zero_secs_and_unknown_total():
  clock, lines = _Clock(), []
  p = progress.Progress("read", None, unit="bytes", every_secs=0, log=lines.append, clock=clock)
  p.update(0)  # the first update starts the rate; then every update logs
  for _ in range(3):
    clock.t += 1
    p.advance(3 * 2**20)
  assert lines == [f"read: 3.0 MiB/s, {n}.0 MiB so far" for n in (3, 6, 9)]
  with pytest.raises(ValueError, match="every_secs"):
    progress.Progress("x", 1, every_secs=-1)


def test_iterate_counts_what_is_consumed():
  clock, lines = _Clock(), []
  p = progress.Progress("x", 6, every_secs=0, log=lines.append, clock=clock)
  out = []
  for batch in progress.iterate([[1, 2], [3, 4], [5, 6]], p, size=len):
    clock.t += 1
    out.append(batch)
  assert out == [[1, 2], [3, 4], [5, 6]] and p.done == 6
  assert lines == ["x: 2 images/s, 66.7% (4/6), ETA: 0m01s", "x: done, 6 images in 0m03s "
                   "(2 images/s)"]


def test_sample_logs_rate_and_eta(tmp_path):
  # One device, so that --batch 4 is the batch (a mesh rounds it up to a multiple of its size).
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  out = subprocess.run([sys.executable, "-m", "sid_jax.sample", "--checkpoint", DIGITS_GENERATOR,
                        "--seeds", "0-11", "--batch", "4", "--progress_secs", "0", "--outdir",
                        str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [m for m in map(LINE.search, out.stderr.splitlines()) if m]
  assert [(m["what"], m["unit"], m["done"], m["total"]) for m in lines] == [
      ("sample", "images", "8", "12")]
  assert float(lines[0]["rate"]) > 0 and re.fullmatch(r"\d+m\d\ds", lines[0]["eta"])
  assert re.search(r"sample: done, 12 images in \d+m\d\ds \([\d.e+]+ images/s\)", out.stderr)
  assert len(os.listdir(tmp_path)) == 12


def test_evaluate_feature_batches_report_progress(tmp_path, monkeypatch):
  lines = []
  monkeypatch.setattr(progress.Progress, "__init__", _recording(lines))
  np.savez(tmp_path / "x.npz", arr_0=np.zeros((10, 8, 8, 3), np.uint8))
  source = sources.npz_source(str(tmp_path / "x.npz"), None)
  evaluate.FLAGS.unparse_flags()
  evaluate.FLAGS(["evaluate", "--batch=4"])
  try:
    batches = list(evaluate._batches_with_progress(source))  # pylint: disable=protected-access
  finally:
    evaluate.FLAGS.unparse_flags()
  assert [len(b) for b in batches] == [4, 4, 2]
  assert [m["done"] for m in map(LINE.search, lines) if m] == ["8"]
  assert lines[-1].startswith("evaluate: Inception features: done, 10 images in ")


def _recording(lines):
  original = progress.Progress.__init__

  def init(self, what, total, unit="images", every_secs=0, log=None, clock=None):
    del every_secs, log
    original(self, what, total, unit, every_secs=0, log=lines.append,
             **({"clock": clock} if clock else {}))

  return init


def test_large_pickles_report_bytes_read(tmp_path, monkeypatch):
  lines = []
  monkeypatch.setattr(progress.Progress, "__init__", _recording(lines))
  monkeypatch.setattr(pickles, "PROGRESS_MIN_BYTES", 0)
  import torch  # pylint: disable=g-import-not-at-top
  path = tmp_path / "t.pkl"
  # Storages over pickle's 64 KiB frames are read one by one: an update each.
  path.write_bytes(pickle.dumps({k: torch.full((100_000,), i) for i, k in enumerate("abc")}))
  out = pickles.load(path)
  assert sorted(out) == ["a", "b", "c"] and out["c"].sum() == 200_000
  assert any(re.fullmatch(r"reading t\.pkl: [\d.]+ \w+/s, [\d.]+% \(.+/.+\), ETA: \S+", line)
             for line in lines), lines
  assert lines[-1].startswith("reading t.pkl: done, ")
