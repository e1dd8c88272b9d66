"""The embedded default: SiD-distil the shipped digits teacher into a one-step generator.

  python -m sid_jax.main --config=configs/digits_sid.py --workdir=runs/digits_sid

The teacher (sid_jax/assets/digits_teacher) is a class-conditional EDM SongUNet trained on
scikit-learn's 8x8 digits with configs/digits_teacher.py. Generator and fake score start as copies
of it (spec §1.1). At the end the workdir holds metric_table.md / .json: real digits, the teacher
with EDM's Heun sampler, and the one-step generator before and after distillation, compared by the
Fréchet distance in the feature space of the shipped digits classifier and by that classifier's
accuracy on the requested class.
"""

import os

from sid_jax import config_base

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sid_jax")
TEACHER = os.path.join(PACKAGE, "assets", "digits_teacher")


def get_config(arg=None):
  arg = config_base.parse_arg(arg, tiny=False)
  c = config_base.base_config()
  c.data.resolution = 8
  c.data.channels = 1
  c.data.label_dim = 10
  c.teacher.type = "network"
  c.teacher.checkpoint = TEACHER
  c.model.init_from = "teacher"

  c.sid.alpha = 1.2
  c.optim.fake_lr = 1e-4
  c.optim.gen_lr = 1e-4
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
    c.checkpoint.every_steps = 2
    c.log.every_steps = 2
    c.log.sample_every_steps = 4
    c.eval.every_steps = 4
    c.eval.batch = 128
    c.eval.teacher_heun_steps = 2
  return c
