"""notebooks/*.ipynb run headless (no network): the shipped digits generator makes a grid, a tiny
SD generator makes the CLI's images; their Colab cells (install, runtime check, upload) are run
with a stand-in google.colab module."""

import fnmatch
import io
import os
import shutil
import subprocess
import sys
import tempfile
import types
from unittest import mock
import zipfile

import jax
import nbformat
from nbclient import NotebookClient
import numpy as np
import pytest

from tests import configs_util

NOTEBOOK = os.path.join(configs_util.ROOT, "notebooks", "sample_onestep.ipynb")
T2I_NOTEBOOK = os.path.join(configs_util.ROOT, "notebooks", "sample_text_to_image.ipynb")
DIGITS = os.path.join(configs_util.ROOT, "sid_jax", "assets", "digits_generator")
# Cell order in both notebooks.
INSTALL, RUNTIME, PARAMS, LOAD = 1, 2, 3, 4


def _source(path, index):
  return nbformat.read(path, as_version=4).cells[index].source


def _fake_colab(uploads=None):
  """sys.modules entries that make `"google.colab" in sys.modules` true and files.upload()
  return `uploads` ({name: bytes}), as Colab's does."""
  colab = types.ModuleType("google.colab")
  colab.files = types.SimpleNamespace(upload=lambda: dict(uploads or {}))
  return {"google.colab": colab}


def test_notebook_executes_and_shows_a_grid():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": configs_util.ROOT}})
  client.execute()
  texts, images = [], 0
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      assert out.get("output_type") != "error", out
      texts.append(out.get("text", ""))
      images += "image/png" in out.get("data", {})
  text = "".join(texts)
  # Outside Colab the install cell installs nothing and names this checkout.
  assert f"Not in Colab: nothing installed. To install here: pip install {configs_util.ROOT!r}" \
      in "".join(o.get("text", "") for o in nb.cells[INSTALL].outputs)
  runtime = "".join(o.get("text", "") for o in nb.cells[RUNTIME].outputs)
  assert f"devices: {jax.devices()}" in runtime and f"backend {jax.default_backend()}" in runtime
  assert "Loaded EDMPrecond generator" in text and "digits_generator" in text
  assert "grid (91, 73, 1) rows = classes [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]" in text
  assert images == 1


@pytest.mark.parametrize("path", [NOTEBOOK, T2I_NOTEBOOK])
def test_install_cell_in_colab_installs_the_runtime_extra(path, monkeypatch):
  """In Colab the install cell pip-installs REPO (default: the checkout above the notebook's
  folder) with cuda12 on a GPU, tpu on a TPU and no extra on a CPU runtime."""
  source = _source(path, INSTALL)
  assert 'REPO = ""' in source
  monkeypatch.chdir(os.path.join(configs_util.ROOT, "notebooks"))
  root = configs_util.ROOT
  cases = [("", None, [], root), ("", "/usr/bin/nvidia-smi", [], f"{root}[cuda12]"),
           ("", None, ["/dev/accel0"], f"{root}[tpu]"),
           ("", None, ["/dev/vfio/0"], f"{root}[tpu]"),
           ("git+https://example.org/o/sid_jax", "/usr/bin/nvidia-smi", [],
            "sid_jax[cuda12] @ git+https://example.org/o/sid_jax"),
           ("git+https://example.org/o/sid_jax", None, [], "git+https://example.org/o/sid_jax")]
  for repo, nvidia_smi, accel, target in cases:
    which = lambda name, s=nvidia_smi: s if name == "nvidia-smi" else None
    with mock.patch.dict(sys.modules, _fake_colab()), mock.patch("shutil.which", which), \
        mock.patch("glob.glob", lambda pattern, a=accel: fnmatch.filter(a, pattern)), \
        mock.patch("subprocess.run") as run:
      exec(source.replace('REPO = ""', f"REPO = {repo!r}"), {})  # pylint: disable=exec-used
    run.assert_called_once_with([sys.executable, "-m", "pip", "install", "-q", target],
                                check=True)
  with mock.patch.dict(sys.modules, _fake_colab()), mock.patch("subprocess.run") as run, \
      pytest.raises(FileNotFoundError, match="REPO '/nonexistent': no setup.py"):
    exec(source.replace('REPO = ""', "REPO = '/nonexistent'"), {})  # pylint: disable=exec-used
  run.assert_not_called()


def test_runtime_cell_prints_devices_and_warns_when_an_accelerator_is_unused(capsys):
  """The runtime cell prints JAX's devices; on a GPU/TPU runtime (EXTRA set) whose JAX still runs
  on CPUs it says to restart the session."""
  for path in (NOTEBOOK, T2I_NOTEBOOK):
    for extra, warning in (("", None), ("cuda12", "GPU"), ("tpu", "TPU")):
      exec(_source(path, RUNTIME), {"EXTRA": extra})  # pylint: disable=exec-used
      out = capsys.readouterr().out
      assert f"devices: {jax.devices()}" in out
      assert ("WARNING" in out) == (warning is not None), (extra, out)
      if warning:
        assert f"this runtime has a {warning} but JAX sees only CPUs" in out


