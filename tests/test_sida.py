"""SiDA / SiD²A as a configuration of the shared step: real data, warm-up schedule, generator-only
projection, SiD²A initialisation, students' settings from the config (spec §6, §7.2, §4.7)."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sid_jax import checkpoints, denoisers, generators, losses, models, optim, steps
from sid_jax import run as run_lib
from sid_jax.methods import sida
from tests import configs_util

SHAPE = (4, 4, 1)
LABELS = 3


class TinyEncoderDecoder(nn.Module):
  """F(x, c_noise, labels) with SiDA's outputs: the patch logits are the channel mean of the
  hidden activation at half resolution ('encoder'), F the decoder's ('decoder'), or both."""
  channels: int = 8

  @nn.compact
  def __call__(self, x, noise_labels, class_labels, augment_labels=None, *, train=False,
               output="decoder"):
    emb = nn.Dense(self.channels)(jnp.stack([jnp.sin(noise_labels), jnp.cos(noise_labels)], -1))
    if class_labels is not None:
      emb = emb + nn.Dense(self.channels, use_bias=False)(class_labels)
    h = nn.silu(nn.Conv(self.channels, (3, 3))(x) + emb[:, None, None, :])
    logits = jnp.mean(h[:, ::2, ::2], axis=-1, keepdims=True)
    if output == "encoder":
      return logits
    out = nn.Conv(x.shape[-1], (3, 3))(h)
    return out if output == "decoder" else (out, logits)


def _setup(*, frozen=None, gan_start=1e9, project=None, project_fake=True, gen_loss=None):
  net = denoisers.NetworkDenoiser(TinyEncoderDecoder(), label_dim=LABELS)
  teacher = denoisers.GaussianMixtureDenoiser(std=0.3)
  teacher_params = teacher.make_params(0, LABELS, SHAPE)
  setup = steps.SiDSetup(
      teacher=teacher, fake_score=net, generate=generators.one_step(net, 2.5),
      fake_loss=losses.SiDAFakeLoss(group_size=4),
      generator_loss=gen_loss or losses.SiDAGeneratorLoss(group_size=4, gan_start_nimg=gan_start),
      image_shape=SHAPE, label_dim=LABELS, global_batch=8, micro_batch=8,
      hyper=steps.SiDHyper(ema_halflife_kimg=0.05, generator_frozen_nimg=frozen),
      generator_tx=optim.adam(1e-3, 0.0, 0.999, 1e-8),
      fake_tx=optim.adam(1e-3, 0.0, 0.999, 1e-8), project=project, project_fake=project_fake)
  params = net.init(jax.random.key(1), jnp.zeros((2,) + SHAPE), jnp.zeros((2, LABELS)))
  return setup, teacher_params, params


def _batch(seed=0, images=None):
  rs = np.random.RandomState(seed)
  lead = (1, 8)
  img = rs.uniform(-1, 1, lead + SHAPE).astype(np.float32) if images is None else images
  one_hot = lambda: np.eye(LABELS, dtype=np.float32)[rs.randint(0, LABELS, lead)]
  return {"fake": {"images": jnp.asarray(img), "labels": jnp.asarray(one_hot())},
          "gen": {"labels": jnp.asarray(one_hot())}}


def _max_diff(a, b):
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_generator_frozen_while_at_most_the_warmup_images_are_done():
  """Batch 8, frozen up to 8 images: steps 0 (0 images) and 1 (8, not > 8) compute but skip the
  generator's Adam step (parameters and optimiser state unchanged), step 2 (16) updates it; the
  fake score is updated from step 0 and the EMA follows G (beta = 0 at step 0)."""
  setup, tp, params = _setup(frozen=8)
  state = steps.init_state(setup, params, params)
  g0, opt0 = state.generator, state.generator_opt
  step = jax.jit(lambda s, b: steps.train_step(setup, s, tp, jax.random.key(0), b))
  updated = []
  for i in range(3):
    state, m = step(state, _batch(i))
    updated.append(bool(m["gen_updated"]))
    assert np.isfinite(m["gen_loss"]) and float(m["gen_grad_norm"]) > 0
    if i < 2:
      assert _max_diff(state.generator, g0) == 0.0
      assert _max_diff(state.generator_opt, opt0) == 0.0
      assert _max_diff(state.generator_ema, g0) == 0.0
    if i == 0:
      assert _max_diff(state.fake_score, params) > 0
  assert updated == [False, False, True]
  assert _max_diff(state.generator, g0) > 0


