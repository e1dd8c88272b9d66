"""Benchmark of one configuration: python -m sid_jax.bench --config=configs/X.py[:ARG] --steps N.

Prints one JSON line: compile seconds, seconds per distillation iteration (psi step + theta step +
EMA), generated images per second (one-step sampling alone; SiD-LSG: with text encoding and VAE
decoding) and training images per second, peak host memory, XLA's per-iteration buffer sizes and
FLOP count, and the device set-up. Nothing is written to
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

  batch = config.eval.batch
  if run.lsg is not None:
    from sid_jax import lsg  # pylint: disable=g-import-not-at-top
    sampler = lsg.make_image_sampler(run.lsg.sd, config.lsg.init_timestep)
    ids = run.lsg.sd.tokenize(["a photo of a cat"] * batch)
    z = np.zeros((batch,) + tuple(run.setup.image_shape), np.float32)

    def sample_once():  # latents -> VAE-decoded images
      return sampler(state.generator_ema, teacher_params["text_encoder"], run.lsg.vae_params, z,
                     ids, key)
  else:
    sample = train.make_sampler(run)
    z, labels, _ = train.fixed_inputs(run, 0, batch)

    def sample_once():
      return sample(state.generator_ema, z, labels)

  jax.block_until_ready(sample_once())
  sample_times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(sample_once())
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
      "devices": jax.device_count(),
      "mesh": dict(run.mesh.shape),
      "compile_seconds": round(compile_s, 3),
      "seconds_per_iteration": round(iter_s, 5),
      "train_images_per_second": round(config.training.global_batch / iter_s, 2),
      "generated_images_per_second": round(batch / sample_s, 2),
      "flops_per_iteration": float(cost.get("flops", float("nan"))),
      "peak_host_memory_mb": round(_peak_rss_mb(), 1),
      # XLA's buffer sizes of one compiled iteration (per device, MiB): the device memory a run
      # needs beside the parameters it is given.
      "iteration_memory_mb": memory,
      "timed_iterations": steps,
      "final_losses": {k: float(metrics[k]) for k in ("fake_loss", "gen_loss")},
  }


def main(argv):
  del argv
  print(json.dumps(benchmark(flags.FLAGS.config, flags.FLAGS.steps), sort_keys=True))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
