"""What a distillation method contributes to a run (`Assembly`); `sid_jax.run` builds the rest."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from sid_jax import generators, models, steps


@dataclasses.dataclass
class Assembly:
  """The method-specific parts of a run.

  Attributes:
    teacher: the frozen teacher (denoiser, parameters, provenance).
    student: the denoiser of generator and fake score.
    init_params: their initial parameters (both start equal, spec §1.1).
    spec: the students' network spec (checkpoint metadata, export).
    sigma_init: the one-step generator's noise level.
    fake_loss, generator_loss: the losses given to the steps (`losses.DSMLoss`, ...).
    hyper: the steps' EMA and guidance settings.
    image_shape, label_dim: what the generator makes (latents for Stable Diffusion).
    make_generator: (mesh) -> a `generators.Generator` without parameters (given per call).
    sampling_params: (generator params, teacher params on the mesh) -> that Generator's params.
    export: (params, directory, step) -> writes the generator where `sid_jax.sample` reads it.
    conditioning: batch-borne conditions (text prompts), or None.
    project: parameter projection before each update (EDM2 forced weight normalisation).
    augment: augmentation of generator samples in the fake-score loss.
    make_feed: (mesh, num_micro, micro_batch, abstract) -> the feed of batch-borne inputs, or
      None; an abstract feed only gives the shapes of its batches (for plans).
    project_fake: whether `project` also applies to the fake score (not in SiDA-EDM2).
    generator_init_params: the generator's (and its EMA's) initial parameters when they differ
      from `init_params` (SiD²A: a SiD generator); None = `init_params`.
  """
  teacher: models.Teacher
  student: Callable
  init_params: Any
  spec: dict
  sigma_init: float
  fake_loss: Any
  generator_loss: Any
  hyper: steps.SiDHyper
  image_shape: tuple[int, int, int]
  label_dim: int
  make_generator: Callable[[Any], generators.Generator]
  sampling_params: Callable[[Any, Any], Any]
  export: Callable[[Any, str, int], None]
  conditioning: steps.Conditioning | None = None
  project: Callable | None = None
  augment: Callable | None = None
  make_feed: Callable | None = None
  project_fake: bool = True
  generator_init_params: Any = None


def hyper_from_config(config, **overrides) -> steps.SiDHyper:
  e = config.ema
  return steps.SiDHyper(ema_halflife_kimg=e.halflife_kimg, ema_rampup=e.rampup, **overrides)
