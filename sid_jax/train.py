"""The distillation job: the loop around `run.build_run`'s compiled iteration.

Sections, in order: build the run (`sid_jax.run`) -> restore or initialise -> compile -> loop
(progress, metrics, sample grids, evaluation, best checkpoint, checkpoints, pre-emption) ->
export. Methods differ only in what `sid_jax.run` / `sid_jax.methods` assemble; nothing here
depends on which method runs.

Non-finite iterations. Like the official loop, an iteration whose loss or gradient is non-finite
still updates (its gradients pass through nan_to_num: NaN -> 0, ±inf -> ±1e5, `sid_jax.optim`);
each such iteration is logged (absl warning and a 'nonfinite' record in metrics.jsonl). Two
deviations from the official loop, which has neither: (1) after
`config.training.max_nonfinite_steps` consecutive non-finite iterations the run stops with
`NonFiniteLossError` (0 = never stop, as the official loop); (2) nothing non-finite is kept: a
checkpoint is saved only when its iteration was finite and every parameter and optimiser value
is finite, and it stays provisional until the next iteration (the first one computed from it)
is finite too -- otherwise it is deleted, since an update can leave finite but exploded weights
whose losses overflow only from the next iteration on. Each skipped or deleted checkpoint is
logged (and recorded as 'checkpoint_skipped'). A run that reaches its last step with a
non-finite iteration, non-finite state or non-finite samples of its EMA generator fails with
`NonFiniteLossError` and exports nothing.

Pre-emption. SIGTERM or SIGINT ends the loop at the next step boundary; the state is saved and
the summary's status is 'preempted' (`python -m sid_jax.main` then exits with 128 + the signal
number, so a scheduler requeues the job). A resumed run first drops the records of
metrics.jsonl beyond its starting step: steps that a killed run logged after its last checkpoint
are computed again, and each step appears once.
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
import jax.numpy as jnp
import numpy as np
import optax

import sid_jax
from sid_jax import checkpoints, host_memory, images, sharding
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
  name = "SiD"
  if run.config.method == "sida":
    name = "SiDA" if run.generator_init_params is None else "SiD²A"
  first = ("one-step generator at initialisation" if run.generator_init_params is None
           else "one-step generator at initialisation (the SiD generator)")
  return digits_eval.metric_table(run.generator, seeds, classes,
                                  [(first, start),
                                   (f"one-step generator after {name} (EMA)", final_params)],
                                  teacher=heun, batch=run.config.eval.batch, mesh=run.mesh)


def _versions() -> dict:
  return {"sid_jax": sid_jax.__version__, "jax": jax.__version__, "flax": flax.__version__,
          "optax": optax.__version__}


def _append_jsonl(path: str, record: dict) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(record, sort_keys=True) + "\n")


def truncate_metrics(path: str, start: int) -> int:
  """Drops the records of `path` (metrics.jsonl) that a run starting at `start` writes again.

  A run resumed at step `start` > 0 keeps the records up to and including `start` (the
  checkpointed steps, and the evaluation of step `start`, which is not repeated); a run starting
  afresh (`start` = 0) keeps none. A torn last line (the process killed while writing) goes too.
  Returns the number of lines dropped.
  """
  if not os.path.isfile(path):
    return 0
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if start > 0 and isinstance(record, dict) and int(record.get("step", start + 1)) <= start:
      kept.append(line if line.endswith("\n") else line + "\n")
  if len(kept) != len(lines):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)
  return len(lines) - len(kept)


@jax.jit
def _all_finite(tree) -> jax.Array:
  """True when every floating-point value in `tree` is finite (one scalar, any sharding)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _last_good(ckpt: checkpoints.Checkpointer) -> str:
  ckpt.wait()
  last = ckpt.latest_step()
  if last is None:
    return f"No checkpoint was kept in {ckpt.directory}."
  return f"The last good checkpoint is step {last} in {ckpt.directory}."


