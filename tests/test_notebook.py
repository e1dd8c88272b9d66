"""notebooks/sample_onestep.ipynb runs headless (no network) against the shipped generator."""

import os

import nbformat
from nbclient import NotebookClient

from tests import configs_util

NOTEBOOK = os.path.join(configs_util.ROOT, "notebooks", "sample_onestep.ipynb")


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
  assert "Loaded EDMPrecond generator" in text and "digits_generator" in text
  assert "grid (91, 73, 1) rows = classes [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]" in text
  assert images == 1


def test_text_to_image_notebook_samples_a_generator(tmp_path):
  """notebooks/sample_text_to_image.ipynb on a tiny SD-shaped generator with 2 steps: each seed
  gives exactly the image `python -m sid_jax.sample --prompts ... --steps 2` writes for it."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from sid_jax import sample  # pylint: disable=g-import-not-at-top
  from sid_jax.models import stable_diffusion  # pylint: disable=g-import-not-at-top
  spec = stable_diffusion.tiny_spec()
  sd = stable_diffusion.build(spec, stable_diffusion.tiny_tokenizer_dir(spec))
  params = stable_diffusion.random_params(sd, 3)
  spec["kwargs"]["generator"] = {"init_timestep": 625}
  checkpoint = str(tmp_path / "generator")
  stable_diffusion.save(checkpoint, spec, params, stable_diffusion.tiny_tokenizer_dir(spec))

  nb = nbformat.read(os.path.join(configs_util.ROOT, "notebooks", "sample_text_to_image.ipynb"),
                     as_version=4)
  params_cell = nb.cells[2]
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
