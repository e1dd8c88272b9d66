"""Teacher samplers on the exact Gaussian-mixture denoiser: schedule, NFE, accuracy, sharding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sid_jax import denoisers, generators, losses, samplers

STD = 0.5  # component standard deviation (sigma_data-like)
SHAPE = (8, 8, 1)
K = 3


@pytest.fixture(scope="module")
def gmm():
  teacher = denoisers.GaussianMixtureDenoiser(std=STD)
  return teacher, teacher.make_params(0, K, SHAPE, mean_scale=1.0)


def _heun_factor(num_steps: int, std: float, sigma_max: float = 80.0) -> float:
  """x0 - mu = factor * (x_T - mu) for EDM's Heun on one Gaussian, by an independent recursion.

  For N(mu, std^2) the probability-flow ODE is dx/dsigma = (x - mu) sigma / (std^2 + sigma^2).
  """
  i = np.arange(num_steps)
  t = (sigma_max**(1 / 7) + i / (num_steps - 1) * (0.002**(1 / 7) - sigma_max**(1 / 7)))**7
  t = np.append(t, 0.0)
  slope = lambda x, s: x * s / (std**2 + s**2)
  x = 1.0
  for k in range(num_steps):
    d = slope(x, t[k])
    x_new = x + (t[k + 1] - t[k]) * d
    if k < num_steps - 1:
      x_new = x + (t[k + 1] - t[k]) * 0.5 * (d + slope(x_new, t[k + 1]))
    x = x_new
  return x


def test_time_steps_closed_form():
  t = samplers.edm_time_steps(18)
  assert t.shape == (19,) and t.dtype == np.float64
  assert t[0] == 80.0 and t[-1] == 0.0
  np.testing.assert_allclose(t[17], 0.002, rtol=1e-12)
  # Independent form: uniform in sigma^(1/7) from 80 to 0.002.
  np.testing.assert_allclose(t[:-1], np.linspace(80**(1 / 7), 0.002**(1 / 7), 18)**7, rtol=1e-12)
  np.testing.assert_allclose(t[1:4], [57.58598472, 40.7855738, 28.3745846], rtol=1e-8)
  assert np.all(np.diff(t) < 0)
  # Same ramp as the training-time sigma(t) of the losses (t = 1 - i / (N - 1)).
  ramp = losses.karras_sigma(jnp.asarray(1 - np.arange(40) / 39, jnp.float32), 0.002, 80.0, 7.0)
  np.testing.assert_allclose(samplers.edm_time_steps(40)[:-1], ramp, rtol=2e-5)
  t32 = samplers.edm_time_steps(32, dtype=np.float32)
  # EDM2 computes the grid in float32, so t_0 = float32(80^(1/7))^7 = 79.99998, not 80.
  assert t32.dtype == np.float32 and t32[-1] == 0
  np.testing.assert_allclose(t32[:-1], np.linspace(80**(1 / 7), 0.002**(1 / 7), 32)**7, rtol=3e-6)
  assert t32[0] != np.float32(80.0)
  with pytest.raises(ValueError, match="num_steps"):
    samplers.edm_time_steps(1)


@pytest.mark.parametrize("num_steps", [18, 40])
def test_nfe_and_noise_levels_of_the_calls(gmm, num_steps):
  teacher, params = gmm
  calls = []

  def counting(p, x, sigma, labels=None):
    calls.append(float(sigma))
    return teacher(p, x, sigma, labels)

  z = jax.random.normal(jax.random.key(0), (2,) + SHAPE)
  # Tracing runs the Python loop once: every denoiser call of the program is seen once.
  jax.jit(functools.partial(samplers.edm_sampler, counting, num_steps=num_steps,
                            unroll=True)).trace(params, z)
  assert len(calls) == samplers.heun_nfe(num_steps) == 2 * num_steps - 1
  assert samplers.heun_nfe(18) == 35 and samplers.heun_nfe(40) == 79
  t = samplers.edm_time_steps(num_steps).astype(np.float32)
  # Euler at t_i, correction at t_{i+1}; the last step (to 0) has no correction.
  expected = [t[0]] + [s for i in range(1, num_steps) for s in (t[i], t[i])]
  np.testing.assert_array_equal(np.float32(calls), expected)


@pytest.mark.parametrize("num_steps", [18, 40])
def test_heun_update_rule_on_one_gaussian(gmm, num_steps):
  """Conditional on its component the teacher is one Gaussian: Heun's result is known exactly."""
  teacher, params = gmm
  n = 48
  z = jax.random.normal(jax.random.key(1), (n,) + SHAPE)
  labels = jax.nn.one_hot(jnp.arange(n) % K, K)
  x = jax.jit(functools.partial(samplers.edm_sampler, teacher, num_steps=num_steps))(params, z,
                                                                                     labels)
  mu = np.einsum("bk,khwc->bhwc", np.asarray(labels), np.asarray(params["means"]))
  x_t = 80.0 * np.asarray(z, np.float64)
  heun = mu + _heun_factor(num_steps, STD) * (x_t - mu)
  np.testing.assert_allclose(x, heun, rtol=1e-5, atol=1e-5)
  # Against the exact ODE solution x0 = mu + (x_T - mu) std / sqrt(std^2 + T^2): second order.
  exact = mu + (x_t - mu) * STD / np.sqrt(STD**2 + 80.0**2)
  rel = np.abs(x - exact).max() / np.abs(exact - mu).max()
  assert rel < {18: 0.06, 40: 0.011}[num_steps], rel
  assert abs(_heun_factor(100, STD) / (STD / np.hypot(STD, 80.0)) - 1) < 2e-3


