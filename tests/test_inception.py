"""FID Inception-v3: parity with pytorch-fid's modules through the state-dict importer.

Golden fixtures in testdata/inception/ (see its README.md) hold random-weight torch modules, their
inputs and float64 eval-mode outputs. Every comparison goes through `torch_state_dict_to_flax`.
"""

import json
import re
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sid_jax.weights import inception as inception_params
from sid_jax.weights import readers
from sid_jax.evaluation import frechet
from sid_jax.nets import inception

DATA = os.path.join(os.path.dirname(__file__), "testdata", "inception")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
  return np.load(os.path.join(DATA, name))


def _config(z):
  return json.loads(str(z["config_json"]))


def _state_dict(z):
  return {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith(("param/", "buffer/"))}


def _nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


def _assert_parity(ours, ref):
  ours = np.asarray(ours)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  assert np.isfinite(ours).all()
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * np.max(np.abs(ref)))


def _apply(module, variables, x):
  return jax.jit(module.apply)(variables, jnp.asarray(x))


# ---------------------------------------------------------------------------------------------
# Blocks.
# ---------------------------------------------------------------------------------------------

_BLOCKS = {
    "basic_conv2d.npz": (
        "BasicConv2d",
        lambda kw: inception.BasicConv2d(kw["out_channels"], kw["kernel_size"], kw["stride"])),
    "fid_inception_a.npz": (
        "FIDInceptionA", lambda kw: inception.FIDInceptionA(pool_features=kw["pool_features"])),
    "inception_b.npz": ("InceptionB", lambda kw: inception.InceptionB()),
    "fid_inception_c.npz": (
        "FIDInceptionC", lambda kw: inception.FIDInceptionC(channels_7x7=kw["channels_7x7"])),
    "inception_d.npz": ("InceptionD", lambda kw: inception.InceptionD()),
    "fid_inception_e_1.npz": ("FIDInceptionE_1", lambda kw: inception.FIDInceptionE_1()),
    "fid_inception_e_2.npz": ("FIDInceptionE_2", lambda kw: inception.FIDInceptionE_2()),
}


@pytest.mark.parametrize("fixture", sorted(_BLOCKS))
def test_block_matches_torch(fixture):
  z = _load(fixture)
  cfg = _config(z)
  cls_name, build = _BLOCKS[fixture]
  assert cfg["class"] == cls_name
  module = build(cfg["kwargs"])
  x = _nhwc(z["in/x"])
  variables = inception_params.torch_state_dict_to_flax(_state_dict(z), module, x.shape)
  assert set(variables) == {"params", "batch_stats"}
  n_bn = sum(k.endswith("running_var") for k in z.files)
  assert len(jax.tree.leaves(variables["batch_stats"])) == 2 * n_bn
  ref = _nhwc(z["out64/y"])
  assert ref.shape == tuple(np.array(cfg["output_shape"])[[0, 2, 3, 1]])
  _assert_parity(_apply(module, variables, x), ref)


def test_stem_blocks_0_and_1_match_torch():
  z = _load("fid_inception_stem.npz")
  module = inception.FIDInceptionV3(resize_input=False, normalize_input=False, last_block=1,
                                    block_outputs=(0, 1))
  x = _nhwc(z["in/x"])
  variables = inception_params.torch_state_dict_to_flax(_state_dict(z), module, x.shape)
  # Only the stem's five BasicConv2d layers are expected (no Mixed_*, no fc).
  assert sorted(variables["params"]) == [
      "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"
  ]
  out = _apply(module, variables, x)
  assert sorted(out) == ["block0", "block1"]
  _assert_parity(out["block0"], _nhwc(z["out64/y_block0"]))
  _assert_parity(out["block1"], _nhwc(z["out64/y"]))


# ---------------------------------------------------------------------------------------------
# Preprocessing.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["fid_preprocess.npz", "fid_preprocess_down.npz"])
def test_preprocess_matches_torch(fixture):
  z = _load(fixture)
  x = _nhwc(z["in/x"])
  ours = jax.jit(inception.preprocess)(jnp.asarray(x))
  assert ours.dtype == jnp.float32
  _assert_parity(ours, _nhwc(z["out64/y"]))
  # The downsampling case must not be antialiased; jax.image.resize's default is.
  if x.shape[1] > 299:
    aa = 2 * jax.image.resize(x, (1, 299, 299, 3), "linear", antialias=True) - 1
    assert np.max(np.abs(np.asarray(aa) - _nhwc(z["out64/y"]))) > 0.1


