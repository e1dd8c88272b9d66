"""One SiD-LSG iteration against a PyTorch transcription of the official training step.

sid_jax side: the run SiD-LSG's config builds (`run.build_run` on one device, the teacher read
from a converted checkpoint as users run it) and its jitted `steps.train_step`, with
kappa_1 = 1.5, kappa_2 = 2, kappa_4 = 3 and the fake step's prompt-drop mask forced through the
step's `fake_draws` / `gen_draws` seam (which also carries the official side's z, noise and t).

PyTorch side: the official iteration (`training/sid_training_loop.py` of mingyuanzhou/SiD-LSG,
lsg_spec §3-§5) written out with diffusers' UNet2DConditionModel, DDPMScheduler (add_noise and
`step(...).pred_original_sample`, as `sid_sd_sampler` / `sid_sd_denoise` use them) and
transformers' CLIPTextModel, all with the same weights: the fake-score update (prompts dropped
to "" *before* the generator makes its samples, guided epsilon at kappa_1), then the generator
update with the just-updated fake score (no dropout; fake score at kappa_2, teacher at kappa_4),
each with nan_to_num and torch.optim.Adam(betas=(0, 0.999)), then the EMA.

Adam's first step with beta1 = 0 is lr g / (|g| + eps): with the paper's eps = 1e-8 it is
lr sign(g) and would hide any gradient error short of a sign flip. Here eps (1e4) is about 100
times every gradient, so the step is lr / eps * g to within about 1% (checked: every update is
below 2% of lr) and the parameter comparison is a gradient comparison.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sid_jax import run as run_lib
from sid_jax import steps
from sid_jax.models import stable_diffusion
from sid_jax.weights import clip as clip_params
from sid_jax.weights import sd_unet as sd_unet_params
from tests import configs_util

jax.config.update("jax_default_matmul_precision", "highest")

ONE_DEVICE = jax.devices()[:1]
KAPPA = {"fake_train": 1.5, "fake_eval": 2.0, "teacher": 3.0}  # kappa_1, kappa_2 = kappa_3, kappa_4
# One accumulation round (each round is unrolled into the compiled step on a CPU; rounds are
# summed by the code every SiD method shares, tested in test_steps).
BATCH, MICRO = 4, 4
FAKE_PROMPTS = ["a red cat", "a photo of a dog on grass", "an oil painting of a harbour",
                "two birds on a wire"]
GEN_PROMPTS = ["a bowl of soup", "a castle in the snow", "a small robot", "a yellow taxi"]
DROP = np.asarray([[True, False, False, True]])  # the fake step's forced prompt-drop mask
LR, EPS = 3.0, 1e4  # Adam(beta1 = 0) with eps >> |g|: an SGD step of lr / eps (module docstring)
# float32 tolerances: the two sides sum the same float32 products in other orders (XLA vs
# PyTorch convolutions, attention and reductions over 256-element latents), ~1e-6 relative per
# UNet call; the generator loss and its gradient go through the difference of two guided
# denoisers (y_real - y_fake), which loses about two more digits. Each deliberate mistake below
# moves the compared numbers by far more (checked in test_every_checked_mistake_is_detected).
LOSS_RTOL = {"fake_loss": 1e-5, "gen_loss": 1e-4}
PARAM_TOL = 1e-4  # of the largest update of that network


def _randomise(module, seed, std=0.08):
  """Every parameter redrawn (no default-init zeros or ones): weights N(0, std^2), norm scales
  1 + N(0, 0.1^2), biases N(0, 0.05^2)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if p.ndim > 1:
        p.copy_(noise * std)
      elif name.endswith("weight"):
        p.copy_(1.0 + 0.1 * noise)
      else:
        p.copy_(0.05 * noise)
  return module


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """Torch teacher / fake-score / generator UNets and text encoder; the teacher folder
  (converted checkpoint) and prompt file the sid_jax run reads."""
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextConfig, CLIPTextModel  # pylint: disable=g-import-not-at-top
  spec = stable_diffusion.tiny_spec()
  tokenizer_dir = stable_diffusion.tiny_tokenizer_dir(spec)
  sd = stable_diffusion.build(spec, tokenizer_dir)
  kw = spec["kwargs"]
  unet_cfg = {k: v for k, v in kw["unet"].items() if not k.startswith("_")}
  unets = {name: _randomise(UNet2DConditionModel(**unet_cfg).eval(), seed)
           for name, seed in (("teacher", 1), ("fake", 2), ("gen", 3))}
  text_cfg = {k: v for k, v in kw["text_encoder"].items() if k != "model_type"}
  text = _randomise(CLIPTextModel(CLIPTextConfig(**text_cfg)).eval(), 4, std=0.2)
  flax = {name: sd_unet_params.unet_params(u.state_dict(), sd.unet) for name, u in unets.items()}
  params = {"unet": flax["teacher"], "vae": stable_diffusion.random_params(sd, 0)["vae"],
            "text_encoder": clip_params.text_encoder_params(text.state_dict(), sd.text_encoder)}
  root = tmp_path_factory.mktemp("lsg_step")
  stable_diffusion.save(str(root / "teacher"), spec, params, tokenizer_dir)
  (root / "prompts.txt").write_text("\n".join(FAKE_PROMPTS + GEN_PROMPTS) + "\n")
  return dict(sd=sd, unets=unets, text=text, flax=flax, teacher_dir=str(root / "teacher"),
              prompts=str(root / "prompts.txt"))


