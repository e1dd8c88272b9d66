"""The pure update steps: optimiser, EMA, accumulation, device-count invariance."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sid_jax import generators, optim, sharding, steps
from sid_jax.nets import edm2
from tests import tiny


def _tree_max_diff(a, b):
  leaves = zip(jax.tree.leaves(a), jax.tree.leaves(b))
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in leaves)


def test_adam_without_first_moment_equals_optax_adam_with_beta1_zero():
  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
  ours, ref = optim.adam(1e-2, 0.0, 0.999, 1e-8), optax.adam(1e-2, b1=0.0, b2=0.999, eps=1e-8)
  s1, s2 = ours.init(params), ref.init(params)
  assert len(jax.tree.leaves(s1)) < len(jax.tree.leaves(s2))  # no first-moment buffer
  p1 = p2 = params
  for i in range(4):
    g = jax.tree.map(lambda x: jnp.sin(x * (i + 1.0)), params)
    u1, s1 = ours.update(g, s1, p1)
    u2, s2 = ref.update(g, s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  assert _tree_max_diff(p1, p2) < 1e-6


def test_grads_are_sanitised_and_value_clipped():
  tx = optim.adam(1.0, 0.0, 0.999, 1e-8, clip_value=1.0)
  params = {"w": jnp.zeros(4)}
  g = {"w": jnp.asarray([jnp.nan, jnp.inf, -jnp.inf, 0.5])}
  updates, state = tx.update(g, tx.init(params), params)
  assert np.all(np.isfinite(updates["w"]))
  np.testing.assert_allclose(state[2].nu["w"], 0.001 * np.asarray([0.0, 1.0, 1.0, 0.25]), rtol=1e-6)
  with pytest.raises(ValueError, match="learning rate"):
    optim.adam(-1e-5, 0.0, 0.999, 1e-8)


def test_ema_beta_ramp():
  setup, _, _ = tiny.make_setup()
  setup = steps.SiDSetup(**{**setup.__dict__, "global_batch": 256, "micro_batch": 256,
                            "hyper": steps.SiDHyper(ema_halflife_kimg=500.0, ema_rampup=0.05)})
  assert float(steps.ema_beta(setup, jnp.asarray(0))) == 0.0  # first iteration: ema := theta
  step = 1000
  halflife = min(500e3, step * 256 * 0.05)
  np.testing.assert_allclose(steps.ema_beta(setup, jnp.asarray(step)), 0.5**(256 / halflife),
                             rtol=1e-6)
  step = 10**6  # ramp no longer active
  np.testing.assert_allclose(steps.ema_beta(setup, jnp.asarray(step)), 0.5**(256 / 500e3),
                             rtol=1e-6)


@functools.lru_cache(maxsize=None)
def _jitted(setup):
  return jax.jit(functools.partial(steps.train_step, setup))


def _run(setup, teacher_params, params, n, key=0, mesh=None):
  state = steps.init_state(setup, params, params)
  fn = _jitted(setup)
  history = []
  for _ in range(n):
    if mesh is not None:
      with jax.set_mesh(mesh):
        state, m = fn(state, teacher_params, jax.random.key(key))
    else:
      state, m = fn(state, teacher_params, jax.random.key(key))
    history.append(jax.device_get(m))
  return state, history


def test_first_iteration_copies_generator_into_ema_and_updates_both_nets():
  setup, tp, params = tiny.make_setup()
  state, hist = _run(setup, tp, params, 1)
  assert int(state.step) == 1
  assert _tree_max_diff(state.generator_ema, state.generator) == 0.0
  assert _tree_max_diff(state.generator, params) > 0
  assert _tree_max_diff(state.fake_score, params) > 0
  assert np.isfinite(hist[0]["gen_loss"]) and np.isfinite(hist[0]["fake_loss"])
  assert hist[0]["gen_valid_fraction"] == 1.0 and int(hist[0]["nonfinite_streak"]) == 0


def test_gradient_accumulation_matches_one_big_batch():
  a = tiny.make_setup(global_batch=8, micro_batch=8)
  b = tiny.make_setup(global_batch=8, micro_batch=2)
  sa, ha = _run(*a, 2)
  sb, hb = _run(*b, 2)
  for k in ("fake_loss", "gen_loss"):
    np.testing.assert_allclose([h[k] for h in ha], [h[k] for h in hb], rtol=1e-5)
  assert _tree_max_diff(sa.generator, sb.generator) < 1e-5
  assert _tree_max_diff(sa.fake_score, sb.fake_score) < 1e-5


@pytest.mark.parametrize("axes", [{"data": 8}, {"data": 2, "fsdp": 4}])
def test_one_device_and_eight_devices_agree(axes):
  """Same losses and parameters on a 1-device and an 8-device mesh (randomness included)."""
  results = []
  for devices, mesh_axes in ((jax.devices()[:1], {"data": 1}), (jax.devices()[:8], axes)):
    mesh = sharding.make_mesh(mesh_axes, devices)
    setup, tp, params = tiny.make_setup(global_batch=16, micro_batch=8, dropout=0.2,
                                        draw_sharding=sharding.batch_sharding(mesh, 1))
    results.append(_run(setup, tp, params, 3, mesh=mesh))
  (s1, h1), (s8, h8) = results
  for k in ("fake_loss", "gen_loss", "gen_grad_norm"):
    np.testing.assert_allclose([h[k] for h in h1], [h[k] for h in h8], rtol=1e-5)
  assert _tree_max_diff(s1.generator, s8.generator) < 1e-5
  assert _tree_max_diff(s1.generator_ema, s8.generator_ema) < 1e-5
  assert _tree_max_diff(s1.fake_score, s8.fake_score) < 1e-5


def test_different_keys_give_different_draws_and_steps_are_deterministic():
  setup, tp, params = tiny.make_setup()
  s_a, _ = _run(setup, tp, params, 2, key=0)
  s_b, _ = _run(setup, tp, params, 2, key=0)
  s_c, _ = _run(setup, tp, params, 2, key=1)
  assert _tree_max_diff(s_a.generator, s_b.generator) == 0.0
  assert _tree_max_diff(s_a.generator, s_c.generator) > 0


def test_nonfinite_streak_counts_bad_iterations():
  setup, tp, params = tiny.make_setup()
  bad_tp = {**tp, "means": tp["means"] * jnp.nan}
  state, hist = _run(setup, bad_tp, params, 3)
  assert [int(h["nonfinite_streak"]) for h in hist] == [1, 2, 3]
  # Parameters stay finite (grads are sanitised, masked samples contribute nothing).
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.generator))


def test_edm2_forced_weight_normalisation_projects_before_training_forwards():
  """With force_normalization the MPConv weights the step updates are normalize(w): a weight
  stored at 3x unit RMS per output channel comes back at ~unit RMS (plus one small Adam step)."""
  import json
  from sid_jax import models
  z = np.load("tests/testdata/edm2_precond_nvidia.npz")
  kwargs = dict(json.loads(str(z["config_json"])), img_resolution=8, channel_mult=[1],
                attn_resolutions=[])
  den = models.build_denoiser({"class_name": "Precond", "kwargs": kwargs})
  params = models.init_params(den, jax.random.key(0), (8, 8, 4), 10)
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: 3.0 * x if jax.tree_util.keystr(p).endswith("['weight']") else x, params)

  def channel_rms(tree):
    out = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
      if jax.tree_util.keystr(path).endswith("['weight']"):
        x = np.asarray(x).reshape(x.shape[0], -1)
        out.append(np.sqrt(np.mean(x**2, axis=1)))
    return np.concatenate(out)

  base, teacher_params, _ = tiny.make_setup(label_dim=10, shape=(8, 8, 4))
  results = {}
  for force in (False, True):
    setup = steps.SiDSetup(**{**base.__dict__, "generate": generators.one_step(den, 2.5),
                              "fake_score": den,
                              "project": edm2.project_mpconv_weights if force else None})
    state, hist = _run(setup, teacher_params, params, 1)
    assert np.isfinite(hist[0]["gen_loss"]) and np.isfinite(hist[0]["fake_loss"])
    results[force] = (channel_rms(state.generator), channel_rms(state.fake_score))
  for rms in results[True]:
    np.testing.assert_allclose(rms, 1.0, atol=0.05)
  stored = channel_rms(params)
  assert np.median(stored) > 2.5  # the stored weights are far from unit RMS ...
  for rms in results[False]:  # ... and without the projection they stay where they were
    np.testing.assert_allclose(rms, stored, rtol=0.02)
