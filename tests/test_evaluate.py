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

from sid_jax import evaluate, sample, sharding, train
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

  def record(mu, sigma, ref_mu, ref_sigma, *, sqrtm_rule):
    calls.append((mu, sigma, ref_mu, ref_sigma, sqrtm_rule))
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
    assert r["detector"] and r["resize"] == protocols.RESIZE_TF1_BILINEAR_299 and r["reference"]
    assert r["front_end"] == "tf1-bilinear"
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
  (mu, sigma, ref_mu, ref_sigma, rule), = fid_calls
  assert rule == "real"  # EDM's rule: the protocol's sqrtm parameter
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
  assert by_metric["fid"]["params"] == {"cov_ddof": 1, "sqrtm": "real"}
  assert "sqrtm=real" in table and record["detector_weights"]["front_end"] == "tf1-bilinear"

  # Statistics made with EDM's front-end do not serve pytorch-fid's protocol.
  with pytest.raises(evaluate.EvaluationError, match="protocol 'pytorch-fid50k' uses"):
    evaluate.run(["e", f"--npz={tmp_path / 'fake.npz'}", f"--inception={inception_file}",
                  f"--ref={stats}", "--fid_protocol=pytorch-fid50k", "--batch=8"])


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
  (mu, sigma, ref_mu, ref_sigma, rule), = fid_calls
  assert rule == "real"  # EDM's rule: the protocol's sqrtm parameter
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
  assert fid_calls[0][4] == "real"
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
    (["--npz=@/ok.npz", "--fid_protocol=coco2014-fid30k-clean", "--metrics=fid,is"],
     evaluate.EvaluationError, "need different Inception front-ends"),
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


# ---------------------------------------------------------------------------------------------
# CLIP score: which caption each image meets (the model is replaced by a recorder).
# ---------------------------------------------------------------------------------------------

SEEDS = list(range(1000, 2000))


def _seed_image(seed):
  """An 8x8 image whose first pixel spells its seed."""
  image = np.full((8, 8, 3), 7, np.uint8)
  image[0, 0, :2] = divmod(seed, 256)
  return image