def test_projection_on_the_generator_only_and_kept_while_frozen():
  """SiDA-EDM2 (spec §7.2): the forced projection applies to G (whose projected weights stay even
  while its optimiser step is skipped), not to the fake score. Here the projection adds 1."""
  plus_one = lambda p: jax.tree.map(lambda x: x + 1.0, p)
  setup, tp, params = _setup(frozen=100, project=plus_one, project_fake=False)
  state = steps.init_state(setup, params, params)
  state, _ = jax.jit(lambda s, b: steps.train_step(setup, s, tp, jax.random.key(0), b))(
      state, _batch())
  np.testing.assert_allclose(_max_diff(state.generator, plus_one(params)), 0.0, atol=1e-7)
  assert 0 < _max_diff(state.fake_score, params) < 0.01  # one Adam step of lr 1e-3, no +1
  setup_both, _, _ = _setup(frozen=100, project=plus_one)
  state = steps.init_state(setup_both, params, params)
  state, _ = steps.train_step(setup_both, state, tp, jax.random.key(0), _batch())
  assert _max_diff(state.fake_score, params) > 0.99


@pytest.mark.parametrize("gan_start,sid_only", [(16, True), (15, False)])
def test_gan_term_joins_strictly_after_its_start(gan_start, sid_only):
  """At step 2 of batch 8 (16 images done) the SiDA generator loss equals SiD's own loss on the
  same draws when the GAN starts at 16 (strict >), and differs when it starts at 15."""
  setup, tp, params = _setup(gan_start=gan_start)
  sid_setup, _, _ = _setup(gen_loss=losses.SiDGeneratorLoss(alpha=1.0))
  state = steps.init_state(setup, params, params).replace(step=jnp.asarray(2, jnp.int32))
  batch = _batch()
  _, m = steps.generator_step(setup, state, tp, jax.random.key(3), batch)
  _, m_sid = steps.generator_step(sid_setup, state, tp, jax.random.key(3), batch)
  if sid_only:
    np.testing.assert_allclose(m["gen_loss"], m_sid["gen_loss"], rtol=1e-6)
  else:
    assert abs(float(m["gen_loss"]) - float(m_sid["gen_loss"])) > 1e-4


def test_real_images_and_labels_come_from_the_batch():
  """The fake step's loss depends on the batch's real images and labels, the generator step's
  on its labels; a SiDA step without real images refuses with a clear error."""
  setup, tp, params = _setup()
  state = steps.init_state(setup, params, params)
  fake = lambda b: float(steps.fake_score_step(setup, state, jax.random.key(0), tp, b)[1][
      "fake_loss"])
  gen = lambda b: float(steps.generator_step(setup, state, tp, jax.random.key(0), b)[1][
      "gen_loss"])
  base = _batch(0)
  other_images = dict(base, fake=dict(base["fake"], images=base["fake"]["images"] * -1))
  other_labels = dict(base, fake=dict(base["fake"], labels=_batch(5)["fake"]["labels"]))
  assert fake(other_images) != fake(base)
  assert fake(other_labels) != fake(base)
  assert gen(dict(base, gen=_batch(5)["gen"])) != gen(base)
  with pytest.raises(ValueError, match="real images"):
    steps.fake_score_step(setup, state, jax.random.key(0), tp, None)
  with pytest.raises(ValueError, match="expected"):
    bad = dict(base, fake=dict(base["fake"], images=jnp.zeros((1, 8, 2, 2, 1))))
    steps.fake_score_step(setup, state, jax.random.key(0), tp, bad)


# ---------------------------------------------------------------------------------------------
# Students' settings from the config (spec §4.7) and SiD²A's generator (spec §6.5).
# ---------------------------------------------------------------------------------------------


def _teacher_dir(tmp_path, dropout):
  """A network checkpoint of the digits teacher's architecture with another training dropout."""
  src = os.path.join(os.path.dirname(sida.__file__), "..", "assets", "digits_teacher")
  spec = checkpoints.load_network_spec(src)
  spec = dict(spec, kwargs=dict(spec["kwargs"], dropout=dropout))
  params = checkpoints.load_network_params(src)
  out = str(tmp_path / f"teacher_{dropout}")
  checkpoints.save_network(out, params, spec)
  return out, params


