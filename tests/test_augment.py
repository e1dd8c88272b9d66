"""EDM AugmentPipe: replay of the official pipe's recorded draws (golden fixture) and properties."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sid_jax import augment

FIXTURE = os.path.join(os.path.dirname(__file__), "testdata", "edm_augment_pipe.npz")
_KIND_OF_FN = {"randint": ("bit", "quarter"), "rand": ("uniform", "uniform2"),
               "randn": ("normal", "normal2")}


@pytest.fixture(scope="module")
def golden():
  data = np.load(FIXTURE, allow_pickle=False)
  return data, json.loads(str(data["meta_json"]))["subcases"]


def _nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


def _recorded_draws(pipe, data, info):
  """The fixture's draws under our names, checking that the official call order is ours."""
  recorded = sorted(info["draws"], key=lambda d: d["index"])
  kinds = {name: kind for op in pipe.enabled_ops for name, kind in augment._DRAWS[op]}
  names = pipe.draw_order()
  assert len(recorded) == len(names), (names, recorded)
  draws = {}
  for name, rec in zip(names, recorded):
    owner = next(op for op in pipe.enabled_ops if name in dict(augment._DRAWS[op]))
    assert rec["op"] == owner and kinds[name] in _KIND_OF_FN[rec["fn"]], (name, rec)
    draws[name] = data[rec["key"]]
  return draws


SUBCASES = ["xflip", "yflip", "rotate_int", "translate_int", "scale", "rotate_frac", "aniso",
            "translate_frac", "brightness", "contrast", "lumaflip", "hue", "saturation",
            "edm_sid_p0.5", "edm_sid_p1"]


def test_fixture_lists_every_subcase(golden):
  _, subcases = golden
  assert sorted(subcases) == sorted(SUBCASES)
  assert set(augment.OPS) == set(SUBCASES[:13])


@pytest.mark.parametrize("sub", SUBCASES)
def test_replay_matches_official_float32(golden, sub):
  data, subcases = golden
  info = subcases[sub]
  pipe = augment.AugmentPipe(**info["kwargs"])
  draws = _recorded_draws(pipe, data, info)
  images, labels = jax.jit(pipe.apply)(jnp.asarray(_nhwc(data["images"])), draws)
  assert images.dtype == jnp.float32 and labels.dtype == jnp.float32
  assert labels.shape == tuple(info["labels_shape"]) == (4, pipe.label_dim)
  for got, key in ((images, "images"), (labels, "labels")):
    ref = data[f"{sub}/out64/{key}"]
    ref = _nhwc(ref) if key == "images" else ref
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(), err_msg=key)
  # The ops must actually have done something (the fixture picked draws that fire).
  assert np.abs(np.asarray(images) - _nhwc(data["images"])).max() > 0.1


def test_replay_matches_official_float64(golden):
  """In float64 only the summation order differs from the official float64 run."""
  data, subcases = golden
  jax.config.update("jax_enable_x64", True)
  try:
    for sub in ("hue", "edm_sid_p0.5", "edm_sid_p1"):  # every geometric op, a colour op
      info = subcases[sub]
      pipe = augment.AugmentPipe(**info["kwargs"])
      draws = {k: (v.astype(np.float64) if v.dtype == np.float32 else v)
               for k, v in _recorded_draws(pipe, data, info).items()}
      x = jnp.asarray(_nhwc(data["images"]).astype(np.float64))
      images, labels = jax.jit(pipe.apply)(x, draws)
      assert images.dtype == jnp.float64
      np.testing.assert_allclose(images, _nhwc(data[f"{sub}/out64/images"]), rtol=0, atol=1e-12)
      np.testing.assert_allclose(labels, data[f"{sub}/out64/labels"], rtol=0, atol=1e-12)
  finally:
    jax.config.update("jax_enable_x64", False)


def _sid_draws(n, **values):
  """Draws for the SiD pipe with every gate passing unless overridden."""
  draws = {name: np.zeros((2, n) if name == "translate_frac" else (n,), np.float32)
           for name in augment.sid_augment_pipe().draw_order()}
  draws["xflip"] = draws["xflip"].astype(np.int32)
  draws["yflip"] = draws["yflip"].astype(np.int32)
  draws.update({k: np.asarray(v) for k, v in values.items()})
  return draws


