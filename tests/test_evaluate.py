"""The evaluation CLI end to end, in-process, on tiny inputs and a random-weight Inception.

`python -m sid_jax.evaluate` on an .npz, a folder of PNGs, a TFDS dataset (make-ref) and a
training workdir written by `train.distill`; the printed JSON must name every number's protocol.
scipy's sqrtm of a 2048x2048 matrix takes about a minute on the test machine, so the FID value is
replaced by a recorder here: the test checks which moments reach it (the FID formula itself is
tested in test_metrics.py).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from sid_jax import evaluate, sharding, train
from sid_jax import run as run_lib
from sid_jax.evaluation import features, metrics, protocols
from tests import configs_util
from tests.test_metrics import _random_inception_state_dict

ROOT = configs_util.ROOT
FID_SENTINEL = 123.25


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("inception") / "fid_inception_random.npz"
  np.savez(path, **_random_inception_state_dict(seed=1))
  return str(path)


@pytest.fixture(scope="module")
def detector(inception_file):
  """The extractor the CLI builds (8 devices, batch 8), for independent comparisons."""
  variables = features.load_inception_variables(inception_file)
  return features.InceptionFeatures(variables, sharding.make_mesh({"data": 8}), batch_size=8)


@pytest.fixture
def fid_calls(monkeypatch):
  calls = []

  def record(mu, sigma, ref_mu, ref_sigma):
    calls.append((mu, sigma, ref_mu, ref_sigma))
    return FID_SENTINEL

  monkeypatch.setattr(metrics, "fid_from_moments", record)
  return calls


def _cli(capsys, *args):
  record = evaluate.run(["sid_jax.evaluate", *args])
  out = capsys.readouterr().out
  lines = out.splitlines()
  printed = json.loads(lines[0])
  assert printed == json.loads(json.dumps(record, default=str))
  return printed, "\n".join(lines[1:])


def _images(seed, shape):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _assert_close(a, b, rtol=1e-5):
  np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


def test_make_ref_and_evaluate_an_npz(tmp_path, capsys, inception_file, detector, fid_calls):
  real = _images(0, (12, 3, 16, 16))  # NCHW
  fake = _images(1, (12, 16, 16, 3))  # NHWC
  np.savez(tmp_path / "real.npz", arr_0=real)
  np.savez(tmp_path / "fake.npz", images=fake)
  stats = str(tmp_path / "ref" / "stats.npz")

  made, table = _cli(capsys, "make-ref", f"--npz={tmp_path / 'real.npz'}",
                     f"--inception={inception_file}", f"--out={stats}", "--save_features",
                     "--batch=8")
  assert made["protocol"] == "edm-fid50k" and made["num"] == 12 and made["features_saved"]
  assert made["detector"] == protocols.PYTORCH_FID_POOL3
  assert any("NCHW" in n for n in made["source"]["notes"])
  assert "edm-fid50k" in table and stats in table
  ref = metrics.load_ref_stats(stats)
  assert ref.kind == "sid_jax" and ref.num == 12 and ref.protocol == "edm-fid50k"
  assert ref.detector_hash == detector.weights_hash == made["detector_weights"]["sha256"]
  real_feats = detector(np.transpose(real, (0, 2, 3, 1)))
  _assert_close(ref.features, real_feats["pool"])
  _assert_close(ref.mu, real_feats["pool"].mean(0))
  _assert_close(ref.sigma, np.cov(real_feats["pool"], rowvar=False), rtol=1e-4)

  json_out = tmp_path / "results.jsonl"
  record, table = _cli(capsys, f"--npz={tmp_path / 'fake.npz'}", f"--inception={inception_file}",
                       f"--ref={stats}", "--metrics=fid,is,pr,kid", "--is_splits=3", "--batch=8",
                       f"--json_out={json_out}")
  assert json.loads(open(json_out).read()) == record
  assert record["source"]["kind"] == "npz" and record["source"]["num"] == 12
  assert record["detector_weights"]["sha256"] == detector.weights_hash
  by_metric = {r["metric"]: r for r in record["results"]}
  assert [r["metric"] for r in record["results"]] == ["fid", "is", "pr", "kid"]
  expected_names = {"fid": "edm-fid50k[n=12]", "is": "is50k[n=12,splits=3]",
                    "pr": "pr50k3[n=12]", "kid": "kid50k[n=12,subset_size=12]"}
  for metric, name in expected_names.items():
    r = by_metric[metric]
    assert r["protocol"] == name and not r["standard_protocol"] and r["num_samples"] == 12
    assert r["detector"] and r["resize"] == protocols.RESIZE_BILINEAR_299 and r["reference"]
    assert f"| {metric} |" in table and name in table
    for key in ("fid", "is_mean", "is_std", "precision", "recall", "kid"):
      if key in r:
        assert np.isfinite(r[key]), (metric, key)
  for metric in ("fid", "pr", "kid"):
    assert by_metric[metric]["ref_path"] == stats and by_metric[metric]["ref_num"] == 12
    assert by_metric[metric]["ref_protocol"] == "edm-fid50k"
    assert by_metric[metric]["ref_source"]["kind"] == "npz"

  # Every number against an independent computation from the detector's features.
  fake_feats = detector(fake)
  assert by_metric["fid"]["fid"] == FID_SENTINEL
  (mu, sigma, ref_mu, ref_sigma), = fid_calls
  _assert_close(mu, fake_feats["pool"].mean(0))
  _assert_close(sigma, np.cov(fake_feats["pool"], rowvar=False), rtol=1e-4)
  np.testing.assert_array_equal(ref_mu, ref.mu)
  np.testing.assert_array_equal(ref_sigma, ref.sigma)
  mean, std = metrics.inception_score(fake_feats["logits_unbiased"], 3)
  assert by_metric["is"]["is_mean"] == pytest.approx(mean, rel=1e-6)
  assert by_metric["is"]["is_std"] == pytest.approx(std, rel=1e-4, abs=1e-9)
  pr = metrics.precision_recall(ref.features, fake_feats["pool"], 3)
  assert (by_metric["pr"]["precision"], by_metric["pr"]["recall"]) == (pr["precision"],
                                                                         pr["recall"])
  kid = metrics.kid(ref.features, fake_feats["pool"], 100, 12, 0)
  assert by_metric["kid"]["kid"] == pytest.approx(kid, rel=1e-6)


def test_make_ref_from_png_folder_and_tfds(tmp_path, capsys, inception_file, detector,
                                           fid_calls):
  grey = _images(2, (9, 16, 16))
  folder = tmp_path / "pngs"
  for i, image in enumerate(grey):
    sub = folder / ("a" if i < 5 else "b")
    sub.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image, mode="L").save(sub / f"{i:03d}.png")
  stats = str(tmp_path / "folder_stats.npz")
  made, _ = _cli(capsys, "make-ref", f"--images={folder}", f"--inception={inception_file}",
                 f"--out={stats}", "--batch=8")
  assert made["num"] == 9 and made["source"]["image_shape"] == [16, 16, 1]
  assert "1-channel images repeated to 3 channels before the detector" in made["source"]["notes"]
  expected = detector(np.repeat(grey[..., None], 3, axis=-1))["pool"]
  ref = metrics.load_ref_stats(stats)
  assert ref.features is None and ref.num == 9
  _assert_close(ref.mu, expected.mean(0))

  # The same folder against its own statistics: the moments reaching FID are the reference's.
  record, table = _cli(capsys, f"--images={folder}", f"--inception={inception_file}",
                       f"--ref={stats}", "--num=9", "--batch=8")
  (result,) = record["results"]
  assert result["protocol"] == "edm-fid50k[n=9]" and result["fid"] == FID_SENTINEL
  assert "repeated to 3 channels" in table
  (mu, sigma, ref_mu, ref_sigma), = fid_calls
  _assert_close(mu, ref_mu, rtol=1e-9)
  _assert_close(sigma, ref_sigma, rtol=1e-9)

  # A prepared TFDS dataset, read offline (array_record, no TensorFlow needed).
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  rgb = _images(3, (10, 16, 16, 3))

  class TinyEvalImages(tfds.core.GeneratorBasedBuilder):
    # A one-part module name keeps tfds from resolving this file as a package resource (which
    # needs `importlib_resources`, a tfds dependency missing from this environment).
    __module__ = "tiny_eval_images_builder"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"image": tfds.features.Tensor(shape=(16, 16, 3), dtype=np.uint8)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, image in enumerate(rgb):
        yield i, {"image": image}

  data_dir = str(tmp_path / "tfds")
  TinyEvalImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
  capsys.readouterr()  # tfds's own progress output
  tfds_stats = str(tmp_path / "tfds_stats.npz")
  made, _ = _cli(capsys, "make-ref", "--tfds=tiny_eval_images:train", f"--data_dir={data_dir}",
                 f"--inception={inception_file}", f"--out={tfds_stats}", "--num=7",
                 "--save_features", "--batch=8")
  assert made["num"] == 7 and made["source"]["path"] == "tiny_eval_images:train"
  # tfds stores examples shuffled: the first 7 in stored order are 7 distinct dataset images.
  stored = metrics.load_ref_stats(tfds_stats).features
  expected = detector(rgb)["pool"]
  distances = np.abs(stored[:, None, :] - expected[None, :, :]).max(axis=-1)
  matches = distances.argmin(axis=1)
  assert len(set(matches)) == 7
  _assert_close(stored, expected[matches])
  with pytest.raises(evaluate.EvaluationError, match="splits"):
    evaluate.run(["e", "make-ref", "--tfds=tiny_eval_images:test", f"--data_dir={data_dir}",
                  f"--inception={inception_file}", f"--out={tfds_stats}"])


def test_evaluate_a_distilled_checkpoint(tmp_path, capsys, inception_file, fid_calls):
  config = configs_util.load("gmm_sid.py", "tiny", **{
      "training.num_steps": 1, "checkpoint.every_steps": 1, "training.micro_batch": 32,
      "model.kwargs.channel_mult": [1], "eval.num_samples": 16, "eval.batch": 16})
  workdir = tmp_path / "run"
  summary = train.distill(config, str(workdir), devices=jax.devices()[:1])
  assert summary["checkpoint_steps"] == [1]
  ref = tmp_path / "edm_style.npz"
  np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))

  record, table = _cli(capsys, f"--checkpoint={workdir}", f"--inception={inception_file}",
                       f"--ref={ref}", "--metrics=fid,is,gmm", "--num=10", "--is_splits=2",
                       "--batch=8")
  source = record["source"]
  assert source["kind"] == "checkpoint" and source["step"] == 1 and source["generator"] == "EMA"
  assert source["image_shape"] == [8, 8, 1] and source["num"] == 10
  assert "1-channel images repeated to 3 channels before the detector" in source["notes"]
  assert "repeated to 3 channels" in table
  fid, is_, gmm = record["results"]
  assert fid["protocol"] == "edm-fid50k[n=10]" and fid["ref_format"] == "edm"
  assert fid["ref_protocol"] is None and fid["fid"] == FID_SENTINEL and len(fid_calls) == 1
  assert np.isfinite(fid_calls[0][0]).all() and np.isfinite(fid_calls[0][1]).all()
  assert is_["protocol"] == "is50k[n=10,splits=2]" and np.isfinite(is_["is_mean"])
  assert is_["is_mean"] >= 1.0
  assert gmm["protocol"] == "gmm-frechet[n=16]" and gmm["seed"] == config.eval.seed
  # The restored EMA generator (now on 8 devices) reproduces the run's own final evaluation.
  final = summary["final_eval"]
  assert gmm["frechet_distance"] == pytest.approx(final["frechet_distance"], rel=1e-4)
  assert gmm["nearest_component_accuracy"] == final["nearest_component_accuracy"]

  # The checkpoints/ directory itself works too; gmm alone needs no Inception weights.
  record, _ = _cli(capsys, f"--checkpoint={workdir / 'checkpoints'}", "--metrics=gmm")
  assert record["results"][0]["frechet_distance"] == pytest.approx(gmm["frechet_distance"],
                                                                    rel=1e-6)
  assert "detector_weights" not in record
  with pytest.raises(evaluate.EvaluationError, match="--step=7 is not in"):
    evaluate.run(["e", f"--checkpoint={workdir}", "--metrics=gmm", "--step=7"])


@pytest.fixture(scope="module")
def small_files(tmp_path_factory):
  d = tmp_path_factory.mktemp("files")
  np.savez(d / "ok.npz", arr_0=_images(4, (4, 8, 8, 3)))
  np.savez(d / "float.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
  np.savez(d / "three_d.npz", arr_0=np.zeros((4, 8, 8), np.uint8))
  np.savez(d / "two_channels.npz", arr_0=np.zeros((4, 8, 8, 2), np.uint8))
  np.savez(d / "no_images.npz", pixels=np.zeros((4, 8, 8, 3), np.uint8))
  np.savez(d / "stats64.npz", mu=np.zeros(64), sigma=np.eye(64))
  metrics.save_ref_stats(str(d / "stats_no_feats.npz"), np.zeros(2048), np.eye(2048),
                         "edm-fid50k", 100)
  metrics.save_ref_stats(str(d / "stats_other_weights.npz"), np.zeros(2048), np.eye(2048),
                         "edm-fid50k", 100, detector_hash="0" * 64)
  return d


_WEIGHTS = "@weights"


@pytest.mark.parametrize("args,error,pattern", [
    (["--npz=@/ok.npz", "--metrics=is", "--is_splits=2", "--inception=/nonexistent/fid.pth"],
     FileNotFoundError,
     r"pt_inception-2015-12-05-6726825d\.pth.*github\.com/mseitzer/pytorch-fid/releases"),
    (["--npz=@/ok.npz", "--metrics=is", "--num=4", "--is_splits=2"], FileNotFoundError,
     "No Inception weights given"),
    (["--npz=@/ok.npz", _WEIGHTS], evaluate.EvaluationError, "need reference statistics"),
    (["--npz=@/ok.npz", "--ref=@/missing.npz", _WEIGHTS], FileNotFoundError,
     "do not exist.*make-ref"),
    (["--npz=@/ok.npz", "--ref=@/ok.npz", _WEIGHTS], ValueError, "looks like an image array"),
    (["--npz=@/ok.npz", "--ref=@/stats64.npz", _WEIGHTS], evaluate.EvaluationError,
     "64-d statistics"),
    (["--npz=@/ok.npz", "--ref=@/stats_no_feats.npz", "--metrics=fid,pr", _WEIGHTS],
     evaluate.EvaluationError, "--save_features"),
    (["--npz=@/ok.npz", "--ref=@/stats_other_weights.npz", _WEIGHTS], evaluate.EvaluationError,
     "other Inception weights"),
    (["--npz=@/float.npz", "--metrics=is", "--is_splits=2", _WEIGHTS], evaluate.EvaluationError,
     "float32; expected uint8"),
    (["--npz=@/three_d.npz", "--metrics=is", "--is_splits=2", _WEIGHTS], evaluate.EvaluationError,
     "expected 4-d uint8"),
    (["--npz=@/two_channels.npz", "--metrics=is", "--is_splits=2", _WEIGHTS],
     evaluate.EvaluationError, "neither NHWC nor NCHW"),
    (["--npz=@/no_images.npz", "--metrics=is", "--is_splits=2", _WEIGHTS],
     evaluate.EvaluationError, "no 'arr_0' or 'images'"),
    (["--npz=@/ok.npz", "--metrics=is", "--num=9", "--is_splits=2", _WEIGHTS],
     evaluate.EvaluationError, "--num=9, but .* holds 4 images"),
    (["--npz=@/ok.npz", "--metrics=is", _WEIGHTS], evaluate.EvaluationError,
     "needs at least 10 images"),
    (["--npz=@/ok.npz", "--images=@", "--metrics=is"], evaluate.EvaluationError,
     "exactly one of"),
    (["--metrics=is"], evaluate.EvaluationError, "exactly one of"),
    (["--npz=@/ok.npz", "--metrics=fid,lpips"], evaluate.EvaluationError, "--metrics=fid,lpips"),
    (["--npz=@/ok.npz", "--metrics=gmm"], evaluate.EvaluationError, "needs --checkpoint"),
    (["--npz=@/ok.npz", "--fid_protocol=coco2014-fid30k-clean"], evaluate.EvaluationError,
     "registered for naming only"),
    (["--npz=@/ok.npz", "--fid_protocol=is50k"], evaluate.EvaluationError, "not an FID one"),
    (["--npz=@/ok.npz", "--metrics=is", "--is_splits=2", "--batch=12", _WEIGHTS],
     evaluate.EvaluationError, "multiple of the 8 devices"),
    (["--checkpoint=@/nope", "--metrics=gmm"], FileNotFoundError, "not a directory"),
    (["--checkpoint=@", "--metrics=gmm"], evaluate.EvaluationError, "No checkpoints in"),
    (["make-ref", "--npz=@/ok.npz", _WEIGHTS], evaluate.EvaluationError, "needs --out"),
    (["make-ref", "--checkpoint=@", "--out=@/x.npz"], evaluate.EvaluationError,
     "exactly one of --images, --npz, --tfds"),
    (["make-ref", "--tfds=nocolon", "--out=@/x.npz"], evaluate.EvaluationError, "NAME:SPLIT"),
    (["sample", "--npz=@/ok.npz"], evaluate.EvaluationError, "only subcommand is make-ref"),
])
def test_errors_name_the_problem(small_files, inception_file, args, error, pattern):
  argv = ["sid_jax.evaluate"]
  for arg in args:
    argv.append(f"--inception={inception_file}" if arg == _WEIGHTS else
                arg.replace("@", str(small_files)))
  with pytest.raises(error, match=pattern):
    evaluate.run(argv)


def test_command_line_reports_errors_and_exit_code(small_files):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  out = subprocess.run(
      [sys.executable, "-m", "sid_jax.evaluate", f"--npz={small_files / 'ok.npz'}",
       "--metrics=is", "--is_splits=2", "--verbosity=0",
       "--inception=/nonexistent/pt_inception.pth"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  assert "sid_jax.evaluate: error: Inception weights '/nonexistent/pt_inception.pth'" in out.stderr
  assert "pt_inception-2015-12-05-6726825d.pth" in out.stderr
  assert out.stdout == ""


def test_in_loop_fid_is_the_cli_fid_of_the_kept_state(tmp_path, capsys, inception_file):
  """The loop's FID (fixed inputs) is the CLI's FID of the same EMA generator."""
  config = configs_util.load("gmm_sid.py", "tiny", **{
      "training.num_steps": 1, "checkpoint.every_steps": 1, "training.micro_batch": 32,
      "eval.kind": "fid", "eval.inception": str(inception_file), "eval.num_samples": 8,
      "eval.batch": 8, "model.kwargs.channel_mult": [1]})
  ref = tmp_path / "edm_style.npz"
  rs = np.random.RandomState(0)
  a = rs.standard_normal((2048, 2048)) * 0.01
  np.savez(ref, mu=rs.standard_normal(2048) * 0.1, sigma=a @ a.T)
  config.eval.ref = str(ref)
  workdir = tmp_path / "run"
  summary = train.distill(config, str(workdir))
  assert summary["eval_protocol"] == "edm-fid50k[n=8]"
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  evals = {r["step"]: r for r in records if r["kind"] == "eval"}
  assert sorted(evals) == [0, 1]
  assert all(r["protocol"] == "edm-fid50k[n=8]" and r["num_images"] == 8 for r in evals.values())
  assert evals[0]["fid"] != evals[1]["fid"] and np.isfinite(evals[1]["fid"])
  # Step 0 (the initial generator) is never "best"; step 1 is the only candidate.
  assert summary["best"]["step"] == 1 and summary["best"]["value"] == evals[1]["fid"]

  record, _ = _cli(capsys, f"--checkpoint={workdir / 'checkpoints_best'}",
                   f"--inception={inception_file}", f"--ref={ref}", "--metrics=fid",
                   f"--num={config.eval.num_samples}", f"--seed={config.eval.seed}",
                   "--batch=8")
  assert record["source"]["step"] == 1
  assert record["results"][0]["protocol"] == "edm-fid50k[n=8]"
  assert record["results"][0]["fid"] == pytest.approx(evals[1]["fid"], rel=1e-4)


def test_best_checkpoint_is_the_lowest_evaluation(tmp_path, capsys):
  config = configs_util.load("gmm_sid.py", "tiny", **{
      "training.num_steps": 5, "checkpoint.every_steps": 5, "eval.every_steps": 1,
      "model.kwargs.channel_mult": [1], "training.micro_batch": 32})
  workdir = tmp_path / "run"
  summary = train.distill(config, str(workdir))
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  fd = {r["step"]: r["frechet_distance"] for r in records if r["kind"] == "eval"}
  assert sorted(fd) == [0, 1, 2, 3, 4, 5] and len(set(fd.values())) == 6
  best_step = min(range(1, 6), key=fd.get)
  assert summary["best"] == {"metric": "frechet_distance", "value": fd[best_step],
                             "step": best_step, "directory": str(workdir / "checkpoints_best")}
  kept = sorted(int(d) for d in os.listdir(workdir / "checkpoints_best") if d.isdigit())
  assert kept == [best_step]
  # The kept state is the evaluated one: re-evaluating it reproduces the number.
  record, _ = _cli(capsys, f"--checkpoint={workdir / 'checkpoints_best'}", "--metrics=gmm")
  assert record["source"]["step"] == best_step
  assert record["results"][0]["frechet_distance"] == pytest.approx(fd[best_step], rel=1e-5)


def test_eval_every_kimg_sets_the_cadence():
  config = configs_util.load("gmm_sid.py", "tiny", **{"eval.every_kimg": 0.256,
                                                      "training.global_batch": 64,
                                                      "training.micro_batch": 64})
  assert run_lib.eval_every_steps(config) == 4
  config.eval.every_kimg = 0.0
  assert run_lib.eval_every_steps(config) == config.eval.every_steps
