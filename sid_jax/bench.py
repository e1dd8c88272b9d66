"""Benchmark of one configuration: python -m sid_jax.bench --config=configs/X.py[:ARG] --steps N.

Prints one JSON line: compile seconds, seconds per distillation iteration (psi step + theta step +
EMA), generated images per second (one-step sampling alone; SiD-LSG: with text encoding and VAE
decoding) and training images per second, host memory (peak; resident after the compile and
after the iterations), XLA's per-iteration buffer sizes and FLOP count, the device set-up and the
XLA flags in force. Nothing is written to disk; timings are medians over N iterations after one
warm-up iteration.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags
import jax
import numpy as np
from ml_collections import config_flags

from sid_jax import cli
from sid_jax import host_memory
from sid_jax import run as run_lib


FLAGS = flags.FlagValues()
config_flags.DEFINE_config_file("config", None, "Config file to benchmark.", flag_values=FLAGS,
                                lock_config=True)
flags.DEFINE_integer("steps", 5, "Timed iterations (after one warm-up).", flag_values=FLAGS)


def benchmark(config, steps: int) -> dict:
  if steps <= 0:
    raise ValueError(f"--steps must be positive, got {steps}.")
  run = run_lib.build_run(config)
  state = run_lib.initial_state(run)
  teacher_params = run_lib.teacher_on_mesh(run)
  key = jax.random.key(config.seed)
  t0 = time.perf_counter()
  compiled = run_lib.compile_train_step(run, state, teacher_params, key)
  compile_s = time.perf_counter() - t0
  after_compile_mb = host_memory.rss_mb()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})

  def inputs():  # SiD-LSG: the next prompts' token ids (host tokenisation is part of the step)
    return run.feed.next() if run.feed is not None else None

  state, metrics = compiled(state, teacher_params, key, inputs())
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = compiled(state, teacher_params, key, inputs())
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t)
  iter_s = float(np.median(times))
  training_mb = host_memory.rss_mb()
  # (the kernel's peak counter may trail the resident size just read by a few pages)
  training_peak_mb = max(host_memory.peak_rss_mb(), training_mb, after_compile_mb)

  # Sampling: one batch of the run's generator (text-to-image: decoded by the VAE).
  batch = config.eval.batch
  _, conditions, _, _ = run_lib.grid_inputs(run)
  seeds = np.arange(batch)
  if conditions is not None:
    conditions = [conditions[i % len(conditions)] for i in range(batch)]
  params = run.sampling_params(state.generator_ema, teacher_params)

  def sample_once():
    return run.generator.generate(seeds, conditions, params=params, batch=batch)

  sample_once()
  sample_times = []
  for _ in range(steps):
    t = time.perf_counter()
    sample_once()
    sample_times.append(time.perf_counter() - t)
  sample_s = float(np.median(sample_times))
  memory = {}
  try:
    mem = compiled.memory_analysis()
    memory = {name: round(getattr(mem, f"{name}_size_in_bytes") / 2**20, 2)
              for name in ("argument", "output", "temp", "generated_code")}
  except (AttributeError, NotImplementedError):  # not every backend reports it
    pass

  return {
      "method": config.method,
      "config": {"resolution": config.data.resolution, "channels": config.data.channels,
                 "label_dim": config.data.label_dim, "global_batch": config.training.global_batch,
                 "micro_batch": config.training.micro_batch},
      "backend": jax.default_backend(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),  # sid_jax adds its XLA:CPU flag: xla_cpu.py
      "devices": jax.device_count(),
      "mesh": dict(run.mesh.shape),
      "compile_seconds": round(compile_s, 3),
      "seconds_per_iteration": round(iter_s, 5),
      "train_images_per_second": round(config.training.global_batch / iter_s, 2),
      "generated_images_per_second": round(batch / sample_s, 2),
      "flops_per_iteration": float(cost.get("flops", float("nan"))),
      # Host memory, MiB: the process's peak (after sampling too), its peak by the end of the
      # timed iterations, and its resident size after the compile and after the iterations.
      "peak_host_memory_mb": round(max(host_memory.peak_rss_mb(), training_peak_mb), 1),
      "host_memory_mb": {"peak_training": round(training_peak_mb, 1),
                         "after_compile": round(after_compile_mb, 1),
                         "after_iterations": round(training_mb, 1)},
      # XLA's buffer sizes of one compiled iteration (per device, MiB): the device memory a run
      # needs beside the parameters it is given.
      "iteration_memory_mb": memory,
      "timed_iterations": steps,
      "final_losses": {k: float(metrics[k]) for k in ("fake_loss", "gen_loss")},
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}.")
  if FLAGS.config is None:
    raise app.UsageError("--config is required (configs/NAME.py[:ARG]).")
  result = cli.report_errors("sid_jax.bench", lambda: benchmark(FLAGS.config, FLAGS.steps))
  print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parser(FLAGS, __doc__))
