"""The paper's SiDA and SiD²A configs (spec §8.2-§8.4): values, errors, tiny variants, and tiny
runs on real (test) data that checkpoint and resume with the data position restored.

* configs/sida_edm.py (CIFAR-10 uncond/cond, ImageNet 64, FFHQ 64, AFHQv2 64) and
  configs/sida_edm2.py (EDM2 XS...XXL) hold the values of the spec's tables, written out again
  here (not imported from the config files), for SiDA and for SiD²A;
* SiD²A without a generator to start from, or a run without its dataset, stops before building
  with an error that names the setting and the official file;
* every tiny variant keeps the method and its SiDA iteration lowers on one device;
* tiny SiDA (CIFAR-10 cond, an EDM image zip) and SiD²A (EDM2 XS from a tiny SiD-EDM2 export, an
  EDM2 latent zip) train, checkpoint at step 2, and a run stopped there and resumed ends with the
  same metrics and the same generator, bit for bit, as an uninterrupted one: the data feed's
  position is restored from the checkpoint.
"""

import json
import math
import os

import jax
import numpy as np
import PIL.Image
import pytest

from sid_jax import checkpoints, models, steps, train
from sid_jax import run as run_lib
from tests import configs_util
from tests.test_data_real import write_edm2_zip, write_edm_zip
from tests.test_paper_configs import _get

ONE_DEVICE = jax.devices()[:1]
SID_URL = "https://huggingface.co/UT-Austin-PML/SiD/resolve/main/"
SIDA_EDM2_URL = "https://huggingface.co/UT-Austin-PML/SiDA/resolve/main/EDM2_distillation/"

# Spec §8.2 (SiDA-EDM; alpha 1, lsd 1, lsg_gan 0.01, G beta1 0, clip 1) and §8.3 (SiD²A:
# duration 100 Mimg, `--sid_model`). Teacher settings (lr, fp16, dropout, augment, ema) as SiD.
EDM = {
    "cifar10_uncond": dict(batch=256, batch_gpu=32, lr=1e-5, eps=1e-8, dropout=0.13,
                           augment_p=0.12, ema=0.5, duration=300, zip="cifar10-32x32.zip",
                           sid_model="cifar10-uncond/alpha1.2/network-snapshot-1.200000-403968.pkl"),
    "cifar10_cond": dict(batch=256, batch_gpu=32, lr=1e-5, eps=1e-8, dropout=0.13, augment_p=0.12,
                         ema=0.5, duration=300, zip="cifar10-32x32.zip",
                         sid_model="cifar10-cond/alpha1.2/network-snapshot-1.200000-713312.pkl"),
    "imagenet64": dict(batch=8192, batch_gpu=32, lr=4e-6, eps=1e-6, dropout=0.10, augment_p=0.0,
                       ema=2.0, duration=300, zip="imagenet-64x64.zip",
                       sid_model="imagenet64/alpha1.2/network-snapshot-1.200000-939176.pkl"),
    "ffhq64": dict(batch=512, batch_gpu=64, lr=1e-5, eps=1e-6, dropout=0.05, augment_p=0.15,
                   ema=0.5, duration=200, zip="ffhq-64x64.zip",
                   sid_model="ffhq64/alpha1.2/network-snapshot-1.200000-498176.pkl"),
    "afhqv2_64": dict(batch=512, batch_gpu=64, lr=5e-6, eps=1e-6, dropout=0.05, augment_p=0.15,
                      ema=0.5, duration=200, zip="afhqv2-64x64.zip",
                      sid_model="afhq64/alpha1/network-snapshot-1.000000-371712.pkl"),
}

