"""Pure SiD update steps: fake-score step, generator step, EMA (spec §4).

One iteration = one fake-score (psi) update on fresh generator samples, then one generator
(theta) update with fresh draws, then the EMA of the generator. Every random array is drawn
inside the step with its *global* shape from `fold_in(key, step)`, so the numbers do not depend
on how many devices share the batch. A global batch is processed as `num_micro` micro-batches
under `lax.scan` (gradient accumulation); each micro-batch's loss is already normalised by the
global batch, so the accumulated gradient is the official one.

The step is given what varies between methods, as values in `SiDSetup`: the two losses (which
draw their own noise levels), the one-step generator, the denoisers, an optional parameter
projection (EDM2's forced weight normalisation) and batch-fed conditions. SiD, SiD-LSG and
SiDA are configurations of these steps, not branches in them; this module imports no network.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from sid_jax import denoisers

Array = jax.Array


@flax.struct.dataclass
class SiDState:
  step: Array  # iterations done (int32)
  generator: Any
  generator_ema: Any
  fake_score: Any
  generator_opt: Any
  fake_opt: Any
  nonfinite_streak: Array  # consecutive iterations with a non-finite loss or gradient


@dataclasses.dataclass(frozen=True)
class SiDHyper:
  """The step's own settings: the EMA and classifier-free guidance. (The losses' settings, the
  noise levels among them, live in the loss objects; sigma_init in the generator.)"""
  ema_halflife_kimg: float = 500.0
  ema_rampup: float | None = 0.05
  # SiD-LSG's long and short classifier-free guidance (lsg_spec §3): kappa_1 in the fake score's
  # own loss, kappa_2 (= kappa_3) for the fake score and kappa_4 for the teacher inside the
  # generator loss. All 1 = no guidance (no unconditional pass at all).
  cfg_fake_train: float = 1.0
  cfg_fake_eval: float = 1.0
  cfg_teacher: float = 1.0
  # Probability of replacing a prompt by the empty one in the fake-score step; applied only when
  # kappa_1 != 1 or kappa_2 != 1, as in the official code (lsg_spec §3).
  cond_dropout: float = 0.1
  # SiDA's warm-up (spec §6.4): while the images done before an iteration (step x global batch)
  # are <= this, the generator's gradients are computed but its optimiser step is skipped (its
  # parameters, projected ones aside, and Adam state stay as they are). None: never frozen.
  generator_frozen_nimg: float | None = None

  @property
  def guided(self) -> bool:
    return (self.cfg_fake_train, self.cfg_fake_eval, self.cfg_teacher) != (1.0, 1.0, 1.0)

  @property
  def effective_cond_dropout(self) -> float:
    return self.cond_dropout if (self.cfg_fake_train != 1 or self.cfg_fake_eval != 1) else 0.0


@dataclasses.dataclass(frozen=True)
class Conditioning:
  """Per-sample conditions fed with the batch (text prompts) rather than drawn in the step.

  `encode(frozen, raw)` turns a micro-batch of raw conditions (token ids [m, L]) into what the
  denoisers take (text embeddings [m, L, D]); `uncond(frozen)` is the unconditional condition
  [1, ...] (the empty prompt's embedding, computed once and kept with the frozen parameters).
  `frozen` is the run's constant parameter tree (the same one the teacher denoiser receives).
  """
  encode: Callable[[Any, Array], Array]
  uncond: Callable[[Any], Array]


@dataclasses.dataclass(frozen=True)
class SiDSetup:
  """Everything static about a distillation run: networks, losses, shapes, optimisers, layout.

  teacher: D(frozen, x, sigma, cond) -- the frozen teacher denoiser (frozen = the step's
    constant argument).
  fake_score: D(psi, x, sigma, cond, *, train, rng, **kw) -- the fake score network.
  generate: (theta, z, cond, *, train, rng) -> x_g -- the one-step generator
    (`generators.one_step`).
  fake_loss: a loss with `draw(key, shape)` and `(fake, y, cond, d, *, batch_size,
    aug_labels)` (`losses.DSMLoss`).
  generator_loss: a loss with `draw(key, shape)` and `(teacher, fake, x_g, cond, d, *,
    batch_size)` (`losses.SiDGeneratorLoss`).
  project: params -> params applied before each update's forward pass (EDM2's forced weight
    normalisation); the projected weights are what the optimiser then updates, like the
    official in-place renormalisation. None = no projection. `project_fake=False` applies it
    to the generator only (SiDA-EDM2, where the official fake score's hook is dead, spec §7.2).

  Real data (SiDA): a batch half that is a dict {'images': [num_micro, micro, H, W, C],
  'labels': [num_micro, micro, label_dim] (conditional runs)} -- what `sid_jax.data.real`'s feed
  yields -- gives that update its labels (instead of uniform draws) and, to a fake loss with
  `uses_real_data`, its real images (`d['real']`, augmented independently of the fake ones).
  A generator loss with `uses_nimg` is given the images done before the iteration (`nimg`, its
  warm-up schedule).
  """
  teacher: Callable
  fake_score: Callable
  generate: Callable
  fake_loss: Any
  generator_loss: Any
  image_shape: tuple[int, int, int]  # H, W, C
  label_dim: int
  global_batch: int
  micro_batch: int
  generator_tx: optax.GradientTransformation
  fake_tx: optax.GradientTransformation
  hyper: SiDHyper = SiDHyper()
  project: Callable | None = None
  # Layout of per-sample draws [num_micro, micro_batch, ...]; None outside a mesh.
  draw_sharding: NamedSharding | None = None
  # Optional augmentation of generator samples in the fake-score loss: (key, x) -> (y, aug_labels).
  augment: Callable | None = None
  # Unroll the micro-batch loop (fast on CPU; on TPU/GPU a rolled loop keeps compile time flat).
  unroll_micro: bool = False
  # Conditions that come with the batch (text prompts) instead of being drawn in the step.
  conditioning: Conditioning | None = None
  project_fake: bool = True

  @property
  def num_micro(self) -> int:
    return self.global_batch // self.micro_batch


def init_state(setup: SiDSetup, generator_params, fake_params) -> SiDState:
  return SiDState(
      step=jnp.zeros([], jnp.int32),
      generator=generator_params,
      generator_ema=jax.tree.map(jnp.copy, generator_params),
      fake_score=fake_params,
      generator_opt=setup.generator_tx.init(generator_params),
      fake_opt=setup.fake_tx.init(fake_params),
      nonfinite_streak=jnp.zeros([], jnp.int32),
  )


# ---------------------------------------------------------------------------------------------
# Random draws with global shapes.
# ---------------------------------------------------------------------------------------------


def _constrain(setup: SiDSetup, x: Array) -> Array:
  if setup.draw_sharding is None:
    return x
  return jax.lax.with_sharding_constraint(x, setup.draw_sharding)


def draw_labels(setup: SiDSetup, key: Array, shape: tuple[int, ...]) -> Array | None:
  """Uniform class labels as one-hot float rows (None for an unconditional run)."""
  if setup.label_dim == 0:
    return None
  idx = jax.random.randint(key, shape, 0, setup.label_dim)
  return jax.nn.one_hot(idx, setup.label_dim, dtype=jnp.float32)


def _draws(setup: SiDSetup, key: Array, loss, raw_cond: Array | dict | None = None,
           dropout: float = 0.0, given: dict[str, Array] | None = None) -> dict[str, Array]:
  """z, labels, the loss's own draws (`loss.draw`: noise levels) and noise for every micro-batch.

  With `setup.conditioning`, the batch's raw conditions `raw_cond` [num_micro, micro, ...] take
  the place of drawn labels, and `dropout` > 0 adds a Bernoulli mask 'drop' (condition replaced
  by the unconditional one). `given` replaces draws of the same names and shapes (a seam for
  parity tests against another implementation's draws; training never passes it). A dict
  `raw_cond` is real data (see `SiDSetup`).
  """
  lead = (setup.num_micro, setup.micro_batch)
  data = raw_cond if isinstance(raw_cond, dict) else None
  if data is not None:
    raw_cond = None
  kz, kl, ks, kn = jax.random.split(key, 4)
  img = lead + tuple(setup.image_shape)
  out = {
      "z": jax.random.normal(kz, img, jnp.float32),
      "noise": jax.random.normal(kn, img, jnp.float32),
      **loss.draw(ks, lead),
  }
  if setup.conditioning is not None:
    if raw_cond is None:
      raise ValueError("This setup takes its conditions from the batch, but none was given.")
    if tuple(raw_cond.shape[:2]) != lead:
      raise ValueError(f"Batch conditions have leading shape {tuple(raw_cond.shape[:2])}; "
                       f"expected [num_micro, micro_batch] = {lead}.")
    out["cond"] = raw_cond
    if dropout > 0:
      out["drop"] = jax.random.bernoulli(kl, dropout, lead)
  else:
    labels = draw_labels(setup, kl, lead)
    if labels is not None:
      out["labels"] = labels
  if data is not None:
    out.update(_real_data(setup, loss, data, lead))
  elif getattr(loss, "uses_real_data", False):
    raise ValueError("This fake-score loss needs real images, but the batch has none (the run "
                     "needs a dataset: config.data).")
  for name, value in (given or {}).items():
    if name not in out or tuple(value.shape) != tuple(out[name].shape):
      expected = {k: tuple(v.shape) for k, v in out.items()}
      raise ValueError(f"Given draw {name!r} with shape {tuple(value.shape)} is not one of this "
                       f"update's draws {expected}.")
    out[name] = jnp.asarray(value, out[name].dtype)
  return {k: _constrain(setup, v) for k, v in out.items()}


def _real_data(setup: SiDSetup, loss, data: dict, lead: tuple[int, int]) -> dict[str, Array]:
  """The labels (replacing drawn ones) and, for a loss that uses them, the real images of a
  real-data batch half, with their shapes checked."""
  out = {}
  if setup.label_dim:
    if "labels" not in data:
      raise ValueError(f"The data batch has no labels, but the run is conditional "
                       f"(label_dim={setup.label_dim}).")
    want = lead + (setup.label_dim,)
    if tuple(data["labels"].shape) != want:
      raise ValueError(f"Data labels have shape {tuple(data['labels'].shape)}; expected {want}.")
    out["labels"] = data["labels"].astype(jnp.float32)
  if getattr(loss, "uses_real_data", False):
    want = lead + tuple(setup.image_shape)
    if "images" not in data or tuple(data["images"].shape) != want:
      got = tuple(data["images"].shape) if "images" in data else None
      raise ValueError(f"Real images of shape {got}; expected [num_micro, micro_batch, H, W, C] "
                       f"= {want}.")
    out["real"] = data["images"].astype(jnp.float32)
  return out


def _conditions(setup: SiDSetup, frozen, d: dict[str, Array], uncond: Array | None):
  """The micro-batch's conditions: drawn one-hot labels, or encoded batch conditions (computed
  once per micro-batch, shared by every network) with dropped ones set to `uncond`."""
  if setup.conditioning is None:
    return d.get("labels")
  cond = jax.lax.stop_gradient(setup.conditioning.encode(frozen, d["cond"]))
  if "drop" in d:
    mask = d["drop"].reshape((-1,) + (1,) * (cond.ndim - 1))
    cond = jnp.where(mask, jnp.broadcast_to(uncond, cond.shape).astype(cond.dtype), cond)
  return cond


def _uncond(setup: SiDSetup, frozen) -> Array | None:
  if setup.conditioning is None:
    if setup.hyper.guided:
      raise ValueError("Classifier-free guidance needs conditions with an unconditional "
                       "counterpart (text prompts); this setup has none.")
    return None
  return jax.lax.stop_gradient(setup.conditioning.uncond(frozen))


def _accumulate(loss_fn, params, draws: dict[str, Array], num_micro: int, unroll: bool):
  """Sums value_and_grad of loss_fn(params, micro_draws, index) over the micro-batches.

  One micro-batch is computed directly. Several run under `lax.scan`, fully unrolled when
  `unroll` (XLA:CPU runs convolutions inside a loop body ~25x slower than outside one).
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if num_micro == 1:
    micro = jax.tree.map(lambda x: x[0], draws)
    (loss, aux), grads = grad_fn(params, micro, jnp.zeros([], jnp.int32))
    return loss, grads, jnp.sum(aux["valid"]).astype(jnp.int32)

  def body(carry, inputs):
    loss_sum, grad_sum, valid = carry
    micro, index = inputs
    (loss, aux), grads = grad_fn(params, micro, index)
    grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
    return (loss_sum + loss, grad_sum, valid + jnp.sum(aux["valid"])), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  init = (jnp.zeros([], jnp.float32), zeros, jnp.zeros([], jnp.int32))
  (loss, grads, valid), _ = jax.lax.scan(body, init, (draws, jnp.arange(num_micro)),
                                        unroll=num_micro if unroll else 1)
  return loss, grads, valid


def _project(setup: SiDSetup, params):
  return params if setup.project is None else setup.project(params)


def _update(setup: SiDSetup, tx, params, opt_state, loss_fn, draws, prefix: str,
            project: bool = True, apply: Array | None = None):
  """Projection, accumulated loss and gradient, optimiser step; metrics named `prefix`_*.

  `apply` (a bool scalar) False skips the optimiser step: the (projected) parameters and the
  optimiser state are returned unchanged (SiDA's frozen generator)."""
  if project:
    params = _project(setup, params)
  loss, grads, valid = _accumulate(loss_fn, params, draws, setup.num_micro, setup.unroll_micro)
  metrics = {
      f"{prefix}_loss": loss,
      f"{prefix}_grad_norm": optax.tree.norm(grads),
      f"{prefix}_valid_fraction": valid / setup.global_batch,
  }
  updates, new_opt_state = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  if apply is not None:
    keep = lambda new, old: jnp.where(apply, new, old)
    new_params = jax.tree.map(keep, new_params, params)
    new_opt_state = jax.tree.map(keep, new_opt_state, opt_state)
  return new_params, new_opt_state, metrics


# ---------------------------------------------------------------------------------------------
# The two updates and the EMA.
# ---------------------------------------------------------------------------------------------


def fake_score_step(setup: SiDSetup, state: SiDState, key: Array, frozen=None,
                    batch: dict[str, Array] | None = None):
  """One psi update of `setup.fake_loss` on (stop-gradient) generator samples (spec §2;
  lsg_spec §4.2: the epsilon loss of the kappa_1-guided fake score, with prompt dropout)."""
  h = setup.hyper
  k_draw, k_drop, k_aug = jax.random.split(key, 3)
  draws = _draws(setup, k_draw, setup.fake_loss, (batch or {}).get("fake"),
                 h.effective_cond_dropout, (batch or {}).get("fake_draws"))
  uncond = _uncond(setup, frozen)
  real_data = getattr(setup.fake_loss, "uses_real_data", False)

  def loss_fn(psi, d, index):
    labels = _conditions(setup, frozen, d, uncond)
    x_g = jax.lax.stop_gradient(setup.generate(state.generator, d["z"], labels))
    aug_labels = None
    if setup.augment is not None:
      x_g, aug_labels = setup.augment(jax.random.fold_in(k_aug, index), x_g)
    rng = jax.random.fold_in(k_drop, index)
    fake = denoisers.guided(functools.partial(setup.fake_score, psi, train=True, rng=rng),
                            h.cfg_fake_train, uncond)
    extra = {}
    if real_data:  # SiDA: the discriminator's real branch, its own dropout and augmentation
      real_aug = None
      if setup.augment is not None:
        d = dict(d)
        d["real"], real_aug = setup.augment(jax.random.fold_in(k_aug, index + setup.num_micro),
                                            d["real"])
      extra = dict(real_aug_labels=real_aug, real_denoiser=functools.partial(
          setup.fake_score, psi, train=True, rng=jax.random.fold_in(rng, 1)))
    return setup.fake_loss(fake, x_g, labels, d, batch_size=setup.global_batch,
                           aug_labels=aug_labels, **extra)

  params, opt_state, metrics = _update(setup, setup.fake_tx, state.fake_score, state.fake_opt,
                                       loss_fn, draws, "fake", project=setup.project_fake)
  return state.replace(fake_score=params, fake_opt=opt_state), metrics


def generator_step(setup: SiDSetup, state: SiDState, teacher_params, key: Array,
                   batch: dict[str, Array] | None = None):
  """One theta update of `setup.generator_loss` (spec §3, lsg_spec §4.3 with the kappa_4-guided
  teacher and kappa_2-guided fake score); G in train mode, psi frozen."""
  h = setup.hyper
  k_draw, k_drop = jax.random.split(key)
  draws = _draws(setup, k_draw, setup.generator_loss, (batch or {}).get("gen"),
                 given=(batch or {}).get("gen_draws"))
  uncond = _uncond(setup, teacher_params)
  teacher = denoisers.guided(functools.partial(setup.teacher, teacher_params), h.cfg_teacher,
                             uncond)
  fake = denoisers.guided(functools.partial(setup.fake_score, state.fake_score), h.cfg_fake_eval,
                          uncond)

  nimg = state.step.astype(jnp.float32) * setup.global_batch  # images before this iteration
  extra = {"nimg": nimg} if getattr(setup.generator_loss, "uses_nimg", False) else {}
  apply = None
  if h.generator_frozen_nimg is not None:
    apply = nimg > h.generator_frozen_nimg

  def loss_fn(theta, d, index):
    labels = _conditions(setup, teacher_params, d, uncond)
    rng = jax.random.fold_in(k_drop, index)
    x_g = setup.generate(theta, d["z"], labels, train=True, rng=rng)
    return setup.generator_loss(teacher, fake, x_g, labels, d, batch_size=setup.global_batch,
                                **extra)

  params, opt_state, metrics = _update(setup, setup.generator_tx, state.generator,
                                       state.generator_opt, loss_fn, draws, "gen", apply=apply)
  if apply is not None:
    metrics["gen_updated"] = apply
  return state.replace(generator=params, generator_opt=opt_state), metrics


def ema_decay(step: Array, batch: int, halflife_kimg: float, rampup: float | None) -> Array:
  """beta = 0.5^(batch / halflife), halflife = min(halflife_kimg * 1000, cur_nimg * rampup).

  cur_nimg = step * batch counts images *before* this update, so the first update of a run has
  beta = 0 (the EMA becomes a copy of the parameters), as in the official loop (spec §4.4).
  """
  cur_nimg = step.astype(jnp.float32) * batch
  halflife = jnp.float32(halflife_kimg * 1000.0)
  if rampup is not None:
    halflife = jnp.minimum(halflife, cur_nimg * rampup)
  return 0.5**(batch / jnp.maximum(halflife, 1e-8))


def ema_beta(setup: SiDSetup, step: Array) -> Array:
  return ema_decay(step, setup.global_batch, setup.hyper.ema_halflife_kimg, setup.hyper.ema_rampup)


def ema_step(setup: SiDSetup, state: SiDState) -> SiDState:
  beta = ema_beta(setup, state.step)
  ema = jax.tree.map(lambda e, p: (beta * e + (1 - beta) * p).astype(e.dtype), state.generator_ema,
                     state.generator)
  return state.replace(generator_ema=ema)


def train_step(setup: SiDSetup, state: SiDState, teacher_params, base_key: Array,
               batch: dict[str, Array] | None = None):
  """One SiD iteration: psi step, theta step, EMA. Keys come from fold_in(base_key, step).

  `batch` carries per-sample inputs that are not drawn in the step: with `setup.conditioning`,
  {'fake': raw conditions for the psi step, 'gen': independent ones for the theta step}, each
  [num_micro, micro_batch, ...] (e.g. token ids); with real data (SiDA) each half is a dict
  {'images', 'labels'} as `sid_jax.data.real`'s feed yields it (see `SiDSetup`). Optional
  'fake_draws' / 'gen_draws' dicts replace that update's own draws of the same names and global
  shapes (z, noise, sigma, drop; parity tests inject another implementation's draws through
  them).
  """
  key = jax.random.fold_in(base_key, state.step)
  k_fake, k_gen = jax.random.split(key)
  state, fake_metrics = fake_score_step(setup, state, k_fake, teacher_params, batch)
  state, gen_metrics = generator_step(setup, state, teacher_params, k_gen, batch)
  state = ema_step(setup, state)
  metrics = {**fake_metrics, **gen_metrics}
  bad = ~(jnp.isfinite(metrics["fake_loss"]) & jnp.isfinite(metrics["gen_loss"]) &
          jnp.isfinite(metrics["fake_grad_norm"]) & jnp.isfinite(metrics["gen_grad_norm"]) &
          (metrics["fake_valid_fraction"] > 0) & (metrics["gen_valid_fraction"] > 0))
  streak = jnp.where(bad, state.nonfinite_streak + 1, 0).astype(jnp.int32)
  state = state.replace(step=state.step + 1, nonfinite_streak=streak)
  metrics["nonfinite_streak"] = streak
  return state, metrics
