"""SiD on the official EDM teachers, with the paper's hyper-parameters (spec §8.1).

  python -m sid_jax.main --config=configs/sid_edm.py:dataset=cifar10_cond --workdir=runs/c10c \
      --config.teacher.checkpoint=teachers/cifar10-cond

`dataset` is one of (official teacher, to convert with
`python -m sid_jax.convert edm --src NAME --dst DIR`):

| dataset        | official teacher                 | network, data                       |
|----------------|----------------------------------|-------------------------------------|
| cifar10_uncond | edm-cifar10-32x32-uncond-vp.pkl  | DDPM++, 32x32, unconditional        |
| cifar10_cond   | edm-cifar10-32x32-cond-vp.pkl    | DDPM++, 32x32, 10 classes           |
| imagenet64     | edm-imagenet-64x64-cond-adm.pkl  | ADM, 64x64, 1000 classes            |
| ffhq64         | edm-ffhq-64x64-uncond-vp.pkl     | DDPM++, 64x64, unconditional        |
| afhqv2_64      | edm-afhqv2-64x64-uncond-vp.pkl   | DDPM++, 64x64, unconditional        |

published at https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/<name>. Generator and fake score
start as copies of the teacher (spec §1.1); the architecture, dropout and augment_dim come from the
converted checkpoint (`config.model` only documents them). The run length is the paper's
`duration` (Mimg) over the global batch. `micro_batch` = batch / (official accumulation rounds) =
4 GPUs x batch_gpu, so the number of rounds is the official one; with more devices than
`micro_batch` allows (it must be divisible by the batch shards), raise it with
`--config.training.micro_batch=...` (fewer rounds, more memory per device).
`--config.model.compute_dtype=bfloat16`: teacher and students in bf16 with float32 weights.

`:dataset=...,tiny` keeps the method (alpha, Adam lr/betas/eps, EMA, augmentation and the
networks' augment_dim, dropout, loss scales) on an 8x8 random teacher of the same architecture
family (teacher type 'random', no files; at most 10 classes), with a batch of 16 in one
accumulation round and 3 steps: it runs the real code path on a CPU, for tests and smoke runs
only.

  python -m sid_jax.main --config=configs/sid_edm.py:dataset=cifar10_cond,tiny --workdir=/tmp/t
"""

import math

from sid_jax import config_base

TEACHER_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"

# EDM's `--arch ddpmpp` and `--arch adm` network kwargs (NVlabs/edm train.py), as stored in the
# teacher pickles; augment_dim 9 where the teacher was trained with augmentation.
_DDPMPP = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard",
               decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1],
               model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16],
               dropout=0.13, augment_dim=9)
_ADM = dict(model_type="DhariwalUNet", model_channels=192, channel_mult=[1, 2, 3, 4],
            num_blocks=3, attn_resolutions=[32, 16, 8], dropout=0.10)

# Spec §8.1 (`main/run_sid.sh`): batch = global batch, batch_gpu = per-GPU micro-batch on the
# official 4 GPUs; eps 1e-6 for the fp16 runs; duration and ema (half-life) in Mimg; lr = glr.
DATASETS = {
    "cifar10_uncond": dict(
        teacher="edm-cifar10-32x32-uncond-vp.pkl", resolution=32, label_dim=0,
        arch=dict(_DDPMPP, dropout=0.13), alpha=1.2, batch=256, batch_gpu=16, lr=1e-5,
        gen_b1=0.0, fp16=False, augment_p=0.12, ema_mimg=0.5, duration_mimg=500, tick_kimg=10),
    "cifar10_cond": dict(
        teacher="edm-cifar10-32x32-cond-vp.pkl", resolution=32, label_dim=10,
        arch=dict(_DDPMPP, dropout=0.13), alpha=1.2, batch=256, batch_gpu=16, lr=1e-5,
        gen_b1=0.0, fp16=False, augment_p=0.12, ema_mimg=0.5, duration_mimg=800, tick_kimg=10),
    "imagenet64": dict(
        teacher="edm-imagenet-64x64-cond-adm.pkl", resolution=64, label_dim=1000,
        arch=dict(_ADM), alpha=1.2, batch=8192, batch_gpu=16, lr=4e-6, gen_b1=0.0,
        fp16=True, augment_p=0.0, ema_mimg=2.0, duration_mimg=1000, tick_kimg=20),
    "ffhq64": dict(
        teacher="edm-ffhq-64x64-uncond-vp.pkl", resolution=64, label_dim=0,
        arch=dict(_DDPMPP, channel_mult=[1, 2, 2, 2], dropout=0.05), alpha=1.2,
        batch=512, batch_gpu=32, lr=1e-5, gen_b1=0.9, fp16=True, augment_p=0.15,
        ema_mimg=0.5, duration_mimg=500, tick_kimg=10),
    "afhqv2_64": dict(
        teacher="edm-afhqv2-64x64-uncond-vp.pkl", resolution=64, label_dim=0,
        arch=dict(_DDPMPP, channel_mult=[1, 2, 2, 2], dropout=0.05), alpha=1.0,
        batch=512, batch_gpu=32, lr=5e-6, gen_b1=0.0, fp16=True, augment_p=0.15,
        ema_mimg=0.5, duration_mimg=500, tick_kimg=10),
}

