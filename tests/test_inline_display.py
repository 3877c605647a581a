"""What a notebook shows inline: plot methods return pictures (``_repr_png_``), a result and a
range test render themselves (``_repr_html_``, ``_repr_png_``); outside a notebook they stay
paths and plain objects."""

from __future__ import annotations

from pathlib import Path

import pytest

import transferkit as tk
from transferkit.train.reporting import Picture, plot_history

pytest.importorskip("matplotlib")
PNG = b"\x89PNG"


def test_a_plot_returns_a_path_that_draws_itself(tmp_path):
    out = plot_history([{"epoch": 1, "train_loss": 0.9}, {"epoch": 2, "train_loss": 0.5}], tmp_path / "c.png")
    assert isinstance(out, Path) and isinstance(out, Picture) and out == tmp_path / "c.png"
    assert out._repr_png_() == out.read_bytes() and out._repr_png_()[:4] == PNG
    out.unlink()
    assert out._repr_png_() is None  # a moved file: the notebook shows the path instead of failing


def test_a_result_and_a_range_test_render_in_a_notebook(image_folder, tmp_path):
    r = tk.finetune("tk:small_cnn", weights=None, data=image_folder, epochs=2, image_size=16, batch_size=8,
                    num_workers=0, verbose=False, export=tmp_path / "m.pt", precision="fp32")
    html = r._repr_html_()
    assert "tk:small_cnn" in html and "feature_extraction" in html and "verified" in html
    assert html.count('class="transferkit-epochs"') == 1 and html.count("<tr>") + html.count("<tr ") >= 2 + 2
    assert r.show_results(n=4, path=tmp_path / "s.png")._repr_png_()[:4] == PNG
    res = tk.lr_find("tk:small_cnn", weights=None, data=image_folder, image_size=16, batch_size=8, num_workers=0,
                     num_steps=10, verbose=False, precision="fp32")
    assert res._repr_png_()[:4] == PNG and res.plot_path is None  # drawn for the notebook, no file written
