"""`python -m sid_jax.convert`: official-format pickles, .pt and .npz -> network checkpoints.

The official snapshots are written by EDM's `torch_utils.persistence`, which this repository does
not contain. The tests write pickles in that format themselves: stand-in objects whose
`__reduce__` returns the official reconstruct function *name* and meta-dict layout, with a
throwaway in-memory `torch_utils.persistence` (and `dnnlib.util`) registered only while pickling.
The module states are the golden fixtures' official `state_dict`s, so a pickle -> convert ->
`models.build_teacher` -> denoise round trip must reproduce the fixture's float64 output.
"""

import collections
import contextlib
import functools
import hashlib
import importlib.util
import json
import pathlib
import pickle
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sid_jax import checkpoints, config_base, generators, models
from sid_jax.convert import __main__ as convert_main
from sid_jax.models import official
from sid_jax.weights import edm as edm_params
from sid_jax.weights import edm2 as edm2_params
from sid_jax.weights import pickles

TESTDATA = pathlib.Path(__file__).parent / "testdata"
BUFFER_LEAVES = ("resample_filter", "freqs", "phases")  # The official networks' buffers.

# ---------------------------------------------------------------------------------------------
# Writing pickles in the official format without the official code.
# ---------------------------------------------------------------------------------------------


def _reconstruct_persistent_obj(meta):
  raise AssertionError(f"the pickled reconstruct function must never run ({meta['class_name']})")


_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"


class _EasyDict(dict):
  """Pickles as `dnnlib.util.EasyDict`, the type of an EDM2 snapshot."""


_EasyDict.__module__ = "dnnlib.util"
_EasyDict.__qualname__ = _EasyDict.__name__ = "EasyDict"

_OFFICIAL_MODULES = {
    "torch_utils": {"persistence": None},
    "torch_utils.persistence": {"_reconstruct_persistent_obj": _reconstruct_persistent_obj},
    "dnnlib": {"util": None},
    "dnnlib.util": {"EasyDict": _EasyDict},
}


@contextlib.contextmanager
def _official_names_registered():
  """Registers throwaway `torch_utils.persistence` / `dnnlib.util` modules while pickling."""
  assert not any(name in sys.modules for name in _OFFICIAL_MODULES)
  modules = {name: types.ModuleType(name) for name in _OFFICIAL_MODULES}
  for name, attrs in _OFFICIAL_MODULES.items():
    for attr, value in attrs.items():
      setattr(modules[name], attr, modules[f"{name}.{attr}"] if value is None else value)
  sys.modules.update(modules)
  try:
    yield
  finally:
    for name in modules:
      del sys.modules[name]


class _Persistent:
  """Pickles like an instance of an official `@persistence.persistent_class` class."""

  def __init__(self, class_name, state):
    self.class_name = class_name
    self.state = state
    # The official meta carries the defining module's source; this one would fail if executed.
    self.module_src = f"raise SystemExit('source of {class_name} must not run')\n"

  def __reduce__(self):
    meta = dict(type="class", version=6, module_src=self.module_src,
                class_name=self.class_name, state=self.state)
    return (_reconstruct_persistent_obj, (meta,), None)


def _module_state(params, buffers, children, init_kwargs, non_persistent=(), **attrs):
  """The `__dict__` of a torch.nn.Module of the installed torch, with the given contents."""
  state = dict(torch.nn.Module().__dict__)  # training flag and hook dicts, as torch has them.
  state.update(
      training=False,
      _parameters=collections.OrderedDict(params),
      _buffers=collections.OrderedDict(buffers),
      _non_persistent_buffers_set=set(non_persistent),
      _modules=collections.OrderedDict(children),
      _init_args=(),
      _init_kwargs=dict(init_kwargs),
      **attrs)
  return state


