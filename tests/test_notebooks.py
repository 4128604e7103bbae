"""Execute the example notebooks in small mode (``JAXRENDER_NB_SMALL=1``) with nbclient.

Skipped when nbformat / nbclient / ipykernel are not installed (``pip install
jaxrender[test]`` has them).
"""
from __future__ import annotations

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ["quickstart.ipynb"]


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, monkeypatch, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("JAXRENDER_NB_SMALL", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "cpu"))
    nb = nbformat.read(ROOT / "examples" / "notebooks" / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=int(os.environ.get("JAXRENDER_NB_TIMEOUT", "600")),
                                     kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {}) for o in outputs), \
        "the notebook should show pictures inline"
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "rotation error" in text
