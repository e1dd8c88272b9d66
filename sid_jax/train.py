"""The distillation job: SiD on a device mesh, with checkpoints, logs, samples and evaluation.

Sections, in order: config checks -> mesh -> teacher and students -> shardings and state ->
restore -> compiled steps -> loop (progress, metrics, sample grids, evaluation, checkpoints,
pre-emption). Variants of the method plug in through `steps.SiDSetup`, not through branches here.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import threading
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sid_jax import augment, checkpoints, images, lsg, models, optim, sharding, steps
from sid_jax.evaluation import in_loop


METHODS = ("sid", "sid_lsg")


class NonFiniteLossError(RuntimeError):
  """Raised when losses or gradients stay non-finite for too many consecutive iterations."""


# ---------------------------------------------------------------------------------------------
# Config checks: everything that can be wrong is reported before anything is compiled.
# ---------------------------------------------------------------------------------------------


def check_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  t, o, d = config.training, config.optim, config.data
  shards = int(np.prod(sharding.mesh_shape(dict(config.mesh), num_devices)))
  if config.method not in METHODS:
    raise ValueError(f"config.method={config.method!r} is not supported; expected one of "
                     f"{', '.join(METHODS)}.")
  if config.method == "sid_lsg":
    lsg.check_config(config)
  for name in ("global_batch", "micro_batch", "num_steps", "max_nonfinite_steps"):
    if int(t[name]) <= 0:
      raise ValueError(f"config.training.{name} must be positive, got {t[name]}.")
  if t.global_batch % t.micro_batch:
    raise ValueError(f"config.training.global_batch={t.global_batch} is not a multiple of "
                     f"config.training.micro_batch={t.micro_batch}.")
  if t.micro_batch % shards:
    raise ValueError(
        f"config.training.micro_batch={t.micro_batch} (global_batch={t.global_batch}) is not "
        f"divisible by the {shards} batch shards of config.mesh={dict(config.mesh)}.")
  for name in ("fake_lr", "gen_lr", "eps"):
    if not o[name] > 0:
      raise ValueError(f"config.optim.{name} must be positive, got {o[name]}.")
  for name in ("fake_b1", "gen_b1", "b2"):
    if not 0 <= o[name] < 1:
      raise ValueError(f"config.optim.{name} must lie in [0, 1), got {o[name]}.")
  if d.resolution <= 0 or d.channels <= 0 or d.label_dim < 0:
    raise ValueError(f"config.data must have positive resolution/channels and label_dim >= 0, "
                     f"got {d.to_dict()}.")
  if config.sid.sigma_init <= 0 or not 0 < config.sid.tmax <= 1000:
    raise ValueError(f"config.sid.sigma_init must be > 0 and tmax in (0, 1000], got "
                     f"{config.sid.sigma_init}, {config.sid.tmax}.")
  if config.ema.halflife_kimg <= 0:
    raise ValueError(f"config.ema.halflife_kimg must be positive, got {config.ema.halflife_kimg}.")
  for section, name in (("checkpoint", "every_steps"), ("checkpoint", "keep"),
                        ("log", "every_steps"), ("log", "sample_every_steps"),
                        ("eval", "every_steps"), ("eval", "batch")):
    if int(config[section][name]) <= 0:
      raise ValueError(f"config.{section}.{name} must be positive, got {config[section][name]}.")
  if config.eval.batch % shards:
    raise ValueError(f"config.eval.batch={config.eval.batch} is not divisible by the {shards} "
                     "batch shards of the mesh.")
  if config.eval.num_samples < 2:
    raise ValueError(f"config.eval.num_samples must be at least 2, got {config.eval.num_samples}.")
  in_loop.check_config(config)


# ---------------------------------------------------------------------------------------------
# Building the run.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
  """Everything built from a config, before any step is compiled."""
  config: ml_collections.ConfigDict
  mesh: Any
  teacher: models.Teacher
  setup: steps.SiDSetup
  student_spec: dict
  init_params: Any
  state_shardings: Any
  teacher_shardings: Any
  # SiD-LSG only: the Stable Diffusion pieces and the prompt feed (None for SiD).
  lsg: lsg.Parts | None = None
  feed: lsg.PromptFeed | None = None
  grid_sampler: Any = None  # SiD-LSG: the compiled text-to-image sampler, made at first use


def hyper_from_config(config) -> steps.SiDHyper:
  s, e = config.sid, config.ema
  return steps.SiDHyper(
      alpha=s.alpha, sigma_init=s.sigma_init, tmax=s.tmax, sigma_min=s.sigma_min,
      sigma_max=s.sigma_max, rho=s.rho, p_mean=s.p_mean, p_std=s.p_std, sigma_data=s.sigma_data,
      gen_loss_scale=s.gen_loss_scale, fake_loss_scale=s.fake_loss_scale,
      use_logvar=s.use_logvar, ema_halflife_kimg=e.halflife_kimg, ema_rampup=e.rampup,
      force_normalization=bool(s.get("force_normalization", False)))


def _build_lsg_run(config, mesh) -> Run:
  parts = lsg.build(config)
  image_shape = parts.sd.latent_shape
  d = config.data
  if (d.resolution, d.resolution, d.channels) != image_shape:
    raise ValueError(f"config.data (resolution={d.resolution}, channels={d.channels}) does not "
                     f"match the teacher's latents {image_shape}.")
  o = config.optim
  hyper = dataclasses.replace(hyper_from_config(config), sigma_init=parts.sigma_init,
                              **lsg.hyper_overrides(config))
  setup = steps.SiDSetup(
      teacher=parts.teacher_fn, generator=parts.student, fake_score=parts.student,
      image_shape=image_shape, label_dim=0,
      global_batch=config.training.global_batch, micro_batch=config.training.micro_batch,
      hyper=hyper,
      generator_tx=optim.adam(o.gen_lr, o.gen_b1, o.b2, o.eps, clip_value=o.gen_clip_value),
      fake_tx=optim.adam(o.fake_lr, o.fake_b1, o.b2, o.eps, clip_value=o.fake_clip_value),
      draw_sharding=sharding.batch_sharding(mesh, 1),
      unroll_micro=jax.default_backend() == "cpu",
      levels=parts.levels, conditioning=parts.conditioning)
  teacher = models.Teacher(denoiser=parts.teacher_fn, params=parts.frozen, info=parts.info,
                           spec=parts.spec)
  abstract_state = jax.eval_shape(lambda p: steps.init_state(setup, p, p), parts.init_params)
  feed = lsg.PromptFeed(config, parts.sd, mesh, setup.num_micro, setup.micro_batch)
  return Run(config=config, mesh=mesh, teacher=teacher, setup=setup, student_spec=parts.spec,
             init_params=parts.init_params,
             state_shardings=sharding.param_shardings(mesh, abstract_state),
             teacher_shardings=sharding.param_shardings(mesh, parts.frozen), lsg=parts,
             feed=feed)


def build_run(config: ml_collections.ConfigDict, devices=None) -> Run:
  devices = list(jax.devices() if devices is None else devices)
  check_config(config, len(devices))
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  if config.method == "sid_lsg":
    return _build_lsg_run(config, mesh)
  teacher = models.build_teacher(config)
  student, params, spec = models.build_students(config, teacher,
                                                jax.random.key(config.seed + 1))
  o, d = config.optim, config.data
  augment_pipe = None
  if config.sid.augment_p > 0:
    aug_dim = getattr(student.module, "augment_dim", 0)
    if aug_dim != 9:
      raise ValueError(f"config.sid.augment_p={config.sid.augment_p} needs networks with "
                       f"augment_dim=9, but this one has augment_dim={aug_dim}.")
    augment_pipe = augment.sid_augment_pipe(config.sid.augment_p)
  setup = steps.SiDSetup(
      teacher=teacher.denoiser, generator=student, fake_score=student,
      image_shape=(d.resolution, d.resolution, d.channels), label_dim=d.label_dim,
      global_batch=config.training.global_batch, micro_batch=config.training.micro_batch,
      hyper=hyper_from_config(config),
      generator_tx=optim.adam(o.gen_lr, o.gen_b1, o.b2, o.eps),
      fake_tx=optim.adam(o.fake_lr, o.fake_b1, o.b2, o.eps, clip_value=o.fake_clip_value),
      draw_sharding=sharding.batch_sharding(mesh, 1),
      augment=augment_pipe,
      unroll_micro=jax.default_backend() == "cpu")
  abstract_state = jax.eval_shape(lambda p: steps.init_state(setup, p, p), params)
  return Run(config=config, mesh=mesh, teacher=teacher, setup=setup, student_spec=spec,
             init_params=params,
             state_shardings=sharding.param_shardings(mesh, abstract_state),
             teacher_shardings=sharding.param_shardings(mesh, teacher.params))


def initial_state(run: Run) -> steps.SiDState:
  fn = jax.jit(lambda p: steps.init_state(run.setup, p, p), out_shardings=run.state_shardings)
  with jax.set_mesh(run.mesh):
    return fn(run.init_params)


def compile_train_step(run: Run, state, teacher_params, key):
  """The compiled iteration `(state, teacher_params, key, batch) -> (state, metrics)`; `batch`
  is None for SiD and the prompt feed's token ids for SiD-LSG."""
  repl = sharding.replicated(run.mesh)
  batch = run.feed.abstract() if run.feed is not None else None
  batch_sh = jax.tree.map(lambda a: a.sharding, batch)
  fn = jax.jit(functools.partial(steps.train_step, run.setup),
               in_shardings=(run.state_shardings, run.teacher_shardings, repl, batch_sh),
               out_shardings=(run.state_shardings, repl), donate_argnums=0)
  with jax.set_mesh(run.mesh):
    return fn.lower(state, teacher_params, key, batch).compile()


