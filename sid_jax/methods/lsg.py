"""SiD-LSG: data-free one-step text-to-image distillation of Stable Diffusion (lsg_spec).

This module only *assembles* the method from the shared pieces; nothing here is a second
training loop:
* the teacher, fake score and generator are `denoisers.DiscreteEpsDenoiser`s around three copies
  of the teacher's UNet (the generator at t_init = 625: x_g = sigma_625 (z - eps(s_625 z)));
* the losses are `losses.DSMLoss` (the epsilon loss: weight `losses.EpsWeight`, 1 / sigma^2) and
  `losses.SiDGeneratorLoss`, both with noise levels `losses.DiscreteLevels` (integer t in
  [20, 979]);
* long and short guidance (kappa_1, kappa_2, kappa_4) and prompt dropout are `steps.SiDHyper`
  settings applied through `denoisers.guided`;
* prompts come from `data.prompts.PromptSource`, are tokenised on the host and encoded once per
  micro-batch inside the step (`steps.Conditioning`); the empty prompt's embedding is computed once;
* sampling is `generators.TextToImageGenerator`.

`config.method = 'sid_lsg'` selects it (configs/sid_lsg.py:teacher=sd15|sd21base,kappa=K).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

from sid_jax import checkpoints, generators, losses, models, sharding, steps
from sid_jax.methods import base
from sid_jax.models import stable_diffusion
from sid_jax.nets import attention
from sid_jax.data import prompts as prompts_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
TINY_PROMPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                            "tiny_prompts.txt")


def check_config(config, abstract: bool = False) -> None:
  """Everything SiD-LSG needs from the config, checked before anything is built (`abstract`:
  for a plan, which reads no teacher or prompt file)."""
  g = config.lsg
  if config.teacher.type not in ("network", "random"):
    raise ValueError(f"config.teacher.type={config.teacher.type!r}: SiD-LSG takes 'network' (a "
                     "checkpoint from `python -m sid_jax.convert sd`) or 'random' (tiny tests).")
  if config.teacher.type == "network" and not abstract:
    path = config.teacher.checkpoint
    if not path or not os.path.isfile(os.path.join(path, checkpoints.NETWORK_SPEC)):
      raise FileNotFoundError(
          f"config.teacher.checkpoint={path!r} is not a converted Stable Diffusion model. "
          "Convert a local diffusers folder first: python -m sid_jax.convert sd --src "
          "stable-diffusion-v1-5 --dst teachers/sd15")
  for name in ("cfg_fake_train", "cfg_fake_eval", "cfg_teacher"):
    if not g[name] > 0:
      raise ValueError(f"config.lsg.{name} must be positive, got {g[name]}.")
  if not 0 <= g.cond_dropout < 1:
    raise ValueError(f"config.lsg.cond_dropout must lie in [0, 1), got {g.cond_dropout}.")
  if not 0 <= g.t_min < g.t_max <= 1000 or not 0 <= g.init_timestep < 1000:
    raise ValueError(f"config.lsg needs 0 <= t_min < t_max <= 1000 and init_timestep in "
                     f"[0, 1000), got t_min={g.t_min}, t_max={g.t_max}, "
                     f"init_timestep={g.init_timestep}.")
  if g.compute_dtype not in DTYPES:
    raise ValueError(f"config.lsg.compute_dtype={g.compute_dtype!r}; expected one of "
                     f"{sorted(DTYPES)}.")
  attention.check_query_chunk(g.attention_chunk, "config.lsg.attention_chunk")
  model_dtype = config.model.get("compute_dtype", "float32")
  if model_dtype not in ("float32", g.compute_dtype):
    raise ValueError(f"config.model.compute_dtype={model_dtype!r} is for EDM/EDM2 networks; "
                     "SiD-LSG's precision is config.lsg.compute_dtype="
                     f"{g.compute_dtype!r} (set that one).")
  if not g.grid_prompts:
    raise ValueError("config.lsg.grid_prompts must hold at least one prompt.")
  source = prompt_path(config)
  if not abstract and not source.startswith("tfds:") and not os.path.isfile(source):
    raise FileNotFoundError(f"config.lsg.prompts={source!r}: no such prompt file (one prompt per "
                            "line, e.g. LAION-Aesthetics 6+ aesthetics_6_plus.txt).")
  if config.eval.kind not in ("auto", "none"):
    raise ValueError(f"config.eval.kind={config.eval.kind!r}: SiD-LSG runs write sample grids "
                     "only; evaluate FID / CLIP score with `python -m sid_jax.evaluate`.")
  if config.data.label_dim:
    raise ValueError("config.data.label_dim must be 0 for text-to-image runs.")


def prompt_path(config) -> str:
  return config.lsg.prompts or (TINY_PROMPTS if config.teacher.type == "random" else "")


def abstract_sd(config) -> tuple[stable_diffusion.StableDiffusion, dict[str, Any], dict]:
  """The teacher as shapes only, reading no weights: the converted checkpoint's spec if it
  exists, else the full-size architecture `config.teacher.architecture` (sd15 | sd21base), or
  the tiny model for teacher type 'random'."""
  t, g = config.teacher, config.lsg
  if t.type == "random":
    spec = stable_diffusion.tiny_spec(sd2=bool(g.tiny_sd2))
  elif t.checkpoint and os.path.isfile(os.path.join(t.checkpoint, checkpoints.NETWORK_SPEC)):
    spec = checkpoints.load_network_spec(t.checkpoint)
  else:
    spec = stable_diffusion.reference_spec(t.get("architecture", ""))
  # Tokenising is never traced: the byte tokenizer stands in for the real one.
  sd = stable_diffusion.build(spec, stable_diffusion.tiny_tokenizer_dir(spec),
                              dtype=DTYPES[g.compute_dtype], remat=g.remat,
                              attention_chunk=g.attention_chunk)
  return sd, stable_diffusion.abstract_params(sd), {"type": "abstract", "path": "", "sha256": ""}


def load_sd(config) -> tuple[stable_diffusion.StableDiffusion, dict[str, Any], dict]:
  """The teacher: (model, params {'unet', 'text_encoder', 'vae'}, info for checkpoints)."""
  t, g = config.teacher, config.lsg
  dtype = DTYPES[g.compute_dtype]
  if t.type == "network":
    sd, params = stable_diffusion.load(t.checkpoint, dtype=dtype, remat=g.remat,
                                       attention_chunk=g.attention_chunk)
    info = {"type": "network", "path": os.path.abspath(t.checkpoint),
            "sha256": checkpoints.hash_path(os.path.join(t.checkpoint, checkpoints.NETWORK_SPEC))}
  else:
    spec = stable_diffusion.tiny_spec(sd2=bool(g.tiny_sd2))
    sd = stable_diffusion.build(spec, stable_diffusion.tiny_tokenizer_dir(spec), dtype=dtype,
                                remat=g.remat, attention_chunk=g.attention_chunk)
    params = stable_diffusion.random_params(sd, t.random_seed)
    info = {"type": "random", "seed": t.random_seed, "spec": "tiny_sd2" if g.tiny_sd2 else "tiny"}
  return sd, params, info


def assemble(config, abstract: bool = False) -> base.Assembly:
  """SiD-LSG's assembly; with `abstract`, parameters are shapes only (for `sid_jax.plan`)."""
  sd, params, info = abstract_sd(config) if abstract else load_sd(config)
  g = config.lsg
  den = sd.denoiser

  def teacher_fn(frozen, x, sigma, cond=None, **kwargs):
    return den(frozen["unet"], x, sigma, cond, **kwargs)

  if abstract:
    empty = jax.ShapeDtypeStruct((1, stable_diffusion.MAX_LENGTH), jnp.int32)
    uncond = jax.eval_shape(sd.encode_text, params["text_encoder"], empty)
  else:
    uncond = jax.jit(sd.encode_text)(params["text_encoder"], sd.tokenize([""]))
  frozen = {"unet": params["unet"], "text_encoder": params["text_encoder"], "uncond": uncond}
  conditioning = steps.Conditioning(
      encode=lambda fz, ids: sd.encode_text(fz["text_encoder"], ids),
      uncond=lambda fz: fz["uncond"])
  levels = losses.DiscreteLevels(tuple(float(s) for s in den.sigmas), t_min=g.t_min,
                                 t_max=g.t_max)
  s = config.sid
  fake_loss = losses.DSMLoss(levels=levels, weight=losses.EpsWeight(),
                             loss_scale=s.fake_loss_scale)
  gen_loss = losses.SiDGeneratorLoss(levels=levels, alpha=s.alpha, loss_scale=s.gen_loss_scale)
  hyper = base.hyper_from_config(
      config, cfg_fake_train=float(g.cfg_fake_train), cfg_fake_eval=float(g.cfg_fake_eval),
      cfg_teacher=float(g.cfg_teacher), cond_dropout=float(g.cond_dropout))
  spec = dict(sd.spec)
  spec["kwargs"] = dict(spec["kwargs"], generator={"init_timestep": int(g.init_timestep)})
  teacher = models.Teacher(denoiser=teacher_fn, params=frozen, info=info, spec=spec)
  # Kept for sampling and export as host arrays (the UNets are not held here: the run places the
  # teacher and students on the mesh from its own host copies).
  vae_params, text_params = params["vae"], params["text_encoder"]
  if not abstract:
    vae_params, text_params = jax.device_get((vae_params, text_params))

  def make_generator(mesh):
    return generators.TextToImageGenerator(sd, None, init_timestep=g.init_timestep, mesh=mesh)

  def sampling_params(unet, frozen_on_mesh):
    return {"unet": unet, "text_encoder": frozen_on_mesh["text_encoder"], "vae": vae_params}

  def export(unet, directory, step):
    """A complete Stable Diffusion folder whose UNet is the generator's."""
    tokenizer_dir = (os.path.join(config.teacher.checkpoint, stable_diffusion.TOKENIZER_DIR)
                     if config.teacher.type == "network" else
                     stable_diffusion.tiny_tokenizer_dir(sd.spec))
    stable_diffusion.save(directory, dict(spec, step=step),
                          {"unet": unet, "vae": vae_params, "text_encoder": text_params},
                          tokenizer_dir)

  def make_feed(mesh, num_micro, micro_batch, abstract=False):
    return PromptFeed(config, sd, mesh, num_micro, micro_batch, abstract=abstract)

  return base.Assembly(
      # The generator and fake score start as the teacher's UNet: the same arrays, no copy.
      teacher=teacher, student=den, init_params=params["unet"],
      spec=spec, sigma_init=den.sigma_at(g.init_timestep), fake_loss=fake_loss,
      generator_loss=gen_loss, hyper=hyper, image_shape=tuple(sd.latent_shape), label_dim=0,
      make_generator=make_generator, sampling_params=sampling_params, export=export,
      conditioning=conditioning, make_feed=make_feed)


