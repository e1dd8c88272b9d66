"""Evaluation protocols: what exactly a reported number measures.

A number such as "FID 1.92" is only comparable with another one measured the same way: the same
detector (network, weights, layer), the same image preprocessing (resize), the same reference set
and size, the same sample count and the same metric settings. Every number sid_jax reports carries
the name of its `Protocol` and the protocol's fields, and a protocol whose settings were changed
(fewer samples, other splits, ...) gets a derived name such as `edm-fid50k[n=1000]`, so numbers
from different protocols are never compared by accident.

Registered protocols (`protocols.table()` prints them all as a Markdown table):
  edm-fid50k             FID as EDM's `fid.py` computes it (generated covariance / (N-1)).
  sid-fid50k-full        FID as SiD's StyleGAN3-style metric code computes it (covariance / N).
  pytorch-fid50k         FID as pytorch-fid computes it (its resize, its sqrtm rule).
  is50k                  Inception Score, 10 splits, softmax of the bias-free logits.
  pr50k3                 Improved precision / recall (k = 3) on Inception pool features.
  kid50k                 Kernel Inception Distance, 100 subsets of 1000, cubic polynomial kernel.
  gmm-frechet            Fréchet distance to a Gaussian-mixture teacher's exact pixel moments.
  digits-classifier-fd   Fréchet distance in the digits demo classifier's feature space.
  coco2014-fid30k-clean  Text-to-image FID as SiD-LSG reports it (GigaGAN + clean-fid, COCO-2014).
  coco2014-clip30k-vitg14  CLIP score as SiD-LSG reports it (GigaGAN's evaluator, ViT-g-14).
  clip-plain             The in-repo CLIP score during training (bicubic to the CLIP input size).

Every Inception protocol names its `front_end` (how uint8 images reach the network:
`sid_jax.nets.inception.FRONT_ENDS`) and every FID protocol its `sqrtm` rule
(`sid_jax.evaluation.frechet.SQRTM_RULES`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

# The detector sid_jax runs (sid_jax.nets.inception.FIDInceptionV3 with pytorch-fid's weights,
# the same TF 2015-12-05 graph weights as NVIDIA's TorchScript inception-2015-12-05.pt).
PYTORCH_FID_POOL3 = ("pytorch-fid Inception-v3 (pt_inception-2015-12-05-6726825d.pth, TF "
                     "2015-12-05 graph), pool3 features, 2048-d")
PYTORCH_FID_LOGITS = ("pytorch-fid Inception-v3 (pt_inception-2015-12-05-6726825d.pth, TF "
                      "2015-12-05 graph), softmax of the 1008 logits without the fc bias")
# The front-ends (`sid_jax.nets.inception.FRONT_ENDS`), in words.
RESIZE_TF1_BILINEAR_299 = ("uint8 RGB -> float [0, 255] -> TF1 legacy bilinear to 299x299 "
                           "(align_corners=False, half_pixel_centers=False, no antialias) -> "
                           "(x - 128) / 128, as NVIDIA's TorchScript inception-2015-12-05.pt")
RESIZE_BILINEAR_299 = ("uint8 RGB / 255 -> bilinear to 299x299 (torch F.interpolate, "
                       "align_corners=False, no antialias) -> [-1, 1]")
RESIZE_GIGAGAN_CLEAN_299 = (
    "any size, converted to RGB -> centre crop of the long edge, PIL LANCZOS to 256x256 (uint8; "
    "GigaGAN's custom transform) -> clean-fid 'clean': each channel as a float32 PIL 'F' image, "
    "BICUBIC (antialiased) to 299x299, clipped to [0, 255] -> (x - 128) / 128")
FRONT_END_RESIZE = {"tf1-bilinear": RESIZE_TF1_BILINEAR_299,
                    "pytorch-fid": RESIZE_BILINEAR_299,
                    "gigagan-clean-fid": RESIZE_GIGAGAN_CLEAN_299}

# The detectors `sid_jax.evaluation.features.InceptionFeatures` implements.
IMPLEMENTED_DETECTORS = (PYTORCH_FID_POOL3, PYTORCH_FID_LOGITS)


@dataclasses.dataclass(frozen=True)
class Protocol:
  """One way of measuring a number.

  Attributes:
    name: registry name; derived protocols append their changes, e.g. `edm-fid50k[n=1000]`.
    detector: the feature network, its weights and layer.
    resize: how images are brought to the detector's input.
    reference: the reference set (and its size) the samples are compared with.
    num_samples: the number of generated (or evaluated) images.
    notes: how the protocol relates to the numbers in the literature.
    metric: which metric: 'fid', 'is', 'pr', 'kid', 'frechet' or 'clip'.
    params: the metric's settings, as sorted (name, value) pairs.
    implemented: False for protocols registered only so their numbers are named.
    base: for a derived protocol, the registered one it was derived from.
    front_end: Inception protocols: how uint8 images reach the network, one of
      `sid_jax.nets.inception.FRONT_ENDS` (described in words by `resize`); None otherwise.
    comparable_with: the published numbers this protocol reproduces, and what it does not.
  """
  name: str
  detector: str
  resize: str
  reference: str
  num_samples: int
  notes: str = ""
  metric: str = "fid"
  params: tuple[tuple[str, Any], ...] = ()
  implemented: bool = True
  base: str | None = None
  front_end: str | None = None
  comparable_with: str = ""

  @property
  def standard(self) -> bool:
    return self.base is None

  def param(self, key: str) -> Any:
    return dict(self.params)[key]

  def derive(self, num_samples: int | None = None, **params) -> Protocol:
    """This protocol with other settings; the name records every change.

    Returns `self` when nothing changes. Unknown parameter names raise a ValueError.
    """
    current = dict(self.params)
    unknown = sorted(set(params) - set(current))
    if unknown:
      raise ValueError(f"Protocol {self.name!r} has no parameters {unknown}; it has "
                       f"{sorted(current)}.")
    base = registered(self.base) if self.base else self
    base_params = dict(base.params)
    new_params = dict(current, **params)
    num = self.num_samples if num_samples is None else int(num_samples)
    changes = []
    if num != base.num_samples:
      changes.append(f"n={num}")
    changes += [f"{k}={v}" for k, v in sorted(new_params.items()) if v != base_params[k]]
    if not changes:
      return base
    return dataclasses.replace(base, name=f"{base.name}[{','.join(changes)}]", num_samples=num,
                               params=tuple(sorted(new_params.items())), base=base.name)

  def fields(self) -> dict[str, Any]:
    """What every reported number carries: the protocol's name first, then its fields."""
    return {
        "protocol": self.name,
        "standard_protocol": self.standard,
        "detector": self.detector,
        "resize": self.resize,
        "reference": self.reference,
        "num_samples": self.num_samples,
        "params": dict(self.params),
        "front_end": self.front_end,
        "notes": self.notes,
        "comparable_with": self.comparable_with,
    }


