"""One-step generation CLI: images depend only on their seeds."""

import os

import jax
import numpy as np
import pytest

from sid_jax import checkpoints, generators, models, sample, sharding

SPEC = {"class_name": "EDMPrecond", "sigma_init": 2.5,
        "kwargs": dict(img_resolution=8, img_channels=1, label_dim=10, model_type="SongUNet",
                       model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[],
                       dropout=0.0)}


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("gen") / "generator")
  den = models.build_denoiser(SPEC)
  params = models.init_params(den, jax.random.key(3), (8, 8, 1), 10)
  # Give the zero-initialised output layers some weight so images depend on the input.
  params = jax.tree.map(lambda p: p + 0.05 * np.sin(np.arange(p.size).reshape(p.shape)), params)
  checkpoints.save_network(path, params, SPEC)
  return path


def test_parse_seeds():
  assert sample.parse_seeds("0-3,7,10-11") == [0, 1, 2, 3, 7, 10, 11]
  for bad in ("", "3-1", "a-b"):
    with pytest.raises(ValueError):
      sample.parse_seeds(bad)


def _images_and_labels(gen, seeds, classes=None, batch=256):
  parts = list(gen.batches(seeds, classes, batch=batch))
  return (np.concatenate([x for _, x, _ in parts]), np.concatenate([l for _, _, l in parts]))


def test_images_depend_only_on_their_seed(generator_dir):
  one = generators.load(generator_dir, mesh=sharding.make_mesh({"data": 1}, jax.devices()[:1]))
  eight = generators.load(generator_dir, mesh=sharding.make_mesh({"data": 8}))
  seeds = list(range(20, 33))
  x1, l1 = _images_and_labels(one, seeds, batch=4)
  x8, l8 = _images_and_labels(eight, seeds, batch=16)
  np.testing.assert_allclose(x1, x8, atol=1e-5)
  np.testing.assert_array_equal(l1, l8)
  np.testing.assert_array_equal(one.labels(seeds), l1)  # the classes drawn from the seeds
  x_sub, _ = _images_and_labels(eight, seeds[5:7], batch=8)
  np.testing.assert_allclose(x_sub, x1[5:7], atol=1e-5)
  assert np.std(x1[0] - x1[1]) > 1e-3  # different seeds differ
  assert len(set(l1.tolist())) > 1  # uniform random classes


def test_class_flag_and_errors(generator_dir):
  gen = generators.load(generator_dir, mesh=sharding.make_mesh({"data": 1}, jax.devices()[:1]))
  _, labels = _images_and_labels(gen, [1, 2, 3], 7)
  assert labels.tolist() == [7, 7, 7]
  with pytest.raises(ValueError, match="out of range"):
    gen.generate([1], 10)
  with pytest.raises(ValueError, match="one-step generators"):
    gen.generate([1], steps=2)
  with pytest.raises(ValueError, match="out of range"):
    sample.run(outdir="unused", seeds="0", checkpoint=generator_dir, class_idx=10)
  with pytest.raises(ValueError, match="--batch must be positive"):
    sample.run(outdir="unused", seeds="0", checkpoint=generator_dir, batch=0)
  with pytest.raises(ValueError, match="exactly one"):
    sample.resolve_generator_dir(None, None)
  with pytest.raises(FileNotFoundError, match="no exported generator"):
    sample.resolve_generator_dir(os.path.dirname(generator_dir) + "/nowhere", None)


def test_run_writes_pngs_and_npz(generator_dir, tmp_path):
  sample.run(outdir=str(tmp_path), seeds="0-4", checkpoint=generator_dir, npz=True)
  assert sorted(os.listdir(tmp_path)) == [f"{s:06d}.png" for s in range(5)] + ["images.npz"]
  data = np.load(tmp_path / "images.npz")
  assert data["arr_0"].shape == (5, 8, 8, 1) and data["arr_0"].dtype == np.uint8
  assert data["seeds"].tolist() == list(range(5))
