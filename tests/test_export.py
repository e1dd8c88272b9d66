"""`python -m sid_jax.export`: sid_jax checkpoints -> official PyTorch state dicts and diffusers.

EDM / EDM2: every golden fixture's official state dict is converted (the importer of
`sid_jax.convert`), saved as a network checkpoint and exported; the export must be the fixture's
state dict bit for bit (names, shapes, dtypes, values, buffers included).

Stable Diffusion: a tiny random SD model saved as a SiD-LSG generator is exported to a diffusers
folder, loaded strictly by diffusers and transformers, and the one-step image is computed in
PyTorch from the lsg_spec §2 formula written out here; it must equal sid_jax's image.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from sid_jax import checkpoints, export, generators
from sid_jax.models import build_denoiser, official, stable_diffusion
from sid_jax.weights import to_torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTDATA = ROOT / "tests" / "testdata"
EDM_FIXTURES = ("edm_songunet_ddpmpp", "edm_songunet_ncsnpp", "edm_dhariwalunet_adm",
                "vp_songunet", "ve_songunet", "sida_encoder_ddpmpp", "sida_encoder_adm")
EDM2_FIXTURES = ("edm2_unet", "edm2_generator", "edm2_precond_nvidia")
PROMPTS = ["a red cat", "", "an oil painting of a lighthouse"]
SEEDS = [4, 0, 7]
T_INIT = 625


def _fixture(name):
  """(spec, official state dict) of a golden fixture."""
  with np.load(TESTDATA / f"{name}.npz", allow_pickle=False) as z:
    config = json.loads(str(z["config_json"]))
    cls = json.loads(str(z["meta_json"]))["cls"]
    state_dict = {k[len("param/"):]: z[k] for k in z.files if k.startswith("param/")}
  return {"class_name": cls, "kwargs": config}, state_dict


def _export(argv):
  return export.run(["sid_jax.export", *map(str, argv)])


def _checkpoint(tmp_path, family, name, **extra):
  """The fixture converted by `sid_jax.convert`'s importer and saved as a network checkpoint."""
  spec, state_dict = _fixture(name)
  params = official.FAMILIES[family][1](state_dict, build_denoiser(spec))
  directory = tmp_path / "ckpt"
  checkpoints.save_network(str(directory), params, dict(spec, **extra))
  return directory, spec, state_dict


@pytest.mark.parametrize("family,name", [("edm", n) for n in EDM_FIXTURES] +
                         [("edm2", n) for n in EDM2_FIXTURES])
def test_state_dict_round_trip_is_bit_exact(tmp_path, family, name):
  directory, spec, golden = _checkpoint(tmp_path, family, name, sigma_init=2.5, step=12)
  summary = _export([family, "--checkpoint", directory, "--dst", tmp_path / "gen.pt"])
  assert summary.written == [str(tmp_path / "gen.pt"), str(tmp_path / "gen.json")]
  exported = torch.load(tmp_path / "gen.pt", map_location="cpu", weights_only=True)
  assert isinstance(exported, dict)
  assert sorted(exported) == sorted(golden)
  for key, want in golden.items():
    got = exported[key]
    assert isinstance(got, torch.Tensor), key
    got = got.numpy()
    assert got.dtype == want.dtype and got.shape == want.shape, (key, got.dtype, got.shape)
    assert got.tobytes() == want.tobytes(), key
  assert summary.num_tensors == len(golden)
  assert summary.num_params == sum(v.size for v in golden.values())
  record = json.loads((tmp_path / "gen.json").read_text())
  assert record["class_name"] == spec["class_name"] and record["kwargs"] == spec["kwargs"]
  assert record["sigma_init"] == 2.5 and record["step"] == 12
  assert record["official_module"] == export.OFFICIAL_MODULES[spec["class_name"]]


def test_the_inverse_is_checked():
  spec, golden = _fixture("edm_songunet_ddpmpp")
  denoiser = build_denoiser(spec)
  params = official.FAMILIES["edm"][1](golden, denoiser)
  exported = to_torch.edm_state_dict(params, denoiser.module)
  read = lambda sd: official.FAMILIES["edm"][1](sd, denoiser)
  to_torch.check_inverse(params, exported, read, "EDMPrecond")
  name = "model.enc.16x16_conv.weight"
  bad = dict(exported, **{name: exported[name] + np.float32(1e-3)})
  with pytest.raises(ValueError, match="enc_16x16_conv/kernel: read back with other values"):
    to_torch.check_inverse(params, bad, read, "EDMPrecond")
  # A kernel of a square conv transposed the wrong way has the right shape and the wrong values.
  assert to_torch.torch_layout(("conv", "kernel"), np.zeros((3, 3, 4, 5))).shape == (5, 4, 3, 3)
  assert to_torch.torch_layout(("dense", "kernel"), np.zeros((4, 5))).shape == (5, 4)
  assert to_torch.torch_layout(("unet", "out_gain"), np.zeros(())).shape == ()


