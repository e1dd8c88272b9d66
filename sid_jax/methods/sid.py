"""SiD on EDM / EDM2 / analytic teachers (spec §1-§4, §7): the losses from config.sid, the
students from the teacher or config.model, EDM augmentation and EDM2 weight projection."""

from __future__ import annotations

import jax

from sid_jax import augment, checkpoints, generators, losses, models
from sid_jax.methods import base
from sid_jax.models import latent_decoder
from sid_jax.nets import edm2


def sid_losses(config) -> tuple[losses.DSMLoss, losses.SiDGeneratorLoss]:
  """The fake-score and generator losses from config.sid: the one place where SiD's noise-level
  settings are read."""
  s = config.sid
  fake = losses.DSMLoss(levels=losses.LognormalLevels(p_mean=s.p_mean, p_std=s.p_std),
                        weight=losses.EDMWeight(s.sigma_data), loss_scale=s.fake_loss_scale,
                        use_logvar=s.use_logvar)
  gen = losses.SiDGeneratorLoss(
      levels=losses.TmaxLevels(tmax=s.tmax, sigma_min=s.sigma_min, sigma_max=s.sigma_max,
                               rho=s.rho),
      alpha=s.alpha, loss_scale=s.gen_loss_scale, use_logvar=s.use_logvar)
  return fake, gen


def assemble(config, abstract: bool = False) -> base.Assembly:
  """SiD's assembly; with `abstract`, parameters are shapes only (for `sid_jax.plan`)."""
  teacher = models.build_teacher(config, abstract=abstract)
  student, params, spec = models.build_students(config, teacher, jax.random.key(config.seed + 1),
                                                abstract=abstract)
  d = config.data
  augment_pipe = None
  if config.sid.augment_p > 0:
    aug_dim = getattr(student.module, "augment_dim", 0)
    if aug_dim != 9:
      raise ValueError(f"config.sid.augment_p={config.sid.augment_p} needs networks with "
                       f"augment_dim=9, but this one has augment_dim={aug_dim}.")
    augment_pipe = augment.sid_augment_pipe(config.sid.augment_p)
  project = edm2.project_mpconv_weights if config.sid.get("force_normalization", False) else None
  fake_loss, gen_loss = sid_losses(config)
  image_shape = (d.resolution, d.resolution, d.channels)
  sigma_init = float(config.sid.sigma_init)

  # EDM2: latents decoded to pixels by the SD VAE (none for plans, which generate nothing).
  decoder = None if abstract else latent_decoder.from_config(config)
  if decoder is not None:
    decoder.image_shape(image_shape)  # the VAE takes these latents (raises otherwise)

  def make_generator(mesh):
    return generators.ClassGenerator(student, None, sigma_init=sigma_init,
                                     image_shape=image_shape, label_dim=d.label_dim, mesh=mesh,
                                     decoder=decoder)

  def export(params, directory, step):
    record = {} if decoder is None else {"decoder": decoder.record()}
    checkpoints.save_network(directory, params,
                             dict(spec, sigma_init=sigma_init, step=step, **record))
    if decoder is not None:
      decoder.save(directory)

  return base.Assembly(
      teacher=teacher, student=student, init_params=params, spec=spec, sigma_init=sigma_init,
      fake_loss=fake_loss, generator_loss=gen_loss, hyper=base.hyper_from_config(config),
      image_shape=image_shape, label_dim=d.label_dim, make_generator=make_generator,
      sampling_params=lambda g, frozen: g, export=export, project=project, augment=augment_pipe)