def _draws():
  """The iteration's random draws, as the official loop makes them (NCHW, integer t)."""
  rs = np.random.RandomState(0)
  shape = (BATCH // MICRO, MICRO, 4, 8, 8)
  out = {}
  for name in ("fake", "gen"):
    out[name] = {"z": rs.standard_normal(shape).astype(np.float32),
                 "noise": rs.standard_normal(shape).astype(np.float32),
                 "t": rs.randint(20, 980, shape[:2])}
  return out


# ---------------------------------------------------------------------------------------------
# The official iteration in PyTorch.
# ---------------------------------------------------------------------------------------------


def _official_iteration(models, draws, kappa, *, mistake=None):
  """Losses and updated parameters of one official iteration; `mistake` swaps in one of the
  errors the sid_jax test must catch (see test_every_checked_mistake_is_detected). Torch runs on
  one thread: its thread pool is ~20x slower on these tiny tensors on a busy host."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    return _official_iteration_body(models, draws, kappa, mistake)
  finally:
    torch.set_num_threads(threads)


def _official_iteration_body(models, draws, kappa, mistake):
  from diffusers import DDPMScheduler  # pylint: disable=g-import-not-at-top
  k1, k2, k4 = kappa["fake_train"], kappa["fake_eval"], kappa["teacher"]
  if mistake == "kappa1_kappa2_swapped":
    k1, k2 = k2, k1
  if mistake == "kappa2_kappa4_swapped":
    k2, k4 = k4, k2
  sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                        beta_schedule="scaled_linear", clip_sample=False)
  tok = models["sd"].tokenizer
  text = models["text"]
  teacher = models["unets"]["teacher"]
  fake = _clone(models["unets"]["fake"])
  gen = _clone(models["unets"]["gen"])
  stale_fake = _clone(models["unets"]["fake"])

  def embed(contexts):
    ids = tok(contexts, padding="max_length", max_length=77, truncation=True,
              return_tensors="pt")["input_ids"]
    with torch.no_grad():
      return text(ids.long())[0]

  def sample(unet, z, contexts):  # sid_sd_sampler, one step from t_init = 625
    t = torch.full((len(contexts),), 625, dtype=torch.long)
    x = sched.add_noise(torch.zeros_like(z), z, t)
    eps = unet(x, t, encoder_hidden_states=embed(contexts)).sample
    return sched.step(eps, 625, x).pred_original_sample

  def denoise(unet, images, noise, contexts, t, scale, predict_x0=True):  # sid_sd_denoise
    cond, uncond = embed(contexts), embed([""] * len(contexts))
    x = sched.add_noise(images, noise, t)
    if scale == 1:
      eps = unet(x, t, encoder_hidden_states=cond).sample
    else:
      out = unet(torch.cat([x, x]), torch.cat([t, t]),
                 encoder_hidden_states=torch.cat([uncond, cond])).sample
      e_u, e_c = out.chunk(2)
      eps = e_u + scale * (e_c - e_u)
    if not predict_x0:
      return eps
    return torch.stack([sched.step(e, int(ti), xi).pred_original_sample
                        for e, ti, xi in zip(eps, t, x)])

  def adam(net):
    return torch.optim.Adam(net.parameters(), lr=LR, betas=(0.0, 0.999), eps=EPS)

  def sanitise(net):
    for p in net.parameters():
      if p.grad is not None:
        torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)

  losses = {"fake_loss": 0.0, "gen_loss": 0.0}
  # Fake-score update: prompts dropped first, then the generator samples from them.
  opt = adam(fake)
  opt.zero_grad(set_to_none=True)
  d = draws["fake"]
  for r in range(BATCH // MICRO):
    prompts = FAKE_PROMPTS[r * MICRO:(r + 1) * MICRO]
    contexts = ["" if drop else p for drop, p in zip(DROP[r], prompts)]
    z, noise = torch.as_tensor(d["z"][r]), torch.as_tensor(d["noise"][r])
    t = torch.as_tensor(d["t"][r], dtype=torch.long)
    with torch.no_grad():
      images = sample(gen, z, prompts if mistake == "generator_sees_undropped" else contexts)
    eps = denoise(fake, images, noise, contexts, t, k1, predict_x0=False)
    loss = ((eps - noise)**2).sum() * (1.0 / BATCH)
    loss.backward()
    losses["fake_loss"] += loss.item()
  sanitise(fake)
  opt.step()
  # Generator update with the updated fake score; no prompt dropout.
  opt = adam(gen)
  opt.zero_grad(set_to_none=True)
  d = draws["gen"]
  for net in (fake, stale_fake, teacher):
    net.requires_grad_(False)
  scorer = stale_fake if mistake == "generator_step_uses_stale_fake_score" else fake
  for r in range(BATCH // MICRO):
    contexts = GEN_PROMPTS[r * MICRO:(r + 1) * MICRO]
    if mistake == "dropout_in_generator_step":
      contexts = ["" if drop else p for drop, p in zip(DROP[r], contexts)]
    z, noise = torch.as_tensor(d["z"][r]), torch.as_tensor(d["noise"][r])
    t = torch.as_tensor(d["t"][r], dtype=torch.long)
    images = sample(gen, z, contexts)
    y_fake = denoise(scorer, images, noise, contexts, t, k2)
    y_real = denoise(teacher, images, noise, contexts, t, k4)
    with torch.no_grad():
      w = (images - y_real).abs().mean(dim=[1, 2, 3], keepdim=True).clip(min=1e-5)
    loss = ((y_real - y_fake) * (y_fake - images) / w).sum() * (1.0 / BATCH)  # alpha = 1
    loss.backward()
    losses["gen_loss"] += loss.item()
  sanitise(gen)
  opt.step()
  # EMA: beta = 0.5^(B / max(min(h, 0.05 cur_nimg), 1e-8)) = 0 at cur_nimg = 0.
  ema = _clone(models["unets"]["gen"])
  with torch.no_grad():
    for p_ema, p in zip(ema.parameters(), gen.parameters()):
      p_ema.copy_(p.detach().lerp(p_ema, 0.0))
  state = {name: {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
           for name, net in (("fake", fake), ("gen", gen), ("ema", ema))}
  return losses, state


def _clone(unet):
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  copy = UNet2DConditionModel(**{k: v for k, v in unet.config.items() if not k.startswith("_")})
  copy.load_state_dict(unet.state_dict())
  return copy.eval()


# ---------------------------------------------------------------------------------------------
# sid_jax's step.
# ---------------------------------------------------------------------------------------------


def _config(models):
  return configs_util.load(
      "sd15_lsg.py", "kappa=2,tiny",
      **{"teacher.type": "network", "teacher.checkpoint": models["teacher_dir"],
         "lsg.prompts": models["prompts"],
         "lsg.cfg_fake_train": KAPPA["fake_train"], "lsg.cfg_fake_eval": KAPPA["fake_eval"],
         "lsg.cfg_teacher": KAPPA["teacher"],
         # Were dropout ever applied in the generator step, it would replace most prompts there.
         "lsg.cond_dropout": 0.9,
         "training.global_batch": BATCH, "training.micro_batch": MICRO,
         "optim.fake_lr": LR, "optim.gen_lr": LR, "optim.eps": EPS})


def _nhwc(x):
  return np.moveaxis(x, -3, -1)


def _step_inputs(models, run, draws):
  """The batch: token ids, and the official draws through the seam (sigma_t for integer t)."""
  sd, sigmas = models["sd"], models["sd"].denoiser.sigmas
  shape = (BATCH // MICRO, MICRO, stable_diffusion.MAX_LENGTH)
  batch = {"fake": jnp.asarray(sd.tokenize(FAKE_PROMPTS).reshape(shape)),
           "gen": jnp.asarray(sd.tokenize(GEN_PROMPTS).reshape(shape))}
  for name in ("fake", "gen"):
    d = draws[name]
    batch[f"{name}_draws"] = {"z": jnp.asarray(_nhwc(d["z"])),
                              "noise": jnp.asarray(_nhwc(d["noise"])),
                              "sigma": jnp.asarray(sigmas[d["t"]], jnp.float32)}
  batch["fake_draws"]["drop"] = jnp.asarray(DROP)
  state = steps.init_state(run.setup, models["flax"]["gen"], models["flax"]["fake"])
  return state, batch


@pytest.fixture(scope="module")
def results(models):
  run = run_lib.build_run(_config(models), ONE_DEVICE)
  draws = _draws()
  state, batch = _step_inputs(models, run, draws)
  step = jax.jit(functools.partial(steps.train_step, run.setup))
  with jax.set_mesh(run.mesh):
    new_state, metrics = step(state, run.teacher.params, jax.random.key(0), batch)
  ours = {"fake_loss": float(metrics["fake_loss"]), "gen_loss": float(metrics["gen_loss"]),
          "state": {"fake": new_state.fake_score, "gen": new_state.generator,
                    "ema": new_state.generator_ema}}
  return dict(run=run, ours=ours, ref=_official_iteration(models, draws, KAPPA), draws=draws)


def _update_error(models, ours, ref_state, name):
  """Largest difference between the two sides' parameter updates, and the largest update."""
  sd = models["sd"]
  start = models["flax"]["gen" if name == "ema" else name]
  ref = sd_unet_params.unet_params(ref_state[name], sd.unet)
  ours_upd = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                          ours["state"][name], start)
  ref_upd = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                         ref, start)
  err = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(ours_upd),
                                                          jax.tree.leaves(ref_upd)))
  scale = max(float(np.max(np.abs(b))) for b in jax.tree.leaves(ref_upd))
  return err, scale