_REGISTRY: dict[str, Protocol] = {}


def register(protocol: Protocol) -> Protocol:
  if protocol.name in _REGISTRY:
    raise ValueError(f"Protocol {protocol.name!r} is already registered.")
  if protocol.base is not None:
    raise ValueError(f"Only base protocols can be registered, not {protocol.name!r}.")
  _REGISTRY[protocol.name] = protocol
  return protocol


def registered(name: str) -> Protocol:
  if name not in _REGISTRY:
    raise ValueError(f"Unknown evaluation protocol {name!r}; registered: {names()}.")
  return _REGISTRY[name]


def get(name: str) -> Protocol:
  """A registered protocol by name (derived names such as `edm-fid50k[n=10]` are not looked up)."""
  return registered(name)


def names() -> list[str]:
  return sorted(_REGISTRY)


def table() -> str:
  """The registry as a Markdown table."""
  lines = ["| protocol | metric | samples | detector | resize | reference | params | "
           "comparable with |",
           "|---|---|---|---|---|---|---|---|"]
  for name in names():
    p = _REGISTRY[name]
    params = ", ".join(f"{k}={v}" for k, v in p.params) or "-"
    flag = "" if p.implemented else " (not implemented)"
    lines.append(f"| {p.name}{flag} | {p.metric} | {p.num_samples} | {p.detector} | {p.resize} | "
                 f"{p.reference} | {params} | {p.comparable_with or '-'} |")
  return "\n".join(lines)


