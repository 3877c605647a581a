"""A run's outputs: paths checked before training, the trained weights kept when a write
still fails at the end, one run per checkpoint path."""

from __future__ import annotations

import subprocess
import sys

import pytest

import transferkit as tk
import transferkit.api as api

KW = dict(weights=None, image_size=16, epochs=1, batch_size=4, device="cpu", num_workers=0, verbose=False)


def test_bad_output_paths_fail_before_training(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(api, "train", lambda *a, **k: pytest.fail("trained despite a bad output path"))
    (tmp_path / "a_file").write_text("x")
    cases = [({"export": tmp_path}, "export"), ({"checkpoint": tmp_path}, "checkpoint"),
             ({"plots_dir": tmp_path / "a_file"}, "plots_dir"), ({"export": tmp_path / "a_file" / "m.pt"}, "export"),
             ({"checkpoint": tmp_path / "a_file" / "c.pt"}, "is a file")]
    for kw, named in cases:
        with pytest.raises(tk.OutputError, match=named):
            tk.finetune("tk:small_cnn", data=image_folder, **kw, **KW)


def test_a_failed_export_keeps_the_trained_weights(image_folder, tmp_path, monkeypatch):
    import transferkit.steps as ts

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ts, "export_torchscript", disk_full)
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "out" / "model.pt"
    with pytest.raises(tk.OutputError) as info:
        tk.finetune("tk:small_cnn", data=image_folder, export=target, **KW)
    err = info.value
    assert str(target) in str(err) and "No space left" in str(err) and err.fallback.is_file()
    assert str(err.fallback) in str(err)
    bb = tk.get_backbone("tk:small_cnn", weights=err.fallback)  # the weights are usable
    assert bb.weights == str(err.fallback)


def test_a_second_run_on_the_same_checkpoint_is_refused(image_folder, tmp_path, monkeypatch):
    ckpt = tmp_path / "run.pt"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom transferkit.checkpoints import checkpoint_lock\n"
        f"with checkpoint_lock({str(ckpt)!r}):\n    print('held', flush=True)\n    time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with monkeypatch.context() as m, pytest.raises(tk.OutputError, match="checkpoint"):
            m.setattr(api, "train", lambda *a, **k: pytest.fail("trained while another run holds the checkpoint"))
            tk.finetune("tk:small_cnn", data=image_folder, checkpoint=ckpt, **KW)
    finally:
        holder.kill()
        holder.wait()
    assert tk.finetune("tk:small_cnn", data=image_folder, checkpoint=ckpt, **KW).checkpoint_path == ckpt
