"""Exports sid_jax networks in the official PyTorch formats: the reverse of `sid_jax.convert`.

Usage:

  # An EDM / EDM2 network checkpoint (a run's WORKDIR/generator, or a converted teacher) -> a
  # torch state dict with the official names and layouts, and its constructor beside it:
  python -m sid_jax.export edm  --checkpoint runs/sid_c10c/generator --dst gen.pt
  python -m sid_jax.export edm2 --checkpoint runs/sid_edm2_xs/generator --dst gen.pt

  # A Stable Diffusion model (a SiD-LSG run's WORKDIR/generator, or a converted teacher) -> a
  # diffusers folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/ model_index.json):
  python -m sid_jax.export diffusers --checkpoint runs/sd15_k1.5/generator --dst sid-lsg-sd15

`edm` / `edm2` write `gen.pt` (`torch.save` of {official name: tensor}: OIHW convolutions,
[out, in] linears, EDM's `resample_filter` buffers, EDM2's torch-layout weights and 0-d gains)
and `gen.json` beside it: {"class_name", "kwargs", "official_module"} plus the generator's
"sigma_init" (and "step") when the checkpoint has them, so that

  net = EDMPrecond(**spec["kwargs"]); net.load_state_dict(torch.load("gen.pt"), strict=True)

rebuilds the network with the official code, and the one-step image is
net(sigma_init * z, sigma_init, class_labels).

`diffusers` writes float32 safetensors that `UNet2DConditionModel.from_pretrained(DST,
subfolder="unet")` loads strictly, the teacher's VAE, text encoder (transformers' CLIPTextModel),
tokenizer and scheduler, a `model_index.json` for `StableDiffusionPipeline.from_pretrained(DST)`,
and, for a SiD-LSG generator, `generator.json` with its t_init (625) and sigma_init. The one-step
image is x = sigma (z - eps(sqrt(1 - abar) z, t_init, text)), decoded by the VAE (README,
"Exporting a generator").

Every export is read back through the strict importer of `sid_jax.convert` and must give the same
params bit for bit before anything is written. Needs torch for `edm` / `edm2` and safetensors for
`diffusers` (`pip install -e .[convert]`). An existing --dst is replaced only with --overwrite.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import tempfile
from typing import Any

from absl import app, flags
import numpy as np

from sid_jax import checkpoints, cli, models
from sid_jax.models import stable_diffusion
from sid_jax.weights import clip, edm, edm2, sd_unet, sd_vae, to_torch

PROG = "python -m sid_jax.export"
FAMILIES = ("edm", "edm2", "diffusers")
INSTALL = "pip install -e .[convert]"
TORCH_EXTENSIONS = (".pt", ".pth")
GENERATOR_RECORD = "generator.json"
# Where the official classes live (gen.json's "official_module").
OFFICIAL_MODULES = {
    "EDMPrecond": "training/networks.py (NVlabs/edm, mingyuanzhou/SiD)",
    "VPPrecond": "training/networks.py (NVlabs/edm, mingyuanzhou/SiD)",
    "VEPrecond": "training/networks.py (NVlabs/edm, mingyuanzhou/SiD)",
    "EDMPrecond_EncoderDecoder": "sida_training/sida_networks.py (mingyuanzhou/SiD, branch sida)",
    "Precond": "training/networks_edm2.py (NVlabs/edm2)",
    "EDM_2_Precond_EncoderDecoder":
        "sida_training_edm2/sida_networks_edm2.py (mingyuanzhou/SiD, branch sida)",
    "EDM_2_Precond_Generator":
        "sida_training_edm2/sida_networks_edm2.py (mingyuanzhou/SiD, branch sida)",
}
# The diffusers folder: subfolder -> (weight file, config file, class, library).
DIFFUSERS_PARTS = {
    "unet": ("diffusion_pytorch_model.safetensors", "config.json", "UNet2DConditionModel",
             "diffusers"),
    "vae": ("diffusion_pytorch_model.safetensors", "config.json", "AutoencoderKL", "diffusers"),
    "text_encoder": ("model.safetensors", "config.json", "CLIPTextModel", "transformers"),
}
SCHEDULER_CONFIG = "scheduler_config.json"
MODEL_INDEX = "model_index.json"
# Everything `diffusers` writes in --dst (and --overwrite replaces).
DIFFUSERS_ENTRIES = (*DIFFUSERS_PARTS, "tokenizer", "scheduler", MODEL_INDEX, GENERATOR_RECORD)

FLAGS = flags.FlagValues()
_ = flags.DEFINE_string("checkpoint", None, "The sid_jax checkpoint: a network checkpoint "
                        "(network.json + params/) for edm / edm2, a Stable Diffusion model "
                        "(network.json + params/ + tokenizer/) for diffusers; a run's is "
                        "WORKDIR/generator.", flag_values=FLAGS)
_ = flags.DEFINE_string("dst", None, "edm / edm2: the state dict file (.pt; its spec goes to the "
                        ".json beside it). diffusers: the output folder.", flag_values=FLAGS)
_ = flags.DEFINE_bool("overwrite", False, "Replace an existing --dst.", flag_values=FLAGS)


class ExportError(ValueError):
  """A command that cannot be carried out as given; the message says what to change."""


@dataclasses.dataclass
class Summary:
  """What an export wrote."""
  what: str
  checkpoint: str
  written: list[str]
  num_tensors: int
  num_params: int
  hint: str

  def lines(self) -> list[str]:
    return [f"exported {self.what} from {self.checkpoint}",
            f"  tensors:     {self.num_tensors:,} ({self.num_params:,} values)",
            *[f"  written:     {path}" for path in self.written],
            f"  load with:   {self.hint}"]


# ---------------------------------------------------------------------------------------------
# Checks.
# ---------------------------------------------------------------------------------------------


def _import(module: str, why: str):
  """`module` (torch or safetensors.numpy), or an ImportError with the install hint."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise ImportError(f"{why} needs {module.split('.')[0]}, an optional dependency: "
                      f"{INSTALL}") from e