def same_features(detector_a: str | None, resize_a: str | None, detector_b: str | None,
                  resize_b: str | None) -> bool:
  """Whether two feature sets come from the same detector and preprocessing (None = unknown)."""
  return (detector_a is None or detector_b is None or detector_a == detector_b) and (
      resize_a is None or resize_b is None or resize_a == resize_b)


# ---------------------------------------------------------------------------------------------
# The registry.
# ---------------------------------------------------------------------------------------------

_EDM_REFS = ("EDM fid-refs mu/sigma of the full training set (e.g. cifar10-32x32.npz, "
             "imagenet-64x64.npz, ffhq-64x64.npz, afhqv2-64x64.npz), or stats from "
             "`python -m sid_jax.evaluate make-ref`")
_DETECTOR_NOTE = ("EDM and SiD run NVIDIA's TorchScript port of the TF 2015-12-05 graph; sid_jax "
                  "runs the same weights (pytorch-fid's port of them) behind the TorchScript's "
                  "own front-end (TF1 legacy bilinear resize, (x - 128) / 128).")
_SID_EDM_FIDS = ("SiD's EDM FIDs (sid_spec 9.2: CIFAR-10 uncond 1.923 / cond 1.710, ImageNet-64 "
                 "1.524, FFHQ-64 1.550, AFHQv2-64 1.628; SiDA's column likewise) when run on 50k "
                 "EMA samples against EDM's fid-refs; the papers report the mean of 10 such runs")

EDM_FID50K = register(Protocol(
    name="edm-fid50k",
    detector=PYTORCH_FID_POOL3,
    resize=RESIZE_TF1_BILINEAR_299,
    reference=_EDM_REFS,
    num_samples=50_000,
    notes=("FID = Re(|mu_g - mu_r|^2 + Tr(S_g + S_r - 2 sqrtm(S_g S_r))) (scipy sqrtm, real part, "
           "no fallback); generated covariance divided by N - 1, as EDM's fid.py. "
           + _DETECTOR_NOTE),
    metric="fid",
    params=(("cov_ddof", 1), ("sqrtm", "real")),
    front_end="tf1-bilinear",
    comparable_with=("EDM's FIDs (its fid.py), and SiD's EDM FIDs up to the covariance's N - 1 "
                     "vs N (negligible at 50k; use sid-fid50k-full for SiD's exact rule)"),
))

SID_FID50K_FULL = register(Protocol(
    name="sid-fid50k-full",
    detector=PYTORCH_FID_POOL3,
    resize=RESIZE_TF1_BILINEAR_299,
    reference=_EDM_REFS,
    num_samples=50_000,
    notes=("SiD's fid50k_full (StyleGAN3-style metric code, the protocol of SiD's reported FIDs): "
           "generated covariance divided by N; FID = Re(...) of scipy sqrtm, no fallback; samples "
           "from G_ema with z = 2.5 randn. " + _DETECTOR_NOTE),
    metric="fid",
    params=(("cov_ddof", 0), ("sqrtm", "real")),
    front_end="tf1-bilinear",
    comparable_with=_SID_EDM_FIDS + ". Not SiD-LSG's COCO FIDs (coco2014-fid30k-clean)",
))

PYTORCH_FID50K = register(Protocol(
    name="pytorch-fid50k",
    detector=PYTORCH_FID_POOL3,
    resize=RESIZE_BILINEAR_299,
    reference=("pytorch-fid statistics of the reference set, or `make-ref --fid_protocol "
               "pytorch-fid50k`"),
    num_samples=50_000,
    notes=("pytorch-fid's own front-end (x / 255, torch bilinear, 2x - 1) and its sqrtm rule "
           "(eps fallback; refuses an imaginary diagonal component > 1e-3); covariances / "
           "(N - 1). Its numbers differ slightly from the TF / NVIDIA front-end's."),
    metric="fid",
    params=(("cov_ddof", 1), ("sqrtm", "pytorch-fid")),
    front_end="pytorch-fid",
    comparable_with=("numbers computed with pytorch-fid; not the EDM / SiD / SiD-LSG papers' "
                     "FIDs (those use the TF / NVIDIA resize or clean-fid)"),
))

