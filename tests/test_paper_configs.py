"""The paper's SiD configs (spec §8.1, §8.4): values, missing-teacher errors, tiny variants.

For every dataset of configs/sid_edm.py and every size of configs/sid_edm2.py:
* the real variant holds the values of the spec's tables (written out again here, not imported
  from the config files);
* the real variant without a converted teacher stops in `run.build_run` with a message that
  names config.teacher.checkpoint and the official pickle to convert;
* the tiny variant keeps the method settings, builds on one device with a random teacher and its
  SiD iteration lowers (tracing only; compiling is left to the two end-to-end runs);
* two tiny variants (CIFAR-10 cond with augmentation, EDM2 XS with the log-variance and forced
  weight normalisation) run end to end instead: build, compile, 3 iterations, checkpoints, export.
"""

import functools
import json
import math
import os
import re

import jax
import numpy as np
import PIL.Image
import pytest

from sid_jax import checkpoints, models, sample, sharding, steps, train
from sid_jax import run as run_lib
from sid_jax.models import latent_decoder
from sid_jax.nets import edm2
from tests import configs_util

ONE_DEVICE = jax.devices()[:1]

# Spec §8.1 (`main/run_sid.sh`): rounds = batch / (4 GPUs x batch_gpu), eps 1e-6 for fp16 runs,
# ema and duration in Mimg.
EDM = {
    "cifar10_uncond": dict(pkl="edm-cifar10-32x32-uncond-vp.pkl", res=32, label_dim=0,
                           model_type="SongUNet", alpha=1.2, batch=256, rounds=4, lr=1e-5,
                           gen_b1=0.0, eps=1e-8, dropout=0.13, augment_p=0.12, ema=0.5,
                           channel_mult=[2, 2, 2], duration=500),
    "cifar10_cond": dict(pkl="edm-cifar10-32x32-cond-vp.pkl", res=32, label_dim=10,
                         model_type="SongUNet", alpha=1.2, batch=256, rounds=4, lr=1e-5,
                         gen_b1=0.0, eps=1e-8, dropout=0.13, augment_p=0.12, ema=0.5,
                         channel_mult=[2, 2, 2], duration=800),
    "imagenet64": dict(pkl="edm-imagenet-64x64-cond-adm.pkl", res=64, label_dim=1000,
                       model_type="DhariwalUNet", alpha=1.2, batch=8192, rounds=128, lr=4e-6,
                       gen_b1=0.0, eps=1e-6, dropout=0.10, augment_p=0.0, ema=2.0,
                       channel_mult=[1, 2, 3, 4], duration=1000),
    "ffhq64": dict(pkl="edm-ffhq-64x64-uncond-vp.pkl", res=64, label_dim=0, model_type="SongUNet",
                   alpha=1.2, batch=512, rounds=4, lr=1e-5, gen_b1=0.9, eps=1e-6, dropout=0.05,
                   augment_p=0.15, ema=0.5, channel_mult=[1, 2, 2, 2], duration=500),
    "afhqv2_64": dict(pkl="edm-afhqv2-64x64-uncond-vp.pkl", res=64, label_dim=0,
                      model_type="SongUNet", alpha=1.0, batch=512, rounds=4, lr=5e-6, gen_b1=0.0,
                      eps=1e-6, dropout=0.05, augment_p=0.15, ema=0.5,
                      channel_mult=[1, 2, 2, 2], duration=500),
}

# Spec §7.1 / §8.4: lr 5e-5, batch 2048, alpha 1, ema 2 Mimg, eps 1e-6, no augmentation.
EDM2 = {
    "xs": dict(pkl="edm2-img512-xs-2147483-0.135.pkl", model_channels=128, dropout=0.0, rounds=8,
               duration=200),
    "s": dict(pkl="edm2-img512-s-2147483-0.130.pkl", model_channels=192, dropout=0.0, rounds=8,
              duration=200),
    "m": dict(pkl="edm2-img512-m-2147483-0.100.pkl", model_channels=256, dropout=0.1, rounds=16,
              duration=200),
    "l": dict(pkl="edm2-img512-l-1879048-0.085.pkl", model_channels=320, dropout=0.1, rounds=16,
              duration=200),
    "xl": dict(pkl="edm2-img512-xl-1342177-0.085.pkl", model_channels=384, dropout=0.1, rounds=32,
               duration=200),
    "xxl": dict(pkl="edm2-img512-xxl-0939524-0.070.pkl", model_channels=448, dropout=0.1,
                rounds=256, duration=100),
}

