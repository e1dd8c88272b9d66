"""The library half of weight conversion: official PyTorch weights -> Flax params, strictly.

* `strict`: the one strict converter (every missing, unexpected and mis-shaped key named) and
  the one torch -> numpy helper;
* `readers`: safetensors, torch `.bin` / `.pt` / `.pth`, `.npz` and sharded (`*.index.json`)
  files, and Hugging Face folders of them;
* `pickles`: the restricted unpickler for official EDM / EDM2 / SiD network pickles;
* `edm`, `edm2`, `sd_unet`, `sd_vae`, `clip`, `inception`: per-family key maps onto
  `sid_jax.nets` modules;
* `diffusers`: the files of a local diffusers Stable Diffusion folder.

Nothing here imports `sid_jax.models` or anything above it; torch is imported only to read torch
files. Assembling models from what these modules read is `sid_jax.models` (`models.official`),
and the command line is `python -m sid_jax.convert`.
"""
