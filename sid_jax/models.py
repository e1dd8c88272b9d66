"""Builds the run's denoisers from the config: the teacher, and the generator / fake score nets.

A network is described by a *spec* — `{'class_name': <official precond class>, 'kwargs': {...}}`
with exactly the constructor arguments the official PyTorch class takes (EDM's `EDMPrecond`,
`VPPrecond`, `VEPrecond`, SiDA's `EDMPrecond_EncoderDecoder`, EDM2's `Precond`, ...). The same spec
is stored in every network checkpoint (`network.json`), so a converted official teacher and a
network defined in a config file are built by the same code.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from sid_jax import checkpoints, denoisers

EDM_CLASSES = ("EDMPrecond", "VPPrecond", "VEPrecond", "EDMPrecond_EncoderDecoder")
EDM2_CLASSES = ("Precond", "EDM_2_Precond_EncoderDecoder", "EDM_2_Precond_Generator")
TEACHER_TYPES = ("gmm", "network")


def _plain(x):
  if isinstance(x, ml_collections.ConfigDict):
    x = x.to_dict()
  if isinstance(x, dict):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  return x


def build_denoiser(spec: dict) -> denoisers.NetworkDenoiser:
  """A NetworkDenoiser from a network spec (see module docstring)."""
  spec = _plain(spec)
  if "class_name" not in spec or "kwargs" not in spec:
    raise ValueError(f"A network spec needs 'class_name' and 'kwargs', got keys {sorted(spec)}.")
  name = spec["class_name"]
  if name in EDM_CLASSES:
    from sid_jax.nets import edm_registry  # pylint: disable=g-import-not-at-top
    return edm_registry.build_edm_denoiser(name, spec["kwargs"])
  if name in EDM2_CLASSES:
    from sid_jax.nets import edm2_registry  # pylint: disable=g-import-not-at-top
    return edm2_registry.build_edm2_denoiser(name, spec["kwargs"])
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


@dataclasses.dataclass
class Teacher:
  denoiser: Any
  params: Any
  info: dict  # type, path, sha256 — recorded in checkpoint metadata instead of the weights
  spec: dict | None = None  # the network spec (None for the analytic teacher)


def build_teacher(config: ml_collections.ConfigDict) -> Teacher:
  t, d = config.teacher, config.data
  shape = (d.resolution, d.resolution, d.channels)
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
                       "directory (written by `python -m sid_jax.convert`).")
    if not os.path.isdir(t.checkpoint):
      raise FileNotFoundError(f"config.teacher.checkpoint={t.checkpoint!r} does not exist.")
    spec = checkpoints.load_network_spec(t.checkpoint)
    res, _, ch, label_dim = spec_image_shape(spec)
    if (res, ch, label_dim) != (d.resolution, d.channels, d.label_dim):
      raise ValueError(
          f"The teacher at {t.checkpoint!r} is {res}x{res}x{ch} with label_dim={label_dim}, but "
          f"config.data has resolution={d.resolution}, channels={d.channels}, "
          f"label_dim={d.label_dim}.")
    den = build_denoiser(spec)
    params = checkpoints.load_network_params(t.checkpoint, abstract_params(den, shape, label_dim))
    info = {"type": "network", "path": os.path.abspath(t.checkpoint),
            "sha256": checkpoints.hash_path(t.checkpoint)}
    return Teacher(den, params, info, spec)
  raise ValueError(f"Unknown config.teacher.type {t.type!r}; expected one of {TEACHER_TYPES}.")


def student_spec(config: ml_collections.ConfigDict, teacher: Teacher) -> dict:
  """The network spec of generator and fake score (a copy of the teacher's, or config.model)."""
  if config.model.init_from == "teacher":
    if teacher.spec is None:
      raise ValueError("config.model.init_from='teacher' needs a network teacher "
                       f"(config.teacher.type='network'), not {config.teacher.type!r}.")
    return teacher.spec
  if config.model.init_from != "scratch":
    raise ValueError(f"config.model.init_from must be 'teacher' or 'scratch', "
                     f"got {config.model.init_from!r}.")
  d = config.data
  kwargs = dict(_plain(config.model.kwargs))
  kwargs.update(img_resolution=d.resolution, img_channels=d.channels, label_dim=d.label_dim)
  return {"class_name": config.model.class_name, "kwargs": kwargs}


def build_students(config, teacher: Teacher, rng: jax.Array):
  """(denoiser, initial params) shared by generator and fake score (both start equal, spec §1.1)."""
  spec = student_spec(config, teacher)
  den = build_denoiser(spec)
  if config.model.init_from == "teacher":
    return den, teacher.params, spec
  d = config.data
  return den, init_params(den, rng, (d.resolution, d.resolution, d.channels), d.label_dim), spec
