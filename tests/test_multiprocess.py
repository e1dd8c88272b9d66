"""Two real processes on 127.0.0.1 (4 CPU devices each, gloo collectives) run one tiny SiD job
through `python -m sid_jax.main`: jax.distributed from the environment, a checkpoint saved by
both, a resume by both, and only process 0 writing logs, metrics and grids. The result equals one
process with 8 devices on the same 2x4 mesh (every leaf split over fsdp)."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from sid_jax import train
from tests.test_scale import final_checkpoint, layout_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 420


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch_two(workdir, num_steps, log_dir):
  """Both processes of one job; returns their (returncode, output)."""
  port = _free_port()
  overrides = [f"--config.{k}={v}" for k, v in {
      "mesh.data": 2, "mesh.fsdp": 4, "mesh.fsdp_min_size": 0, "optim.eps": 1e-3,
      "training.num_steps": num_steps, "checkpoint.every_steps": 2}.items()]
  procs = []
  for pid in range(2):
    env = dict(os.environ, SID_JAX_DISTRIBUTED="1", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid), JAX_PLATFORMS="cpu",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    log = open(os.path.join(log_dir, f"process_{pid}_{num_steps}.txt"), "w")
    procs.append((subprocess.Popen(
        [sys.executable, "-m", "sid_jax.main", "--config=configs/gmm_sid.py:tiny",
         f"--workdir={workdir}", *overrides], cwd=ROOT, env=env, stdout=log,
        stderr=subprocess.STDOUT), log))
  results = []
  for proc, log in procs:
    try:
      proc.wait(timeout=TIMEOUT_S)
    finally:
      if proc.poll() is None:
        proc.kill()
      log.close()
    results.append((proc.returncode, open(log.name).read()))
  return results


def test_two_processes_save_resume_and_equal_one_eight_device_process(tmp_path):
  workdir = str(tmp_path / "two")
  for num_steps in (2, 4):  # the second launch resumes the first one's checkpoint
    for pid, (code, out) in enumerate(_launch_two(workdir, num_steps, str(tmp_path))):
      assert code == 0, f"process {pid} failed:\n{out[-4000:]}"
      assert f"jax.distributed: process {pid} of 2, 4 local of 8 devices" in out
      assert f"[sid_jax] done at step {num_steps}" in out
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert summary["start_step"] == 2 and summary["checkpoint_steps"] == [2, 4]
  # Only process 0 writes the logs: one record per logged step, from both launches.
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train_steps = [r["step"] for r in records if r["kind"] == "train"]
  assert train_steps == [2, 4]
  assert sorted(os.listdir(os.path.join(workdir, "samples"))) == [
      "grid_00000000.png", "grid_00000002.png", "grid_00000004.png"]
  # One process on 8 devices, same mesh, uninterrupted.
  one = str(tmp_path / "one")
  train.distill(layout_config(2, 4, 4), one, devices=jax.devices()[:8])
  want, got = final_checkpoint(one, 4), final_checkpoint(workdir, 4)
  assert int(got["state"].step) == 4
  np.testing.assert_array_equal(got["rng"], want["rng"])
  for a, b in zip(jax.tree.leaves(got["state"]), jax.tree.leaves(want["state"])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  exported = os.listdir(os.path.join(workdir, "generator"))
  assert "network.json" in exported and "params" in exported
