"""Builds the run's denoisers from the config: the teacher, and the generator / fake score nets.

A network is described by a *spec* — `{'class_name': <official precond class>, 'kwargs': {...}}`
with exactly the constructor arguments the official PyTorch class takes (EDM's `EDMPrecond`,
`VPPrecond`, `VEPrecond`, SiDA's `EDMPrecond_EncoderDecoder`, EDM2's `Precond`, ...). The same spec
is stored in every network checkpoint (`network.json`), so a converted official teacher and a
network defined in a config file are built by the same code.

Teacher types (`config.teacher.type`):

* `'gmm'` -- an analytic Gaussian mixture with an exact denoiser (`config.teacher.gmm`).
* `'network'` -- a network checkpoint directory (`config.teacher.checkpoint`) written by
  `python -m sid_jax.convert` (official EDM / EDM2 pickles) or by the teacher-training job.
* `'random'` -- **for tests and smoke runs only**: the network `config.model.class_name` /
  `config.model.kwargs` (with the image shape and label_dim of `config.data`) with random weights
  from `config.teacher.random_seed`, drawn so that its outputs are not trivial (the official
  initialisers zero the output layers; see `random_network_params`). It lets the `tiny` variant of
  every real config run the real code path without any file.

Precision (`config.model.compute_dtype`, read only by `compute_dtype` here): 'float32' (the
papers) or 'bfloat16', in which the teacher, generator and fake score compute their convolutions
and matmuls in bfloat16 while every parameter stays float32 (master weights, EMA and optimiser
states included) and the preconditioning, the skip connection and D(x) stay float32.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sid_jax import checkpoints, denoisers
from sid_jax.models import edm as edm_models
from sid_jax.models import edm2 as edm2_models

EDM_CLASSES = ("EDMPrecond", "VPPrecond", "VEPrecond", "EDMPrecond_EncoderDecoder")
EDM2_CLASSES = ("Precond", "EDM_2_Precond_EncoderDecoder", "EDM_2_Precond_Generator")
TEACHER_TYPES = ("gmm", "network", "random")
# config.model.compute_dtype -> the networks' `dtype`. None keeps the input's dtype: float32 in
# training, float64 where a test enables x64, bit-identical to networks built without a dtype.
COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


def _plain(x):
  if isinstance(x, ml_collections.ConfigDict):
    x = x.to_dict()
  if isinstance(x, dict):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  return x


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
  """The networks' compute dtype for `config.model.compute_dtype` (absent: 'float32')."""
  name = config.model.get("compute_dtype", "float32")
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"config.model.compute_dtype={name!r}; expected one of "
                     f"{list(COMPUTE_DTYPES)}.")
  return COMPUTE_DTYPES[name]


def build_denoiser(spec: dict, dtype: Any = None) -> denoisers.NetworkDenoiser:
  """A NetworkDenoiser from a network spec (see module docstring), computing in `dtype`."""
  spec = _plain(spec)
  if "class_name" not in spec or "kwargs" not in spec:
    raise ValueError(f"A network spec needs 'class_name' and 'kwargs', got keys {sorted(spec)}.")
  name = spec["class_name"]
  if name in EDM_CLASSES:
    return edm_models.build_edm_denoiser(name, spec["kwargs"], dtype=dtype)
  if name in EDM2_CLASSES:
    return edm2_models.build_edm2_denoiser(name, spec["kwargs"], dtype=dtype)
  raise ValueError(f"Unknown network class {name!r}; supported: {EDM_CLASSES + EDM2_CLASSES}.")


def spec_image_shape(spec: dict) -> tuple[int, int, int, int]:
  """(resolution, resolution, channels, label_dim) declared by a spec."""
  kw = _plain(spec)["kwargs"]
  return (int(kw["img_resolution"]), int(kw["img_resolution"]), int(kw["img_channels"]),
          int(kw.get("label_dim", 0)))


def init_params(denoiser: denoisers.NetworkDenoiser, rng: jax.Array, image_shape, label_dim):
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  labels = jnp.zeros((1, label_dim), jnp.float32) if label_dim else None
  aug_dim = getattr(denoiser.module, "augment_dim", 0)
  aug = jnp.zeros((1, aug_dim), jnp.float32) if aug_dim else None
  # One compiled program instead of one dispatch per initialiser (much faster for real UNets).
  return jax.jit(lambda k: denoiser.init(k, x, labels, aug))(rng)


def abstract_params(denoiser, image_shape, label_dim):
  return jax.eval_shape(lambda k: init_params(denoiser, k, image_shape, label_dim),
                        jax.random.key(0))


def _leaf_name(path) -> str:
  last = path[-1]
  return str(getattr(last, "key", getattr(last, "name", last)))


