"""docs/notebook.ipynb runs in a real Jupyter kernel (nbclient + ipykernel), end to end on the
shared data, and shows in a notebook what the docs promise: a progress widget, the epochs as a
live table, results and pictures inline, predictions from the export."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from transferkit.recipes import default_data_root

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "docs" / "notebook.ipynb"
DATA = default_data_root().resolve()
WEIGHTS = DATA / "weights" / "efficientnet-lite0" / "tf_efficientnet_lite0_in1k.pth"

WIDGET = "application/vnd.jupyter.widget-view+json"


def _outputs(cell) -> list[dict]:
    return list(cell.get("outputs", []))


def _html(cell) -> str:
    return "".join(o.get("data", {}).get("text/html", "") for o in _outputs(cell))


def _text(cell) -> str:
    return "".join(o.get("text", "") if o["output_type"] == "stream" else o.get("data", {}).get("text/plain", "")
                   for o in _outputs(cell))


@pytest.mark.data
def test_the_notebook_runs_in_a_kernel_and_shows_results_inline(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient", reason="needs nbclient and ipykernel (pip install -e '.[dev]')")
    pytest.importorskip("ipykernel", reason="needs ipykernel (pip install -e '.[dev]')")
    import nbformat

    if not (DATA / "hymenoptera").is_dir() or not WEIGHTS.is_file():
        pytest.skip(f"needs the shared data in {DATA} (set TRANSFERKIT_DATA)")
    monkeypatch.setenv("TRANSFERKIT_DATA", str(DATA))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, when a cell fails

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not [o for c in code for o in _outputs(c) if o["output_type"] == "error"]
    train = next(c for c in code if "tk.finetune(" in c.source)
    assert any(WIDGET in o.get("data", {}) for o in _outputs(train)), "no progress widget (tqdm.auto)"
    table = _html(train)
    assert 'class="transferkit-epochs"' in table and table.count("<tr") == 1 + 4  # header + 4 epochs, one table
    assert "IProgress not found" not in _text(train)
    shown = next(c for c in code if c.source.strip() == "result")
    assert "FinetuneResult" in _html(shown) and "verified" in _html(shown)
    picture = next(c for c in code if "show_results" in c.source)
    assert any("image/png" in o.get("data", {}) for o in _outputs(picture))
    predicted = next(c for c in code if "predict(" in c.source)
    assert "bees" in _text(predicted)
    assert (tmp_path / "ants_bees.pt").is_file()
