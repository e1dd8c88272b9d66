"""One interface for every network in SiD: a denoiser D(x; sigma, labels) -> x0_hat.

Teacher, fake score network and generator are all denoisers in the EDM convention
(x = x0 + sigma * n, images NHWC). What differs between EDM, VP, VE, EDM2 and Stable Diffusion is
only how a raw network F is wrapped into that interface (the preconditioning); the SiD losses are
written against the interface and never see F.

A denoiser is any callable with the signature

    D(params, x, sigma, labels=None, *, aug_labels=None, train=False, rng=None) -> x0_hat

where `sigma` is a scalar or a per-sample vector [B], `labels` are one-hot rows [B, label_dim]
(or None) and `rng` is the dropout key used when `train` is true. Parameters are explicit so the
same denoiser serves three parameter sets (teacher, fake score, generator) and gradients are taken
with plain `jax.grad`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class Denoiser(Protocol):

  def __call__(self, params: Any, x: Array, sigma: Array, labels: Array | None = None, *,
               aug_labels: Array | None = None, train: bool = False,
               rng: Array | None = None) -> Array:
    ...


def per_sample(sigma: Array, x: Array) -> Array:
  """Broadcasts a scalar or [B] noise level to [B, 1, 1, 1] (float32 or x's float64)."""
  dtype = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
  sigma = jnp.asarray(sigma, dtype)
  if sigma.ndim == 0:
    sigma = jnp.full((x.shape[0],), sigma, dtype)
  return sigma.reshape((-1,) + (1,) * (x.ndim - 1))


# ---------------------------------------------------------------------------------------------
# Preconditionings (Karras et al. 2022, Table 1). Each returns (c_skip, c_out, c_in, c_noise).
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EDMPreconditioning:
  sigma_data: float = 0.5

  def coefficients(self, sigma: Array):
    sd2 = self.sigma_data**2
    c_skip = sd2 / (sigma**2 + sd2)
    c_out = sigma * self.sigma_data / jnp.sqrt(sigma**2 + sd2)
    c_in = 1.0 / jnp.sqrt(sigma**2 + sd2)
    c_noise = jnp.log(sigma) / 4.0
    return c_skip, c_out, c_in, c_noise


@dataclasses.dataclass(frozen=True)
class VPPreconditioning:
  beta_d: float = 19.9
  beta_min: float = 0.1
  num_steps: int = 1000  # "M" in the paper.

  def sigma_inv(self, sigma: Array) -> Array:
    return (jnp.sqrt(self.beta_min**2 + 2 * self.beta_d * jnp.log1p(sigma**2)) -
            self.beta_min) / self.beta_d

  def coefficients(self, sigma: Array):
    c_skip = jnp.ones_like(sigma)
    c_out = -sigma
    c_in = 1.0 / jnp.sqrt(sigma**2 + 1)
    c_noise = (self.num_steps - 1) * self.sigma_inv(sigma)
    return c_skip, c_out, c_in, c_noise


@dataclasses.dataclass(frozen=True)
class VEPreconditioning:

  def coefficients(self, sigma: Array):
    return jnp.ones_like(sigma), sigma, jnp.ones_like(sigma), jnp.log(0.5 * sigma)


# ---------------------------------------------------------------------------------------------
# A raw Flax network wrapped into a denoiser.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NetworkDenoiser:
  """D(x; sigma, c) = c_skip x + c_out F(c_in x, c_noise, c, aug) with F a Flax module.

  `module` is called as `module.apply({'params': p}, x_in, c_noise, class_labels, augment_labels,
  train=train, rngs=...)` on NHWC inputs, c_noise of shape [B]. Preconditioning runs in float32
  (float64 when x is float64); F may compute in a lower precision internally.
  """
  module: nn.Module
  precond: Any = EDMPreconditioning()
  label_dim: int = 0

  def _labels(self, labels: Array | None, batch: int, dtype) -> Array | None:
    if self.label_dim == 0:
      return None
    if labels is None:
      return jnp.zeros((batch, self.label_dim), dtype)
    return jnp.asarray(labels, dtype).reshape(batch, self.label_dim)

  def __call__(self, params, x, sigma, labels=None, *, aug_labels=None, train=False, rng=None,
               output: str = "decoder", return_logvar: bool = False):
    """Returns D(x) ('decoder'), the encoder patch logits ('encoder') or both.

    `output` and `return_logvar` are forwarded to the module only when not at their defaults, so
    plain networks need not accept them. With `return_logvar` the result gains a trailing
    log-variance [B, 1, 1, 1] (EDM2's uncertainty head).
    """
    dtype = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    x = x.astype(dtype)
    sigma = per_sample(sigma, x)
    c_skip, c_out, c_in, c_noise = self.precond.coefficients(sigma)
    rngs = {"dropout": rng} if (train and rng is not None) else {}
    extra = {}
    if output != "decoder":
      extra["output"] = output
    if return_logvar:
      extra["return_logvar"] = True
    result = self.module.apply({"params": params},
                               c_in * x,
                               c_noise.reshape(-1),
                               self._labels(labels, x.shape[0], dtype),
                               aug_labels,
                               train=train,
                               rngs=rngs,
                               **extra)
    if not extra:
      return c_skip * x + c_out * result.astype(dtype)
    result = tuple(result) if isinstance(result, (tuple, list)) else (result,)
    outs = []
    rest = list(result)
    if output in ("decoder", "encoder_decoder"):
      outs.append(c_skip * x + c_out * rest.pop(0).astype(dtype))
    if output in ("encoder", "encoder_decoder"):
      outs.append(rest.pop(0).astype(dtype))
    if return_logvar:
      outs.append(rest.pop(0).astype(dtype).reshape(x.shape[0], 1, 1, 1))
    if output not in ("decoder", "encoder", "encoder_decoder") or rest:
      raise ValueError(f"Unexpected network outputs for output={output!r}.")
    return outs[0] if len(outs) == 1 else tuple(outs)

  def init(self, rng: Array, x: Array, labels: Array | None = None, aug_labels=None):
    """Initialises the raw network's parameters for inputs shaped like `x` (NHWC)."""
    sigma = jnp.ones((x.shape[0],), x.dtype)
    _, _, c_in, c_noise = self.precond.coefficients(per_sample(sigma, x))
    variables = self.module.init({"params": rng, "dropout": rng}, c_in * x, c_noise.reshape(-1),
                                 self._labels(labels, x.shape[0], x.dtype), aug_labels,
                                 train=False)
    return variables["params"]


# ---------------------------------------------------------------------------------------------
# A DDPM epsilon-prediction network (Stable Diffusion's UNet) on its discrete noise grid.
# ---------------------------------------------------------------------------------------------


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
  """float32 linspace with torch's CPU rounding: a float32 step, each value start + step * i
  (or end - step * (steps - 1 - i) in the second half) formed in double, then rounded once."""
  start32, end32 = np.float32(start), np.float32(end)
  step = np.float64(np.float32((end32 - start32) / np.float32(steps - 1)))
  idx = np.arange(steps, dtype=np.float64)
  out = np.where(idx < steps // 2, np.float64(start32) + step * idx,
                 np.float64(end32) - step * (steps - 1 - idx))
  return out.astype(np.float32)


def ddpm_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                        beta_end: float = 0.012, beta_schedule: str = "scaled_linear"
                        ) -> np.ndarray:
  """alpha_bar_t = prod_{i <= t} (1 - beta_i) in float32, as diffusers' DDPMScheduler computes it
  (lsg_spec §1.2): 'scaled_linear' betas are linspace(sqrt(b0), sqrt(b1))^2, 'linear' betas are
  linspace(b0, b1)."""
  if beta_schedule == "scaled_linear":
    betas = _torch_linspace_f32(beta_start**0.5, beta_end**0.5, num_train_timesteps)**2
  elif beta_schedule == "linear":
    betas = _torch_linspace_f32(beta_start, beta_end, num_train_timesteps)
  else:
    raise ValueError(f"beta_schedule={beta_schedule!r} is not supported; expected "
                     "'scaled_linear' (Stable Diffusion) or 'linear'.")
  alphas = (np.float32(1.0) - betas.astype(np.float32)).astype(np.float32)
  # torch's CPU cumprod accumulates float32 in double and rounds each partial product.
  return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def ddpm_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
  """The EDM noise level of each DDPM step: sigma_t = sqrt(1 - abar_t) / sqrt(abar_t)."""
  acp = np.asarray(alphas_cumprod, np.float32)
  return (np.sqrt(np.float32(1) - acp) / np.sqrt(acp)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class DiscreteEpsDenoiser:
  """D(x; sigma_t, c) = x - sigma_t eps(sqrt(abar_t) x, t, c) for a DDPM epsilon network.

  In the VP convention x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) n, the x0 prediction is
  (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (lsg_spec §1.2; never clipped). With
  x = x_t / sqrt(abar_t) = x0 + sigma_t n this is the EDM-convention denoiser above, so Stable
  Diffusion's UNet plugs into the same losses as EDM networks. Only the grid's noise levels are
  valid: `sigma` is mapped to the nearest grid index t (exact for sigmas taken from
  `self.sigmas`), and the network is called with that integer t.

  `module` is called as `module.apply({'params': p}, x_vp [B,H,W,C], t [B] int32, cond)`;
  `cond` is the text embedding [B, L, D].
  """
  module: nn.Module
  alphas_cumprod: np.ndarray = dataclasses.field(compare=False, repr=False)

  @property
  def sigmas(self) -> np.ndarray:
    return ddpm_sigmas(self.alphas_cumprod)

  def sigma_at(self, t: int) -> float:
    """The noise level of grid index t (e.g. the generator's t_init = 625 -> 2.5017)."""
    return float(self.sigmas[int(t)])

  def timestep(self, sigma: Array) -> Array:
    """[B] noise levels -> [B] int32 grid indices (nearest in log sigma)."""
    table = jnp.log(jnp.asarray(self.sigmas))
    d = jnp.abs(jnp.log(sigma.reshape(-1, 1).astype(jnp.float32)) - table[None, :])
    return jnp.argmin(d, axis=1).astype(jnp.int32)

  def __call__(self, params, x, sigma, labels=None, *, aug_labels=None, train=False, rng=None):
    del aug_labels, train, rng  # SD UNets have no augmentation labels and no dropout.
    dtype = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    x = x.astype(dtype)
    t = self.timestep(per_sample(sigma, x))
    acp = jnp.asarray(self.alphas_cumprod, jnp.float32)[t]
    a = jnp.sqrt(acp).astype(dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    s = jnp.sqrt(1.0 - acp).astype(dtype).reshape(a.shape)
    eps = self.module.apply({"params": params}, a * x, t, labels).astype(dtype)
    return x - (s / a) * eps

  def init(self, rng: Array, x: Array, labels: Array):
    variables = self.module.init({"params": rng}, x, jnp.zeros((x.shape[0],), jnp.int32), labels)
    return variables["params"]


def guided(denoiser: Callable, scale: float, uncond: Array | None) -> Callable:
  """Classifier-free guidance of a bound denoiser D(x, sigma, cond): D_u + scale (D_c - D_u).

  With scale == 1 the denoiser is returned unchanged (one pass, no unconditional branch, as the
  official code does). Otherwise one call on the 2B batch [x; x] with conditions [uncond; cond]
  (lsg_spec §1.3); `uncond` [1, ...] is broadcast to the batch. For a denoiser affine in its
  network output (every one here) this equals guiding the network output itself.
  """
  if scale == 1:
    return denoiser
  if uncond is None:
    raise ValueError(f"Guidance scale {scale} needs an unconditional condition.")

  def fn(x, sigma, cond, **kwargs):
    if kwargs.get("return_logvar"):
      raise ValueError("Classifier-free guidance of a denoiser with a log-variance head is not "
                       "defined.")
    b = x.shape[0]
    sigma = per_sample(sigma, x)
    u = jnp.broadcast_to(uncond, (b,) + tuple(cond.shape[1:])).astype(cond.dtype)
    out = denoiser(jnp.concatenate([x, x]), jnp.concatenate([sigma, sigma]),
                   jnp.concatenate([u, cond]), **kwargs)
    d_u, d_c = out[:b], out[b:]
    return d_u + scale * (d_c - d_u)

  return fn


# ---------------------------------------------------------------------------------------------
# An analytic teacher: a mixture of isotropic Gaussians in image space.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GaussianMixtureDenoiser:
  """The exact denoiser E[x0 | x0 + sigma n = x] of a mixture of K isotropic Gaussians.

  params = {'means': [K, H, W, C], 'logits': [K]} (mixture weights softmax(logits)); every
  component has standard deviation `std`. With one-hot `labels` [B, K] the denoiser is that of the
  chosen component (class-conditional on the component); with labels=None it is the mixture's.
  """
  std: float

  def __call__(self, params, x, sigma, labels=None, *, aug_labels=None, train=False, rng=None):
    del aug_labels, train, rng
    dtype = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    x = x.astype(dtype)
    sigma = per_sample(sigma, x)
    means = params["means"].astype(dtype)
    var0 = jnp.asarray(self.std**2, dtype)
    var_t = var0 + sigma**2  # [B,1,1,1]
    shrink = var0 / var_t
    if labels is not None:
      mu = jnp.einsum("bk,khwc->bhwc", labels.astype(dtype), means)
      return mu + shrink * (x - mu)
    # Posterior responsibilities over components: N(x; mu_k, var_t I) weighted by pi_k.
    sq = jnp.sum((x[:, None] - means[None])**2, axis=(2, 3, 4))  # [B, K]
    log_r = jax.nn.log_softmax(params["logits"].astype(dtype))[None] - sq / (2 * var_t[:, :, 0, 0])
    r = jax.nn.softmax(log_r, axis=-1)
    mean_mu = jnp.einsum("bk,khwc->bhwc", r, means)
    return shrink * x + (1 - shrink) * mean_mu

  # -- the distribution itself, for metrics and tests --

  @staticmethod
  def make_params(seed: int, num_components: int, shape: tuple[int, int, int],
                  mean_scale: float = 0.7) -> dict:
    """Deterministic component means: smooth random patterns in [-mean_scale, mean_scale]."""
    rs = np.random.RandomState(seed)
    h, w, c = shape
    coarse = rs.uniform(-1, 1, size=(num_components, max(h // 2, 1), max(w // 2, 1), c))
    means = np.repeat(np.repeat(coarse, 2, axis=1), 2, axis=2)[:, :h, :w, :]
    means = mean_scale * means / np.max(np.abs(means), axis=(1, 2, 3), keepdims=True)
    return {
        "means": jnp.asarray(means, jnp.float32),
        "logits": jnp.zeros((num_components,), jnp.float32),
    }

  def sample(self, params, key: Array, labels: Array) -> Array:
    """Draws x0 for one-hot `labels` [B, K]."""
    mu = jnp.einsum("bk,khwc->bhwc", labels, params["means"])
    return mu + self.std * jax.random.normal(key, mu.shape, mu.dtype)

  def moments(self, params) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean and covariance of the flattened mixture (float64 numpy)."""
    means = np.asarray(params["means"], np.float64).reshape(params["means"].shape[0], -1)
    pi = np.asarray(jax.nn.softmax(jnp.asarray(params["logits"], jnp.float32)), np.float64)
    mu = pi @ means
    centred = means - mu
    cov = (centred.T * pi) @ centred + self.std**2 * np.eye(means.shape[1])
    return mu, cov
