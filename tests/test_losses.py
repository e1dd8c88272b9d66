"""SiD losses against the reference values of spec §11.3 (official functions, float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sid_jax import denoisers, losses

SIGMA_DATA = 0.5
W, W_D = 0.9, 1.5
SID_RAMP = dict(tmax=800.0, sigma_min=0.002, sigma_max=80.0, rho=7.0)
LEVELS = losses.TmaxLevels(**SID_RAMP)


def _fake_levels(rn, p_mean=-1.2, p_std=1.2):
  """(sigma, weight) of the fake score's loss for the spec's fixed normal draws rn."""
  sigma = losses.LognormalLevels(p_mean=p_mean, p_std=p_std).sigma(rn)
  return sigma, losses.EDMWeight(SIGMA_DATA)(sigma)


@pytest.fixture(autouse=True)
def x64():
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


def _arrays():
  """The spec's deterministic draws, built NCHW and returned NHWC (our layout)."""
  k = np.arange(2 * 3 * 4 * 4, dtype=np.float64).reshape(2, 3, 4, 4)
  nhwc = lambda a: jnp.asarray(np.transpose(a, (0, 2, 3, 1)))
  x = nhwc(0.8 * np.sin(0.7 * k + 0.3))
  eps = nhwc(1.1 * np.cos(1.3 * k + 0.1))
  u = jnp.asarray([0.25, 0.9])
  rn = jnp.asarray([-0.5, 1.0])
  return x, eps, u, rn


def _coeffs(sigma):
  return denoisers.EDMPreconditioning(SIGMA_DATA).coefficients(sigma)


def teacher(x, sigma, labels=None):
  c_skip, c_out, c_in, _ = _coeffs(sigma)
  return c_skip * x + c_out * jnp.tanh(c_in * x)


def make_fake(w, use_logvar=False):

  def fake(x, sigma, labels=None):
    c_skip, c_out, c_in, _ = _coeffs(sigma)
    d = c_skip * x + c_out * w * jnp.tanh(c_in * x + 0.1)
    if use_logvar:
      return d, -0.2 + 0.1 * jnp.log(sigma)
    return d

  return fake


def test_sigma_ramp_reference_points():
  t = jnp.asarray([0.0, 0.2, 0.4, 0.5, 0.6, 0.8])
  got = losses.karras_sigma(t, 0.002, 80.0, 7.0)
  np.testing.assert_allclose(got, [0.002, 0.0851, 0.965, 2.515, 5.839, 24.408], rtol=2e-3)
  _, _, u, _ = _arrays()
  np.testing.assert_allclose(losses.tmax_sigma(u, **SID_RAMP), [0.0850872, 14.258019], rtol=1e-6)


@pytest.mark.parametrize("use_logvar,alpha,value,grad_sum,grad_sq", [
    (False, 1.2, 35.315764450, 127.59279460, 856.48923585),
    (True, 1.0, 41.331447968, 117.73319569, None),
])
def test_sid_generator_loss_reference(use_logvar, alpha, value, grad_sum, grad_sq):
  x, eps, u, _ = _arrays()
  sig = LEVELS.sigma(u)

  def f(x):
    loss, _ = losses.sid_generator_loss(teacher, make_fake(W, use_logvar), x, None, sig, eps,
                                        alpha=alpha, loss_scale=100.0, batch_size=2,
                                        use_logvar=use_logvar)
    return loss

  loss, grad = jax.value_and_grad(f)(x)
  np.testing.assert_allclose(loss, value, rtol=1e-6)
  np.testing.assert_allclose(jnp.sum(grad), grad_sum, rtol=1e-6)
  if grad_sq is not None:
    np.testing.assert_allclose(jnp.sum(grad**2), grad_sq, rtol=1e-6)


