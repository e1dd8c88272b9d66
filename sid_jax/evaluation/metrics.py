"""Sample-quality metrics on detector features: FID, Inception Score, precision/recall, KID.

All of them take host arrays (features are float64 after `sid_jax.evaluation.features`) and follow
the reference implementations' formulas (see each function); `sid_jax.evaluation.protocols` names
the settings a reported number was measured with. Reference statistics for FID are read from
EDM-style `.npz` files (`mu`, `sigma`) or from the files `save_ref_stats` writes, which also
record how the statistics were made.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sid_jax.evaluation import frechet
from sid_jax.evaluation import protocols as protocols_lib

REF_STATS_FORMAT = "sid_jax.ref_stats/1"


# ---------------------------------------------------------------------------------------------
# FID.
# ---------------------------------------------------------------------------------------------


def feature_moments(features: np.ndarray, ddof: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance of [N, D] features in float64; `ddof` 1 as EDM / pytorch-fid, 0 as
  StyleGAN3's metric code."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] <= ddof:
    raise ValueError(f"Need [N > {ddof}, D] features, got shape {features.shape}.")
  return features.mean(axis=0), np.cov(features, rowvar=False, ddof=ddof)


def fid_from_moments(mu, sigma, ref_mu, ref_sigma, *, sqrtm_rule: str = "real") -> float:
  """FID between two Gaussians (`sid_jax.evaluation.frechet.frechet_distance`); `sqrtm_rule` is
  the protocol's `sqrtm` parameter: 'real' (EDM / StyleGAN3 / SiD), 'pytorch-fid' or
  'clean-fid'."""
  return frechet.frechet_distance(mu, sigma, ref_mu, ref_sigma, sqrtm_rule=sqrtm_rule)


def protocol_fid(mu, sigma, ref_mu, ref_sigma, protocol: protocols_lib.Protocol) -> float:
  """FID under `protocol`'s square-root rule (the moments must already use its `cov_ddof`)."""
  if protocol.metric != "fid":
    raise ValueError(f"Protocol {protocol.name!r} is a {protocol.metric!r} protocol, not FID.")
  return fid_from_moments(mu, sigma, ref_mu, ref_sigma, sqrtm_rule=protocol.param("sqrtm"))


def fid_from_features(features: np.ndarray, ref_mu, ref_sigma, *, ddof: int = 1,
                      sqrtm_rule: str = "real") -> float:
  """FID of [N, D] features against reference moments (`ddof`: the protocol's `cov_ddof`)."""
  mu, sigma = feature_moments(features, ddof)
  ref_mu, ref_sigma = np.asarray(ref_mu, np.float64), np.asarray(ref_sigma, np.float64)
  if ref_mu.shape != mu.shape or ref_sigma.shape != sigma.shape:
    raise ValueError(f"Reference statistics have mu {ref_mu.shape} / sigma {ref_sigma.shape}, "
                     f"but the features are {features.shape[1]}-d.")
  return fid_from_moments(mu, sigma, ref_mu, ref_sigma, sqrtm_rule=sqrtm_rule)


# ---------------------------------------------------------------------------------------------
# Inception Score.
# ---------------------------------------------------------------------------------------------


def softmax(logits: np.ndarray) -> np.ndarray:
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=1, keepdims=True)
  e = np.exp(shifted)
  return e / e.sum(axis=1, keepdims=True)