def test_sid_label_layout():
  pipe = augment.sid_augment_pipe(p=0.5)
  assert pipe.label_dim == 9
  assert pipe.enabled_ops == ("xflip", "yflip", "scale", "rotate_frac", "aniso", "translate_frac")
  assert (pipe.xflip, pipe.yflip, pipe.scale, pipe.rotate_frac, pipe.aniso,
          pipe.translate_frac) == (1e8, 1, 1, 1, 1, 1)
  n = 3
  u_rot = np.asarray([0.9, 0.3, 0.6], np.float32)
  u_ani = np.asarray([0.2, 0.7, 0.45], np.float32)
  w_scale = np.asarray([0.5, -1.2, 2.0], np.float32)
  w_ani = np.asarray([-0.4, 1.1, 0.3], np.float32)
  t = np.asarray([[0.3, -0.6, 1.5], [-0.2, 0.8, 0.1]], np.float32)
  draws = _sid_draws(
      n, xflip=[1, 0, 1], xflip_gate=[0.99, 0.5, 0.0], yflip=[1, 1, 0],
      yflip_gate=[0.1, 0.7, 0.2], scale=w_scale, scale_gate=[0.1, 0.2, 0.6],
      rotate_frac=u_rot, rotate_frac_gate=[0.3, 0.9, 0.1], aniso=w_ani, aniso_angle=u_ani,
      aniso_gate=[0.4, 0.1, 0.8], aniso_angle_gate=[0.1, 0.9, 0.3], translate_frac=t,
      translate_frac_gate=[0.2, 0.6, 0.4])
  x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (n, 16, 16, 3)), jnp.float32)
  _, labels = jax.jit(pipe.apply)(x, draws)
  fires = lambda gate: np.asarray(gate) < 0.5
  rot = np.where(fires([0.3, 0.9, 0.1]), (2 * u_rot - 1) * np.pi, 0)
  w_a = np.where(fires([0.4, 0.1, 0.8]), w_ani, 0)
  r = np.where(fires([0.1, 0.9, 0.3]), (2 * u_ani - 1) * np.pi, 0)  # aniso_rotate_prob = 0.5
  expected = np.stack([
      [1, 0, 1],  # xflip: gate threshold 1e8 * 0.5 always passes
      np.where(fires([0.1, 0.7, 0.2]), [1, 1, 0], 0),  # yflip
      np.where(fires([0.1, 0.2, 0.6]), w_scale, 0),  # scale w
      np.cos(rot) - 1, np.sin(rot),  # rotation
      w_a * np.cos(r), w_a * np.sin(r),  # anisotropic scale
      np.where(fires([0.2, 0.6, 0.4]), t[0], 0), np.where(fires([0.2, 0.6, 0.4]), t[1], 0),
  ], axis=1)
  np.testing.assert_allclose(labels, expected, rtol=1e-6, atol=1e-6)


def test_p0_is_the_identity_and_xflip_follows_p():
  """Official behaviour: the xflip gate is u < 1e8 * p, so at p = 0 nothing fires, flips included.

  The geometric path still runs (as in the official code), with the identity transform: the sym6
  up/down resampling then reproduces the image to float32 rounding.
  """
  n = 4
  x = jnp.asarray(np.random.RandomState(1).uniform(-1, 1, (n, 16, 12, 3)), jnp.float32)
  pipe0 = augment.sid_augment_pipe(p=0.0)
  for seed in range(3):
    y, labels = jax.jit(pipe0)(jax.random.key(seed), x)
    np.testing.assert_array_equal(labels, np.zeros((n, 9)))
    np.testing.assert_allclose(y, x, rtol=0, atol=2e-6)
  # Flip flags set and gates at their most permissive draw (u = 0): still nothing at p = 0 ...
  draws = _sid_draws(n, xflip=np.ones(n, np.int32), yflip=np.ones(n, np.int32))
  y, labels = jax.jit(pipe0.apply)(x, draws)
  np.testing.assert_array_equal(labels, np.zeros((n, 9)))
  np.testing.assert_allclose(y, x, rtol=0, atol=2e-6)
  # ... while at p = 1e-6 the xflip gate threshold is 100: u = 0.99 flips; the others stay off.
  pipe_tiny = augment.sid_augment_pipe(p=1e-6)
  gates_off = {name: np.full((n,), 0.5, np.float32) for name in pipe_tiny.draw_order()
               if name.endswith("_gate")}
  draws = _sid_draws(n, xflip=np.asarray([1, 0, 1, 1], np.int32),
                     yflip=np.ones(n, np.int32), **{**gates_off,
                                                    "xflip_gate": np.full((n,), 0.99)})
  y, labels = jax.jit(pipe_tiny.apply)(x, draws)
  expected = np.zeros((n, 9))
  expected[:, 0] = [1, 0, 1, 1]
  np.testing.assert_array_equal(labels, expected)
  flipped = jnp.where(jnp.asarray([1, 0, 1, 1])[:, None, None, None] == 1, x[:, :, ::-1], x)
  np.testing.assert_allclose(y, flipped, rtol=0, atol=2e-6)


