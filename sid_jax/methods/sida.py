"""SiDA and SiD²A: SiD with an adversarial loss on real images (spec §6, §7.3, §8.2-§8.4).

This module only *assembles* the method; SiDA is a configuration of the shared step
(`sid_jax.steps`), not a third training loop. Starting from SiD's assembly (`methods.sid`: the
same teacher, students, augmentation, EDM2 projection, sampling and export), it swaps in:

* the losses `losses.SiDAFakeLoss` (fake-score DSM + discriminator, one sigma and one noise draw
  shared by generator samples and real images) and `losses.SiDAGeneratorLoss` (SiD + the
  non-saturating GAN term, 0.5 / 0.5 after `gan_start_kimg`). The discriminator is the fake
  score network's own encoder (its patch logits, `output='encoder' | 'encoder_decoder'` of the
  EDM / EDM2 networks): no second network, no new parameter;
* the warm-up: the generator's optimiser step is skipped while at most `generator_frozen_kimg`
  images are done (`steps.SiDHyper.generator_frozen_nimg`);
* EDM2's forced weight normalisation (`config.sid.force_normalization`) on the generator only,
  as the official SiDA-EDM2 runs effectively apply it (spec §7.2: the fake score's hook is dead;
  the official G_ema is also renormalised in place whenever it is sampled, which changes no
  output and is not replicated here); set it False for the S configuration (force-norm 0);
* the batch: real images and labels from `sid_jax.data.real`'s feed, two batches per iteration
  as in the official loop (the fake step's images and labels, the generator step's labels;
  `PairFeed`);
* SiD²A: the generator and its EMA start from a SiD generator (`config.sida.init_generator`),
  the fake score from the teacher (spec §1.1, §6.5).

The fake-score gradients' element-wise clip at +-1 of SiDA-EDM (spec §6.5) is
`config.optim.fake_clip_value = 1.0` (the SiDA configs set it; EDM2 runs leave it unset).

`config.method = 'sida'` selects it (configs/digits_sida.py).

The adversarial BCE means run over groups of `config.sida.adv_group_size` samples. The official
code takes them over each GPU's micro-batch (`batch_gpu`), so there the group is a by-product of
the GPU layout; here it is a setting, and a group equal to the official run's per-GPU batch
reproduces that run on any TPU/GPU layout. It must divide `config.training.micro_batch`.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections

from sid_jax import checkpoints, losses, models
from sid_jax.methods import base, sid

PICKLE_EXTENSIONS = (".pkl", ".pickle")


def config_section() -> ml_collections.ConfigDict:
  """config.sida with the official SiDA-EDM settings (spec §6.2-§6.5, §8.2)."""
  s = ml_collections.ConfigDict()
  # Samples per adversarial BCE mean: the official per-GPU micro-batch (`batch_gpu`) of the run
  # to reproduce (e.g. 32 for CIFAR-10 SiDA); must divide config.training.micro_batch.
  s.adv_group_size = 32
  s.adv_loss_scale = 1.0  # lsd: 1 (EDM), 100 (EDM2)
  s.gan_loss_scale = 0.01  # lsg_gan
  # Warm-up in images done before an iteration (strict >): the generator is frozen up to
  # generator_frozen_kimg, trained with SiD alone up to gan_start_kimg, then 0.5 / 0.5.
  s.generator_frozen_kimg = 100.0
  s.gan_start_kimg = 200.0
  # SiD²A: where the generator (and its EMA) start. '' = the teacher (SiDA). A network checkpoint
  # directory (a SiD run's WORKDIR/generator export, or an official SiD pickle converted with
  # `python -m sid_jax.convert edm|edm2`), a SiD run's WORKDIR (its generator/ is used), or an
  # official SiD generator pickle (.pkl, entry `init_generator_key`).
  s.init_generator = ""
  s.init_generator_key = "ema"
  # SiD²A configs (configs/sida_edm.py:...,sid2a) set `sid2a`: the run then refuses to start
  # without init_generator, and the error names the official SiD generator (`official_init`, the
  # URL the official script passes as --sid_model) to download and pass.
  s.sid2a = False
  s.official_init = ""
  return s


def check_config(config, abstract: bool = False) -> None:
  """Everything SiDA needs from the config, checked before anything is built."""
  if "sida" not in config:
    raise ValueError("config.method='sida' needs a config.sida section "
                     "(sid_jax.methods.sida.config_section()).")
  s, t = config.sida, config.training
  if config.teacher.type not in ("network", "random"):
    raise ValueError(f"config.teacher.type={config.teacher.type!r}: SiDA's discriminator is the "
                     "fake score network's encoder, so it needs a network teacher ('network' or "
                     "'random').")
  if config.model.init_from != "teacher":
    raise ValueError(f"config.model.init_from={config.model.init_from!r}: SiDA's fake score "
                     "starts from the teacher ('teacher').")
  if int(s.adv_group_size) <= 0 or t.micro_batch % int(s.adv_group_size):
    raise ValueError(f"config.sida.adv_group_size={s.adv_group_size} must be positive and divide "
                     f"config.training.micro_batch={t.micro_batch}.")
  for name in ("adv_loss_scale", "gan_loss_scale"):
    if not s[name] >= 0:
      raise ValueError(f"config.sida.{name} must be >= 0, got {s[name]}.")
  if not 0 <= s.generator_frozen_kimg or not 0 <= s.gan_start_kimg:
    raise ValueError(f"config.sida.generator_frozen_kimg and gan_start_kimg must be >= 0, got "
                     f"{s.generator_frozen_kimg}, {s.gan_start_kimg}.")
  if not config.data.get("source", ""):
    raise ValueError("config.data.source is empty: SiDA trains its discriminator on real images "
                     "(config.data.source / config.data.path, sid_jax/data/real.py).")
  if s.get("sid2a", False) and not s.init_generator and not abstract:
    official = s.get("official_init", "")
    raise ValueError(
        "SiD²A starts its generator from a SiD generator, but config.sida.init_generator is "
        "empty: pass --config.sida.init_generator=PATH (a sid_jax SiD run's workdir or "
        "generator/ export, or an official SiD generator pickle"
        + (f", e.g. the one the paper's run starts from: {official}" if official else "")
        + ").")
  if s.init_generator and not abstract:
    generator_source(s.init_generator)  # raises FileNotFoundError naming the setting


def generator_source(path: str) -> tuple[str, str]:
  """('pickle', file) or ('network', directory) of config.sida.init_generator."""
  if os.path.isfile(path) and path.endswith(PICKLE_EXTENSIONS):
    return "pickle", path
  for directory in (path, os.path.join(path, "generator")):
    if os.path.isfile(os.path.join(directory, checkpoints.NETWORK_SPEC)):
      return "network", directory
  raise FileNotFoundError(
      f"config.sida.init_generator={path!r} is neither a network checkpoint directory (with "
      f"{checkpoints.NETWORK_SPEC}), a SiD run's workdir (with generator/) nor an official SiD "
      "generator pickle (.pkl).")


def load_generator(config, spec: dict, abstract_params):
  """The SiD²A generator's parameters, checked against the students' tree (`abstract_params`)."""
  s = config.sida
  kind, path = generator_source(s.init_generator)
  what = f"config.sida.init_generator={s.init_generator!r}"
  if kind == "network":
    # (EDMPrecond and SiDA's EDMPrecond_EncoderDecoder hold the same weights: the tree decides.)
    try:
      return checkpoints.load_network_params(path, abstract_params)
    except ValueError as e:
      raise ValueError(f"{what} does not fit the students' network: {e}") from e
  from sid_jax.models import official  # reads official pickles; imported only when needed
  family = "edm2" if spec["class_name"] in models.EDM2_CLASSES else "edm"
  _, params, _ = official.read_official(family, path, key=s.init_generator_key)
  checkpoints.check_tree_matches(params, abstract_params, what=what)
  return params


class PairFeed:
  """The step's batch from a real-data feed: {'fake': one batch {'images', 'labels'}, 'gen':
  {'labels'} of the next one} (the official loop draws one real batch for each update; the
  generator step uses only its labels; unconditional runs read one batch per iteration)."""

  def __init__(self, feed, conditional: bool):
    self.feed, self.conditional = feed, conditional

  def next(self) -> dict:
    fake = self.feed.next()
    gen = {"labels": self.feed.next()["labels"]} if self.conditional else {}
    return {"fake": fake, "gen": gen}

  def abstract(self) -> dict:
    a = self.feed.abstract()
    return {"fake": a, "gen": {"labels": a["labels"]} if self.conditional else {}}

  def state(self) -> dict:
    return self.feed.state()

  def restore(self, state: dict) -> None:
    self.feed.restore(state)


def sida_losses(config) -> tuple[losses.SiDAFakeLoss, losses.SiDAGeneratorLoss]:
  """SiDA's losses: SiD's noise levels and scales (`sid.sid_losses`) plus config.sida's."""
  fake, gen = sid.sid_losses(config)
  s = config.sida
  group = int(s.adv_group_size)
  fake_loss = losses.SiDAFakeLoss(levels=fake.levels, weight=fake.weight,
                                  loss_scale=fake.loss_scale, adv_scale=float(s.adv_loss_scale),
                                  group_size=group, use_logvar=fake.use_logvar)
  gen_loss = losses.SiDAGeneratorLoss(levels=gen.levels, alpha=gen.alpha,
                                      loss_scale=gen.loss_scale,
                                      gan_scale=float(s.gan_loss_scale), group_size=group,
                                      use_logvar=gen.use_logvar,
                                      gan_start_nimg=float(s.gan_start_kimg) * 1000)
  return fake_loss, gen_loss


