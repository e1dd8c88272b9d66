"""The command-line entry points: sid_jax.main (subprocess, as users run it) and sid_jax.bench."""

import collections
import json
import os
import pickle
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from sid_jax import bench, evaluate, export, sample
from sid_jax.convert import __main__ as convert_main
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
  assert out.returncode == 2
  assert "Traceback" not in out.stderr  # the check's own clear error, as one line
  assert ("sid_jax.main: error: config.optim.gen_lr must be positive, got -0.1.\n"
          in out.stderr)
  assert not os.path.exists(tmp_path / "checkpoints")


def test_bench_reports_the_numbers(capsys):
  config = configs_util.load("gmm_sid.py", "tiny", **{"eval.batch": 16})
  result = bench.benchmark(config, steps=1)
  for key in ("compile_seconds", "seconds_per_iteration", "generated_images_per_second",
              "train_images_per_second", "flops_per_iteration", "peak_host_memory_mb"):
    assert result[key] > 0, key
  assert result["devices"] == jax.device_count() and result["method"] == "sid"
  assert result["iteration_memory_mb"]["argument"] > 0  # XLA's buffer sizes
  host = result["host_memory_mb"]
  assert 0 < host["after_compile"] <= host["peak_training"] <= result["peak_host_memory_mb"]
  assert 0 < host["after_iterations"] <= host["peak_training"]
  assert result["xla_flags"] == os.environ.get("XLA_FLAGS", "")  # the flags the timing ran under
  json.dumps(result)  # one JSON line
  with pytest.raises(ValueError, match="--steps"):
    bench.benchmark(config, steps=0)


# ---------------------------------------------------------------------------------------------
# Errors for people: one line `sid_jax.TOOL: error: ...` naming the setting or file, a non-zero
# exit, and the traceback only with --verbosity=1.
# ---------------------------------------------------------------------------------------------

DIGITS_GENERATOR = os.path.join(ROOT, "sid_jax", "assets", "digits_generator")


def _tool(module, *args, timeout=300):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _one_error_line(out, tool, *needles):
  """The run failed with one stderr line `sid_jax.TOOL: error: ...` holding every needle."""
  assert out.returncode != 0
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  lines = [l for l in out.stderr.splitlines() if l.startswith(f"{tool}: error: ")]
  assert len(lines) == 1, out.stderr[-3000:]
  for needle in needles:
    assert needle in lines[0], lines[0]
  return lines[0]


def test_main_names_an_unknown_override_key(tmp_path):
  out = _tool("sid_jax.main", "--config=configs/gmm_sid.py:tiny", f"--workdir={tmp_path}",
              "--config.training.foo=1")
  assert out.returncode == 2
  _one_error_line(out, "sid_jax.main", "--config.training.foo", "no setting 'foo'")
  out = _tool("sid_jax.main", "--config=configs/gmm_sid.py:tiny", f"--workdir={tmp_path}",
              "--config.trainin.num_steps=1")
  _one_error_line(out, "sid_jax.main", "--config.trainin.num_steps", "did you mean 'training'")
  # The traceback only on request.
  out = _tool("sid_jax.main", "--config=configs/gmm_sid.py:tiny", f"--workdir={tmp_path}",
              "--config.foo=1", "--verbosity=1")
  assert out.returncode == 2 and "Traceback" in out.stderr
  assert "sid_jax.main: error: --config.foo: the config has no setting 'foo'" in out.stderr


def test_main_names_a_missing_config_file(tmp_path):
  out = _tool("sid_jax.main", "--config=configs/no_such_config.py", f"--workdir={tmp_path}")
  _one_error_line(out, "sid_jax.main", "--config", "configs/no_such_config.py")


def test_plan_names_an_unknown_override_key():
  out = _tool("sid_jax.plan", "--config=configs/gmm_sid.py:tiny", "--config.model.foo=3")
  _one_error_line(out, "sid_jax.plan", "--config.model.foo", "no setting 'foo'")


