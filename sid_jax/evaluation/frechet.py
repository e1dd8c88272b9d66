"""The Fréchet distance between two Gaussians, as FID computes it, under each reference's rule.

FD = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) with scipy's `sqrtm` in float64. The reference
implementations differ in what they do when `sqrtm` is not a clean real matrix (a product that
is singular or not positive semi-definite in floating point), so every FID names its rule
(`SQRTM_RULES`, a protocol parameter):

  'real'         EDM's `fid.py`, StyleGAN3's and SiD's metric code: the real part of the whole
                 expression, whatever `sqrtm` returned (no fallback, never an error).
  'pytorch-fid'  pytorch-fid's `calculate_frechet_distance`: if `sqrtm` has a non-finite entry, add
                 eps * I to both covariances and take it again; if the result is complex and any
                 diagonal entry's imaginary part exceeds 1e-3 (`np.allclose(diag.imag, 0,
                 atol=1e-3)` fails), raise ValueError naming the largest imaginary component;
                 otherwise the real part.
  'clean-fid'    clean-fid's `frechet_distance`: the same eps fallback, then the real part (its
                 imaginary-component check is commented out in clean-fid's code).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

SQRTM_RULES = ("real", "pytorch-fid", "clean-fid")


class ImaginaryComponentError(ValueError):
  """pytorch-fid's rule refused a square root with a large imaginary part."""


def feature_moments(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and unbiased covariance (np.cov, rowvar=False) of [N, D] features, in float64."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"Need [N>=2, D] features, got shape {features.shape}.")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6,
                     sqrtm_rule: str = "pytorch-fid") -> float:
  """FD between N(mu1, sigma1) and N(mu2, sigma2) under `sqrtm_rule` (see the module docstring).

  FID protocols pass their own rule (`metrics.protocol_fid`); the default, pytorch-fid's, serves
  the non-Inception Fréchet distances (gmm-frechet, digits-classifier-fd). `eps` is the identity
  multiple of the 'pytorch-fid' and 'clean-fid' fallback.

  Raises:
    ImaginaryComponentError: 'pytorch-fid' only, as pytorch-fid raises.
    ValueError: mismatched shapes or an unknown rule.
  """
  if sqrtm_rule not in SQRTM_RULES:
    raise ValueError(f"Unknown FID square-root rule {sqrtm_rule!r}; expected one of "
                     f"{SQRTM_RULES}.")
  mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f"Moment shapes differ: mu {mu1.shape} vs {mu2.shape}, "
                     f"sigma {sigma1.shape} vs {sigma2.shape}.")
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if sqrtm_rule == "real":
    return float(np.real(diff @ diff + np.trace(sigma1 + sigma2 - 2 * covmean)))
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if sqrtm_rule == "pytorch-fid" and not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ImaginaryComponentError(
          "FID (sqrtm rule 'pytorch-fid'): sqrtm(S1 S2) has an imaginary component "
          f"{np.max(np.abs(covmean.imag))}, which pytorch-fid refuses.")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
