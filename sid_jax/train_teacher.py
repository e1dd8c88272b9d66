"""Teacher training (config.job = 'train_teacher'): an EDM diffusion model on a small dataset.

EDM's recipe: ln sigma ~ N(p_mean, p_std^2), loss lambda(sigma) |D(y + sigma n) - y|^2 summed over
pixels, averaged over the batch, Adam with a linear warm-up, an EMA with ramp-up. The whole
dataset is small enough to live on the devices; batches are drawn inside the jitted step from
fold_in(key, step), so runs are reproducible and resumable exactly. At the end the EMA weights are
exported as a network checkpoint usable as `config.teacher.checkpoint`.
"""

from __future__ import annotations

import functools
import json
import os

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sid_jax import checkpoints, losses, models, optim, sharding, steps
from sid_jax.data import digits as digits_data

DATASETS = ("digits",)


@flax.struct.dataclass
class TeacherState:
  step: jax.Array
  params: object
  ema: object
  opt: object


def load_dataset(name: str):
  if name == "digits":
    return digits_data.load_digits()
  raise ValueError(f"Unknown config.teacher_training.dataset {name!r}; expected one of {DATASETS}.")


def network_spec(config) -> dict:
  d = config.data
  kwargs = dict(models._plain(config.model.kwargs))  # pylint: disable=protected-access
  kwargs.update(img_resolution=d.resolution, img_channels=d.channels, label_dim=d.label_dim)
  return {"class_name": config.model.class_name, "kwargs": kwargs}


def teacher_step(denoiser, tx, config, data_x, data_y, state: TeacherState, key):
  tt = config.teacher_training
  key = jax.random.fold_in(key, state.step)
  k_idx, k_rn, k_n, k_drop = jax.random.split(key, 4)
  b = tt.batch
  idx = jax.random.randint(k_idx, (b,), 0, data_x.shape[0])
  y = data_x[idx]
  labels = (jax.nn.one_hot(data_y[idx], config.data.label_dim)
            if config.data.label_dim else None)
  # EDM's training loss: the DSM loss the fake score network is trained with in SiD.
  dsm = losses.DSMLoss(levels=losses.LognormalLevels(p_mean=tt.p_mean, p_std=tt.p_std),
                       weight=losses.EDMWeight(config.sid.sigma_data))
  draws = dict(dsm.draw(k_rn, (b,)), noise=jax.random.normal(k_n, y.shape))

  def loss_fn(params):
    fn = functools.partial(denoiser, params, train=True, rng=k_drop)
    return dsm(fn, y, labels, draws, batch_size=b)

  (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt = tx.update(grads, state.opt, state.params)
  params = optax.apply_updates(state.params, updates)
  beta = steps.ema_decay(state.step, b, tt.ema_halflife_kimg, tt.ema_rampup)
  ema = jax.tree.map(lambda e, p: beta * e + (1 - beta) * p, state.ema, params)
  return TeacherState(step=state.step + 1, params=params, ema=ema, opt=opt), {
      "loss": loss, "grad_norm": optax.tree.norm(grads)}


def train_teacher(config: ml_collections.ConfigDict, workdir: str, *, devices=None) -> dict:
  from clu import metric_writers, periodic_actions  # pylint: disable=g-import-not-at-top
  tt = config.teacher_training
  devices = list(jax.devices() if devices is None else devices)
  for name in ("batch", "num_steps", "lr"):
    if not tt[name] > 0:
      raise ValueError(f"config.teacher_training.{name} must be positive, got {tt[name]}.")
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  x, y = load_dataset(tt.dataset)
  if x.shape[1:] != (config.data.resolution, config.data.resolution, config.data.channels):
    raise ValueError(f"Dataset {tt.dataset!r} has images {x.shape[1:]}, config.data says "
                     f"{(config.data.resolution, config.data.resolution, config.data.channels)}.")
  spec = network_spec(config)
  denoiser = models.build_denoiser(spec)
  image_shape = x.shape[1:]
  params = models.init_params(denoiser, jax.random.key(config.seed), image_shape,
                              config.data.label_dim)
  schedule = optax.linear_schedule(0.0, tt.lr, max(1, tt.warmup_steps))
  tx = optim.adam(schedule, tt.b1, tt.b2, tt.eps)
  state = TeacherState(step=jnp.zeros([], jnp.int32), params=params,
                       ema=jax.tree.map(jnp.copy, params), opt=tx.init(params))
  state_sh = sharding.param_shardings(mesh, state, sharding.fsdp_min_size(config.mesh))
  repl = sharding.replicated(mesh)
  state = jax.device_put(state, state_sh)
  data_x, data_y = jax.device_put((jnp.asarray(x), jnp.asarray(y)), repl)

  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"),
                                  every_steps=config.checkpoint.every_steps,
                                  keep=config.checkpoint.keep,
                                  async_save=config.checkpoint.async_save)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state,
                          state_sh)
  if ckpt.latest_step() is not None:
    state, _ = ckpt.restore(ckpt.latest_step(), abstract, config.to_dict())
  meta = lambda step: {"config": config.to_dict(), "spec": spec, "step": step}

  fn = jax.jit(functools.partial(teacher_step, denoiser, tx, config),
               in_shardings=(repl, repl, state_sh, repl), out_shardings=(state_sh, repl),
               donate_argnums=2)
  key = jax.random.key(config.seed)
  writer = metric_writers.create_default_writer(workdir, asynchronous=True)
  progress = periodic_actions.ReportProgress(num_train_steps=tt.num_steps, writer=writer,
                                             every_secs=config.log.progress_every_secs)
  step = int(jax.device_get(state.step))
  with jax.set_mesh(mesh):
    while step < tt.num_steps:
      state, metrics = fn(data_x, data_y, state, key)
      step += 1
      progress(step)
      if step % config.log.every_steps == 0 or step == tt.num_steps:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not all(np.isfinite(list(values.values()))):
          raise RuntimeError(f"Teacher training diverged at step {step}: {values}.")
        writer.write_scalars(step, values)
        logging.info("teacher step %d/%d %s", step, tt.num_steps, values)
      if step % config.checkpoint.every_steps == 0:
        ckpt.save(step, state, meta(step))
    if ckpt.latest_step() != step:
      ckpt.save(step, state, meta(step), force=True)
  ckpt.close()
  export = tt.export_dir or os.path.join(workdir, "teacher")
  spec = dict(spec, trained_with={"dataset": tt.dataset, "steps": step, "batch": tt.batch,
                                  "lr": tt.lr, "ema_halflife_kimg": tt.ema_halflife_kimg})
  checkpoints.save_network(export, jax.device_get(state.ema), spec)
  writer.flush()
  summary = {"status": "done", "step": step, "export_dir": os.path.abspath(export),
             "workdir": os.path.abspath(workdir)}
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary
