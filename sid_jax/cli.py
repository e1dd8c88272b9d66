"""The one flag idiom of sid_jax's command-line tools (`sample`, `evaluate`, `convert`, `bench`).

Each tool defines its flags at import time on a `flags.FlagValues()` of its own (so importing
several tools never clashes), exposes `run(argv)` for in-process use (tests, notebooks: errors
are raised) and runs `main` under `absl.app` with `parser(...)`, which prints the tool's help and
leaves absl's own flags (--verbosity, ...) to absl. `report_errors` turns the errors a user can
fix into one line on stderr and exit status 2; the traceback is logged at debug verbosity.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from absl import flags, logging

HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull")


def parser(own: flags.FlagValues, doc: str) -> Callable[[list[str]], list[str]]:
  """An `app.run(flags_parser=...)` for a tool whose flags live in `own`."""

  def parse(argv: list[str]) -> list[str]:
    if any(a in HELP_FLAGS for a in argv[1:]):
      print(doc)
      print(own.get_help())
      sys.exit(0)
    return flags.FLAGS(own(argv, known_only=True))

  return parse


def quiet_parser(own: flags.FlagValues, doc: str, name: str) -> Callable[[list[str]], list[str]]:
  """`parser`, with a bad flag reported as one line (`name: error: ...`, exit status 2) and
  library INFO logs (Orbax's) shown only with an explicit --verbosity."""
  parse = parser(own, doc)

  def quiet(argv: list[str]) -> list[str]:
    try:
      args = parse(argv)
    except flags.Error as e:
      print(f"{name}: error: {e}", file=sys.stderr)
      sys.exit(2)
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    return args

  return quiet


def report_errors(name: str, fn: Callable[[], object],
                  errors: Sequence[type[BaseException]] = (ValueError, FileNotFoundError)):
  """Runs `fn`; an error of the given types exits with status 2 and one line naming the tool."""
  try:
    return fn()
  except tuple(errors) as e:
    logging.debug("%s stopped:", name, exc_info=True)  # the traceback, with --verbosity=1
    print(f"{name}: error: {e}", file=sys.stderr)
    sys.exit(2)