def test_preprocess_uint8():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(2, 20, 27, 3), dtype=np.uint8)
  images[0, 0, 0] = 0
  images[0, -1, -1] = 255
  ours = np.asarray(inception.preprocess_uint8(images))
  assert ours.shape == (2, 299, 299, 3) and ours.dtype == np.float32
  # torchvision's ToTensor divides by 255 in float32, correctly rounded (as numpy does).
  expected = np.asarray(inception.preprocess(images.astype(np.float32) / np.float32(255)))
  np.testing.assert_array_equal(ours, expected)
  assert ours[0, 0, 0, 0] == -1.0 and ours[0, -1, -1, 0] == 1.0
  assert ours.min() >= -1.0 and ours.max() <= 1.0
  with pytest.raises(TypeError):
    inception.preprocess_uint8(images.astype(np.float32))
  with pytest.raises(TypeError):
    inception.preprocess(images)


# ---------------------------------------------------------------------------------------------
# The full network and the importer's strictness, on a synthetic state dict.
# ---------------------------------------------------------------------------------------------


def _read_key_file():
  part1, part2 = [], []
  current = None
  with open(os.path.join(DATA, "full_network_keys.txt")) as f:
    for line in f:
      line = line.rstrip("\n")
      if line.startswith("## PART 1"):
        current = part1
      elif line.startswith("## PART 2"):
        current = part2
      elif line and not line.startswith("#") and current is not None:
        fields = line.split("\t")
        fields[1] = tuple(json.loads(fields[1].replace("(", "[").replace(")", "]").replace(
            ",]", "]")))
        current.append(tuple(fields))
  return part1, part2


def _synthetic_state_dict(part1, seed=0):
  """Random weights in the shapes of pytorch-fid's state dict (torch names, float32)."""
  rng = np.random.default_rng(seed)
  sd = {}
  for key, shape in part1:
    if key.endswith("num_batches_tracked"):
      value = np.array(0, np.int64)
    elif key.endswith("conv.weight"):
      value = rng.normal(0, np.sqrt(2 / np.prod(shape[1:])), shape)
    elif key.endswith(("bn.weight", "running_var")):
      value = rng.uniform(0.5, 1.5, shape)
    elif key.endswith(("bn.bias", "running_mean")):
      value = rng.normal(0, 0.1, shape)
    elif key == "fc.weight":
      value = rng.normal(0, 1 / np.sqrt(shape[1]), shape)
    elif key == "fc.bias":
      value = rng.normal(0, 1, shape)
    else:
      raise AssertionError(f"Unknown key in full_network_keys.txt: {key}")
    sd[key] = np.asarray(value, np.float32 if value.dtype == np.float64 else value.dtype)
  return sd


@pytest.fixture(scope="module")
def full_keys():
  part1, part2 = _read_key_file()
  assert len(part1) == 566 and len(part2) == 564
  return part1, part2


@pytest.fixture(scope="module")
def full_state_dict(full_keys):
  return _synthetic_state_dict(full_keys[0])


_FULL_SHAPE = (1, 299, 299, 3)


def test_full_network_forward(full_state_dict):
  module = inception.FIDInceptionV3()
  variables = inception_params.torch_state_dict_to_flax(full_state_dict, module, _FULL_SHAPE)
  params, stats = variables["params"], variables["batch_stats"]
  assert len(jax.tree.leaves(params)) == 94 * 3 + 2
  assert len(jax.tree.leaves(stats)) == 94 * 2
  assert sum(p.size for p in jax.tree.leaves(params)) == 23_850_960
  np.testing.assert_array_equal(params["fc"]["kernel"], full_state_dict["fc.weight"].T)
  np.testing.assert_array_equal(params["Mixed_7c"]["branch3x3_2b"]["conv"]["kernel"],
                                full_state_dict["Mixed_7c.branch3x3_2b.conv.weight"].transpose(
                                    2, 3, 1, 0))
  np.testing.assert_array_equal(stats["Mixed_6e"]["branch_pool"]["bn"]["var"],
                                full_state_dict["Mixed_6e.branch_pool.bn.running_var"])

  # Input in [0, 1] and not 299x299: the network resizes it itself. One forward, batch 1.
  x = np.random.default_rng(1).uniform(0, 1, (1, 123, 97, 3)).astype(np.float32)
  out = jax.jit(module.apply)(variables, x)
  assert sorted(out) == ["logits", "logits_unbiased", "pool"]
  pool = np.asarray(out["pool"], np.float64)
  assert pool.shape == (1, 2048) and out["logits"].shape == (1, 1008)
  assert out["logits_unbiased"].shape == (1, 1008)
  assert np.isfinite(pool).all() and (pool >= 0).all() and pool.max() > 0
  w = full_state_dict["fc.weight"].astype(np.float64)
  b = full_state_dict["fc.bias"].astype(np.float64)
  unbiased = pool @ w.T
  np.testing.assert_allclose(out["logits_unbiased"], unbiased, rtol=1e-5,
                             atol=1e-5 * np.abs(unbiased).max())
  np.testing.assert_allclose(out["logits"], unbiased + b, rtol=1e-5,
                             atol=1e-5 * np.abs(unbiased + b).max())


