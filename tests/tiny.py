"""Small pieces shared by tests: a tiny conditional conv net and a SiD setup around it."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from sid_jax import denoisers, generators, losses, optim, steps


class TinyNet(nn.Module):
  """F(x, c_noise, labels): two 3x3 convs with noise/label conditioning and dropout."""
  channels: int = 8
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, noise_labels, class_labels, augment_labels=None, *, train=False):
    emb = nn.Dense(self.channels)(jnp.stack([jnp.sin(noise_labels), jnp.cos(noise_labels)], -1))
    if class_labels is not None:
      emb = emb + nn.Dense(self.channels, use_bias=False)(class_labels)
    h = nn.Conv(self.channels, (3, 3))(x) + emb[:, None, None, :]
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    return nn.Conv(x.shape[-1], (3, 3))(h)


def make_setup(*, label_dim=3, global_batch=8, micro_batch=8, shape=(4, 4, 1), dropout=0.0,
               draw_sharding=None, teacher_std=0.3):
  net = denoisers.NetworkDenoiser(TinyNet(dropout=dropout), denoisers.EDMPreconditioning(),
                                  label_dim=label_dim)
  teacher = denoisers.GaussianMixtureDenoiser(std=teacher_std)
  teacher_params = teacher.make_params(0, max(label_dim, 2), shape)
  setup = steps.SiDSetup(
      teacher=teacher, fake_score=net, generate=generators.one_step(net, 2.5),
      fake_loss=losses.DSMLoss(), generator_loss=losses.SiDGeneratorLoss(), image_shape=shape,
      label_dim=label_dim, global_batch=global_batch, micro_batch=micro_batch,
      hyper=steps.SiDHyper(ema_halflife_kimg=0.05),
      generator_tx=optim.adam(1e-3, 0.0, 0.999, 1e-8),
      fake_tx=optim.adam(1e-3, 0.0, 0.999, 1e-8),
      draw_sharding=draw_sharding)
  x = jnp.zeros((2,) + shape)
  labels = jnp.zeros((2, label_dim)) if label_dim else None
  params = net.init(jax.random.key(1), x, labels)
  return setup, teacher_params, params