@pytest.mark.parametrize("use_logvar,p_mean,p_std,value,grad_w", [
    (False, -1.2, 1.2, 43.326952474, 20.706413341),
    (True, -0.4, 1.0, 49.008635298, 18.727777666),
])
def test_dsm_loss_reference(use_logvar, p_mean, p_std, value, grad_w):
  x, eps, _, rn = _arrays()

  def f(w):
    loss, _ = losses.dsm_loss(make_fake(w, use_logvar), x, None,
                              *_fake_levels(rn, p_mean, p_std), eps, loss_scale=1.0,
                              batch_size=2, use_logvar=use_logvar)
    return loss

  loss, g = jax.value_and_grad(f)(jnp.asarray(W))
  np.testing.assert_allclose(loss, value, rtol=1e-6)
  np.testing.assert_allclose(g, grad_w, rtol=1e-6)


def test_float32_matches_reference_loosely():
  """The same loss in float32 lands within the spec's float32 tolerance (1e-4)."""
  x, eps, u, _ = (a.astype(jnp.float32) for a in _arrays())
  sig = LEVELS.sigma(u)
  loss, _ = losses.sid_generator_loss(teacher, make_fake(jnp.float32(W)), x, None, sig, eps,
                                      alpha=1.2, loss_scale=100.0, batch_size=2)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, 35.315764450, rtol=1e-4)


def test_generator_gradient_flows_through_both_denoisers_inputs():
  """Detaching y_r / y_f (a common porting mistake) changes the gradient the reference fixes."""
  x, eps, u, _ = _arrays()
  sig = LEVELS.sigma(u)
  kw = dict(alpha=1.2, loss_scale=100.0, batch_size=2)

  def full(x):
    return losses.sid_generator_loss(teacher, make_fake(W), x, None, sig, eps, **kw)[0]

  def detached(x):
    sg = lambda fn: (lambda *a: jax.lax.stop_gradient(fn(*a)))
    return losses.sid_generator_loss(sg(teacher), sg(make_fake(W)), x, None, sig, eps, **kw)[0]

  g_full, g_det = jax.grad(full)(x), jax.grad(detached)(x)
  assert float(jnp.max(jnp.abs(g_full - g_det))) > 1e-3


