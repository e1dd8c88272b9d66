"""Resuming (tiny GMM runs): which changed settings are refused and which are allowed, the
deliberate override, the teacher's path and hash, records of replayed steps in metrics.jsonl,
and SIGTERM (save, then a non-zero exit so a scheduler requeues the job)."""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from sid_jax import checkpoints, train
from tests import configs_util

ONE_DEVICE = jax.devices()[:1]
ROOT = configs_util.ROOT


def _config(**overrides):
  return configs_util.load("gmm_sid.py", "tiny", **{
      "training.num_steps": 4, "checkpoint.every_steps": 2, "log.every_steps": 1,
      "eval.kind": "none", "checkpoint.async_save": False, **overrides})


def _train_steps(workdir):
  return [r["step"] for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))
          if r["kind"] == "train"]


def test_resume_refuses_a_different_run_allows_cadence_changes_and_logs_each_step_once(
    tmp_path, caplog):
  workdir = str(tmp_path)
  first = train.distill(_config(), workdir, devices=ONE_DEVICE)
  assert first["checkpoint_steps"] == [2, 4] and _train_steps(workdir) == [1, 2, 3, 4]
  # Killed after step 4 was logged but before its checkpoint was written.
  shutil.rmtree(tmp_path / "checkpoints" / "4")

  changed = _config(**{"training.global_batch": 64, "training.micro_batch": 32, "sid.alpha": 1.0,
                       "ema.halflife_kimg": 10.0, "ema.rampup": 0.1, "seed": 3,
                       "teacher.gmm.mean_scale": 0.5, "training.num_steps": 8})
  with pytest.raises(checkpoints.CheckpointMismatchError) as e:
    train.distill(changed, workdir, devices=ONE_DEVICE)
  msg = str(e.value)
  assert msg.count("\n") == 9, msg  # one error: 7 settings, the teacher's hash, the advice
  for line in ("config.training.global_batch: checkpoint has 32, this run has 64",
               "config.training.micro_batch: checkpoint has 16, this run has 32",
               "config.sid.alpha: checkpoint has 1.2, this run has 1.0",
               "config.ema.halflife_kimg: checkpoint has 20.0, this run has 10.0",
               "config.ema.rampup: checkpoint has 0.05, this run has 0.1",
               "config.seed: checkpoint has 0, this run has 3",
               "config.teacher.gmm.mean_scale: checkpoint has 0.7, this run has 0.5",
               "teacher sha256: checkpoint has '",
               "--config.training.resume_allow_changes=True"):
    assert line in msg
  assert "num_steps" not in msg
  # The refused run changed nothing in the workdir.
  assert json.load(open(tmp_path / "config.json"))["sid"]["alpha"] == 1.2
  assert _train_steps(workdir) == [1, 2, 3, 4]

  # Run length and the logging, sampling, evaluation and checkpoint cadence may change. Steps 3
  # and 4 are computed again: their earlier records are dropped, not repeated.
  resumed = train.distill(_config(**{"training.num_steps": 5, "checkpoint.every_steps": 5,
                                     "checkpoint.keep": 2, "log.sample_every_steps": 3,
                                     "eval.every_steps": 50, "log.progress_every_secs": 5.0,
                                     "training.max_nonfinite_steps": 0}),
                          workdir, devices=ONE_DEVICE)
  assert resumed["status"] == "done" and resumed["start_step"] == 2
  assert resumed["checkpoint_steps"] == [2, 5]
  assert _train_steps(workdir) == [1, 2, 3, 4, 5]

  # A deliberate change with the documented override is logged and resumes.
  with pytest.raises(checkpoints.CheckpointMismatchError, match="config.seed: checkpoint has 0"):
    train.distill(_config(**{"training.num_steps": 6, "seed": 7}), workdir, devices=ONE_DEVICE)
  again = train.distill(_config(**{"training.num_steps": 6, "seed": 7,
                                   "training.resume_allow_changes": True}),
                        workdir, devices=ONE_DEVICE)
  assert again["start_step"] == 5 and again["step"] == 6
  assert "config.seed: checkpoint has 0, this run has 7" in caplog.text
  assert _train_steps(workdir) == [1, 2, 3, 4, 5, 6]


def test_teacher_path_and_hash_are_compared(tmp_path, caplog):
  """A different teacher of the same architecture passes every shape check: its absolute path
  and sha256 (recorded in every checkpoint) must match too, unless overridden."""
  config = _config().to_dict()
  teacher = {"type": "network", "path": "/teachers/a", "sha256": "0" * 64}
  ckpt = checkpoints.Checkpointer(str(tmp_path), every_steps=1, keep=1, async_save=False)
  ckpt.save(1, {"w": np.ones(2, np.float32)}, {"config": config, "teacher": teacher})
  abstract = {"w": jax.ShapeDtypeStruct((2,), np.float32)}
  other = dict(teacher, path="/teachers/b", sha256="1" * 64)
  with pytest.raises(checkpoints.CheckpointMismatchError) as e:
    ckpt.restore(1, abstract, config, teacher=other)
  assert f"teacher path: checkpoint has '/teachers/a', this run has '/teachers/b'" in str(e.value)
  assert f"teacher sha256: checkpoint has '{'0' * 64}', this run has '{'1' * 64}'" in (
      str(e.value))
  state, _ = ckpt.restore(1, abstract, config, teacher=dict(teacher))
  np.testing.assert_array_equal(state["w"], 1.0)
  state, _ = ckpt.restore(1, abstract, config, teacher=other, allow_changes=True)
  np.testing.assert_array_equal(state["w"], 1.0)
  assert "teacher path: checkpoint has '/teachers/a'" in caplog.text
  ckpt.close()


def test_config_differences_name_every_key_outside_the_allowed_changes():
  old = {"a": {"b": 1, "c": [1, 2]}, "log": {"every_steps": 1}, "training": {"num_steps": 3}}
  new = {"a": {"b": 2, "c": [1, 2], "d": 0}, "log": {"every_steps": 9},
         "training": {"num_steps": 30}}
  assert checkpoints.config_differences(old, new) == [
      "config.a.b: checkpoint has 1, this run has 2",
      "config.a.d: checkpoint has '<absent>', this run has 0"]


def test_sigterm_saves_then_exits_non_zero(tmp_path):
  workdir = str(tmp_path / "run")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "sid_jax.main", "--config=configs/gmm_sid.py:tiny",
         f"--workdir={workdir}", "--config.training.num_steps=100000", "--config.eval.kind=none",
         "--config.log.every_steps=1", "--config.checkpoint.every_steps=100000",
         "--config.log.sample_every_steps=100000", "--config.eval.every_steps=100000"]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  try:
    lines = []
    for line in proc.stdout:  # the loop runs (and the handler is installed) once a step is logged
      lines.append(line)
      if "step 1/100000" in line:
        break
    proc.send_signal(signal.SIGTERM)
    out = "".join(lines) + proc.communicate(timeout=600)[0]
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert summary["status"] == "preempted" and summary["signal"] == signal.SIGTERM
  assert summary["checkpoint_steps"] == [summary["step"]] and summary["step"] >= 1
  assert f"[sid_jax] preempted at step {summary['step']}" in out
