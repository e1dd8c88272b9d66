"""Metrics (FID, IS, precision/recall, KID), reference statistics, protocols, and the sharded
Inception feature extractor (1 vs 8 devices, padding, streaming moments).

Every metric is checked against an independent computation written here in plain numpy/scipy
(brute-force distances, explicit kernel loops, hand-made class probabilities with known scores).
"""

import json
import math
import os

import jax
import numpy as np
import pytest
import scipy.linalg
import scipy.spatial

from sid_jax import sharding
from sid_jax.weights import inception as inception_params
from sid_jax.evaluation import features, metrics, protocols
from sid_jax.nets import inception
from tests import test_inception

DATA = os.path.join(os.path.dirname(__file__), "testdata", "inception")


# ---------------------------------------------------------------------------------------------
# FID.
# ---------------------------------------------------------------------------------------------


def _fid_reference(mu1, s1, mu2, s2):
  """EDM's formula, written out: |mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), real part."""
  root = scipy.linalg.sqrtm(s1 @ s2)
  return float(np.real(np.sum((mu1 - mu2)**2) + np.trace(s1 + s2 - 2 * root)))


def test_fid_from_features_matches_pytorch_fid_fixture():
  z = np.load(os.path.join(DATA, "fid_stats.npz"))
  f1, f2 = z["in/feats1"], z["in/feats2"]
  mu2, sigma2 = metrics.feature_moments(f2)
  np.testing.assert_allclose(mu2, z["out64/mu2"], rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(sigma2, z["out64/sigma2"], rtol=1e-12, atol=1e-12)
  fid = metrics.fid_from_features(f1, mu2, sigma2)
  np.testing.assert_allclose(fid, float(z["out64/fid"]), rtol=1e-6)
  mu1 = f1.astype(np.float64).mean(0)
  centred = f1.astype(np.float64) - mu1
  # ddof=1 (EDM, pytorch-fid) and ddof=0 (StyleGAN3 code), from explicit sums.
  for ddof in (1, 0):
    s1 = centred.T @ centred / (f1.shape[0] - ddof)
    np.testing.assert_allclose(metrics.fid_from_features(f1, mu2, sigma2, ddof=ddof),
                               _fid_reference(mu1, s1, mu2, sigma2), rtol=1e-8)
  assert metrics.fid_from_features(f1, mu2, sigma2, ddof=0) != fid
  assert abs(metrics.fid_from_features(f2, mu2, sigma2)) < 1e-8
  with pytest.raises(ValueError, match="64-d"):
    metrics.fid_from_features(f1, mu2[:10], sigma2[:10, :10])


def test_feature_moments_accumulate_exactly_in_float64():
  rng = np.random.default_rng(0)
  # A large common offset: naive raw-moment sums would lose digits here.
  x = 1e3 + rng.normal(size=(97, 6)) @ rng.normal(size=(6, 6))
  acc = features.FeatureMoments()
  for part in np.split(x, [3, 40, 41, 90]):
    acc.update(part)
  acc.update(x[:0])
  assert acc.num == 97
  np.testing.assert_allclose(acc.mean(), x.mean(0), rtol=1e-14)
  for ddof in (0, 1):
    np.testing.assert_allclose(acc.cov(ddof), np.cov(x, rowvar=False, ddof=ddof), rtol=1e-9,
                               atol=1e-9)
  with pytest.raises(ValueError, match="No features"):
    features.FeatureMoments().mean()


# ---------------------------------------------------------------------------------------------
# Inception Score.
# ---------------------------------------------------------------------------------------------


def test_inception_score_known_values():
  # Identical (uniform) predictions: every KL is 0, IS = 1.
  mean, std = metrics.inception_score(np.zeros((40, 1008)))
  assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
  # Perfectly confident and balanced within each split: IS = number of classes.
  classes = 5
  labels = np.tile(np.arange(classes), 10)
  logits = 1e3 * np.eye(classes)[labels]
  mean, std = metrics.inception_score(logits, splits=10)
  assert mean == pytest.approx(classes, rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)
  # Confident but all one class: IS = 1.
  assert metrics.inception_score(1e3 * np.eye(classes)[np.zeros(20, int)], 2)[0] == \
      pytest.approx(1.0)
  # By hand: p = [1, 0], [0.5, 0.5]; p(y) = [0.75, 0.25].
  kl = (math.log(1 / 0.75) + 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)) / 2
  mean, _ = metrics.inception_score_from_probs(np.array([[1.0, 0.0], [0.5, 0.5]]), splits=1)
  assert mean == pytest.approx(math.exp(kl), rel=1e-12)


