"""XLA:CPU settings that sid_jax applies before JAX starts its CPU backend.

Measured on the project's 2-core AMD EPYC (AVX2) machine with jaxlib 0.10.2
(`python -m sid_jax.bench --config=configs/bench.py:A|B|C`): XLA's default hands convolutions to
YNNPACK, which runs this workload's 3×3 convolutions 1.5–3× slower than XLA's own (Eigen)
convolutions, forward and backward; YNNPACK's reductions and matmuls are faster than XLA's own.
So sid_jax keeps YNNPACK for reductions and dots and leaves convolutions to XLA
(A 2.63 → 1.54 s per iteration, C 0.53 → 0.40 s).

The setting is a flag in `XLA_FLAGS`, read once when JAX creates its CPU client, so it must be in
the environment before the first computation; `import sid_jax` adds it there. It is left alone
when the user's `XLA_FLAGS` already sets it, when `SID_JAX_XLA_CPU_DEFAULTS=0`, and for a jaxlib
other than the tested series (an unknown flag makes XLA abort). GPU and TPU compilers ignore it.
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import MutableMapping

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
# What YNNPACK still takes: reductions and dot fusions (not convolutions, not element-wise).
YNN_VALUE = "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_DOT"
TESTED_JAXLIB = ("0.10.",)
OPT_OUT = "SID_JAX_XLA_CPU_DEFAULTS"


def _jaxlib_version() -> str | None:
  try:
    return importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return None


def apply(environ: MutableMapping[str, str] | None = None,
          jaxlib_version: str | None = None) -> bool:
  """Adds sid_jax's XLA:CPU flag to `environ["XLA_FLAGS"]`; returns whether it did."""
  environ = os.environ if environ is None else environ
  if environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
    return False
  flags = environ.get("XLA_FLAGS", "")
  if YNN_FLAG.lstrip("-") in flags:  # the user's own choice wins
    return False
  version = _jaxlib_version() if jaxlib_version is None else jaxlib_version
  if not version or not version.startswith(TESTED_JAXLIB):
    return False
  environ["XLA_FLAGS"] = f"{flags} {YNN_FLAG}={YNN_VALUE}".strip()
  return True
