"""Official checkpoints -> sid_jax networks: the library behind `python -m sid_jax.convert`.

EDM / EDM2 (and SiD / SiDA generators). `read_official(family, src, ...)` reads a source (an
official network pickle, a torch `state_dict` file or an npz of torch names), builds the network
spec `{'class_name', 'kwargs'}`, builds the denoiser with `models.build_denoiser` and converts the
weights with the family's strict key map (`weights.edm` / `weights.edm2`): it returns
(spec, params). `convert(...)` also writes `checkpoints.save_network(dst, params, spec)` and a
`source.json` that records where the weights came from.

Stable Diffusion. `read_stable_diffusion(src, ...)` reads a local diffusers folder (optionally
with the UNet of a released SiD-LSG generator pickle) into (spec, params);
`convert_sd(...)` writes it as `stable_diffusion.save`'s model directory plus `source.json`.

Every problem a user can cause raises `ConversionError` (or FileNotFoundError, ImportError for a
missing optional dependency, `weights.pickles.UnsafePickleError`, or the converters' ValueError
naming the keys).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import shutil
import zipfile
from typing import Any, Mapping

import jax
import numpy as np

from sid_jax import checkpoints
from sid_jax.models import EDM2_CLASSES, EDM_CLASSES, _plain, build_denoiser, stable_diffusion
from sid_jax.models import latent_decoder
from sid_jax.nets import sd_vae
from sid_jax.weights import diffusers, edm, edm2, pickles, readers, strict
from sid_jax.weights import sd_vae as sd_vae_weights

SOURCE_RECORD = "source.json"
PICKLE_EXTENSIONS = (".pkl", ".pickle")
TORCH_EXTENSIONS = (".pt", ".pth")
NPZ_EXTENSIONS = (".npz",)

FAMILIES = {
    "edm": (EDM_CLASSES, edm.torch_state_dict_to_flax),
    "edm2": (EDM2_CLASSES, edm2.torch_state_dict_to_flax),
}

# The released SiD-LSG generators take one step from t_init = 625 (config_base.lsg_config). The
# pickles do not record it; source.json does, for whoever samples from the converted UNet.
LSG_INIT_TIMESTEP = 625
CONVERT_EXTRA = f"{readers.CONVERT_EXTRA} diffusers"


class ConversionError(ValueError):
  """A source that cannot be converted as asked; the message says what to change."""


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def num_params(params: Any) -> int:
  return int(sum(np.size(leaf) for leaf in jax.tree.leaves(params)))


def check_dst(dst: str, overwrite: bool) -> str:
  """The absolute `dst`; raises if it is a file, or a non-empty directory without `overwrite`."""
  dst = os.path.abspath(dst)
  if os.path.isfile(dst) or (os.path.isdir(dst) and os.listdir(dst) and not overwrite):
    raise ConversionError(f"--dst {dst!r} already exists and is not an empty directory; choose "
                          "another one or pass --overwrite.")
  return dst


def _write_record(dst: str, record: dict) -> None:
  with open(os.path.join(dst, SOURCE_RECORD), "w") as f:
    json.dump(record, f, indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# EDM / EDM2 specs.
# ---------------------------------------------------------------------------------------------


def _json_value(value: Any, where: str) -> Any:
  """`value` as plain JSON data (numpy scalars -> Python numbers); raises naming `where`."""
  if value is None or isinstance(value, (bool, str)):
    return value
  if isinstance(value, (int, float)):
    return value
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, Mapping):
    out = {}
    for k, v in value.items():
      if not isinstance(k, str):
        raise ConversionError(f"{where} has a non-string key {k!r}.")
      out[k] = _json_value(v, f"{where}[{k!r}]")
    return out
  if isinstance(value, (list, tuple)):
    return [_json_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
  raise ConversionError(f"{where} is a {type(value).__name__} ({value!r}), which a network spec "
                        "cannot hold.")


def spec_from_record(record: pickles.PickledObject) -> dict:
  """The network spec of a pickled persistent network: its class name and constructor kwargs."""
  name = record.class_name
  if record.init_args:
    raise ConversionError(
        f"{name} was constructed with positional arguments {record.init_args!r}; sid_jax needs "
        "keyword arguments. Export its state_dict and pass a --spec.")
  if record.init_kwargs is None:
    raise ConversionError(
        f"The pickled {name} did not record its constructor arguments (init_kwargs). Export its "
        "state_dict and pass a --spec.")
  return {"class_name": name,
          "kwargs": _json_value(record.init_kwargs, f"{name}.init_kwargs")}


def read_spec(path: str) -> dict:
  """A network spec JSON file `{"class_name": ..., "kwargs": {...}}`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--spec {path!r}: no such file.")
  with open(path) as f:
    try:
      spec = json.load(f)
    except json.JSONDecodeError as e:
      raise ConversionError(f"--spec {path!r} is not valid JSON: {e}") from None
  if (not isinstance(spec, dict) or not isinstance(spec.get("class_name"), str) or
      not isinstance(spec.get("kwargs"), dict)):
    raise ConversionError(
        f"--spec {path!r} must be a JSON object {{\"class_name\": <official class>, "
        f"\"kwargs\": {{<constructor kwargs>}}}}, got {json.dumps(spec)[:200]}.")
  return {"class_name": spec["class_name"], "kwargs": spec["kwargs"]}


def check_family(family: str, class_name: str) -> None:
  own = FAMILIES[family][0]
  if class_name in own:
    return
  for other, (classes, _) in FAMILIES.items():
    if class_name in classes:
      raise ConversionError(
          f"{class_name} is an {other.upper()} class; convert it with "
          f"`python -m sid_jax.convert {other}`.")
  raise ConversionError(
      f"Unknown network class {class_name!r}: `{family}` converts {list(own)} "
      f"(and `{'edm2' if family == 'edm' else 'edm'}` converts "
      f"{list(FAMILIES['edm2' if family == 'edm' else 'edm'][0])}).")


# ---------------------------------------------------------------------------------------------
# EDM / EDM2 sources.
# ---------------------------------------------------------------------------------------------


def _describe(value: Any) -> str:
  if isinstance(value, pickles.PickledObject):
    return value.class_name
  return type(value).__name__


def select_network(obj: Any, key: str, src: str) -> pickles.PickledObject:
  """The network under `key` of an unpickled snapshot ('' = the top-level object itself)."""
  if key == "":
    value, where = obj, src
  else:
    if isinstance(obj, pickles.PickledObject):
      raise ConversionError(f"{src} holds a single {obj.class_name}, not a dict of networks; "
                            "pass --key '' to convert it.")
    if not isinstance(obj, Mapping):
      raise ConversionError(f"{src} holds a {type(obj).__name__}, not a dict of networks.")
    if key not in obj:
      contents = ", ".join(f"{k!r} ({_describe(v)})" for k, v in obj.items())
      raise ConversionError(f"{src} has no key {key!r}; it holds {contents}. Choose one with "
                            "--key.")
    value, where = obj[key], f"{src}[{key!r}]"
  if not isinstance(value, pickles.PickledObject) or not value.state_dict:
    raise ConversionError(f"{where} is a {_describe(value)} without parameters, not a network.")
  return value


def read_source(src: str, key: str, spec_path: str | None) -> tuple[dict, dict, str]:
  """(spec, state_dict, format) of `src`; `format` is 'pickle', 'torch' or 'npz'."""
  ext = os.path.splitext(src)[1].lower()
  if ext in PICKLE_EXTENSIONS:
    if spec_path:
      raise ConversionError("--spec is only for .pt / .npz sources; a network pickle records "
                            "its own class and constructor arguments.")
    try:
      obj = pickles.load(src)
    except ImportError:
      raise ConversionError(f"Reading {src} needs torch (an optional dependency) for its tensor "
                            f"storages: {readers.CONVERT_EXTRA}.") from None
    record = select_network(obj, key, src)
    return spec_from_record(record), record.state_dict, "pickle"
  if ext in TORCH_EXTENSIONS + NPZ_EXTENSIONS:
    if not spec_path:
      raise ConversionError(f"{src} holds only weights: pass --spec SPEC.json with "
                            "{\"class_name\": ..., \"kwargs\": {...}}.")
    spec = read_spec(spec_path)
    if ext in TORCH_EXTENSIONS:
      return spec, readers.read_torch(src, key), "torch"
    return spec, readers.read_npz(src), "npz"
  raise ConversionError(
      f"Unknown source type {ext or '(no extension)'!r} for {src}: expected a network pickle "
      f"{PICKLE_EXTENSIONS}, a torch state_dict {TORCH_EXTENSIONS} or an npz {NPZ_EXTENSIONS}.")


# ---------------------------------------------------------------------------------------------
# EDM / EDM2 conversion.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Summary:
  """What `convert` did."""
  class_name: str
  model_type: str | None
  num_params: int
  src: str
  src_sha256: str
  key: str | None
  dst: str

  def lines(self) -> list[str]:
    name = self.class_name + (f" ({self.model_type})" if self.model_type else "")
    where = self.src + (f" [{self.key!r}]" if self.key else "")
    return [
        f"converted {name} from {where}",
        f"  parameters:    {self.num_params:,}",
        f"  source sha256: {self.src_sha256}",
        f"  written to:    {self.dst}",
        f"  use it with:   --config.teacher.type=network --config.teacher.checkpoint={self.dst}",
    ]