def test_inception_score_splits_match_explicit_loops():
  rng = np.random.default_rng(1)
  logits = rng.normal(scale=3.0, size=(23, 7))
  splits = 4
  # Independent reference: explicit loops over rows and classes.
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  scores = []
  n = len(probs)
  for i in range(splits):
    part = probs[i * n // splits:(i + 1) * n // splits]
    marginal = [sum(row[c] for row in part) / len(part) for c in range(7)]
    kl = sum(sum(row[c] * math.log(row[c] / marginal[c]) for c in range(7)) for row in part)
    scores.append(math.exp(kl / len(part)))
  mean, std = metrics.inception_score(logits, splits)
  assert mean == pytest.approx(np.mean(scores), rel=1e-10)
  assert std == pytest.approx(np.std(scores), rel=1e-8)
  with pytest.raises(ValueError, match="at least 10 samples"):
    metrics.inception_score(logits[:9], 10)


# ---------------------------------------------------------------------------------------------
# Precision / recall.
# ---------------------------------------------------------------------------------------------


def _pr_reference(real, fake, k):
  """Brute force in float64: radius = k-th smallest distance to the others in the same set."""

  def radii(points):
    d = scipy.spatial.distance.cdist(points, points)
    np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, k - 1]

  def within(probes, manifold, r):
    d = scipy.spatial.distance.cdist(probes, manifold)
    return np.mean([any(d[i, j] <= r[j] for j in range(len(manifold)))
                    for i in range(len(probes))])

  return {"precision": within(fake, real, radii(real)), "recall": within(real, fake, radii(fake))}


def test_precision_recall_hand_example():
  real = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
  fake = np.array([[0.5], [5.0], [20.0], [2.5]])
  # k=1 radii of real: 1, 1, 1, 1, 7 -> 0.5 in, 5 in (via 10), 20 out, 2.5 in: precision 3/4.
  # radii of fake: 2, 2.5, 15, 2 -> real 0 in (0.5, r 2), 1 in, 2 in, 3 in, 10 in (20, r 15).
  out = metrics.precision_recall(real, fake, k=1)
  assert out == {"precision": 0.75, "recall": 1.0}
  assert out == _pr_reference(real, fake, 1)


