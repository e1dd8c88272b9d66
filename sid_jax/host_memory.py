"""The process's host memory: resident and peak sizes, and handing freed heap pages back.

XLA's compiler allocates and frees on the order of a gigabyte of small objects while it compiles
a SiD iteration (measured: +1.1 GiB on `configs/bench.py:A`). glibc's malloc keeps those freed
pages in its arenas, and the iteration's own buffers, allocated afterwards, are large enough to be
mapped separately rather than carved from them; so without help the process carries the
compiler's high-water mark *plus* the iteration's buffers for the rest of the run (2.5 GiB on A,
of which ~0.7 GiB free heap). `release()` asks glibc to return free heap pages to the system
(`malloc_trim(0)`); `run.compile_train_step` calls it after each compile.

Other C libraries (macOS, musl) have no `malloc_trim`; there `release()` does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import resource
import sys

import psutil


@functools.cache
def _malloc_trim():
  """glibc's `malloc_trim`, or None where the C library has none."""
  name = ctypes.util.find_library("c")
  if sys.platform != "linux" or name is None:
    return None
  try:
    fn = ctypes.CDLL(name).malloc_trim
  except (OSError, AttributeError):
    return None
  fn.argtypes = [ctypes.c_size_t]
  fn.restype = ctypes.c_int
  return fn


def release() -> bool:
  """Returns the heap's free pages to the system; True when the C library could do it."""
  fn = _malloc_trim()
  if fn is None:
    return False
  fn(0)
  return True


def peak_rss_mb() -> float:
  """The process's peak resident memory so far, MiB."""
  kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return kb / 1024.0 if sys.platform != "darwin" else kb / 2**20  # macOS reports bytes


def rss_mb() -> float:
  """The process's resident memory now, MiB."""
  return psutil.Process().memory_info().rss / 2**20
