"""The distillation job end to end on the tiny GMM config: outputs, resume, errors."""

import json
import os
import signal

import jax
import numpy as np
import pytest
from ml_collections import config_flags  # noqa: F401  (ensures the flag machinery imports)

from sid_jax import checkpoints, host_memory, steps, train
from sid_jax import run as run_lib
from tests import configs_util


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


ONE_DEVICE = jax.devices()[:1]


def _restore_state(workdir, step, config):
  run = run_lib.build_run(config, ONE_DEVICE)
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=1, keep=10)
  abstract = jax.eval_shape(lambda p: steps.init_state(run.setup, p, p), run.init_params)
  abstract = {"state": abstract, "rng": jax.ShapeDtypeStruct((2,), np.uint32)}
  state, meta = ckpt.restore(step, abstract, config.to_dict())
  ckpt.close()
  return state, meta


class StopAfter(train.StopRequest):
  """Acts as if SIGTERM arrived after `n` iterations."""

  def __init__(self, n):
    super().__init__()
    self._n = n
    self._checks = 0

  @property
  def signal(self):
    self._checks += 1
    return signal.SIGTERM if self._checks > self._n else None

  @signal.setter
  def signal(self, value):
    pass


def test_tiny_run_writes_config_logs_samples_checkpoints(tmp_path, monkeypatch):
  released = []
  real_release = host_memory.release
  monkeypatch.setattr(host_memory, "release", lambda: released.append(1) or real_release())
  config = configs_util.load("gmm_sid.py", "tiny")
  summary = train.distill(config, str(tmp_path))
  assert summary["status"] == "done" and summary["step"] == 6
  names = os.listdir(tmp_path)
  assert "config.json" in names and "summary.json" in names and "metrics.jsonl" in names
  assert any(n.startswith("events.out.tfevents") for n in names)
  assert json.load(open(tmp_path / "config.json"))["training"]["num_steps"] == 6
  assert summary["checkpoint_steps"] == [3, 6]
  pngs = sorted(os.listdir(tmp_path / "samples"))
  assert pngs[0] == "grid_00000000.png" and pngs[-1] == "grid_00000006.png"
  assert len(released) == 1 + len(pngs)  # freed heap returned after the compile and each evaluation
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert {r["kind"] for r in records} == {"train", "eval"}
  assert all(np.isfinite(r["gen_loss"]) for r in records if r["kind"] == "train")
  for key in ("initial_eval", "final_eval"):
    assert set(summary[key]) >= {"frechet_distance", "nearest_component_accuracy"}
  _, meta = _restore_state(str(tmp_path), 6, config)
  assert meta["teacher"]["type"] == "gmm" and len(meta["teacher"]["sha256"]) == 64
  assert meta["config"]["training"]["num_steps"] == 6


def test_stopped_and_resumed_run_equals_uninterrupted_run(tmp_path):
  config = configs_util.load("gmm_sid.py", "tiny", **{"checkpoint.every_steps": 100})
  full = train.distill(config, str(tmp_path / "full"), devices=ONE_DEVICE)
  assert full["checkpoint_steps"] == [6]
  part = train.distill(config, str(tmp_path / "part"), devices=ONE_DEVICE, stop=StopAfter(2))
  assert part["status"] == "preempted" and part["checkpoint_steps"] == [2]
  resumed = train.distill(config, str(tmp_path / "part"), devices=ONE_DEVICE)
  assert resumed["status"] == "done" and resumed["start_step"] == 2
  a, _ = _restore_state(str(tmp_path / "full"), 6, config)
  b, _ = _restore_state(str(tmp_path / "part"), 6, config)
  for x, y in zip(_leaves(a), _leaves(b)):
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
  assert int(b["state"].step) == 6


def test_signal_handler_requests_a_stop():
  with train.StopRequest() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.signal == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is not stop._handle


