"""Metrics of generator samples against a Gaussian-mixture teacher, whose moments are exact."""

from __future__ import annotations

import numpy as np

from sid_jax.evaluation import frechet


def gmm_metrics(samples: np.ndarray, labels: np.ndarray | None, means: np.ndarray,
                mixture_mean: np.ndarray, mixture_cov: np.ndarray) -> dict[str, float]:
  """Fréchet distance to the exact mixture and how samples fall onto its components.

  Args:
    samples: [N, H, W, C] generated images.
    labels: [N] requested component per sample (None for an unconditional generator).
    means: [K, H, W, C] component means.  mixture_mean / mixture_cov: exact flat moments.
  Returns:
    frechet_distance; nearest_component_fractions_tv (total variation between the histogram of
    nearest components and its target, see below); nearest_component_accuracy (fraction whose nearest
    component is the requested one, conditional runs only); mean_distance_to_nearest_mean.
    The histogram is compared with that of the requested labels (conditional) or with uniform.
  """
  flat = np.asarray(samples, np.float64).reshape(samples.shape[0], -1)
  finite = np.all(np.isfinite(flat), axis=1)
  if not finite.all() or not np.all(np.isfinite(means)):
    # A diverged generator or teacher: report it rather than crash the run's evaluation.
    return {"frechet_distance": float("nan"), "nonfinite_sample_fraction": float(1 - finite.mean())}
  mu, cov = frechet.feature_moments(flat)
  out = {"frechet_distance": frechet.frechet_distance(mu, cov, mixture_mean, mixture_cov)}
  m = np.asarray(means, np.float64).reshape(means.shape[0], -1)
  d2 = np.sum(flat**2, 1)[:, None] - 2 * flat @ m.T + np.sum(m**2, 1)[None]
  nearest = np.argmin(d2, axis=1)
  frac = np.bincount(nearest, minlength=m.shape[0]) / flat.shape[0]
  if labels is None:
    target = np.full(m.shape[0], 1.0 / m.shape[0])
  else:
    target = np.bincount(np.asarray(labels), minlength=m.shape[0]) / flat.shape[0]
  out["nearest_component_fractions_tv"] = float(0.5 * np.abs(frac - target).sum())
  out["mean_distance_to_nearest_mean"] = float(np.mean(np.sqrt(np.maximum(d2.min(1), 0))))
  if labels is not None:
    out["nearest_component_accuracy"] = float(np.mean(nearest == np.asarray(labels)))
  return out