def make_sampler(run: Run):
  """jitted (params, z, labels) -> one-step samples, batch sharded over the mesh."""
  batch = sharding.batch_sharding(run.mesh)
  label_sh = batch if run.setup.label_dim else None
  fn = jax.jit(functools.partial(steps.sample_generator, run.setup),
               in_shardings=(run.state_shardings.generator_ema, batch, label_sh),
               out_shardings=batch)

  def sample(params, z, labels):
    with jax.set_mesh(run.mesh):
      return fn(params, z, labels)

  return sample


def fixed_inputs(run: Run, seed: int, n: int, label_idx: np.ndarray | None = None):
  """Deterministic z [n, H, W, C] and one-hot labels for evaluation and grids (host numpy)."""
  rs = np.random.RandomState(seed)
  z = rs.standard_normal((n,) + tuple(run.setup.image_shape)).astype(np.float32)
  if not run.setup.label_dim:
    return z, None, None
  if label_idx is None:
    label_idx = rs.randint(0, run.setup.label_dim, size=n)
  return z, np.eye(run.setup.label_dim, dtype=np.float32)[label_idx], label_idx


def generate(sample_fn, params, z: np.ndarray, labels: np.ndarray | None, batch: int) -> np.ndarray:
  """Samples in fixed-size batches (the last one padded), returned as host float32."""
  n = z.shape[0]
  out = []
  for start in range(0, n, batch):
    zb = z[start:start + batch]
    lb = None if labels is None else labels[start:start + batch]
    pad = batch - zb.shape[0]
    if pad:
      zb = np.concatenate([zb, np.zeros((pad,) + zb.shape[1:], zb.dtype)])
      lb = None if lb is None else np.concatenate([lb, np.zeros((pad,) + lb.shape[1:], lb.dtype)])
    out.append(np.asarray(jax.device_get(sample_fn(params, zb, lb)))[:batch - pad])
  return np.concatenate(out)


