"""Pure SiD loss functions, written against the denoiser interface (spec §2, §3, §7.3).

Every loss takes *bound* denoisers `D(x, sigma, labels) -> x0_hat` (parameters already applied
by the caller), the images it acts on and the random draws it needs as explicit arrays, and
returns `(scalar_loss, aux)`. The scalar is reduced exactly as the official training loop does:
the per-element loss is summed over the pixels of each sample, summed over the samples given, then
multiplied by `loss_scale / batch_size` where `batch_size` is the *global* batch. Summing the
results of several micro-batches (and devices) therefore gives the official loss.

Deviation from the official code (on purpose): samples with a non-finite value are *masked*
(weight 0, inputs replaced by 0 before the loss — the "double where") instead of dropped by
boolean indexing, so shapes stay static. The normaliser stays the global batch, as in the
official code, so the values are identical.

With `use_logvar` the fake denoiser returns `(D, logvar)` (EDM2's learned uncertainty u(sigma))
and the EDM2 variants of the losses are used.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
BoundDenoiser = Callable[..., Array]


def karras_sigma(t: Array, sigma_min: float, sigma_max: float, rho: float) -> Array:
  """The rho-ramp of Karras et al.: t = 0 gives sigma_min, t = 1 gives sigma_max."""
  a = sigma_max**(1.0 / rho)
  b = sigma_min**(1.0 / rho)
  return (a + (1.0 - t) * (b - a))**rho


def tmax_sigma(u: Array, tmax: float, sigma_min: float, sigma_max: float, rho: float) -> Array:
  """SiD's generator-loss noise levels: t = u * tmax / 1000 on the rho-ramp, u ~ U[0, 1)."""
  return karras_sigma(u * (tmax / 1000.0), sigma_min, sigma_max, rho)


def lognormal_sigma(rn: Array, p_mean: float, p_std: float) -> Array:
  """EDM's training noise levels: ln sigma ~ N(p_mean, p_std^2), rn ~ N(0, 1)."""
  return jnp.exp(rn * p_std + p_mean)


def edm_weight(sigma: Array, sigma_data: float) -> Array:
  """lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2."""
  return (sigma**2 + sigma_data**2) / (sigma * sigma_data)**2


def _pixel_axes(x: Array) -> tuple[int, ...]:
  return tuple(range(1, x.ndim))


def finite_mask(*arrays: Array) -> Array:
  """[B] bool: True for samples whose every value in every array is finite.

  A documented difference from the official code, which drops only samples containing a NaN
  (`torch.isnan`): a sample with ±inf (and no NaN) stays in its batch there, so the batch's
  loss is infinite and its gradients become NaN, then nan_to_num's 0 / ±1e5. Masking it keeps
  the other samples' loss and gradient. Without ±inf the two agree exactly.
  """
  mask = None
  for a in arrays:
    m = jnp.all(jnp.isfinite(a), axis=_pixel_axes(a)) if a.ndim > 1 else jnp.isfinite(a)
    mask = m if mask is None else mask & m
  return mask


def _where_sample(mask: Array, x: Array) -> Array:
  return jnp.where(mask.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros_like(x))


def _split_logvar(out, use_logvar: bool):
  if use_logvar:
    d, logvar = out
    return d, logvar.reshape(d.shape[0], *([1] * (d.ndim - 1)))
  return out, None


# ---------------------------------------------------------------------------------------------
# Noise levels p(sigma) and loss weights lambda(sigma). A noise-level object owns its random draw:
# `sample(key, shape)` draws the unit variable (normal or uniform) with a global shape and maps it
# through `sigma(draw)`, the spec's formula (tests feed the spec's fixed draws to `sigma`).
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LognormalLevels:
  """EDM's training distribution: ln sigma ~ N(p_mean, p_std^2) (the fake score's loss, spec §2)."""
  p_mean: float = -1.2
  p_std: float = 1.2

  def sigma(self, rn: Array) -> Array:
    return lognormal_sigma(rn, self.p_mean, self.p_std)

  def sample(self, key: Array, shape: tuple[int, ...]) -> Array:
    return self.sigma(jax.random.normal(key, shape, jnp.float32))