def _check_source(family: str, src: str) -> None:
  if family not in FAMILIES:
    raise ConversionError(f"Unknown model family {family!r}; expected one of {sorted(FAMILIES)}.")
  if not os.path.isfile(src):
    raise FileNotFoundError(f"--src {src!r}: no such file.")


def read_official(family: str, src: str, *, key: str = "ema", spec_path: str | None = None
                  ) -> tuple[dict, Any, str]:
  """(spec, params, format) of an official EDM / EDM2 source, converted strictly.

  Args:
    family: 'edm' (EDMPrecond, VPPrecond, VEPrecond, EDMPrecond_EncoderDecoder) or 'edm2'
      (Precond, EDM_2_Precond_EncoderDecoder, EDM_2_Precond_Generator).
    src: an official network pickle (.pkl), or a torch state_dict (.pt/.pth) or an npz of torch
      names, both with `spec_path`.
    key: the snapshot entry holding the network ('' = the pickle's top-level object). For a .pt
      file, the entry holding the state_dict if the file is not a state_dict itself.
    spec_path: JSON `{'class_name': ..., 'kwargs': {...}}` for .pt / .npz sources.

  Returns:
    The network spec, the params of `models.build_denoiser(spec)` and the source format
    ('pickle', 'torch' or 'npz').
  """
  _check_source(family, src)
  spec, state_dict, fmt = read_source(src, key, spec_path)
  check_family(family, spec["class_name"])
  try:
    return spec, FAMILIES[family][1](state_dict, build_denoiser(spec)), fmt
  except ValueError as e:  # the strict converter's report (or the spec's): name the file
    raise ConversionError(f"{src}: {e}") from None


def convert(family: str, src: str, dst: str, *, key: str = "ema", spec_path: str | None = None,
            overwrite: bool = False) -> Summary:
  """Converts `src` (see `read_official`) into the network checkpoint directory `dst`.

  Writes `checkpoints.save_network(dst, params, spec)` and `source.json` (source path, sha256,
  format, entry). `overwrite` replaces an existing non-empty `dst`. Returns a `Summary`.
  """
  _check_source(family, src)
  dst = check_dst(dst, overwrite)
  spec, params, fmt = read_official(family, src, key=key, spec_path=spec_path)
  count = num_params(params)
  src_sha256 = sha256_file(src)
  checkpoints.save_network(dst, params, spec)
  _write_record(dst, {"source": os.path.abspath(src), "source_sha256": src_sha256, "format": fmt,
                      "key": key if fmt == "pickle" else None, "class_name": spec["class_name"],
                      "num_params": count})
  return Summary(class_name=spec["class_name"], model_type=spec["kwargs"].get("model_type"),
                 num_params=count, src=src, src_sha256=src_sha256,
                 key=key if fmt == "pickle" else None, dst=dst)


# ---------------------------------------------------------------------------------------------
# Stable Diffusion: a diffusers folder (and optionally a SiD-LSG generator pickle).
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SDSummary:
  """What `convert_sd` did."""
  src: str
  dst: str
  variant: str | None
  num_params: dict[str, int]
  generator: str | None = None
  key: str | None = None

  def lines(self) -> list[str]:
    where = self.src + (f" (variant {self.variant})" if self.variant else "")
    counts = ", ".join(f"{part} {n:,}" for part, n in self.num_params.items())
    out = [f"converted StableDiffusion from {where}"]
    if self.generator:
      out.append(f"  UNet from:     {self.generator} [{self.key!r}] (SiD-LSG generator, "
                 f"t_init = {LSG_INIT_TIMESTEP})")
    out += [
        f"  parameters:    {sum(self.num_params.values()):,} ({counts})",
        f"  written to:    {self.dst}",
    ]
    if not self.generator:
      out.append(f"  use it with:   --config.teacher.checkpoint={self.dst}")
    return out


def generator_config_differences(teacher: Mapping[str, Any],
                                 generator: Mapping[str, Any]) -> list[str]:
  """'name: a != b' for every public UNet setting both configs hold with different values.

  (Not `checkpoints.config_differences`, which compares a run's stored and current configs.)
  """
  out = []
  for name in sorted(set(teacher) & set(generator)):
    if name.startswith("_"):
      continue
    a, b = _plain(teacher[name]), _plain(generator[name])
    if a != b:
      out.append(f"{name}: {a!r} != {b!r}")
  return out