def inception_score_from_probs(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
  """IS of class probabilities [N, C]: mean and std over `splits` consecutive splits.

  As StyleGAN3's `inception_score.py`: split i holds rows [i N / s, (i + 1) N / s); its score is
  exp(mean over rows of KL(p(y|x) || mean p(y))). Zero probabilities contribute 0 (x log x -> 0).
  """
  probs = np.asarray(probs, np.float64)
  if probs.ndim != 2:
    raise ValueError(f"Expected [N, C] probabilities, got shape {probs.shape}.")
  n = probs.shape[0]
  if splits < 1 or n < splits:
    raise ValueError(f"Inception Score with {splits} splits needs at least {splits} samples, "
                     f"got {n}.")
  scores = []
  for i in range(splits):
    part = probs[i * n // splits:(i + 1) * n // splits]
    marginal = part.mean(axis=0, keepdims=True)
    positive = part > 0
    log_ratio = np.log(np.where(positive, part, 1.0)) - np.log(np.where(positive, marginal, 1.0))
    kl = np.where(positive, part * log_ratio, 0.0).sum(axis=1).mean()
    scores.append(np.exp(kl))
  return float(np.mean(scores)), float(np.std(scores))


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
  """IS from the detector's bias-free logits [N, 1008] (softmax first); (mean, std) over splits."""
  return inception_score_from_probs(softmax(logits), splits)


# ---------------------------------------------------------------------------------------------
# Improved precision and recall.
# ---------------------------------------------------------------------------------------------


def _squared_distances(rows, cols):
  hi = jax.lax.Precision.HIGHEST
  d2 = (jnp.sum(rows * rows, axis=1)[:, None] + jnp.sum(cols * cols, axis=1)[None, :] -
        2 * jnp.dot(rows, cols.T, precision=hi))
  return jnp.maximum(d2, 0.0)


@functools.partial(jax.jit, static_argnames=("k",))
def _smallest_in_chunk(rows, cols, col_valid, best, *, k):
  """Merges the k smallest squared distances of `rows` to the valid `cols` into `best`."""
  d2 = jnp.where(col_valid[None, :], _squared_distances(rows, cols), jnp.inf)
  merged = jnp.concatenate([best, d2], axis=1)
  return -jax.lax.top_k(-merged, k)[0]


@jax.jit
def _within_in_chunk(rows, cols, col_radii2, col_valid, found):
  """found |= any valid col with |row - col|^2 <= radius(col)^2."""
  d2 = _squared_distances(rows, cols)
  hit = (d2 <= col_radii2[None, :]) & col_valid[None, :]
  return found | jnp.any(hit, axis=1)


def _chunks(x: np.ndarray, size: int):
  """(padded float32 chunk, valid mask, number of valid rows) over the rows of x."""
  for start in range(0, x.shape[0], size):
    part = x[start:start + size]
    valid = np.zeros(size, bool)
    valid[:part.shape[0]] = True
    if part.shape[0] < size:
      part = np.concatenate([part, np.zeros((size - part.shape[0],) + part.shape[1:], part.dtype)])
    yield jnp.asarray(part, jnp.float32), jnp.asarray(valid), int(valid.sum())


def knn_radii2(manifold: np.ndarray, k: int, row_batch: int = 1024,
               col_batch: int = 8192) -> np.ndarray:
  """Squared distance of each point to its k-th nearest neighbour in `manifold`, self excluded.

  As StyleGAN3's `precision_recall.py` (the (k + 1)-th smallest distance, the point itself being
  the first), in batched float32 on the default device.
  """
  manifold = np.asarray(manifold)
  if manifold.shape[0] <= k:
    raise ValueError(f"k={k} nearest neighbours need more than {k} points, got "
                     f"{manifold.shape[0]}.")
  col_batch = min(col_batch, manifold.shape[0])
  row_batch = min(row_batch, manifold.shape[0])
  out = []
  for rows, _, n_rows in _chunks(manifold, row_batch):
    best = jnp.full((row_batch, k + 1), jnp.inf, jnp.float32)
    for cols, valid, _ in _chunks(manifold, col_batch):
      best = _smallest_in_chunk(rows, cols, valid, best, k=k + 1)
    out.append(np.asarray(best[:n_rows, k]))
  return np.concatenate(out).astype(np.float64)


def _fraction_within(probes: np.ndarray, manifold: np.ndarray, radii2: np.ndarray,
                     row_batch: int, col_batch: int) -> float:
  col_batch = min(col_batch, manifold.shape[0])
  row_batch = min(row_batch, probes.shape[0])
  radii_chunks = list(_chunks(np.asarray(radii2, np.float32)[:, None], col_batch))
  hits = 0
  for rows, _, n_rows in _chunks(probes, row_batch):
    found = jnp.zeros((row_batch,), bool)
    for (cols, valid, _), (radii, _, _) in zip(_chunks(manifold, col_batch), radii_chunks):
      found = _within_in_chunk(rows, cols, radii[:, 0], valid, found)
    hits += int(np.asarray(found[:n_rows]).sum())
  return hits / probes.shape[0]


def precision_recall(real_feats: np.ndarray, fake_feats: np.ndarray, k: int = 3, *,
                     row_batch: int = 1024, col_batch: int = 8192) -> dict[str, float]:
  """Improved precision and recall (Kynkäänniemi et al. 2019), as StyleGAN3's metric code.

  precision = share of generated features within the k-NN radius of some real feature;
  recall = share of real features within the k-NN radius of some generated feature. Radii are
  distances to the k-th nearest neighbour within the same set, excluding the point itself; a probe
  on a sphere's boundary counts as inside. Distances are computed in row x column batches.
  """
  real = np.asarray(real_feats)
  fake = np.asarray(fake_feats)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f"Expected [N, D] features of the same D, got {real.shape} and {fake.shape}.")
  out = {}
  for name, manifold, probes in (("precision", real, fake), ("recall", fake, real)):
    radii2 = knn_radii2(manifold, k, row_batch, col_batch)
    out[name] = _fraction_within(probes, manifold, radii2, row_batch, col_batch)
  return out


# ---------------------------------------------------------------------------------------------
# KID.
# ---------------------------------------------------------------------------------------------


def kid(real: np.ndarray, fake: np.ndarray, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> float:
  """Kernel Inception Distance: unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, subset average.

  As StyleGAN3's `kernel_inception_distance.py`: m = min(N_real, N_fake, subset_size); for each
  subset draw m generated then m real rows without replacement (here from
  `np.random.RandomState(seed)`), and accumulate the unbiased estimate
  (sum_{i!=j} k(x_i,x_j) + k(y_i,y_j)) / (m (m-1)) - 2 sum_{i,j} k(x_i,y_j) / m^2.
  """
  real = np.asarray(real, np.float64)
  fake = np.asarray(fake, np.float64)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f"Expected [N, D] features of the same D, got {real.shape} and {fake.shape}.")
  d = real.shape[1]
  m = min(real.shape[0], fake.shape[0], subset_size)
  if m < 2:
    raise ValueError(f"KID needs at least 2 real and 2 generated samples, got {real.shape[0]} "
                     f"and {fake.shape[0]}.")
  rs = np.random.RandomState(seed)
  total = 0.0
  for _ in range(num_subsets):
    x = fake[rs.choice(fake.shape[0], m, replace=False)]
    y = real[rs.choice(real.shape[0], m, replace=False)]
    a = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
    b = (x @ y.T / d + 1) ** 3
    total += (a.sum() - np.trace(a)) / (m - 1) - b.sum() * 2 / m
  return float(total / num_subsets / m)


def kid_subset_size(num_real: int, num_fake: int, subset_size: int) -> int:
  """The subset size `kid` actually uses."""
  return min(num_real, num_fake, subset_size)


# ---------------------------------------------------------------------------------------------
# Reference statistics.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RefStats:
  """Reference statistics for FID (and, when stored, the reference features for PR / KID).

  `kind` is 'edm' for a plain `mu`/`sigma` file (nothing else known about it) and 'sid_jax' for a
  file from `save_ref_stats`, which also knows its protocol, detector and sample count.
  """
  path: str
  kind: str
  mu: np.ndarray
  sigma: np.ndarray
  num: int | None = None
  protocol: str | None = None
  detector: str | None = None
  resize: str | None = None
  detector_hash: str | None = None
  source: str | None = None
  features: np.ndarray | None = None

  def describe(self) -> dict[str, Any]:
    """What an output record says about its reference statistics."""
    try:
      source = json.loads(self.source) if self.source else None
    except json.JSONDecodeError:
      source = self.source
    return {
        "ref_path": self.path,
        "ref_format": self.kind,
        "ref_protocol": self.protocol,
        "ref_num": self.num,
        "ref_source": source,
        "ref_has_features": self.features is not None,
    }


def save_ref_stats(path: str, mu, sigma, protocol: protocols_lib.Protocol | str, num: int, *,
                   features: np.ndarray | None = None, detector_hash: str | None = None,
                   source: str | None = None) -> None:
  """Writes reference statistics (`mu`, `sigma` float64, so EDM's code reads them too) and their
  provenance: protocol name, detector, resize, sample count, detector weights hash, source, and
  optionally the [N, D] features themselves (float32) for precision/recall and KID."""
  if isinstance(protocol, str):
    protocol = protocols_lib.get(protocol)
  mu = np.asarray(mu, np.float64)
  sigma = np.asarray(sigma, np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"Expected mu [D] and sigma [D, D], got {mu.shape} and {sigma.shape}.")
  arrays = dict(mu=mu, sigma=sigma, num=np.int64(num), format=np.str_(REF_STATS_FORMAT),
                protocol=np.str_(protocol.name), detector=np.str_(protocol.detector),
                resize=np.str_(protocol.resize), detector_hash=np.str_(detector_hash or ""),
                source=np.str_(source or ""))
  if features is not None:
    features = np.asarray(features, np.float32)
    if features.shape != (num, mu.shape[0]):
      raise ValueError(f"features must be [num={num}, {mu.shape[0]}], got {features.shape}.")
    arrays["features"] = features
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp.npz")
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def load_ref_stats(path: str) -> RefStats:
  """Reads an EDM-style `.npz` (`mu`, `sigma`) or a `save_ref_stats` file.

  Raises:
    FileNotFoundError: the file does not exist (the message says how to make one).
    ValueError: the file holds something else (e.g. images) or mis-shaped moments.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"Reference statistics {path!r} do not exist. Use EDM's fid-refs .npz for the dataset "
        "(https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/, downloaded by you), or build them from "
        "real images: python -m sid_jax.evaluate make-ref --images DIR|--npz FILE|--tfds "
        "NAME:SPLIT --inception FILE --out STATS.npz")
  if not path.endswith(".npz"):
    raise ValueError(f"Reference statistics must be an .npz with 'mu' and 'sigma', got {path!r}.")
  with np.load(path, allow_pickle=False) as z:
    files = set(z.files)
    if not {"mu", "sigma"} <= files:
      hint = (" It looks like an image array: build statistics from it with `python -m "
              "sid_jax.evaluate make-ref --npz`." if files & {"arr_0", "images"} else "")
      raise ValueError(f"{path} has no 'mu' and 'sigma' entries (it has {sorted(files)}).{hint}")
    mu = np.asarray(z["mu"], np.float64)
    sigma = np.asarray(z["sigma"], np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
      raise ValueError(f"{path}: expected mu [D] and sigma [D, D], got {mu.shape} and "
                       f"{sigma.shape}.")
    if "format" not in files:
      return RefStats(path=path, kind="edm", mu=mu, sigma=sigma)
    fmt = str(z["format"])
    if fmt != REF_STATS_FORMAT:
      raise ValueError(f"{path} is in format {fmt!r}; this version reads {REF_STATS_FORMAT!r}.")
    text = lambda key: str(z[key]) or None  # noqa: E731
    features = np.asarray(z["features"]) if "features" in files else None
    return RefStats(path=path, kind="sid_jax", mu=mu, sigma=sigma, num=int(z["num"]),
                    protocol=text("protocol"), detector=text("detector"), resize=text("resize"),
                    detector_hash=text("detector_hash"), source=text("source"),
                    features=features)


def check_ref_fits(ref: RefStats, protocol: protocols_lib.Protocol,
                   weights_hash: str | None) -> None:
  """Raises ValueError unless `ref` was made with `protocol`'s detector and resize (and, when
  both are known, with the same Inception weights)."""
  if not protocols_lib.same_features(ref.detector, ref.resize, protocols_lib.PYTORCH_FID_POOL3,
                                     protocol.resize):
    raise ValueError(
        f"Reference statistics {ref.path} were made with detector {ref.detector!r} and resize "
        f"{ref.resize!r}, but protocol {protocol.name!r} uses "
        f"{protocols_lib.PYTORCH_FID_POOL3!r} and {protocol.resize!r}; their numbers are not "
        "comparable.")
  if weights_hash and ref.detector_hash and ref.detector_hash != weights_hash:
    raise ValueError(
        f"Reference statistics {ref.path} were made with other Inception weights (sha256 "
        f"{ref.detector_hash[:12]}...) than the detector given (sha256 {weights_hash[:12]}...).")
