"""Progress of long command-line work -- sampling many images, extracting features, reading a large
checkpoint -- as absl log lines with rate and ETA.

The line has the format of `main`'s progress line (clu's `ReportProgress`), with the unit named:

  sample: 41.2 images/s, 40.0% (400/1000), ETA: 0m14s
  sample: done, 1000 images in 24s (41.7 images/s)

A line is logged at most every `every_secs` seconds (0: at every update) and once at the end. The
rate and ETA count from the first update on (the first batch carries the compilation, which the
rest of the work does not repeat); the closing line gives the whole time. Logging, not a terminal bar: the lines read the same in a terminal, a log file and a
scheduler's output.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Iterator, TypeVar

from absl import logging

T = TypeVar("T")
DEFAULT_EVERY_SECS = 30.0


def format_secs(secs: float) -> str:
  """123456.7 -> '1d10h17m'; under an hour with seconds: 754 -> '12m34s'."""
  secs = max(0, int(round(secs)))
  days, rest = divmod(secs, 86400)
  hours, rest = divmod(rest, 3600)
  mins, secs = divmod(rest, 60)
  if days or hours:
    return (f"{days}d" if days else "") + f"{hours}h{mins:02d}m"
  return f"{mins}m{secs:02d}s"


def format_amount(value: float, unit: str) -> str:
  """A count in `unit`; bytes are shown in KiB/MiB/GiB."""
  if unit != "bytes":
    return f"{value:.3g}" if isinstance(value, float) else str(value)
  for scale, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
    if abs(value) >= scale:
      return f"{value / scale:.1f} {name}"
  return f"{int(value)} B"


class Progress:
  """Counts work done towards `total` and logs rate and ETA at a steady cadence.

  Args:
    what: the line's prefix (the tool or the step), e.g. 'sample'.
    total: the amount of work (None if unknown: no percentage or ETA).
    unit: what is counted, e.g. 'images', 'bytes'.
    every_secs: the least time between two lines (0: a line at every update).
    log: where lines go (absl's logging.info).
    clock: seconds (time.monotonic); for tests.
  """

  def __init__(self, what: str, total: int | None, unit: str = "images",
               every_secs: float = DEFAULT_EVERY_SECS, log: Callable[[str], None] | None = None,
               clock: Callable[[], float] = time.monotonic):
    if every_secs < 0:
      raise ValueError(f"every_secs must be >= 0, got {every_secs}.")
    self.what, self.total, self.unit, self.every_secs = what, total, unit, every_secs
    self._log = log or (lambda line: logging.info("%s", line))
    self._clock = clock
    self._start = self._clock()
    self._last = self._start
    self._first: tuple[float, int] | None = None  # (time, done) of the first update
    self.done = 0
    self._finished = False

  def _rate(self, rate: float) -> str:
    if self.unit == "bytes":
      return f"{format_amount(rate, self.unit)}/s"
    return f"{rate:.3g} {self.unit}/s"

  def line(self, now: float) -> str:
    """The progress line for the work done so far (rate since the first update)."""
    t0, done0 = self._first or (self._start, 0)
    rate = (self.done - done0) / max(now - t0, 1e-9)
    unit_rate = self._rate(rate)
    if self.total:
      done, total = format_amount(self.done, self.unit), format_amount(self.total, self.unit)
      eta = format_secs((self.total - self.done) / rate) if rate > 0 else "unknown"
      return (f"{self.what}: {unit_rate}, {100 * self.done / self.total:.1f}% ({done}/{total}), "
              f"ETA: {eta}")
    return f"{self.what}: {unit_rate}, {format_amount(self.done, self.unit)} so far"

  def update(self, done: int) -> None:
    """Records that `done` units (a running total) are finished; logs when it is time."""
    self.done = done
    now = self._clock()
    if self.total is not None and done >= self.total:
      self.finish()
    elif self._first is None:
      self._first, self._last = (now, done), now  # the rate starts here
    elif now - self._last >= self.every_secs:
      self._last = now
      self._log(self.line(now))

  def advance(self, n: int) -> None:
    """Records `n` more units."""
    self.update(self.done + n)

  def finish(self) -> None:
    """Logs the closing line (once): the amount, the time taken and the average rate."""
    if self._finished:
      return
    self._finished = True
    elapsed = max(self._clock() - self._start, 1e-9)
    amount = format_amount(self.done, self.unit) + ("" if self.unit == "bytes" else f" {self.unit}")
    self._log(f"{self.what}: done, {amount} in {format_secs(elapsed)} "
              f"({self._rate(self.done / elapsed)})")


def iterate(items: Iterable[T], progress: Progress, size: Callable[[T], int] = lambda _: 1
            ) -> Iterator[T]:
  """Yields `items`, advancing `progress` by `size(item)` after each one is consumed."""
  for item in items:
    yield item
    progress.advance(size(item))
