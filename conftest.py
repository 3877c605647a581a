"""pytest configuration shared by the tests and the examples in the package's docstrings
(collected with ``--doctest-modules``): each docstring example runs in a temporary folder of
its own, with the environment restored after it, so that the files an example writes are its
own and no example depends on another having run."""

from __future__ import annotations

import importlib.util
import os
import tempfile

import pytest


@pytest.fixture(autouse=True)
def _docstring_example_folder(request, tmp_path, monkeypatch):
    if not isinstance(request.node, pytest.DoctestItem):
        yield
        return
    if "onnx" in request.node.name and importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("the example runs ONNX Runtime, which is not installed (pip install 'transferkit[onnx]')")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # tempfile.mkdtemp() in an example: here too
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