VARIANTS = ([("sid_edm.py", f"dataset={k}") for k in EDM] +
            [("sid_edm2.py", f"size={k}") for k in EDM2])
IDS = [arg.split("=")[1] for _, arg in VARIANTS]

# What a tiny variant must keep from its real variant: everything about the method.
METHOD_KEYS = ("method", "sid.alpha", "sid.sigma_init", "sid.tmax", "sid.sigma_min",
               "sid.sigma_max", "sid.rho", "sid.p_mean", "sid.p_std", "sid.sigma_data",
               "sid.gen_loss_scale", "sid.fake_loss_scale", "sid.use_logvar",
               "sid.force_normalization", "sid.augment_p", "optim.fake_lr", "optim.gen_lr",
               "optim.fake_b1", "optim.gen_b1", "optim.b2", "optim.eps",
               "optim.fake_clip_value", "ema.halflife_kimg", "ema.rampup", "model.init_from",
               "model.class_name", "data.channels")
ARCH_KEYS = ("model_type", "augment_dim", "dropout", "use_fp16", "embedding_type",
             "encoder_type", "decoder_type", "channel_mult_noise", "resample_filter",
             "sigma_data", "label_balance", "concat_balance", "res_balance", "attn_balance",
             "clip_act")


def _get(config, dotted):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def _expected(name, arg):
  """The spec's values for a variant, as one flat dict."""
  key = arg.split("=")[1]
  if name == "sid_edm.py":
    e = EDM[key]
    return dict(e, channels=3, p_mean=-1.2, p_std=1.2, use_logvar=False, force_norm=False,
                class_name="EDMPrecond", family="edm")
  e = EDM2[key]
  return dict(e, res=64, channels=4, label_dim=1000, alpha=1.0, batch=2048, lr=5e-5, gen_b1=0.0,
              eps=1e-6, augment_p=0.0, ema=2.0, p_mean=-0.4, p_std=1.0, use_logvar=True,
              force_norm=True, class_name="Precond", family="edm2")


# ---------------------------------------------------------------------------------------------
# The real variants.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,arg", VARIANTS, ids=IDS)
def test_real_variant_has_the_papers_values(name, arg):
  c = configs_util.load(name, arg)
  e = _expected(name, arg)
  assert (c.data.resolution, c.data.channels, c.data.label_dim) == (e["res"], e["channels"],
                                                                    e["label_dim"])
  assert c.teacher.type == "network" and c.teacher.checkpoint == ""
  assert c.teacher.official_name == e["pkl"]
  assert c.teacher.official_url.endswith("/" + e["pkl"])
  assert c.model.init_from == "teacher" and c.model.class_name == e["class_name"]
  # Method (spec §8 "common to all", §2, §7.3).
  assert c.sid.alpha == e["alpha"]
  assert (c.sid.sigma_init, c.sid.tmax) == (2.5, 800.0)
  assert (c.sid.sigma_min, c.sid.sigma_max, c.sid.rho) == (0.002, 80.0, 7.0)
  assert (c.sid.p_mean, c.sid.p_std, c.sid.sigma_data) == (e["p_mean"], e["p_std"], 0.5)
  assert (c.sid.gen_loss_scale, c.sid.fake_loss_scale) == (100.0, 1.0)
  assert c.sid.use_logvar is e["use_logvar"]
  assert c.sid.force_normalization is e["force_norm"]
  assert c.sid.augment_p == e["augment_p"]
  # Adam (spec §4.2): lr = glr, beta1 0 for psi (and G except FFHQ), beta2 0.999, eps by fp16.
  assert c.optim.fake_lr == c.optim.gen_lr == e["lr"]
  assert (c.optim.fake_b1, c.optim.gen_b1, c.optim.b2) == (0.0, e["gen_b1"], 0.999)
  assert c.optim.eps == e["eps"]
  assert c.optim.fake_clip_value is None
  # EMA (spec §4.4): half-life = ema Mimg, ramp-up 0.05.
  assert c.ema.halflife_kimg == e["ema"] * 1000 and c.ema.rampup == 0.05
  # Batch, accumulation rounds and duration (spec §4.5).
  t = c.training
  assert t.global_batch == e["batch"]
  assert t.global_batch % t.micro_batch == 0 and t.global_batch // t.micro_batch == e["rounds"]
  images = e["duration"] * 1e6
  assert t.num_steps == math.ceil(images / e["batch"])
  assert (t.num_steps - 1) * t.global_batch < images <= t.num_steps * t.global_batch
  # The documented architecture of the teacher (used by teacher type 'random').
  kw = c.model.kwargs
  if name == "sid_edm.py":
    assert kw.model_type == e["model_type"] and list(kw.channel_mult) == e["channel_mult"]
    assert kw.dropout == e["dropout"]
    assert kw.get("augment_dim", 0) == (9 if e["augment_p"] > 0 else 0)
    assert kw.use_fp16 is (e["eps"] == 1e-6)
  else:
    assert kw.model_channels == e["model_channels"] and kw.dropout == e["dropout"]
    assert kw.logvar_channels == 128 and list(kw.attn_resolutions) == [16, 8]
  # Cadence: something is logged, and grids and checkpoints come at least every ~1000 kimg.
  assert 1 <= c.log.every_steps <= c.checkpoint.every_steps
  assert c.checkpoint.every_steps * t.global_batch <= 1_000_000
  # Valid on the official 4 GPUs and on 8 devices.
  run_lib.check_config(c, 4)
  run_lib.check_config(c, 8)


