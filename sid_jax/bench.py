"""Benchmark of one configuration: python -m sid_jax.bench --config=configs/X.py[:ARG] --steps N.

Prints one JSON line: compile seconds, seconds per distillation iteration (psi step + theta step +
EMA), generated images per second (one-step sampling alone) and training images per second,
peak host memory, XLA's FLOP count per iteration, and the device set-up. Nothing is written to
disk; timings are medians over N iterations after one warm-up iteration.
"""

from __future__ import annotations

import json
import resource
import sys
import time

from absl import app, flags
import jax
import numpy as np
from ml_collections import config_flags


def _define_flags():
  """Flags exist only when this module is the program, so importing it never clashes."""
  config_flags.DEFINE_config_file("config", None, "Config file to benchmark.", lock_config=True)
  flags.DEFINE_integer("steps", 5, "Timed iterations (after one warm-up).")
  flags.mark_flags_as_required(["config"])


def _peak_rss_mb() -> float:
  kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return kb / 1024.0 if sys.platform != "darwin" else kb / 2**20


def benchmark(config, steps: int) -> dict:
  from sid_jax import train  # pylint: disable=g-import-not-at-top
  if steps <= 0:
    raise ValueError(f"--steps must be positive, got {steps}.")
  run = train.build_run(config)
  state = train.initial_state(run)
  teacher_params = jax.device_put(run.teacher.params, run.teacher_shardings)
  key = jax.random.key(config.seed)
  t0 = time.perf_counter()
  compiled = train.compile_train_step(run, state, teacher_params, key)
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})

  state, metrics = compiled(state, teacher_params, key)
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = compiled(state, teacher_params, key)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t)
  iter_s = float(np.median(times))

  sample = train.make_sampler(run)
  batch = config.eval.batch
  z, labels, _ = train.fixed_inputs(run, 0, batch)
  jax.block_until_ready(sample(state.generator_ema, z, labels))
  sample_times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(sample(state.generator_ema, z, labels))
    sample_times.append(time.perf_counter() - t)
  sample_s = float(np.median(sample_times))

  return {
      "config": {"resolution": config.data.resolution, "channels": config.data.channels,
                 "label_dim": config.data.label_dim, "global_batch": config.training.global_batch,
                 "micro_batch": config.training.micro_batch},
      "backend": jax.default_backend(),
      "devices": jax.device_count(),
      "mesh": dict(run.mesh.shape),
      "compile_seconds": round(compile_s, 3),
      "seconds_per_iteration": round(iter_s, 5),
      "train_images_per_second": round(config.training.global_batch / iter_s, 2),
      "generated_images_per_second": round(batch / sample_s, 2),
      "flops_per_iteration": float(cost.get("flops", float("nan"))),
      "peak_host_memory_mb": round(_peak_rss_mb(), 1),
      "timed_iterations": steps,
      "final_losses": {k: float(metrics[k]) for k in ("fake_loss", "gen_loss")},
  }


def main(argv):
  del argv
  print(json.dumps(benchmark(flags.FLAGS.config, flags.FLAGS.steps), sort_keys=True))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
