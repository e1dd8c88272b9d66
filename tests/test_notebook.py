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