def test_student_dropout_comes_from_the_config(tmp_path):
  """An AFHQv2-like case: the teacher was trained with dropout 0.25, SiD's students use 0.05."""
  path, _ = _teacher_dir(tmp_path, 0.25)
  c = configs_util.load("digits_sid.py", "tiny")
  c.teacher.checkpoint = path
  c.model.kwargs = {"dropout": 0.05}
  teacher = models.build_teacher(c)
  student, params, spec = models.build_students(c, teacher, jax.random.key(0))
  assert teacher.denoiser.module.dropout == 0.25 and teacher.spec["kwargs"]["dropout"] == 0.25
  assert student.module.dropout == 0.05 and spec["kwargs"]["dropout"] == 0.05
  assert {k: v for k, v in spec["kwargs"].items() if k != "dropout"} == {
      k: v for k, v in teacher.spec["kwargs"].items() if k != "dropout"}
  assert params is teacher.params
  c.model.kwargs = {}  # nothing set: the teacher's own
  assert models.build_students(c, teacher, jax.random.key(0))[0].module.dropout == 0.25


class _SyntheticFeed:
  """The real-data feed's interface (`sid_jax.data.real`) over fixed synthetic digits."""

  def __init__(self, num_micro, micro, label_dim):
    self.shape = (num_micro, micro)
    self.label_dim, self.count = label_dim, 0

  def next(self):
    rs = np.random.RandomState(self.count)
    self.count += 1
    return {"images": jnp.asarray(rs.uniform(-1, 1, self.shape + (8, 8, 1)), jnp.float32),
            "labels": jnp.asarray(np.eye(self.label_dim, dtype=np.float32)[
                rs.randint(0, self.label_dim, self.shape)])}

  def abstract(self):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.next())

  def state(self):
    return {"count": self.count}

  def restore(self, state):
    self.count = state["count"]


def test_sid2a_generator_starts_from_a_sid_generator(tmp_path, monkeypatch):
  """A SiD run's exported generator (WORKDIR/generator, the network checkpoint format that
  `python -m sid_jax.convert edm` also writes from an official SiD pickle) becomes the SiD²A
  run's initial generator and EMA; the fake score starts from the teacher."""
  c = configs_util.load("digits_sida.py", "tiny")
  teacher = models.build_teacher(c)
  sid_gen = jax.tree.map(lambda x: np.asarray(x) + 0.01, teacher.params)  # a 'distilled' one
  checkpoints.save_network(str(tmp_path / "sid_run" / "generator"), sid_gen,
                           dict(teacher.spec, sigma_init=2.5, step=800))
  c.sida.init_generator = str(tmp_path / "sid_run")  # the workdir: its generator/ is used
  monkeypatch.setattr(sida, "make_real_feed",
                      lambda config, mesh, n, m, abstract=False: _SyntheticFeed(n, m, 10))
  run = run_lib.build_run(c, jax.devices()[:1])
  state = run_lib.initial_state(run)
  assert _max_diff(state.generator, sid_gen) == 0.0
  assert _max_diff(state.generator_ema, sid_gen) == 0.0
  assert _max_diff(state.fake_score, teacher.params) == 0.0
  assert run.setup.fake_tx is not None and not run.setup.project_fake
  batch = run.feed.next()
  assert set(batch) == {"fake", "gen"} and set(batch["gen"]) == {"labels"}
  c.sida.init_generator = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="config.sida.init_generator"):
    run_lib.check_config(c, 1)


def test_sida_config_checks():
  c = configs_util.load("digits_sida.py", "tiny")
  run_lib.check_config(c, 1)
  c.sida.adv_group_size = 3
  with pytest.raises(ValueError, match="config.sida.adv_group_size"):
    run_lib.check_config(c, 1)
  c = configs_util.load("digits_sida.py", "")
  assert c.optim.fake_clip_value == 1.0 and c.sid.alpha == 1.0
  fake_loss, gen_loss = sida.sida_losses(c)
  assert (fake_loss.group_size, gen_loss.group_size) == (64, 64)
  assert gen_loss.gan_start_nimg == 10_000 and gen_loss.gan_scale == 0.01