# ---------------------------------------------------------------------------------------------
# Evaluation and sample grids.
# ---------------------------------------------------------------------------------------------


def eval_kind(config) -> str:
  """The in-loop evaluation kind ('auto' resolved): gmm | digits | fid | none."""
  return in_loop.resolve_kind(config)


def eval_every_steps(config) -> int:
  """Steps between evaluations: `config.eval.every_kimg` (if > 0) or `config.eval.every_steps`."""
  kimg = config.eval.get("every_kimg", 0.0)
  if kimg and kimg > 0:
    return max(1, round(kimg * 1000 / config.training.global_batch))
  return int(config.eval.every_steps)


def eval_inputs(run: Run):
  """Fixed (z, one-hot labels, label ids) for evaluation: the same at every evaluation."""
  ev = run.config.eval
  if eval_kind(run.config) == "digits":
    # As many samples as the held-out real half, with the same labels, so that the rows of the
    # metric table are comparable.
    from sid_jax.data import digits as digits_data  # pylint: disable=g-import-not-at-top
    _, (_, yb) = digits_data.split_halves()
    return fixed_inputs(run, ev.seed, len(yb), yb)
  return fixed_inputs(run, ev.seed, ev.num_samples)


def build_scorer(run: Run) -> in_loop.Scorer:
  return in_loop.build_scorer(run.config, mesh=run.mesh, teacher=run.teacher)