@pytest.mark.parametrize("op,axis", [("xflip", 2), ("yflip", 1)])
def test_flips_are_exact(op, axis):
  n = 6
  x = jnp.asarray(np.random.RandomState(2).uniform(-1, 1, (n, 10, 14, 3)), jnp.float32)
  pipe = augment.AugmentPipe(p=0.5, **{op: 1})
  flag = np.asarray([1, 1, 0, 0, 1, 0], np.int32)
  gate = np.asarray([0.2, 0.7, 0.1, 0.9, 0.49, 0.5], np.float32)  # fires if < 0.5
  y, labels = jax.jit(pipe.apply)(x, {op: flag, op + "_gate": gate})
  flipped = flag * (gate < 0.5)
  np.testing.assert_array_equal(labels[:, 0], flipped)
  for b in range(n):
    want = np.flip(np.asarray(x[b]), axis - 1) if flipped[b] else np.asarray(x[b])
    np.testing.assert_array_equal(y[b], want)


def test_integer_translation_on_a_non_square_image():
  """translate_frac by whole pixels is a shift (the resampling is exact on the pixel grid)."""
  h, w = 12, 20
  x = jnp.asarray(np.random.RandomState(3).uniform(-1, 1, (2, h, w, 3)), jnp.float32)
  pipe = augment.AugmentPipe(p=1, translate_frac=1)
  # Units of translate_frac_std * size: 2 columns = 2 / (0.125 * 20), 3 rows = 3 / (0.125 * 12).
  draws = {"translate_frac": np.asarray([[0.8, 0.8], [2.0, 2.0]], np.float32),
           "translate_frac_gate": np.zeros(2, np.float32)}
  y, labels = jax.jit(pipe.apply)(x, draws)
  np.testing.assert_allclose(labels, [[0.8, 2.0], [0.8, 2.0]])
  np.testing.assert_allclose(y[:, 3:, 2:], x[:, :-3, :-2], rtol=0, atol=1e-5)


def test_quarter_rotation_direction():
  """rotate_frac by +pi/2 turns the image like np.rot90(k=1) (up to sym6 filter asymmetry)."""
  yy, xx = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
  smooth = np.stack([np.sin(0.3 * xx + 0.2 * yy), np.cos(0.25 * yy - 0.1 * xx),
                     np.sin(0.2 * (xx - yy))], -1)[None].astype(np.float32)
  pipe = augment.AugmentPipe(p=1, rotate_frac=1)
  y, labels = jax.jit(pipe.apply)(jnp.asarray(smooth),
                                  {"rotate_frac": np.full((1,), 0.75, np.float32),
                                   "rotate_frac_gate": np.zeros(1, np.float32)})
  np.testing.assert_allclose(labels, [[-1.0, 1.0]], atol=1e-6)
  assert np.abs(y - np.rot90(smooth, 1, axes=(1, 2))).max() < 0.06
  assert np.abs(y - np.rot90(smooth, -1, axes=(1, 2))).max() > 1.0


def test_random_draws_determinism_and_statistics():
  n = 1024
  x = jnp.asarray(np.random.RandomState(4).uniform(-1, 1, (n, 8, 8, 3)), jnp.float32)
  pipe = augment.sid_augment_pipe(p=0.5)
  fn = jax.jit(pipe)
  y1, l1 = fn(jax.random.key(0), x)
  y2, l2 = fn(jax.random.key(0), x)
  np.testing.assert_array_equal(y1, y2)
  np.testing.assert_array_equal(l1, l2)
  y3, l3 = fn(jax.random.key(1), x)
  assert np.abs(np.asarray(l1) - np.asarray(l3)).max() > 0.5

  labels = np.asarray(l1, np.float64)
  se = lambda q: 4.5 * np.sqrt(q * (1 - q) / n)
  assert set(np.unique(labels[:, 0])) == {0, 1} and set(np.unique(labels[:, 1])) == {0, 1}
  assert abs(labels[:, 0].mean() - 0.5) < se(0.5)  # xflip: always eligible, flipped half the time
  assert abs(labels[:, 1].mean() - 0.25) < se(0.25)  # yflip: p * 1/2
  scale_fired = labels[:, 2] != 0
  assert abs(scale_fired.mean() - 0.5) < se(0.5)
  assert abs(labels[scale_fired, 2].std() - 1) < 0.1  # unit-normal w
  angle = np.arctan2(labels[:, 4], labels[:, 3] + 1)
  rot_fired = angle != 0
  assert abs(rot_fired.mean() - 0.5) < se(0.5)
  assert abs(np.abs(angle[rot_fired]).mean() - np.pi / 2) < 0.15  # uniform in (-pi, pi)
  aniso = np.hypot(labels[:, 5], labels[:, 6])
  assert abs((aniso != 0).mean() - 0.5) < se(0.5)
  rotated_frame = (labels[:, 6] != 0)
  assert abs(rotated_frame.sum() / (aniso != 0).sum() - 0.5) < 0.1  # aniso_rotate_prob
  trans_fired = labels[:, 7] != 0
  np.testing.assert_array_equal(trans_fired, labels[:, 8] != 0)  # one gate for (tx, ty)
  assert abs(trans_fired.mean() - 0.5) < se(0.5)
  # Images move exactly where some op fired.
  moved = np.abs(np.asarray(y1) - np.asarray(x)).max(axis=(1, 2, 3)) > 1e-4
  np.testing.assert_array_equal(moved, np.abs(labels).max(axis=1) > 0)


