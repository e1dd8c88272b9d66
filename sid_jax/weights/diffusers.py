"""The files of a local diffusers Stable Diffusion folder: configs and weights, as data.

A folder such as a local copy of stable-diffusion-v1-5 holds `unet/`, `vae/`, `text_encoder/`
(each a `config.json` and weights), `tokenizer/` and `scheduler/` (`scheduler_config.json`). The
weights are safetensors (or `.bin`, read with torch), possibly sharded, possibly a variant such as
`diffusion_pytorch_model.fp16.safetensors`. This module only reads; building the model from what
it reads is `sid_jax.models.stable_diffusion.read_diffusers`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from sid_jax.weights import readers

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# The networks with weights.
PARTS = ("unet", "text_encoder", "vae")
# The file stems (safetensors, .bin) of each weight folder.
WEIGHT_STEMS = {
    "unet": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
    "vae": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
    "text_encoder": readers.HF_STEMS,
}
SCHEDULER_CONFIG = "scheduler_config.json"


def check_folder(folder: str) -> str:
  """The absolute `folder`; raises FileNotFoundError naming what a diffusers folder lacks."""
  folder = os.path.abspath(folder)
  if not os.path.isdir(folder):
    raise FileNotFoundError(
        f"{folder!r}: no such directory (expected a local diffusers Stable Diffusion folder "
        f"with {', '.join(f'{s}/' for s in SUBFOLDERS)}).")
  missing = [os.path.join(folder, s) for s in SUBFOLDERS
             if not os.path.isdir(os.path.join(folder, s))]
  if missing:
    raise FileNotFoundError(f"{folder!r} is not a diffusers Stable Diffusion folder: "
                            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                            "missing.")
  return folder


def read_configs(folder: str) -> dict[str, dict[str, Any]]:
  """{'unet', 'vae', 'text_encoder', 'scheduler'}: the config files of `folder`, as stored."""
  folder = check_folder(folder)
  configs = {part: readers.read_config(os.path.join(folder, part))
             for part in ("unet", "vae", "text_encoder")}
  configs["scheduler"] = readers.read_config(os.path.join(folder, "scheduler"), SCHEDULER_CONFIG)
  return configs


def weight_files(folder: str, part: str, variant: str | None = None) -> list[str]:
  """The weight files `read_state_dict(folder, part, variant)` reads ([] if there is none)."""
  return readers.weight_files(os.path.join(folder, part), variant, WEIGHT_STEMS[part])


def read_state_dict(folder: str, part: str, variant: str | None = None) -> dict[str, np.ndarray]:
  """The state dict of `part` ('unet', 'vae' or 'text_encoder') of `folder`, as numpy arrays.

  Raises:
    FileNotFoundError naming the weight files looked for (with `variant`, e.g. 'fp16',
      `diffusion_pytorch_model.fp16.safetensors`, ...).
  """
  if part not in WEIGHT_STEMS:
    raise ValueError(f"Unknown diffusers part {part!r}; expected one of {PARTS}.")
  return readers.read_folder(os.path.join(folder, part), variant, stems=WEIGHT_STEMS[part])