def test_nan_sample_is_masked_with_global_normaliser():
  """A sample whose teacher output is NaN contributes 0; the other keeps its value / B_global."""
  x, eps, u, _ = _arrays()
  sig = LEVELS.sigma(u)
  kw = dict(alpha=1.2, loss_scale=100.0, batch_size=2)

  def bad_teacher(x, sigma, labels=None):
    d = teacher(x, sigma)
    return d.at[0].set(jnp.nan)

  loss, aux = losses.sid_generator_loss(bad_teacher, make_fake(W), x, None, sig, eps, **kw)
  _, aux_ok = losses.sid_generator_loss(teacher, make_fake(W), x, None, sig, eps, **kw)
  assert np.isfinite(loss)
  np.testing.assert_array_equal(aux["valid"], [False, True])
  np.testing.assert_allclose(loss, 100.0 * aux_ok["per_sample"][1] / 2, rtol=1e-12)
  grad = jax.grad(
      lambda x: losses.sid_generator_loss(bad_teacher, make_fake(W), x, None, sig, eps, **kw)[0])(x)
  assert np.all(np.isfinite(np.asarray(grad[1])))

  def nan_fake(y_noisy, sigma, labels=None):
    return make_fake(W)(y_noisy, sigma).at[1].set(jnp.inf)

  x, eps, _, rn = _arrays()
  dl, daux = losses.dsm_loss(nan_fake, x, None, *_fake_levels(rn), eps, loss_scale=1.0,
                             batch_size=2)
  np.testing.assert_array_equal(daux["valid"], [True, False])
  np.testing.assert_allclose(dl, daux["per_sample"][0] / 2, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# SiDA / EDM2 rows of spec §11.3 (and SiD at alpha = 1).
# ---------------------------------------------------------------------------------------------


def _real():
  k = np.arange(2 * 3 * 4 * 4, dtype=np.float64).reshape(2, 3, 4, 4)
  return jnp.asarray(np.transpose(0.6 * np.cos(0.45 * k - 0.2), (0, 2, 3, 1)))


def make_sida_fake(w, w_d, use_logvar=False):
  """The spec's toy fake score with its discriminator: logits = w_d channel-mean(avgpool_2x2(
  c_in x)) + 0.05 ([B, 2, 2, 1]), logvar -0.2 + 0.1 ln sigma, outputs as NetworkDenoiser's."""

  def fake(x, sigma, labels=None, *, output="decoder", return_logvar=False):
    c_skip, c_out, c_in, _ = _coeffs(sigma)
    d = c_skip * x + c_out * w * jnp.tanh(c_in * x + 0.1)
    h = c_in * x
    b, hh, ww, c = h.shape
    pooled = h.reshape(b, hh // 2, 2, ww // 2, 2, c).mean(axis=(2, 4))
    logits = w_d * jnp.mean(pooled, axis=-1, keepdims=True) + 0.05
    outs = {"decoder": [d], "encoder": [logits], "encoder_decoder": [d, logits]}[output]
    if return_logvar:
      outs = outs + [(-0.2 + 0.1 * jnp.log(sigma)).reshape(-1, 1, 1, 1)]
    return outs[0] if len(outs) == 1 else tuple(outs)

  return fake


def test_sid_generator_loss_alpha_one_reference():
  """SiD's generator loss at alpha = 1 (the row 'SiDA G SiD part, alpha = 1')."""
  x, eps, u, _ = _arrays()

  def f(x):
    return losses.sid_generator_loss(teacher, make_fake(W), x, None, LEVELS.sigma(u), eps,
                                     alpha=1.0, loss_scale=100.0, batch_size=2)[0]

  loss, grad = jax.value_and_grad(f)(x)
  np.testing.assert_allclose(loss, 37.490632904, rtol=1e-6)
  np.testing.assert_allclose(jnp.sum(grad), 127.65330175, rtol=1e-6)


@pytest.mark.parametrize("use_logvar,p_mean,p_std,adv_scale,dsm,adv,grad_wd", [
    (False, -1.2, 1.2, 1.0, 43.326952474, 16.319135950, 0.52863684128),
    (True, -0.4, 1.0, 100.0, 49.008635298, 650.36795365, 13.666122278),
])
def test_sida_fake_loss_reference(use_logvar, p_mean, p_std, adv_scale, dsm, adv, grad_wd):
  """Fake DSM + discriminator (one group of the whole batch, as one official micro-batch); the
  discriminator part has no gradient w.r.t. the denoiser's w, the DSM part none w.r.t. w_d."""
  x, eps, _, rn = _arrays()
  sigma, weight = _fake_levels(rn, p_mean, p_std)

  def f(w, w_d):
    net = make_sida_fake(w, w_d, use_logvar)
    return losses.sida_fake_loss(net, net, x, _real(), None, sigma, weight, eps, loss_scale=1.0,
                                 adv_scale=adv_scale, group_size=2, batch_size=2,
                                 use_logvar=use_logvar)

  total, aux = f(W, W_D)
  np.testing.assert_allclose(aux["dsm_loss"], dsm, rtol=1e-6)
  np.testing.assert_allclose(aux["adv_loss"], adv, rtol=1e-6)
  np.testing.assert_allclose(total, aux["dsm_loss"] + aux["adv_loss"], rtol=1e-12)
  g_adv = jax.grad(lambda w, wd: f(w, wd)[1]["adv_loss"], argnums=(0, 1))(jnp.asarray(W),
                                                                          jnp.asarray(W_D))
  np.testing.assert_allclose(g_adv[1], grad_wd, rtol=1e-6)
  assert float(g_adv[0]) == 0.0


@pytest.mark.parametrize("use_logvar,sid,gan,grad_sid,grad_gan", [
    (False, 37.490632904, 2.5824754238, 127.65330175, -2.8320392528),
    (True, 41.331447968, 3.8470776331, 117.73319569, -4.2188496217),
])
def test_sida_generator_loss_reference(use_logvar, sid, gan, grad_sid, grad_gan):
  """SiD part (alpha 1, lsg 100) and GAN part (lsg_gan 0.01, x C H W / w_b; EDM2 / e^u) and
  their gradients w.r.t. the generator samples."""
  x, eps, u, _ = _arrays()
  net = make_sida_fake(W, W_D, use_logvar)

  def f(x, sid_weight, gan_weight):
    return losses.sida_generator_loss(teacher, net, x, None, LEVELS.sigma(u), eps, alpha=1.0,
                                      loss_scale=100.0, gan_scale=0.01, group_size=2,
                                      batch_size=2, sid_weight=sid_weight,
                                      gan_weight=gan_weight, use_logvar=use_logvar)[0]

  np.testing.assert_allclose(f(x, 1.0, 0.0), sid, rtol=1e-6)
  np.testing.assert_allclose(f(x, 0.0, 1.0), gan, rtol=1e-6)
  np.testing.assert_allclose(jnp.sum(jax.grad(f)(x, 1.0, 0.0)), grad_sid, rtol=1e-6)
  np.testing.assert_allclose(jnp.sum(jax.grad(f)(x, 0.0, 1.0)), grad_gan, rtol=1e-6)


def test_sida_generator_loss_combined_reference_and_schedule():
  """After 200k images the step's loss is 0.5 L_sid + 0.5 L_gan (row 'SiDA G combined'); at or
  before 200k (strict >) it is L_sid alone."""
  x, eps, u, _ = _arrays()
  loss_fn = losses.SiDAGeneratorLoss(levels=LEVELS, alpha=1.0, group_size=2)
  d = {"sigma": LEVELS.sigma(u), "noise": eps}

  def f(x, nimg):
    return loss_fn(teacher, make_sida_fake(W, W_D), x, None, d, batch_size=2, nimg=nimg)[0]

  loss, grad = jax.value_and_grad(f)(x, 200_001)
  np.testing.assert_allclose(loss, 20.036554164, rtol=1e-6)
  np.testing.assert_allclose(jnp.sum(grad), 62.410631249, rtol=1e-6)
  np.testing.assert_allclose(f(x, 200_000), 37.490632904, rtol=1e-6)
  np.testing.assert_allclose(f(x, 0), 37.490632904, rtol=1e-6)


def test_sida_gan_logits_are_clamped_and_groups_normalise_separately():
  """Logits beyond +-10 give no GAN gradient; with groups of one sample each group's BCE is its
  own sample's (two groups of 1 differ from one group of 2 when the samples differ)."""
  x, eps, u, _ = _arrays()
  kw = dict(alpha=1.0, loss_scale=100.0, gan_scale=0.01, batch_size=2, sid_weight=0.0,
            gan_weight=1.0)
  sig = LEVELS.sigma(u)

  def f(x, w_d, group):
    return losses.sida_generator_loss(teacher, make_sida_fake(W, w_d), x, None, sig, eps,
                                      group_size=group, **kw)[0]

  # w_d = 1e4 pushes every logit far beyond the clamp: the GAN term is constant in x.
  g = jax.grad(f)(x, 1e4, 2)
  assert float(jnp.max(jnp.abs(g))) == 0.0
  one, two = f(x, W_D, 2), f(x, W_D, 1)
  assert abs(float(one) - float(two)) > 1e-3
  _, aux = losses.sida_generator_loss(teacher, make_sida_fake(W, W_D), x, None, sig, eps,
                                      group_size=1, **{**kw, "gan_weight": 1.0})
  # Groups of one: the GAN loss is sum_b 48 softplus-mean_b / w_b, computed here directly.
  _, _, c_in, _ = _coeffs(sig.reshape(-1, 1, 1, 1))
  x_t = x + sig.reshape(-1, 1, 1, 1) * eps
  logits = make_sida_fake(W, W_D)(x_t, sig.reshape(-1, 1, 1, 1), output="encoder")
  bce = jnp.mean(jax.nn.softplus(-logits), axis=(1, 2, 3))
  # (rtol: the BCE is computed in float32, as the official code casts it.)
  np.testing.assert_allclose(aux["gan_loss"], 0.01 * jnp.sum(48 * bce / aux["w_b"]) / 2,
                             rtol=1e-6)
  with pytest.raises(ValueError, match="adv_group_size"):
    f(x, W_D, 3)