@dataclasses.dataclass(frozen=True)
class TmaxLevels:
  """SiD's generator-loss levels: t = u tmax / 1000 on the rho-ramp, u ~ U[0, 1) (spec §3.1)."""
  tmax: float = 800.0
  sigma_min: float = 0.002
  sigma_max: float = 80.0
  rho: float = 7.0

  def sigma(self, u: Array) -> Array:
    return tmax_sigma(u, self.tmax, self.sigma_min, self.sigma_max, self.rho)

  def sample(self, key: Array, shape: tuple[int, ...]) -> Array:
    return self.sigma(jax.random.uniform(key, shape, jnp.float32))


@dataclasses.dataclass(frozen=True)
class DiscreteLevels:
  """A DDPM teacher's grid (lsg_spec §4.1): integer t ~ U{t_min, ..., t_max - 1}, sigma_t from
  the grid `sigmas` [T]. SiD-LSG uses it for both losses."""
  sigmas: tuple[float, ...]
  t_min: int = 20
  t_max: int = 980

  def __post_init__(self):
    if not 0 <= self.t_min < self.t_max <= len(self.sigmas):
      raise ValueError(f"Need 0 <= t_min < t_max <= {len(self.sigmas)}, got t_min={self.t_min}, "
                       f"t_max={self.t_max}.")

  def timestep(self, u: Array) -> Array:
    """u ~ U[0, 1) -> integer t, uniform on [t_min, t_max)."""
    t = self.t_min + jnp.floor(u * (self.t_max - self.t_min)).astype(jnp.int32)
    return jnp.clip(t, self.t_min, self.t_max - 1)

  def sigma(self, u: Array) -> Array:
    return jnp.asarray(np.asarray(self.sigmas, np.float32))[self.timestep(u)]

  def sample(self, key: Array, shape: tuple[int, ...]) -> Array:
    return self.sigma(jax.random.uniform(key, shape, jnp.float32))


@dataclasses.dataclass(frozen=True)
class EDMWeight:
  """lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 (EDM's loss weight)."""
  sigma_data: float = 0.5

  def __call__(self, sigma: Array) -> Array:
    return edm_weight(sigma, self.sigma_data)


@dataclasses.dataclass(frozen=True)
class EpsWeight:
  """lambda(sigma) = 1 / sigma^2: sum (D - x0)^2 / sigma^2 is the epsilon loss (SiD-LSG)."""

  def __call__(self, sigma: Array) -> Array:
    return 1.0 / sigma**2


def dsm_loss(denoiser: BoundDenoiser,
             y: Array,
             labels: Array | None,
             sigma: Array,
             weight: Array,
             noise: Array,
             *,
             loss_scale: float,
             batch_size: int,
             aug_labels: Array | None = None,
             use_logvar: bool = False):
  """Denoising score matching for the fake score network (spec §2 / §7.3, lsg_spec §4.2).

  Per sample: sum_pixels weight(sigma) (D(y + sigma n) - y)^2 (EDM2 with `use_logvar`:
  sum weight (D - y)^2 / e^u + u). EDM's loss has weight (sigma^2 + sd^2) / (sigma sd)^2;
  SiD-LSG's epsilon loss is the same with weight 1 / sigma^2.

  Args:
    denoiser: D_psi(x, sigma, labels[, aug_labels=...]) -> x0_hat (or (x0_hat, logvar)); a
      guided denoiser (`denoisers.guided`) for classifier-free guidance in this loss.
    y: clean images [B, H, W, C] (generator samples, already stop-gradient, maybe augmented).
    sigma, weight: [B] noise levels and loss weights (e.g. `LognormalLevels`, `EDMWeight`).
    noise: standard normal like y.
  """
  sigma = sigma.reshape((-1,) + (1,) * (y.ndim - 1))
  weight = weight.reshape(sigma.shape)
  kwargs = {} if aug_labels is None else {"aug_labels": aug_labels}
  out = denoiser(y + sigma * noise, sigma, labels, **kwargs)
  y_hat, logvar = _split_logvar(out, use_logvar)
  mask = finite_mask(y, y_hat, *([logvar] if use_logvar else []))
  y, y_hat = _where_sample(mask, y), _where_sample(mask, y_hat)
  per_elem = weight * (y_hat - y)**2
  if use_logvar:
    logvar = _where_sample(mask, logvar)
    per_elem = per_elem / jnp.exp(logvar) + logvar
  per_sample = jnp.sum(per_elem, axis=_pixel_axes(y)) * mask
  loss = loss_scale * jnp.sum(per_sample) / batch_size
  return loss, {"per_sample": per_sample, "valid": mask, "sigma": sigma.reshape(-1)}


