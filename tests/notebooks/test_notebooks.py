"""Every notebook runs top to bottom on CPU, and its .ipynb is in sync with its .md twin."""

import pathlib

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[2] / "notebooks").glob("*.md"))


def _sources(nb):
  return [(c.cell_type, c.source.strip()) for c in nb.cells]


@pytest.mark.parametrize("md", NOTEBOOKS, ids=lambda p: p.stem)
def test_ipynb_in_sync_with_md(md):
  ipynb = md.with_suffix(".ipynb")
  assert ipynb.exists(), f"{ipynb.name} missing: run `jupytext --sync {md}`"
  assert _sources(jupytext.read(md)) == _sources(nbformat.read(ipynb, as_version=4)), (
      f"{ipynb.name} differs from {md.name}: run `jupytext --sync {md}`")


@pytest.mark.parametrize("md", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(md, tmp_path, monkeypatch):
  monkeypatch.setenv("CONDENSATE_NOTEBOOK_SMALL", "1")
  nb = jupytext.read(md)
  client = NotebookClient(nb, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": str(md.parent)}})
  client.execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
  assert images, "every notebook shows at least one plot"