# ---------------------------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------------------------


def test_errors(tmp_path):
  directory, _, _ = _checkpoint(tmp_path, "edm2", "edm2_generator", sigma_init=2.5)
  with pytest.raises(FileNotFoundError, match="no such directory"):
    _export(["edm", "--checkpoint", tmp_path / "nothing", "--dst", tmp_path / "g.pt"])
  with pytest.raises(FileNotFoundError, match="has no network.json"):
    _export(["edm", "--checkpoint", tmp_path, "--dst", tmp_path / "g.pt"])
  with pytest.raises(ValueError, match=r"EDM_2_Precond_Generator network; export it with "
                     r"`python -m sid_jax.export edm2`, not `edm`"):
    _export(["edm", "--checkpoint", directory, "--dst", tmp_path / "g.pt"])
  with pytest.raises(ValueError, match=r"with `python -m sid_jax.export edm2`, not `diffusers`"):
    _export(["diffusers", "--checkpoint", directory, "--dst", tmp_path / "sd"])
  with pytest.raises(ValueError, match=r"must name a \.pt or \.pth file"):
    _export(["edm2", "--checkpoint", directory, "--dst", tmp_path / "g.safetensors"])
  with pytest.raises(ValueError, match="expected one subcommand"):
    _export(["torch", "--checkpoint", directory, "--dst", tmp_path / "g.pt"])
  with pytest.raises(ValueError, match="`edm2` needs --dst"):
    _export(["edm2", "--checkpoint", directory])
  (tmp_path / "g.json").write_text("{}")
  with pytest.raises(ValueError, match=r"g\.json' already exists; .* --overwrite"):
    _export(["edm2", "--checkpoint", directory, "--dst", tmp_path / "g.pt"])
  assert not (tmp_path / "g.pt").exists()  # nothing was written
  _export(["edm2", "--checkpoint", directory, "--dst", tmp_path / "g.pt", "--overwrite"])
  assert json.loads((tmp_path / "g.json").read_text())["class_name"] == "EDM_2_Precond_Generator"
  unknown = tmp_path / "unknown"
  unknown.mkdir()
  (unknown / checkpoints.NETWORK_SPEC).write_text(json.dumps({"class_name": "Gaussian"}))
  with pytest.raises(ValueError, match="'Gaussian' network, which cannot be exported"):
    _export(["edm", "--checkpoint", unknown, "--dst", tmp_path / "g.pt"])


def test_missing_torch_names_the_extra(tmp_path, monkeypatch):
  directory, _, _ = _checkpoint(tmp_path, "edm2", "edm2_generator")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
  with pytest.raises(ImportError, match=r"needs torch, .*pip install -e \.\[convert\]"):
    _export(["edm2", "--checkpoint", directory, "--dst", tmp_path / "g.pt"])


def test_command_line_errors_are_one_line_with_status_2(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  run = lambda *args: subprocess.run([sys.executable, "-m", "sid_jax.export", *map(str, args)],
                                     cwd=ROOT, env=env, capture_output=True, text=True,
                                     timeout=300)
  out = run("edm", "--checkpoint", tmp_path / "nothing", "--dst", tmp_path / "g.pt")
  assert out.returncode == 2, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert lines[-1].startswith("sid_jax.export: error: --checkpoint ") and "no such" in lines[-1]
  out = run("edm", "--nonsense")
  assert out.returncode == 2 and "error:" in out.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------
# Stable Diffusion -> diffusers.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lsg_generators(tmp_path_factory):
  """Getter of a tiny SD model (SD 1.x or 2.x settings) with every weight perturbed away from its
  init, saved as a SiD-LSG run's generator (t_init = 625) and exported to a diffusers folder;
  each built once."""
  built = {}

  def get(sd2: bool):
    if sd2 not in built:
      root = tmp_path_factory.mktemp("lsg")
      spec = stable_diffusion.tiny_spec(sd2=sd2)
      tokenizer_dir = stable_diffusion.tiny_tokenizer_dir(spec)
      sd = stable_diffusion.build(spec, tokenizer_dir)
      rng = np.random.default_rng(1)
      params = jax.tree.map(  # nonzero biases, norm scales off one
          lambda a: (a + 0.05 * rng.standard_normal(a.shape)).astype(np.float32),
          stable_diffusion.random_params(sd, 0))
      spec["kwargs"]["generator"] = {"init_timestep": T_INIT}
      gen_dir = root / "generator"
      stable_diffusion.save(str(gen_dir), dict(spec, step=40), params, tokenizer_dir)
      dst = root / "diffusers"
      summary = _export(["diffusers", "--checkpoint", gen_dir, "--dst", dst])
      built[sd2] = {"dir": gen_dir, "dst": dst, "params": params, "summary": summary}
    return built[sd2]

  return get


@pytest.fixture(params=[False, True], ids=["sd1", "sd2"])
def lsg_generator(request, lsg_generators):
  return lsg_generators(request.param)


@pytest.fixture
def sd1_generator(lsg_generators):
  return lsg_generators(False)


def test_diffusers_folder_contents(sd1_generator):
  dst = sd1_generator["dst"]
  assert sorted(os.listdir(dst)) == ["generator.json", "model_index.json", "scheduler",
                                     "text_encoder", "tokenizer", "unet", "vae"]
  assert sorted(os.listdir(dst / "unet")) == ["config.json",
                                              "diffusion_pytorch_model.safetensors"]
  assert sorted(os.listdir(dst / "text_encoder")) == ["config.json", "model.safetensors"]
  record = json.loads((dst / "generator.json").read_text())
  assert record["init_timestep"] == T_INIT and record["step"] == 40
  np.testing.assert_allclose(record["sigma_init"], 2.5017057, rtol=1e-6)
  summary = sd1_generator["summary"]
  leaves = jax.tree.leaves(sd1_generator["params"])
  assert summary.num_tensors == len(leaves)
  assert summary.num_params == sum(a.size for a in leaves)


def test_diffusers_loads_strictly(lsg_generator):
  from diffusers import AutoencoderKL, UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextModel  # pylint: disable=g-import-not-at-top
  dst = str(lsg_generator["dst"])
  for cls, sub in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae")):
    _, info = cls.from_pretrained(dst, subfolder=sub, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys",
                                         "error_msgs")), (sub, info)
  _, info = CLIPTextModel.from_pretrained(os.path.join(dst, "text_encoder"),
                                          output_loading_info=True)
  assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys",
                                       "error_msgs")), info