@pytest.mark.parametrize("name,arg", VARIANTS, ids=IDS)
def test_real_variant_without_teacher_names_checkpoint_and_pickle(name, arg):
  c = configs_util.load(name, arg)
  e = _expected(name, arg)
  with pytest.raises(ValueError) as info:
    run_lib.build_run(c, ONE_DEVICE)
  message = str(info.value)
  assert "config.teacher.checkpoint" in message
  assert e["pkl"] in message
  assert f"python -m sid_jax.convert {e['family']} --src {e['pkl']}" in message
  c.teacher.checkpoint = "/nonexistent/teacher"
  pattern = r"config\.teacher\.checkpoint=.*" + re.escape(e["pkl"])
  with pytest.raises(FileNotFoundError, match=pattern):
    run_lib.build_run(c, ONE_DEVICE)


def test_unknown_config_arguments_are_reported():
  with pytest.raises(ValueError, match="cifar10_cond"):
    configs_util.load("sid_edm.py", "dataset=cifar100")
  with pytest.raises(ValueError, match="xxl"):
    configs_util.load("sid_edm2.py", "")
  with pytest.raises(ValueError, match="Unknown config argument"):
    configs_util.load("sid_edm2.py", "size=xs,batch=3")


def test_lsg_aliases_are_sid_lsg_with_the_teacher_fixed():
  """configs/sd15_lsg.py and configs/sd21base_lsg.py (used in the README) load configs/sid_lsg.py
  with the teacher fixed; a bad teacher name is reported with the allowed ones."""
  one = configs_util.load("sid_lsg.py", "teacher=sd21base,kappa=3,tiny")
  alias = configs_util.load("sd21base_lsg.py", "kappa=3,tiny")
  assert one.to_dict() == alias.to_dict()
  assert one.to_dict() != configs_util.load("sd15_lsg.py", "kappa=3,tiny").to_dict()
  with pytest.raises(ValueError, match=r"teacher='sd3'.*\['sd15', 'sd21base'\]"):
    configs_util.load("sid_lsg.py", "teacher=sd3,kappa=2")
  with pytest.raises(ValueError, match=r"\['sd15', 'sd21base'\]"):
    configs_util.load("sid_lsg.py", "kappa=2")  # the teacher has no default
  with pytest.raises(ValueError, match="Unknown config argument 'teacher'"):
    configs_util.load("sd15_lsg.py", "teacher=sd21base,kappa=2")


# ---------------------------------------------------------------------------------------------
# The tiny variants.
# ---------------------------------------------------------------------------------------------


# Lowered iterations by tiny config: several tiny variants are the same program (e.g. EDM2 M, L, XL
# and XXL only differ in what tiny replaces: width, batch, length), which is traced once.
_LOWERED = {}