IS50K = register(Protocol(
    name="is50k",
    detector=PYTORCH_FID_LOGITS,
    resize=RESIZE_TF1_BILINEAR_299,
    reference="none",
    num_samples=50_000,
    notes=("IS = exp(mean_x KL(p(y|x) || p(y))) per split, p(y) the split's mean; mean and std "
           "over splits (StyleGAN3 / SiD is50k, output bias removed). " + _DETECTOR_NOTE),
    metric="is",
    params=(("splits", 10),),
    front_end="tf1-bilinear",
    comparable_with="SiD's is50k (CIFAR-10) with 50k samples",
))

PR50K3 = register(Protocol(
    name="pr50k3",
    detector=PYTORCH_FID_POOL3,
    resize=RESIZE_TF1_BILINEAR_299,
    reference=("pool features of the real reference set (`make-ref --save_features`); SiD's "
               "ImageNet-64 uses up to 200k real images"),
    num_samples=50_000,
    notes=("Improved precision/recall (Kynkaenniemi et al. 2019): radius = distance to the k-th "
           "nearest neighbour within the manifold, self excluded. Inception features as SiD "
           "(StyleGAN's own pr50k3 uses VGG16); float32 distances here, fp16 in SiD's code."),
    metric="pr",
    params=(("k", 3),),
    front_end="tf1-bilinear",
))

KID50K = register(Protocol(
    name="kid50k",
    detector=PYTORCH_FID_POOL3,
    resize=RESIZE_TF1_BILINEAR_299,
    reference="pool features of the real reference set (`make-ref --save_features`)",
    num_samples=50_000,
    notes=("Unbiased MMD^2 with the kernel (x.y / d + 1)^3, averaged over random subsets "
           "(StyleGAN3's kid50k_full; subset size = min(subset_size, N_real, N_fake)); subsets "
           "drawn with numpy RandomState(seed)."),
    metric="kid",
    params=(("num_subsets", 100), ("seed", 0), ("subset_size", 1000)),
    front_end="tf1-bilinear",
))

GMM_FRECHET = register(Protocol(
    name="gmm-frechet",
    detector="none: flattened float pixels in [-1, 1], before uint8 quantisation",
    resize="none",
    reference="exact mean and covariance of the Gaussian-mixture teacher",
    num_samples=2048,
    notes=("The training loop's metric for the analytic GMM teacher (configs/gmm_sid.py: "
           "config.eval.num_samples, fixed inputs from config.eval.seed); sample covariance / "
           "(N - 1). Not comparable with any Inception-based number."),
    metric="frechet",
    params=(("cov_ddof", 1),),
))

DIGITS_CLASSIFIER_FD = register(Protocol(
    name="digits-classifier-fd",
    detector=("DigitsClassifier shipped in sid_jax/assets/digits_classifier (trained on half A "
              "of sid_jax.data.digits), tanh feature layer"),
    resize="none: 8x8 grey in [-1, 1], exported to uint8 and read back",
    reference="features of half A of sid_jax.data.digits (898 images)",
    num_samples=899,
    notes=("The digits demo's metric (sid_jax.evaluation.digits, the training loop's metric "
           "table): as many samples as held-out half B, with half B's labels; covariance / "
           "(N - 1). Not comparable with any Inception-based number."),
    metric="frechet",
    params=(("cov_ddof", 1),),
))