# Spec §8.4 (lr 5e-5, batch 2048, alpha 1, lsd 100, lsg_gan 0.01, no augmentation, no clip):
# per-GPU batch, log-variance = forced normalisation, SiDA / SiD²A durations, SiD²A's start and
# generator loss scale.
EDM2 = {
    "xs": dict(batch_gpu=64, logvar=True, sida=200, sid2a=30, lsg=100.0,
               sid_model="edm2_img512_xs_sid_alpha1-249360.pkl"),
    "s": dict(batch_gpu=64, logvar=False, sida=200, sid2a=80, lsg=100.0,
              sid_model="edm2_img512_s_sid_alpha1-192010.pkl"),
    "m": dict(batch_gpu=32, logvar=True, sida=200, sid2a=200, lsg=50.0,
              sid_model="edm2_img512_m_sid_alpha1-226830.pkl"),
    "l": dict(batch_gpu=32, logvar=True, sida=200, sid2a=55, lsg=100.0,
              sid_model="edm2_img512_l_sid_alpha1-203788.pkl"),
    "xl": dict(batch_gpu=16, logvar=True, sida=200, sid2a=50, lsg=100.0,
               sid_model="edm2_img512_xl_sid_alpha1-234004.pkl"),
    "xxl": dict(batch_gpu=2, logvar=True, sida=100, sid2a=30, lsg=100.0,
                sid_model="edm2_img512_xxl_sida_alpha1-077932.pkl"),
}

VARIANTS = ([("sida_edm.py", f"dataset={k}") for k in EDM] +
            [("sida_edm2.py", f"size={k}") for k in EDM2])
IDS = [arg.split("=")[1] for _, arg in VARIANTS]

METHOD_KEYS = ("method", "sid.alpha", "sid.sigma_init", "sid.tmax", "sid.p_mean", "sid.p_std",
               "sid.gen_loss_scale", "sid.fake_loss_scale", "sid.use_logvar",
               "sid.force_normalization", "sid.augment_p", "optim.fake_lr", "optim.gen_lr",
               "optim.fake_b1", "optim.gen_b1", "optim.b2", "optim.eps", "optim.fake_clip_value",
               "ema.halflife_kimg", "ema.rampup", "model.init_from", "model.class_name",
               "data.channels", "sida.adv_loss_scale", "sida.gan_loss_scale", "sida.sid2a",
               "sida.official_init")


@pytest.mark.parametrize("sid2a", [False, True], ids=["sida", "sid2a"])
@pytest.mark.parametrize("name,arg", VARIANTS, ids=IDS)
def test_real_variant_has_the_papers_values(name, arg, sid2a):
  key = arg.split("=")[1]
  c = configs_util.load(name, arg + (",sid2a" if sid2a else ""))
  s = c.sida
  assert c.method == "sida" and c.sid.alpha == 1.0 and s.sid2a is sid2a
  assert (c.sid.sigma_init, c.sid.tmax, c.sid.fake_loss_scale) == (2.5, 800.0, 1.0)
  assert s.gan_loss_scale == 0.01
  assert (s.generator_frozen_kimg, s.gan_start_kimg) == (100.0, 200.0)
  assert c.optim.fake_b1 == 0.0 and c.optim.gen_b1 == 0.0 and c.optim.b2 == 0.999
  assert s.init_generator == ""  # given on the command line
  assert c.model.init_from == "teacher" and c.data.path == ""
  if name == "sida_edm.py":
    e = EDM[key]
    duration = 100 if sid2a else e["duration"]
    assert c.training.global_batch == e["batch"]
    assert c.training.micro_batch == 4 * e["batch_gpu"]  # official rounds = batch / (4 x bgpu)
    assert s.adv_group_size == e["batch_gpu"]
    assert c.optim.fake_lr == c.optim.gen_lr == e["lr"] and c.optim.eps == e["eps"]
    assert c.model.kwargs["dropout"] == e["dropout"] and c.sid.augment_p == e["augment_p"]
    assert c.ema.halflife_kimg == e["ema"] * 1000
    assert s.adv_loss_scale == 1.0 and c.sid.gen_loss_scale == 100.0
    assert c.optim.fake_clip_value == 1.0
    assert (c.sid.p_mean, c.sid.use_logvar, c.sid.force_normalization) == (-1.2, False, False)
    assert c.data.source == "edm_zip" and c.data.official_name == e["zip"]
    assert s.official_init == (SID_URL + e["sid_model"] if sid2a else "")
  else:
    e = EDM2[key]
    duration = e["sid2a"] if sid2a else e["sida"]
    assert c.training.global_batch == 2048 and c.training.micro_batch == 4 * e["batch_gpu"]
    assert s.adv_group_size == e["batch_gpu"]
    assert c.optim.fake_lr == c.optim.gen_lr == 5e-5 and c.optim.eps == 1e-6
    assert c.ema.halflife_kimg == 2000 and c.sid.augment_p == 0.0
    assert s.adv_loss_scale == 100.0
    assert c.sid.gen_loss_scale == (e["lsg"] if sid2a else 100.0)
    assert c.optim.fake_clip_value is None
    assert c.sid.use_logvar is e["logvar"] and c.sid.force_normalization is e["logvar"]
    assert c.sid.p_mean == -0.4 and c.sid.p_std == 1.0
    assert c.data.source == "edm2_latent_zip" and c.data.official_name == "img512-sd.zip"
    assert s.official_init == (SIDA_EDM2_URL + e["sid_model"] if sid2a else "")
  assert c.training.num_steps == math.ceil(duration * 1e6 / c.training.global_batch)


