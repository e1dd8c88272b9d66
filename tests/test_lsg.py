"""SiD-LSG against the official definitions (lsg_spec §1-§4, §9).

The PyTorch side is a direct transcription of the spec's formulas around diffusers' and
transformers' tiny random modules (the official code's numerics); the JAX side is sid_jax's shared
denoiser / loss / step code with the same weights converted by the converters users run.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sid_jax import denoisers, generators, losses, optim, steps
from sid_jax.models import stable_diffusion
from sid_jax.weights import clip as clip_params
from sid_jax.weights import sd_unet as sd_unet_params

jax.config.update("jax_default_matmul_precision", "highest")

B = 3
PROMPTS = ["a red cat", "a photo of a dog on grass", ""]


def _randomise(module, seed, std=0.08):
  """Every parameter redrawn: weights N(0, std^2), norm scales 1 + N(0, 0.1^2), biases small."""
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
def tiny():
  """Tiny torch teacher / fake / generator UNets and text encoder, and their Flax twins."""
  from diffusers import UNet2DConditionModel
  from transformers import CLIPTextConfig, CLIPTextModel
  spec = stable_diffusion.tiny_spec()
  sd = stable_diffusion.build(spec, stable_diffusion.tiny_tokenizer_dir(spec))
  kw = spec["kwargs"]
  unet_cfg = {k: v for k, v in kw["unet"].items() if not k.startswith("_")}
  torch.manual_seed(0)
  unets = [_randomise(UNet2DConditionModel(**unet_cfg).eval(), seed) for seed in (1, 2, 3)]
  text_cfg = {k: v for k, v in kw["text_encoder"].items() if k != "model_type"}
  text = _randomise(CLIPTextModel(CLIPTextConfig(**text_cfg)).eval(), 4, std=0.2)
  flax_unets = [sd_unet_params.unet_params(u.state_dict(), sd.unet) for u in unets]
  text_params = clip_params.text_encoder_params(text.state_dict(), sd.text_encoder)
  ids = sd.tokenize(PROMPTS)
  with torch.no_grad():
    emb_t = text(torch.as_tensor(ids, dtype=torch.long)).last_hidden_state
    uncond_t = text(torch.as_tensor(sd.tokenize([""]), dtype=torch.long)).last_hidden_state
  rs = np.random.RandomState(0)
  draws = {
      "z": rs.standard_normal((B, 4, 8, 8)).astype(np.float32),
      "n": rs.standard_normal((B, 4, 8, 8)).astype(np.float32),
      "t": np.asarray([20, 500, 979]),
  }
  return dict(sd=sd, unets=unets, flax=flax_unets, text=text, text_params=text_params, ids=ids,
              emb_t=emb_t, uncond_t=uncond_t, draws=draws)


def nhwc(t):
  return jnp.asarray(np.transpose(np.asarray(t.detach()), (0, 2, 3, 1)))


def nchw(a):
  return torch.as_tensor(np.ascontiguousarray(np.transpose(np.asarray(a), (0, 3, 1, 2))))


# ---------------------------------------------------------------------------------------------
# §1.2: the schedule.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(beta_schedule="scaled_linear"),
                                dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)])
def test_schedule_is_diffusers_bit_for_bit(kw):
  from diffusers import DDPMScheduler
  full = {"beta_start": 0.00085, "beta_end": 0.012, **kw}
  ours = denoisers.ddpm_alphas_cumprod(1000, **full)
  ref = DDPMScheduler(num_train_timesteps=1000, **full).alphas_cumprod.numpy()
  assert ours.dtype == np.float32
  np.testing.assert_array_equal(ours, ref)


def test_schedule_reference_values():
  acp = denoisers.ddpm_alphas_cumprod()
  np.testing.assert_allclose(acp[[0, 20, 625, 979, 999]],
                             [0.99914998, 0.98131430, 0.13776892, 0.00591277, 0.00466010],
                             rtol=0, atol=1e-8)
  np.testing.assert_allclose(denoisers.ddpm_sigmas(acp)[625], 2.5017057, atol=1e-6)
  with pytest.raises(ValueError, match="squaredcos"):
    denoisers.ddpm_alphas_cumprod(beta_schedule="squaredcos_cap_v2")


def test_noise_levels_are_integer_steps_in_range():
  sig = denoisers.ddpm_sigmas(denoisers.ddpm_alphas_cumprod())
  levels = losses.DiscreteLevels(tuple(sig), t_min=20, t_max=980)
  u = jnp.asarray([0.0, 0.5, 0.999999, 1.0 - 2**-24])
  t = levels.timestep(u)
  np.testing.assert_array_equal(t, [20, 500, 979, 979])
  sigma = levels.sigma(u)
  weight = losses.EpsWeight()(sigma)
  np.testing.assert_array_equal(sigma, sig[[20, 500, 979, 979]])
  np.testing.assert_allclose(weight, 1 / sig[[20, 500, 979, 979]]**2, rtol=1e-6)
  draws = levels.timestep(jax.random.uniform(jax.random.key(0), (20000,)))
  assert int(draws.min()) == 20 and int(draws.max()) == 979
  with pytest.raises(ValueError, match="t_min"):
    losses.DiscreteLevels(tuple(sig), t_min=500, t_max=400)


# ---------------------------------------------------------------------------------------------
# §1.2-§2: the denoiser, the generator, guidance.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip_sample", [False, True])
def test_denoiser_is_the_schedulers_x0_prediction(tiny, clip_sample):
  """D(x0 + sigma_t n) = DDPMScheduler.step(eps, t, x_t).pred_original_sample with the SD
  config (clip_sample False); a scheduler that clips (a config without the key) differs."""
  from diffusers import DDPMScheduler
  sd, d = tiny["sd"], tiny["draws"]
  sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                        beta_schedule="scaled_linear", clip_sample=clip_sample)
  x0 = torch.as_tensor(d["z"]) * 1.5  # latents well outside [-1, 1]
  n = torch.as_tensor(d["n"])
  refs = []
  for i, t in enumerate(d["t"]):
    xt = sched.add_noise(x0[i:i + 1], n[i:i + 1], torch.as_tensor([t]))
    with torch.no_grad():
      eps = tiny["unets"][0](xt, torch.as_tensor([t]), tiny["emb_t"][i:i + 1]).sample
    refs.append(sched.step(eps, int(t), xt).pred_original_sample)
  ref = nhwc(torch.cat(refs))
  sigma = jnp.asarray(sd.denoiser.sigmas[d["t"]])
  ours = sd.denoiser(tiny["flax"][0], nhwc(x0) + sigma[:, None, None, None] * nhwc(n), sigma,
                     nhwc_emb(tiny["emb_t"]))
  err = float(jnp.max(jnp.abs(ours - ref)))
  if clip_sample:
    assert err > 0.1
  else:
    assert err < 1e-4, err


def nhwc_emb(t):
  return jnp.asarray(t.detach().numpy())


def _torch_eps(unet, x, t, emb):
  return unet(x, torch.as_tensor(t), emb).sample


def _torch_guided_eps(unet, x, t, emb, uncond, scale):
  if scale == 1:
    return _torch_eps(unet, x, t, emb)
  b = x.shape[0]
  out = _torch_eps(unet, torch.cat([x, x]), np.concatenate([t, t]),
                   torch.cat([uncond.expand(b, -1, -1), emb]))
  e_u, e_c = out[:b], out[b:]
  return e_u + scale * (e_c - e_u)


def _acp(t):
  acp = torch.as_tensor(denoisers.ddpm_alphas_cumprod())[torch.as_tensor(t)]
  return acp.sqrt().view(-1, 1, 1, 1), (1 - acp).sqrt().view(-1, 1, 1, 1)


def test_generator_is_sigma_init_times_z_minus_eps(tiny):
  sd, d = tiny["sd"], tiny["draws"]
  z = torch.as_tensor(d["z"])
  a, s = _acp(np.full(B, 625))
  with torch.no_grad():
    x_in = s * z  # add_noise(0, z, 625)
    eps = _torch_eps(tiny["unets"][2], x_in, np.full(B, 625), tiny["emb_t"])
    ref = (x_in - s * eps) / a
  one_step = generators.one_step(sd.denoiser, sd.denoiser.sigma_at(625))
  ours = one_step(tiny["flax"][2], nhwc(z), nhwc_emb(tiny["emb_t"]))
  assert float(jnp.max(jnp.abs(ours - nhwc(ref)))) < 1e-4
  sigma = sd.denoiser.sigma_at(625)
  np.testing.assert_allclose(np.asarray(nhwc(ref)), np.asarray(sigma * (nhwc(z) - nhwc(eps))),
                             atol=5e-6)


def test_guided_denoiser(tiny):
  sd, d = tiny["sd"], tiny["draws"]
  calls = []

  def counting(x, sigma, cond):
    calls.append(x.shape[0])
    return sd.denoiser(tiny["flax"][0], x, sigma, cond)

  assert denoisers.guided(counting, 1.0, None) is counting  # kappa = 1: no unconditional pass
  x = nhwc(torch.as_tensor(d["z"]))
  sigma = jnp.asarray(sd.denoiser.sigmas[d["t"]])
  emb, uncond = nhwc_emb(tiny["emb_t"]), nhwc_emb(tiny["uncond_t"])
  ours = denoisers.guided(counting, 2.0, uncond)(x, sigma, emb)
  assert calls == [2 * B]  # one call on the 2B batch
  a, s = _acp(d["t"])
  with torch.no_grad():
    xt = a * nchw(x)
    eps = _torch_guided_eps(tiny["unets"][0], xt, d["t"], tiny["emb_t"], tiny["uncond_t"], 2.0)
    ref = (xt - s * eps) / a
  assert float(jnp.max(jnp.abs(ours - nhwc(ref)))) < 1e-4
  with pytest.raises(ValueError, match="unconditional"):
    denoisers.guided(counting, 2.0, None)


# ---------------------------------------------------------------------------------------------
# §4: the two losses and the generator's gradient, against a transcription of the spec.
# ---------------------------------------------------------------------------------------------


def _torch_losses(tiny, alpha, kappa, generator_grads=False):
  """The official fake-score loss (kappa_1) and generator loss (kappa_2 = kappa_4) in torch."""
  teacher, fake, gen = tiny["unets"]
  d = tiny["draws"]
  emb, uncond = tiny["emb_t"], tiny["uncond_t"]
  z, n, t = torch.as_tensor(d["z"]), torch.as_tensor(d["n"]), d["t"]
  a0, s0 = _acp(np.full(B, 625))
  a, s = _acp(t)
  gen.zero_grad()
  x_in = s0 * z
  x_g = (x_in - s0 * _torch_eps(gen, x_in, np.full(B, 625), emb)) / a0
  # Fake-score loss on the detached sample (§4.2).
  xt = a * x_g.detach() + s * n
  eps_f = _torch_guided_eps(fake, xt, t, emb, uncond, kappa)
  fake_loss = ((eps_f - n)**2).sum(dim=(1, 2, 3)).sum() / B
  # Generator loss (§4.3).
  xt = a * x_g + s * n
  y_fake = (xt - s * _torch_guided_eps(fake, xt, t, emb, uncond, kappa)) / a
  y_real = (xt - s * _torch_guided_eps(teacher, xt, t, emb, uncond, kappa)) / a
  w = (x_g - y_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-5).detach()
  per = ((y_real - y_fake) * ((y_real - x_g) - alpha * (y_real - y_fake)) / w).sum(dim=(1, 2, 3))
  gen_loss = per.sum() / B
  grads = None
  if generator_grads:
    gen_loss.backward()
    grads = {k: v.grad.detach().numpy().copy() for k, v in gen.named_parameters()}
  return fake_loss.item(), gen_loss.item(), grads, x_g.detach()


def _jax_losses(tiny, kappa):
  """One compiled function of alpha: (fake-score loss, generator loss, d gen_loss / d theta)."""
  sd, d = tiny["sd"], tiny["draws"]
  den = sd.denoiser
  teacher_p, fake_p, gen_p = tiny["flax"]
  emb, uncond = nhwc_emb(tiny["emb_t"]), nhwc_emb(tiny["uncond_t"])
  z, n = nhwc(torch.as_tensor(d["z"])), nhwc(torch.as_tensor(d["n"]))
  sigma = jnp.asarray(den.sigmas[d["t"]])
  s_init = den.sigma_at(625)

  @jax.jit
  def run(theta, alpha):
    def x_g_of(theta):
      return den(theta, s_init * z, jnp.full((B,), s_init), emb)

    fake = denoisers.guided(functools.partial(den, fake_p), kappa, uncond)
    teacher = denoisers.guided(functools.partial(den, teacher_p), kappa, uncond)
    fake_loss, _ = losses.dsm_loss(fake, jax.lax.stop_gradient(x_g_of(theta)), emb, sigma,
                                   1.0 / sigma**2, n, loss_scale=1.0, batch_size=B)

    def gen_loss_fn(theta):
      return losses.sid_generator_loss(teacher, fake, x_g_of(theta), emb, sigma, n, alpha=alpha,
                                       loss_scale=1.0, batch_size=B)[0]

    gen_loss, grads = jax.value_and_grad(gen_loss_fn)(theta)
    return fake_loss, gen_loss, grads

  return {alpha: run(gen_p, jnp.float32(alpha)) for alpha in (1.0, 1.2)}


@pytest.fixture(scope="module")
def jax_kappa2(tiny):
  return _jax_losses(tiny, 2.0)


@pytest.mark.parametrize("alpha", [1.0, 1.2])
def test_losses_match_the_official_definitions(tiny, jax_kappa2, alpha):
  """kappa_1 = kappa_2 = kappa_4 = 2 (guided fake loss, guided G loss), alpha in {1, 1.2}."""
  ref_fake, ref_gen, _, _ = _torch_losses(tiny, alpha, 2.0)
  fake, gen, _ = jax_kappa2[alpha]
  np.testing.assert_allclose(float(fake), ref_fake, rtol=1e-5)
  np.testing.assert_allclose(float(gen), ref_gen, rtol=1e-4, atol=1e-6)


def test_generator_gradient_matches_torch_autograd(tiny, jax_kappa2):
  """jax.grad through G, the kappa-guided fake score and teacher equals torch autograd (every
  parameter, via the same converter as the weights)."""
  *_, torch_grads, _ = _torch_losses(tiny, 1.2, 2.0, generator_grads=True)
  grads = jax_kappa2[1.2][2]
  ref = sd_unet_params.unet_params(torch_grads, tiny["sd"].unet)
  flat_ref = jax.tree.leaves(ref)
  flat = jax.tree.leaves(grads)
  scale = max(float(np.max(np.abs(g))) for g in flat_ref)
  worst = max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in zip(flat, flat_ref))
  assert scale > 1e-3 and worst < 1e-4 * scale, (worst, scale)


def test_adam_without_first_moment_and_sanitising_match_torch():
  """One Adam(beta1 = 0, beta2 = 0.999, eps 1e-8) step after NaN -> 0, +-inf -> +-1e5, as the
  official loop does before torch.optim.Adam."""
  g = np.asarray([0.5, np.nan, np.inf, -np.inf, -2e-3], np.float32)
  w = np.asarray([1.0, 2.0, 3.0, 4.0, 5.0], np.float32)
  tx = optim.adam(1e-6, 0.0, 0.999, 1e-8)
  state = tx.init(jnp.asarray(w))
  upd, _ = tx.update(jnp.asarray(g), state, jnp.asarray(w))
  ours = np.asarray(jnp.asarray(w) + upd)
  pw = torch.nn.Parameter(torch.as_tensor(w))
  opt = torch.optim.Adam([pw], lr=1e-6, betas=(0.0, 0.999), eps=1e-8)
  pw.grad = torch.nan_to_num(torch.as_tensor(g), nan=0.0, posinf=1e5, neginf=-1e5)
  opt.step()
  np.testing.assert_allclose(ours, pw.detach().numpy(), rtol=0, atol=1e-7)
  assert "mu" not in str(jax.tree.structure(state))  # no first-moment buffer


def test_prompt_dropout_rule():
  h = steps.SiDHyper(cfg_fake_train=1.0, cfg_fake_eval=1.0, cfg_teacher=3.0)
  assert h.effective_cond_dropout == 0.0  # kappa_4 alone does not switch dropout on
  assert steps.SiDHyper(cfg_fake_eval=2.0).effective_cond_dropout == 0.1
  assert steps.SiDHyper(cfg_fake_train=1.5).effective_cond_dropout == 0.1