OFFICIAL_GPUS = 4  # micro_batch = 4 x batch_gpu gives the official number of accumulation rounds
SNAPSHOT_TICKS = 50  # official --snap: sample grid + snapshot every 50 ticks


def tiny_arch(arch: dict) -> dict:
  """The same architecture at test size: 2 levels of 16 and 32 channels, 1 block each.

  No attention blocks besides the decoder's first block at the lowest resolution, which DDPM++
  always builds with attention (one head). ADM's has none at this size: its attention uses a
  hard-coded 64 channels per head, more than the 32 channels there.
  """
  return dict(arch, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])


def get_config(arg=None):
  arg = config_base.parse_arg(arg, dataset="", tiny=False)
  if arg.dataset not in DATASETS:
    raise ValueError(f"configs/sid_edm.py needs dataset=NAME with NAME one of {sorted(DATASETS)}, "
                     f"got {arg.dataset!r}.")
  p = DATASETS[arg.dataset]
  c = config_base.base_config()
  c.data.resolution = p["resolution"]
  c.data.channels = 3
  c.data.label_dim = p["label_dim"]

  c.teacher.type = "network"
  c.teacher.checkpoint = ""  # the converted teacher: --config.teacher.checkpoint=DIR
  c.teacher.official_name = p["teacher"]
  c.teacher.official_url = TEACHER_URL + p["teacher"]
  c.model.init_from = "teacher"
  # The teacher's architecture (the network of teacher type 'random'); with init_from='teacher'
  # the students copy the converted checkpoint's own spec except SiD's own settings
  # (models.STUDENT_SETTINGS: the dropout, spec §4.7), which come from here.
  c.model.class_name = "EDMPrecond"
  c.model.kwargs = dict(p["arch"], use_fp16=p["fp16"])

  c.sid.alpha = p["alpha"]
  c.sid.sigma_init = 2.5
  c.sid.tmax = 800.0
  c.sid.p_mean = -1.2
  c.sid.p_std = 1.2
  c.sid.gen_loss_scale = 100.0
  c.sid.fake_loss_scale = 1.0
  c.sid.use_logvar = False
  c.sid.augment_p = p["augment_p"]

  c.optim.fake_lr = p["lr"]
  c.optim.gen_lr = p["lr"]
  c.optim.fake_b1 = 0.0
  c.optim.gen_b1 = p["gen_b1"]
  c.optim.b2 = 0.999
  c.optim.eps = 1e-6 if p["fp16"] else 1e-8  # the official fp16 runs use Adam eps 1e-6

  c.ema.halflife_kimg = p["ema_mimg"] * 1000.0
  c.ema.rampup = 0.05

  batch = p["batch"]
  c.training.global_batch = batch
  c.training.micro_batch = OFFICIAL_GPUS * p["batch_gpu"]
  c.training.num_steps = math.ceil(p["duration_mimg"] * 1e6 / batch)  # official: until >= duration

  # Cadence in images, as the official ticks: log every tick, grids and checkpoints every snapshot.
  tick = max(1, round(p["tick_kimg"] * 1000 / batch))
  snapshot = max(1, round(SNAPSHOT_TICKS * p["tick_kimg"] * 1000 / batch))
  c.log.every_steps = tick
  c.log.sample_every_steps = snapshot
  # In-loop FID as the official runs (fid50k_full at every snapshot) once the detector and the
  # dataset's reference statistics are given:
  #   --config.eval.inception=pt_inception-2015-12-05-6726825d.pth --config.eval.ref=REF.npz
  # Without them the loop writes sample grids only. The best-FID state is kept in
  # WORKDIR/checkpoints_best.
  c.eval.every_steps = snapshot
  c.eval.protocol = "sid-fid50k-full"
  c.eval.num_samples = 50_000
  c.eval.batch = 256
  c.checkpoint.every_steps = snapshot
  c.checkpoint.keep = 3
  c.log.grid_columns = 8

  if arg.tiny:
    # For tests and smoke runs only: an 8x8 random teacher of the same family, no files.
    c.teacher.type = "random"
    c.teacher.official_name = ""
    c.teacher.official_url = ""
    c.data.resolution = 8
    # 1000 ImageNet classes would make every sample grid 1000 rows tall.
    c.data.label_dim = min(p["label_dim"], 10)
    c.model.kwargs = tiny_arch(dict(c.model.kwargs))
    config_base.tiny_schedule(c, batch=16)
  return c
