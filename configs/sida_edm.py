"""SiDA and SiD²A on the official EDM teachers, with the paper's hyper-parameters (spec §8.2, §8.3).

  python -m sid_jax.main --config=configs/sida_edm.py:dataset=cifar10_cond --workdir=runs/c10c \
      --config.teacher.checkpoint=teachers/cifar10-cond --config.data.path=cifar10-32x32.zip
  python -m sid_jax.main --config=configs/sida_edm.py:dataset=cifar10_cond,sid2a \
      --workdir=runs/c10c_sid2a --config.teacher.checkpoint=teachers/cifar10-cond \
      --config.data.path=cifar10-32x32.zip --config.sida.init_generator=runs/c10c_sid/generator

SiDA (`sida/run_sida.sh`) is SiD with an adversarial loss on real images; the discriminator is the
fake score network's own encoder (sid_jax/methods/sida.py). SiD²A (`sida/run_sid_sida.sh`) is
the same run with the generator and its EMA starting from a SiD generator: a sid_jax SiD run's
workdir or generator/ export, or the official one (the `.pkl` in the table below, read directly).

`dataset` is one of (teacher: as configs/sid_edm.py; real data: the zip EDM's dataset_tool.py
makes, read lazily by sid_jax/data/real.py, `--config.data.path=ZIP`):

| dataset        | real data zip          | SiD²A starts from (huggingface.co/UT-Austin-PML/SiD/resolve/main/) |
|----------------|------------------------|-------------------------------------------------------------|
| cifar10_uncond | cifar10-32x32.zip      | cifar10-uncond/alpha1.2/network-snapshot-1.200000-403968.pkl |
| cifar10_cond   | cifar10-32x32.zip      | cifar10-cond/alpha1.2/network-snapshot-1.200000-713312.pkl   |
| imagenet64     | imagenet-64x64.zip     | imagenet64/alpha1.2/network-snapshot-1.200000-939176.pkl     |
| ffhq64         | ffhq-64x64.zip         | ffhq64/alpha1.2/network-snapshot-1.200000-498176.pkl         |
| afhqv2_64      | afhqv2-64x64.zip       | afhq64/alpha1/network-snapshot-1.000000-371712.pkl           |

Common to all (spec §8.2): alpha 1, loss scales 1 (fake score), 100 (generator SiD term), 1
(discriminator, `sida.adv_loss_scale`) and 0.01 (generator GAN term, `sida.gan_loss_scale`),
generator Adam beta1 0 (FFHQ included), the fake score's gradients value-clipped at +-1, the
generator frozen for the first 100k images and trained with SiD alone up to 200k. The
adversarial BCE means run over groups of the official per-GPU batch (`sida.adv_group_size` =
`batch_gpu`), so the discriminator loss is the official one on any device layout; `micro_batch`
is 4 x batch_gpu as in configs/sid_edm.py. Durations: SiDA 300 Mimg (CIFAR-10, ImageNet 64) or
200 (FFHQ, AFHQv2); SiD²A 100 Mimg. The best-FID state is kept in WORKDIR/checkpoints_best (the
official `--save_best_and_last 1`) when --config.eval.inception and --config.eval.ref are given.

`:dataset=...,tiny` (with or without `sid2a`) keeps the method on configs/sid_edm.py's 8x8 random
teacher, with scikit-learn's digits repeated to 3 channels as the real data (no files; give a
zip with --config.data.source=edm_zip --config.data.path=...), groups of 8 in a batch of 16,
and the warm-up shrunk so that 3 steps pass through all three phases (frozen, SiD only, SiD +
GAN): for tests and smoke runs only. The tiny SiD²A variant needs a SiD generator of the same
tiny network, e.g. the export of `configs/sid_edm.py:dataset=...,tiny`:

  python -m sid_jax.main --config=configs/sid_edm.py:dataset=cifar10_cond,tiny --workdir=/tmp/s
  python -m sid_jax.main --config=configs/sida_edm.py:dataset=cifar10_cond,sid2a,tiny \
      --workdir=/tmp/t --config.sida.init_generator=/tmp/s
"""

import math

from sid_jax import config_base
from sid_jax.methods import sida