def test_float64_latents_run_in_float64(gmm):
  """EDM's sampler computes in float64; with x64 on, ours does too and meets the recursion."""
  teacher, params = gmm
  jax.config.update("jax_enable_x64", True)
  try:
    z = jax.random.normal(jax.random.key(10), (6,) + SHAPE, jnp.float64)
    labels = jax.nn.one_hot(jnp.arange(6) % K, K, dtype=jnp.float64)
    p64 = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    x = jax.jit(functools.partial(samplers.edm_sampler, teacher))(p64, z, labels)
    assert x.dtype == jnp.float64
    mu = np.einsum("bk,khwc->bhwc", np.asarray(labels), np.asarray(p64["means"]))
    heun = mu + _heun_factor(18, STD) * (80.0 * np.asarray(z) - mu)
    np.testing.assert_allclose(x, heun, rtol=1e-11, atol=1e-11)
  finally:
    jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize("num_steps", [18, 40])
def test_unconditional_samples_match_the_mixture(gmm, num_steps):
  """The probability-flow ODE of the exact mixture denoiser carries N(0, 80^2) to the mixture."""
  teacher, params = gmm
  n = 4096
  z = jax.random.normal(jax.random.key(2), (n,) + SHAPE)
  x = jax.jit(functools.partial(samplers.edm_sampler, teacher, num_steps=num_steps))(params, z)
  x = np.asarray(x, np.float64).reshape(n, -1)
  means = np.asarray(params["means"], np.float64).reshape(K, -1)
  nearest = np.argmin(((x[:, None] - means[None])**2).sum(-1), axis=1)
  weights = np.bincount(nearest, minlength=K) / n
  np.testing.assert_allclose(weights, 1 / K, atol=4 * np.sqrt(2 / 9 / n))
  # Heun at N steps inflates the spread by a known factor (5.5% at 18 steps, 1% at 40, for a
  # sigma-data-sized Gaussian); the factor is checked exactly in the test above.
  inflation = _heun_factor(num_steps, STD) / (STD / np.hypot(STD, 80.0))
  for k in range(K):
    xs = x[nearest == k]
    se = STD / np.sqrt(len(xs))
    err = (xs.mean(0) - means[k]) / se  # per pixel, ~N(0, 1)
    assert np.sqrt(np.mean(err**2)) < 1.4 and np.abs(err).max() < 4.5, (k, err)
    std = np.sqrt(np.mean((xs - xs.mean(0))**2))
    assert abs(std / STD - 1) < {18: 0.07, 40: 0.02}[num_steps], (k, std)
    assert abs(std / (STD * inflation) - 1) < 0.015, (k, std, inflation)