def _build_tree(name, node):
  params, buffers, children = {}, {}, {}
  for key, value in node.items():
    if isinstance(value, dict):
      children[key] = _build_tree(key, value)
    elif key in BUFFER_LEAVES:
      buffers[key] = torch.from_numpy(np.array(value))
    else:
      params[key] = torch.nn.Parameter(torch.from_numpy(np.array(value)), requires_grad=False)
  if name in ("enc", "dec"):  # Official UNets keep their blocks in a plain torch ModuleDict.
    container = torch.nn.ModuleDict()
    container.__dict__["_modules"] = collections.OrderedDict(children)
    return container
  weight = params.get("weight")
  if weight is not None and weight.ndim == 4 and "resample_filter" not in buffers:
    buffers["resample_filter"] = None  # What official convs register when not resampling.
  kind = {4: "Conv2d", 2: "Linear"}.get(getattr(weight, "ndim", None), "Block")
  return _Persistent(kind, _module_state(params, buffers, children, {"name": name}))


def official_network(class_name, init_kwargs, state_dict, **attrs):
  """An official-format network: persistent modules holding `state_dict` (torch names)."""
  tree = {}
  for full_name, value in state_dict.items():
    *path, leaf = full_name.split(".")
    node = tree
    for part in path:
      node = node.setdefault(part, {})
    node[leaf] = value
  root = _build_tree("", tree)
  state = root.state
  state["_init_kwargs"] = dict(init_kwargs)
  state.update(attrs)
  return _Persistent(class_name, state)


def write_official_pickle(path, obj):
  with _official_names_registered():
    data = pickle.dumps(obj)
  assert b"torch_utils.persistence" in data and b"_reconstruct_persistent_obj" in data
  pathlib.Path(path).write_bytes(data)
  return str(path)


def test_official_code_is_not_importable():
  # The unpickler must work without the official code: it is nowhere on the path.
  assert importlib.util.find_spec("torch_utils") is None
  assert importlib.util.find_spec("dnnlib") is None


# ---------------------------------------------------------------------------------------------
# Fixtures.
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _fixture(name):
  with np.load(TESTDATA / f"{name}.npz", allow_pickle=False) as z:
    data = {k: z[k] for k in z.files}
  return types.SimpleNamespace(
      config=json.loads(str(data["config_json"])),
      cls=json.loads(str(data["meta_json"]))["cls"],
      state_dict={k[len("param/"):]: v for k, v in data.items() if k.startswith("param/")},
      x=data["in/x"].transpose(0, 2, 3, 1),  # NCHW -> NHWC.
      sigma=data["in/sigma"],
      labels=data.get("in/class_labels"),
      aug=data.get("in/augment_labels"),
      out64={k[len("out64/"):]: v for k, v in data.items() if k.startswith("out64/")})


def _teacher_config(dst, fx):
  config = config_base.base_config()
  config.teacher.type = "network"
  config.teacher.checkpoint = str(dst)
  config.data.resolution = fx.config["img_resolution"]
  config.data.channels = fx.config["img_channels"]
  config.data.label_dim = fx.config.get("label_dim", 0)
  return config


def _assert_close(ours_nhwc, ref_nchw, rel=1e-5):
  ours = np.asarray(ours_nhwc, np.float64).transpose(0, 3, 1, 2)
  assert ours.shape == ref_nchw.shape, (ours.shape, ref_nchw.shape)
  np.testing.assert_allclose(ours, ref_nchw, rtol=rel, atol=rel * np.max(np.abs(ref_nchw)))


def _run(argv, capsys):
  code = convert_main.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def _edm_snapshot(fx):
  """The layout of NVlabs/edm `network-snapshot-*.pkl`."""
  ema = official_network(fx.cls, fx.config, fx.state_dict, sigma_data=0.5, sigma_min=0,
                         sigma_max=float("inf"), use_fp16=False)
  # torch's format allows non-persistent buffers: state_dict() leaves them out, and so must we.
  ema.state["_buffers"]["scratch"] = torch.zeros(3)
  ema.state["_non_persistent_buffers_set"] = {"scratch"}
  loss_fn = _Persistent("EDMLoss", dict(_init_args=(), _init_kwargs={}, P_mean=-1.2, P_std=1.2,
                                        sigma_data=0.5))
  augment_pipe = _Persistent("AugmentPipe", dict(_init_args=(), _init_kwargs=dict(p=0.12),
                                                 p=0.12, xflip=1e8, yflip=1, scale=1))
  dataset_kwargs = dict(class_name="training.dataset.ImageFolderDataset", path="cifar10.zip",
                        use_labels=True, xflip=False, cache=True, resolution=16)
  return dict(ema=ema, loss_fn=loss_fn, augment_pipe=augment_pipe,
              dataset_kwargs=dataset_kwargs)