def family_of(spec: dict[str, Any]) -> str | None:
  """'edm', 'edm2' or 'diffusers' for a network.json spec (None for anything else)."""
  name = spec.get("class_name")
  if name in models.EDM_CLASSES:
    return "edm"
  if name in models.EDM2_CLASSES:
    return "edm2"
  if name == stable_diffusion.CLASS_NAME:
    return "diffusers"
  return None


def read_spec(checkpoint: str | None, family: str) -> dict[str, Any]:
  """The network.json of `checkpoint`, checked to be of `family`."""
  if not checkpoint:
    raise ExportError(f"`{family}` needs --checkpoint.")
  if not os.path.isdir(checkpoint):
    raise FileNotFoundError(f"--checkpoint {checkpoint!r}: no such directory (a run's generator "
                            "is WORKDIR/generator).")
  if not os.path.isfile(os.path.join(checkpoint, checkpoints.NETWORK_SPEC)):
    raise FileNotFoundError(f"--checkpoint {checkpoint!r} is not a sid_jax checkpoint: it has no "
                            f"{checkpoints.NETWORK_SPEC} (a run's generator is WORKDIR/generator).")
  spec = checkpoints.load_network_spec(checkpoint)
  own = family_of(spec)
  if own is None:
    raise ExportError(f"--checkpoint {checkpoint!r} holds a {spec.get('class_name')!r} network, "
                      "which cannot be exported; edm exports "
                      f"{', '.join(models.EDM_CLASSES)}, edm2 {', '.join(models.EDM2_CLASSES)}, "
                      f"diffusers {stable_diffusion.CLASS_NAME}.")
  if own != family:
    raise ExportError(f"--checkpoint {checkpoint!r} holds a {spec['class_name']} network; export "
                      f"it with `{PROG} {own}`, not `{family}`.")
  return spec


def _check_file_dst(dst: str | None, family: str, overwrite: bool) -> tuple[str, str]:
  """(state dict path, spec path) of an edm / edm2 --dst."""
  if not dst:
    raise ExportError(f"`{family}` needs --dst (a .pt file).")
  dst = os.path.abspath(dst)
  root, ext = os.path.splitext(dst)
  if ext.lower() not in TORCH_EXTENSIONS:
    raise ExportError(f"--dst {dst!r} must name a {' or '.join(TORCH_EXTENSIONS)} file (its spec "
                      "goes to the .json beside it).")
  spec_path = root + ".json"
  for path in (dst, spec_path):
    if os.path.isdir(path):
      raise ExportError(f"{path!r} is a directory; --dst names a file.")
    if os.path.exists(path) and not overwrite:
      raise ExportError(f"{path!r} already exists; choose another --dst or pass --overwrite.")
  return dst, spec_path


def _check_folder_dst(dst: str | None, overwrite: bool) -> str:
  if not dst:
    raise ExportError("`diffusers` needs --dst (the output folder).")
  dst = os.path.abspath(dst)
  if os.path.exists(dst) and not os.path.isdir(dst):
    raise ExportError(f"--dst {dst!r} is a file; it should name a folder.")
  if os.path.isdir(dst) and os.listdir(dst) and not overwrite:
    raise ExportError(f"--dst {dst!r} already exists and is not empty; choose another one or "
                      "pass --overwrite.")
  return dst


def _num_values(state_dict: dict[str, np.ndarray]) -> int:
  return int(sum(v.size for v in state_dict.values()))


# ---------------------------------------------------------------------------------------------
# EDM / EDM2: a torch state dict and its constructor.
# ---------------------------------------------------------------------------------------------


