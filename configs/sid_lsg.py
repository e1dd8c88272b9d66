"""SiD-LSG from Stable Diffusion (lsg_spec §3-§5): one-step text-to-image, data-free.

  python -m sid_jax.convert sd --src stable-diffusion-v1-5 --dst teachers/sd15
  python -m sid_jax.main --config=configs/sid_lsg.py:teacher=sd15,kappa=1.5 \
      --workdir=runs/sd15-k1.5 --config.teacher.checkpoint=teachers/sd15 \
      --config.lsg.prompts=aesthetics_6_plus.txt

`teacher` is `sd15` (stable-diffusion-v1-5) or `sd21base` (stable-diffusion-2-1-base).
`kappa` (1.5, 2, 3 or 4.5; default 1.5) sets kappa_1 = kappa_2 = kappa_4 as in every released
model; the run length is that release's snapshot (RELEASED_KIMG below). Adam (beta1 0, lr 1e-6),
EMA half-life 50 kimg, alpha 1, global batch 512, float32. Use
`--config.lsg.compute_dtype=bfloat16` for bf16 compute with float32 master weights.

`:teacher=T,kappa=K,tiny` runs the same code path on a tiny random SD-shaped model (the teacher's
SD 1.x or 2.x settings, 8x8 latents, byte-level tokenizer, the bundled prompt list) for tests and
smoke runs.

configs/sd15_lsg.py and configs/sd21base_lsg.py are aliases of this file with the teacher fixed.
"""

import math

import ml_collections

from sid_jax import config_base

# The released generators' snapshot (kimg) per teacher and kappa (lsg_spec §5.5): the run length
# of each config. SD 1.5 at kappa 1.5 has a second, "longer training" release at 18789 kimg.
RELEASED_KIMG = {
    "sd15": {1.5: 8806, 2.0: 4812, 3.0: 6349, 4.5: 8380},
    "sd21base": {1.5: 9728, 2.0: 8482, 3.0: 6144, 4.5: 7168},
}
OFFICIAL_NAMES = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd21base": "stabilityai/stable-diffusion-2-1-base",
}
GRID_PROMPTS = (
    "a photo of an astronaut riding a horse on the moon",
    "a red fox in a snowy forest, golden hour",
    "an oil painting of a lighthouse on a cliff at dusk",
    "a bowl of ramen with a soft boiled egg, studio lighting",
    "a cozy cabin in the mountains, watercolor",
    "a portrait of an old fisherman, dramatic lighting",
    "a futuristic city skyline at sunrise",
    "a small robot watering plants in a greenhouse",
)


def get_config(arg=None, teacher=None):
  """`arg` = 'teacher=sd15|sd21base,kappa=K[,tiny]'. `teacher` fixes the teacher instead (the
  sd15_lsg.py / sd21base_lsg.py aliases); `arg` then takes only kappa and tiny."""
  if teacher is None:
    a = config_base.parse_arg(arg, teacher="", kappa=1.5, tiny=False)
    teacher = a.teacher
  else:
    a = config_base.parse_arg(arg, kappa=1.5, tiny=False)
  if teacher not in RELEASED_KIMG:
    raise ValueError(f"Config argument teacher={teacher!r} is not a SiD-LSG teacher; use one of "
                     f"{sorted(RELEASED_KIMG)} (e.g. configs/sid_lsg.py:teacher=sd15,kappa=1.5).")
  if a.kappa not in RELEASED_KIMG[teacher]:
    raise ValueError(f"kappa={a.kappa} has no released model; the paper's values are "
                     f"{sorted(RELEASED_KIMG[teacher])} (override config.lsg.cfg_* for others).")
  c = config_base.base_config()
  c.method = "sid_lsg"
  c.seed = 0
  c.data.resolution = 64  # latents 64x64x4 of 512x512 images
  c.data.channels = 4
  c.data.label_dim = 0
  c.teacher.type = "network"
  c.teacher.official_name = OFFICIAL_NAMES[teacher]
  c.teacher.official_url = "https://huggingface.co/" + c.teacher.official_name
  c.teacher.architecture = teacher  # what `python -m sid_jax.plan` compiles without the weights

  c.lsg = ml_collections.ConfigDict()
  c.lsg.init_timestep = 625  # the generator's fixed t (sigma_625 = 2.5017)
  c.lsg.t_min = 20  # loss timesteps are integers in [t_min, t_max)
  c.lsg.t_max = 980
  c.lsg.cfg_fake_train = a.kappa  # kappa_1: guided fake score in its own loss ("long")
  c.lsg.cfg_fake_eval = a.kappa  # kappa_2 = kappa_3: guided fake score in the generator loss
  c.lsg.cfg_teacher = a.kappa  # kappa_4: guided teacher in the generator loss
  c.lsg.cond_dropout = 0.1  # fake step only, when kappa_1 != 1 or kappa_2 != 1
  # One prompt per line (LAION-Aesthetics 6+: aesthetics_6_plus.txt), or tfds:NAME:SPLIT[:FEATURE]
  # with prompts_data_dir, or an .array_record file.
  c.lsg.prompts = ""
  c.lsg.prompts_data_dir = ""
  c.lsg.grid_prompts = list(GRID_PROMPTS)
  c.lsg.compute_dtype = "float32"  # float32 (the paper) | bfloat16 (float32 master weights)
  c.lsg.remat = True  # rematerialise UNet blocks (the generator step backprops through 5 UNets)
  # UNet/VAE attention over blocks of this many queries (0: whole). 1024 splits the 4096-token
  # levels of 64x64 latents in four: same values up to float32 rounding, a quarter of the scores.
  c.lsg.attention_chunk = 1024
  c.lsg.tiny_sd2 = teacher == "sd21base"  # teacher type 'random': the SD 2.x-style tiny model

  c.sid.alpha = 1.0
  c.sid.gen_loss_scale = 1.0
  c.sid.fake_loss_scale = 1.0
  c.sid.augment_p = 0.0
  c.optim.fake_lr = 1e-6
  c.optim.gen_lr = 1e-6
  c.optim.fake_b1 = 0.0
  c.optim.gen_b1 = 0.0
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.ema.halflife_kimg = 50.0  # run_sid.sh: --ema 0.05 (Mimg)
  c.ema.rampup = 0.05

  batch = 512
  c.training.global_batch = batch
  # Official: 4 GPUs x 1 sample, 128 accumulation rounds. No layer couples samples, so any
  # micro-batch gives the same numbers; 16 divides common device counts.
  c.training.micro_batch = 16
  c.training.num_steps = math.ceil(RELEASED_KIMG[teacher][a.kappa] * 1000 / batch)
  tick = 4  # 2 kimg
  c.log.every_steps = tick
  c.log.sample_every_steps = 50 * tick
  c.log.grid_columns = 4
  c.eval.kind = "none"
  c.eval.every_steps = 50 * tick
  c.eval.batch = 16
  c.checkpoint.every_steps = 50 * tick
  c.checkpoint.keep = 3

  if a.tiny:
    c.teacher.type = "random"
    c.teacher.official_name = ""
    c.teacher.official_url = ""
    c.data.resolution = 8
    config_base.tiny_schedule(c, batch=8, grid_columns=2)
    c.lsg.grid_prompts = list(GRID_PROMPTS[:4])
  return c
