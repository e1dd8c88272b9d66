"""The launch/ scripts, run for real against fake srun, gcloud, hostname and python executables.

The fakes record what they were given. Fake srun runs its command once per task with
SLURM_PROCID set; fake gcloud runs the --command string with `sh` (dash here, as a remote login
shell might be) once per worker, in $HOME, with a TPU-VM-like hostname. Each script is copied
into a fake checkout whose path has a space in it.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LSG_CONFIG = "configs/sid_lsg.py:teacher=sd15,kappa=1.5,tiny"
OVERRIDES = ["--config.training.num_steps=5", "--config.log.note=two words, one comma"]

_FAKE_PYTHON = f"""#!{sys.executable} -I
import json, os, sys
keys = ("SID_JAX_DISTRIBUTED", "JAX_LOCAL_DEVICE_IDS", "SLURM_PROCID")
record = {{"argv": sys.argv[1:], "cwd": os.getcwd(), **{{k: os.environ.get(k) for k in keys}}}}
with open(os.environ["FAKE_RECORD"], "a") as f:
  f.write(json.dumps(record) + "\\n")
print("fake python says hello from", os.environ.get("FAKE_HOSTNAME"))
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
"""

_FAKE_SRUN = f"""#!{sys.executable} -I
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.path.join(os.environ["FAKE_DIR"], "srun_argv.json"), "w") as f:
  json.dump(args, f)
start = next(i for i, a in enumerate(args) if not a.startswith("-"))
codes = [subprocess.run(args[start:], env=dict(os.environ, SLURM_PROCID=str(task),
                                                SLURM_LOCALID="0")).returncode
         for task in range(int(os.environ.get("FAKE_NTASKS", "2")))]
sys.exit(next((c for c in codes if c), 0))
"""

_FAKE_GCLOUD = f"""#!{sys.executable} -I
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.path.join(os.environ["FAKE_DIR"], "gcloud_argv.json"), "w") as f:
  json.dump(args, f)
command = next(a.split("=", 1)[1] for a in args if a.startswith("--command="))
codes = []
for worker in range(int(os.environ.get("FAKE_WORKERS", "2"))):
  host = os.environ.get("FAKE_HOST_PREFIX", "t1v-n-0a1b2c3d-w-") + str(worker)
  codes.append(subprocess.run(["sh", "-c", command], cwd=os.environ["HOME"],
                              env=dict(os.environ, FAKE_HOSTNAME=host)).returncode)