@pytest.mark.parametrize("name,arg", VARIANTS, ids=IDS)
def test_sid2a_without_its_start_names_the_official_generator(name, arg):
  c = configs_util.load(name, arg + ",sid2a")
  with pytest.raises(ValueError, match="config.sida.init_generator") as e:
    run_lib.check_config(c, 8)
  assert c.sida.official_init and c.sida.official_init in str(e.value)
  run_lib.check_config(c, 8, abstract=True)  # `sid_jax.plan` needs no files


@pytest.mark.parametrize("name,arg,source,zip_name", [
    ("sida_edm.py", "dataset=ffhq64", "edm_zip", "ffhq-64x64.zip"),
    ("sida_edm2.py", "size=s", "edm2_latent_zip", "img512-sd.zip")], ids=["edm", "edm2"])
def test_missing_dataset_names_the_zip(name, arg, source, zip_name):
  c = configs_util.load(name, arg + ",tiny", **{"data.source": source})
  with pytest.raises(ValueError, match="config.data.path") as e:
    run_lib.build_run(c, ONE_DEVICE)
  assert zip_name in str(e.value)


@pytest.mark.parametrize("name,arg", VARIANTS, ids=IDS)
def test_tiny_variant_keeps_the_method_and_its_iteration_lowers(name, arg):
  for extra in ("", ",sid2a"):
    real = configs_util.load(name, arg + extra)
    c = configs_util.load(name, arg + extra + ",tiny")
    for key in METHOD_KEYS:
      assert _get(c, key) == _get(real, key), key
    assert c.model.kwargs["dropout"] == real.model.kwargs["dropout"]
    assert c.teacher.type == "random" and c.data.resolution == 8 and c.training.num_steps == 3
    assert c.data.source == "digits" and c.data.label_dim == min(real.data.label_dim, 10)
    # Step 0 frozen (0 images done), step 1 SiD alone (16 <= 16), steps 2 on SiD + GAN.
    assert c.sida.generator_frozen_kimg == 0.0 and c.sida.gan_start_kimg == 0.016
    assert c.training.micro_batch % c.sida.adv_group_size == 0
    assert c.training.micro_batch // c.sida.adv_group_size == 2  # two BCE groups per batch
  c = configs_util.load(name, arg + ",tiny")
  run = run_lib.build_run(c, ONE_DEVICE)
  assert run.setup.fake_loss.uses_real_data
  assert run.setup.fake_loss.group_size == run.setup.generator_loss.group_size == 8
  assert run.setup.fake_loss.use_logvar is real.sid.use_logvar
  assert run.setup.project_fake is False
  batch = run.feed.next()
  assert batch["fake"]["images"].shape == (1, 16, 8, 8, c.data.channels)
  abstract = jax.eval_shape(lambda p: steps.init_state(run.setup, p, p), run.init_params)
  lowered = run_lib.lower_train_step(run, abstract, run_lib.abstract_teacher(run),
                                     jax.random.key(0))
  _, metrics_info = lowered.out_info
  assert {"fake_loss", "gen_loss", "fake_grad_norm", "gen_grad_norm"} <= set(metrics_info)


# ---------------------------------------------------------------------------------------------
# Tiny runs on real (test) data: train, checkpoint, resume with the data position restored.
# ---------------------------------------------------------------------------------------------


def _train_records(workdir):
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return [r for r in records if r["kind"] == "train"]