COCO2014_FID30K_CLEAN = register(Protocol(
    name="coco2014-fid30k-clean",
    detector=PYTORCH_FID_POOL3,
    resize=RESIZE_GIGAGAN_CLEAN_299,
    reference=("COCO-2014 val2014, all 40,504 images of any size (`make-ref --fid_protocol "
               "coco2014-fid30k-clean --images val2014/`)"),
    num_samples=30_000,
    notes=("SiD-LSG's reported text-to-image FID (lsg_spec 6.1): GigaGAN's evaluation.py calls "
           "clean-fid compute_fid(mode 'clean') with its centre-crop + LANCZOS-256 transform on "
           "both folders; 30k images from seeds 0-29999 with caption line s for seed s; "
           "covariances / (N - 1); clean-fid's sqrtm rule. clean-fid runs NVIDIA's TorchScript "
           "layers, sid_jax the same weights."),
    metric="fid",
    params=(("cov_ddof", 1), ("sqrtm", "clean-fid")),
    front_end="gigagan-clean-fid",
    comparable_with=("SiD-LSG's COCO-2014 zero-shot FIDs (lsg_spec: SD1.5 kappa 1.5 8.15, "
                     "kappa 2 9.56; SD2.1-base 9.52 ...) when the 30k "
                     "images come from the 30k GigaGAN captions with seeds 0-29999 and the "
                     "reference is all of val2014; not comparable with the in-repo fid30k_full "
                     "of SiD-LSG's training code (256x256 reference set, NVIDIA resize)"),
))

# Computed by sid_jax.evaluation.clip_score.CLIPScorer (protocol 'sid-lsg' / 'plain').
OPENAI_CLIP_NORMALIZE = ("/ 255, normalised with OpenAI CLIP's mean (0.48145466, 0.4578275, "
                         "0.40821073) and std (0.26862954, 0.26130258, 0.27577711)")

COCO2014_CLIP30K_VITG14 = register(Protocol(
    name="coco2014-clip30k-vitg14",
    detector=("open_clip ViT-g-14 laion2b_s12b_b42k (HF CLIPModel format "
              "laion/CLIP-ViT-g-14-laion2B-s12B-b42K), projected image and text embeddings"),
    resize=("center crop of the long edge, PIL LANCZOS to 256x256, GigaGAN's truncating uint8 "
            "round trip, PIL BICUBIC of the shortest side to 224, center crop 224, "
            + OPENAI_CLIP_NORMALIZE),
    reference=("the COCO-2014 val captions the images were generated from, each prefixed with "
               "'A photo depicts ', 77 tokens (truncated ones end with the end-of-text token)"),
    num_samples=30_000,
    notes=("SiD-LSG's reported CLIP score (GigaGAN's evaluation.py compute_clip_score with "
           "clip_model='ViT-G/14'): mean over images of the raw cosine similarity (not x100, not "
           "clipped at 0). sid_jax tokenizes with Hugging Face's CLIPTokenizer and cleans "
           "captions without ftfy."),
    metric="clip",
    params=(("preprocess", "sid-lsg"),),
    comparable_with=("SiD-LSG's CLIP scores (0.302-0.322) with the ViT-g-14 model and the 30k "
                     "GigaGAN captions, image of seed s paired with caption line s; up to the "
                     "tokenizer's caption cleaning (no ftfy)"),
))

CLIP_PLAIN = register(Protocol(
    name="clip-plain",
    detector=("the Hugging Face CLIPModel given to CLIPScorer (name it next to the number), "
              "projected image and text embeddings"),
    resize=("uint8 / 255, jax.image.resize bicubic (a = -0.5, antialiased) straight to the "
            "model's image_size, no crop, normalised with OpenAI CLIP's mean and std"),
    reference="the captions the images were generated from, without prefix, 77 tokens",
    num_samples=1_000,
    notes=("The quick CLIP score the training loop can track: mean raw cosine similarity. Not "
           "comparable with coco2014-clip30k-vitg14 (other preprocessing, no prompt prefix)."),
    metric="clip",
    params=(("preprocess", "plain"),),
    comparable_with="nothing published: a training-time signal only",
))

# The protocol each `--metrics` entry uses unless another one is asked for.
DEFAULT_FOR_METRIC = {
    "fid": EDM_FID50K.name,
    "is": IS50K.name,
    "pr": PR50K3.name,
    "kid": KID50K.name,
    "gmm": GMM_FRECHET.name,
}