# ---------------------------------------------------------------------------------------------
# Prompts -> the step's batch.
# ---------------------------------------------------------------------------------------------


class PromptFeed:
  """Token ids for each iteration: {'fake': [num_micro, micro, 77], 'gen': same}, drawn in that
  order from one prompt stream (the two updates use disjoint prompts, lsg_spec §5.1). Each host
  reads its own share of the stream; the position is saved with every checkpoint."""

  def __init__(self, config, sd: stable_diffusion.StableDiffusion, mesh, num_micro: int,
               micro_batch: int, abstract: bool = False):
    self.sd = sd
    self.num_micro, self.micro = num_micro, micro_batch
    self.count = jax.process_count()
    self.sharding = sharding.batch_sharding(mesh, 1)
    if abstract:  # shapes only (plans): no prompt file is opened
      self.source = None
      return
    if micro_batch % self.count:
      raise ValueError(f"config.training.micro_batch={micro_batch} is not divisible by the "
                       f"{self.count} hosts.")
    self.source = prompts_lib.PromptSource(
        prompt_path(config), seed=config.seed, process_index=jax.process_index(),
        process_count=self.count, data_dir=config.lsg.get("prompts_data_dir") or None)

  def _ids(self) -> jax.Array:
    if self.source is None:
      raise RuntimeError("This prompt feed is abstract (a plan's): it has shapes, no prompts.")
    local = self.sd.tokenize(self.source.next_batch(self.num_micro * self.micro // self.count))
    local = local.reshape(self.num_micro, self.micro // self.count, -1)
    shape = (self.num_micro, self.micro, local.shape[-1])
    return jax.make_array_from_process_local_data(self.sharding, local, shape)

  def next(self) -> dict[str, jax.Array]:
    fake = self._ids()
    return {"fake": fake, "gen": self._ids()}

  def abstract(self) -> dict[str, jax.ShapeDtypeStruct]:
    a = jax.ShapeDtypeStruct((self.num_micro, self.micro, stable_diffusion.MAX_LENGTH),
                             jnp.int32, sharding=self.sharding)
    return {"fake": a, "gen": a}

  def state(self) -> dict:
    return self.source.state()

  def restore(self, state: dict) -> None:
    self.source.restore(state)