def sid_generator_loss(true_denoiser: BoundDenoiser,
                       fake_denoiser: BoundDenoiser,
                       x_g: Array,
                       labels: Array | None,
                       sigma: Array,
                       noise: Array,
                       *,
                       alpha: float,
                       loss_scale: float,
                       batch_size: int,
                       use_logvar: bool = False):
  """The SiD generator loss (spec §3.2; EDM2 variant §7.3 with `use_logvar`; lsg_spec §4.3).

  Per element: (y_r - y_f) * ((y_r - x_g) - alpha (y_r - y_f)) / w_b with
  w_b = stopgrad(max(mean_pix |x_g - y_r|, 1e-5)) in float32, y_r the teacher's and y_f the fake
  score's prediction at the shared noisy input x_g + sigma * noise. Nothing else is detached:
  gradients reach x_g directly and through both denoisers' inputs. For SiD-LSG the denoisers
  are the guided ones (kappa_4 for the teacher, kappa_2 for the fake score).

  Args:
    sigma: [B] noise levels (see `TmaxLevels`, `DiscreteLevels`).
    noise: standard normal like x_g.
  """
  sigma = sigma.reshape((-1,) + (1,) * (x_g.ndim - 1))
  x_t = x_g + sigma * noise
  y_r = true_denoiser(x_t, sigma, labels)
  y_f, logvar = _split_logvar(fake_denoiser(x_t, sigma, labels), use_logvar)
  mask = finite_mask(x_g, y_r, y_f, *([logvar] if use_logvar else []))
  x_g, y_r, y_f = (_where_sample(mask, a) for a in (x_g, y_r, y_f))
  axes = _pixel_axes(x_g)
  w_b = jnp.mean(jnp.abs(x_g.astype(jnp.float32) - y_r.astype(jnp.float32)), axis=axes,
                 keepdims=True)
  w_b = jax.lax.stop_gradient(jnp.maximum(w_b, 1e-5)).astype(x_g.dtype)
  diff = y_r - y_f
  per_elem = diff * ((y_r - x_g) - alpha * diff) / w_b
  if use_logvar:
    per_elem = per_elem / jnp.exp(_where_sample(mask, logvar))
  per_sample = jnp.sum(per_elem, axis=axes) * mask
  loss = loss_scale * jnp.sum(per_sample) / batch_size
  return loss, {
      "per_sample": per_sample,
      "valid": mask,
      "sigma": sigma.reshape(-1),
      "w_b": w_b.reshape(-1),
  }


# ---------------------------------------------------------------------------------------------
# The losses as values the training step is given (steps.SiDSetup.fake_loss / generator_loss).
# Each draws its own per-sample randomness (`draw`) with global shapes, and is called on one
# micro-batch with the draws of that micro-batch (`d`, which also holds the step's 'noise').
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DSMLoss:
  """The fake score's denoising score matching loss: sigma ~ `levels`, weight `weight(sigma)`."""
  levels: Any = LognormalLevels()
  weight: Callable[[Array], Array] = EDMWeight()
  loss_scale: float = 1.0
  use_logvar: bool = False

  def draw(self, key: Array, shape: tuple[int, ...]) -> dict[str, Array]:
    return {"sigma": self.levels.sample(key, shape)}

  def __call__(self, fake: BoundDenoiser, y: Array, cond, d: dict[str, Array], *,
               batch_size: int, aug_labels: Array | None = None):
    if self.use_logvar:
      fake = functools.partial(fake, return_logvar=True)
    return dsm_loss(fake, y, cond, d["sigma"], self.weight(d["sigma"]), d["noise"],
                    loss_scale=self.loss_scale, batch_size=batch_size, aug_labels=aug_labels,
                    use_logvar=self.use_logvar)


@dataclasses.dataclass(frozen=True)
class SiDGeneratorLoss:
  """The SiD generator loss with sigma ~ `levels` (spec §3; EDM2 §7.3; lsg_spec §4.3)."""
  levels: Any = TmaxLevels()
  alpha: float = 1.2
  loss_scale: float = 100.0
  use_logvar: bool = False

  def draw(self, key: Array, shape: tuple[int, ...]) -> dict[str, Array]:
    return {"sigma": self.levels.sample(key, shape)}

  def __call__(self, teacher: BoundDenoiser, fake: BoundDenoiser, x_g: Array, cond,
               d: dict[str, Array], *, batch_size: int):
    if self.use_logvar:
      fake = functools.partial(fake, return_logvar=True)
    return sid_generator_loss(teacher, fake, x_g, cond, d["sigma"], d["noise"], alpha=self.alpha,
                              loss_scale=self.loss_scale, batch_size=batch_size,
                              use_logvar=self.use_logvar)


