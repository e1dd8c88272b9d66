"""Generation from distilled generators: the one place where one-step and k-step generation is
written.

`StepGenerator` is the formula, used by the training step (through `steps.SiDSetup.generate`)
and by every sampler:

    x_0 = sigma_0 z,  d = G(x_0; sigma_0, c),  then for i = 1..k-1:  d = G(d + sigma_i n_i; sigma_i, c)

with z and n_i standard normal. One step (k = 1) is SiD's generator x = G(sigma_init z;
sigma_init, c). The k-step recursion is SiD-LSG's (lsg_spec §2), on the teacher's DDPM grid
t_i = floor(t_init (1 - i / k)).

`Generator` turns seeds into images on a device mesh: `generate(seeds, conditions, steps=1)`.
Every image depends only on its seed (and its condition), never on the batch size or the device
count: the latent of seed s is `jax.random.normal(jax.random.key(s), shape)`, the fresh noise of
step i >= 1 is `jax.random.normal(jax.random.fold_in(jax.random.key(s), i), shape)`, and a
class drawn for seed s is `jax.random.randint(jax.random.fold_in(jax.random.key(s), 1), ...)`.
Two kinds:

* `ClassGenerator` -- EDM / EDM2 students: unconditional, or class-conditional with a class per
  image (given, or drawn from the seed).
* `TextToImageGenerator` -- SiD-LSG students: Stable Diffusion's UNet with the teacher's text
  encoder and VAE; one prompt per image.

`load(directory)` builds either from a network checkpoint (its network.json decides); the
training loop builds them from the run (`run.build_run`), the sample CLI, the evaluation CLI and
both notebooks from checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sid_jax import checkpoints, models, sharding
from sid_jax.models import latent_decoder, stable_diffusion

Array = jax.Array
# What `python -m sid_jax.convert sd` writes beside a converted model.
SOURCE_RECORD = "source.json"


# ---------------------------------------------------------------------------------------------
# The formula.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepGenerator:
  """x = G(sigma_0 z; sigma_0, c), then k - 1 re-noised steps at `sigmas[1:]` (module docstring).

  `denoiser` is D(params, x, sigma, cond, *, train, rng). Later steps need per-image `keys`
  [B] (their noise is drawn from fold_in(key, i)); one step needs none.
  """
  denoiser: Callable
  sigmas: tuple[float, ...]

  def __call__(self, params, z: Array, cond=None, *, keys: Array | None = None,
               train: bool = False, rng: Array | None = None) -> Array:
    b = z.shape[0]
    if len(self.sigmas) > 1 and keys is None:
      raise ValueError(f"{len(self.sigmas)}-step generation needs per-image keys.")
    d = None
    for i, sigma in enumerate(self.sigmas):
      if i == 0:
        x = sigma * z
      else:
        noise = jax.vmap(lambda k, i=i: jax.random.normal(jax.random.fold_in(k, i), z.shape[1:],
                                                          z.dtype))(keys)
        x = d + sigma * noise
      d = self.denoiser(params, x, jnp.full((b,), sigma, jnp.float32), cond, train=train,
                        rng=rng)
    return d


def one_step(denoiser: Callable, sigma_init: float) -> StepGenerator:
  """SiD's generator: x = G(sigma_init z; sigma_init, c)."""
  return StepGenerator(denoiser, (float(sigma_init),))


def ddpm_timesteps(init_timestep: int, steps: int) -> list[int]:
  """SiD-LSG's k-step timesteps t_i = floor(t_init (1 - i / k)), i = 0..k-1."""
  if steps < 1:
    raise ValueError(f"steps must be at least 1, got {steps}.")
  return [int(math.floor(init_timestep * (1 - i / steps))) for i in range(steps)]