def evaluate(run: Run, sample_fn, params, scorer: in_loop.Scorer | None = None
             ) -> dict[str, float]:
  """Metrics of the given generator params with fixed randomness (comparable across steps)."""
  scorer = scorer or build_scorer(run)
  if scorer.kind == "none":
    return {}
  z, labels, idx = eval_inputs(run)
  x = generate(sample_fn, params, z, labels, run.config.eval.batch)
  out = scorer.score(x, idx)
  out.pop("protocol", None)
  return {k: float(v) for k, v in out.items()}


def metric_table(run: Run, sample_fn, final_params) -> list[dict]:
  """The digits demo's table: real data, the teacher with EDM's Heun sampler, the one-step
  generator at initialisation and after distillation — same labels, same noise, same metric."""
  from sid_jax import samplers  # pylint: disable=g-import-not-at-top
  from sid_jax.evaluation import digits as digits_eval  # pylint: disable=g-import-not-at-top
  ev = digits_eval.DigitsEvaluator()
  z, labels, idx = eval_inputs(run)
  rows = [dict(model="real digits (held-out half)", nfe=0, **ev.real_metrics())]
  if run.teacher.spec is not None:
    steps_n = run.config.eval.teacher_heun_steps
    heun = jax.jit(functools.partial(samplers.edm_sampler, run.teacher.denoiser,
                                     num_steps=steps_n))
    with jax.set_mesh(run.mesh):
      x = np.concatenate([
          np.asarray(jax.device_get(heun(run.teacher.params, z[i:i + run.config.eval.batch],
                                         labels[i:i + run.config.eval.batch])))
          for i in range(0, len(z), run.config.eval.batch)])
    rows.append(dict(model=f"teacher, EDM Heun sampler ({steps_n} steps)",
                     nfe=samplers.heun_nfe(steps_n), **ev.metrics(x, idx)))
  for name, params in (("one-step generator at initialisation", run.init_params),
                       ("one-step generator after SiD (EMA)", final_params)):
    x = generate(sample_fn, params, z, labels, run.config.eval.batch)
    rows.append(dict(model=name, nfe=1, **ev.metrics(x, idx)))
  return rows


def table_markdown(rows: list[dict]) -> str:
  lines = ["| model | NFE | Fréchet distance (classifier features) ↓ | classifier accuracy ↑ |",
           "|---|---|---|---|"]
  for r in rows:
    acc = r.get("classifier_accuracy")
    lines.append(f"| {r['model']} | {r['nfe'] or '—'} | {r['frechet_distance']:.3f} | "
                 f"{'—' if acc is None else f'{100 * acc:.1f} %'} |")
  return "\n".join(lines)


