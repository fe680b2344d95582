"""docs/logs_example.ipynb runs top to bottom (so it never rots) and saves its figure."""

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]


def test_logs_example_notebook_executes(tmp_path, monkeypatch):
    # The kernel is a subprocess: give it the source tree whether or not segreward is installed.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT / "src")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(ROOT / "docs" / "logs_example.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    png = tmp_path / "logs_example.png"
    assert png.stat().st_size > 10_000
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "0.6875" in text and "mean_gap" in text