def round_batch(batch: int, mesh, num_items: int | None = None) -> int:
  """`batch` rounded down to a multiple of the mesh's batch shards (at least one per shard), and
  no larger than `num_items` rounded up to that multiple."""
  if batch <= 0:
    raise ValueError(f"The batch must be positive, got {batch}.")
  shards = sharding.batch_size_divisor(mesh)
  batch = max(shards, batch // shards * shards)
  if num_items is not None:
    batch = min(batch, -(-num_items // shards) * shards)
  return batch


# ---------------------------------------------------------------------------------------------
# Seeds -> images.
# ---------------------------------------------------------------------------------------------


def _seed_keys(seeds: Array) -> Array:
  return jax.vmap(jax.random.key)(seeds)


class Generator:
  """Seeds (and conditions) -> images, batch by batch, on a mesh. Subclasses define the
  conditions (`_host_conditions`), the timesteps (`sigmas`) and the program (`_program`)."""

  latent_shape: tuple[int, int, int]
  default_batch: int = 256
  spec: dict | None = None  # the network.json of a generator loaded from a checkpoint

  def __init__(self, params: Any, mesh=None):
    self.mesh = mesh if mesh is not None else sharding.make_mesh({"data": -1})
    self.params = params
    self._batch_sharding = sharding.batch_sharding(self.mesh)
    self._programs: dict[int, Callable] = {}
    self._draw = jax.jit(jax.vmap(self._latent), out_shardings=self._batch_sharding)

  # -- what subclasses define --

  def sigmas(self, steps: int) -> tuple[float, ...]:
    raise NotImplementedError

  def _host_conditions(self, seeds: np.ndarray, conditions) -> np.ndarray | None:
    raise NotImplementedError

  def _program(self, steps: int) -> Callable:
    """(params, z [B, h, w, c], host conditions [B, ...], seeds [B]) -> (images, labels [B])."""
    raise NotImplementedError

  # -- shared --

  def _latent(self, seed):
    return jax.random.normal(jax.random.key(seed), self.latent_shape, jnp.float32)

  def latents(self, seeds: Sequence[int]) -> np.ndarray:
    """[N, h, w, c]: jax.random.normal(jax.random.key(s), (h, w, c)) for every seed s."""
    seeds = np.asarray(seeds, np.int32)
    n = len(seeds)
    shards = sharding.batch_size_divisor(self.mesh)
    padded = np.concatenate([seeds, np.zeros(-n % shards, np.int32)])
    with jax.set_mesh(self.mesh):
      return sharding.to_host(self._draw(padded))[:n]

  def _compiled(self, steps: int) -> Callable:
    if steps not in self._programs:
      self._programs[steps] = jax.jit(self._program(steps),
                                      out_shardings=(self._batch_sharding, self._batch_sharding))
    return self._programs[steps]

  def batches(self, seeds: Sequence[int], conditions=None, steps: int = 1, *, params=None,
              latents: np.ndarray | None = None, batch: int | None = None
              ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yields (index of the first image, images [b, H, W, C] in about [-1, 1], labels [b])
    batch by batch; labels are class ids (-1 when unconditional or text-to-image).

    Every batch has the same size (the last one is padded), so one compiled program serves the
    call; the next batch is dispatched before a batch is handed out.

    Args:
      seeds: one per image.
      conditions: see the subclass.
      steps: generation steps k.
      params: the generator's parameters (default: the ones it was built with).
      latents: optional [N, h, w, c] latents replacing the seeds' own.
      batch: images per compiled call (rounded to the mesh; results do not depend on it).
    """
    if int(steps) != steps or steps < 1:
      raise ValueError(f"steps must be a positive integer, got {steps}.")
    params = self.params if params is None else params
    if params is None:
      raise ValueError("This generator was built without parameters; pass params=.")
    seeds = np.asarray(seeds, np.int64)
    if seeds.ndim != 1 or not len(seeds):
      raise ValueError("Give at least one seed.")
    if seeds.min() < 0 or seeds.max() >= 2**31:
      raise ValueError(f"Seeds must lie in [0, 2^31), got {seeds.min()}..{seeds.max()}.")
    seeds = seeds.astype(np.int32)
    conds = self._host_conditions(seeds, conditions)
    if latents is not None:
      latents = np.asarray(latents)
      if latents.shape != (len(seeds),) + tuple(self.latent_shape):
        raise ValueError(f"latents have shape {latents.shape}; expected "
                         f"{(len(seeds),) + tuple(self.latent_shape)} (one per seed).")
    fn = self._compiled(int(steps))
    size = round_batch(batch or self.default_batch, self.mesh, len(seeds))
    pending = None
    for start in range(0, len(seeds), size):
      chunk = seeds[start:start + size]
      pad = size - len(chunk)

      def padded(a, fill=0):
        return np.concatenate([a, np.full((pad,) + a.shape[1:], fill, a.dtype)])

      s = padded(chunk)
      with jax.set_mesh(self.mesh):
        if latents is None:
          z = self._draw(s)
        else:
          z = jax.device_put(padded(np.asarray(latents[start:start + size], np.float32)),
                             self._batch_sharding)
        c = None if conds is None else jax.device_put(padded(conds[start:start + size]),
                                                      self._batch_sharding)
        x, labels = fn(params, z, c, jax.device_put(s, self._batch_sharding))
      if pending is not None:
        yield _fetch(*pending)
      pending = (start, x, labels, len(chunk))
    yield _fetch(*pending)

  def generate(self, seeds: Sequence[int], conditions=None, steps: int = 1, **kwargs
               ) -> np.ndarray:
    """Images [N, H, W, C] in about [-1, 1] (host float32); see `batches` for the arguments."""
    return np.concatenate([x for _, x, _ in self.batches(seeds, conditions, steps, **kwargs)])


def _fetch(start, x, labels, n):
  """Host copies of a batch: on every process, the whole batch (an all-gather on several)."""
  return start, sharding.to_host(x)[:n], sharding.to_host(labels)[:n]


class ClassGenerator(Generator):
  """An EDM / EDM2 student: images = G(sigma_init z; sigma_init, one_hot(class)).

  Conditions: None (a class drawn from each seed; nothing when unconditional), one class id for
  every image, or a sequence of class ids, one per seed.
  """

  def __init__(self, denoiser: Callable, params: Any, *, sigma_init: float,
               image_shape: Sequence[int], label_dim: int, mesh=None, decoder=None):
    """`image_shape` is what the network makes; with `decoder` (EDM2: a
    `latent_decoder.LatentDecoder`) those are latents, and the images are their decoding."""
    self.denoiser, self.sigma_init = denoiser, float(sigma_init)
    self.latent_shape = self.image_shape = tuple(int(v) for v in image_shape)
    self.label_dim = int(label_dim)
    self.decoder = decoder
    super().__init__(params, mesh)
    self._decoder_params = None
    if decoder is not None:
      self.image_shape = decoder.image_shape(self.latent_shape)
      self._decoder_params = jax.device_put(
          decoder.params, sharding.param_shardings(self.mesh, decoder.params))

  def batches(self, seeds: Sequence[int], conditions=None, steps: int = 1, *, params=None,
              **kwargs) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    if self.decoder is not None:  # the program takes the VAE's parameters next to the network's
      params = self.params if params is None else params
      if params is None:
        raise ValueError("This generator was built without parameters; pass params=.")
      params = {"generator": params, "decoder": self._decoder_params}
    return super().batches(seeds, conditions, steps, params=params, **kwargs)

  def sigmas(self, steps: int) -> tuple[float, ...]:
    if steps != 1:
      raise ValueError(f"steps={steps}: class-conditional and unconditional SiD generators are "
                       "one-step generators (k-step generation is SiD-LSG's, on a DDPM grid).")
    return (self.sigma_init,)

  def _host_conditions(self, seeds, conditions):
    if not self.label_dim:
      if conditions is not None:
        raise ValueError("A class was given, but this generator is unconditional.")
      return None
    if conditions is None:
      return np.full(len(seeds), -1, np.int32)
    ids = np.asarray(conditions)
    if ids.ndim == 0:
      ids = np.full(len(seeds), int(ids))
    if ids.shape != (len(seeds),) or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"Give one class id for every image or one integer class id per seed "
                       f"({len(seeds)}), got {ids.dtype} {ids.shape}.")
    bad = ids[(ids < 0) | (ids >= self.label_dim)]
    if len(bad):
      raise ValueError(f"Class {int(bad[0])} is out of range for label_dim={self.label_dim}.")
    return ids.astype(np.int32)

  def labels(self, seeds: Sequence[int], conditions=None) -> np.ndarray | None:
    """The class id of every seed's image (given, or drawn from the seed); None if
    unconditional."""
    ids = self._host_conditions(np.asarray(seeds, np.int32), conditions)
    if ids is None:
      return None
    drawn = np.asarray(jax.vmap(self._drawn_class)(_seed_keys(jnp.asarray(seeds, jnp.int32))))
    return np.where(ids >= 0, ids, drawn).astype(np.int32)

  def _drawn_class(self, key):
    return jax.random.randint(jax.random.fold_in(key, 1), (), 0, self.label_dim)

  def _program(self, steps):
    gen = StepGenerator(self.denoiser, self.sigmas(steps))

    def program(params, z, classes, seeds):
      keys = _seed_keys(seeds)
      if classes is None:
        labels, ids = None, jnp.full(seeds.shape, -1, jnp.int32)
      else:
        ids = jnp.where(classes >= 0, classes, jax.vmap(self._drawn_class)(keys))
        labels = jax.nn.one_hot(ids, self.label_dim, dtype=jnp.float32)
      if self.decoder is None:
        return gen(params, z, labels, keys=keys), ids
      latents = gen(params["generator"], z, labels, keys=keys)
      return self.decoder(params["decoder"], latents), ids

    return program


class TextToImageGenerator(Generator):
  """A SiD-LSG student: Stable Diffusion's UNet taking `steps` steps from `init_timestep` on the
  DDPM grid, the teacher's text encoder, the VAE decoder (images about [-1, 1], not clamped).

  params = {'unet', 'text_encoder', 'vae'}. Conditions: one prompt per seed (required).
  """
  default_batch = 16

  def __init__(self, sd: stable_diffusion.StableDiffusion, params: Any, *, init_timestep: int,
               mesh=None):
    self.sd, self.init_timestep = sd, int(init_timestep)
    num = len(sd.denoiser.sigmas)
    if not 0 <= self.init_timestep < num:
      raise ValueError(f"init_timestep={self.init_timestep} must lie in [0, {num}).")
    self.latent_shape = tuple(sd.latent_shape)
    super().__init__(params, mesh)

  def timesteps(self, steps: int) -> list[int]:
    return ddpm_timesteps(self.init_timestep, steps)

  def sigmas(self, steps: int) -> tuple[float, ...]:
    grid = self.sd.denoiser.sigmas
    return tuple(float(grid[t]) for t in self.timesteps(steps))

  def _host_conditions(self, seeds, conditions):
    if conditions is None or isinstance(conditions, str):
      raise ValueError("A text-to-image generator needs one prompt per seed.")
    prompts = list(conditions)
    if len(prompts) != len(seeds):
      raise ValueError(f"{len(seeds)} seeds but {len(prompts)} prompts.")
    return self.sd.tokenize(prompts)

  def _program(self, steps):
    gen = StepGenerator(self.sd.denoiser, self.sigmas(steps))

    def program(params, z, ids, seeds):
      emb = self.sd.encode_text(params["text_encoder"], ids)
      latents = gen(params["unet"], z, emb, keys=_seed_keys(seeds))
      return self.sd.decode(params["vae"], latents), jnp.full(seeds.shape, -1, jnp.int32)

    return program


# ---------------------------------------------------------------------------------------------
# Generators from network checkpoints.
# ---------------------------------------------------------------------------------------------


def is_text_to_image(spec: dict[str, Any]) -> bool:
  """Whether a network.json spec is a Stable Diffusion model (a SiD-LSG generator or teacher)."""
  return spec.get("class_name") == stable_diffusion.CLASS_NAME


def resolve_init_timestep(directory: str, spec: dict[str, Any],
                          init_timestep: int | None = None) -> tuple[int, str]:
  """(t_init, where it came from) for a Stable Diffusion checkpoint.

  Order: `init_timestep` (the `--init_timestep` flag); the spec's
  `kwargs.generator.init_timestep` (a SiD-LSG run's export); the `generator.init_timestep` of
  source.json (a released generator converted with `python -m sid_jax.convert sd --generator`).
  A model with none of them is a teacher, and a ValueError says how to use it anyway.
  """
  num = stable_diffusion.scheduler_settings(spec["kwargs"]["scheduler"])["num_train_timesteps"]
  if init_timestep is not None:
    value, origin = int(init_timestep), "--init_timestep"
  elif "init_timestep" in (spec["kwargs"].get("generator") or {}):
    value, origin = int(spec["kwargs"]["generator"]["init_timestep"]), checkpoints.NETWORK_SPEC
  else:
    record = {}
    path = os.path.join(directory, SOURCE_RECORD)
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        record = json.load(f)
    gen = record.get("generator") or {}
    if "init_timestep" not in gen:
      raise ValueError(
          f"{directory!r} is a Stable Diffusion teacher, not a distilled generator: its "
          f"{checkpoints.NETWORK_SPEC} has no 'generator' entry (a model converted with "
          "`python -m sid_jax.convert sd` without --generator). Sample a SiD-LSG run "
          "(--workdir RUN, i.e. RUN/generator), or pass --init_timestep (e.g. 625) to use "
          "these weights as a one-step generator anyway.")
    value, origin = int(gen["init_timestep"]), SOURCE_RECORD
  if not 0 <= value < num:
    raise ValueError(f"init_timestep={value} (from {origin}) must lie in [0, {num}).")
  return value, origin


def load(directory: str, *, mesh=None, init_timestep: int | None = None) -> Generator:
  """The generator stored in a network checkpoint directory, its parameters on `mesh` (default:
  all devices on a 'data' axis). `init_timestep` overrides a text-to-image generator's t_init."""
  spec = checkpoints.load_network_spec(directory)
  mesh = mesh if mesh is not None else sharding.make_mesh({"data": -1})
  if is_text_to_image(spec):
    t_init, _ = resolve_init_timestep(directory, spec, init_timestep)
    sd, params = stable_diffusion.load(directory)
    params = jax.device_put(params, sharding.param_shardings(mesh, params))
    gen = TextToImageGenerator(sd, params, init_timestep=t_init, mesh=mesh)
    gen.spec = spec
    return gen
  if init_timestep is not None:
    raise ValueError(f"init_timestep is for text-to-image generators; {directory!r} is a "
                     f"{spec.get('class_name')!r} generator.")
  if "sigma_init" not in spec:
    raise ValueError(f"{directory!r} is a network checkpoint but not a one-step generator "
                     "(its network.json has no 'sigma_init').")
  denoiser = models.build_denoiser(spec)
  res, _, ch, label_dim = models.spec_image_shape(spec)
  params = checkpoints.load_network_params(
      directory, models.abstract_params(denoiser, (res, res, ch), label_dim))
  params = jax.device_put(params, sharding.param_shardings(mesh, params))
  decoder = None
  if spec.get("decoder"):
    decoder = latent_decoder.from_generator(directory, spec["decoder"])
  gen = ClassGenerator(denoiser, params, sigma_init=float(spec["sigma_init"]),
                       image_shape=(res, res, ch), label_dim=label_dim, mesh=mesh,
                       decoder=decoder)
  gen.spec = spec
  return gen
