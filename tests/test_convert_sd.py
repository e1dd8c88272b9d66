"""`python -m sid_jax.convert sd`: diffusers Stable Diffusion folders and SiD-LSG generator pickles.

A tiny Stable Diffusion folder is written to disk the way diffusers / transformers write a real
one (`save_pretrained` of torch `UNet2DConditionModel`, `AutoencoderKL` and `CLIPTextModel` built
from `stable_diffusion.tiny_spec`, the byte-level CLIP tokenizer, a PNDM scheduler config), once
per module and per SD version. The converted checkpoint is read back with
`stable_diffusion.load` and every part is compared with the torch modules in float32. Every
parameter is redrawn first (diffusers zero-initialises some output layers) so that every weight
matters.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import shutil
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from diffusers import UNet2DConditionModel as TorchUNet
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sid_jax.models import stable_diffusion
from sid_jax.convert import __main__ as convert_main
from sid_jax.models import official
from sid_jax.weights import diffusers as diffusers_folder
from sid_jax.data import byte_tokenizer
from sid_jax.nets import sd_vae

ATOL = 1e-4  # float32 parity of the ported networks with the torch modules.
TIMESTEPS = (20, 625, 979)
PROMPTS = ("a red cat", "")


def _public(config: dict) -> dict:
  """A diffusers config without its bookkeeping entries (`_class_name`, ...)."""
  return {k: v for k, v in config.items() if not k.startswith("_")}


def _redraw(module: torch.nn.Module, seed: int) -> None:
  """Redraws every parameter of `module` with a seeded generator.

  Matrices and conv kernels ~ N(0, 1 / fan_in) (activations stay O(1)); normalisation weights
  ~ 1 + N(0, 0.1^2); biases and other vectors ~ N(0, 0.1^2). Nothing stays zero or one.
  """
  gen = torch.Generator().manual_seed(seed)
  norm_weights = {id(m.weight) for m in module.modules()
                  if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and
                  m.weight is not None}
  with torch.no_grad():
    for p in module.parameters():
      draw = torch.randn(p.shape, generator=gen)
      if p.ndim >= 2:
        p.copy_(draw / np.sqrt(p[0].numel()))
      elif id(p) in norm_weights:
        p.copy_(1 + 0.1 * draw)
      else:
        p.copy_(0.1 * draw)


def _torch_unet(spec: dict, seed: int) -> TorchUNet:
  torch.manual_seed(seed)
  unet = TorchUNet(**_public(spec["kwargs"]["unet"])).eval()
  _redraw(unet, seed)
  return unet


def _write_folder(root: pathlib.Path, sd2: bool) -> types.SimpleNamespace:
  """A diffusers Stable Diffusion folder of `tiny_spec(sd2=sd2)` and its torch modules."""
  spec = stable_diffusion.tiny_spec(sd2=sd2)
  kw = spec["kwargs"]
  unet = _torch_unet(spec, seed=1)
  torch.manual_seed(2)
  vae = TorchVAE(**_public(kw["vae"])).eval()
  _redraw(vae, seed=2)
  torch.manual_seed(3)
  text = CLIPTextModel(CLIPTextConfig(**_public(kw["text_encoder"]))).eval()
  _redraw(text, seed=3)
  unet.save_pretrained(root / "unet")
  vae.save_pretrained(root / "vae")
  text.save_pretrained(root / "text_encoder")
  byte_tokenizer.write_tiny_clip_tokenizer(root / "tokenizer", pad_token=kw["pad_token"])
  (root / "scheduler").mkdir()
  (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(kw["scheduler"]))
  return types.SimpleNamespace(root=root, spec=spec, unet=unet, vae=vae, text=text, sd2=sd2)


def _run(argv, capsys):
  """(exit code, stdout, stderr) of the CLI, without what the test printed before."""
  capsys.readouterr()
  code = convert_main.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
  """Getter of the tiny diffusers folder of an SD version, written and converted once:
  (folder namespace, dst, sd, params)."""
  built = {}

  def get(sd2: bool) -> types.SimpleNamespace:
    if sd2 not in built:
      torch.set_num_threads(1)
      folder = _write_folder(tmp_path_factory.mktemp("diffusers"), sd2=sd2)
      dst = tmp_path_factory.mktemp("converted") / "sd"
      code = convert_main.main(["sd", "--src", str(folder.root), "--dst", str(dst)])
      assert code == 0
      sd, params = stable_diffusion.load(str(dst))
      built[sd2] = types.SimpleNamespace(folder=folder, dst=dst, sd=sd, params=params)
    return built[sd2]

  return get


@pytest.fixture(params=[False, True], ids=["sd1", "sd2"])
def teacher(request, teachers):
  return teachers(request.param)


@pytest.fixture
def sd1_teacher(teachers):
  return teachers(False)


def _nchw(a) -> np.ndarray:
  return np.transpose(np.asarray(a, np.float32), (0, 3, 1, 2))


def _nhwc(a: np.ndarray) -> jax.Array:
  return jnp.asarray(np.transpose(a, (0, 2, 3, 1)))


def _unet_inputs(seed: int):
  rng = np.random.default_rng(seed)
  latents = rng.standard_normal((len(TIMESTEPS), 4, 8, 8)).astype(np.float32)
  emb = rng.standard_normal((len(TIMESTEPS), stable_diffusion.MAX_LENGTH, 32)).astype(np.float32)
  return latents, np.asarray(TIMESTEPS, np.int64), emb


def _assert_unet_matches(sd, unet_params, torch_unet, seed: int) -> None:
  latents, t, emb = _unet_inputs(seed)
  with torch.no_grad():
    ref = torch_unet(torch.from_numpy(latents), torch.from_numpy(t),
                     torch.from_numpy(emb)).sample.numpy()
  ours = _nchw(jax.jit(sd.unet.apply)({"params": unet_params}, _nhwc(latents),
                                      jnp.asarray(t, jnp.int32), jnp.asarray(emb)))
  assert ours.shape == ref.shape
  assert np.max(np.abs(ref)) > 0.5  # a non-trivial output
  err = np.max(np.abs(ours - ref))
  print(f"UNet: max |ref| {np.max(np.abs(ref)):.3g}, max abs error {err:.3g}")
  assert err <= ATOL, f"UNet max abs error {err}"


# ---------------------------------------------------------------------------------------------
# A diffusers folder.
# ---------------------------------------------------------------------------------------------


def test_checkpoint_contents(teacher):
  root, dst = teacher.folder.root, teacher.dst
  assert sorted(os.listdir(dst)) == ["network.json", "params", "source.json", "tokenizer"]
  spec = json.loads((dst / "network.json").read_text())
  assert spec["class_name"] == "StableDiffusion"
  for part in ("unet", "vae", "text_encoder"):
    assert spec["kwargs"][part] == json.loads((root / part / "config.json").read_text())
  assert spec["kwargs"]["scheduler"] == teacher.folder.spec["kwargs"]["scheduler"]
  assert "generator" not in spec["kwargs"]

  record = json.loads((dst / official.SOURCE_RECORD).read_text())
  weights = ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
             "vae/diffusion_pytorch_model.safetensors"]
  assert sorted(record["weights_sha256"]) == weights
  for name in weights:
    assert record["weights_sha256"][name] == official.sha256_file(str(root / name))
  assert record["source"] == str(root) and record["variant"] is None
  assert record["subfolders"] == list(diffusers_folder.SUBFOLDERS)
  assert record["unet_weights"] == "source" and record["generator"] is None
  n_torch = {"unet": teacher.folder.unet, "vae": teacher.folder.vae,
             "text_encoder": teacher.folder.text}
  for part, module in n_torch.items():
    # The port has every torch parameter; the text encoder's position_ids are a buffer.
    assert record["num_params"][part] == sum(p.numel() for p in module.parameters()), part


def test_unet_matches_diffusers(teacher):
  _assert_unet_matches(teacher.sd, teacher.params["unet"], teacher.folder.unet, seed=4)


def test_tokenizer_and_text_encoder_match_transformers(teacher):
  sd = teacher.sd
  ids = sd.tokenize(PROMPTS)
  ref_tok = CLIPTokenizer.from_pretrained(str(teacher.folder.root / "tokenizer"),
                                          local_files_only=True)
  ref_ids = ref_tok(list(PROMPTS), padding="max_length", max_length=77, truncation=True,
                    return_tensors="np")["input_ids"]
  np.testing.assert_array_equal(ids, ref_ids)
  # "a red cat" is <bos> a</w> r e d</w> c a t</w> <eos> then padding.
  assert ids[0, 0] == byte_tokenizer.BOS_ID and ids[0, 8] == byte_tokenizer.EOS_ID
  pad = 0 if teacher.folder.sd2 else byte_tokenizer.EOS_ID
  assert np.all(ids[0, 9:] == pad) and np.all(ids[1, 2:] == pad)

  with torch.no_grad():
    ref = teacher.folder.text(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
  ours = np.asarray(jax.jit(sd.encode_text)(teacher.params["text_encoder"], jnp.asarray(ids)))
  assert ours.shape == ref.shape == (2, 77, 32)
  assert np.max(np.abs(ref)) > 0.5
  err = np.max(np.abs(ours - ref))
  print(f"text encoder: max |ref| {np.max(np.abs(ref)):.3g}, max abs error {err:.3g}")
  assert err <= ATOL, f"text encoder max abs error {err}"


def test_vae_decode_matches_diffusers(teacher):
  sd, vae = teacher.sd, teacher.folder.vae
  z = np.random.default_rng(5).standard_normal((2, 4, 8, 8)).astype(np.float32)
  with torch.no_grad():
    ref = vae.decode(torch.from_numpy(z)).sample.numpy()
    ref_scaled = vae.decode(torch.from_numpy(z) / 0.18215).sample.numpy()
  decode = jax.jit(lambda p, x: sd.vae.apply({"params": p}, x, method=sd_vae.AutoencoderKL.decode))
  ours = _nchw(decode(teacher.params["vae"], _nhwc(z)))
  ours_scaled = _nchw(jax.jit(sd.decode)(teacher.params["vae"], _nhwc(z)))
  assert ours.shape == ref.shape == (2, 3, 16, 16)
  for a, b in ((ours, ref), (ours_scaled, ref_scaled)):
    assert np.max(np.abs(b)) > 0.5
    err = np.max(np.abs(a - b))
    print(f"VAE decode: max |ref| {np.max(np.abs(b)):.3g}, max abs error {err:.3g}")
    assert err <= ATOL, f"VAE decode max abs error {err}"
  assert np.max(np.abs(ref_scaled - ref)) > 0.1  # the scaling factor matters


def test_summary_and_overwrite(sd1_teacher, tmp_path, capsys):
  teacher = sd1_teacher
  dst = tmp_path / "again"
  code, out, err = _run(["sd", "--src", teacher.folder.root, "--dst", dst], capsys)
  assert code == 0, err
  counts = json.loads((teacher.dst / official.SOURCE_RECORD).read_text())["num_params"]
  assert f"converted StableDiffusion from {teacher.folder.root}" in out
  for part, n in counts.items():
    assert f"{part} {n:,}" in out
  assert f"written to:    {dst}" in out

  stale = dst / "tokenizer" / "tokenizer.json"
  stale.write_text("{}")
  code, _, err = _run(["sd", "--src", teacher.folder.root, "--dst", dst], capsys)
  assert code == 1 and "--overwrite" in err and stale.exists()
  code, _, err = _run(["sd", "--src", teacher.folder.root, "--dst", dst, "--overwrite"], capsys)
  assert code == 0, err
  assert not stale.exists()  # no file of the replaced model survives in tokenizer/


# ---------------------------------------------------------------------------------------------
# A SiD-LSG generator pickle.
# ---------------------------------------------------------------------------------------------


def test_generator_pickle(sd1_teacher, tmp_path, capsys):
  teacher = sd1_teacher
  generator = _torch_unet(teacher.folder.spec, seed=7)
  pkl = tmp_path / "sid_lsg.pkl"
  with open(pkl, "wb") as f:
    pickle.dump({"ema": generator}, f)
  dst = tmp_path / "gen"
  code, out, err = _run(["sd", "--src", teacher.folder.root, "--generator", pkl, "--dst", dst],
                        capsys)
  assert code == 0, err
  assert f"UNet from:     {pkl} ['ema']" in out

  sd, params = stable_diffusion.load(str(dst))
  _assert_unet_matches(sd, params["unet"], generator, seed=6)
  for part in ("text_encoder", "vae"):
    jax.tree.map(np.testing.assert_array_equal, params[part], teacher.params[part])
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: np.max(np.abs(a - b)), params["unet"],
                                       teacher.params["unet"]))
  assert min(diffs) > 0  # every UNet leaf is the generator's, none the teacher's

  record = json.loads((dst / official.SOURCE_RECORD).read_text())
  assert record["unet_weights"] == "generator"
  assert record["generator"] == {"source": str(pkl),
                                 "source_sha256": official.sha256_file(str(pkl)),
                                 "key": "ema", "init_timestep": 625}
  assert sorted(record["weights_sha256"]) == ["text_encoder/model.safetensors",
                                              "vae/diffusion_pytorch_model.safetensors"]
  spec = json.loads((dst / "network.json").read_text())
  teacher_spec = json.loads((teacher.dst / "network.json").read_text())
  # The teacher's architecture, marked as a one-step generator for `sid_jax.sample`.
  assert spec["kwargs"].pop("generator") == {"init_timestep": 625}
  assert spec == teacher_spec

  code, out, err = _run(["sd", "--src", teacher.folder.root, "--generator", pkl, "--dst",
                         tmp_path / "other", "--key", "G_ema"], capsys)
  assert code == 1 and out == ""
  assert "no key 'G_ema'" in err and "'ema' (UNet2DConditionModel)" in err

  # A generator configured unlike the teacher folder (same shapes, other head count).
  other = TorchUNet(**dict(_public(teacher.folder.spec["kwargs"]["unet"]),
                           attention_head_dim=8)).eval()
  with open(tmp_path / "other.pkl", "wb") as f:
    pickle.dump({"ema": other}, f)
  code, _, err = _run(["sd", "--src", teacher.folder.root, "--generator", tmp_path / "other.pkl",
                       "--dst", tmp_path / "other"], capsys)
  assert code == 1 and "attention_head_dim: 4 != 8" in err
  assert not (tmp_path / "other").exists()


# ---------------------------------------------------------------------------------------------
# Errors for people.
# ---------------------------------------------------------------------------------------------


def test_missing_folders(sd1_teacher, tmp_path, capsys):
  teacher = sd1_teacher
  code, out, err = _run(["sd", "--src", tmp_path / "nope", "--dst", tmp_path / "o"], capsys)
  assert code == 1 and out == "" and err.startswith("sid_jax.convert: error: ")
  assert str(tmp_path / "nope") in err and "no such directory" in err

  partial = tmp_path / "partial"
  for name in ("unet", "text_encoder", "tokenizer", "scheduler"):
    (partial / name).mkdir(parents=True)
  code, _, err = _run(["sd", "--src", partial, "--dst", tmp_path / "o"], capsys)
  assert code == 1 and f"{partial / 'vae'} is missing" in err
  assert not (tmp_path / "o").exists()

  code, _, err = _run(["sd", "--src", teacher.folder.root, "--dst", tmp_path / "o", "--key",
                       "ema"], capsys)
  assert code == 1 and "--generator" in err
  code, _, err = _run(["sd", "--src", teacher.folder.root, "--dst", tmp_path / "o",
                       "--generator", tmp_path / "none.pkl"], capsys)
  assert code == 1 and "none.pkl" in err and "no such file" in err
  code, _, err = _run(["sd", "--src", teacher.folder.root, "--dst", tmp_path / "o", "--variant",
                       "fp16"], capsys)
  assert code == 1 and "model.fp16.safetensors" in err


def test_generator_needs_diffusers(sd1_teacher, tmp_path, capsys, monkeypatch):
  pkl = tmp_path / "gen.pkl"
  pkl.write_bytes(pickle.dumps({"ema": None}))
  monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` raises ImportError.
  code, _, err = _run(["sd", "--src", sd1_teacher.folder.root, "--generator", pkl, "--dst",
                       tmp_path / "o"], capsys)
  assert code == 1 and "pip install 'sid_jax[convert]' diffusers" in err


def test_bin_weight_files_convert_to_the_same_params(sd1_teacher, tmp_path, capsys):
  """A folder with PyTorch .bin files (older diffusers / transformers exports) converts to the
  same parameters as its safetensors twin."""
  src = tmp_path / "bin_folder"
  shutil.copytree(sd1_teacher.folder.root, src)
  for part, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                     ("text_encoder", "model")):
    (src / part / f"{stem}.safetensors").unlink()
    module = getattr(sd1_teacher.folder, {"text_encoder": "text"}.get(part, part))
    torch.save(module.state_dict(), src / part / ("pytorch_model.bin" if stem == "model"
                                                  else f"{stem}.bin"))
  code, _, err = _run(["sd", "--src", src, "--dst", tmp_path / "out"], capsys)
  assert code == 0, err
  _, params = stable_diffusion.load(str(tmp_path / "out"))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(sd1_teacher.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  record = json.loads((tmp_path / "out" / official.SOURCE_RECORD).read_text())
  assert sorted(record["weights_sha256"]) == ["text_encoder/pytorch_model.bin",
                                              "unet/diffusion_pytorch_model.bin",
                                              "vae/diffusion_pytorch_model.bin"]
