"""The shipped assets carry no path of the machine that wrote them, and still load.

Orbax writes `commit_success.txt` ("Checkpoint commit was successful to /abs/path") into every
checkpoint; a local checkpoint is complete without it (Orbax's atomic-rename mode checks only the
directory name), so the receipts are neither committed (.gitignore) nor packaged (MANIFEST.in).
"""

import os
import shutil
import subprocess

import jax
import pytest

from sid_jax import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join("sid_jax", "assets")
MACHINE_PATHS = (b"/work/", b"/tmp/", b"/root/", b"/home/")


def _shipped_files():
  """The committed asset files (every file below sid_jax/assets outside a git checkout)."""
  try:
    out = subprocess.run(["git", "ls-files", "-z", ASSETS], cwd=ROOT, capture_output=True,
                         check=True).stdout
    files = [name for name in out.decode().split("\0") if name]
  except (OSError, subprocess.CalledProcessError):
    files = []
  if not files:
    files = [os.path.relpath(os.path.join(d, n), ROOT)
             for d, _, names in os.walk(os.path.join(ROOT, ASSETS)) for n in names]
  return sorted(files)


def test_no_asset_file_contains_an_absolute_machine_path():
  files = _shipped_files()
  assert any(f.endswith("network.json") for f in files)
  offending = []
  for name in files:
    path = os.path.join(ROOT, name)
    if not os.path.isfile(path):
      continue  # deleted in the working tree, not yet committed
    with open(path, "rb") as f:
      data = f.read()
    found = [p.decode() for p in MACHINE_PATHS if p in data]
    if found:
      offending.append(f"{name} ({', '.join(found)})")
  assert not offending, f"asset files with a machine path: {offending}"


@pytest.mark.parametrize("name", ["digits_classifier", "digits_teacher", "digits_generator"])
def test_assets_load_without_the_orbax_receipt(name, tmp_path):
  copy = tmp_path / name
  shutil.copytree(os.path.join(ROOT, ASSETS, name), copy,
                  ignore=shutil.ignore_patterns("commit_success.txt"))
  params = checkpoints.load_network_params(str(copy))
  assert jax.tree.leaves(params)
