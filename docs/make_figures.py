#!/usr/bin/env python
"""Make the figures of the docs site from one real run (``make docs-figures``).

The run is the one on docs/getting-started.md: `timm:tf_efficientnet_lite0` with the shared
ImageNet-1k weights, feature extraction on the ants-vs-bees data of the PyTorch tutorial
(``$TRANSFERKIT_DATA/hymenoptera``, default ``../shared/data``), finetune's defaults
otherwise. Before it, a short learning-rate range test on the same plan (features computed
once, in a temporary cache, and shared by both).

Writes into docs/figures/ (each PNG kept under 200 KB):

- ``lr_find.png``: ``transferkit.lr_find(..., plot=...)``
- ``training_curves.png``, ``confusion_matrix.png``, ``show_results.png``, ``top_losses.png``:
  what ``finetune(..., plots_dir=...)`` writes
- ``hymenoptera_run.txt``: the plan summary, the suggestion, the final metrics and
  ``result.most_confused()``, the numbers the pages quote.

About a minute on two CPU cores (feature extraction of 398 images at 224 px dominates).
"""

from __future__ import annotations

import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "figures"
MAX_BYTES = 200_000
MAX_WIDTH = 1100  # px: the page's text column is narrower; more only costs bytes


def data_root() -> Path:
    from transferkit.recipes import default_data_root

    root = default_data_root()
    if not (root / "hymenoptera" / "train").is_dir():
        sys.exit(f"make_figures: no hymenoptera data under {root} (set TRANSFERKIT_DATA to the shared data folder).")
    return root


def shrink_png(src: Path, dst: Path) -> int:
    """Copy ``src`` to ``dst`` as a PNG of at most ``MAX_WIDTH`` px and ``MAX_BYTES``: optimised,
    then with a 256-colour palette (plots lose nothing visible; photo grids are dithered)."""
    from PIL import Image

    im = Image.open(src).convert("RGB")
    if im.width > MAX_WIDTH:
        im = im.resize((MAX_WIDTH, round(im.height * MAX_WIDTH / im.width)), Image.LANCZOS)
    for attempt in (lambda i: i, lambda i: i.quantize(colors=256, method=Image.MEDIANCUT),
                    lambda i: i.resize((i.width * 3 // 4, i.height * 3 // 4), Image.LANCZOS).quantize(colors=128)):
        buf = io.BytesIO()
        attempt(im).save(buf, format="PNG", optimize=True)
        if buf.tell() < MAX_BYTES:
            break
    dst.write_bytes(buf.getvalue())
    return buf.tell()


def main() -> int:
    import transferkit as tk

    data = data_root()
    weights = data / "weights" / "efficientnet-lite0" / "tf_efficientnet_lite0_in1k.pth"
    run = dict(data=data / "hymenoptera", policy="feature_extraction", weights=weights)
    OUT.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        res = tk.lr_find("timm:tf_efficientnet_lite0", num_steps=60, plot=tmp / "lr_find.png",
                         cache_dir=tmp / "cache", verbose=False, **run)
        v = res.valley
        lines += [f"lr_find (feature extraction, num_steps=60): suggestion {res.suggestion:.2e}, "
                  f"descent {res.lrs[v.start]:.1e}..{res.lrs[v.end]:.1e}, notes {res.notes} "
                  f"({time.perf_counter() - t0:.0f} s)"]

        t0 = time.perf_counter()
        result = tk.finetune("timm:tf_efficientnet_lite0", plots_dir=tmp / "plots", cache_dir=tmp / "cache",
                             verbose=False, **run)
        seconds = time.perf_counter() - t0
        m = result.metrics
        lines += ["", "finetune(policy='feature_extraction'), defaults otherwise:", result.decisions.summary(), "",
                  f"repr: {result!r}",
                  f"best: {result.best}",
                  f"accuracy {m['accuracy']:.4f}, macro_f1 {m['macro_f1']:.4f}, "
                  f"confusion_matrix {m['confusion_matrix']}",
                  f"most_confused: {result.most_confused()}",
                  "history: " + ", ".join(f"{r['epoch']}: val_acc {r.get('val_acc', float('nan')):.3f}"
                                          for r in result.history),
                  f"wall time {seconds:.0f} s (features computed by lr_find, read from the cache)",
                  f"timings: { {k: round(t, 1) for k, t in result.timings.items()} }"]
        figures = {"lr_find.png": tmp / "lr_find.png"}
        figures.update({p.name: p for p in (tmp / "plots").glob("*.png")})
        for name, src in sorted(figures.items()):
            size = shrink_png(src, OUT / name)
            lines.append(f"figure {name}: {size // 1000} KB")
        shutil.rmtree(tmp / "cache", ignore_errors=True)
    text = "\n".join(lines) + "\n"
    (OUT / "hymenoptera_run.txt").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