@pytest.fixture(scope="module")
def t2i_samples(tmp_path_factory):
  """Images of seeds 1000-1999 as a folder of <seed:06d>.png (as the official generator and
  `sid_jax.sample` name them), 2000 caption lines, and a CLIP model folder without weights."""
  import transformers  # pylint: disable=import-outside-toplevel
  from tests import tiny_tokenizer  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("t2i")
  folder = root / "samples"
  folder.mkdir()
  for seed in SEEDS:
    Image.fromarray(_seed_image(seed)).save(folder / f"{seed:06d}.png")
  captions = [f"caption of line {i}" for i in range(2000)]
  (root / "captions.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
  model = root / "clip"
  transformers.CLIPConfig(
      text_config=dict(vocab_size=514, hidden_size=32, intermediate_size=37,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77),
      vision_config=dict(image_size=30, patch_size=6, hidden_size=32, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=4),
      projection_dim=16).save_pretrained(model)
  (model / "model.safetensors").write_bytes(b"")  # only its presence is checked here
  tiny_tokenizer.write_tiny_clip_tokenizer(model)
  return {"root": root, "folder": folder, "captions": captions,
          "captions_path": str(root / "captions.txt"), "model": str(model)}


@pytest.fixture
def clip_pairs(monkeypatch):
  """(seed spelled by the image, caption) of every image the CLIP score sees."""
  pairs = []

  class Recorder:

    def score(self, images, captions):
      images = np.asarray(images)
      assert len(images) == len(captions)
      pairs.extend((int(im[0, 0, 0]) * 256 + int(im[0, 0, 1]), c)
                   for im, c in zip(images, captions))
      return {"per_image": np.zeros(len(images))}

  monkeypatch.setattr(evaluate.clip_score, "load_scorer", lambda *a, **k: Recorder())
  return pairs


def _clip_run(samples, *args, captions=None):
  return evaluate.run(["sid_jax.evaluate", "--metrics=clip", "--batch=8",
                       f"--clip_model={samples['model']}",
                       f"--captions={captions or samples['captions_path']}", *args])


def _line_of(caption):
  return int(caption.rsplit(" ", 1)[1])


def test_clip_pairs_seed_s_with_caption_line_s(tmp_path, capsys, t2i_samples, clip_pairs):
  folder = t2i_samples["folder"]
  # The images record no prompts: pairing by position (lines 0-999) is refused.
  with pytest.raises(evaluate.EvaluationError,
                     match="does not record its prompts, so pass --seeds"):
    _clip_run(t2i_samples, f"--images={folder}", "--num=1000")
  assert not clip_pairs
  record = _clip_run(t2i_samples, f"--images={folder}", "--num=1000", "--seeds=1000-1999")
  assert len(clip_pairs) == 1000
  assert all(_line_of(caption) == seed for seed, caption in clip_pairs)
  assert [seed for seed, _ in clip_pairs] == SEEDS
  (result,) = record["results"]
  assert "seeds 1000..1999" in result["caption_pairing"]
  assert "seeds 1000..1999" in capsys.readouterr().out
  with pytest.raises(evaluate.EvaluationError, match="--seeds lists 999 seeds, but --images"):
    _clip_run(t2i_samples, f"--images={folder}", "--seeds=1000-1998")
  short = tmp_path / "short.txt"
  short.write_text("\n".join(t2i_samples["captions"][:1500]) + "\n", encoding="utf-8")
  with pytest.raises(evaluate.EvaluationError,
                     match="belongs to caption line 1500, but --captions .* holds 1500"):
    _clip_run(t2i_samples, f"--images={folder}", "--seeds=1000-1999", captions=str(short))
  with pytest.raises(evaluate.EvaluationError, match="Bad --seeds entry 'x'"):
    _clip_run(t2i_samples, f"--images={folder}", "--seeds=x")


def test_clip_uses_the_prompts_sample_records(tmp_path, t2i_samples, clip_pairs):
  folder = tmp_path / "samples"
  folder.mkdir()
  captions = t2i_samples["captions"]
  for seed in SEEDS[:16]:
    Image.fromarray(_seed_image(seed)).save(folder / f"{seed:06d}.png")
  entries = sample.t2i_image_entries(SEEDS[:16], SEEDS[:16], [captions[s] for s in SEEDS[:16]])
  (folder / sample.GENERATION_RECORD).write_text(json.dumps(
      {"kind": "text-to-image", "images": entries}), encoding="utf-8")
  record = _clip_run(t2i_samples, f"--images={folder}", "--num=16")
  assert [seed for seed, _ in clip_pairs] == SEEDS[:16]
  assert all(_line_of(caption) == seed for seed, caption in clip_pairs)
  assert sample.GENERATION_RECORD in record["results"][0]["caption_pairing"]
  # --captions whose line differs from the recorded prompt, or --seeds that disagree: refused.
  changed = list(captions)
  changed[1005] = "another caption"
  other = tmp_path / "other.txt"
  other.write_text("\n".join(changed) + "\n", encoding="utf-8")
  with pytest.raises(evaluate.EvaluationError, match=r"001005\.png was generated from prompt "
                     r"'caption of line 1005' \(line 1005.*line 1005 is 'another caption'"):
    _clip_run(t2i_samples, f"--images={folder}", captions=str(other))
  with pytest.raises(evaluate.EvaluationError,
                     match=r"--seeds gives 001000\.png seed 0, but .* records seed 1000"):
    _clip_run(t2i_samples, f"--images={folder}", "--seeds=0-15")
  Image.fromarray(_seed_image(5)).save(folder / "stray.png")
  with pytest.raises(evaluate.EvaluationError, match="stray.png is not listed in"):
    _clip_run(t2i_samples, f"--images={folder}")

  # An .npz of `sample --npz --custom_seed`: random seeds, prompt lines 0..N-1.
  del clip_pairs[:]
  seeds = [77, 5, 1234]
  npz = tmp_path / "images.npz"
  np.savez(npz, arr_0=np.stack([_seed_image(s) for s in seeds]), seeds=np.asarray(seeds),
           prompts=np.asarray(captions[:3]), prompt_lines=np.arange(3))
  _clip_run(t2i_samples, f"--npz={npz}")
  assert clip_pairs == [(s, captions[i]) for i, s in enumerate(seeds)]