def test_importer_accepts_wrapper_names_and_missing_num_batches_tracked(full_keys,
                                                                        full_state_dict):
  module = inception.FIDInceptionV3()
  reference = inception_params.torch_state_dict_to_flax(full_state_dict, module, _FULL_SHAPE)
  # pytorch-fid's InceptionV3 wrapper names (PART 2), which carry no fc.
  wrapper = {key: full_state_dict[name] for key, _, name in full_keys[1]}
  with pytest.raises(ValueError) as err:
    inception_params.torch_state_dict_to_flax(wrapper, module, _FULL_SHAPE)
  assert {"fc.weight", "fc.bias"} <= set(_listed(str(err.value), "missing"))
  wrapper.update({k: full_state_dict[k] for k in ("fc.weight", "fc.bias")})
  converted = inception_params.torch_state_dict_to_flax(wrapper, module, _FULL_SHAPE)
  jax.tree.map(np.testing.assert_array_equal, converted, reference)
  # Files saved by older torch have no num_batches_tracked.
  old = {k: v for k, v in full_state_dict.items() if not k.endswith("num_batches_tracked")}
  converted = inception_params.torch_state_dict_to_flax(old, module, _FULL_SHAPE)
  jax.tree.map(np.testing.assert_array_equal, converted, reference)


def _listed(message, kind):
  """The names the strict converter's message lists under its '<count> <kind>:' header."""
  names, current = [], None
  for line in message.splitlines():
    header = re.fullmatch(r"\d+ (.+):", line)
    if header:
      current = header.group(1)
    elif line.startswith("  ") and current == kind:
      names.append(line.split()[0].rstrip(":"))
  return names


_MISSING = "Mixed_6c.branch7x7_2.bn.running_var"
_UNEXPECTED = "AuxLogits.fc.weight"
_MISSHAPED = "Mixed_7b.branch3x3_2a.conv.weight"  # (1,3) kernel given as (3,1).


def _convert_full(sd):
  return inception_params.torch_state_dict_to_flax(sd, inception.FIDInceptionV3(), _FULL_SHAPE)


def test_importer_names_missing_key(full_state_dict):
  sd = dict(full_state_dict)
  del sd[_MISSING]
  with pytest.raises(ValueError, match=rf"1 missing:\n  {_MISSING} \(Flax batch_stats/Mixed_6c/"):
    _convert_full(sd)


def test_importer_names_unexpected_keys(full_state_dict):
  sd = dict(full_state_dict, **{_UNEXPECTED: np.zeros((1008, 768), np.float32)})
  with pytest.raises(ValueError, match=rf"1 unexpected:\n  {_UNEXPECTED} "):
    _convert_full(sd)
  stray = "Mixed_6c.branch7x7_9.bn.num_batches_tracked"
  sd = dict(full_state_dict, **{stray: np.array(0, np.int64)})
  with pytest.raises(ValueError, match=rf"1 unexpected:\n  {stray} "):
    _convert_full(sd)
  # The same tensor under both naming schemes.
  sd = dict(full_state_dict, **{"blocks.0.0.conv.weight": sd["Conv2d_1a_3x3.conv.weight"]})
  with pytest.raises(ValueError, match=r"1 unexpected:\n  blocks\.0\.0\.conv\.weight "):
    _convert_full(sd)


def test_importer_names_misshaped_key(full_state_dict):
  sd = dict(full_state_dict, **{_MISSHAPED: np.zeros((384, 384, 3, 1), np.float32)})
  with pytest.raises(ValueError,
                     match=rf"1 mis-shaped:\n  {_MISSHAPED}: shape \(384, 384, 3, 1\), "
                     r"expected \(384, 384, 1, 3\)"):
    _convert_full(sd)


