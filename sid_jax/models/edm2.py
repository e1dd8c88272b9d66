"""Builds EDM2 denoisers from the official class names and constructor kwargs.

Supported classes (kwargs exactly as their constructors take them, e.g. a fixture's
`config_json` or the `init_kwargs` of a pickle):

* `Precond` -- NVIDIA's `training/networks_edm2.py` (NVlabs/edm2; vendored unchanged as
  `edm2/networks_edm2.py` in SiD), the class of the EDM2 teacher pickles: U-Net + log-variance
  head.
* `EDM_2_Precond_EncoderDecoder` -- SiD branch `sida`, `sida_training_edm2/sida_networks_edm2.py`:
  the same network with the encoder exposed (SiDA's discriminator) and `force_normalization`,
  `use_gan` required.
* `EDM_2_Precond_Generator` -- same module: no log-variance head (`logvar_channels` is accepted
  and ignored, as in the official constructor).

All three become `NetworkDenoiser(EDM2Net(...), EDMPreconditioning(sigma_data), label_dim)`.
`use_fp16` is recorded but does not choose the precision: the builder's `dtype` does (None: the
input's, float32; bfloat16 stands where the official code uses float16).
Every network supports `output='decoder' | 'encoder' | 'encoder_decoder'`; only the first two
classes support `return_logvar=True`.
"""

from __future__ import annotations

from typing import Any, Mapping

from sid_jax.denoisers import EDMPreconditioning, NetworkDenoiser
from sid_jax.nets.edm2 import EDM2Net

# Keyword arguments of the official Precond classes themselves, with their defaults.
_PRECOND_DEFAULTS = dict(use_fp16=True, sigma_data=0.5, logvar_channels=128)
# Keyword arguments of the official UNet (forwarded through **unet_kwargs).
_UNET_KWARGS = ("model_channels", "channel_mult", "channel_mult_noise", "channel_mult_emb",
                "num_blocks", "attn_resolutions", "label_balance", "concat_balance")
# Keyword arguments of the official Block that the UNet forwards through **block_kwargs.
# (flavor, resample_mode and attention are set by the UNet itself; passing them is an error in
# the official code too.)
_BLOCK_KWARGS = ("resample_filter", "channels_per_head", "dropout", "res_balance",
                 "attn_balance", "clip_act")
_REQUIRED_BASE = ("img_resolution", "img_channels", "label_dim")
_SIDA_REQUIRED = ("force_normalization", "use_gan")

_CLASSES = {
    # name: (extra required kwargs, has logvar head)
    "Precond": ((), True),
    "EDM_2_Precond_EncoderDecoder": (_SIDA_REQUIRED, True),
    "EDM_2_Precond_Generator": (_SIDA_REQUIRED, False),
}

SUPPORTED_CLASSES = tuple(_CLASSES)


def _as_tuple(value):
  return None if value is None else tuple(value)


def build_edm2_denoiser(class_name: str, kwargs: Mapping[str, Any], *,
                        dtype: Any = None) -> NetworkDenoiser:
  """Returns the denoiser of official class `class_name` built with constructor `kwargs`.

  `dtype` is the U-Net's compute dtype (None: the input's; see `sid_jax.nets.edm2`).

  Raises ValueError for an unknown class, unknown kwargs and missing required kwargs (each
  named).
  """
  if class_name not in _CLASSES:
    raise ValueError(f"Unknown EDM2 class {class_name!r}; supported: {list(SUPPORTED_CLASSES)}.")
  extra_required, has_logvar = _CLASSES[class_name]
  required = _REQUIRED_BASE + extra_required
  allowed = set(required) | set(_PRECOND_DEFAULTS) | set(_UNET_KWARGS) | set(_BLOCK_KWARGS)
  kwargs = dict(kwargs)
  unknown = sorted(set(kwargs) - allowed)
  missing = [k for k in required if k not in kwargs]
  if unknown or missing:
    parts = []
    if unknown:
      parts.append(f"unknown kwargs {unknown}")
    if missing:
      parts.append(f"missing required kwargs {missing}")
    raise ValueError(f"{class_name}: " + "; ".join(parts) + ".")

  cfg = dict(_PRECOND_DEFAULTS)
  cfg.update(kwargs)
  net_kwargs = {k: cfg[k] for k in _UNET_KWARGS + _BLOCK_KWARGS if k in cfg}
  for key in ("channel_mult", "attn_resolutions", "resample_filter"):
    if key in net_kwargs:
      net_kwargs[key] = _as_tuple(net_kwargs[key])
  label_dim = int(cfg["label_dim"])
  module = EDM2Net(img_resolution=int(cfg["img_resolution"]),
                   img_channels=int(cfg["img_channels"]),
                   label_dim=label_dim,
                   logvar_channels=int(cfg["logvar_channels"]) if has_logvar else None,
                   use_fp16=bool(cfg["use_fp16"]),
                   force_normalization=bool(cfg.get("force_normalization", False)),
                   use_gan=bool(cfg.get("use_gan", False)),
                   class_name=class_name,
                   dtype=dtype,
                   **net_kwargs)
  return NetworkDenoiser(module=module,
                         precond=EDMPreconditioning(sigma_data=float(cfg["sigma_data"])),
                         label_dim=label_dim)