# ---------------------------------------------------------------------------------------------
# SiDA (spec §6, §7.3): the fake score's encoder is the discriminator. Its logits (the channel
# mean of the last encoder activation, [B, h, w, 1]) come from the same network in the same
# forward pass as D(x) (`output='encoder_decoder'`; real images: `output='encoder'`).
#
# The adversarial terms are means over a *group* of samples (BCE with mean reduction). The
# official code takes them over each GPU's micro-batch (`batch_gpu` samples of one accumulation
# round), so the group is a layout detail there; here it is the setting `group_size`
# (config.sida.adv_group_size). A group equal to the official per-GPU micro-batch reproduces any
# official run whatever the TPU/GPU layout. Groups never span micro-batches: the step's
# micro-batch must be a multiple of the group. Masked (non-finite) samples are left out of their
# group's mean.
# ---------------------------------------------------------------------------------------------

GAN_LOGIT_CLAMP = 10.0


def group_mean(per_sample: Array, mask: Array, group_size: int) -> Array:
  """[B] -> [B]: each sample gets the mean of `per_sample` over the valid samples of its group
  (consecutive blocks of `group_size` samples); 0 for a group without a valid sample."""
  b = per_sample.shape[0]
  if group_size <= 0 or b % group_size:
    raise ValueError(f"The batch of {b} samples is not a whole number of adversarial groups of "
                     f"{group_size} (config.sida.adv_group_size must divide the micro-batch).")
  m = mask.astype(per_sample.dtype).reshape(-1, group_size)
  v = jnp.where(mask, per_sample, 0).reshape(-1, group_size)
  mean = jnp.sum(v * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1)
  return jnp.repeat(mean, group_size)


def _logit_mean(logits: Array, mask: Array, fn) -> Array:
  """[B] mean of fn(logits) over each sample's patch positions (inputs of masked samples zeroed
  first, so that their values never reach a gradient)."""
  logits = _where_sample(mask, logits)
  return jnp.mean(fn(logits.astype(jnp.float32)), axis=_pixel_axes(logits)).astype(logits.dtype)