sys.exit(next((c for c in codes if c), 0))
"""

_FAKE_HOSTNAME = '#!/bin/sh\necho "${FAKE_HOSTNAME:-fakehost}"\n'


def _write_exe(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  os.chmod(path, 0o755)


def _make_checkout(path):
  """A fake checkout: the launch scripts, sid_jax/main.py, one config and a fake venv python."""
  for name in ("local.sh", "gpu_multinode.sh", "tpu_pod.sh"):
    os.makedirs(os.path.join(path, "launch"), exist_ok=True)
    shutil.copy(os.path.join(ROOT, "launch", name), os.path.join(path, "launch", name))
  for name in ("sid_jax/main.py", "configs/sid_lsg.py"):
    os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
    open(os.path.join(path, name), "w").close()
  _write_exe(os.path.join(path, ".venv", "bin", "python"), _FAKE_PYTHON)


class Env:
  """A fake checkout, fake tools on PATH, and helpers to run a script and read the records."""

  def __init__(self, tmp_path):
    self.tmp = str(tmp_path)
    self.repo = os.path.join(self.tmp, "my repo")
    self.home = os.path.join(self.tmp, "home")
    self.caller = os.path.join(self.tmp, "caller")
    self.fake_dir = os.path.join(self.tmp, "fakes")
    bin_dir = os.path.join(self.fake_dir, "bin")
    _make_checkout(self.repo)
    os.makedirs(self.home)
    os.makedirs(self.caller)
    _write_exe(os.path.join(bin_dir, "srun"), _FAKE_SRUN)
    _write_exe(os.path.join(bin_dir, "gcloud"), _FAKE_GCLOUD)
    _write_exe(os.path.join(bin_dir, "hostname"), _FAKE_HOSTNAME)
    self.python = os.path.join(self.tmp, "other python", "python")
    _write_exe(self.python, _FAKE_PYTHON)
    self.record = os.path.join(self.fake_dir, "python_calls.jsonl")
    self.env = {"PATH": bin_dir + os.pathsep + os.environ["PATH"], "HOME": self.home,
                "FAKE_DIR": self.fake_dir, "FAKE_RECORD": self.record}

  def run(self, script, *args, cwd=None, **env):
    path = script if os.path.isabs(script) else os.path.join(self.repo, "launch", script)
    return subprocess.run(["bash", path, *args], env={**self.env, **env}, cwd=cwd or self.caller,
                          capture_output=True, text=True, timeout=30)

  def calls(self):
    if not os.path.exists(self.record):
      return []
    with open(self.record) as f:
      return [json.loads(line) for line in f]

  def tool_argv(self, tool):
    with open(os.path.join(self.fake_dir, f"{tool}_argv.json")) as f:
      return json.load(f)


@pytest.fixture(name="env")
def _env(tmp_path):
  return Env(tmp_path)


def _read(path):
  with open(path) as f:
    return f.read()


# ----------------------------------------------------------------------------------------------
# local.sh
# ----------------------------------------------------------------------------------------------


def test_local_passes_arguments_intact_and_logs(env):
  workdir = os.path.join(env.tmp, "run dir")
  out = env.run("local.sh", LSG_CONFIG, workdir, *OVERRIDES)
  assert out.returncode == 0, out.stderr
  [call] = env.calls()
  assert call["argv"] == ["-m", "sid_jax.main", f"--config={LSG_CONFIG}", f"--workdir={workdir}",
                          *OVERRIDES]
  assert call["cwd"] == env.repo
  assert call["SID_JAX_DISTRIBUTED"] is None
  assert "fake python says hello" in out.stdout
  assert "fake python says hello" in _read(os.path.join(workdir, "logs", "host_0.txt"))


def test_local_resolves_relative_paths_against_the_caller(env):
  out = env.run("local.sh", "configs/sid_lsg.py", "runs/a", PYTHON="../other python/python")
  assert out.returncode == 0, out.stderr
  [call] = env.calls()
  assert call["argv"][3] == "--workdir=" + os.path.join(env.caller, "runs", "a")
  assert os.path.isfile(os.path.join(env.caller, "runs", "a", "logs", "host_0.txt"))


def test_local_gs_workdir_logs_to_log_dir(env):
  log_dir = os.path.join(env.tmp, "host logs")
  out = env.run("local.sh", "configs/sid_lsg.py", "gs://bucket/run", LOG_DIR=log_dir)
  assert out.returncode == 0, out.stderr
  assert env.calls()[0]["argv"][3] == "--workdir=gs://bucket/run"
  assert "fake python says hello" in _read(os.path.join(log_dir, "host_0.txt"))
  assert not os.path.exists(os.path.join(env.caller, "gs:"))


def test_local_exit_code_propagates_through_tee(env):
  workdir = os.path.join(env.tmp, "run")
  out = env.run("local.sh", "configs/sid_lsg.py", workdir, FAKE_EXIT="3")
  assert out.returncode == 3
  assert "fake python says hello" in _read(os.path.join(workdir, "logs", "host_0.txt"))


@pytest.mark.parametrize("args,env_vars,message", [
    ((), {}, "CONFIG is not set"),
    (("configs/sid_lsg.py",), {}, "WORKDIR is not set"),
    (("configs/nope.py:tiny", "run"), {}, "configs/nope.py does not exist"),
    (("configs/sid_lsg.py", "run"), {"PYTHON": "/no/such/python"}, "PYTHON=/no/such/python"),
])
def test_local_checks_inputs_first(env, args, env_vars, message):
  out = env.run("local.sh", *args, **env_vars)
  assert out.returncode == 2
  assert message in out.stderr and out.stderr.startswith("local.sh: ")
  assert not env.calls() and not os.path.exists(os.path.join(env.caller, "run"))


# ----------------------------------------------------------------------------------------------
# gpu_multinode.sh (SLURM)
# ----------------------------------------------------------------------------------------------


def test_slurm_runs_every_task_with_intact_arguments(env):
  workdir = os.path.join(env.tmp, "shared run")
  out = env.run("gpu_multinode.sh", LSG_CONFIG, workdir, *OVERRIDES, FAKE_NTASKS="3",
                CUDA_VISIBLE_DEVICES="4,5,6,7", SRUN_ARGS="--label --mpi=none")
  assert out.returncode == 0, out.stderr
  calls = env.calls()
  assert sorted(c["SLURM_PROCID"] for c in calls) == ["0", "1", "2"]
  for call in calls:
    assert call["argv"] == ["-m", "sid_jax.main", f"--config={LSG_CONFIG}",
                            f"--workdir={workdir}", *OVERRIDES]
    assert call["cwd"] == env.repo
    assert call["SID_JAX_DISTRIBUTED"] == "1"
    assert call["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3"
  for task in range(3):
    assert "fake python says hello" in _read(os.path.join(workdir, "logs", f"host_{task}.txt"))
  assert env.tool_argv("srun")[:4] == ["--kill-on-bad-exit=1", "--label", "--mpi=none", "bash"]


def test_slurm_one_process_per_gpu_leaves_device_choice_to_jax(env):
  out = env.run("gpu_multinode.sh", "configs/sid_lsg.py", os.path.join(env.tmp, "run"),
                PROCESS_PER="gpu", CUDA_VISIBLE_DEVICES="0,1")
  assert out.returncode == 0, out.stderr
  assert [c["JAX_LOCAL_DEVICE_IDS"] for c in env.calls()] == [None, None]


def test_slurm_finds_the_checkout_from_the_submit_dir(env):
  # sbatch runs a copy of the batch script from its spool directory.
  spool = os.path.join(env.tmp, "spool", "job1")
  os.makedirs(spool)
  script = shutil.copy(os.path.join(env.repo, "launch", "gpu_multinode.sh"),
                       os.path.join(spool, "slurm_script"))
  workdir = os.path.join(env.tmp, "run")
  out = env.run(script, "configs/sid_lsg.py", workdir, SLURM_SUBMIT_DIR=env.repo,
                PYTHON=env.python)
  assert out.returncode == 0, out.stderr
  assert {c["cwd"] for c in env.calls()} == {env.repo}
  assert env.run(script, "configs/sid_lsg.py", workdir).returncode == 2


def test_slurm_gs_workdir_logs_to_log_dir(env):
  log_dir = os.path.join(env.tmp, "node logs")
  out = env.run("gpu_multinode.sh", "configs/sid_lsg.py", "gs://bucket/run", LOG_DIR=log_dir)
  assert out.returncode == 0, out.stderr
  assert {c["argv"][3] for c in env.calls()} == {"--workdir=gs://bucket/run"}
  assert sorted(os.listdir(log_dir)) == ["host_0.txt", "host_1.txt"]
  assert not os.path.exists(os.path.join(env.caller, "gs:"))


def test_slurm_exit_code_propagates(env):
  out = env.run("gpu_multinode.sh", "configs/sid_lsg.py", os.path.join(env.tmp, "run"),
                FAKE_EXIT="3")
  assert out.returncode == 3


@pytest.mark.parametrize("args,message", [
    ((), "CONFIG is not set"),
    (("configs/sid_lsg.py",), "WORKDIR is not set"),
    (("configs/missing.py", "run"), "configs/missing.py does not exist"),
])
def test_slurm_checks_inputs_first(env, args, message):
  out = env.run("gpu_multinode.sh", *args)
  assert out.returncode == 2 and message in out.stderr
  assert not os.path.exists(os.path.join(env.fake_dir, "srun_argv.json"))


# ----------------------------------------------------------------------------------------------
# tpu_pod.sh (gcloud ssh --worker=all)
# ----------------------------------------------------------------------------------------------


def _tpu_vars(env, **more):
  return {"TPU_NAME": "my-pod", "ZONE": "us-west4-a", "CONFIG": LSG_CONFIG,
          "WORKDIR": os.path.join(env.tmp, "shared run"), "REPO_DIR": env.repo,
          "PYTHON": env.python, **more}


def test_tpu_pod_runs_on_every_worker_with_intact_arguments(env):
  tpu = _tpu_vars(env)
  out = env.run("tpu_pod.sh", *OVERRIDES, **tpu)
  assert out.returncode == 0, out.stderr
  calls = env.calls()
  assert len(calls) == 2
  for call in calls:
    assert call["argv"] == ["-m", "sid_jax.main", f"--config={LSG_CONFIG}",
                            f"--workdir={tpu['WORKDIR']}", *OVERRIDES]
    assert call["cwd"] == env.repo
    assert call["SID_JAX_DISTRIBUTED"] == "1"
  for worker in range(2):
    log = _read(os.path.join(tpu["WORKDIR"], "logs", f"host_{worker}.txt"))
    assert f"hello from t1v-n-0a1b2c3d-w-{worker}" in log
  argv = env.tool_argv("gcloud")
  assert argv[:7] == ["compute", "tpus", "tpu-vm", "ssh", "my-pod", "--zone=us-west4-a",
                      "--worker=all"]


def test_tpu_pod_default_checkout_in_home_and_gs_workdir(env):
  checkout = os.path.join(env.home, "sid_jax")
  _make_checkout(checkout)
  log_dir = os.path.join(env.tmp, "host logs")
  tpu = _tpu_vars(env, WORKDIR="gs://bucket/run", LOG_DIR=log_dir, PROJECT="proj",
                  FAKE_HOST_PREFIX="plainhost")
  del tpu["REPO_DIR"], tpu["PYTHON"]
  out = env.run("tpu_pod.sh", **tpu)
  assert out.returncode == 0, out.stderr
  assert {c["cwd"] for c in env.calls()} == {checkout}
  assert env.calls()[0]["argv"][3] == "--workdir=gs://bucket/run"
  assert "hello from plainhost1" in _read(os.path.join(log_dir, "host_plainhost1.txt"))
  assert "--project=proj" in env.tool_argv("gcloud")


def test_tpu_pod_exit_code_propagates(env):
  out = env.run("tpu_pod.sh", **_tpu_vars(env, FAKE_EXIT="3"))
  assert out.returncode == 3


def test_tpu_pod_missing_remote_python_is_named(env):
  out = env.run("tpu_pod.sh", **_tpu_vars(env, PYTHON="/no/such/python"))
  assert out.returncode == 2 and "no python /no/such/python in" in out.stderr


@pytest.mark.parametrize("name", ["TPU_NAME", "ZONE", "CONFIG", "WORKDIR"])
def test_tpu_pod_requires_each_variable(env, name):
  tpu = _tpu_vars(env)
  del tpu[name]
  out = env.run("tpu_pod.sh", **tpu)
  assert out.returncode == 2 and f"{name} is not set" in out.stderr
  assert not os.path.exists(os.path.join(env.fake_dir, "gcloud_argv.json"))


def test_tpu_pod_checks_the_config_locally(env):
  out = env.run("tpu_pod.sh", **_tpu_vars(env, CONFIG="configs/typo.py:tiny"))
  assert out.returncode == 2 and "configs/typo.py does not exist" in out.stderr
  assert not os.path.exists(os.path.join(env.fake_dir, "gcloud_argv.json"))