def test_sharded_equals_unsharded():
  """Batch over 8 devices: same numbers (the batch-wide margin is a global reduction)."""
  devices = np.asarray(jax.devices()[:8])
  mesh = Mesh(devices, ("data",))
  batch = NamedSharding(mesh, P("data"))
  repl = NamedSharding(mesh, P())
  x = jnp.asarray(np.random.RandomState(5).uniform(-1, 1, (16, 16, 16, 3)), jnp.float32)
  pipe = augment.sid_augment_pipe(p=0.6)
  key = jax.random.key(7)
  ref_y, ref_l = jax.jit(pipe)(key, x)
  fn = jax.jit(pipe, in_shardings=(repl, batch), out_shardings=(batch, batch))
  with jax.set_mesh(mesh):
    y, l = fn(key, jax.device_put(x, batch))
  assert len(y.addressable_shards) == 8
  np.testing.assert_allclose(y, ref_y, rtol=0, atol=1e-6)
  np.testing.assert_allclose(l, ref_l, rtol=0, atol=1e-6)


def test_pipe_is_a_static_value_and_validates():
  pipe = augment.sid_augment_pipe(0.12)
  assert hash(pipe) == hash(augment.sid_augment_pipe(0.12))
  assert dataclasses.replace(pipe, p=0.15) != pipe
  assert augment.AugmentPipe().label_dim == 0
  y, labels = augment.AugmentPipe()(jax.random.key(0), jnp.ones((2, 4, 4, 3)))
  assert labels.shape == (2, 0)
  np.testing.assert_array_equal(y, jnp.ones((2, 4, 4, 3)))
  every = augment.AugmentPipe(**{op: 1 for op in augment.OPS})
  assert every.label_dim == 19 and every.draw_order()[:2] == ("xflip", "xflip_gate")
  draws = every.draw(jax.random.key(0), 256)
  assert set(draws) == set(every.draw_order())
  assert set(np.unique(draws["rotate_int"])) == {0, 1, 2, 3}
  assert set(np.unique(draws["lumaflip"])) == {0, 1}
  assert draws["translate_frac"].shape == (2, 256) and draws["hue_gate"].shape == (256,)
  assert 0 <= float(draws["hue"].min()) and float(draws["hue"].max()) < 1
  with pytest.raises(ValueError, match="scale"):
    augment.AugmentPipe(scale=-1)
  with pytest.raises(ValueError, match="RGB"):
    augment.AugmentPipe(brightness=1)(jax.random.key(0), jnp.ones((2, 4, 4, 2)))


def test_usable_as_sid_setup_augment():
  """`SiDSetup.augment` contract: the fake-score loss sees augmented samples and 9 labels."""
  from sid_jax import steps
  from tests import tiny
  setup, _, params = tiny.make_setup(label_dim=0, global_batch=4, micro_batch=4)
  seen = {}
  net = setup.fake_score

  def fake_score(p, x, sigma, labels=None, *, aug_labels=None, train=False, rng=None):
    seen["aug_labels"] = None if aug_labels is None else aug_labels.shape
    return net(p, x, sigma, labels, aug_labels=aug_labels, train=train, rng=rng)

  setup = dataclasses.replace(setup, fake_score=fake_score,
                              augment=augment.sid_augment_pipe(p=0.5))
  state = jax.eval_shape(lambda p: steps.init_state(setup, p, p), params)
  # Tracing the whole step (no compilation) runs the contract: shapes in, shapes out.
  new_state, metrics = jax.eval_shape(lambda s, k: steps.fake_score_step(setup, s, k), state,
                                      jax.random.key(0))
  assert seen["aug_labels"] == (4, 9)
  assert metrics["fake_loss"].shape == ()
  assert jax.tree.map(lambda a: a.shape, new_state) == jax.tree.map(lambda a: a.shape, state)