def _generator(workdir, config):
  spec = checkpoints.load_network_spec(os.path.join(workdir, "generator"))
  den = models.build_denoiser(spec)
  d = config.data
  shape = (d.resolution, d.resolution, d.channels)
  return checkpoints.load_network_params(os.path.join(workdir, "generator"),
                                         models.abstract_params(den, shape, d.label_dim))


def _uninterrupted_and_resumed(config, tmp_path):
  """Runs `config` (3 steps) straight through, and stopped after step 2 then resumed; checks
  that both end alike. Returns the straight run's workdir."""
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  summary = train.distill(config, straight, devices=ONE_DEVICE)
  assert summary["status"] == "done" and summary["step"] == 3
  first = config.copy_and_resolve_references()
  first.training.num_steps = 2
  assert train.distill(first, resumed, devices=ONE_DEVICE)["step"] == 2
  summary = train.distill(config, resumed, devices=ONE_DEVICE)
  assert summary["status"] == "done" and summary["step"] == 3

  a, b = _train_records(straight), _train_records(resumed)
  assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
  for ra, rb in zip(a, b):
    for key in ("fake_loss", "gen_loss", "fake_grad_norm", "gen_grad_norm"):
      assert np.isfinite(ra[key]) and ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])
  ga, gb = _generator(straight, config), _generator(resumed, config)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The checkpoint keeps the feed's position: 2 batches per iteration (fake step images and
  # labels, generator step labels) for conditional runs, 1 otherwise.
  ckpt = checkpoints.Checkpointer(os.path.join(resumed, "checkpoints"), every_steps=1, keep=None,
                                  async_save=False)
  meta = ckpt.read_meta(3)
  ckpt.close()
  per_step = 2 if config.data.label_dim else 1
  assert meta[train.FEED_META_KEY]["batches"] == 3 * per_step
  return straight


def test_tiny_sida_on_an_edm_zip_resumes_where_the_data_stopped(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
  path = write_edm_zip(tmp_path / "cifar.zip", images, np.arange(40) % 10)
  c = configs_util.load("sida_edm.py", "dataset=cifar10_cond,tiny",
                        **{"data.source": "edm_zip", "data.path": path})
  straight = _uninterrupted_and_resumed(c, tmp_path)
  records = _train_records(straight)
  # Step 1: the generator is frozen (its optimiser step skipped, the EMA follows it); the GAN
  # term joins at step 3 (after 32 > 16 images): the generator's loss changes its form.
  assert all(r["gen_grad_norm"] > 0 and r["fake_grad_norm"] > 0 for r in records)


def test_tiny_sid2a_edm2_from_a_sid_export_on_a_latent_zip(tmp_path):
  sid = configs_util.load("sid_edm2.py", "size=xs,tiny")
  assert train.distill(sid, str(tmp_path / "sid"), devices=ONE_DEVICE)["step"] == 3
  rng = np.random.default_rng(1)
  mean_std = np.concatenate([rng.normal(0, 4, (24, 4, 8, 8)),
                             rng.uniform(0.1, 1, (24, 4, 8, 8))], axis=1)
  path = write_edm2_zip(tmp_path / "img512-sd.zip", mean_std, np.arange(24) % 10)
  c = configs_util.load("sida_edm2.py", "size=xs,sid2a,tiny",
                        **{"data.source": "edm2_latent_zip", "data.path": path,
                           "sida.init_generator": str(tmp_path / "sid")})
  run = run_lib.build_run(c, ONE_DEVICE)
  state = run_lib.initial_state(run)
  sid_generator = _generator(str(tmp_path / "sid"), sid)
  for x, y in zip(jax.tree.leaves(state.generator), jax.tree.leaves(sid_generator)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  teacher = models.build_teacher(c)
  for x, y in zip(jax.tree.leaves(state.fake_score), jax.tree.leaves(teacher.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  straight = _uninterrupted_and_resumed(c, tmp_path)
  # EDM2's latents are decoded to images (the tiny random VAE) in the sample grids.
  grids = sorted(os.listdir(os.path.join(straight, "samples")))
  grid = np.asarray(PIL.Image.open(os.path.join(straight, "samples", grids[-1])))
  assert grid.ndim == 3 and grid.shape[2] == 3