def _load_cells(path, uploads, colab=True, **params):
  """Runs the notebook's parameter and loading cells; returns their namespace."""
  source = _source(path, PARAMS)
  for name, value in params.items():
    line = next(l for l in source.splitlines() if l.startswith(f"{name} = "))
    source = source.replace(line, f"{name} = {value!r}")
  namespace = {"IN_COLAB": colab, "jax": jax}
  with mock.patch.dict(sys.modules, _fake_colab(uploads) if colab else {}):
    exec(source, namespace)  # pylint: disable=exec-used
    exec(_source(path, LOAD), namespace)  # pylint: disable=exec-used
  return namespace


def _zip_folder(folder, top):
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as z:
    for d, _, names in os.walk(folder):
      for n in names:
        full = os.path.join(d, n)
        z.write(full, os.path.join(top, os.path.relpath(full, folder)))
  return buf.getvalue()


def test_onestep_notebook_loads_an_uploaded_generator(tmp_path, monkeypatch):
  """UPLOAD in Colab: a .zip of a generator folder is unpacked and loaded; a file that is not an
  archive, or UPLOAD outside Colab, stops with one line."""
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  ns = _load_cells(NOTEBOOK, {"my_gen.zip": _zip_folder(DIGITS, "runs/x/generator")}, UPLOAD=True)
  assert ns["checkpoint"].startswith(str(tmp_path)), ns["checkpoint"]
  assert ns["checkpoint"].endswith(os.path.join("runs", "x", "generator"))
  reference = _load_cells(NOTEBOOK, {}, colab=False)
  assert reference["checkpoint"].endswith("digits_generator")
  assert ns["generator"].label_dim == reference["generator"].label_dim == 10
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(ns["generator"].params),
               jax.device_get(reference["generator"].params))
  with pytest.raises(ValueError, match="notes.txt: not a .zip or .tar"):
    _load_cells(NOTEBOOK, {"notes.txt": b"hello"}, UPLOAD=True)
  with pytest.raises(ValueError, match="UPLOAD works in Colab only"):
    _load_cells(NOTEBOOK, {}, colab=False, UPLOAD=True)


def test_text_to_image_notebook_samples_a_generator(tmp_path, monkeypatch):
  """notebooks/sample_text_to_image.ipynb on a tiny SD-shaped generator with 2 steps: each seed
  gives exactly the image `python -m sid_jax.sample --prompts ... --steps 2` writes for it."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from sid_jax import sample  # pylint: disable=g-import-not-at-top
  from sid_jax.models import stable_diffusion  # pylint: disable=g-import-not-at-top
  spec = stable_diffusion.tiny_spec()
  sd = stable_diffusion.build(spec, stable_diffusion.tiny_tokenizer_dir(spec))
  params = stable_diffusion.random_params(sd, 3)
  spec["kwargs"]["generator"] = {"init_timestep": 625}
  checkpoint = str(tmp_path / "generator")
  stable_diffusion.save(checkpoint, spec, params, stable_diffusion.tiny_tokenizer_dir(spec))

  # Colab's UPLOAD: the folder as a .tar.gz (contents at the top) loads as the same generator.
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  archive = shutil.make_archive(str(tmp_path / "gen"), "gztar", root_dir=checkpoint)
  with open(archive, "rb") as f:
    uploaded = _load_cells(T2I_NOTEBOOK, {"gen.tar.gz": f.read()}, UPLOAD=True)
  assert uploaded["generator"].init_timestep == 625 and len(uploaded["prompts"]) == 2
  with pytest.raises(ValueError, match="Set CHECKPOINT to a SiD-LSG generator folder."):
    _load_cells(T2I_NOTEBOOK, {}, colab=False)

  nb = nbformat.read(T2I_NOTEBOOK, as_version=4)
  params_cell = nb.cells[PARAMS]
  assert params_cell.source.startswith('CHECKPOINT = ""')
  params_cell.source = params_cell.source.replace('CHECKPOINT = ""',
                                                  f"CHECKPOINT = {checkpoint!r}")
  assert "STEPS = 1" in params_cell.source
  params_cell.source = params_cell.source.replace("STEPS = 1", "STEPS = 2")
  nb.cells.append(nbformat.v4.new_code_cell(
      f"np.save({str(tmp_path / 'pictures.npy')!r}, pictures)"))
  client = NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": configs_util.ROOT}})
  client.execute()
  texts, shown = [], 0
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      assert out.get("output_type") != "error", out
      texts.append(out.get("text", ""))
      shown += "image/png" in out.get("data", {})
  text = "".join(texts)
  assert "Loaded a Stable Diffusion generator (t_init = 625)" in text and shown == 1
  assert "images (2, 16, 16, 3) for seeds [0, 1], timesteps [625, 312]" in text

  prompts = ["a photo of a red fox in the snow", "an oil painting of a lighthouse at dusk"]
  prompt_file = tmp_path / "prompts.txt"
  prompt_file.write_text("\n".join(prompts) + "\n", encoding="utf-8")
  out = sample.run(outdir=str(tmp_path / "cli"), seeds="0-1", checkpoint=checkpoint,
                   prompts=str(prompt_file), steps=2)
  pictures = np.load(tmp_path / "pictures.npy")
  for seed in (0, 1):
    np.testing.assert_array_equal(
        pictures[seed], np.asarray(Image.open(os.path.join(out, f"{seed:06d}.png"))))
  # The second step matters: the one-step images differ.
  one_step = sample.run(outdir=str(tmp_path / "cli1"), seeds="0-1", checkpoint=checkpoint,
                        prompts=str(prompt_file))
  assert np.any(pictures[0] != np.asarray(Image.open(os.path.join(one_step, "000000.png"))))