def test_fori_loop_equals_python_loop(gmm):
  teacher, params = gmm
  z = jax.random.normal(jax.random.key(3), (8,) + SHAPE)
  labels = jax.nn.one_hot(jnp.arange(8) % K, K)
  run = lambda unroll: jax.jit(functools.partial(samplers.edm_sampler, teacher, num_steps=18,
                                                 unroll=unroll))(params, z, labels)
  ref = run(True)
  np.testing.assert_allclose(run(False), ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(run(3), ref, rtol=1e-5, atol=1e-5)


def test_stochastic_variant(gmm):
  teacher, params = gmm
  z = jax.random.normal(jax.random.key(4), (8,) + SHAPE)
  sample = lambda **kw: jax.jit(functools.partial(samplers.edm_sampler, teacher, num_steps=18,
                                                  **kw))(params, z)
  deterministic = sample()
  # S_churn = 0 is exactly the deterministic sampler, key or not.
  np.testing.assert_array_equal(sample(S_churn=0.0, key=jax.random.key(0)), deterministic)
  churn = dict(S_churn=40.0, S_min=0.05, S_max=50.0, S_noise=1.003)
  a = sample(key=jax.random.key(0), **churn)
  np.testing.assert_array_equal(a, sample(key=jax.random.key(0), **churn))
  assert np.abs(a - sample(key=jax.random.key(1), **churn)).max() > 1e-2
  assert np.abs(a - deterministic).max() > 1e-2
  # An S_min/S_max window that contains no noise level adds no noise.
  np.testing.assert_array_equal(sample(key=jax.random.key(0), S_churn=40.0, S_min=90.0),
                                deterministic)
  with pytest.raises(ValueError, match="key"):
    samplers.edm_sampler(teacher, params, z, S_churn=1.0)
  # Churn keeps the sampler on the data: conditional samples stay near their component.
  labels = jax.nn.one_hot(jnp.arange(8) % K, K)
  x = jax.jit(functools.partial(samplers.edm_sampler, teacher, **churn))(params, z, labels,
                                                                       key=jax.random.key(5))
  mu = jnp.einsum("bk,khwc->bhwc", labels, params["means"])
  assert 0.3 < float(jnp.std(x - mu)) < 0.7


def test_edm2_sampler_and_guidance(gmm):
  teacher, params = gmm
  z = jax.random.normal(jax.random.key(6), (6,) + SHAPE)
  labels = jax.nn.one_hot(jnp.arange(6) % K, K)
  uncond = lambda p, x, sigma, labels=None: teacher(p, x, sigma, None)
  run = lambda fn, denoiser, **kw: jax.jit(functools.partial(fn, denoiser, **kw))(params, z,
                                                                                  labels)
  # Guidance 1 never calls the guide; it is the plain Heun sampler (EDM2: 32 steps, float32 grid).
  plain = run(samplers.edm2_sampler, teacher, guide=uncond)
  np.testing.assert_allclose(plain, run(samplers.heun_sampler, teacher, num_steps=32),
                             rtol=1e-5, atol=1e-5)
  # CFG: D_uncond + w (D_cond - D_uncond), written out by hand as one denoiser.
  w = 1.7
  guided_by_hand = lambda p, x, sigma, labels=None: (uncond(p, x, sigma) + w *
                                                      (teacher(p, x, sigma, labels) -
                                                       uncond(p, x, sigma)))
  guided = run(samplers.edm2_sampler, teacher, guide=uncond, guide_params=params, guidance=w,
               num_steps=12)
  np.testing.assert_allclose(guided, run(samplers.edm2_sampler, guided_by_hand, num_steps=12),
                             rtol=1e-5, atol=1e-5)
  assert np.abs(guided - run(samplers.edm2_sampler, teacher, num_steps=12)).max() > 0.03
  with pytest.raises(ValueError, match="guide_params"):
    samplers.edm2_sampler(teacher, params, z, labels, guidance=2.0)


def test_one_step_generator(gmm):
  teacher, params = gmm
  z = jax.random.normal(jax.random.key(7), (4,) + SHAPE)
  labels = jax.nn.one_hot(jnp.arange(4) % K, K)
  x = jax.jit(generators.one_step(teacher, 2.5))(params, z, labels)
  np.testing.assert_allclose(x, teacher(params, 2.5 * z, 2.5, labels), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("stochastic", [False, True])
def test_sharded_equals_unsharded(gmm, stochastic):
  teacher, params = gmm
  devices = np.asarray(jax.devices()[:8])
  assert devices.size == 8, "conftest provides 8 CPU devices"
  mesh = Mesh(devices, ("data",))
  batch = NamedSharding(mesh, P("data"))
  repl = NamedSharding(mesh, P())
  n = 16
  z = jax.random.normal(jax.random.key(8), (n,) + SHAPE)
  labels = jax.nn.one_hot(jnp.arange(n) % K, K)
  kw = dict(S_churn=20.0, S_min=0.05, S_max=50.0) if stochastic else {}
  fn = functools.partial(samplers.edm_sampler, teacher, num_steps=18, **kw)

  def call(p, z, labels, key):
    return fn(p, z, labels, key=key)

  key = jax.random.key(9)
  ref = jax.jit(call)(params, z, labels, key)
  sharded = jax.jit(call, in_shardings=(repl, batch, batch, repl), out_shardings=batch)
  with jax.set_mesh(mesh):
    out = sharded(params, jax.device_put(z, batch), jax.device_put(labels, batch), key)
  assert out.sharding.is_equivalent_to(batch, out.ndim)
  assert len(out.addressable_shards) == 8
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