SID_MODEL_URL = "https://huggingface.co/UT-Austin-PML/SiD/resolve/main/"

# Spec §8.2 (`sida/run_sida.sh`) where SiDA differs from SiD's §8.1, and §8.3's SiD²A start.
DATASETS = {
    "cifar10_uncond": dict(zip="cifar10-32x32.zip", batch_gpu=32, gen_b1=0.0, duration_mimg=300,
                           sid_model="cifar10-uncond/alpha1.2/network-snapshot-1.200000-403968.pkl"),
    "cifar10_cond": dict(zip="cifar10-32x32.zip", batch_gpu=32, gen_b1=0.0, duration_mimg=300,
                         sid_model="cifar10-cond/alpha1.2/network-snapshot-1.200000-713312.pkl"),
    "imagenet64": dict(zip="imagenet-64x64.zip", batch_gpu=32, gen_b1=0.0, duration_mimg=300,
                       sid_model="imagenet64/alpha1.2/network-snapshot-1.200000-939176.pkl"),
    "ffhq64": dict(zip="ffhq-64x64.zip", batch_gpu=64, gen_b1=0.0, duration_mimg=200,
                   sid_model="ffhq64/alpha1.2/network-snapshot-1.200000-498176.pkl"),
    "afhqv2_64": dict(zip="afhqv2-64x64.zip", batch_gpu=64, gen_b1=0.0, duration_mimg=200,
                      sid_model="afhq64/alpha1/network-snapshot-1.000000-371712.pkl"),
}
SID2A_DURATION_MIMG = 100

# The tiny variants: groups of 8 in the batch of 16; the warm-up in images so that step 0 is
# frozen, step 1 trains with SiD alone and steps 2 on add the GAN term (strict >).
TINY_GROUP = 8
TINY_FROZEN_KIMG = 0.0
TINY_GAN_START_KIMG = 0.016


def sida_section(c, *, adv_loss_scale: float, sid2a: bool, official_init: str, tiny: bool,
                 batch_gpu: int):
  """config.sida for a paper config: the §8.2-§8.4 values, or the tiny warm-up and groups."""
  c.method = "sida"
  c.sida = sida.config_section()
  c.sida.adv_loss_scale = adv_loss_scale
  c.sida.gan_loss_scale = 0.01
  c.sida.sid2a = sid2a
  c.sida.official_init = official_init if sid2a else ""
  c.sida.adv_group_size = batch_gpu
  if tiny:
    c.sida.adv_group_size = TINY_GROUP
    c.sida.generator_frozen_kimg = TINY_FROZEN_KIMG
    c.sida.gan_start_kimg = TINY_GAN_START_KIMG


def get_config(arg=None):
  sid_edm = config_base.load_sibling(__file__, "sid_edm.py")
  arg = config_base.parse_arg(arg, dataset="", sid2a=False, tiny=False)
  if arg.dataset not in DATASETS:
    raise ValueError(f"configs/sida_edm.py needs dataset=NAME with NAME one of "
                     f"{sorted(DATASETS)}, got {arg.dataset!r}.")
  c = sid_edm.get_config(f"dataset={arg.dataset}" + (",tiny" if arg.tiny else ""))
  p = DATASETS[arg.dataset]
  sida_section(c, adv_loss_scale=1.0, sid2a=arg.sid2a, official_init=SID_MODEL_URL + p["sid_model"],
               tiny=arg.tiny, batch_gpu=p["batch_gpu"])
  c.sid.alpha = 1.0
  c.optim.gen_b1 = p["gen_b1"]
  c.optim.fake_clip_value = 1.0  # SiDA-EDM's clip_grad_value_ of the fake score (spec §6.5)

  c.data.source = "edm_zip"
  c.data.path = ""  # the dataset zip: --config.data.path=ZIP
  c.data.official_name = p["zip"]
  if arg.tiny:
    c.data.source = "digits"  # grey digits as 3-channel 8x8 images
    return c

  duration = SID2A_DURATION_MIMG if arg.sid2a else p["duration_mimg"]
  c.training.micro_batch = sid_edm.OFFICIAL_GPUS * p["batch_gpu"]
  c.training.num_steps = math.ceil(duration * 1e6 / c.training.global_batch)
  return c