def _grid_scale(run: run_lib.Run) -> int:
  """Grid PNGs are enlarged to about 128 pixels a side: the generator's output size (decoded
  pixels for EDM2; a text-to-image generator has none of its own: the step's shape)."""
  shape = getattr(run.generator, "image_shape", None) or run.setup.image_shape
  return max(1, 128 // int(shape[0]))


def _grid_samples(run: run_lib.Run, params, teacher_params) -> tuple[np.ndarray, int, int]:
  """The sample grid's raw generator outputs (before uint8), and its rows and columns."""
  seeds, conditions, rows, cols = run_lib.grid_inputs(run)
  x = run.generator.generate(seeds, conditions, params=run.sampling_params(params, teacher_params),
                             batch=run.config.eval.batch)
  return np.asarray(x), rows, cols


# Checkpoint metadata key of the feed's position (prompts, or real data: `sid_jax.data.real`).
# SiD-LSG checkpoints written before it was shared keep theirs under "prompts".
FEED_META_KEY = "feed"


def feed_state(meta: dict) -> dict | None:
  """The prompt or data position a checkpoint's metadata holds (None if it holds none)."""
  return meta.get(FEED_META_KEY, meta.get("prompts"))


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
  logging.info("Mesh %s over %d devices; teacher %s.", dict(run.mesh.shape), run.mesh.size,
               run.teacher.info)

  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"),
                                  every_steps=config.checkpoint.every_steps,
                                  keep=config.checkpoint.keep,
                                  async_save=config.checkpoint.async_save, provisional=True)
  teacher_params = run_lib.teacher_on_mesh(run)
  latest = ckpt.latest_step()
  if latest is not None:
    restored, restored_meta = ckpt.restore(
        latest, run_lib.abstract_checkpoint(run), config.to_dict(), teacher=run.teacher.info,
        allow_changes=bool(config.training.get("resume_allow_changes", False)))
    state, rng_data = restored["state"], restored["rng"]
    if run.feed is not None:
      position = feed_state(restored_meta)
      if position is None:
        raise checkpoints.CheckpointMismatchError(
            f"Checkpoint {latest} in {ckpt.directory} has no data position ('{FEED_META_KEY}'); "
            "it was not written by a run that reads prompts or data.")
      run.feed.restore(position)
    logging.info("Resumed from %s at step %d.", ckpt.directory, latest)
  else:
    state = run_lib.initial_state(run)
    rng_data = jax.device_put(jax.random.key_data(jax.random.key(config.seed)),
                              sharding.replicated(run.mesh))
  if is_main:  # after the resume checks: a refused run leaves the workdir as it was
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
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
      out[FEED_META_KEY] = run.feed.state()  # the position after the last saved step's batch
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
  if is_main:
    dropped = truncate_metrics(metrics_path, start)
    if dropped:
      logging.info("Dropped %d records beyond step %d from %s (they are computed again).",
                   dropped, start, metrics_path)
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
      images.save_png(path, grid, scale=_grid_scale(run))
      writer.write_images(step, {"samples": grid[None]})
    host_memory.release()  # what the evaluation's compiles and host arrays freed
    return result

  if start == 0:
    summary["initial_eval"] = eval_and_log(0, "grid")

  limit = int(config.training.max_nonfinite_steps)
  streak = 0  # consecutive non-finite iterations up to the last one judged

  def record(entry: dict) -> None:
    if is_main:
      _append_jsonl(metrics_path, entry)

  def judge(done: int, metrics) -> int:
    """Reads iteration `done`'s metrics: logs it if non-finite, confirms or discards the
    provisional checkpoint of step `done` - 1 (the state this iteration started from), and stops
    the run after `limit` consecutive non-finite iterations. Returns the streak."""
    nonlocal streak
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    streak = int(values["nonfinite_streak"])
    if streak:
      logging.warning("Iteration %d was non-finite (%d in a row): %s", done, streak,
                      " ".join(f"{k}={v:.4g}" for k, v in sorted(values.items())))
      record({"step": done, "kind": "nonfinite", **values})
    if ckpt.unconfirmed_step == done - 1:
      if streak:
        ckpt.discard(done - 1)
        logging.warning("Deleted checkpoint %d: the first iteration computed from it (%d) was "
                        "non-finite.", done - 1, done)
        record({"step": done - 1, "kind": "checkpoint_skipped",
                "reason": f"iteration {done}, the first from this state, was non-finite"})
      else:
        ckpt.confirm(done - 1)
    if limit and streak >= limit:
      ckpt.wait()
      raise NonFiniteLossError(
          f"Losses or gradients were non-finite for {streak} consecutive iterations, up to "
          f"iteration {done} (config.training.max_nonfinite_steps={limit}; 0 never stops). "
          f"{_last_good(ckpt)}")
    return streak

  skipped = set()  # steps whose checkpoint was skipped (logged once)

  def save_if_finite(at: int, force: bool) -> bool:
    """Saves step `at` (provisionally) unless its iteration or its state is non-finite."""
    reason = None
    if streak:
      reason = f"iteration {at} was non-finite ({streak} in a row)"
    elif not bool(jax.device_get(_all_finite(state))):
      reason = "the state has non-finite parameters or optimiser values"
    if reason is None:
      save(at, force=force)
      return True
    skipped.add(at)
    logging.warning("Skipped the checkpoint of step %d: %s.", at, reason)
    record({"step": at, "kind": "checkpoint_skipped", "reason": reason})
    return False

  stop = stop or StopRequest()
  status = "done"
  pending = None  # (step, metrics) of the last iteration, read one step late: dispatch stays async
  step = start
  with stop:
    while step < num_steps:
      if stop.signal is not None:
        status = "preempted"
        summary["signal"] = int(stop.signal)
        break
      batch = run.feed.next() if run.feed is not None else None
      state, metrics = train_fn(state, teacher_params, base_key, batch)
      step += 1
      if pending is not None:
        judge(*pending)
      pending = (step, metrics)
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
                          scale=_grid_scale(run))
      if step % config.checkpoint.every_steps == 0:
        judge(*pending)
        pending = None
        if ckpt.latest_step() != step:
          save_if_finite(step, force=False)
    if pending is not None:
      judge(*pending)
    # The end of the run (or a pre-emption): keep the state only if it is finite, and for a
    # finished run check the EMA generator's samples too before saving and exporting it.
    problem = None
    if streak:
      problem = f"iteration {step} was non-finite ({streak} in a row)"
    elif not bool(jax.device_get(_all_finite(state))):
      problem = "the state has non-finite parameters or optimiser values"
    elif status == "done":
      x, _, _ = _grid_samples(run, state.generator_ema, teacher_params)
      if not np.all(np.isfinite(x)):
        problem = (f"{int(np.sum(~np.all(np.isfinite(x.reshape(len(x), -1)), axis=1)))} of the "
                   f"{len(x)} grid samples of the EMA generator are non-finite")
    if problem is not None:
      if ckpt.unconfirmed_step == step:
        ckpt.discard(step)
      if step not in skipped:
        logging.warning("Skipped the checkpoint of step %d: %s.", step, problem)
        record({"step": step, "kind": "checkpoint_skipped", "reason": problem})
      ckpt.wait()
      if status == "done":
        last = _last_good(ckpt)
        writer.flush()
        ckpt.close()
        if best_ckpt is not None:
          best_ckpt.close()
        raise NonFiniteLossError(
            f"The run ended at step {step} but {problem}; nothing was saved or exported. {last}")
    else:
      if ckpt.latest_step() != step:
        save(step, force=True)
      ckpt.confirm(step)  # no later iteration judges it: the checks above did
    ckpt.wait()
  if status == "done":
    run.export(state.generator_ema, os.path.join(workdir, "generator"), step)
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