def _torch_one_step(dst: str, prompts, z_nchw: np.ndarray) -> np.ndarray:
  """The SiD-LSG one-step image (lsg_spec §2) in PyTorch from the exported pipeline:
  x_t = sqrt(1 - abar_625) z, eps = UNet(x_t, 625, E(prompt)),
  x0 = (x_t - sqrt(1 - abar_625) eps) / sqrt(abar_625), image = VAE.decode(x0 / scaling)."""
  from diffusers import StableDiffusionPipeline  # pylint: disable=g-import-not-at-top
  pipe = StableDiffusionPipeline.from_pretrained(dst)
  assert pipe.safety_checker is None
  acp = pipe.scheduler.alphas_cumprod[T_INIT].to(torch.float32)
  ids = pipe.tokenizer(list(prompts), padding="max_length", max_length=77, truncation=True,
                       return_tensors="pt").input_ids
  with torch.no_grad():
    emb = pipe.text_encoder(ids)[0]
    x_t = torch.sqrt(1 - acp) * torch.from_numpy(z_nchw)
    t = torch.full((len(prompts),), T_INIT, dtype=torch.long)
    eps = pipe.unet(x_t, t, emb).sample
    x0 = (x_t - torch.sqrt(1 - acp) * eps) / torch.sqrt(acp)
    image = pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample
  return image.numpy().transpose(0, 2, 3, 1)


def test_one_step_image_equals_sid_jax(lsg_generator):
  torch.set_num_threads(1)
  gen = generators.load(str(lsg_generator["dir"]))
  assert gen.init_timestep == T_INIT
  prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(SEEDS))]
  ours = gen.generate(SEEDS, prompts)
  z = gen.latents(SEEDS).transpose(0, 3, 1, 2)
  ref = _torch_one_step(str(lsg_generator["dst"]), prompts, np.ascontiguousarray(z))
  assert ours.shape == ref.shape == (3, 16, 16, 3)
  assert np.std(ref) > 0.1 and np.abs(ref[0] - ref[1]).mean() > 0.01  # non-trivial images
  err = np.max(np.abs(ours - ref))
  print(f"max |image| {np.max(np.abs(ref)):.3g}, max abs difference {err:.3g}")
  assert err <= 2e-5 * max(1.0, float(np.max(np.abs(ref))))


def test_diffusers_overwrite_replaces_the_folder(sd1_generator, tmp_path):
  dst = tmp_path / "out"
  dst.mkdir()
  (dst / "unet").mkdir()
  (dst / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"stale")
  (dst / "notes.txt").write_text("kept")
  with pytest.raises(ValueError, match="already exists and is not empty"):
    _export(["diffusers", "--checkpoint", sd1_generator["dir"], "--dst", dst])
  _export(["diffusers", "--checkpoint", sd1_generator["dir"], "--dst", dst, "--overwrite"])
  assert sorted(os.listdir(dst / "unet")) == ["config.json",
                                              "diffusion_pytorch_model.safetensors"]
  assert (dst / "notes.txt").read_text() == "kept"
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".export-")]
  with pytest.raises(ValueError, match=r"StableDiffusion network; export it with "
                     r"`python -m sid_jax.export diffusers`, not `edm`"):
    _export(["edm", "--checkpoint", sd1_generator["dir"], "--dst", tmp_path / "g.pt"])
