"""Text-to-image generation CLI (`python -m sid_jax.sample --prompts ...`, lsg_spec §7).

A tiny random Stable Diffusion model saved as a SiD-LSG generator checkpoint (no training): the
written images must be exactly what the lsg_spec §2 / §7 formula (written out below, on the
in-memory model) gives for each seed's latent and prompt, whatever the batch size.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from sid_jax import checkpoints, generators, images, sample, sharding
from sid_jax.models import stable_diffusion

PROMPTS = ["a red cat", "a photo of a dog on grass", "", "an oil painting of a lighthouse"]
SEEDS = [3, 0, 2]  # listed out of order on purpose


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  """The generator checkpoint, a teacher copy (no 'generator' entry) and the in-memory model."""
  root = tmp_path_factory.mktemp("t2i")
  spec = stable_diffusion.tiny_spec()
  tokenizer_dir = stable_diffusion.tiny_tokenizer_dir(spec)
  sd = stable_diffusion.build(spec, tokenizer_dir)
  params = stable_diffusion.random_params(sd, 0)
  spec["kwargs"]["generator"] = {"init_timestep": 625}
  gen_dir = str(root / "generator")
  stable_diffusion.save(gen_dir, spec, params, tokenizer_dir)
  teacher_dir = str(root / "teacher")
  shutil.copytree(gen_dir, teacher_dir)
  del spec["kwargs"]["generator"]
  with open(os.path.join(teacher_dir, checkpoints.NETWORK_SPEC), "w") as f:
    json.dump(spec, f)
  prompt_file = str(root / "prompts.txt")
  with open(prompt_file, "w", encoding="utf-8") as f:
    f.write("\n".join(PROMPTS) + "\n")
  return {"dir": gen_dir, "teacher": teacher_dir, "prompts": prompt_file, "sd": sd,
          "params": params, "sampler": _reference_sampler(sd, 625, 1)}


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh({"data": 1}, jax.devices()[:1])


def _reference_sampler(sd, init_timestep, steps):
  """The official generation (lsg_spec §2, §7) written out: t_i = floor(t_init (1 - i / k)),
  x_0 = sigma_{t_0} z, then x_i = D(x_{i-1}) + sigma_{t_i} n_i with n_i drawn from
  fold_in(key of the image, i); the text embedding of the prompt; the VAE decoder."""
  ts = [int(np.floor(init_timestep * (1 - i / steps))) for i in range(steps)]

  @jax.jit
  def sample_fn(unet, text, vae, z, ids, keys):
    emb = sd.encode_text(text, ids)
    d = None
    for i, t in enumerate(ts):
      sigma = sd.denoiser.sigma_at(t)
      if i == 0:
        x = sigma * z
      else:
        n = jnp.stack([jax.random.normal(jax.random.fold_in(keys[j], i), z.shape[1:])
                       for j in range(z.shape[0])])
        x = d + sigma * n
      d = sd.denoiser(unet, x, jnp.full((z.shape[0],), sigma, jnp.float32), emb)
    return sd.decode(vae, d)

  return sample_fn


def _direct(model, sampler, z, prompts, keys=None):
  """uint8 images of the reference sampler on latents z [N, h, w, 4] and prompts."""
  p, sd = model["params"], model["sd"]
  keys = [jax.random.key(0)] * len(prompts) if keys is None else keys
  x = sampler(p["unet"], p["text_encoder"], p["vae"], np.asarray(z, np.float32),
              sd.tokenize(prompts), jnp.stack(keys))
  return images.to_uint8(np.asarray(x))


def _z(model, seed):
  return np.asarray(jax.random.normal(jax.random.key(seed), model["sd"].latent_shape))


def _png(outdir, name):
  return np.asarray(Image.open(os.path.join(outdir, f"{name:06d}.png")))


def _run(model, mesh, outdir, **kwargs):
  kwargs.setdefault("seeds", ",".join(map(str, SEEDS)))
  kwargs.setdefault("batch", 3)
  return sample.run(outdir=str(outdir), checkpoint=model["dir"], prompts=model["prompts"],
                    mesh=mesh, **kwargs)


@pytest.fixture(scope="module")
def baseline(model, mesh, tmp_path_factory):
  """Default seeding, one step, one batch of 3, with --npz."""
  out = _run(model, mesh, tmp_path_factory.mktemp("base"), npz=True)
  return {s: _png(out, s) for s in SEEDS}, out


def test_default_seeding_matches_the_library_sampler(model, baseline):
  by_seed, out = baseline
  assert sorted(os.listdir(out)) == ["000000.png", "000002.png", "000003.png",
                                     sample.GENERATION_RECORD, sample.NPZ_NAME]
  want = _direct(model, model["sampler"], [_z(model, s) for s in SEEDS],
                 [PROMPTS[s] for s in SEEDS])
  assert want.shape == (3, 16, 16, 3)
  for i, s in enumerate(SEEDS):
    np.testing.assert_array_equal(by_seed[s], want[i])
  assert all(np.std(by_seed[s].astype(np.float32)) > 5 for s in SEEDS)  # not flat images
  assert np.abs(by_seed[0].astype(int) - by_seed[2].astype(int)).mean() > 5
  data = np.load(os.path.join(out, sample.NPZ_NAME))
  assert data["arr_0"].dtype == np.uint8
  np.testing.assert_array_equal(data["arr_0"], want)
  assert data["seeds"].tolist() == SEEDS
  assert data["prompts"].tolist() == [PROMPTS[3], PROMPTS[0], PROMPTS[2]]
  with open(os.path.join(out, sample.GENERATION_RECORD)) as f:
    record = json.load(f)
  assert record["init_timestep"] == 625 and record["init_timestep_from"] == "network.json"
  assert record["steps"] == 1 and record["timesteps"] == [625]
  assert record["num_images"] == 3 and record["seeding"].startswith("default")
  # What `evaluate --metrics clip` pairs by: each image's seed, prompt line and prompt.
  assert data["prompt_lines"].tolist() == SEEDS
  assert record["images"] == [{"file": f"{s:06d}.png", "seed": s, "prompt_line": s,
                               "prompt": PROMPTS[s]} for s in SEEDS]


def test_images_do_not_depend_on_batch(model, mesh, baseline, tmp_path):
  out = _run(model, mesh, tmp_path, batch=2)  # two calls of 2, the last one padded
  assert sorted(os.listdir(out)) == ["000000.png", "000002.png", "000003.png",
                                     sample.GENERATION_RECORD]
  for s in SEEDS:
    np.testing.assert_array_equal(_png(out, s), baseline[0][s])


def test_custom_seed_uses_positions(model, mesh, baseline, tmp_path):
  out = _run(model, mesh, tmp_path, custom_seed=True, npz=True)
  assert sorted(os.listdir(out)) == ["000000.png", "000001.png", "000002.png",
                                     sample.GENERATION_RECORD, sample.NPZ_NAME]
  want = _direct(model, model["sampler"], [_z(model, s) for s in SEEDS], PROMPTS[:3])
  for i in range(3):
    np.testing.assert_array_equal(_png(out, i), want[i])
  # Position 2 has seed 2 and line 2, as seed 2 under default seeding; position 1 does not.
  np.testing.assert_array_equal(_png(out, 2), baseline[0][2])
  assert np.any(_png(out, 1) != baseline[0][0])
  data = np.load(os.path.join(out, sample.NPZ_NAME))
  assert data["seeds"].tolist() == SEEDS and data["prompts"].tolist() == PROMPTS[:3]
  assert data["prompt_lines"].tolist() == [0, 1, 2]
  with pytest.raises(ValueError, match=r"--custom_seed with 5 seeds .* only 4 lines"):
    _run(model, mesh, tmp_path, seeds="10-14", custom_seed=True)


def test_two_steps(model, mesh, baseline, tmp_path):
  seeds = [0, 3]
  out = _run(model, mesh, tmp_path, seeds="0,3", steps=2, batch=1)
  sampler = _reference_sampler(model["sd"], 625, 2)
  for s in seeds:
    # The fresh noise of the image of seed s at step 1 is normal(fold_in(key(s), 1)).
    want = _direct(model, sampler, [_z(model, s)], [PROMPTS[s]], [jax.random.key(s)])
    np.testing.assert_array_equal(_png(out, s), want[0])
    assert np.abs(_png(out, s).astype(int) - baseline[0][s].astype(int)).mean() > 1
  with open(os.path.join(out, sample.GENERATION_RECORD)) as f:
    assert json.load(f)["timesteps"] == [625, 312]
  assert generators.ddpm_timesteps(625, 4) == [625, 468, 312, 156]


def test_latents_file_nchw(model, mesh, baseline, tmp_path):
  z = np.random.RandomState(7).standard_normal((3, 4, 8, 8)).astype(np.float32)
  path = str(tmp_path / "z.npy")
  np.save(path, z)
  out = _run(model, mesh, tmp_path / "out", latents=path)
  want = _direct(model, model["sampler"], z.transpose(0, 2, 3, 1), [PROMPTS[s] for s in SEEDS])
  for i, s in enumerate(SEEDS):
    np.testing.assert_array_equal(_png(out, s), want[i])
    assert np.any(_png(out, s) != baseline[0][s])
  nhwc = sample.read_latents(path, 3, (8, 8, 4))
  np.testing.assert_array_equal(nhwc, z.transpose(0, 2, 3, 1))
  with pytest.raises(ValueError, match="3 latents for 2 listed seeds"):
    sample.read_latents(path, 2, (8, 8, 4))
  with pytest.raises(ValueError, match=r"expected \[N, 4, 16, 16\]"):
    sample.read_latents(path, 3, (16, 16, 4))


def test_errors(model, mesh, tmp_path):
  with pytest.raises(ValueError, match="--prompts is required"):
    sample.run(outdir=str(tmp_path), seeds="0", checkpoint=model["dir"], mesh=mesh)
  with pytest.raises(ValueError, match=r"Seed 4 has no prompt: .* has 4 lines"):
    _run(model, mesh, tmp_path, seeds="2-4")
  with pytest.raises(ValueError, match="teacher, not a distilled generator"):
    sample.run(outdir=str(tmp_path), seeds="0", checkpoint=model["teacher"],
               prompts=model["prompts"], mesh=mesh)
  with pytest.raises(ValueError, match="--class"):
    _run(model, mesh, tmp_path, class_idx=1)
  teacher_spec = checkpoints.load_network_spec(model["teacher"])
  assert generators.resolve_init_timestep(model["teacher"], teacher_spec, 500) == (
      500, "--init_timestep")
  with open(os.path.join(model["teacher"], generators.SOURCE_RECORD), "w") as f:
    json.dump({"generator": {"init_timestep": 625}}, f)  # a converted released generator
  assert generators.resolve_init_timestep(model["teacher"], teacher_spec, None) == (625, "source.json")
  os.remove(os.path.join(model["teacher"], generators.SOURCE_RECORD))
  with pytest.raises(ValueError, match=r"must lie in \[0, 1000\)"):
    generators.resolve_init_timestep(model["teacher"], teacher_spec, 1000)
  # A class-conditional generator takes none of the text-to-image options.
  edm = tmp_path / "edm"
  edm.mkdir()
  with open(edm / checkpoints.NETWORK_SPEC, "w") as f:
    json.dump({"class_name": "EDMPrecond", "sigma_init": 2.5, "kwargs": {}}, f)
  with pytest.raises(ValueError, match="--prompts, --steps: text-to-image options"):
    sample.run(outdir=str(tmp_path), seeds="0", checkpoint=str(edm), prompts=model["prompts"],
               steps=2)
  assert not [n for n in os.listdir(tmp_path) if n.endswith(".png")]