def export_generator(run: Run, params, directory: str, step: int) -> None:
  """Writes the (EMA) generator as a network checkpoint `python -m sid_jax.sample` reads: for
  SiD-LSG a complete Stable Diffusion folder whose UNet is the generator's."""
  if run.lsg is not None:
    from sid_jax.models import stable_diffusion  # pylint: disable=g-import-not-at-top
    teacher = run.config.teacher
    tokenizer_dir = (os.path.join(teacher.checkpoint, stable_diffusion.TOKENIZER_DIR)
                     if teacher.type == "network" else
                     stable_diffusion.tiny_tokenizer_dir(run.lsg.sd.spec))
    spec = dict(run.student_spec, step=step)
    stable_diffusion.save(directory, spec, {"unet": params, "vae": run.lsg.vae_params,
                                            "text_encoder": run.teacher.params["text_encoder"]},
                          tokenizer_dir)
    return
  spec = dict(run.student_spec, sigma_init=run.config.sid.sigma_init, step=step)
  checkpoints.save_network(directory, params, spec)


def lsg_grid(run: Run, params) -> np.ndarray:
  """The fixed prompts of config.lsg.grid_prompts (cycled to fill the grid), fixed z."""
  cols = run.config.log.grid_columns
  prompts = list(run.config.lsg.grid_prompts)
  rows = max(1, math.ceil(len(prompts) / cols))
  n = rows * cols
  prompts = [prompts[i % len(prompts)] for i in range(n)]
  z = np.random.RandomState(run.config.eval.seed + 1).standard_normal(
      (n,) + tuple(run.setup.image_shape)).astype(np.float32)
  if run.grid_sampler is None:
    run.grid_sampler = lsg.make_image_sampler(run.lsg.sd, run.config.lsg.init_timestep)
  sampler = run.grid_sampler
  ids = run.lsg.sd.tokenize(prompts)
  b = run.config.eval.batch
  out = []
  for i in range(0, n, b):
    out.append(np.asarray(jax.device_get(sampler(
        params, run.teacher.params["text_encoder"], run.lsg.vae_params, z[i:i + b], ids[i:i + b],
        jax.random.key(0)))))
  return images.make_grid(images.to_uint8(np.concatenate(out)), rows, cols)


def sample_grid(run: Run, sample_fn, params) -> np.ndarray:
  if run.lsg is not None:
    return lsg_grid(run, params)
  cols = run.config.log.grid_columns
  # One row per class (the first 10 classes when there are more), 4 rows when unconditional.
  rows = min(run.setup.label_dim, 10) or 4
  idx = np.repeat(np.arange(rows), cols) if run.setup.label_dim else None
  z, labels, _ = fixed_inputs(run, run.config.eval.seed + 1, rows * cols, idx)
  x = generate(sample_fn, params, z, labels, run.config.eval.batch)
  return images.make_grid(images.to_uint8(x), rows, cols)


# ---------------------------------------------------------------------------------------------
# Pre-emption: SIGTERM / SIGINT ask the loop to save and stop at the next step boundary.
# ---------------------------------------------------------------------------------------------


class StopRequest:

  def __init__(self):
    self.signal: int | None = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C stops at once
    logging.warning("Received signal %d: saving a checkpoint and stopping.", signum)
    self.signal = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------


def _versions() -> dict:
  import flax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import sid_jax  # pylint: disable=g-import-not-at-top
  return {"sid_jax": sid_jax.__version__, "jax": jax.__version__, "flax": flax.__version__,
          "optax": optax.__version__}


def _append_jsonl(path: str, record: dict) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(record, sort_keys=True) + "\n")