def test_sample_errors_are_one_line(tmp_path, capsys):
  # A bad flag value (the parser) and the command's own clear checks (a bad seed range).
  out = _tool("sid_jax.sample", "--checkpoint", DIGITS_GENERATOR, "--batch=many",
              "--outdir", tmp_path)
  assert out.returncode == 2
  _one_error_line(out, "sid_jax.sample", "--batch=many")
  code, err = _sample_main(capsys, "--checkpoint", DIGITS_GENERATOR, "--seeds", "5-3",
                           "--outdir", tmp_path)
  assert code == 2 and err == ("sid_jax.sample: error: Bad --seeds range '5-3': the end is "
                               "before the start.\n")


def _sample_main(capsys, *args):
  sample.FLAGS.unparse_flags()
  try:
    sample.FLAGS(["sample", *map(str, args)])
    with pytest.raises(SystemExit) as e:
      sample.main(["sample"])
  finally:
    sample.FLAGS.unparse_flags()
  return e.value.code, capsys.readouterr().err


def test_sample_refuses_batch_zero(tmp_path, capsys):
  code, err = _sample_main(capsys, "--checkpoint", DIGITS_GENERATOR, "--batch", "0",
                           "--outdir", tmp_path)
  assert code == 2 and err == "sid_jax.sample: error: --batch must be positive, got 0.\n"
  assert not os.path.exists(tmp_path / "000000.png")


def test_a_corrupted_network_json_is_named(tmp_path, capsys):
  gen = tmp_path / "gen"
  shutil.copytree(DIGITS_GENERATOR, gen)
  (gen / "network.json").write_text('{"class_name": "EDMPrecond", "kwargs": {')
  code, err = _sample_main(capsys, "--checkpoint", gen, "--outdir", tmp_path / "out")
  assert code == 2 and err.count("\n") == 1
  assert err.startswith(f"sid_jax.sample: error: {gen / 'network.json'} is not valid JSON")
  export.FLAGS.unparse_flags()
  try:
    export.FLAGS(["export", "--checkpoint", str(gen), "--dst", str(tmp_path / "g.pt")])
    with pytest.raises(SystemExit) as e:
      export.main(["export", "edm"])
  finally:
    export.FLAGS.unparse_flags()
  assert e.value.code == 2
  export_err = capsys.readouterr().err
  assert export_err.startswith("sid_jax.export: error: ") and "network.json" in export_err


def test_evaluate_names_an_empty_ref(tmp_path, capsys):
  np.savez(tmp_path / "fake.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
  (tmp_path / "empty.npz").write_bytes(b"")
  (tmp_path / "garbage.npz").write_bytes(b"PK\x03\x04 not really a zip")
  for ref in ("empty.npz", "garbage.npz"):
    evaluate.FLAGS.unparse_flags()
    try:
      evaluate.FLAGS(["evaluate", "--npz", str(tmp_path / "fake.npz"), "--ref",
                      str(tmp_path / ref), "--inception", "unused.pth"])
      with pytest.raises(SystemExit) as e:
        evaluate.main(["evaluate"])
    finally:
      evaluate.FLAGS.unparse_flags()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"sid_jax.evaluate: error: --ref {tmp_path / ref} is not readable "
                          "reference statistics")


@pytest.mark.parametrize("content", [b"", b"\x80\x04garbage" * 7, "truncated"])
def test_convert_names_a_bad_pickle(content, tmp_path, capsys):
  src = tmp_path / "net.pkl"
  if content == "truncated":
    content = pickle.dumps({"ema": collections.OrderedDict(a=np.arange(3.0))}, protocol=4)[:-7]
  src.write_bytes(content)
  code = convert_main.main(["edm", "--src", str(src), "--dst", str(tmp_path / "out")])
  out, err = capsys.readouterr()
  assert code == 1 and out == "" and err.count("\n") == 1, err
  assert err.startswith(f"sid_jax.convert: error: {src}")
  assert not os.path.exists(tmp_path / "out")
