"""Weight files -> `{torch name: numpy array}`: one reader per format, and Hugging Face folders.

* `read_safetensors(path)`: read as numpy; a bfloat16 file is read through torch.
* `read_torch(path, key=None)`: a torch state dict (`.bin`, `.pt`, `.pth`), read with
  `torch.load(weights_only=True)`, which never runs code from the file.
* `read_npz(path)`: an `.npz` whose keys are the torch names (no pickles allowed).
* `read_sharded(index_path)`: a Hugging Face `*.index.json` and the shards it lists.
* `read_file(path)`: any of the above, by the file name.
* `weight_files` / `read_folder` / `read_config`: the weights and `config.json` of a Hugging Face
  or diffusers model folder (`model.safetensors`, its sharded index, `pytorch_model.bin`, ...,
  with an optional variant such as `model.fp16.safetensors`).

torch is an optional dependency (the `[convert]` extra), imported only to read torch files.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any, Callable, Mapping

import numpy as np

from sid_jax.weights import pickles
from sid_jax.weights.strict import WeightFileError, to_numpy

StateDict = dict[str, np.ndarray]

CONVERT_EXTRA = "pip install 'sid_jax[convert]'"
TORCH_EXTENSIONS = (".bin", ".pt", ".pth")
INDEX_SUFFIX = ".index.json"
# The file stems (safetensors, torch) of a transformers model folder; diffusers' UNet / VAE
# folders use `diffusion_pytorch_model` for both.
HF_STEMS = ("model", "pytorch_model")


def import_torch(why: str):
  """The torch module; an ImportError that says `why` it is needed and how to install it."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"{why} needs PyTorch, an optional dependency: {CONVERT_EXTRA}.") from e
  return torch


# ---------------------------------------------------------------------------------------------
# One file.
# ---------------------------------------------------------------------------------------------


def read_safetensors(path: str | os.PathLike) -> StateDict:
  """A safetensors file as numpy arrays (bfloat16 tensors become float32, through torch)."""
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  try:
    return st_numpy.load_file(path)
  except TypeError:  # numpy has no bfloat16: read through torch.
    import_torch(f"Reading the bfloat16 tensors of {path} (or convert them to float16 / float32 "
                 "safetensors first)")
    from safetensors import torch as st_torch  # pylint: disable=g-import-not-at-top
    return {k: to_numpy(v) for k, v in st_torch.load_file(path).items()}


def read_torch(path: str | os.PathLike, key: str | None = None) -> StateDict:
  """A torch state dict (names -> tensors) saved with `torch.save`, as numpy arrays.

  Args:
    path: a `.bin` / `.pt` / `.pth` file, read with `torch.load(weights_only=True)`.
    key: where the file is a dict that holds the state dict under `key` (e.g. `{'ema': ...}`),
      that entry is read.

  Raises:
    ImportError: torch is not installed.
    ValueError: the file is not a plain state dict (every entry must be a tensor).
  """
  path = os.fspath(path)
  torch = import_torch(f"Reading {path}")
  if zipfile.is_zipfile(path):
    pickles.check_torch_archive(path)  # CRCs: torch.load reads a flipped byte as another value
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise WeightFileError(f"torch.load({path!r}, weights_only=True) failed: {e}\nOnly plain "
                          "state dicts (names -> tensors) are read; save one with "
                          "torch.save(net.state_dict(), path).") from None
  if key is not None and isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
    obj = obj[key]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict (names -> tensors).")
  out = {}
  for name, value in obj.items():
    if not isinstance(value, torch.Tensor):
      holder = f" and has no key {key!r} holding a state dict" if key is not None else ""
      raise ValueError(f"{path} is not a state dict{holder}: its entry {name!r} is a "
                       f"{type(value).__name__}, not a tensor. Save one with "
                       "torch.save(net.state_dict(), path).")
    pickles.check_torch_tensor(path, str(name), value)  # torch.load accepts zero strides
    out[str(name)] = to_numpy(value)
  return out


