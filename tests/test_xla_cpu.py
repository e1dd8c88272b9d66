"""sid_jax's XLA:CPU flag (sid_jax/xla_cpu.py): when it is added, and what it changes."""

import json
import os
import subprocess
import sys

import pytest

from sid_jax import xla_cpu

FLAG = f"{xla_cpu.YNN_FLAG}={xla_cpu.YNN_VALUE}"


def test_added_to_the_users_flags():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert xla_cpu.apply(env, jaxlib_version="0.10.2")
  assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {FLAG}"
  assert not xla_cpu.apply(env, jaxlib_version="0.10.2")  # once only
  empty = {}
  assert xla_cpu.apply(empty, jaxlib_version="0.10.2") and empty["XLA_FLAGS"] == FLAG


@pytest.mark.parametrize("env,version", [
    ({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="}, "0.10.2"),  # the user's choice
    ({"SID_JAX_XLA_CPU_DEFAULTS": "0"}, "0.10.2"),
    ({"SID_JAX_XLA_CPU_DEFAULTS": "off", "XLA_FLAGS": "--a=1"}, "0.10.2"),
    ({"XLA_FLAGS": "--a=1"}, "0.11.0"),  # untested jaxlib: the flag may not exist there
    ({}, ""),
])
def test_left_alone(env, version):
  before = dict(env)
  assert not xla_cpu.apply(env, jaxlib_version=version)
  assert env == before


_PROBE = r"""
import json, os, re
import sid_jax
import jax, jax.numpy as jnp
x, w = jnp.ones((2, 16, 16, 32)), jnp.ones((3, 3, 32, 32))  # YNNPACK skips tiny ones
f = lambda x, w: jnp.sum(jax.lax.conv_general_dilated(
    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) ** 2)
text = jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, w).compile().as_text()
# Computations that XLA hands to YNNPACK, and which of them hold a convolution.
ynn = {re.search(r"calls=%?([\w.\-]+)", line).group(1) for line in text.splitlines()
       if '"kind":"__ynn_fusion"' in line and "calls=" in line}
bodies = dict(re.findall(r"^%?([\w.\-]+) \([^\n]*\{\n(.*?)\n\}", text, re.M | re.S))
print(json.dumps({"flags": os.environ.get("XLA_FLAGS", ""),
                  "ynn_convolutions": sum("convolution(" in bodies.get(c, "") for c in ynn),
                  "convolutions": text.count(" convolution(")}))
"""


def _probe(**env):
  environ = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
  environ.update(env, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _PROBE], env=environ, capture_output=True,
                       text=True, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def test_convolutions_leave_ynnpack_only_with_the_flag():
  ours = _probe()
  assert FLAG in ours["flags"]
  assert ours["convolutions"] >= 3 and ours["ynn_convolutions"] == 0
  default = _probe(SID_JAX_XLA_CPU_DEFAULTS="0")
  assert FLAG not in default["flags"]
  assert default["ynn_convolutions"] >= 3  # XLA's default: YNNPACK runs the convolutions
