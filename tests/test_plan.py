"""`python -m sid_jax.plan`: the iteration compiled from shapes only, for this host's devices and
for a TPU topology (abstract TPU devices from libtpu, on these CPUs)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from sid_jax import plan as plan_lib
from sid_jax import run as run_lib
from tests import configs_util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gmm(**overrides):
  return configs_util.load("gmm_sid.py", "tiny", **{"mesh.fsdp_min_size": 0, **overrides})


def _real_bytes_per_device(tree) -> int:
  """Bytes of the first device's shards of real arrays."""
  return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))


def test_local_plan_matches_the_real_run_on_the_same_mesh(tmp_path):
  config = _gmm(**{"mesh.data": 2, "mesh.fsdp": 4})
  p = plan_lib.run(config, "local", device_memory_gib=1.0, json_path=str(tmp_path / "p.json"))
  assert p.num_devices == 8 and p.mesh == {"data": 2, "fsdp": 4}
  assert (p.global_batch, p.micro_batch, p.num_micro) == (32, 16, 2)
  # The per-device bytes of the plan are those of a real run's state and teacher.
  run = run_lib.build_run(config)
  state = run_lib.initial_state(run)
  for part in plan_lib.STATE_PARTS:
    assert p.state[part] == _real_bytes_per_device(getattr(state, part)), part
  assert p.teacher == _real_bytes_per_device(run_lib.teacher_on_mesh(run))
  assert p.state["generator"] > 0 and p.xla["temp"] > 0 and p.total > 0
  assert p.fits is True and p.device_memory == 2**30
  assert p.flops > 0 and p.flops_per_image == pytest.approx(p.flops * 8 / 32)
  # --shapes_only takes its FLOPs from the traced (unoptimised) program: the same work.
  shapes = plan_lib.make_plan(config, jax.devices(), shapes_only=True)
  assert shapes.flops_per_image == pytest.approx(p.flops_per_image, rel=0.1)
  assert shapes.state == p.state and shapes.xla is None
  saved = json.load(open(tmp_path / "p.json"))
  assert saved["state"] == p.state and saved["total"] == p.total
  # Every splittable leaf is split: only the step counters stay whole.
  u = p.unsharded["state"]
  assert u["below_fsdp_min_size"]["count"] == 0 and u["scalars"] == 4
  odd = {o["leaf"] for o in u["no_dimension_divisible_by_fsdp"]}
  assert odd and all("bias" in name for name in odd)  # the 1-channel output biases


def test_plan_reports_when_it_does_not_fit():
  p = plan_lib.make_plan(_gmm(**{"mesh.data": 8}), jax.devices(), device_memory=1024)
  assert p.fits is False and p.total > 1024
  assert "fits NO" in plan_lib.format_plan(p)


def test_tiny_config_plans_for_a_tpu_topology():
  try:
    import libtpu  # noqa: F401  pylint: disable=unused-import
  except ImportError as e:
    pytest.skip(f"libtpu cannot be imported ({e}); install it with pip install -e .[tpu]")
  devices = plan_lib.target_devices("tpu:v5e:2x2")
  assert len(devices) == 4 and devices[0].platform == "tpu"
  config = _gmm(**{"mesh.data": 2, "mesh.fsdp": 2})
  run = run_lib.build_run(config, devices, abstract=True)
  assert run.setup.unroll_micro is False  # the loop a TPU runs, though compiled on a CPU host
  p = plan_lib.make_plan(config, devices, target="tpu:v5e:2x2")
  assert p.device_kind == "TPU v5 lite" and p.device_memory == 16 * 2**30
  assert p.fits is True and p.xla["temp"] > 0 and p.xla["argument"] > 0
  assert p.flops > 0 and p.seconds > 0 and p.images_per_second_per_chip > 0
  # Split over fsdp=2: half of the generator's float32 elements per device, plus the
  # indivisible 1-element biases whole.
  total = sum(int(np.prod(l.shape)) for l in jax.tree.leaves(run.init_params)) * 4
  assert total / 2 <= p.state["generator"] < total / 2 + 64


def test_full_size_stable_diffusion_builds_from_shapes_without_any_file():
  config = configs_util.load("sid_lsg.py", "teacher=sd15,kappa=1.5", **{"mesh.data": 1})
  assert not config.teacher.checkpoint and not config.lsg.prompts
  run = run_lib.build_run(config, jax.devices()[:1], abstract=True)
  unet = sum(int(np.prod(l.shape)) for l in jax.tree.leaves(run.init_params))
  assert unet == 859_520_964  # SD 1.5's UNet
  assert run.feed.abstract()["fake"].shape == (32, 16, 77)
  with pytest.raises(RuntimeError, match="abstract"):
    run.feed.next()
  # --shapes_only: the sharded state and teacher in seconds, a lower bound on memory.
  config = configs_util.load("sid_lsg.py", "teacher=sd15,kappa=1.5", **{"mesh.fsdp": 8})
  p = plan_lib.make_plan(config, jax.devices(), shapes_only=True, device_memory=100 * 2**30)
  assert p.method == "shapes" and p.xla is None and p.fits is None  # a lower bound cannot say yes
  assert unet * 4 / 8 <= p.state["generator"] < unet * 4 / 8 + 0.2 * 2**30
  assert 0 <= p.total - sum(p.state.values()) - p.teacher <= 16  # + the step counters
  small = plan_lib.make_plan(config, jax.devices(), shapes_only=True, device_memory=2**30)
  assert small.fits is False
  assert "lower bound" in plan_lib.format_plan(p)


@pytest.mark.parametrize("args, message", [
    (["--target=gpu:h100"], "expected 'local' or 'tpu:TOPOLOGY'"),
    (["--target=local", "--device_memory_gib=-1"], "must be positive"),
])
def test_cli_refuses_bad_flags(args, message):
  out = subprocess.run([sys.executable, "-m", "sid_jax.plan", "--config=configs/gmm_sid.py:tiny",
                        *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 2, out.stderr[-2000:]
  assert "sid_jax.plan: error:" in out.stderr and message in out.stderr


def test_parts_plan_agrees_with_the_whole_iteration():
  """--parts: the two updates compiled apart. FLOPs add up to the whole iteration's (within the
  EMA's share) and memory is of the same order."""
  config = _gmm(**{"mesh.data": 2, "mesh.fsdp": 4})
  whole = plan_lib.make_plan(config, jax.devices())
  parts = plan_lib.make_plan(config, jax.devices(), parts=True)
  assert parts.method == "parts" and set(parts.parts) == {"fake_score_update", "generator_update"}
  assert parts.state == whole.state and parts.teacher == whole.teacher
  assert parts.flops == pytest.approx(whole.flops, rel=0.05)
  assert parts.total == max(v["total"] for v in parts.parts.values()) + parts.state["generator"]
  assert "fake score update" in plan_lib.format_plan(parts)
