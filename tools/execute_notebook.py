"""Run docs/notebook.ipynb in a Jupyter kernel and save it with its outputs, for the docs site.

The site shows the notebook as it was saved (mkdocs-jupyter, ``execute: false``), so the saved
outputs are those of a real run: this script runs it (nbclient + ipykernel, needs the shared
data: ``TRANSFERKIT_DATA`` or ``../shared/data``), then keeps what a static page can show: the
progress widgets (live only in a running notebook) and their state are dropped, pictures are
shrunk to the page's width. ``tests/test_docs_notebook.py`` runs the notebook again and checks
what it shows in a live kernel.

    .venv/bin/python tools/execute_notebook.py            # rewrites docs/notebook.ipynb
"""

from __future__ import annotations

import base64
import io
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "docs" / "notebook.ipynb"
WIDGET = "application/vnd.jupyter.widget-view+json"
MAX_WIDTH = 760  # px: the docs' text column


def shrink_png(data: str) -> str:
    from PIL import Image

    im = Image.open(io.BytesIO(base64.b64decode(data)))
    if im.width > MAX_WIDTH:
        im = im.resize((MAX_WIDTH, round(im.height * MAX_WIDTH / im.width)), Image.LANCZOS)
    out = io.BytesIO()
    im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, format="PNG", optimize=True)
    return base64.b64encode(out.getvalue()).decode()


def main() -> None:
    import nbclient
    import nbformat

    from transferkit.recipes import default_data_root

    data = default_data_root().resolve()
    if not (data / "hymenoptera").is_dir():
        sys.exit(f"needs {data}/hymenoptera (set TRANSFERKIT_DATA)")
    os.environ["TRANSFERKIT_DATA"] = str(data)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    nb = nbformat.read(NOTEBOOK, as_version=4)
    with tempfile.TemporaryDirectory() as tmp:
        nbclient.NotebookClient(nb, timeout=1200, kernel_name="python3",
                                resources={"metadata": {"path": tmp}}).execute()
    nbformat.write(for_the_site(nb, data), NOTEBOOK)
    print(f"wrote {NOTEBOOK} ({NOTEBOOK.stat().st_size // 1024} KB)")


def for_the_site(nb, data: Path):
    """The executed notebook without widget views and state, with smaller pictures."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.outputs = [o for o in cell.outputs if WIDGET not in o.get("data", {})]
        for o in cell.outputs:
            if "image/png" in o.get("data", {}):
                o["data"]["image/png"] = shrink_png(o["data"]["image/png"])
            if o.output_type == "stream":  # the data folder as the reader's notebook would name it
                o["text"] = o["text"].replace(str(data), "../../shared/data")
        cell.metadata.pop("execution", None)
    nb.metadata.pop("widgets", None)
    return nb


if __name__ == "__main__":
    main()