def _config_key(config) -> str:
  return json.dumps(config.to_dict(), sort_keys=True, default=str)


def _lower_iteration(run):
  """jit(train_step).lower(...) exactly as run.compile_train_step builds it, without compiling."""
  key = _config_key(run.config)
  if key not in _LOWERED:
    _LOWERED[key] = _lower_uncached(run)
  return _LOWERED[key]


def _lower_uncached(run):
  repl = sharding.replicated(run.mesh)
  fn = jax.jit(functools.partial(steps.train_step, run.setup),
               in_shardings=(run.state_shardings, run.teacher_shardings, repl),
               out_shardings=(run.state_shardings, repl), donate_argnums=0)
  abstract = jax.eval_shape(lambda p: steps.init_state(run.setup, p, p), run.init_params)
  with jax.set_mesh(run.mesh):
    return fn.lower(abstract, run.teacher.params, jax.random.key(0)), abstract


# The two variants of test_tiny_job_end_to_end are built, compiled and run there.
END_TO_END = [("sid_edm.py", "dataset=cifar10_cond"), ("sid_edm2.py", "size=xs")]
LOWERED = [v for v in VARIANTS if v not in END_TO_END]


@pytest.mark.parametrize("name,arg", VARIANTS, ids=IDS)
def test_tiny_variant_keeps_the_method(name, arg):
  real = configs_util.load(name, arg)
  c = configs_util.load(name, arg + ",tiny")
  for key in METHOD_KEYS:
    assert _get(c, key) == _get(real, key), key
  for key in ARCH_KEYS:
    assert c.model.kwargs.get(key) == real.model.kwargs.get(key), key
  assert c.teacher.type == "random" and c.data.resolution == 8
  assert c.data.label_dim == min(real.data.label_dim, 10)
  assert c.training.num_steps <= 3
  run_lib.check_config(c, 8)


@pytest.mark.parametrize("name,arg", LOWERED, ids=[a.split("=")[1] for _, a in LOWERED])
def test_tiny_variant_builds_and_its_iteration_lowers(name, arg):
  real = configs_util.load(name, arg)
  c = configs_util.load(name, arg + ",tiny")
  run = run_lib.build_run(c, ONE_DEVICE)
  assert run.teacher.info["type"] == "random" and len(run.teacher.info["sha256"]) == 64
  assert run.student_spec == run.teacher.spec  # init_from='teacher': G and psi copy the teacher
  assert run.init_params is run.teacher.params
  assert run.teacher.spec["class_name"] == real.model.class_name
  assert (run.setup.augment is not None) == (real.sid.augment_p > 0)
  gen_loss, fake_loss = run.setup.generator_loss, run.setup.fake_loss
  assert gen_loss.use_logvar is fake_loss.use_logvar is real.sid.use_logvar
  assert gen_loss.alpha == real.sid.alpha and fake_loss.levels.p_mean == real.sid.p_mean
  if real.sid.use_logvar:
    assert run.teacher.denoiser.module.logvar_channels  # the fake score has the logvar head

  lowered, abstract = _lower_iteration(run)
  state_info, metrics_info = lowered.out_info
  assert jax.tree.map(lambda a: (a.shape, a.dtype), state_info) == jax.tree.map(
      lambda a: (a.shape, a.dtype), abstract)
  assert {"fake_loss", "gen_loss", "fake_grad_norm", "gen_grad_norm",
          "nonfinite_streak"} <= set(metrics_info)
  assert all(m.shape == () for m in metrics_info.values())


def test_random_teacher_is_deterministic_and_not_trivial():
  c = configs_util.load("sid_edm.py", "dataset=imagenet64,tiny")
  a, b = models.build_teacher(c), models.build_teacher(c)
  assert a.info["sha256"] == b.info["sha256"]
  c.teacher.random_seed = 1
  assert models.build_teacher(c).info["sha256"] != a.info["sha256"]
  # The official initialisers zero ADM's output conv; the random teacher's is not.
  out = np.asarray(a.params["out_conv"]["kernel"])
  assert np.std(out) > 0.01
  for path, leaf in jax.tree_util.tree_leaves_with_path(a.params):
    if "kernel" in jax.tree_util.keystr(path):
      assert np.std(np.asarray(leaf)) > 0, jax.tree_util.keystr(path)