def random_network_params(denoiser: denoisers.NetworkDenoiser, image_shape, label_dim: int,
                          seed: int):
  """Random weights for a test network, drawn on the host: no compilation, deterministic in seed.

  For teacher type 'random' only (tests and smoke runs). Compiling the networks' own initialisers
  costs seconds per architecture on a CPU, and they leave the output layers (and EDM2's gains) at
  zero or 1e-5 scale, which makes every denoiser trivial (D(x) = c_skip x). Instead every leaf of
  the parameter tree (`jax.eval_shape` of the init: tracing only) is drawn by its name:

  * `kernel` (Flax Dense / Conv, [..., in, out]): N(0, 1 / fan_in), every layer, the output
    layers included, so outputs are of order one;
  * `weight` (EDM2 MPConv, [out, in, ...]): N(0, 1) rescaled to unit RMS per output channel, as
    EDM2's forced weight normalisation keeps trained weights;
  * `bias`: 0; `scale` (GroupNorm): 1;
  * `emb_gain`, `out_gain` (EDM2, zero in EDM2's init): U(0.5, 1);
  * `freqs`, `phases` (fixed Fourier features): 2 pi N(0, 1) and 2 pi U(0, 1), EDM2's MPFourier
    draws (NCSN++'s own are N(0, 16^2); any fixed draw gives a valid network).

  A leaf with any other name raises a ValueError naming it.
  """
  abstract = abstract_params(denoiser, image_shape, label_dim)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape, dtype = _leaf_name(path), tuple(leaf.shape), leaf.dtype
    if name == "kernel":
      fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
      value = rng.standard_normal(shape) / np.sqrt(fan_in)
    elif name == "weight":
      value = rng.standard_normal(shape)
      if value.ndim > 1:
        value = value / np.sqrt(np.mean(np.square(value), axis=tuple(range(1, value.ndim)),
                                        keepdims=True))
    elif name == "bias":
      value = np.zeros(shape)
    elif name == "scale":
      value = np.ones(shape)
    elif name.endswith("gain"):
      value = rng.uniform(0.5, 1.0, shape)
    elif name == "freqs":
      value = 2 * np.pi * rng.standard_normal(shape)
    elif name == "phases":
      value = 2 * np.pi * rng.uniform(size=shape)
    else:
      raise ValueError(f"config.teacher.type='random' cannot initialise the parameter "
                       f"{jax.tree_util.keystr(path)} {shape}: unknown leaf name {name!r}.")
    return jnp.asarray(value.astype(dtype))

  return jax.tree_util.tree_map_with_path(draw, abstract)


@dataclasses.dataclass
class Teacher:
  denoiser: Any
  params: Any
  info: dict  # type, path, sha256 — recorded in checkpoint metadata instead of the weights
  spec: dict | None = None  # the network spec (None for the analytic teacher)


def _config_spec(config: ml_collections.ConfigDict) -> dict:
  """The network spec of config.model with the image shape and label_dim of config.data."""
  d = config.data
  kwargs = dict(_plain(config.model.kwargs))
  kwargs.update(img_resolution=d.resolution, img_channels=d.channels, label_dim=d.label_dim)
  return {"class_name": config.model.class_name, "kwargs": kwargs}


def _convert_hint(t: ml_collections.ConfigDict) -> str:
  """How to make the teacher checkpoint a config expects (empty if it names no official file)."""
  name = t.get("official_name", "")
  if not name:
    return ""
  family = "edm2" if os.path.basename(name).startswith("edm2-") else "edm"
  url = t.get("official_url", "")
  where = f" ({url})" if url else ""
  return (f" This config distils the official teacher {name}{where}: convert it with "
          f"`python -m sid_jax.convert {family} --src {name} --dst DIR` and pass "
          f"--config.teacher.checkpoint=DIR.")