def test_digits_sida_reads_real_digits_in_pairs():
  """configs/digits_sida.py:tiny on the real digits feed (sid_jax/data/real.py): each iteration
  takes one batch for the fake step (images in [-1, 1], one-hot labels) and the labels of the
  next for the generator step; the feed position survives state()/restore()."""
  c = configs_util.load("digits_sida.py", "tiny")
  run = run_lib.build_run(c, jax.devices()[:1])
  assert run.setup.fake_loss.uses_real_data and run.setup.generator_loss.uses_nimg
  assert run.setup.hyper.generator_frozen_nimg == 0.0
  abstract = run.feed.abstract()
  position = run.feed.state()
  batch = run.feed.next()
  assert jax.tree.map(lambda a: a.shape, batch) == jax.tree.map(lambda a: a.shape, abstract)
  assert batch["fake"]["images"].shape == (2, 8, 8, 8, 1)
  assert batch["gen"]["labels"].shape == (2, 8, 10)
  images = np.asarray(batch["fake"]["images"])
  assert images.min() >= -1 and images.max() <= 1 and images.std() > 0.1
  np.testing.assert_array_equal(np.asarray(batch["fake"]["labels"]).sum(-1), 1.0)
  run.feed.restore(position)
  again = run.feed.next()
  assert _max_diff(again, batch) == 0.0


def test_sid2a_generator_from_an_official_sid_pickle(tmp_path):
  """An official SiD generator pickle ({'ema': EDMPrecond}, as NVlabs' snapshots) is read with
  the strict converter; the teacher (here its weights perturbed) stays the fake score's start."""
  from tests import test_convert  # pylint: disable=import-outside-toplevel
  fx = test_convert._fixture("edm_songunet_ddpmpp")  # pylint: disable=protected-access
  pkl = test_convert.write_official_pickle(tmp_path / "sid.pkl",
                                           test_convert._edm_snapshot(fx))  # pylint: disable=protected-access
  from sid_jax.models import official  # pylint: disable=import-outside-toplevel
  spec, sid_params, _ = official.read_official("edm", pkl)
  teacher_params = jax.tree.map(lambda x: np.asarray(x) * 0.5, sid_params)
  checkpoints.save_network(str(tmp_path / "teacher"), teacher_params, spec)
  c = test_convert._teacher_config(tmp_path / "teacher", fx)  # pylint: disable=protected-access
  c.method, c.model.init_from, c.sida = "sida", "teacher", sida.config_section()
  c.sida.init_generator = pkl
  a = sida.assemble(c)
  assert _max_diff(a.generator_init_params, sid_params) == 0.0
  assert _max_diff(a.init_params, teacher_params) == 0.0


def test_sida_losses_on_an_edm2_network_match_sid_terms():
  """On a real (tiny, random) EDM2 network with its log-variance head, the SiDA losses' DSM and
  SiD parts equal SiD's own losses on the same draws: the encoder-decoder-logvar outputs are
  taken in the right order, and the adversarial terms are finite and non-zero."""
  spec = {"class_name": "EDM_2_Precond_EncoderDecoder",
          "kwargs": dict(img_resolution=8, img_channels=4, label_dim=0, model_channels=16,
                         channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                         force_normalization=True, use_gan=True)}
  den = models.build_denoiser(spec)
  params = models.random_network_params(den, (8, 8, 4), 0, seed=0)
  net = lambda *a, **k: den(params, *a, **k)
  rs = np.random.RandomState(0)
  x, real, noise = (jnp.asarray(rs.randn(4, 8, 8, 4), jnp.float32) * 0.5 for _ in range(3))
  sigma = jnp.asarray([0.3, 1.0, 2.0, 5.0])
  weight = losses.EDMWeight()(sigma)
  kw = dict(batch_size=4, use_logvar=True)
  total, aux = losses.sida_fake_loss(net, net, x, real, None, sigma, weight, noise,
                                     loss_scale=1.0, adv_scale=100.0, group_size=2, **kw)
  dsm, _ = losses.dsm_loss(lambda *a, **k: net(*a, return_logvar=True, **k), x, None, sigma,
                           weight, noise, loss_scale=1.0, **kw)
  np.testing.assert_allclose(aux["dsm_loss"], dsm, rtol=1e-5)
  assert np.isfinite(total) and float(aux["adv_loss"]) > 0
  teacher = lambda *a, **k: net(*a, **k)
  gen, gaux = losses.sida_generator_loss(teacher, net, x, None, sigma, noise, alpha=1.0,
                                         loss_scale=100.0, gan_scale=0.01, group_size=2,
                                         sid_weight=1.0, gan_weight=0.0, **kw)
  sid_loss, _ = losses.sid_generator_loss(teacher, lambda *a, **k: net(*a, return_logvar=True,
                                                                        **k),
                                          x, None, sigma, noise, alpha=1.0, loss_scale=100.0,
                                          **kw)
  np.testing.assert_allclose(gen, sid_loss, rtol=1e-5)
  assert np.isfinite(gaux["gan_loss"]) and float(gaux["gan_loss"]) > 0
