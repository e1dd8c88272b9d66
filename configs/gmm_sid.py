"""SiD on an analytic teacher: a 10-component Gaussian mixture of 8x8 grey images.

The teacher's denoiser is exact (closed form), so the distilled one-step generator can be judged
against the true distribution: the Fréchet distance to the mixture's exact moments and the share
of samples that land on the requested component are written to WORKDIR/metrics.jsonl.

  python -m sid_jax.main --config=configs/gmm_sid.py --workdir=/tmp/gmm_sid
  python -m sid_jax.main --config=configs/gmm_sid.py:tiny --workdir=/tmp/gmm_tiny
"""

from sid_jax import config_base


def get_config(arg=None):
  arg = config_base.parse_arg(arg, tiny=False)
  c = config_base.base_config()
  c.data.resolution = 8
  c.data.channels = 1
  c.data.label_dim = 10

  c.teacher.type = "gmm"
  c.teacher.gmm.num_components = 10
  c.teacher.gmm.std = 0.1
  c.teacher.gmm.seed = 0

  # Generator and fake score: a small DDPM++ SongUNet, both starting from the same random init.
  c.model.init_from = "scratch"
  c.model.class_name = "EDMPrecond"
  c.model.kwargs = dict(model_type="SongUNet", model_channels=32, channel_mult=[1, 2],
                        num_blocks=1, attn_resolutions=[], dropout=0.0, embedding_type="positional",
                        encoder_type="standard", decoder_type="standard", resample_filter=[1, 1],
                        channel_mult_noise=1)

  c.sid.alpha = 1.2
  c.optim.fake_lr = 1e-3
  c.optim.gen_lr = 1e-4
  c.ema.halflife_kimg = 20.0

  c.training.global_batch = 128
  c.training.micro_batch = 128
  c.training.num_steps = 400
  c.checkpoint.every_steps = 200
  c.log.every_steps = 100
  c.log.sample_every_steps = 100
  c.eval.every_steps = 100
  c.eval.num_samples = 2048
  c.eval.batch = 512

  if arg.tiny:
    c.model.kwargs = dict(c.model.kwargs, model_channels=16)
    c.training.global_batch = 32
    c.training.micro_batch = 16
    c.training.num_steps = 6
    c.checkpoint.every_steps = 3
    c.log.every_steps = 2
    c.log.sample_every_steps = 4
    c.eval.every_steps = 4
    c.eval.num_samples = 256
    c.eval.batch = 128
  return c
