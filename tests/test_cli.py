"""The command-line entry points: sid_jax.main (subprocess, as users run it) and sid_jax.bench."""

import json
import os
import subprocess
import sys

import jax
import pytest

from sid_jax import bench
from tests import configs_util

ROOT = configs_util.ROOT


def _run_main(*args, timeout=600):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "sid_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_main_runs_a_config_with_overrides(tmp_path):
  out = _run_main("--config=configs/gmm_sid.py:tiny", f"--workdir={tmp_path}",
                  "--config.training.num_steps=2", "--config.checkpoint.every_steps=1",
                  "--config.eval.num_samples=64", "--config.eval.batch=32")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "[sid_jax] done at step 2" in out.stdout
  config = json.load(open(tmp_path / "config.json"))
  assert config["training"]["num_steps"] == 2 and config["eval"]["batch"] == 32
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
  # The progress line (clu ReportProgress) with steps/s and ETA.
  assert "steps/s" in out.stderr and "ETA" in out.stderr


def test_main_rejects_a_bad_setting_by_name(tmp_path):
  out = _run_main("--config=configs/gmm_sid.py:tiny", f"--workdir={tmp_path}",
                  "--config.optim.gen_lr=-0.1")
  assert out.returncode != 0
  assert "config.optim.gen_lr must be positive" in out.stderr
  assert not os.path.exists(tmp_path / "checkpoints")


def test_bench_reports_the_numbers(capsys):
  config = configs_util.load("gmm_sid.py", "tiny", **{"eval.batch": 16})
  result = bench.benchmark(config, steps=1)
  for key in ("compile_seconds", "seconds_per_iteration", "generated_images_per_second",
              "train_images_per_second", "flops_per_iteration", "peak_host_memory_mb"):
    assert result[key] > 0, key
  assert result["devices"] == jax.device_count() and result["method"] == "sid"
  assert result["iteration_memory_mb"]["argument"] > 0  # XLA's buffer sizes
  json.dumps(result)  # one JSON line
  with pytest.raises(ValueError, match="--steps"):
    bench.benchmark(config, steps=0)
