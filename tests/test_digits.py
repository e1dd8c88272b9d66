"""The digits demo: data, the shipped classifier and teacher, teacher training, the demo config."""

import json
import os

import jax
import numpy as np

from sid_jax import checkpoints, models, train, train_teacher
from sid_jax import run as run_lib
from sid_jax.data import digits as digits_data
from sid_jax.evaluation import digits as digits_eval
from tests import configs_util

ONE_DEVICE = jax.devices()[:1]


def test_digits_data():
  x, y = digits_data.load_digits()
  assert x.shape == (1797, 8, 8, 1) and x.dtype == np.float32
  assert x.min() == -1.0 and x.max() == 1.0
  assert sorted(set(y.tolist())) == list(range(10))
  (xa, ya), (xb, yb) = digits_data.split_halves()
  assert len(xa) + len(xb) == 1797


def test_shipped_classifier_is_accurate_and_defines_the_metric():
  ev = digits_eval.DigitsEvaluator()
  real = ev.real_metrics()
  assert real["classifier_accuracy"] > 0.95
  assert 0 < real["frechet_distance"] < 5.0
  (xa, ya), _ = digits_data.split_halves()
  same = ev.metrics(xa, ya)
  # Half A against its own statistics: zero up to sqrtm's float64 rounding at this scale.
  assert same["frechet_distance"] < 1e-6 * 2 * np.trace(ev.ref_sigma)
  rng = np.random.RandomState(0)
  noise = ev.metrics(rng.uniform(-1, 1, size=(500, 8, 8, 1)), rng.randint(0, 10, 500))
  assert noise["frechet_distance"] > 10 * real["frechet_distance"]
  assert noise["classifier_accuracy"] < 0.3


def test_shipped_teacher_loads_through_the_config():
  config = configs_util.load("digits_sid.py")
  teacher = models.build_teacher(config)
  assert teacher.info["type"] == "network" and len(teacher.info["sha256"]) == 64
  assert teacher.spec["kwargs"]["img_resolution"] == 8


def test_teacher_training_tiny_exports_a_usable_teacher(tmp_path):
  config = configs_util.load("digits_teacher.py", "tiny")
  summary = train_teacher.train_teacher(config, str(tmp_path), devices=ONE_DEVICE)
  assert summary["step"] == 4
  spec = checkpoints.load_network_spec(summary["export_dir"])
  assert spec["trained_with"]["steps"] == 4
  sid = configs_util.load("digits_sid.py", "tiny", **{"teacher.checkpoint": summary["export_dir"]})
  run = run_lib.build_run(sid, ONE_DEVICE)
  assert run.teacher.spec["kwargs"]["model_channels"] == 16
  # Resuming a finished teacher run does nothing more.
  again = train_teacher.train_teacher(config, str(tmp_path), devices=ONE_DEVICE)
  assert again["step"] == 4


def test_shortened_digits_run_approaches_the_teacher(tmp_path):
  """A shortened configs/digits_sid.py: the one-step generator moves from its blurry start
  (the teacher's one-step denoiser) to about the teacher's quality at 35 NFE."""
  config = configs_util.load("digits_sid.py", None, **{
      "training.num_steps": 120, "eval.every_steps": 1000, "log.sample_every_steps": 1000,
      "checkpoint.every_steps": 1000})
  summary = train.distill(config, str(tmp_path), devices=ONE_DEVICE)
  assert summary["status"] == "done"
  table = json.load(open(tmp_path / "metric_table.json"))
  assert [r["nfe"] for r in table] == [0, 2 * config.eval.teacher_heun_steps - 1, 1, 1]
  assert all(0 <= r["classifier_accuracy"] <= 1 for r in table)
  assert "| model | NFE |" in open(tmp_path / "metric_table.md").read()
  assert os.path.isfile(tmp_path / "generator" / "network.json")
  rows = {r["model"].split(",")[0].split(" (")[0]: r for r in table}
  real = rows["real digits"]["frechet_distance"]
  teacher = rows["teacher"]["frechet_distance"]
  initial = rows["one-step generator at initialisation"]["frechet_distance"]
  final = rows["one-step generator after SiD"]["frechet_distance"]
  assert initial > 1.5 * real  # the starting point is visibly worse than data
  assert final < 0.8 * initial, rows
  assert final < 1.6 * teacher, rows
  assert rows["one-step generator after SiD"]["classifier_accuracy"] > 0.9