def test_run_carries_the_guidance_settings(results):
  h = results["run"].setup.hyper
  assert (h.cfg_fake_train, h.cfg_fake_eval, h.cfg_teacher) == (1.5, 2.0, 3.0)
  assert h.effective_cond_dropout == 0.9


def test_losses_match_the_official_step(results):
  ref_losses, _ = results["ref"]
  for name, rtol in LOSS_RTOL.items():
    np.testing.assert_allclose(results["ours"][name], ref_losses[name], rtol=rtol, err_msg=name)


@pytest.mark.parametrize("name", ["fake", "gen", "ema"])
def test_updated_parameters_match_the_official_step(models, results, name):
  """The fake score after its update (kappa_1, dropped prompts to G), the generator after its
  update (kappa_2, kappa_4, the updated fake score, no dropout) and the EMA (beta = 0 at step 0)."""
  err, scale = _update_error(models, results["ours"], results["ref"][1], name)
  assert 1e-3 < scale < 0.02 * LR and err < PARAM_TOL * scale, (err, scale)


@pytest.mark.parametrize("mistake", ["kappa1_kappa2_swapped", "kappa2_kappa4_swapped",
                                     "generator_sees_undropped", "dropout_in_generator_step",
                                     "generator_step_uses_stale_fake_score"])
def test_every_checked_mistake_is_detected(models, results, mistake):
  """The official step with one mistake differs from sid_jax's step by far more than the
  tolerances above: a step with that mistake would fail these tests."""
  losses, state = _official_iteration(models, results["draws"], KAPPA, mistake=mistake)
  misses = [abs(results["ours"][k] - losses[k]) / (abs(losses[k]) * rtol)
            for k, rtol in LOSS_RTOL.items()]
  for name in ("fake", "gen"):
    err, scale = _update_error(models, results["ours"], state, name)
    misses.append(err / (PARAM_TOL * scale))
  assert max(misses) > 100, (mistake, misses)


def test_generator_step_has_no_drop_mask_to_force(models, results):
  """The generator update draws no dropout mask: forcing one is refused by name."""
  run = results["run"]
  state, batch = _step_inputs(models, run, results["draws"])
  batch["gen_draws"]["drop"] = jnp.asarray(DROP)
  with pytest.raises(ValueError, match="'drop'.*not one of this update's draws"):
    jax.eval_shape(functools.partial(steps.train_step, run.setup), state, run.teacher.params,
                   jax.random.key(0), batch)
