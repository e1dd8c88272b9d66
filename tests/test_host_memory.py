"""Host memory: freed heap pages go back to the system, and the compiled iteration does it."""

import sys

import pytest

from sid_jax import host_memory
from sid_jax import run as run_lib

linux_only = pytest.mark.skipif(sys.platform != "linux",
                                reason="malloc_trim is glibc's (Linux)")


@linux_only
def test_release_returns_freed_heap_pages():
  chunk = 64 * 1024  # below glibc's mmap threshold: carved from the heap, kept there when freed
  blocks = [b"\x01" * chunk for _ in range(4000)]  # ~250 MiB, every page touched
  keep = b"\x02" * chunk  # allocated last: the freed blocks are not at the heap's top
  before_free = host_memory.rss_mb()
  del blocks
  after_free = host_memory.rss_mb()
  assert host_memory.release()
  after_release = host_memory.rss_mb()
  assert before_free - after_free < 50, (before_free, after_free)  # malloc kept the pages...
  assert after_free - after_release > 150, (after_free, after_release)  # ...release gave them back
  assert keep[0] == 2


def test_sizes_are_in_mib():
  now, peak = host_memory.rss_mb(), host_memory.peak_rss_mb()
  assert 10 < now <= peak + 1 < 1e6


def test_compile_train_step_releases_after_compiling(monkeypatch):
  events = []

  class Lowered:
    def compile(self):
      events.append("compile")
      return "compiled"

  monkeypatch.setattr(run_lib, "lower_train_step", lambda *args: Lowered())
  monkeypatch.setattr(host_memory, "release", lambda: events.append("release") or True)
  assert run_lib.compile_train_step(None, None, None, None) == "compiled"
  assert events == ["compile", "release"]