def _max_abs_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("name,arg", END_TO_END, ids=["cifar10_cond_augment", "edm2_xs_logvar"])
def test_tiny_job_end_to_end(name, arg, tmp_path):
  c = configs_util.load(name, arg + ",tiny")
  run = run_lib.build_run(c, ONE_DEVICE)
  if name == "sid_edm.py":
    assert run.setup.augment is not None and run.teacher.denoiser.module.augment_dim == 9
  else:
    assert run.setup.generator_loss.use_logvar and run.setup.fake_loss.use_logvar
    assert run.setup.project is edm2.project_mpconv_weights
    assert run.teacher.denoiser.module.logvar_channels
  summary = train.distill(c, str(tmp_path), devices=ONE_DEVICE)
  steps_n = c.training.num_steps
  assert summary["status"] == "done" and summary["step"] == steps_n
  assert summary["checkpoint_steps"] == [2, 3]
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  train_records = [r for r in records if r["kind"] == "train"]
  assert [r["step"] for r in train_records] == list(range(1, steps_n + 1))
  for r in train_records:
    for key in ("fake_loss", "gen_loss", "fake_grad_norm", "gen_grad_norm"):
      assert np.isfinite(r[key]), (r["step"], key)
    assert r["fake_valid_fraction"] == 1.0 and r["gen_valid_fraction"] == 1.0
    assert r["nonfinite_streak"] == 0
  # psi has moved away from the teacher after the first fake step, so the generator gets a
  # gradient from step 1 on.
  assert all(r["gen_grad_norm"] > 0 and r["fake_grad_norm"] > 0 for r in train_records)
  assert os.listdir(tmp_path / "samples")

  # The exported EMA generator: the teacher's spec, loadable, finite, moved by a few Adam steps.
  teacher = models.build_teacher(c)  # host-drawn again: same seed, same weights
  spec = checkpoints.load_network_spec(str(tmp_path / "generator"))
  assert spec["class_name"] == teacher.spec["class_name"]
  assert spec["kwargs"] == teacher.spec["kwargs"]
  assert spec["sigma_init"] == 2.5 and spec["step"] == steps_n
  den = models.build_denoiser(spec)
  shape = (c.data.resolution, c.data.resolution, c.data.channels)
  params = checkpoints.load_network_params(str(tmp_path / "generator"),
                                           models.abstract_params(den, shape, c.data.label_dim))
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))
  # Adam with beta1 = 0 moves a weight by about lr per step; EDM2's forced normalisation also
  # rescales the (unit-RMS) teacher weights by 1 / (1 + 1e-4) at the first projection.
  moved = _max_abs_diff(params, teacher.params)
  assert 0 < moved <= 10 * steps_n * c.optim.gen_lr + (1e-3 if c.sid.force_normalization else 0)
  if c.sid.force_normalization:
    for path, w in jax.tree_util.tree_leaves_with_path(params):
      if jax.tree_util.keystr(path).endswith("['weight']"):
        w = np.asarray(w).reshape(w.shape[0], -1)
        np.testing.assert_allclose(np.sqrt(np.mean(w**2, axis=1)), 1.0, atol=1e-3,
                                   err_msg=jax.tree_util.keystr(path))
  if name == "sid_edm2.py":
    # EDM2's latents are decoded (the tiny config's random VAE: 8x8x4 -> 16x16x3) in the grids,
    # and the exported generator carries its VAE, so `sid_jax.sample` writes images.
    assert spec["decoder"]["kind"] == latent_decoder.KIND
    assert spec["decoder"]["source"] == latent_decoder.RANDOM
    grid = np.asarray(PIL.Image.open(tmp_path / "samples" / sorted(
        os.listdir(tmp_path / "samples"))[-1]))
    assert grid.ndim == 3 and grid.shape[2] == 3
    out = sample.run(outdir=str(tmp_path / "images"), seeds="0-2",
                     checkpoint=str(tmp_path / "generator"))
    shots = [np.asarray(PIL.Image.open(os.path.join(out, f))) for f in sorted(os.listdir(out))]
    assert len(shots) == 3 and all(s.shape == (16, 16, 3) for s in shots)
    assert np.std(np.stack(shots).astype(np.float32)) > 1