@pytest.mark.parametrize("row_batch,col_batch", [(1024, 8192), (8, 16), (5, 3)])
def test_precision_recall_matches_brute_force(row_batch, col_batch):
  rng = np.random.default_rng(2)
  real = rng.normal(size=(57, 16))
  fake = 0.4 + 1.3 * rng.normal(size=(45, 16))
  out = metrics.precision_recall(real, fake, k=3, row_batch=row_batch, col_batch=col_batch)
  ref = _pr_reference(real, fake, 3)
  assert out == ref
  assert 0 < out["precision"] < 1 and 0 < out["recall"] < 1
  same = metrics.precision_recall(real, real, k=3, row_batch=row_batch, col_batch=col_batch)
  assert same == {"precision": 1.0, "recall": 1.0}
  radii2 = metrics.knn_radii2(real, 3, row_batch, col_batch)
  d = scipy.spatial.distance.cdist(real, real)
  np.testing.assert_allclose(np.sqrt(radii2), np.sort(d, axis=1)[:, 3], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# KID.
# ---------------------------------------------------------------------------------------------


def _kid_reference(real, fake, num_subsets, subset_size, seed):
  """Explicit loops over sample pairs, with the same subset draws (fake first, then real)."""
  rs = np.random.RandomState(seed)
  d = real.shape[1]
  m = min(len(real), len(fake), subset_size)

  def kernel(a, b):
    return (float(np.dot(a, b)) / d + 1.0)**3

  values = []
  for _ in range(num_subsets):
    x = fake[rs.choice(len(fake), m, replace=False)]
    y = real[rs.choice(len(real), m, replace=False)]
    kxx = sum(kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    kyy = sum(kernel(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    kxy = sum(kernel(x[i], y[j]) for i in range(m) for j in range(m))
    values.append((kxx + kyy) / (m * (m - 1)) - 2 * kxy / m**2)
  return float(np.mean(values))


def test_kid_matches_explicit_loops():
  rng = np.random.default_rng(3)
  real = rng.normal(size=(30, 8))
  fake = 0.5 + rng.normal(size=(25, 8))
  value = metrics.kid(real, fake, num_subsets=4, subset_size=12, seed=7)
  assert value == pytest.approx(_kid_reference(real, fake, 4, 12, 7), rel=1e-10)
  # The subset size is capped by the smaller set, as in StyleGAN3.
  capped = metrics.kid(real, fake, num_subsets=3, subset_size=1000, seed=1)
  assert capped == pytest.approx(_kid_reference(real, fake, 3, 25, 1), rel=1e-10)
  assert metrics.kid_subset_size(30, 25, 1000) == 25
  # Same distribution: near 0, far below the shifted one.
  other = rng.normal(size=(30, 8))
  assert abs(metrics.kid(real, other, 20, 30)) < 0.2 * value
  with pytest.raises(ValueError, match="same D"):
    metrics.kid(real, fake[:, :4])


# ---------------------------------------------------------------------------------------------
# Reference statistics files.
# ---------------------------------------------------------------------------------------------


def test_ref_stats_edm_style_and_own_format(tmp_path):
  rng = np.random.default_rng(4)
  feats = rng.normal(size=(20, 6))
  mu, sigma = metrics.feature_moments(feats)
  edm = tmp_path / "edm.npz"
  np.savez(edm, mu=mu, sigma=sigma)
  ref = metrics.load_ref_stats(str(edm))
  assert ref.kind == "edm" and ref.num is None and ref.protocol is None and ref.features is None
  np.testing.assert_array_equal(ref.mu, mu)
  np.testing.assert_array_equal(ref.sigma, sigma)

  own = tmp_path / "sub" / "own.npz"
  metrics.save_ref_stats(str(own), mu, sigma, "edm-fid50k", 20, features=feats,
                         detector_hash="ab" * 32, source=json.dumps({"kind": "npz"}))
  ref = metrics.load_ref_stats(str(own))
  assert ref.kind == "sid_jax" and ref.num == 20 and ref.protocol == "edm-fid50k"
  assert ref.detector == protocols.PYTORCH_FID_POOL3
  assert ref.resize == protocols.RESIZE_TF1_BILINEAR_299
  assert ref.detector_hash == "ab" * 32 and json.loads(ref.source) == {"kind": "npz"}
  np.testing.assert_array_equal(ref.mu, mu)
  np.testing.assert_array_equal(ref.sigma, sigma)
  np.testing.assert_array_equal(ref.features, feats.astype(np.float32))
  assert ref.describe()["ref_has_features"] and ref.describe()["ref_num"] == 20
  assert ref.describe()["ref_source"] == {"kind": "npz"}
  # EDM's own loader only reads mu and sigma: they are plain float64 arrays.
  with np.load(own) as z:
    assert z["mu"].dtype == np.float64 and z["sigma"].shape == (6, 6)


def test_ref_stats_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="make-ref"):
    metrics.load_ref_stats(str(tmp_path / "missing.npz"))
  images = tmp_path / "images.npz"
  np.savez(images, arr_0=np.zeros((2, 4, 4, 3), np.uint8))
  with pytest.raises(ValueError, match="make-ref --npz"):
    metrics.load_ref_stats(str(images))
  bad = tmp_path / "bad.npz"
  np.savez(bad, mu=np.zeros(3), sigma=np.zeros((3, 2)))
  with pytest.raises(ValueError, match=r"sigma \[D, D\]"):
    metrics.load_ref_stats(str(bad))
  with pytest.raises(ValueError, match="features must be"):
    metrics.save_ref_stats(str(tmp_path / "x.npz"), np.zeros(3), np.eye(3), "edm-fid50k", 5,
                           features=np.zeros((4, 3)))
  with pytest.raises(ValueError, match="Unknown evaluation protocol"):
    metrics.save_ref_stats(str(tmp_path / "x.npz"), np.zeros(3), np.eye(3), "fid-magic", 5)


# ---------------------------------------------------------------------------------------------
# Protocols.
# ---------------------------------------------------------------------------------------------


def test_protocol_registry_names_and_fields():
  for name in ("edm-fid50k", "sid-fid50k-full", "pytorch-fid50k", "is50k", "pr50k3", "kid50k",
               "gmm-frechet", "digits-classifier-fd", "coco2014-fid30k-clean"):
    p = protocols.get(name)
    fields = p.fields()
    assert fields["protocol"] == name and fields["standard_protocol"]
    for key in ("detector", "resize", "reference", "num_samples", "params", "notes"):
      assert fields[key] not in (None, ""), (name, key)
    assert name in protocols.table()
  assert protocols.get("edm-fid50k").param("cov_ddof") == 1
  assert protocols.get("sid-fid50k-full").param("cov_ddof") == 0
  assert protocols.get("is50k").param("splits") == 10
  assert protocols.get("pr50k3").param("k") == 3
  # Every registered FID protocol is computed, with its front-end and square-root rule named.
  for name in protocols.names():
    p = protocols.get(name)
    if p.metric == "fid":
      assert p.implemented and p.param("sqrtm") in ("real", "pytorch-fid", "clean-fid"), name
      assert protocols.FRONT_END_RESIZE[p.front_end] == p.resize, name
      assert p.fields()["front_end"] == p.front_end and p.comparable_with, name
  assert set(protocols.DEFAULT_FOR_METRIC) == {"fid", "is", "pr", "kid", "gmm"}
  with pytest.raises(ValueError, match="registered: .*edm-fid50k"):
    protocols.get("fid50k")
  with pytest.raises(ValueError, match="already registered"):
    protocols.register(protocols.get("is50k"))


def test_derived_protocols_carry_their_changes_in_the_name():
  fid = protocols.get("edm-fid50k")
  small = fid.derive(num_samples=1000)
  assert small.name == "edm-fid50k[n=1000]" and not small.standard and small.base == fid.name
  assert small.fields()["num_samples"] == 1000 and not small.fields()["standard_protocol"]
  assert fid.derive(num_samples=50_000) is fid
  assert small.derive(num_samples=50_000) is fid
  is_ = protocols.get("is50k").derive(num_samples=12, splits=3)
  assert is_.name == "is50k[n=12,splits=3]" and is_.param("splits") == 3
  assert protocols.get("is50k").derive(splits=10).standard
  kid = protocols.get("kid50k").derive(subset_size=12)
  assert kid.name == "kid50k[subset_size=12]"
  with pytest.raises(ValueError, match="no parameters"):
    fid.derive(splits=2)
  assert protocols.same_features(protocols.PYTORCH_FID_POOL3, protocols.RESIZE_TF1_BILINEAR_299,
                                 None, None)
  assert not protocols.same_features("clean-fid", None, protocols.PYTORCH_FID_POOL3, None)


# ---------------------------------------------------------------------------------------------
# Features on a mesh (random-weight FID Inception).
# ---------------------------------------------------------------------------------------------


def _random_inception_state_dict(seed=0):
  """A pytorch-fid-shaped state dict with random weights (shapes from full_network_keys.txt)."""
  part1, _ = test_inception._read_key_file()
  return test_inception._synthetic_state_dict(part1, seed=seed)


@pytest.fixture(scope="module")
def variables():
  state_dict = _random_inception_state_dict()
  assert len(state_dict) == 566
  return inception_params.torch_state_dict_to_flax(state_dict, inception.FIDInceptionV3())


def test_features_agree_on_1_and_8_devices_and_padding_changes_nothing(variables):
  images = np.random.default_rng(5).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
  one = features.InceptionFeatures(variables, sharding.make_mesh({"data": 1}, jax.devices()[:1]),
                                   batch_size=4)  # batches 4, 4, 2 (+2 padding)
  eight = features.InceptionFeatures(variables, sharding.make_mesh({"data": 8}), batch_size=8)
  a = one(images)
  b = eight(images)  # batches 8, 2 (+6 padding)
  assert one.num_gathers == 1 and eight.num_gathers == 1
  for out in (a, b):
    assert out["pool"].shape == (10, 2048) and out["logits_unbiased"].shape == (10, 1008)
    assert out["pool"].dtype == np.float64 and np.isfinite(out["pool"]).all()
  assert a["pool"].std(axis=0).max() > 0  # the images give different features
  for key in features.FEATURE_KEYS:
    scale = np.abs(a[key]).max()
    np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-5 * scale)
  # Statistics agree too.
  ma, sa = metrics.feature_moments(a["pool"])
  mb, sb = metrics.feature_moments(b["pool"])
  np.testing.assert_allclose(mb, ma, rtol=1e-5, atol=1e-5 * np.abs(ma).max())
  np.testing.assert_allclose(sb, sa, rtol=1e-4, atol=1e-5 * np.abs(sa).max())
  # Images 8 and 9 went through a padded batch; in a full batch they give the same features.
  full = eight(images[2:])
  for key in features.FEATURE_KEYS:
    np.testing.assert_allclose(full[key][6:], b[key][8:], rtol=1e-6,
                               atol=1e-6 * np.abs(b[key]).max())
  assert eight.num_gathers == 2

  # Streaming over uneven batches: same features, and float64 moments without keeping them.
  gathers = eight.num_gathers
  streamed = eight.stream(iter(np.split(images, [3, 8, 9])), keep=("pool", "logits_unbiased"))
  assert eight.num_gathers == gathers + 2  # one per detector batch of 8
  assert streamed.num == 10
  for key in features.FEATURE_KEYS:
    np.testing.assert_allclose(streamed.features[key], b[key], rtol=1e-6,
                               atol=1e-6 * np.abs(b[key]).max())
  np.testing.assert_allclose(streamed.moments.mean(), mb, rtol=1e-10, atol=1e-12)
  for ddof in (0, 1):
    np.testing.assert_allclose(streamed.moments.cov(ddof),
                               np.cov(streamed.features["pool"], rowvar=False, ddof=ddof),
                               rtol=1e-8, atol=1e-12)
  fid_only = eight.stream(iter([images]))
  assert fid_only.features == {} and fid_only.num == 10


def test_feature_extractor_rejects_bad_input(variables):
  mesh = sharding.make_mesh({"data": 8})
  with pytest.raises(ValueError, match="multiple of the mesh's 8 batch shards"):
    features.InceptionFeatures(variables, mesh, batch_size=12)
  extractor = features.InceptionFeatures(variables, mesh, batch_size=8)
  with pytest.raises(ValueError, match="uint8"):
    extractor(np.zeros((2, 16, 16, 3), np.float32))
  with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
    extractor(np.zeros((2, 16, 16, 1), np.uint8))
  with pytest.raises(ValueError, match="Unknown feature names"):
    extractor.stream(iter([]), keep=("logits",))
  with pytest.raises(ValueError, match="empty"):
    extractor.stream(iter([]))
  assert extractor.num_gathers == 0


def test_loading_inception_weights_names_the_needed_file(tmp_path):
  with pytest.raises(FileNotFoundError,
                     match=r"pt_inception-2015-12-05-6726825d\.pth.*github\.com/mseitzer"):
    features.load_inception_variables(str(tmp_path / "nope.pth"))
  with pytest.raises(FileNotFoundError, match="No Inception weights given"):
    features.load_inception_variables(None)
  bad = tmp_path / "weights.npz"
  np.savez(bad, **{"fc.weight": np.zeros((1008, 2048), np.float32)})
  with pytest.raises(ValueError, match=r"\d+ missing:\n  Conv2d_1a_3x3\.bn\.running_mean "):
    features.load_inception_variables(str(bad))
