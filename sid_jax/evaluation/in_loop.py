"""The metric the training loop computes on its EMA generator, and which value counts as "best".

`build_scorer(config, ...)` picks one of:

* `fid`    — FID with pytorch-fid's Inception-v3 (`config.eval.inception`) against reference
             statistics (`config.eval.ref`, EDM fid-refs or `sid_jax.evaluate make-ref`), under
             the FID protocol `config.eval.protocol` with `config.eval.num_samples` samples.
             Features are computed batch-sharded over the run's mesh and gathered once.
* `gmm`    — Fréchet distance to the analytic mixture teacher's exact moments.
* `digits` — the digits demo's classifier Fréchet distance and accuracy.
* `none`   — nothing (sample grids only).

`auto` means `gmm` for a mixture teacher, `fid` when both `config.eval.inception` and
`config.eval.ref` are set, and `none` otherwise. The inputs of every evaluation (z, labels) come
from `config.eval.seed`, so values at different steps are comparable. `Scorer.best_metric` is the
value whose minimum the run keeps in `WORKDIR/checkpoints_best` (`config.eval.best_metric`:
'auto' = `fid` for FID, `frechet_distance` for gmm/digits; '' = no best checkpoint).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import numpy as np

from sid_jax import images
from sid_jax.evaluation import digits as digits_eval
from sid_jax.evaluation import features as features_lib
from sid_jax.evaluation import gmm as gmm_eval
from sid_jax.evaluation import metrics as metrics_lib
from sid_jax.evaluation import protocols

KINDS = ("auto", "gmm", "digits", "fid", "none")
_AUTO_BEST = {"fid": "fid", "gmm": "frechet_distance", "digits": "frechet_distance"}


@dataclasses.dataclass
class Scorer:
  """Scores generated samples: `score(x [N, H, W, C] float in [-1, 1], label ids | None)`."""
  kind: str
  protocol: str | None
  best_metric: str | None
  score: Callable[[np.ndarray, np.ndarray | None], dict[str, float]]


def resolve_kind(config) -> str:
  """The evaluation kind of `config` ('auto' resolved); raises ValueError on a bad setting."""
  ev = config.eval
  kind = ev.kind
  if kind not in KINDS:
    raise ValueError(f"config.eval.kind={kind!r}; expected one of {', '.join(KINDS)}.")
  if kind == "auto":
    if config.teacher.type == "gmm":
      return "gmm"
    return "fid" if ev.get("inception", "") and ev.get("ref", "") else "none"
  if kind == "gmm" and config.teacher.type != "gmm":
    raise ValueError("config.eval.kind='gmm' needs config.teacher.type='gmm'.")
  return kind


def resolve_best_metric(config, kind: str) -> str | None:
  best = config.eval.get("best_metric", "auto")
  if best in ("", "none", None):
    return None
  if best == "auto":
    return _AUTO_BEST.get(kind)
  if kind == "none":
    raise ValueError(f"config.eval.best_metric={best!r} needs an evaluation, but "
                     "config.eval.kind resolves to 'none'.")
  return best


def check_config(config) -> None:
  """Everything the in-loop evaluation needs, checked before anything is compiled."""
  ev = config.eval
  kind = resolve_kind(config)
  resolve_best_metric(config, kind)
  if ev.get("every_kimg", 0.0) < 0:
    raise ValueError(f"config.eval.every_kimg must be >= 0, got {ev.every_kimg}.")
  if kind != "fid":
    return
  for name in ("inception", "ref"):
    path = ev.get(name, "")
    if not path:
      raise ValueError(f"config.eval.kind='fid' needs config.eval.{name} (" + (
          "pytorch-fid's pt_inception-2015-12-05-6726825d.pth or its .npz" if name == "inception"
          else "reference statistics .npz: EDM fid-refs or `python -m sid_jax.evaluate "
          "make-ref`") + ").")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"config.eval.{name}={path!r}: no such file.")
  if config.data.channels not in (1, 3):
    raise ValueError(
        f"config.eval.kind='fid' needs generators of images (1 or 3 channels); this one makes "
        f"{config.data.channels}-channel latents, which would need decoding first.")
  protocol = protocols.get(ev.protocol)
  if protocol.metric != "fid" or not protocol.implemented:
    raise ValueError(f"config.eval.protocol={ev.protocol!r} is not an FID protocol sid_jax "
                     "computes.")


class InLoopFID:
  """FID of float samples in [-1, 1] (exported to uint8 as the official code does)."""

  def __init__(self, inception_path: str, ref_path: str, protocol_name: str, mesh, batch: int):
    self.protocol = protocols.get(protocol_name)
    self.ref = metrics_lib.load_ref_stats(ref_path)
    if self.ref.mu.shape[0] != 2048:
      raise ValueError(f"config.eval.ref={ref_path!r} holds {self.ref.mu.shape[0]}-d "
                       "statistics; the Inception pool features are 2048-d.")
    variables = features_lib.load_inception_variables(inception_path)
    self.detector = features_lib.InceptionFeatures(variables, mesh, batch_size=batch,
                                                   front_end=self.protocol.front_end)
    metrics_lib.check_ref_fits(self.ref, self.protocol, self.detector.weights_hash)

  def __call__(self, x: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
    del labels
    x = np.asarray(x, np.float32)
    finite = np.all(np.isfinite(x.reshape(len(x), -1)), axis=1)
    if not finite.all():
      return {"fid": float("nan"), "nonfinite_sample_fraction": float(1 - finite.mean())}
    u8 = images.to_uint8(x)
    if u8.shape[-1] == 1:
      u8 = np.repeat(u8, 3, axis=-1)
    pool = self.detector(u8)["pool"]
    mu, sigma = metrics_lib.feature_moments(pool, ddof=self.protocol.param("cov_ddof"))
    return {"fid": metrics_lib.protocol_fid(mu, sigma, self.ref.mu, self.ref.sigma,
                                            self.protocol),
            "num_images": float(len(pool))}


def build_scorer(config, *, mesh, teacher: Any = None) -> Scorer:
  """The scorer of `config.eval` (see the module docstring)."""
  kind = resolve_kind(config)
  best = resolve_best_metric(config, kind)
  ev = config.eval
  if kind == "gmm":
    mu, cov = teacher.denoiser.moments(teacher.params)
    means = np.asarray(teacher.params["means"])

    def score(x, idx):
      return gmm_eval.gmm_metrics(x, idx, means, mu, cov)

    name = protocols.get("gmm-frechet").derive(num_samples=ev.num_samples).name
    return Scorer(kind, name, best, score)
  if kind == "digits":
    evaluator = digits_eval.DigitsEvaluator()
    return Scorer(kind, digits_eval.PROTOCOL, best, evaluator.metrics)
  if kind == "fid":
    fid = InLoopFID(ev.inception, ev.ref, ev.protocol, mesh, ev.batch)
    return Scorer(kind, fid.protocol.derive(num_samples=ev.num_samples).name, best, fid)
  return Scorer(kind, None, None, lambda x, idx: {})
