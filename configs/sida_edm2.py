"""SiDA and SiD²A on the EDM2 ImageNet-512 teachers (SD-VAE latents), the paper's settings (§8.4).

  python -m sid_jax.main --config=configs/sida_edm2.py:size=xs --workdir=runs/edm2_xs_sida \
      --config.teacher.checkpoint=teachers/edm2-img512-xs --config.data.path=img512-sd.zip \
      --config.decoder.vae=vaes/sd-vae-ft-mse
  python -m sid_jax.main --config=configs/sida_edm2.py:size=xs,sid2a ... \
      --config.sida.init_generator=edm2_img512_xs_sid_alpha1-249360.pkl

Teachers, VAE and the run shape as configs/sid_edm2.py (`sida_edm2_train.py`,
`run_sida_edm2.sh`, `run_sid_sida_edm2.sh`). The real data are EDM2's latent zip of ImageNet
512 (`img512-sd.zip`, made by EDM2's `dataset_tool.py encode`: per image the SD-VAE posterior
mean and std), read lazily by sid_jax/data/real.py, which draws a fresh latent per use and
normalises it as EDM2 does (spec §7.4).

Common to all sizes: alpha 1, loss scales 1 (fake score), 100 (generator SiD term; 50 for the
M size's SiD²A run), 100 (discriminator, `sida.adv_loss_scale`) and 0.01 (GAN term), no
augmentation and no gradient clipping, the generator frozen for the first 100k images and
trained with SiD alone up to 200k, BCE groups of the official per-GPU batch
(`sida.adv_group_size` = batch_gpu). EDM2's log-variance (`sid.use_logvar`) and the forced weight
normalisation of the generator (`sid.force_normalization`; the fake score's is dead in the
official runs, spec §7.2) are on, except for size S (both off).

| size | SiDA Mimg | SiD²A Mimg | SiD²A starts from (huggingface.co/UT-Austin-PML/SiDA/resolve/main/EDM2_distillation/) |
|------|-----------|------------|------------------------------------------|
| xs   | 200       | 30         | edm2_img512_xs_sid_alpha1-249360.pkl     |
| s    | 200       | 80         | edm2_img512_s_sid_alpha1-192010.pkl      |
| m    | 200       | 200        | edm2_img512_m_sid_alpha1-226830.pkl      |
| l    | 200       | 55         | edm2_img512_l_sid_alpha1-203788.pkl      |
| xl   | 200       | 50         | edm2_img512_xl_sid_alpha1-234004.pkl     |
| xxl  | 100       | 30         | edm2_img512_xxl_sida_alpha1-077932.pkl (a SiDA generator) |

`:size=...,tiny` (with or without `sid2a`) keeps the method on configs/sid_edm2.py's 8x8x4
random teacher and tiny VAE, with scikit-learn's digits repeated to 4 channels standing in for
the latents (no files; give a latent zip with --config.data.source=edm2_latent_zip
--config.data.path=...), groups of 8 in a batch of 16 and the warm-up shrunk so that 3 steps
pass through the frozen, SiD-only and SiD + GAN phases: for tests and smoke runs only. The tiny
SiD²A variant starts from a tiny SiD generator (`configs/sid_edm2.py:size=...,tiny`'s export).
"""

import math

from sid_jax import config_base

SID_MODEL_URL = "https://huggingface.co/UT-Austin-PML/SiDA/resolve/main/EDM2_distillation/"

# Spec §8.4 (`run_sida_edm2.sh`, `run_sid_sida_edm2.sh`): log-variance and forced normalisation,
# durations in Mimg, the SiD²A start and the generator loss scale where it is not 100.
SIZES = {
    "xs": dict(logvar=True, sida_mimg=200, sid2a_mimg=30,
               sid_model="edm2_img512_xs_sid_alpha1-249360.pkl"),
    "s": dict(logvar=False, sida_mimg=200, sid2a_mimg=80,
              sid_model="edm2_img512_s_sid_alpha1-192010.pkl"),
    "m": dict(logvar=True, sida_mimg=200, sid2a_mimg=200, sid2a_gen_loss_scale=50.0,
              sid_model="edm2_img512_m_sid_alpha1-226830.pkl"),
    "l": dict(logvar=True, sida_mimg=200, sid2a_mimg=55,
              sid_model="edm2_img512_l_sid_alpha1-203788.pkl"),
    "xl": dict(logvar=True, sida_mimg=200, sid2a_mimg=50,
               sid_model="edm2_img512_xl_sid_alpha1-234004.pkl"),
    "xxl": dict(logvar=True, sida_mimg=100, sid2a_mimg=30,
                sid_model="edm2_img512_xxl_sida_alpha1-077932.pkl"),
}
LATENT_ZIP = "img512-sd.zip"


def get_config(arg=None):
  sid_edm2 = config_base.load_sibling(__file__, "sid_edm2.py")
  sida_edm = config_base.load_sibling(__file__, "sida_edm.py")
  arg = config_base.parse_arg(arg, size="", sid2a=False, tiny=False)
  if arg.size not in SIZES:
    raise ValueError(f"configs/sida_edm2.py needs size=NAME with NAME one of {list(SIZES)}, "
                     f"got {arg.size!r}.")
  c = sid_edm2.get_config(f"size={arg.size}" + (",tiny" if arg.tiny else ""))
  p = SIZES[arg.size]
  batch_gpu = sid_edm2.SIZES[arg.size]["batch_gpu"]
  sida_edm.sida_section(c, adv_loss_scale=100.0, sid2a=arg.sid2a,
                        official_init=SID_MODEL_URL + p["sid_model"], tiny=arg.tiny,
                        batch_gpu=batch_gpu)
  c.sid.alpha = 1.0
  c.sid.use_logvar = p["logvar"]
  c.sid.force_normalization = p["logvar"]  # the S runs: --return_logvar 0 --force_normalization 0
  if arg.sid2a:
    c.sid.gen_loss_scale = p.get("sid2a_gen_loss_scale", 100.0)

  c.data.source = "edm2_latent_zip"
  c.data.path = ""  # the latent zip: --config.data.path=ZIP
  c.data.official_name = LATENT_ZIP
  if arg.tiny:
    c.data.source = "digits"  # grey digits repeated to 4 channels stand in for the latents
    return c

  duration = p["sid2a_mimg"] if arg.sid2a else p["sida_mimg"]
  c.training.num_steps = math.ceil(duration * 1e6 / c.training.global_batch)
  return c