def network_state_dict(checkpoint: str, spec: dict[str, Any]) -> dict[str, np.ndarray]:
  """The official state dict of an EDM / EDM2 network checkpoint, checked by reading it back."""
  denoiser = models.build_denoiser(spec)
  res, _, channels, label_dim = models.spec_image_shape(spec)
  params = checkpoints.load_network_params(
      checkpoint, models.abstract_params(denoiser, (res, res, channels), label_dim))
  if family_of(spec) == "edm":
    state_dict = to_torch.edm_state_dict(params, denoiser.module)
    read = lambda sd: edm.torch_state_dict_to_flax(sd, denoiser)
  else:
    state_dict = to_torch.edm2_state_dict(params)
    read = lambda sd: edm2.torch_state_dict_to_flax(sd, denoiser)
  to_torch.check_inverse(params, state_dict, read, spec["class_name"])
  return state_dict


def export_network(family: str, checkpoint: str | None, dst: str | None, *,
                   overwrite: bool = False) -> Summary:
  """`edm` / `edm2`: writes the state dict to `dst` (.pt) and the spec to the .json beside it."""
  spec = read_spec(checkpoint, family)
  dst, spec_path = _check_file_dst(dst, family, overwrite)
  torch = _import("torch", "Writing a torch state dict")
  state_dict = network_state_dict(checkpoint, spec)
  record = {"class_name": spec["class_name"], "kwargs": spec["kwargs"],
            "official_module": OFFICIAL_MODULES[spec["class_name"]]}
  record.update({k: spec[k] for k in ("sigma_init", "step") if k in spec})
  record["source"] = os.path.abspath(checkpoint)
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  tensors = {name: torch.from_numpy(value) for name, value in state_dict.items()}
  _write_atomically(dst, lambda path: torch.save(tensors, path))
  _write_atomically(spec_path, lambda path: _write_json(path, record))
  return Summary(what=spec["class_name"] + _model_type(spec), checkpoint=checkpoint,
                 written=[dst, spec_path], num_tensors=len(state_dict),
                 num_params=_num_values(state_dict),
                 hint=f"{spec['class_name']}(**json.load(open({os.path.basename(spec_path)!r}))"
                 f"['kwargs']).load_state_dict(torch.load({os.path.basename(dst)!r}))")


def _model_type(spec: dict[str, Any]) -> str:
  model_type = spec["kwargs"].get("model_type")
  return f" ({model_type})" if model_type else ""


def _write_json(path: str, value: Any) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write("\n")