def test_checkpoint_from_another_config_fails_loudly(tmp_path):
  config = configs_util.load("gmm_sid.py", "tiny", **{"training.num_steps": 3})
  train.distill(config, str(tmp_path), devices=ONE_DEVICE)
  other = configs_util.load("gmm_sid.py", "tiny", **{"training.num_steps": 6,
                                                      "teacher.gmm.num_components": 10,
                                                      "teacher.gmm.seed": 7})
  with pytest.raises(checkpoints.CheckpointMismatchError, match="config.teacher.gmm"):
    train.distill(other, str(tmp_path), devices=ONE_DEVICE)
  wider = configs_util.load("gmm_sid.py", "tiny", **{"training.num_steps": 6})
  wider.model.kwargs.model_channels = 24
  with pytest.raises(checkpoints.CheckpointMismatchError, match="config.model"):
    train.distill(wider, str(tmp_path), devices=ONE_DEVICE)


def test_tree_mismatch_names_the_keys():
  stored = {"a": np.zeros((2, 3)), "b": np.zeros(4)}
  expected = {"a": np.zeros((2, 4)), "c": np.zeros(1)}
  with pytest.raises(checkpoints.CheckpointMismatchError) as e:
    checkpoints.check_tree_matches(stored, expected, "ckpt")
  msg = str(e.value)
  assert "missing from checkpoint: c" in msg
  assert "unexpected in checkpoint: b" in msg
  assert "shape mismatch at a" in msg


@pytest.mark.parametrize("override,pattern", [
    ({"training.global_batch": 20, "training.micro_batch": 20}, "divisible by the 8 batch shards"),
    ({"training.global_batch": 32, "training.micro_batch": 12}, "not a multiple"),
    ({"optim.gen_lr": -1e-4}, "config.optim.gen_lr"),
    ({"optim.fake_b1": 1.0}, "config.optim.fake_b1"),
    ({"teacher.type": "edm-magic"}, "config.teacher.type"),
    ({"teacher.type": "network", "teacher.checkpoint": "/nonexistent/teacher"},
     "config.teacher.checkpoint"),
    ({"mesh.data": 3}, "config.mesh"),
    ({"data.label_dim": 4}, "config.data.label_dim"),
    ({"eval.kind": "fid"}, "config.eval.inception"),
    ({"eval.kind": "fid", "eval.inception": "/nonexistent/w.pth", "eval.ref": "/x.npz"},
     "config.eval.inception='/nonexistent/w.pth'"),
    ({"eval.kind": "fidelity"}, "config.eval.kind"),
    ({"eval.kind": "none", "eval.best_metric": "fid"}, "config.eval.best_metric"),
    ({"eval.every_kimg": -1.0}, "config.eval.every_kimg"),
])
def test_bad_config_fails_before_compiling(override, pattern):
  config = configs_util.load("gmm_sid.py", "tiny", **override)
  with pytest.raises((ValueError, FileNotFoundError), match=pattern):
    run_lib.build_run(config)


def test_teacher_resolution_mismatch_is_reported(tmp_path):
  config = configs_util.load("gmm_sid.py", "tiny")
  run = run_lib.build_run(config)
  spec = dict(run.student_spec)
  checkpoints.save_network(str(tmp_path / "teacher"), run.init_params, spec)
  bad = configs_util.load("gmm_sid.py", "tiny", **{
      "teacher.type": "network", "teacher.checkpoint": str(tmp_path / "teacher"),
      "data.resolution": 16})
  with pytest.raises(ValueError, match="resolution=16"):
    run_lib.build_run(bad)


def test_nonfinite_losses_stop_the_run_without_saving(tmp_path):
  config = configs_util.load("gmm_sid.py", "tiny", **{"teacher.gmm.mean_scale": float("nan"),
                                                      "training.max_nonfinite_steps": 2})
  with pytest.raises(train.NonFiniteLossError, match="2 consecutive iterations"):
    train.distill(config, str(tmp_path), devices=ONE_DEVICE)
  ckpt_dir = tmp_path / "checkpoints"
  assert not [d for d in os.listdir(ckpt_dir) if d.isdigit()]