def distill(config: ml_collections.ConfigDict, workdir: str, *, devices=None,
            stop: StopRequest | None = None) -> dict:
  """Runs (or resumes) SiD distillation in `workdir`; returns a summary dict.

  The summary has 'status' ('done' or 'preempted'), 'step', the initial and final evaluation
  metrics (GMM teacher), and paths of what was written.
  """
  from clu import metric_writers, periodic_actions  # pylint: disable=g-import-not-at-top

  run = build_run(config, devices)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  logging.info("Mesh %s over %d devices; teacher %s.", dict(run.mesh.shape), run.mesh.size,
               run.teacher.info)

  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"),
                                  every_steps=config.checkpoint.every_steps,
                                  keep=config.checkpoint.keep,
                                  async_save=config.checkpoint.async_save)
  teacher_params = jax.device_put(run.teacher.params, run.teacher_shardings)
  abstract = {"state": jax.eval_shape(lambda p: steps.init_state(run.setup, p, p),
                                      run.init_params),
              "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
  abstract["state"] = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract["state"],
      run.state_shardings)
  abstract["rng"] = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding.replicated(run.mesh))
  latest = ckpt.latest_step()
  if latest is not None:
    restored, restored_meta = ckpt.restore(latest, abstract, config.to_dict())
    state, rng_data = restored["state"], restored["rng"]
    if run.feed is not None:
      if "prompts" not in restored_meta:
        raise checkpoints.CheckpointMismatchError(
            f"Checkpoint {latest} in {ckpt.directory} has no prompt position; it was not written "
            "by a SiD-LSG run.")
      run.feed.restore(restored_meta["prompts"])
    logging.info("Resumed from %s at step %d.", ckpt.directory, latest)
  else:
    state = initial_state(run)
    rng_data = jax.device_put(jax.random.key_data(jax.random.key(config.seed)),
                              sharding.replicated(run.mesh))
  base_key = jax.random.wrap_key_data(rng_data)
  start = int(jax.device_get(state.step))

  t0 = time.time()
  train_fn = compile_train_step(run, state, teacher_params, base_key)
  compile_s = time.time() - t0
  logging.info("Compiled the SiD iteration in %.1f s.", compile_s)
  sample_fn = make_sampler(run)

  def meta(step):
    out = {"config": config.to_dict(), "teacher": run.teacher.info, "step": step,
           "student_spec": run.student_spec, "versions": _versions()}
    if run.feed is not None:
      out["prompts"] = run.feed.state()  # the position after the last saved step's prompts
    return out

  def save(step, force):
    return ckpt.save(step, {"state": state, "rng": rng_data}, meta(step), force=force)

  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main,
                                                asynchronous=True)
  num_steps = config.training.num_steps
  progress = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                             every_secs=config.log.progress_every_secs,
                                             every_steps=config.log.every_steps)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  summary = {"workdir": os.path.abspath(workdir), "compile_seconds": compile_s,
             "start_step": start}

  scorer = build_scorer(run)
  eval_every = eval_every_steps(config)
  summary["eval_protocol"] = scorer.protocol
  best_ckpt, best_value = None, float("inf")
  if scorer.best_metric is not None:
    best_ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints_best"),
                                         every_steps=1, keep=1,
                                         async_save=config.checkpoint.async_save,
                                         best_metric=scorer.best_metric)
    if best_ckpt.best_step() is not None:
      best_value = float(best_ckpt.read_meta(best_ckpt.best_step())["eval"][scorer.best_metric])

  def keep_if_best(step, result):
    """Saves the state into WORKDIR/checkpoints_best when its metric is the lowest so far."""
    nonlocal best_value
    if best_ckpt is None or step == 0:
      return
    if scorer.best_metric not in result:
      raise KeyError(f"config.eval.best_metric={scorer.best_metric!r} is not among the "
                     f"evaluation's metrics {sorted(result)}.")
    value = result[scorer.best_metric]
    if np.isfinite(value) and value < best_value:
      best_value = value
      best_ckpt.save(step, {"state": state, "rng": rng_data},
                     dict(meta(step), eval=result, eval_protocol=scorer.protocol), force=True,
                     metrics={scorer.best_metric: value})
      logging.info("New best %s=%.6g at step %d (kept in %s).", scorer.best_metric, value, step,
                   best_ckpt.directory)

  def eval_and_log(step, tag):
    result = evaluate(run, sample_fn, state.generator_ema, scorer)
    if result and is_main:
      writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items()})
      _append_jsonl(metrics_path, {"step": step, "kind": "eval", "protocol": scorer.protocol,
                                   **result})
    if result:
      keep_if_best(step, result)
    grid = sample_grid(run, sample_fn, state.generator_ema)
    if is_main:
      path = os.path.join(workdir, "samples", f"{tag}_{step:08d}.png")
      images.save_png(path, grid, scale=max(1, 128 // run.setup.image_shape[0]))
      writer.write_images(step, {"samples": grid[None]})
    return result

  if start == 0:
    summary["initial_eval"] = eval_and_log(0, "grid")
  stop = stop or StopRequest()
  status = "done"
  pending = None  # streak of the previous step, read one step late to keep dispatch async
  step = start
  with stop:
    while step < num_steps:
      if stop.signal is not None:
        status = "preempted"
        break
      batch = run.feed.next() if run.feed is not None else None
      state, metrics = train_fn(state, teacher_params, base_key, batch)
      step += 1
      if pending is not None:
        _check_streak(int(jax.device_get(pending)), config, ckpt)
      pending = metrics["nonfinite_streak"]
      progress(step)
      if step % config.log.every_steps == 0 or step == num_steps:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if is_main:
          writer.write_scalars(step, values)
          _append_jsonl(metrics_path, {"step": step, "kind": "train", **values})
        logging.info("step %d/%d %s", step, num_steps,
                     " ".join(f"{k}={v:.4g}" for k, v in sorted(values.items())))
      if step % eval_every == 0 and step != num_steps:
        eval_and_log(step, "grid")
      elif step % config.log.sample_every_steps == 0 and step != num_steps:
        grid = sample_grid(run, sample_fn, state.generator_ema)
        if is_main:
          images.save_png(os.path.join(workdir, "samples", f"grid_{step:08d}.png"), grid,
                          scale=max(1, 128 // run.setup.image_shape[0]))
      if step % config.checkpoint.every_steps == 0:
        _check_streak(int(jax.device_get(pending)), config, ckpt)
        if int(jax.device_get(pending)) == 0:
          save(step, force=False)
    if pending is not None:
      _check_streak(int(jax.device_get(pending)), config, ckpt)
    if (pending is None or int(jax.device_get(pending)) == 0) and ckpt.latest_step() != step:
      save(step, force=True)
    ckpt.wait()
  export_generator(run, state.generator_ema, os.path.join(workdir, "generator"), step)
  if status == "done":
    summary["final_eval"] = eval_and_log(step, "grid")
    if eval_kind(config) == "digits":
      rows = metric_table(run, sample_fn, state.generator_ema)
      summary["metric_table"] = rows
      if is_main:
        with open(os.path.join(workdir, "metric_table.json"), "w") as f:
          json.dump(rows, f, indent=2)
        with open(os.path.join(workdir, "metric_table.md"), "w") as f:
          f.write(table_markdown(rows) + "\n")
  writer.flush()
  ckpt.close()
  summary.update(status=status, step=step, checkpoint_steps=ckpt.all_steps())
  if best_ckpt is not None:
    best_ckpt.wait()
    summary["best"] = {"metric": scorer.best_metric, "value": best_value,
                       "step": best_ckpt.best_step(), "directory": best_ckpt.directory}
    best_ckpt.close()
  if is_main:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2, sort_keys=True)
  logging.info("Finished (%s) at step %d: %s", status, step, summary.get("final_eval"))
  return summary


def _check_streak(streak: int, config, ckpt: checkpoints.Checkpointer) -> None:
  limit = config.training.max_nonfinite_steps
  if streak >= limit:
    ckpt.wait()
    last = ckpt.latest_step()
    raise NonFiniteLossError(
        f"Losses or gradients were non-finite for {streak} consecutive iterations "
        f"(config.training.max_nonfinite_steps={limit}). Stopped without saving; the last good "
        f"checkpoint is step {last} in {ckpt.directory}.")