def make_real_feed(config, mesh, num_micro: int, micro_batch: int, abstract: bool = False):
  """The real-data feed of `sid_jax.data.real` (the grain pipeline) for config.data."""
  try:
    from sid_jax.data import real  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("SiDA needs real images, but sid_jax.data.real (the real-data pipeline) "
                      f"cannot be imported: {e}") from e
  feed = real.make_feed(config, mesh, num_micro, micro_batch, abstract)
  if feed is None:
    raise ValueError("SiDA needs real images: set config.data.source (e.g. 'edm_zip' with "
                     "config.data.path, or 'digits').")
  return feed


def assemble(config, abstract: bool = False) -> base.Assembly:
  """SiDA's assembly (SiD²A with config.sida.init_generator); with `abstract`, parameters are
  shapes only (for `sid_jax.plan`)."""
  a = sid.assemble(config, abstract=abstract)
  fake_loss, gen_loss = sida_losses(config)
  hyper = base.hyper_from_config(
      config, generator_frozen_nimg=float(config.sida.generator_frozen_kimg) * 1000)
  generator_init = None
  if config.sida.init_generator and not abstract:
    d = config.data
    shapes = models.abstract_params(a.student, (d.resolution, d.resolution, d.channels),
                                    d.label_dim)
    generator_init = jax.device_get(load_generator(config, a.spec, shapes))
  conditional = config.data.label_dim > 0

  def make_feed(mesh, num_micro, micro_batch, abstract=False):
    return PairFeed(make_real_feed(config, mesh, num_micro, micro_batch, abstract), conditional)

  return dataclasses.replace(a, fake_loss=fake_loss, generator_loss=gen_loss, hyper=hyper,
                             project_fake=False, make_feed=make_feed,
                             generator_init_params=generator_init)
