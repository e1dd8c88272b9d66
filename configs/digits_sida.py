"""SiDA / SiD²A on the shipped digits teacher: SiD plus an adversarial loss on the real digits.

  python -m sid_jax.main --config=configs/digits_sida.py --workdir=runs/digits_sida
  python -m sid_jax.main --config=configs/digits_sida.py:sid2a=runs/digits_sid/generator \
      --workdir=runs/digits_sid2a

As configs/digits_sid.py (teacher, batch, learning rates, EMA, evaluation), with the method
'sida' (sid_jax/methods/sida.py; spec §6): the fake score network's encoder is the
discriminator, trained on the real digits of `config.data` (the grain pipeline,
sid_jax/data/real.py) next to its score-matching loss; alpha = 1 as in every released SiDA run;
fake-score gradients value-clipped at +-1 (SiDA-EDM). The adversarial BCE means run over the
whole micro-batch (`adv_group_size`). The warm-up is scaled to the demo's 51k images: the
generator is frozen for the first 5k images and trained with SiD alone up to 10k (the paper's
configurations: 100k and 200k). `sid2a=DIR` starts generator and EMA from a SiD generator (a
digits_sid run's WORKDIR/generator or its workdir), the fake score from the teacher (SiD²A).
"""

import os

from sid_jax import config_base
from sid_jax.methods import sida

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sid_jax")
TEACHER = os.path.join(PACKAGE, "assets", "digits_teacher")


def get_config(arg=None):
  arg = config_base.parse_arg(arg, tiny=False, sid2a="")
  c = config_base.base_config()
  c.method = "sida"
  c.data.resolution = 8
  c.data.channels = 1
  c.data.label_dim = 10
  c.data.source = "digits"  # real images for the discriminator (sid_jax/data/real.py)
  c.teacher.type = "network"
  c.teacher.checkpoint = TEACHER
  c.model.init_from = "teacher"

  c.sid.alpha = 1.0
  c.sida = sida.config_section()
  c.sida.adv_loss_scale = 1.0
  c.sida.gan_loss_scale = 0.01
  c.sida.generator_frozen_kimg = 5.0
  c.sida.gan_start_kimg = 10.0
  c.sida.init_generator = arg.sid2a
  c.sida.sid2a = bool(arg.sid2a)
  c.optim.fake_lr = 1e-4
  c.optim.gen_lr = 1e-4
  c.optim.fake_clip_value = 1.0
  c.ema.halflife_kimg = 10.0

  c.training.global_batch = 64
  c.training.micro_batch = 64
  c.training.num_steps = 800
  c.checkpoint.every_steps = 200
  c.log.every_steps = 50
  c.log.sample_every_steps = 200
  c.log.grid_columns = 10
  c.eval.kind = "digits"
  c.eval.every_steps = 200
  c.eval.batch = 256
  c.eval.teacher_heun_steps = 18
  if arg.tiny:
    c.training.global_batch = 16
    c.training.micro_batch = 8
    c.training.num_steps = 4
    # Step 0 frozen, the SiD term alone at step 1, both terms from step 2 on.
    c.sida.generator_frozen_kimg = 0.0
    c.sida.gan_start_kimg = 0.016
    c.checkpoint.every_steps = 2
    c.log.every_steps = 2
    c.log.sample_every_steps = 4
    c.eval.every_steps = 4
    c.eval.batch = 128
    c.eval.teacher_heun_steps = 2
  c.sida.adv_group_size = c.training.micro_batch
  return c
