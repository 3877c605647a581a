"""A process killed while it saves never leaves a broken checkpoint or export behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from transferkit._io import atomic_write
from transferkit.errors import ExportError, WeightsError
from transferkit.train.checkpoint import load_checkpoint

WRITER = textwrap.dedent("""
    import sys, torch
    from transferkit.train.checkpoint import save_checkpoint
    path, i = sys.argv[1], 0
    model = torch.nn.Linear(512, 512)          # about 1 MB a checkpoint
    print("ready", flush=True)
    while True:                                # rewrite the same file until killed
        i += 1
        with torch.no_grad():
            model.weight.fill_(float(i))
        save_checkpoint(path, model=model, meta={"i": i})
""")


def test_killed_while_saving_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    seen = []
    for delay in (0.07, 0.31, 0.66):  # kill at several moments of the write loop
        proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if path.exists():  # the first kill may come before any save finished
            ckpt = load_checkpoint(path)
            value = ckpt["model"]["weight"][0, 0].item()
            assert ckpt["transferkit"]["i"] == value  # the file is one whole save, never a mix
            seen.append(value)
    assert seen, "no save completed in any run"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt.pt.")]
    assert len(leftovers) <= 3  # at most one orphaned temporary per kill, never the target itself


def test_a_failing_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"previous export")

    def broken(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        raise ExportError("parity check failed")

    with pytest.raises(ExportError):
        atomic_write(path, broken)
    assert path.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_truncated_checkpoint_gives_a_clear_error(tmp_path):
    from transferkit.train.checkpoint import save_checkpoint

    path = save_checkpoint(tmp_path / "c.pt", model=torch.nn.Linear(4, 2), meta={"x": 1})
    data = path.read_bytes()
    for cut in (len(data) // 2, 10, 0):
        path.write_bytes(data[:cut])
        with pytest.raises(WeightsError, match="c.pt"):
            load_checkpoint(path)