def sida_fake_loss(denoiser: BoundDenoiser,
                   real_denoiser: BoundDenoiser,
                   y: Array,
                   real: Array,
                   labels: Array | None,
                   sigma: Array,
                   weight: Array,
                   noise: Array,
                   *,
                   loss_scale: float,
                   adv_scale: float,
                   group_size: int,
                   batch_size: int,
                   aug_labels: Array | None = None,
                   real_aug_labels: Array | None = None,
                   use_logvar: bool = False):
  """SiDA's fake-score + discriminator loss: one loss for psi (spec §6.2; EDM2 §7.3).

  One noise level sigma and one noise draw are shared by the fake branch (generator samples `y`,
  the DSM term and the fake logits from one encoder-decoder pass) and the real branch (`real`
  images, encoder only). Per sample b of group g:

    DSM_b = sum_pixels lambda(sigma_b) (D(y + sigma n) - y)^2     (EDM2: / e^u + u, as `dsm_loss`)
    D_b   = lambda(sigma_b) (BCE_real,g + BCE_fake,g) / 2          (EDM2: / e^u_b)
    BCE_real,g = mean_{g, positions} softplus(-s_real), BCE_fake,g = mean softplus(s_fake)

  (no clamp of the discriminator's logits). The loss is
  (loss_scale sum_b DSM_b + adv_scale sum_b D_b) / batch_size (official ls = 1; lsd = 1 EDM,
  100 EDM2). With EDM2's log-variance the discriminator term also trains the logvar head.

  Args:
    denoiser: D_psi(x, sigma, labels, output=..., [return_logvar=True], [aug_labels=...]) for
      the fake branch; real_denoiser: the same network (its own dropout draw) for the real one.
    y: generator samples [B, H, W, C] (stop-gradient, maybe augmented); real: real images of the
      same batch whose labels condition the generator (maybe augmented independently).
  """
  sigma = sigma.reshape((-1,) + (1,) * (y.ndim - 1))
  weight = weight.reshape(sigma.shape)
  kw = {"return_logvar": True} if use_logvar else {}
  if aug_labels is not None:
    kw["aug_labels"] = aug_labels
  out = denoiser(y + sigma * noise, sigma, labels, output="encoder_decoder", **kw)
  y_hat, s_fake = out[0], out[1]
  logvar = out[2].reshape(sigma.shape) if use_logvar else None
  real_kw = {} if real_aug_labels is None else {"aug_labels": real_aug_labels}
  s_real = real_denoiser(real + sigma * noise, sigma, labels, output="encoder", **real_kw)
  mask = finite_mask(y, y_hat, s_fake, s_real, real, *([logvar] if use_logvar else []))
  y, y_hat = _where_sample(mask, y), _where_sample(mask, y_hat)
  per_elem = weight * (y_hat - y)**2
  if use_logvar:
    logvar = _where_sample(mask, logvar)
    per_elem = per_elem / jnp.exp(logvar) + logvar
  dsm = jnp.sum(per_elem, axis=_pixel_axes(y)) * mask
  bce_real = group_mean(_logit_mean(s_real, mask, lambda s: jax.nn.softplus(-s)), mask,
                        group_size)
  bce_fake = group_mean(_logit_mean(s_fake, mask, jax.nn.softplus), mask, group_size)
  adv = weight.reshape(-1) * (bce_real + bce_fake) / 2
  if use_logvar:
    adv = adv / jnp.exp(logvar.reshape(-1))
  adv = adv * mask
  dsm_loss_value = loss_scale * jnp.sum(dsm) / batch_size
  adv_loss_value = adv_scale * jnp.sum(adv) / batch_size
  return dsm_loss_value + adv_loss_value, {
      "per_sample": dsm + adv,
      "valid": mask,
      "sigma": sigma.reshape(-1),
      "dsm_loss": dsm_loss_value,
      "adv_loss": adv_loss_value,
  }


def sida_generator_loss(true_denoiser: BoundDenoiser,
                        fake_denoiser: BoundDenoiser,
                        x_g: Array,
                        labels: Array | None,
                        sigma: Array,
                        noise: Array,
                        *,
                        alpha: float,
                        loss_scale: float,
                        gan_scale: float,
                        group_size: int,
                        batch_size: int,
                        sid_weight: Array | float = 0.5,
                        gan_weight: Array | float = 0.5,
                        use_logvar: bool = False):
  """SiDA's generator loss: sid_weight L_sid + gan_weight L_gan (spec §6.3; EDM2 §7.3).

  L_sid is `sid_generator_loss` (the fake score's D(x) and its logits s_g come from one
  encoder-decoder pass at the shared noisy input x_g + sigma n). The GAN term is non-saturating
  with the logits clamped to +-10 (no gradient from saturated positions):

    BCE_g = mean_{group, positions} softplus(-clamp(s_g, -10, 10))
    L_gan = gan_scale sum_b C H W BCE_g / w_b / batch_size    (EDM2: / (w_b e^u_b))

  with the SiD term's stop-gradient w_b (the teacher's mean |x_g - y_r|); official lsg_gan = 0.01.
  The weights follow the warm-up schedule (`SiDAGeneratorLoss.weights`): (1, 0) until 200k
  images, then (0.5, 0.5). Gradients reach x_g directly and through both denoisers' inputs.
  """
  sigma = sigma.reshape((-1,) + (1,) * (x_g.ndim - 1))
  x_t = x_g + sigma * noise
  y_r = true_denoiser(x_t, sigma, labels)
  kw = {"return_logvar": True} if use_logvar else {}
  out = fake_denoiser(x_t, sigma, labels, output="encoder_decoder", **kw)
  y_f, s_g = out[0], out[1]
  logvar = out[2].reshape(sigma.shape) if use_logvar else None
  mask = finite_mask(x_g, y_r, y_f, s_g, *([logvar] if use_logvar else []))
  x_g, y_r, y_f = (_where_sample(mask, a) for a in (x_g, y_r, y_f))
  axes = _pixel_axes(x_g)
  w_b = jnp.mean(jnp.abs(x_g.astype(jnp.float32) - y_r.astype(jnp.float32)), axis=axes,
                 keepdims=True)
  w_b = jax.lax.stop_gradient(jnp.maximum(w_b, 1e-5)).astype(x_g.dtype)
  diff = y_r - y_f
  per_elem = diff * ((y_r - x_g) - alpha * diff) / w_b
  bce = group_mean(
      _logit_mean(s_g, mask,
                  lambda s: jax.nn.softplus(-jnp.clip(s, -GAN_LOGIT_CLAMP, GAN_LOGIT_CLAMP))),
      mask, group_size)
  gan = int(np.prod(x_g.shape[1:])) * bce / w_b.reshape(-1)
  if use_logvar:
    u = _where_sample(mask, logvar)
    per_elem = per_elem / jnp.exp(u)
    gan = gan / jnp.exp(u.reshape(-1))
  sid = jnp.sum(per_elem, axis=axes) * mask
  gan = gan * mask
  sid_value = loss_scale * jnp.sum(sid) / batch_size
  gan_value = gan_scale * jnp.sum(gan) / batch_size
  return sid_weight * sid_value + gan_weight * gan_value, {
      "per_sample": sid,
      "valid": mask,
      "sigma": sigma.reshape(-1),
      "w_b": w_b.reshape(-1),
      "sid_loss": sid_value,
      "gan_loss": gan_value,
  }