def _write_atomically(path: str, write) -> None:
  """`write(tmp)` into a file of the same name in a temporary folder beside `path`, then moved
  to `path` (no half-written file; torch.save names its archive after the file)."""
  tmp = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=".export-")
  try:
    write(os.path.join(tmp, os.path.basename(path)))
    os.replace(os.path.join(tmp, os.path.basename(path)), path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Stable Diffusion: a diffusers folder.
# ---------------------------------------------------------------------------------------------


def _part_configs(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
  """The config files of the diffusers folder, from the spec's kwargs (as the folder had them)."""
  kw = spec["kwargs"]
  configs = {}
  for part, (_, _, class_name, _) in DIFFUSERS_PARTS.items():
    config = dict(kw[part])
    if part == "text_encoder":
      config.setdefault("architectures", [class_name])
    else:
      config["_class_name"] = class_name
    configs[part] = config
  configs["scheduler"] = dict(kw["scheduler"])
  configs["scheduler"].setdefault("_class_name", "PNDMScheduler")
  return configs


def _model_index(configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """`model_index.json` of a StableDiffusionPipeline without safety checker."""
  index = {"_class_name": "StableDiffusionPipeline"}
  version = configs["unet"].get("_diffusers_version")
  if version:
    index["_diffusers_version"] = version
  for part, (_, _, class_name, library) in DIFFUSERS_PARTS.items():
    index[part] = [library, class_name]
  index["tokenizer"] = ["transformers", "CLIPTokenizer"]
  index["scheduler"] = ["diffusers", configs["scheduler"]["_class_name"]]
  index.update(safety_checker=[None, None], feature_extractor=[None, None],
               image_encoder=[None, None], requires_safety_checker=False)
  return index


def _write_diffusers(folder: str, spec: dict[str, Any], sd, params: dict[str, Any],
                     tokenizer_src: str, save_file) -> tuple[int, int]:
  """Writes every entry of the diffusers folder into `folder`; (tensors, values) written."""
  readers = {
      "unet": lambda s: sd_unet.unet_params(s, sd.unet),
      "vae": lambda s: sd_vae.vae_params(s, sd.vae)["params"],
      "text_encoder": lambda s: clip.text_encoder_params(s, sd.text_encoder),
  }
  exporters = {"unet": to_torch.unet_state_dict, "vae": to_torch.vae_state_dict,
               "text_encoder": to_torch.text_encoder_state_dict}
  configs = _part_configs(spec)
  tensors = values = 0
  for part, (weights_name, config_name, _, _) in DIFFUSERS_PARTS.items():
    state_dict = exporters[part](params[part])
    to_torch.check_inverse(params[part], state_dict, readers[part], part)
    os.makedirs(os.path.join(folder, part))
    save_file(state_dict, os.path.join(folder, part, weights_name), metadata={"format": "pt"})
    _write_json(os.path.join(folder, part, config_name), configs[part])
    tensors, values = tensors + len(state_dict), values + _num_values(state_dict)
    del state_dict  # one part's copy at a time
  shutil.copytree(tokenizer_src, os.path.join(folder, "tokenizer"))
  os.makedirs(os.path.join(folder, "scheduler"))
  _write_json(os.path.join(folder, "scheduler", SCHEDULER_CONFIG), configs["scheduler"])
  _write_json(os.path.join(folder, MODEL_INDEX), _model_index(configs))
  generator = spec["kwargs"].get("generator")
  if generator:
    t_init = int(generator["init_timestep"])
    record = {"init_timestep": t_init, "sigma_init": sd.denoiser.sigma_at(t_init)}
    record.update({k: spec[k] for k in ("step",) if k in spec})
    _write_json(os.path.join(folder, GENERATOR_RECORD), record)
  return tensors, values


def export_diffusers(checkpoint: str | None, dst: str | None, *,
                     overwrite: bool = False) -> Summary:
  """`diffusers`: writes a diffusers Stable Diffusion folder of a sid_jax SD model to `dst`.

  Everything is written into a temporary folder beside `dst` first and moved in at the end, so a
  failed export leaves `dst` as it was.
  """
  spec = read_spec(checkpoint, "diffusers")
  dst = _check_folder_dst(dst, overwrite)
  st = _import("safetensors.numpy", "Writing diffusers safetensors")
  tokenizer_src = os.path.join(checkpoint, stable_diffusion.TOKENIZER_DIR)
  if not os.path.isdir(tokenizer_src):
    raise FileNotFoundError(f"--checkpoint {checkpoint!r} has no {stable_diffusion.TOKENIZER_DIR}/"
                            " folder (a Stable Diffusion model written by sid_jax has one).")
  sd, params = stable_diffusion.load(checkpoint)
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=".export-")
  try:
    tensors, values = _write_diffusers(tmp, spec, sd, params, tokenizer_src, st.save_file)
    os.makedirs(dst, exist_ok=True)
    for entry in DIFFUSERS_ENTRIES:  # --overwrite: no file of an earlier export survives
      path = os.path.join(dst, entry)
      if os.path.isdir(path):
        shutil.rmtree(path)
      elif os.path.exists(path):
        os.remove(path)
    for entry in sorted(os.listdir(tmp)):
      os.replace(os.path.join(tmp, entry), os.path.join(dst, entry))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  generator = spec["kwargs"].get("generator")
  what = "StableDiffusion" + (f" generator (t_init = {generator['init_timestep']})"
                              if generator else "")
  return Summary(what=what, checkpoint=checkpoint,
                 written=[os.path.join(dst, e) for e in DIFFUSERS_ENTRIES
                          if os.path.exists(os.path.join(dst, e))],
                 num_tensors=tensors, num_params=values,
                 hint=f"StableDiffusionPipeline.from_pretrained({dst!r})")


# ---------------------------------------------------------------------------------------------
# The command line.
# ---------------------------------------------------------------------------------------------


def execute(args: list[str]) -> Summary:
  """Exports as the parsed FLAGS and the positional `args` (the subcommand) say."""
  if len(args) != 1 or args[0] not in FAMILIES:
    raise ExportError(f"expected one subcommand, {', '.join(FAMILIES)}, got "
                      f"{' '.join(args) or 'none'}; see {PROG} --help.")
  family = args[0]
  if family == "diffusers":
    return export_diffusers(FLAGS.checkpoint, FLAGS.dst, overwrite=FLAGS.overwrite)
  return export_network(family, FLAGS.checkpoint, FLAGS.dst, overwrite=FLAGS.overwrite)


def run(argv: list[str]) -> Summary:
  """Parses `argv` (argv[0] is the program name) and exports; errors are raised (tests,
  notebooks)."""
  FLAGS.unparse_flags()
  return execute(FLAGS(list(argv))[1:])


def main(argv: list[str]) -> None:
  summary = cli.report_errors("sid_jax.export", lambda: execute(argv[1:]),
                              (ValueError, FileNotFoundError, ImportError))
  print("\n".join(summary.lines()))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.quiet_parser(FLAGS, __doc__, "sid_jax.export"))