def build_teacher(config: ml_collections.ConfigDict, *, abstract: bool = False) -> Teacher:
  """The teacher of `config.teacher`. With `abstract`, network parameters are shapes only
  (`jax.ShapeDtypeStruct`s) and no file is read: the architecture is the checkpoint's spec if the
  checkpoint exists, else `config.model` (what `python -m sid_jax.plan` compiles)."""
  t, d = config.teacher, config.data
  shape = (d.resolution, d.resolution, d.channels)
  dtype = compute_dtype(config)
  if abstract and t.type in ("network", "random"):
    has_file = t.type == "network" and os.path.isfile(
        os.path.join(t.checkpoint or "", checkpoints.NETWORK_SPEC))
    spec = checkpoints.load_network_spec(t.checkpoint) if has_file else _config_spec(config)
    den = build_denoiser(spec, dtype)
    res, _, channels, label_dim = spec_image_shape(spec)
    params = abstract_params(den, (res, res, channels), label_dim)
    return Teacher(den, params, {"type": "abstract", "path": "", "sha256": ""}, spec)
  if t.type == "gmm":
    if d.label_dim not in (0, t.gmm.num_components):
      raise ValueError(f"config.data.label_dim={d.label_dim} must be 0 or "
                       f"config.teacher.gmm.num_components={t.gmm.num_components} for a GMM teacher.")
    if t.gmm.std <= 0:
      raise ValueError(f"config.teacher.gmm.std must be positive, got {t.gmm.std}.")
    den = denoisers.GaussianMixtureDenoiser(std=float(t.gmm.std))
    params = den.make_params(t.gmm.seed, t.gmm.num_components, shape, t.gmm.mean_scale)
    return Teacher(den, params, {"type": "gmm", "path": "", "sha256": checkpoints.hash_tree(params)})
  if t.type == "network":
    if not t.checkpoint:
      raise ValueError("config.teacher.checkpoint is empty: set it to a network checkpoint "
                       "directory (written by `python -m sid_jax.convert`)." + _convert_hint(t))
    if not os.path.isdir(t.checkpoint):
      raise FileNotFoundError(f"config.teacher.checkpoint={t.checkpoint!r} does not exist."
                              + _convert_hint(t))
    spec = checkpoints.load_network_spec(t.checkpoint)
    res, _, ch, label_dim = spec_image_shape(spec)
    if (res, ch, label_dim) != (d.resolution, d.channels, d.label_dim):
      raise ValueError(
          f"The teacher at {t.checkpoint!r} is {res}x{res}x{ch} with label_dim={label_dim}, but "
          f"config.data has resolution={d.resolution}, channels={d.channels}, "
          f"label_dim={d.label_dim}.")
    den = build_denoiser(spec, dtype)
    params = checkpoints.load_network_params(t.checkpoint, abstract_params(den, shape, label_dim))
    info = {"type": "network", "path": os.path.abspath(t.checkpoint),
            "sha256": checkpoints.hash_path(t.checkpoint)}
    return Teacher(den, params, info, spec)
  if t.type == "random":
    # For tests and smoke runs only: random weights drawn on the host, no file, no compilation.
    spec = _config_spec(config)
    den = build_denoiser(spec, dtype)
    params = random_network_params(den, shape, d.label_dim, t.random_seed)
    info = {"type": "random", "path": "", "seed": int(t.random_seed),
            "sha256": checkpoints.hash_tree(params)}
    return Teacher(den, params, info, spec)
  raise ValueError(f"Unknown config.teacher.type {t.type!r}; expected one of {TEACHER_TYPES}.")


# Constructor settings of generator and fake score that SiD sets itself instead of copying the
# teacher's (spec §4.7, §8.1: `--dropout`, e.g. 0.05 for AFHQv2 whose EDM teacher was trained with
# 0.25). They change no parameter, so the students still start from the teacher's weights.
STUDENT_SETTINGS = ("dropout",)


def student_spec(config: ml_collections.ConfigDict, teacher: Teacher) -> dict:
  """The network spec of generator and fake score: a copy of the teacher's with the
  `STUDENT_SETTINGS` that config.model.kwargs holds (init_from 'teacher'), or config.model."""
  if config.model.init_from == "teacher":
    if teacher.spec is None:
      raise ValueError("config.model.init_from='teacher' needs a network teacher "
                       f"(config.teacher.type='network' or 'random'), not "
                       f"{config.teacher.type!r}.")
    kwargs = _plain(config.model.kwargs)
    own = {k: kwargs[k] for k in STUDENT_SETTINGS if k in kwargs}
    if not own:
      return teacher.spec
    spec = _plain(teacher.spec)
    return dict(spec, kwargs=dict(spec["kwargs"], **own))
  if config.model.init_from != "scratch":
    raise ValueError(f"config.model.init_from must be 'teacher' or 'scratch', "
                     f"got {config.model.init_from!r}.")
  return _config_spec(config)


def build_students(config, teacher: Teacher, rng: jax.Array, *, abstract: bool = False):
  """(denoiser, initial params) shared by generator and fake score (both start equal, spec §1.1);
  with `abstract` the params are shapes only."""
  spec = student_spec(config, teacher)
  den = build_denoiser(spec, compute_dtype(config))
  if config.model.init_from == "teacher":
    # The students' settings (dropout) may differ from the teacher's; its weights fit them.
    return den, teacher.params, spec
  d = config.data
  shape = (d.resolution, d.resolution, d.channels)
  if abstract:
    return den, abstract_params(den, shape, d.label_dim), spec
  return den, init_params(den, rng, shape, d.label_dim), spec