def read_generator_pickle(path: str, key: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(state_dict as numpy arrays, config) of the diffusers UNet under `key` of a SiD-LSG pickle.

  A released SiD-LSG generator is a plain Python pickle of `{'ema': UNet2DConditionModel}`, a
  whole torch module. Unpickling a module imports its classes and can run arbitrary code from the
  file, so this is done only for the file the user names with `--generator`; it needs torch and
  diffusers. A `torch.save` archive of the same dict is read with `torch.load(weights_only=False)`.
  `key` '' takes the pickle's top-level object itself.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--generator {path!r}: no such file.")
  try:
    # The diffusers package (not `sid_jax.weights.diffusers`): unpickling imports its classes.
    import diffusers as _  # pylint: disable=g-import-not-at-top,unused-import
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError(f"Reading the generator pickle {path} needs torch and diffusers "
                          f"({e}): {CONVERT_EXTRA}") from None
  try:
    if zipfile.is_zipfile(path):
      obj = torch.load(path, map_location="cpu", weights_only=False)
    else:
      with open(path, "rb") as f:
        obj = pickle.load(f)  # The user vouches for this file (see the docstring).
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(f"Unpickling {path} failed: {type(e).__name__}: {e}") from None
  if key == "":
    value, where = obj, path
  else:
    if not isinstance(obj, Mapping):
      raise ConversionError(f"{path} holds a {type(obj).__name__}, not a dict like "
                            "{'ema': UNet2DConditionModel}; pass --key '' to use it whole.")
    if key not in obj:
      contents = ", ".join(f"{k!r} ({type(v).__name__})" for k, v in obj.items())
      raise ConversionError(f"{path} has no key {key!r}; it holds {contents or 'nothing'}. "
                            "Choose one with --key.")
    value, where = obj[key], f"{path}[{key!r}]"
  if not isinstance(value, torch.nn.Module):
    raise ConversionError(f"{where} is a {type(value).__name__}, not a torch module.")
  if type(value).__name__ != "UNet2DConditionModel":
    raise ConversionError(f"{where} is a {type(value).__name__}; a SiD-LSG generator is a "
                          "diffusers UNet2DConditionModel.")
  state_dict = {name: strict.to_numpy(t) for name, t in value.state_dict().items()}
  return state_dict, _plain(dict(getattr(value, "config", {})))


def read_stable_diffusion(src: str, *, variant: str | None = None, generator: str | None = None,
                          key: str = "ema") -> tuple[dict[str, Any], dict[str, Any]]:
  """(spec, params) of a local diffusers Stable Diffusion folder, converted strictly.

  Args:
    src: the diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/), e.g. a local
      copy of stable-diffusion-v1-5. With `generator`, the generator's teacher: its text encoder,
      VAE, tokenizer, scheduler and UNet config are used.
    variant: weight file variant, e.g. 'fp16' (`diffusion_pytorch_model.fp16.safetensors`).
    generator: a released SiD-LSG generator pickle whose UNet replaces `src`'s (see
      `read_generator_pickle`: unpickling it runs code from the file). The spec is then marked
      as a one-step generator (`kwargs['generator']`).
    key: the pickle entry holding the generator UNet ('' = the whole pickle).
  """
  src = diffusers.check_folder(src)
  unet_state_dict = None
  if generator is not None:
    unet_state_dict, gen_config = read_generator_pickle(generator, key)
    teacher_config = readers.read_config(os.path.join(src, "unet"))
    diffs = generator_config_differences(teacher_config, gen_config)
    if diffs:
      raise ConversionError(f"The UNet in {generator} [{key!r}] is configured unlike "
                            f"{os.path.join(src, 'unet', 'config.json')} (generator != teacher: "
                            f"{'; '.join(diffs)}); pass its own teacher as --src.")
  spec, params = stable_diffusion.read_diffusers(src, variant=variant,
                                                 unet_state_dict=unet_state_dict)
  if generator is not None:
    # Marks the model as a one-step generator (what a SiD-LSG run exports), so
    # `python -m sid_jax.sample` knows its t_init.
    spec["kwargs"]["generator"] = {"init_timestep": LSG_INIT_TIMESTEP}
  return spec, params


def convert_sd(src: str, dst: str, *, variant: str | None = None, generator: str | None = None,
               key: str = "ema", overwrite: bool = False) -> SDSummary:
  """Converts a local diffusers Stable Diffusion folder (see `read_stable_diffusion`) into `dst`.

  Writes `stable_diffusion.save`'s network.json, params/ and tokenizer/, plus `source.json`
  recording the source folder, the subfolders and variant read, the sha256 of every weight file
  read and, with `generator`, the pickle the UNet came from. `overwrite` replaces an existing
  non-empty `dst` (its tokenizer/ folder is removed first).

  Raises:
    ConversionError, FileNotFoundError, ImportError or ValueError (the converters' key reports).
  """
  src = diffusers.check_folder(src)
  dst = check_dst(dst, overwrite)
  spec, params = read_stable_diffusion(src, variant=variant, generator=generator, key=key)
  gen_record = None
  if generator is not None:
    gen_record = {"source": os.path.abspath(generator), "source_sha256": sha256_file(generator),
                  "key": key, "init_timestep": LSG_INIT_TIMESTEP}
  parts = ("vae", "text_encoder") + (() if generator is not None else ("unet",))
  files = {os.path.relpath(p, src): sha256_file(p)
           for part in parts for p in diffusers.weight_files(src, part, variant)}
  counts = {part: num_params(params[part]) for part in diffusers.PARTS}

  tokenizer_out = os.path.join(dst, stable_diffusion.TOKENIZER_DIR)
  if overwrite and os.path.isdir(tokenizer_out):
    shutil.rmtree(tokenizer_out)  # No stale tokenizer file may outlive the replaced model.
  stable_diffusion.save(dst, spec, params, os.path.join(src, stable_diffusion.TOKENIZER_DIR))
  _write_record(dst, {
      "class_name": stable_diffusion.CLASS_NAME, "format": "diffusers", "source": src,
      "subfolders": list(diffusers.SUBFOLDERS), "variant": variant,
      "weights_sha256": dict(sorted(files.items())),
      # Where the UNet weights came from: unet/ of `source`, or the generator pickle (whose
      # architecture is unet/config.json of `source`).
      "unet_weights": "generator" if generator is not None else "source",
      "generator": gen_record,
      "num_params": counts,
  })
  return SDSummary(src=src, dst=dst, variant=variant, num_params=counts,
                   generator=os.path.abspath(generator) if generator else None,
                   key=key if generator else None)


# ---------------------------------------------------------------------------------------------
# A lone Stable Diffusion VAE (EDM2 decodes its latents with sd-vae-ft-mse).
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class VAESummary:
  """What `convert_vae` did."""
  src: str
  dst: str
  variant: str | None
  num_params: int

  def lines(self) -> list[str]:
    where = self.src + (f" (variant {self.variant})" if self.variant else "")
    return [f"converted AutoencoderKL from {where}",
            f"  parameters:    {self.num_params:,}",
            f"  written to:    {self.dst}",
            f"  use it with:   --config.decoder.vae={self.dst}"]


def vae_folder(src: str) -> str:
  """The folder holding the VAE's config.json: `src` itself (a VAE repository such as
  stabilityai/sd-vae-ft-mse) or its `vae/` subfolder (a whole Stable Diffusion folder)."""
  src = os.path.abspath(src)
  for folder in (src, os.path.join(src, "vae")):
    if os.path.isfile(os.path.join(folder, "config.json")):
      return folder
  raise FileNotFoundError(f"{src!r} holds no VAE: expected config.json and "
                          "diffusion_pytorch_model.safetensors in it or in its vae/ subfolder.")


def convert_vae(src: str, dst: str, *, variant: str | None = None,
                overwrite: bool = False) -> VAESummary:
  """Converts a local diffusers `AutoencoderKL` folder into `dst`: network.json
  {"class_name": "AutoencoderKL", "kwargs": its config}, params/ and source.json."""
  folder = vae_folder(src)
  dst = check_dst(dst, overwrite)
  config = readers.read_config(folder)
  spec = {"class_name": latent_decoder.VAE_CLASS, "kwargs": config}
  module = sd_vae.vae_from_config(config)
  stems = diffusers.WEIGHT_STEMS["vae"]
  params = sd_vae_weights.vae_params(readers.read_folder(folder, variant, stems=stems),
                                     module)["params"]
  checkpoints.save_network(dst, params, spec)
  files = {os.path.basename(p): sha256_file(p)
           for p in readers.weight_files(folder, variant, stems)}
  _write_record(dst, {"class_name": latent_decoder.VAE_CLASS, "format": "diffusers",
                      "source": folder, "variant": variant, "weights_sha256": files,
                      "num_params": num_params(params)})
  return VAESummary(src=folder, dst=dst, variant=variant, num_params=num_params(params))
