"""SiD-LSG from Stable Diffusion 2.1-base (lsg_spec §3-§5): one-step text-to-image, data-free.

  python -m sid_jax.convert sd --src stable-diffusion-2-1-base --dst teachers/sd21base
  python -m sid_jax.main --config=configs/sd21base_lsg.py:kappa=1.5 --workdir=runs/sd21base-k1.5 \
      --config.teacher.checkpoint=teachers/sd21base --config.lsg.prompts=aesthetics_6_plus.txt

`kappa` (1.5, 2, 3 or 4.5; default 1.5) sets kappa_1 = kappa_2 = kappa_4 as in every released
model; the run length is that release's snapshot (config_base.LSG_RELEASED_KIMG). Adam
(beta1 0, lr 1e-6), EMA half-life 50 kimg, alpha 1, global batch 512, float32. Use
`--config.lsg.compute_dtype=bfloat16` for bf16 compute with float32 master weights.

`:kappa=K,tiny` runs the same code path on a tiny random SD-shaped model (SD 2.x settings,
8x8 latents, byte-level tokenizer, the bundled prompt list) for tests and smoke runs.
"""

from sid_jax import config_base


def get_config(arg=None):
  return config_base.lsg_config("sd21base", arg)
