"""Shared fixtures: the real data folder (skipped when absent) and tiny synthetic image folders."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transferkit.recipes import default_data_root

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return default_data_root()  # $TRANSFERKIT_DATA, else shared/data beside the checkout


def onnx_usable() -> bool:
    """Whether onnx and onnxruntime can be used here, as transferkit judges it (`onnx_modules`):
    installed and importing (a broken install may raise a plain ImportError, which
    ``pytest.importorskip`` re-raises)."""
    from transferkit.export.onnx import onnx_modules

    return not isinstance(onnx_modules(), str)


def needs_onnx() -> None:
    """Skip the calling test, with transferkit's reason, unless `onnx_usable`."""
    from transferkit.export.onnx import onnx_modules

    found = onnx_modules()
    if isinstance(found, str):
        pytest.skip(f"needs onnx and onnxruntime, {found}", allow_module_level=True)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (or $TRANSFERKIT_DATA); skips the test when it is absent."""
    d = shared_data_dir()
    if not (d / "README.md").exists():
        pytest.skip(f"real data folder {d} not found (set TRANSFERKIT_DATA)")
    return d


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny test models: one thread is fastest, and immune to spin-waiting on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_image_folder(root: Path, classes=("dark", "light"), per_class: int = 12, size: int = 24, seed: int = 0) -> Path:
    """Two trivially separable classes: dark vs light images with noise; saved as PNG and JPEG."""
    rng = np.random.default_rng(seed)
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        base = 40 + ci * 170 // max(len(classes) - 1, 1)
        for i in range(per_class):
            arr = np.clip(base + rng.normal(0, 20, (size, size + 4 * (i % 3), 3)), 0, 255).astype(np.uint8)
            ext = "png" if i % 2 else "jpg"
            Image.fromarray(arr).save(root / c / f"{c}_{i}.{ext}")
    return root


def damaged_png_bytes() -> bytes:
    """A PNG whose header and IEND marker are intact but whose pixel data are not: it passes
    the quick scan and fails to decode (as a file damaged after the scan would)."""
    arr = np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    i = data.index(b"IDAT")
    data[i + 20:i + 40] = b"\0" * 20
    return bytes(data)


def damaged_png(path: Path) -> Path:
    """Write `damaged_png_bytes` to ``path``."""
    path.write_bytes(damaged_png_bytes())
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")
