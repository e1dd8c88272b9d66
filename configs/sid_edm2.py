"""SiD on the EDM2 ImageNet-512 teachers (SD-VAE latents), the paper's hyper-parameters (§8.4).

  python -m sid_jax.main --config=configs/sid_edm2.py:size=xs --workdir=runs/edm2_xs \
      --config.teacher.checkpoint=teachers/edm2-img512-xs

`size` is one of xs, s, m, l, xl, xxl. The teachers are EDM2's unguided post-hoc EMA
reconstructions (spec §7.1), published at
https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/<name>:

| size | official teacher (convert with `python -m sid_jax.convert edm2 --src NAME --dst DIR`) |
|------|--------------------------------------------------------------------------------------|
| xs   | edm2-img512-xs-2147483-0.135.pkl                                                     |
| s    | edm2-img512-s-2147483-0.130.pkl                                                      |
| m    | edm2-img512-m-2147483-0.100.pkl                                                      |
| l    | edm2-img512-l-1879048-0.085.pkl                                                      |
| xl   | edm2-img512-xl-1342177-0.085.pkl                                                     |
| xxl  | edm2-img512-xxl-0939524-0.070.pkl                                                    |

Common to all sizes (`run_sid_edm2.sh`): lr = glr = 5e-5, Adam betas (0, 0.999) and eps 1e-6
(fp16 runs), global batch 2048, alpha 1, EMA half-life 2 Mimg, no augmentation, the fake-score
noise lognormal(-0.4, 1.0), EDM2's learned log-variance dividing every loss (`use_logvar`), loss
scales 1 (fake) / 100 (generator), and forced weight normalisation of the generator and the fake
score (spec §7.2). The data are 4x64x64 normalised SD-VAE latents with 1000 ImageNet classes;
the distillation itself never decodes them. Sample grids, in-loop evaluation, the exported
generator and `sid_jax.sample` decode them to 512x512 images with EDM2's VAE,
stabilityai/sd-vae-ft-mse, and EDM2's latent normalisation (spec §7.4):

  python -m sid_jax.convert vae --src sd-vae-ft-mse --dst vaes/sd-vae-ft-mse
  ... --config.decoder.vae=vaes/sd-vae-ft-mse

Without `--config.decoder.vae` (default '') grids show the raw latents' first three channels.

`micro_batch` = 2048 / (official accumulation rounds) = 4 GPUs x batch_gpu; with more devices
than it allows (it must be divisible by the batch shards), raise it with
`--config.training.micro_batch=...`.
`--config.model.compute_dtype=bfloat16`: bf16 where the official code uses fp16; default float32.

`:size=...,tiny` keeps the method on an 8x8x4 random EDM2 teacher (`Precond` with a log-variance
head, the size's dropout; teacher type 'random', no files), 10 classes instead of 1000, a batch of
16 in one accumulation round, 3 steps, and a tiny random VAE decoding the latents to 16x16
images: for tests and smoke runs only.

  python -m sid_jax.main --config=configs/sid_edm2.py:size=xs,tiny --workdir=/tmp/t
"""

import math

from sid_jax import config_base

TEACHER_URL = "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/"

# Spec §7.1 / §8.4: teacher pickle, model_channels, dropout, batch_gpu (per-GPU micro-batch on
# the official 4 GPUs), SiD duration in Mimg.
SIZES = {
    "xs": dict(teacher="edm2-img512-xs-2147483-0.135.pkl", model_channels=128, dropout=0.0,
               batch_gpu=64, duration_mimg=200),
    "s": dict(teacher="edm2-img512-s-2147483-0.130.pkl", model_channels=192, dropout=0.0,
              batch_gpu=64, duration_mimg=200),
    "m": dict(teacher="edm2-img512-m-2147483-0.100.pkl", model_channels=256, dropout=0.10,
              batch_gpu=32, duration_mimg=200),
    "l": dict(teacher="edm2-img512-l-1879048-0.085.pkl", model_channels=320, dropout=0.10,
              batch_gpu=32, duration_mimg=200),
    "xl": dict(teacher="edm2-img512-xl-1342177-0.085.pkl", model_channels=384, dropout=0.10,
               batch_gpu=16, duration_mimg=200),
    "xxl": dict(teacher="edm2-img512-xxl-0939524-0.070.pkl", model_channels=448, dropout=0.10,
                batch_gpu=2, duration_mimg=100),
}

