"""Builds EDM / SiDA denoisers from the official constructor arguments.

`build_edm_denoiser('EDMPrecond', kwargs)` takes the keyword arguments the official precond class
receives (e.g. the `init_kwargs` stored with an EDM pickle) and returns a `NetworkDenoiser` with the
matching Flax UNet and preconditioning. Anything the port does not know raises a ValueError that
names it, so a checkpoint is never silently built with a different architecture.
"""

from __future__ import annotations

from typing import Any, Mapping

from sid_jax.denoisers import (EDMPreconditioning, NetworkDenoiser, VEPreconditioning,
                               VPPreconditioning)
from sid_jax.nets import layers
from sid_jax.nets.dhariwal import DhariwalUNet
from sid_jax.nets.songunet import SongUNet

# Per precond class: its own keyword arguments (with the official defaults), the default
# model_type, and the model types its module namespace can build.
_PRECONDS = {
    "EDMPrecond": (dict(sigma_min=0, sigma_max=float("inf"), sigma_data=0.5), "DhariwalUNet",
                   ("SongUNet", "DhariwalUNet")),
    "VPPrecond": (dict(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5), "SongUNet",
                  ("SongUNet", "DhariwalUNet")),
    "VEPrecond": (dict(sigma_min=0.02, sigma_max=100), "SongUNet", ("SongUNet", "DhariwalUNet")),
    "EDMPrecond_EncoderDecoder": (dict(sigma_min=0, sigma_max=float("inf"), sigma_data=0.5),
                                  "SongUNet_EncoderDecoder",
                                  ("SongUNet_EncoderDecoder", "DhariwalUNet_EncoderDecoder")),
}

# Keyword arguments every precond class takes besides its own (required ones map to None).
_COMMON = dict(img_resolution=None, img_channels=None, label_dim=0, use_fp16=False)

_MODELS = {
    "SongUNet": SongUNet,
    "SongUNet_EncoderDecoder": SongUNet,
    "DhariwalUNet": DhariwalUNet,
    "DhariwalUNet_EncoderDecoder": DhariwalUNet,
}

# Model kwargs the precond passes itself; a user kwarg with these names is an error upstream too.
_SET_BY_PRECOND = ("img_resolution", "in_channels", "out_channels", "label_dim")
_SEQUENCE_FIELDS = ("channel_mult", "attn_resolutions", "resample_filter")
_NON_MODEL_FIELDS = ("precision", "dtype", "parent", "name")


def _model_fields(cls) -> tuple[str, ...]:
  return tuple(name for name in cls.__dataclass_fields__
               if name not in _SET_BY_PRECOND + _NON_MODEL_FIELDS)


def build_edm_denoiser(class_name: str, kwargs: Mapping[str, Any], *,
                       precision: Any = layers.DEFAULT_PRECISION,
                       dtype: Any = None) -> NetworkDenoiser:
  """A `NetworkDenoiser` equivalent to `<class_name>(**kwargs)` of the official code.

  `class_name` is one of EDMPrecond, VPPrecond, VEPrecond (EDM `training/networks.py`) or
  EDMPrecond_EncoderDecoder (SiDA `sida_training/sida_networks.py`). `kwargs` are the precond's
  constructor arguments including `model_type` and the model's own arguments.

  `sigma_min`, `sigma_max` and VP's `epsilon_t` only set the supported noise range (used by
  samplers, not by the denoiser); they are accepted but not stored. `use_fp16` is accepted and
  ignored: the Flax network computes in `dtype` (None: its input's, float32 as the reference does
  off CUDA; bfloat16 in place of the reference's float16). `precision` is passed to every matmul
  and convolution.
  """
  if class_name not in _PRECONDS:
    raise ValueError(f"Unknown EDM precond class {class_name!r}; expected one of "
                     f"{sorted(_PRECONDS)}.")
  own, default_model, allowed_models = _PRECONDS[class_name]
  kwargs = dict(kwargs)
  model_type = kwargs.pop("model_type", default_model)
  if model_type not in _MODELS:
    raise ValueError(f"Unknown model_type {model_type!r}; expected one of {sorted(_MODELS)}.")
  if model_type not in allowed_models:
    raise ValueError(f"{class_name} cannot build model_type {model_type!r}; it builds "
                     f"{list(allowed_models)}.")

  precond_kwargs = {**_COMMON, **own}
  values = {}
  for key, default in precond_kwargs.items():
    if key in kwargs:
      values[key] = kwargs.pop(key)
    elif default is None:
      raise ValueError(f"{class_name} requires the keyword argument {key!r}.")
    else:
      values[key] = default

  model_cls = _MODELS[model_type]
  allowed = _model_fields(model_cls)
  unknown = sorted(k for k in kwargs if k not in allowed)
  if unknown:
    raise ValueError(f"Unsupported keyword arguments for {class_name}(model_type={model_type!r}): "
                     f"{unknown}; supported model arguments are {sorted(allowed)}.")
  model_kwargs = {}
  for key, value in kwargs.items():
    if key in _SEQUENCE_FIELDS:
      if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{key} must be a sequence, got {value!r}.")
      value = tuple(value)
    model_kwargs[key] = value

  if not isinstance(values["use_fp16"], bool):
    raise ValueError(f"use_fp16 must be a bool, got {values['use_fp16']!r}.")
  label_dim = int(values["label_dim"])
  module = model_cls(img_resolution=int(values["img_resolution"]),
                     in_channels=int(values["img_channels"]),
                     out_channels=int(values["img_channels"]),
                     label_dim=label_dim,
                     precision=precision,
                     dtype=dtype,
                     **model_kwargs)
  if isinstance(module, SongUNet):
    module.check_config()

  if class_name in ("EDMPrecond", "EDMPrecond_EncoderDecoder"):
    precond = EDMPreconditioning(sigma_data=float(values["sigma_data"]))
  elif class_name == "VPPrecond":
    precond = VPPreconditioning(beta_d=float(values["beta_d"]),
                                beta_min=float(values["beta_min"]),
                                num_steps=int(values["M"]))
  else:
    precond = VEPreconditioning()
  return NetworkDenoiser(module=module, precond=precond, label_dim=label_dim)
