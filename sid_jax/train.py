"""The distillation job: the loop around `run.build_run`'s compiled iteration.

Sections, in order: build the run (`sid_jax.run`) -> restore or initialise -> compile -> loop
(progress, metrics, sample grids, evaluation, best checkpoint, checkpoints, pre-emption) ->
export. Methods differ only in what `sid_jax.run` / `sid_jax.methods` assemble; nothing here
depends on which method runs.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

from absl import logging
import flax
import jax
import ml_collections
import numpy as np
import optax

import sid_jax
from sid_jax import checkpoints, images, sharding
from sid_jax import run as run_lib
from sid_jax.evaluation import digits as digits_eval


class NonFiniteLossError(RuntimeError):
  """Raised when losses or gradients stay non-finite for too many consecutive iterations."""


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


def metric_table(run: run_lib.Run, final_params) -> list[dict]:
  """The digits demo's table (`evaluation.digits.metric_table`) for this run: same seeds and
  labels as the in-loop evaluation."""
  seeds, classes = run_lib.eval_inputs(run)
  heun = None
  if run.teacher.spec is not None:
    heun = (run.teacher.denoiser, run.teacher.params, run.config.eval.teacher_heun_steps)
  # SiD²A starts from a SiD generator (run.generator_init_params), SiD and SiDA from the teacher.
  start = run.init_params if run.generator_init_params is None else run.generator_init_params
  name = "SiDA" if run.config.method == "sida" else "SiD"
  return digits_eval.metric_table(run.generator, seeds, classes,
                                  [("one-step generator at initialisation", start),
                                   (f"one-step generator after {name} (EMA)", final_params)],
                                  teacher=heun, batch=run.config.eval.batch, mesh=run.mesh)


def _versions() -> dict:
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

  run = run_lib.build_run(config, devices)
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
  teacher_params = run_lib.teacher_on_mesh(run)
  latest = ckpt.latest_step()
  if latest is not None:
    restored, restored_meta = ckpt.restore(latest, run_lib.abstract_checkpoint(run),
                                           config.to_dict())
    state, rng_data = restored["state"], restored["rng"]
    if run.feed is not None:
      if "prompts" not in restored_meta:
        raise checkpoints.CheckpointMismatchError(
            f"Checkpoint {latest} in {ckpt.directory} has no prompt position; it was not written "
            "by a SiD-LSG run.")
      run.feed.restore(restored_meta["prompts"])
    logging.info("Resumed from %s at step %d.", ckpt.directory, latest)
  else:
    state = run_lib.initial_state(run)
    rng_data = jax.device_put(jax.random.key_data(jax.random.key(config.seed)),
                              sharding.replicated(run.mesh))
  base_key = jax.random.wrap_key_data(rng_data)
  start = int(jax.device_get(state.step))

  t0 = time.time()
  train_fn = run_lib.compile_train_step(run, state, teacher_params, base_key)
  compile_s = time.time() - t0
  logging.info("Compiled the SiD iteration in %.1f s.", compile_s)

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

  scorer = run_lib.build_scorer(run)
  eval_every = run_lib.eval_every_steps(config)
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
    result = run_lib.evaluate(run, state.generator_ema, teacher_params, scorer)
    if result and is_main:
      writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items()})
      _append_jsonl(metrics_path, {"step": step, "kind": "eval", "protocol": scorer.protocol,
                                   **result})
    if result:
      keep_if_best(step, result)
    grid = run_lib.sample_grid(run, state.generator_ema, teacher_params)
    if is_main:
      path = os.path.join(workdir, "samples", f"{tag}_{step:08d}.png")
      images.save_png(path, grid, scale=max(1, 128 // run.generator.image_shape[0]))
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
        grid = run_lib.sample_grid(run, state.generator_ema, teacher_params)
        if is_main:
          images.save_png(os.path.join(workdir, "samples", f"grid_{step:08d}.png"), grid,
                          scale=max(1, 128 // run.generator.image_shape[0]))
      if step % config.checkpoint.every_steps == 0:
        _check_streak(int(jax.device_get(pending)), config, ckpt)
        if int(jax.device_get(pending)) == 0:
          save(step, force=False)
    if pending is not None:
      _check_streak(int(jax.device_get(pending)), config, ckpt)
    if (pending is None or int(jax.device_get(pending)) == 0) and ckpt.latest_step() != step:
      save(step, force=True)
    ckpt.wait()
  run.export(state.generator_ema, os.path.join(workdir, "generator"), step)
  if status == "done":
    summary["final_eval"] = eval_and_log(step, "grid")
    if run_lib.eval_kind(config) == "digits":
      rows = metric_table(run, state.generator_ema)
      summary["metric_table"] = rows
      if is_main:
        with open(os.path.join(workdir, "metric_table.json"), "w") as f:
          json.dump(rows, f, indent=2)
        with open(os.path.join(workdir, "metric_table.md"), "w") as f:
          f.write(digits_eval.table_markdown(rows) + "\n")
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