@pytest.fixture(scope="module")
def edm_pickle(tmp_path_factory):
  path = tmp_path_factory.mktemp("edm") / "network-snapshot-000200.pkl"
  return write_official_pickle(path, _edm_snapshot(_fixture("edm_songunet_ddpmpp")))


# ---------------------------------------------------------------------------------------------
# The unpickler.
# ---------------------------------------------------------------------------------------------


def test_unpickler_rebuilds_records_and_tensors(tmp_path):
  weight = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7
  child = _Persistent("Conv2d", _module_state(
      params={"weight": torch.nn.Parameter(weight.half(), requires_grad=False), "bias": None},
      buffers={"resample_filter": None, "view": weight.t()[1:],  # A strided view.
               "bf": weight[0].bfloat16(), "count": torch.tensor([3, 4])},
      children={}, init_kwargs={"kernel": 3}))
  blocks = torch.nn.ModuleDict()
  blocks.__dict__["_modules"] = collections.OrderedDict(b0=child)
  root = _Persistent("EDMPrecond", _module_state(
      params={"gain": torch.nn.Parameter(torch.tensor(0.5))},
      buffers={"tmp": torch.ones(2)}, non_persistent={"tmp"},
      children={"enc": blocks, "none": None},
      init_kwargs={"img_resolution": 16, "channel_mult": [1, 2]}, sigma_data=0.5))
  path = write_official_pickle(tmp_path / "net.pkl", {"ema": root})

  obj = pickles.load(path)
  net = obj["ema"]
  assert isinstance(net, pickles.PickledObject)
  assert (net.class_name, net.module_name, net.version) == ("EDMPrecond", None, 6)
  assert net.init_args == () and net.init_kwargs == {"img_resolution": 16,
                                                     "channel_mult": [1, 2]}
  assert net.state["sigma_data"] == 0.5
  assert net.source.startswith("raise SystemExit")  # Kept as text, never executed.
  # torch's state_dict order: own parameters, own persistent buffers, then children.
  assert list(net.state_dict) == ["gain", "enc.b0.weight", "enc.b0.view", "enc.b0.bf",
                                  "enc.b0.count"]
  enc = net.children()["enc"]
  assert (enc.class_name, enc.module_name) == ("ModuleDict", "torch.nn.modules.container")
  assert enc.children()["b0"].init_kwargs == {"kernel": 3}
  sd = net.state_dict
  for name in ("gain", "enc.b0.weight", "enc.b0.view", "enc.b0.bf"):
    assert sd[name].dtype == np.float32, name
  np.testing.assert_array_equal(sd["enc.b0.weight"], weight.half().float().numpy())
  np.testing.assert_array_equal(sd["enc.b0.view"], weight.t()[1:].numpy())
  np.testing.assert_array_equal(sd["enc.b0.bf"], weight[0].bfloat16().float().numpy())
  assert sd["gain"].shape == () and sd["gain"] == 0.5
  assert sd["enc.b0.count"].dtype == np.int64 and sd["enc.b0.count"].tolist() == [3, 4]


class _CallsGlobal:
  """Pickles as a call of `fn(*args)`: what a malicious pickle does."""

  def __init__(self, fn, *args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return (self.fn, self.args)


def _os_system_pickle(marker):
  # Protocol 0, written by hand: `os.system('touch MARKER')`.
  return f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()


@pytest.mark.parametrize("case", ["os.system", "builtins.eval", "nested in a network"])
def test_refuses_other_globals(case, tmp_path, capsys):
  marker = tmp_path / "ran"
  path = tmp_path / "evil.pkl"
  if case == "os.system":
    path.write_bytes(_os_system_pickle(marker))
    name = "os.system"
  elif case == "builtins.eval":
    path.write_bytes(pickle.dumps(_CallsGlobal(eval, f"open({str(marker)!r}, 'w')")))
    name = "builtins.eval"
  else:
    fx = _fixture("edm_songunet_ddpmpp")
    net = official_network(fx.cls, fx.config, fx.state_dict,
                           hook=_CallsGlobal(subprocess.call, ["touch", str(marker)]))
    write_official_pickle(path, {"ema": net})
    name = "subprocess.call"

  with pytest.raises(pickles.UnsafePickleError, match="A pickle is a program") as e:
    pickles.load(path)
  assert f"global {name}," in str(e.value)
  code, out, err = _run(["edm", "--src", path, "--dst", tmp_path / "out"], capsys)
  assert code == 1 and out == ""
  assert f"global {name}," in err and "A pickle is a program" in err
  assert not marker.exists()
  assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Round trips: official-format pickle -> convert -> build_teacher -> denoise.
# ---------------------------------------------------------------------------------------------


def test_edm_snapshot_round_trip(edm_pickle, tmp_path, capsys):
  fx = _fixture("edm_songunet_ddpmpp")
  dst = tmp_path / "teacher"
  code, out, err = _run(["edm", "--src", edm_pickle, "--dst", dst], capsys)
  assert code == 0, err
  sha = hashlib.sha256(pathlib.Path(edm_pickle).read_bytes()).hexdigest()
  num_params = sum(v.size for k, v in fx.state_dict.items() if "resample_filter" not in k)
  assert "converted EDMPrecond (SongUNet)" in out and "'ema'" in out
  assert f"parameters:    {num_params:,}" in out
  assert sha in out and str(dst) in out
  assert json.loads((dst / "network.json").read_text()) == {"class_name": "EDMPrecond",
                                                            "kwargs": fx.config}
  source = json.loads((dst / official.SOURCE_RECORD).read_text())
  assert source["source_sha256"] == sha and source["key"] == "ema"

  teacher = models.build_teacher(_teacher_config(dst, fx))
  assert teacher.spec["class_name"] == "EDMPrecond"
  denoise = jax.jit(lambda p, x, s, c, a: teacher.denoiser(p, x, s, c, aug_labels=a))
  d = denoise(teacher.params, jnp.asarray(fx.x), fx.sigma, fx.labels, jnp.asarray(fx.aug))
  _assert_close(d, fx.out64["D"])


def test_edm2_snapshot_round_trip(tmp_path, capsys):
  fx = _fixture("edm2_precond_nvidia")
  # The layout of NVlabs/edm2 `network-snapshot-*.pkl`: an EasyDict with the latent encoder
  # (numpy values in its state), dataset kwargs, the loss and the EMA network.
  encoder = _Persistent("StabilityVAEEncoder", dict(
      _init_args=(), _init_kwargs=dict(vae_name="stabilityai/sd-vae-ft-mse"),
      vae_name="stabilityai/sd-vae-ft-mse", scale=np.float32(0.5) / np.float32(5.0),
      bias=np.float32([0.1, 0.2, 0.3, 0.4]) - np.float32(0.05), batch_size=8, _vae=None))
  snapshot = _EasyDict(encoder=encoder,
                       dataset_kwargs=_EasyDict(class_name="training.dataset.ImageFolderDataset",
                                                path="img512-sd.zip", use_labels=True),
                       loss_fn=_Persistent("EDM2Loss", dict(_init_args=(), _init_kwargs={},
                                                            P_mean=-0.4, P_std=1.0)))
  snapshot["ema"] = official_network(fx.cls, fx.config, fx.state_dict, sigma_data=0.5)
  src = write_official_pickle(tmp_path / "network-snapshot-0000671-0.100.pkl", snapshot)

  loaded = pickles.load(src)
  assert isinstance(loaded, pickles.EasyDict) and loaded.dataset_kwargs["use_labels"] is True
  assert loaded.encoder.state["scale"] == np.float32(0.1)
  np.testing.assert_array_equal(loaded.encoder.state["bias"],
                                np.float32([0.05, 0.15, 0.25, 0.35]))

  dst = tmp_path / "edm2_teacher"
  code, out, err = _run(["edm2", "--src", src, "--dst", dst], capsys)
  assert code == 0, err
  assert "converted Precond from" in out
  teacher = models.build_teacher(_teacher_config(dst, fx))
  denoise = jax.jit(functools.partial(teacher.denoiser, return_logvar=True))
  d, logvar = denoise(teacher.params, jnp.asarray(fx.x), fx.sigma, fx.labels)
  _assert_close(d, fx.out64["D"])
  np.testing.assert_allclose(np.asarray(logvar, np.float64), fx.out64["logvar"], rtol=1e-5,
                             atol=1e-5 * np.max(np.abs(fx.out64["logvar"])))


def test_sid_generator_one_step_sample(tmp_path, capsys):
  fx = _fixture("edm2_generator")
  # Released SiD / SiDA generators are pickled as {'ema': generator}.
  src = write_official_pickle(tmp_path / "sida_generator.pkl",
                              {"ema": official_network(fx.cls, fx.config, fx.state_dict)})
  dst = tmp_path / "generator"
  code, out, err = _run(["edm2", "--src", src, "--dst", dst], capsys)
  assert code == 0, err
  assert "converted EDM_2_Precond_Generator" in out
  generator = models.build_teacher(_teacher_config(dst, fx))

  # One generator call at sigma_init = 2.5 on z = x / 2.5 is the fixture's third sample.
  b, sigma_init = 2, float(fx.sigma[2])
  z = jnp.asarray(fx.x[b:b + 1] / sigma_init)
  sample = jax.jit(generators.one_step(generator.denoiser, sigma_init))
  x = sample(generator.params, z, jnp.asarray(fx.labels[b:b + 1]))
  _assert_close(x, fx.out64["D"][b:b + 1])


# ---------------------------------------------------------------------------------------------
# Weights exported by hand: .pt and .npz with --spec.
# ---------------------------------------------------------------------------------------------


def _write_spec(path, fx):
  path.write_text(json.dumps({"class_name": fx.cls, "kwargs": fx.config}))
  return path


def _assert_same_tree(a, b):
  fa = dict(jax.tree_util.tree_flatten_with_path(a)[0])
  fb = dict(jax.tree_util.tree_flatten_with_path(b)[0])
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


@pytest.mark.parametrize("nested", [False, True])
def test_torch_state_dict_source(nested, tmp_path, capsys):
  fx = _fixture("edm_songunet_ddpmpp")
  sd = {k: torch.from_numpy(v.copy()) for k, v in fx.state_dict.items()}
  src = tmp_path / "weights.pt"
  torch.save({"ema": sd} if nested else sd, src)
  dst = tmp_path / "out"
  code, out, err = _run(["edm", "--src", src, "--spec", _write_spec(tmp_path / "s.json", fx),
                         "--dst", dst], capsys)
  assert code == 0, err
  assert "converted EDMPrecond (SongUNet)" in out
  den = models.build_denoiser({"class_name": fx.cls, "kwargs": fx.config})
  _assert_same_tree(checkpoints.load_network_params(str(dst)),
                    edm_params.torch_state_dict_to_flax(fx.state_dict, den))


def test_npz_source_and_mismatched_shape(tmp_path, capsys):
  fx = _fixture("edm2_generator")
  spec = _write_spec(tmp_path / "spec.json", fx)
  src = tmp_path / "weights.npz"
  np.savez(src, **fx.state_dict)
  code, out, err = _run(["edm2", "--src", src, "--spec", spec, "--dst", tmp_path / "out"],
                        capsys)
  assert code == 0, err
  den = models.build_denoiser({"class_name": fx.cls, "kwargs": fx.config})
  _assert_same_tree(checkpoints.load_network_params(str(tmp_path / "out")),
                    edm2_params.torch_state_dict_to_flax(fx.state_dict, den))

  bad = dict(fx.state_dict)
  bad["unet.emb_noise.weight"] = bad["unet.emb_noise.weight"][:, :-1]
  np.savez(src, **bad)
  code, _, err = _run(["edm2", "--src", src, "--spec", spec, "--dst", tmp_path / "bad"], capsys)
  assert code == 1
  assert "unet.emb_noise.weight" in err and "mis-shaped" in err


# ---------------------------------------------------------------------------------------------
# Errors for people.
# ---------------------------------------------------------------------------------------------


def test_missing_key(edm_pickle, tmp_path, capsys):
  code, out, err = _run(["edm", "--src", edm_pickle, "--dst", tmp_path / "o", "--key",
                         "G_ema"], capsys)
  assert code == 1 and out == ""
  assert "no key 'G_ema'" in err and "'ema' (EDMPrecond)" in err and "'loss_fn' (EDMLoss)" in err
  assert "--key" in err
  code, _, err = _run(["edm", "--src", edm_pickle, "--dst", tmp_path / "o", "--key",
                       "dataset_kwargs"], capsys)
  assert code == 1 and "['dataset_kwargs'] is a dict without parameters, not a network" in err


def test_missing_files(tmp_path, capsys):
  missing = tmp_path / "nope.pkl"
  code, out, err = _run(["edm", "--src", missing, "--dst", tmp_path / "o"], capsys)
  assert code == 1 and out == "" and str(missing) in err and "no such file" in err
  with pytest.raises(FileNotFoundError, match="nope.pkl"):
    pickles.load(missing)

  fx = _fixture("edm2_generator")
  src = tmp_path / "w.npz"
  np.savez(src, **fx.state_dict)
  code, _, err = _run(["edm2", "--src", src, "--dst", tmp_path / "o"], capsys)
  assert code == 1 and "pass --spec SPEC.json" in err
  code, _, err = _run(["edm2", "--src", src, "--spec", tmp_path / "none.json", "--dst",
                       tmp_path / "o"], capsys)
  assert code == 1 and "none.json" in err and "no such file" in err


def test_unknown_and_wrong_family_classes(tmp_path, capsys):
  fx = _fixture("edm_songunet_ddpmpp")
  src = write_official_pickle(tmp_path / "stylegan.pkl", {
      "ema": official_network("StyleGAN2Generator", {"z_dim": 512}, fx.state_dict)})
  code, _, err = _run(["edm", "--src", src, "--dst", tmp_path / "o"], capsys)
  assert code == 1 and "Unknown network class 'StyleGAN2Generator'" in err

  edm2 = _fixture("edm2_precond_nvidia")
  src = write_official_pickle(tmp_path / "edm2.pkl", {
      "ema": official_network(edm2.cls, edm2.config, edm2.state_dict)})
  code, _, err = _run(["edm", "--src", src, "--dst", tmp_path / "o"], capsys)
  assert code == 1 and "Precond is an EDM2 class" in err
  assert "python -m sid_jax.convert edm2" in err


def test_refuses_to_overwrite(edm_pickle, tmp_path, capsys):
  dst = tmp_path / "taken"
  dst.mkdir()
  (dst / "something").write_text("x")
  code, _, err = _run(["edm", "--src", edm_pickle, "--dst", dst], capsys)
  assert code == 1 and "--overwrite" in err
  assert (dst / "something").read_text() == "x"


def test_top_level_network_and_torch_save_named_pkl(tmp_path, capsys):
  fx = _fixture("edm2_generator")
  src = write_official_pickle(tmp_path / "net.pkl",
                              official_network(fx.cls, fx.config, fx.state_dict))
  code, _, err = _run(["edm2", "--src", src, "--dst", tmp_path / "o"], capsys)
  assert code == 1 and "single EDM_2_Precond_Generator" in err and "--key ''" in err
  code, out, err = _run(["edm2", "--src", src, "--dst", tmp_path / "o", "--key", ""], capsys)
  assert code == 0, err
  assert "converted EDM_2_Precond_Generator from" in out and "[''" not in out

  saved = tmp_path / "saved.pkl"
  torch.save({k: torch.from_numpy(v) for k, v in fx.state_dict.items()}, saved)
  code, _, err = _run(["edm2", "--src", saved, "--dst", tmp_path / "o2"], capsys)
  assert code == 1 and "torch.save archive" in err and ".pt" in err