BATCH = 2048
OFFICIAL_GPUS = 4  # micro_batch = 4 x batch_gpu gives the official number of accumulation rounds
LR = 5e-5
EMA_MIMG = 2.0
TICK_KIMG = 10
SNAPSHOT_TICKS = 50


def edm2_arch(model_channels: int, dropout: float) -> dict:
  """EDM2's `Precond` kwargs for ImageNet-512 (`training/networks_edm2.py` defaults)."""
  return dict(use_fp16=True, sigma_data=0.5, logvar_channels=128, model_channels=model_channels,
              channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[16, 8],
              channels_per_head=64, label_balance=0.5, concat_balance=0.5, res_balance=0.3,
              attn_balance=0.3, clip_act=256, dropout=dropout)


def tiny_arch(arch: dict) -> dict:
  """The same network at test size: 2 levels of 16 and 32 channels, 1 block each.

  No attention blocks besides the decoder's first block at the lowest resolution, which EDM2
  always builds with attention (one head of 32 channels here).
  """
  return dict(arch, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[],
              channels_per_head=32, logvar_channels=16)


def get_config(arg=None):
  arg = config_base.parse_arg(arg, size="", tiny=False)
  if arg.size not in SIZES:
    raise ValueError(f"configs/sid_edm2.py needs size=NAME with NAME one of {list(SIZES)}, "
                     f"got {arg.size!r}.")
  p = SIZES[arg.size]
  c = config_base.base_config()
  c.data.resolution = 64  # latents of 512x512 images
  c.data.channels = 4
  c.data.label_dim = 1000

  c.teacher.type = "network"
  c.teacher.checkpoint = ""  # the converted teacher: --config.teacher.checkpoint=DIR
  c.teacher.official_name = p["teacher"]
  c.teacher.official_url = TEACHER_URL + p["teacher"]
  c.model.init_from = "teacher"
  # The teacher's architecture (the network of teacher type 'random'); with init_from='teacher'
  # the students copy the converted checkpoint's own spec except SiD's own settings
  # (models.STUDENT_SETTINGS: the dropout, spec §4.7), which come from here.
  c.model.class_name = "Precond"
  c.model.kwargs = edm2_arch(p["model_channels"], p["dropout"])

  c.sid.alpha = 1.0
  c.sid.sigma_init = 2.5
  c.sid.tmax = 800.0
  c.sid.p_mean = -0.4
  c.sid.p_std = 1.0
  c.sid.gen_loss_scale = 100.0
  c.sid.fake_loss_scale = 1.0
  c.sid.use_logvar = True
  c.sid.force_normalization = True
  c.sid.augment_p = 0.0

  c.optim.fake_lr = LR
  c.optim.gen_lr = LR
  c.optim.fake_b1 = 0.0
  c.optim.gen_b1 = 0.0
  c.optim.b2 = 0.999
  c.optim.eps = 1e-6  # fp16 runs

  c.ema.halflife_kimg = EMA_MIMG * 1000.0
  c.ema.rampup = 0.05

  c.training.global_batch = BATCH
  c.training.micro_batch = OFFICIAL_GPUS * p["batch_gpu"]
  c.training.num_steps = math.ceil(p["duration_mimg"] * 1e6 / BATCH)  # official: until >= duration

  tick = max(1, round(TICK_KIMG * 1000 / BATCH))
  snapshot = max(1, round(SNAPSHOT_TICKS * TICK_KIMG * 1000 / BATCH))
  c.log.every_steps = tick
  c.log.sample_every_steps = snapshot
  c.eval.every_steps = snapshot  # evaluation kind 'none' for network teachers: grids only
  c.checkpoint.every_steps = snapshot
  c.checkpoint.keep = 3
  c.log.grid_columns = 8

  if arg.tiny:
    # For tests and smoke runs only: an 8x8x4 random EDM2 teacher, no files.
    c.teacher.type = "random"
    c.teacher.official_name = ""
    c.teacher.official_url = ""
    c.data.resolution = 8
    c.data.label_dim = 10  # 1000 classes would make every sample grid 1000 rows tall
    c.model.kwargs = tiny_arch(dict(c.model.kwargs))
    c.decoder.vae = "random"
    config_base.tiny_schedule(c, batch=16)
  return c
