"""The one flag and error idiom of sid_jax's command-line tools (`main`, `sample`, `evaluate`,
`convert`, `export`, `plan`, `bench`).

Each tool defines its flags at import time on a `flags.FlagValues()` of its own (so importing
several tools never clashes; `main` uses absl's global FLAGS), exposes `run(argv)` for in-process
use (tests, notebooks: errors are raised) and runs `main` under `absl.app` with `parser(...)`,
which prints the tool's help and leaves absl's own flags (--verbosity, ...) to absl.

Errors a user can fix print ONE line, `sid_jax.TOOL: error: <what, naming the setting or file>`,
and exit with status 2; the traceback is printed only with `--verbosity=1` (or higher):

* a bad command line (an unknown flag, a value of the wrong type, an unknown `--config.KEY`
  override, a config file that does not load): `parser` / `quiet_parser`;
* an error of the tool's own checks (ValueError and its subclasses, FileNotFoundError, ...):
  `report_errors`.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from typing import Callable, Sequence

from absl import flags, logging

from sid_jax import progress

HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull")
EXIT_USER_ERROR = 2


def debug_requested(argv: Sequence[str] | None = None) -> bool:
  """Whether the user asked for tracebacks: --verbosity (or -v) of 1 or more, parsed or, before
  parsing succeeded, as written in `argv`."""
  if flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].present:
    return flags.FLAGS.verbosity >= 1
  args = list(sys.argv if argv is None else argv)
  for i, arg in enumerate(args):
    m = re.fullmatch(r"--?(?:verbosity|v)(?:=(-?\d+))?", arg)
    if m:
      value = m.group(1) if m.group(1) is not None else (args[i + 1] if i + 1 < len(args)
                                                          else "")
      if re.fullmatch(r"-?\d+", value) and int(value) >= 1:
        return True
  return False


def fail(name: str, message: str, argv: Sequence[str] | None = None):
  """Prints `name: error: message` (the traceback first, with --verbosity >= 1) and exits with
  status 2."""
  if debug_requested(argv) and sys.exc_info()[0] is not None:
    traceback.print_exc()
  print(f"{name}: error: {message}", file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def _config_flag_names(argv: Sequence[str]) -> list[str]:
  return [a[2:].split("=", 1)[0] for a in argv if a.startswith("--") and "." in a.split("=")[0]]


def _parse_error(e: Exception, argv: Sequence[str]) -> str:
  """One line for an exception raised while parsing `argv` (absl or ml_collections)."""
  if isinstance(e, flags.Error):
    return str(e)
  text = str(e.args[0]) if e.args else str(e)
  if isinstance(e, (AttributeError, KeyError)):  # ml_collections: an unknown override key
    names = _config_flag_names(argv)
    hint = re.search(r'Did you mean \\?"([^"\\]+)', text)
    for key in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text):
      for name in names:
        if key in name.split(".")[1:]:
          return (f"--{name}: the config has no setting {key!r}"
                  + (f" (did you mean {hint.group(1)!r}?)" if hint else "")
                  + "; see the config file for its settings.")
    return f"unknown config setting: {' '.join(text.split())}."
  configs = [a for a in argv if re.match(r"--\w+=\S+\.py", a)]
  where = f"{configs[0]}: " if configs else ""
  cause = e.__cause__ or e.__context__
  detail = f"{e}" + (f" ({cause})" if cause is not None and str(cause) not in str(e) else "")
  return f"{where}{type(e).__name__}: {' '.join(detail.split())}"


def guarded(parse: Callable[[list[str]], list[str]], name: str
            ) -> Callable[[list[str]], list[str]]:
  """`parse`, with every error of the command line reported by `fail` (one line, exit 2)."""

  def parse_or_exit(argv: list[str]) -> list[str]:
    try:
      return parse(argv)
    except SystemExit:
      raise
    except Exception as e:  # pylint: disable=broad-except
      fail(name, _parse_error(e, argv), argv)

  return parse_or_exit


def parser(own: flags.FlagValues | None, doc: str, name: str | None = None
           ) -> Callable[[list[str]], list[str]]:
  """An `app.run(flags_parser=...)` for a tool whose flags live in `own` (None: absl's global
  FLAGS). With `name`, errors of the command line are one line (see `guarded`)."""

  def parse(argv: list[str]) -> list[str]:
    if any(a in HELP_FLAGS for a in argv[1:]):
      print(doc)
      print((own or flags.FLAGS).get_help())
      sys.exit(0)
    if own is None:
      return flags.FLAGS(argv)
    return flags.FLAGS(own(argv, known_only=True))

  return guarded(parse, name) if name else parse


class _ProgressAndWarnings:
  """A log filter: warnings, errors and the progress lines of `sid_jax.progress` only."""

  def filter(self, record) -> bool:
    return (record.levelno >= 30
            or os.path.abspath(record.pathname) == os.path.abspath(progress.__file__))


def quiet_parser(own: flags.FlagValues, doc: str, name: str) -> Callable[[list[str]], list[str]]:
  """`parser`, with a bad flag reported as one line (`name: error: ...`, exit status 2) and
  INFO logs (Orbax's, ~20 lines a checkpoint) shown only with an explicit --verbosity; the
  progress lines (rate, ETA) of long work are always shown."""
  parse = parser(own, doc, name)

  def quiet(argv: list[str]) -> list[str]:
    args = parse(argv)
    if not flags.FLAGS["verbosity"].present:
      logging.get_absl_handler().addFilter(_ProgressAndWarnings())
    return args

  return quiet


def loaded_config(get: Callable[[], object], flag: str = "--config"):
  """The value of a config flag; a config file that did not load (ml_collections defers that
  error to the first use of the config) raises one ValueError naming the flag and the cause."""
  try:
    config = get()
    getattr(config, "keys")  # a failed load answers any attribute with its error
  except OSError as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    raise ValueError(f"{flag}: the config file did not load: {lines[-1]}") from None
  return config


def report_errors(name: str, fn: Callable[[], object],
                  errors: Sequence[type[BaseException]] = (ValueError, FileNotFoundError)):
  """Runs `fn`; an error of the given types exits with status 2 and one line naming the tool
  (`fail`: the traceback too with --verbosity >= 1)."""
  try:
    return fn()
  except tuple(errors) as e:
    fail(name, str(e))


def parse_seeds(text: str) -> list[int]:
  """'0-3,7,10-11' -> [0, 1, 2, 3, 7, 10, 11]."""
  seeds = []
  for part in text.split(","):
    part = part.strip()
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
    if not m:
      raise ValueError(f"Bad --seeds entry {part!r}: use e.g. 0-49999 or 1,5,9.")
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    if hi < lo:
      raise ValueError(f"Bad --seeds range {part!r}: the end is before the start.")
    seeds.extend(range(lo, hi + 1))
  if not seeds:
    raise ValueError("--seeds is empty.")
  return seeds