@dataclasses.dataclass(frozen=True)
class SiDAFakeLoss:
  """SiDA's fake-score + discriminator loss as a value for the step (`sida_fake_loss`).

  `uses_real_data`: the step passes the batch's real images (`d['real']`), a second bound fake
  score for them and their augment labels.
  """
  levels: Any = LognormalLevels()
  weight: Callable[[Array], Array] = EDMWeight()
  loss_scale: float = 1.0
  adv_scale: float = 1.0  # official lsd: 1 (EDM), 100 (EDM2)
  group_size: int = 1
  use_logvar: bool = False
  uses_real_data = True

  def draw(self, key: Array, shape: tuple[int, ...]) -> dict[str, Array]:
    return {"sigma": self.levels.sample(key, shape)}

  def __call__(self, fake: BoundDenoiser, y: Array, cond, d: dict[str, Array], *,
               batch_size: int, real_denoiser: BoundDenoiser, aug_labels: Array | None = None,
               real_aug_labels: Array | None = None):
    return sida_fake_loss(fake, real_denoiser, y, d["real"], cond, d["sigma"],
                          self.weight(d["sigma"]), d["noise"], loss_scale=self.loss_scale,
                          adv_scale=self.adv_scale, group_size=self.group_size,
                          batch_size=batch_size, aug_labels=aug_labels,
                          real_aug_labels=real_aug_labels, use_logvar=self.use_logvar)


@dataclasses.dataclass(frozen=True)
class SiDAGeneratorLoss:
  """SiDA's generator loss as a value for the step (`sida_generator_loss`), with its warm-up.

  `weights(nimg)`: (1, 0) -- SiD only -- while the images done before this iteration
  (`cur_nimg`, the step times the global batch) are <= `gan_start_nimg`, (0.5, 0.5) after
  (strict >, spec §6.4). `uses_nimg`: the step passes `nimg`.
  """
  levels: Any = TmaxLevels()
  alpha: float = 1.0
  loss_scale: float = 100.0
  gan_scale: float = 0.01
  group_size: int = 1
  use_logvar: bool = False
  gan_start_nimg: int = 200_000
  uses_nimg = True

  def draw(self, key: Array, shape: tuple[int, ...]) -> dict[str, Array]:
    return {"sigma": self.levels.sample(key, shape)}

  def weights(self, nimg: Array) -> tuple[Array, Array]:
    mix = jnp.asarray(nimg) > self.gan_start_nimg
    return jnp.where(mix, 0.5, 1.0), jnp.where(mix, 0.5, 0.0)

  def __call__(self, teacher: BoundDenoiser, fake: BoundDenoiser, x_g: Array, cond,
               d: dict[str, Array], *, batch_size: int, nimg: Array):
    sid_w, gan_w = self.weights(nimg)
    return sida_generator_loss(teacher, fake, x_g, cond, d["sigma"], d["noise"],
                               alpha=self.alpha, loss_scale=self.loss_scale,
                               gan_scale=self.gan_scale, group_size=self.group_size,
                               batch_size=batch_size, sid_weight=sid_w.astype(x_g.dtype),
                               gan_weight=gan_w.astype(x_g.dtype), use_logvar=self.use_logvar)