def read_npz(path: str | os.PathLike) -> StateDict:
  """An `.npz` of torch names -> arrays (object arrays are refused)."""
  with np.load(os.fspath(path), allow_pickle=False) as z:
    return {k: np.asarray(z[k]) for k in z.files}


def read_sharded(index_path: str | os.PathLike) -> StateDict:
  """The shards listed by a Hugging Face `*.safetensors.index.json` / `*.bin.index.json`."""
  index_path = os.fspath(index_path)
  folder = os.path.dirname(index_path)
  with open(index_path, encoding="utf-8") as f:
    weight_map = json.load(f)["weight_map"]
  out: StateDict = {}
  for shard in sorted(set(weight_map.values())):
    shard_path = os.path.join(folder, shard)
    if not os.path.exists(shard_path):
      raise FileNotFoundError(f"{os.path.basename(index_path)} in {folder} lists the shard "
                              f"{shard}, which is missing.")
    out.update(read_file(shard_path))
  return out


def read_file(path: str | os.PathLike) -> StateDict:
  """The state dict in `path`, read by its file name (see the module docstring)."""
  path = os.fspath(path)
  readers: dict[str, Callable[[str], StateDict]] = {
      INDEX_SUFFIX: read_sharded, ".safetensors": read_safetensors, ".npz": read_npz,
      **{ext: read_torch for ext in TORCH_EXTENSIONS}}
  for suffix, read in readers.items():
    if path.lower().endswith(suffix):
      return read(path)
  raise ValueError(f"Unknown weight file type: {path} (expected {', '.join(readers)}).")


# ---------------------------------------------------------------------------------------------
# Model folders.
# ---------------------------------------------------------------------------------------------


def _candidates(variant: str | None, stems: tuple[str, str]) -> list[str]:
  infix = f".{variant}" if variant else ""
  return [f"{stems[0]}{infix}.safetensors", f"{stems[0]}{infix}.safetensors{INDEX_SUFFIX}",
          f"{stems[1]}{infix}.bin", f"{stems[1]}{infix}.bin{INDEX_SUFFIX}"]


def weight_files(folder: str | os.PathLike, variant: str | None = None,
                 stems: tuple[str, str] = HF_STEMS) -> list[str]:
  """The files `read_folder` reads, by preference: `<stems[0]>.safetensors`, its sharded index,
  `<stems[1]>.bin`, its sharded index (`variant` 'fp16': `<stem>.fp16.safetensors`, ...).

  Returns one weight file, or an index followed by its shards; [] if there is none.
  """
  folder = os.fspath(folder)
  for name in _candidates(variant, stems):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      continue
    if not name.endswith(INDEX_SUFFIX):
      return [path]
    with open(path, encoding="utf-8") as f:
      shards = sorted(set(json.load(f).get("weight_map", {}).values()))
    return [path] + [os.path.join(folder, s) for s in shards]
  return []


def read_folder(folder: str | os.PathLike, variant: str | None = None, *,
                stems: tuple[str, str] = HF_STEMS) -> StateDict:
  """The state dict stored in a Hugging Face model folder, as numpy arrays (see `weight_files`).

  Raises:
    FileNotFoundError naming the files looked for.
    ImportError if only PyTorch files exist and torch is not installed.
  """
  files = weight_files(folder, variant, stems)
  if not files:
    raise FileNotFoundError(f"No weights in {os.fspath(folder)}: looked for "
                            f"{', '.join(_candidates(variant, stems))}.")
  return read_file(files[0])


def read_config(folder: str | os.PathLike, name: str = "config.json") -> dict[str, Any]:
  """The JSON file `name` (`config.json`) of a model folder."""
  path = os.path.join(os.fspath(folder), name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No {name} in {os.fspath(folder)}.")
  with open(path, encoding="utf-8") as f:
    return json.load(f)
