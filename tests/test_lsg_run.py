"""The SiD-LSG job end to end on the tiny random SD model: trains, checkpoints, resumes."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from sid_jax import checkpoints, generators, steps, train
from sid_jax import run as run_lib
from sid_jax.models import stable_diffusion
from tests import configs_util


ONE_DEVICE = jax.devices()[:1]  # compiles faster; the steps' sharding is tested in test_steps


def _restore(workdir, step, config):
  run = run_lib.build_run(config, ONE_DEVICE)
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=1, keep=10)
  abstract = jax.eval_shape(lambda p: steps.init_state(run.setup, p, p), run.init_params)
  abstract = {"state": abstract, "rng": jax.ShapeDtypeStruct((2,), np.uint32)}
  state, meta = ckpt.restore(step, abstract, config.to_dict())
  ckpt.close()
  return state, meta


def test_tiny_lsg_run_trains_checkpoints_and_resumes(tmp_path):
  config = configs_util.load("sd15_lsg.py", "kappa=2,tiny", **{"checkpoint.every_steps": 1,
                                                                "checkpoint.keep": 5,
                                                                "eval.batch": 4})
  full = train.distill(config, str(tmp_path / "full"), devices=ONE_DEVICE)
  assert full["status"] == "done" and full["checkpoint_steps"] == [1, 2, 3]
  records = [json.loads(l) for l in open(tmp_path / "full" / "metrics.jsonl")]
  train_records = [r for r in records if r["kind"] == "train"]
  assert [r["step"] for r in train_records] == [1, 2, 3]
  for r in train_records:
    assert np.isfinite(r["fake_loss"]) and np.isfinite(r["gen_loss"]) and r["fake_loss"] > 0
    assert r["fake_valid_fraction"] == 1.0 and r["gen_valid_fraction"] == 1.0
  assert os.path.isfile(tmp_path / "full" / "samples" / "grid_00000003.png")

  # Resume from step 2 of the same run (a copy of its checkpoint directory, as a pre-empted run
  # leaves it): the prompt stream continues where it stopped and step 3 is reproduced exactly.
  part = tmp_path / "part" / "checkpoints"
  shutil.copytree(tmp_path / "full" / "checkpoints" / "2", part / "2")
  resumed = train.distill(config, str(tmp_path / "part"), devices=ONE_DEVICE)
  assert resumed["status"] == "done" and resumed["start_step"] == 2
  per_step = 2 * config.training.global_batch  # fake-step and generator-step prompts
  a, meta_a = _restore(str(tmp_path / "full"), 3, config)
  b, meta_b = _restore(str(tmp_path / "part"), 3, config)
  assert meta_a["feed"] == meta_b["feed"] and meta_b["feed"]["position"] == 3 * per_step
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)
  # Training moved the generator's EMA away from the teacher's UNet.
  teacher = run_lib.build_run(config, ONE_DEVICE).init_params
  moved = [float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
           for x, y in zip(jax.tree.leaves(b["state"].generator_ema), jax.tree.leaves(teacher))]
  assert max(moved) > 0

  # The exported generator is a complete Stable Diffusion checkpoint marked as a generator.
  sd, params = stable_diffusion.load(str(tmp_path / "full" / "generator"))
  spec = checkpoints.load_network_spec(str(tmp_path / "full" / "generator"))
  assert spec["kwargs"]["generator"] == {"init_timestep": 625} and spec["step"] == 3
  for x, y in zip(jax.tree.leaves(params["unet"]), jax.tree.leaves(a["state"].generator_ema)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert sd.tokenize(["a"]).shape == (1, 77)

  # Resuming with another prompt list is refused before anything is compiled.
  other = tmp_path / "prompts.txt"
  other.write_text("one\ntwo\nthree\n")
  config.lsg.prompts = str(other)
  config.training.num_steps = 4
  with pytest.raises(ValueError, match="num_prompts"):
    train.distill(config, str(tmp_path / "full"), devices=ONE_DEVICE)


@pytest.mark.parametrize("name,teacher", [("sd15_lsg.py", "sd15"), ("sd21base_lsg.py", "sd21base")])
@pytest.mark.parametrize("kappa", [1.5, 2.0, 3.0, 4.5])
def test_paper_settings(name, teacher, kappa):
  c = configs_util.load(name, f"kappa={kappa}")
  g = c.lsg
  assert c.method == "sid_lsg" and c.teacher.type == "network"
  assert (g.cfg_fake_train, g.cfg_fake_eval, g.cfg_teacher) == (kappa, kappa, kappa)
  assert (g.init_timestep, g.t_min, g.t_max, g.cond_dropout) == (625, 20, 980, 0.1)
  assert c.sid.alpha == 1.0 and c.sid.gen_loss_scale == 1.0 and c.sid.fake_loss_scale == 1.0
  assert (c.optim.fake_lr, c.optim.gen_lr, c.optim.fake_b1, c.optim.gen_b1, c.optim.b2,
          c.optim.eps) == (1e-6, 1e-6, 0.0, 0.0, 0.999, 1e-8)
  assert c.ema.halflife_kimg == 50.0 and c.ema.rampup == 0.05
  assert c.training.global_batch == 512 and g.compute_dtype == "float32"
  kimg = configs_util.load_module("sid_lsg.py").RELEASED_KIMG[teacher][kappa]
  assert (c.training.num_steps - 1) * 512 < kimg * 1000 <= c.training.num_steps * 512
  assert (c.data.resolution, c.data.channels, c.data.label_dim) == (64, 4, 0)
  assert g.tiny_sd2 == (teacher == "sd21base")


def test_bad_lsg_settings_fail_before_building():
  with pytest.raises(ValueError, match="kappa=2.5 has no released model"):
    configs_util.load("sd15_lsg.py", "kappa=2.5")
  config = configs_util.load("sd15_lsg.py", "kappa=2")
  with pytest.raises(FileNotFoundError, match="convert sd"):
    run_lib.build_run(config)
  for override, pattern in [({"lsg.cfg_teacher": 0.0}, "config.lsg.cfg_teacher"),
                            ({"lsg.compute_dtype": "float16"}, "config.lsg.compute_dtype"),
                            ({"model.compute_dtype": "bfloat16"}, "set that one"),
                            ({"lsg.prompts": "/nonexistent.txt"}, "config.lsg.prompts"),
                            ({"lsg.t_min": 990}, "t_min"),
                            ({"eval.kind": "fid"}, "config.eval.kind")]:
    bad = configs_util.load("sd15_lsg.py", "kappa=2,tiny", **override)
    with pytest.raises((ValueError, FileNotFoundError), match=pattern):
      run_lib.build_run(bad)


def test_bfloat16_switch_keeps_float32_master_weights():
  """compute_dtype=bfloat16: the networks compute in bf16, the state (parameters, Adam, EMA)
  stays float32 and the losses are float32 (traced only, nothing is compiled)."""
  config = configs_util.load("sd15_lsg.py", "kappa=2,tiny",
                             **{"lsg.compute_dtype": "bfloat16"})
  run = run_lib.build_run(config, ONE_DEVICE)
  assert run.generator.sd.unet.dtype == jax.numpy.bfloat16
  state = jax.eval_shape(lambda p: steps.init_state(run.setup, p, p), run.init_params)
  out_state, metrics = jax.eval_shape(
      lambda s, f, b: steps.train_step(run.setup, s, f, jax.random.key(0), b), state,
      run.teacher.params, run.feed.abstract())
  dtypes = {leaf.dtype for leaf in jax.tree.leaves(
      (out_state.generator, out_state.generator_ema, out_state.fake_score,
       out_state.generator_opt, out_state.fake_opt)) if leaf.dtype != jax.numpy.int32}
  assert dtypes == {jax.numpy.dtype("float32")}
  assert metrics["gen_loss"].dtype == metrics["fake_loss"].dtype == jax.numpy.float32


def test_evaluating_a_text_to_image_checkpoint_points_to_the_sampler(tmp_path):
  from sid_jax import evaluate  # pylint: disable=g-import-not-at-top
  config = configs_util.load("sd15_lsg.py", "kappa=2,tiny")
  ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"), every_steps=1, keep=1,
                                  async_save=False)
  ckpt.save(1, {"step": np.zeros((), np.int32)}, {"config": config.to_dict()}, force=True)
  ckpt.close()
  with pytest.raises(evaluate.EvaluationError, match="sid_jax.sample --workdir RUN --prompts"):
    evaluate.restore_generator(str(tmp_path))


def test_full_size_sd21base_iteration_traces():
  """The real SD 2.1-base architecture (865.9M UNet, 340.4M OpenCLIP-H text encoder, 83.7M VAE:
  the diffusers / transformers parameter counts) through one guided SiD-LSG iteration with
  remat, traced abstractly (no weights, nothing compiled)."""
  from sid_jax import losses, optim  # pylint: disable=g-import-not-at-top
  spec = stable_diffusion.reference_spec("sd21base")
  tokenizer = stable_diffusion.tiny_tokenizer_dir(stable_diffusion.tiny_spec())
  sd = stable_diffusion.build(spec, tokenizer, remat=True)
  abstract = stable_diffusion.abstract_params(sd)
  counts = {k: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(v)) for k, v in abstract.items()}
  assert counts == {"unet": 865_910_724, "text_encoder": 340_387_840, "vae": 83_653_863}
  den = sd.denoiser
  adam = optim.adam(1e-6, 0.0, 0.999, 1e-8)
  levels = losses.DiscreteLevels(tuple(float(x) for x in den.sigmas))
  setup = steps.SiDSetup(
      teacher=lambda fz, *a, **k: den(fz["unet"], *a, **k), fake_score=den,
      generate=generators.one_step(den, den.sigma_at(625)),
      fake_loss=losses.DSMLoss(levels=levels, weight=losses.EpsWeight()),
      generator_loss=losses.SiDGeneratorLoss(levels=levels, alpha=1.0, loss_scale=1.0),
      image_shape=sd.latent_shape, label_dim=0, global_batch=2, micro_batch=2,
      hyper=steps.SiDHyper(cfg_fake_train=2.0, cfg_fake_eval=2.0, cfg_teacher=2.0),
      generator_tx=adam, fake_tx=adam,
      conditioning=steps.Conditioning(
          encode=lambda fz, ids: sd.encode_text(fz["text_encoder"], ids),
          uncond=lambda fz: fz["uncond"]))
  frozen = {"unet": abstract["unet"], "text_encoder": abstract["text_encoder"],
            "uncond": jax.ShapeDtypeStruct((1, 77, 1024), jax.numpy.float32)}
  state = jax.eval_shape(lambda p: steps.init_state(setup, p, p), abstract["unet"])
  ids = jax.ShapeDtypeStruct((1, 2, 77), jax.numpy.int32)
  out, metrics = jax.eval_shape(
      lambda s, f, b: steps.train_step(setup, s, f, jax.random.key(0), b), state, frozen,
      {"fake": ids, "gen": ids})
  assert jax.tree.structure(out.generator) == jax.tree.structure(abstract["unet"])
  assert metrics["gen_loss"].shape == () and metrics["gen_loss"].dtype == jax.numpy.float32
  image = jax.eval_shape(sd.decode, abstract["vae"],
                         jax.ShapeDtypeStruct((1, 64, 64, 4), jax.numpy.float32))
  assert image.shape == (1, 512, 512, 3)
