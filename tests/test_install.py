"""Installs: setup.py's ranges hold the lock, and a built wheel works from a fresh virtualenv.

requirements.txt / requirements-test.txt are the exact lock CI runs; setup.py declares ranges whose
lower bounds are the locked (tested) versions, so sid_jax installs next to other libraries. The
wheel test builds sid_jax as a user's `pip install` would, lets pip resolve the ranges (not the
lock) in an empty virtualenv, and samples the shipped digits generator from a directory outside
the repository, so only the installed package (its modules and package data) is used. It needs the
package index (the pip configuration's mirrors), as any install does, and takes a few minutes.
"""

import os
import re
import runpy
import shutil
import subprocess
import sys
from unittest import mock

import numpy as np
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from PIL import Image
import setuptools

from tests import configs_util

ROOT = configs_util.ROOT
SEEDS = "0-11"


def _setup_kwargs():
  """The keyword arguments setup.py passes to setuptools.setup (nothing is built)."""
  with mock.patch.object(setuptools, "setup") as setup:
    runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="__main__")
  (kwargs,) = [call.kwargs for call in setup.call_args_list]
  return kwargs


def _lock(name):
  """{(package, extras): version} of a requirements file's exact pins (its -r lines skipped)."""
  pins = {}
  with open(os.path.join(ROOT, name), encoding="utf-8") as f:
    for line in f:
      line = line.split("#")[0].strip()
      if not line or line.startswith("-r"):
        continue
      req = Requirement(line)
      (spec,) = req.specifier
      assert spec.operator == "==", f"{name}: {line!r} is not an exact pin"
      pins[(canonicalize_name(req.name), tuple(sorted(req.extras)))] = spec.version
  return pins


def _declared(lines, environment=None):
  """{(package, extras): Requirement} of the requirements that apply on `environment`'s platform
  (default: this machine's, where the lock is tested)."""
  reqs = [Requirement(line) for line in lines]
  return {(canonicalize_name(r.name), tuple(sorted(r.extras))): r for r in reqs
          if r.marker is None or r.marker.evaluate(environment)}


def _check_ranges(lock, declared, exact=()):
  """Same packages; each locked version lies in its range, which starts at that version."""
  assert set(declared) == set(lock), (
      f"locked but not in setup.py: {sorted(set(lock) - set(declared))}; in setup.py but not "
      f"locked: {sorted(set(declared) - set(lock))}")
  for key, version in lock.items():
    spec = declared[key].specifier
    assert spec.contains(version), f"{key[0]}: the lock's {version} is outside {spec}"
    want = "==" if key[0] in exact else ">="
    assert f"{want}{version}" in {str(s) for s in spec}, (
        f"{key[0]}: {spec} should be {want}{version} (the tested version)")


def test_setup_ranges_contain_the_lock():
  kwargs = _setup_kwargs()
  lock = _lock("requirements.txt")
  _check_ranges(lock, _declared(kwargs["install_requires"]))
  # The test extra is requirements-test.txt's own pins as ranges; torch and JAX's plugins stay
  # exact (other torch versions resolve to the CUDA build; plugins must match jax).
  extras = kwargs["extras_require"]
  _check_ranges(_lock("requirements-test.txt"), _declared(extras["test"]), exact=("torch", "jax"))
  jax_version = lock[("jax", ())]
  assert lock[("jaxlib", ())] == jax_version
  for extra in ("cuda12", "cuda13", "tpu"):
    assert extras[extra] == [f"jax[{extra}]=={jax_version}"], extras[extra]
  assert extras["convert"] == [f"torch=={_lock('requirements-test.txt')[('torch', ())]}"]
  assert set(extras) == {"cuda12", "cuda13", "tpu", "convert", "test"}


def test_setup_asks_for_the_tensorflow_build_each_platform_has():
  """tensorflow-cpu wheels exist for Linux x86-64 and Windows only; macOS arm64 and Linux aarch64
  get `tensorflow`, and every one of these platforms gets exactly one of the two."""
  requires = _setup_kwargs()["install_requires"]
  platforms = {("linux", "x86_64"): "tensorflow-cpu", ("win32", "AMD64"): "tensorflow-cpu",
               ("darwin", "arm64"): "tensorflow", ("linux", "aarch64"): "tensorflow"}
  for (system, machine), want in platforms.items():
    names = {key[0] for key in _declared(requires, {"sys_platform": system,
                                                    "platform_machine": machine})}
    assert names & {"tensorflow", "tensorflow-cpu"} == {want}, (system, machine)


def _copy_sources(dst):
  """What a source distribution holds: setup.py, MANIFEST.in, README, requirements, sid_jax/."""
  for name in ("setup.py", "MANIFEST.in", "README.md", "requirements.txt",
               "requirements-test.txt"):
    shutil.copy(os.path.join(ROOT, name), dst)
  shutil.copytree(os.path.join(ROOT, "sid_jax"), os.path.join(dst, "sid_jax"),
                  ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "commit_success.txt"))


def _run(cmd, **kwargs):
  result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False,
                          **kwargs)
  assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
  return result.stdout


def test_wheel_installs_and_samples_outside_the_repository(tmp_path):
  src, wheels, outside = tmp_path / "src", tmp_path / "wheels", tmp_path / "elsewhere"
  for d in (src, wheels, outside):
    d.mkdir()
  _copy_sources(src)
  # As `pip install .` does: setuptools in an isolated build environment, not the test venv's.
  _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", wheels, src])
  (wheel,) = os.listdir(wheels)
  assert re.fullmatch(r"sid_jax-0\.1\.0-py3-none-any\.whl", wheel), wheel

  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  venv = tmp_path / "venv"
  _run([sys.executable, "-m", "venv", venv])
  python = venv / "bin" / "python"
  _run([python, "-m", "pip", "install", "--quiet", "--no-compile", wheels / wheel], env=env,
       cwd=outside)
  _run([python, "-m", "pip", "check"], env=env, cwd=outside)
  print(_run([python, "-m", "pip", "freeze"], env=env, cwd=outside))  # the resolved versions

  package = _run([python, "-c", "import os, sid_jax; print(os.path.dirname(sid_jax.__file__))"],
                 env=env, cwd=outside).strip()
  assert package.startswith(str(venv)), package
  generator = os.path.join(package, "assets", "digits_generator")
  _run([python, "-m", "sid_jax.sample", "--checkpoint", generator, "--seeds", SEEDS,
        "--outdir", "out"], env=env, cwd=outside)

  from sid_jax import sample  # pylint: disable=g-import-not-at-top
  reference = sample.run(outdir=str(tmp_path / "reference"), seeds=SEEDS,
                         checkpoint=os.path.join(ROOT, "sid_jax", "assets", "digits_generator"))
  names = [f"{s:06d}.png" for s in sample.parse_seeds(SEEDS)]
  assert sorted(n for n in os.listdir(outside / "out") if n.endswith(".png")) == names
  for name in names:
    got = np.asarray(Image.open(outside / "out" / name))
    assert got.shape == (8, 8) and got.dtype == np.uint8 and got.std() > 0, name
    np.testing.assert_array_equal(got, np.asarray(Image.open(os.path.join(reference, name))))
