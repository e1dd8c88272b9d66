"""Trains the digits demo's teacher: a class-conditional EDM (DDPM++ SongUNet) on scikit-learn's
8x8 handwritten digits (scaled to [-1, 1], native 8x8 resolution, no padding).

The shipped teacher (sid_jax/assets/digits_teacher) was made with

  python -m sid_jax.main --config=configs/digits_teacher.py --workdir=runs/digits_teacher \
      --config.teacher_training.export_dir=sid_jax/assets/digits_teacher
"""

from sid_jax import config_base


def digits_model_kwargs():
  """The teacher's architecture (also the generator's and fake score's in configs/digits_sid.py)."""
  return dict(model_type="SongUNet", model_channels=32, channel_mult=[1, 2], num_blocks=1,
              attn_resolutions=[4], dropout=0.1, embedding_type="positional",
              encoder_type="standard", decoder_type="standard", resample_filter=[1, 1],
              channel_mult_noise=1)


def get_config(arg=None):
  arg = config_base.parse_arg(arg, tiny=False)
  c = config_base.base_config()
  c.job = "train_teacher"
  c.data.resolution = 8
  c.data.channels = 1
  c.data.label_dim = 10
  c.model.class_name = "EDMPrecond"
  c.model.kwargs = digits_model_kwargs()
  c.teacher_training.dataset = "digits"
  c.teacher_training.batch = 128
  c.teacher_training.num_steps = 3000
  c.teacher_training.lr = 2e-3
  c.teacher_training.warmup_steps = 500
  c.teacher_training.ema_halflife_kimg = 50.0
  c.checkpoint.every_steps = 1000
  c.log.every_steps = 500
  if arg.tiny:
    c.model.kwargs = dict(c.model.kwargs, model_channels=16, attn_resolutions=[])
    c.teacher_training.batch = 16
    c.teacher_training.num_steps = 4
    c.teacher_training.warmup_steps = 2
    c.checkpoint.every_steps = 2
    c.log.every_steps = 2
  return c