def test_importer_lists_every_problem(full_state_dict):
  sd = dict(full_state_dict)
  del sd[_MISSING]
  sd[_UNEXPECTED] = np.zeros((3,), np.float32)
  sd[_MISSHAPED] = np.zeros((384, 384, 3, 1), np.float32)
  sd["fc.bias"] = np.zeros((1000,), np.float32)
  with pytest.raises(ValueError) as err:
    _convert_full(sd)
  message = str(err.value)
  assert _listed(message, "missing") == [_MISSING]
  assert _listed(message, "unexpected") == [_UNEXPECTED]
  assert sorted(_listed(message, "mis-shaped")) == sorted([_MISSHAPED, "fc.bias"])


def test_importer_block_names_are_strict():
  z = _load("fid_inception_e_2.npz")
  sd = _state_dict(z)
  module = inception.FIDInceptionE_2()
  shape = _nhwc(z["in/x"]).shape
  # E_1 and E_2 share names; a C block's do not fit.
  del sd["branch_pool.conv.weight"]
  sd["branch7x7_1.conv.weight"] = np.zeros((128, 2048, 1, 1), np.float32)
  with pytest.raises(ValueError) as err:
    inception_params.torch_state_dict_to_flax(sd, module, shape)
  assert "branch_pool.conv.weight" in _listed(str(err.value), "missing")
  assert "branch7x7_1.conv.weight" in _listed(str(err.value), "unexpected")


# ---------------------------------------------------------------------------------------------
# Reading .pth files.
# ---------------------------------------------------------------------------------------------


def test_load_pytorch_fid_weights_roundtrip(tmp_path):
  import torch  # pylint: disable=import-outside-toplevel  (test dependency)
  z = _load("basic_conv2d.npz")
  sd = _state_dict(z)
  path = tmp_path / "weights.pth"
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, path)
  loaded = readers.read_torch(path)
  assert sorted(loaded) == sorted(sd)
  for key, value in sd.items():
    assert loaded[key].dtype == value.dtype
    np.testing.assert_array_equal(loaded[key], value)
  module = inception.BasicConv2d(32, 3, strides=2)
  x = _nhwc(z["in/x"])
  variables = inception_params.torch_state_dict_to_flax(loaded, module, x.shape)
  _assert_parity(_apply(module, variables, x), _nhwc(z["out64/y"]))

  torch.save({"state": {"a": 1}}, tmp_path / "bad.pth")
  with pytest.raises(ValueError, match="not a tensor"):
    readers.read_torch(tmp_path / "bad.pth")


def test_modules_do_not_import_torch():
  code = ("import sys\n"
          "import sid_jax.nets.inception, sid_jax.weights.inception\n"
          "print('torch' in sys.modules)\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, check=True, timeout=120)
  assert result.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# FID statistics and the Fréchet distance (sid_jax.evaluation.frechet).
# ---------------------------------------------------------------------------------------------


def test_feature_moments_and_frechet_distance_match_pytorch_fid():
  z = _load("fid_stats.npz")
  moments = []
  for i in (1, 2):
    mu, sigma = frechet.feature_moments(z[f"in/feats{i}"])
    assert mu.dtype == np.float64 and sigma.shape == (64, 64)
    np.testing.assert_allclose(mu, z[f"out64/mu{i}"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, z[f"out64/sigma{i}"], rtol=1e-12, atol=1e-12)
    moments += [mu, sigma]
  fid = frechet.frechet_distance(*moments, sqrtm_rule="pytorch-fid")
  np.testing.assert_allclose(fid, float(z["out64/fid"]), rtol=1e-6)
  # These covariances have a clean square root: every rule gives pytorch-fid's value.
  for rule in frechet.SQRTM_RULES:
    np.testing.assert_allclose(frechet.frechet_distance(*moments, sqrtm_rule=rule), fid,
                               rtol=1e-12)
  # pytorch-fid's own float32 means give its own float32-path value.
  fid32 = frechet.frechet_distance(z["out/mu1"], z["out/sigma1"], z["out/mu2"], z["out/sigma2"],
                                   sqrtm_rule="pytorch-fid")
  np.testing.assert_allclose(fid32, float(z["out/fid"]), rtol=1e-6)
  # Symmetric, and zero between identical Gaussians.
  np.testing.assert_allclose(frechet.frechet_distance(*moments[2:], *moments[:2]), fid,
                             rtol=1e-9)
  assert abs(frechet.frechet_distance(*moments[:2], *moments[:2])) < 1e-8
