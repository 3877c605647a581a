"""Full file systems: checkpoints, exports and feature-cache entries on a disk that fills.

A real small tmpfs is mounted where that is allowed (root on Linux); elsewhere those tests
skip and the unit tests below simulate the full disk (``shutil.disk_usage``, a writer that
raises ENOSPC). Writers that could kill the process (a memory map on a full disk: SIGBUS;
``torch.jit.save`` to a path: a C++ abort) run in a child process.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import transferkit as tk
from transferkit.errors import OutputError
from transferkit.checkpoints import load_checkpoint, save_checkpoint

FAST = dict(backbone="tk:small_cnn", weights=None, policy="finetune", epochs=1, batch_size=8, augment="none",
            verbose=False, num_workers=0, image_size=16, precision="fp32")


@pytest.fixture
def small_fs(tmp_path):
    """``make(size_kb, free_kb=None)``: a fresh tmpfs of ``size_kb`` mounted under tmp_path,
    filled so that about ``free_kb`` stay free. Skips where mounting is not allowed."""
    mounted: list[Path] = []

    def make(size_kb: int = 2048, free_kb: int | None = None) -> Path:
        if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root on Linux")
        d = tmp_path / f"fs{len(mounted)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(d)
        if free_kb is not None:
            with open(d / "filler", "wb") as f:
                f.write(b"\0" * max(shutil.disk_usage(d).free - free_kb * 1024, 0))
        return d

    yield make
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


@pytest.fixture
def no_training_loop(monkeypatch):
    """Fail the test if training starts: the error must come before."""
    import importlib

    importlib.import_module("transferkit.api")

    def trained(*a, **k):
        raise AssertionError("training started: the error came after work was spent")

    monkeypatch.setattr(sys.modules["transferkit.api"], "train", trained)


def _child(tmp_path: Path, code: str, *args: str) -> subprocess.CompletedProcess:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(code))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=tmp_path)


# -- checkpoints ---------------------------------------------------------------------------
def test_a_checkpoint_that_does_not_fit_is_refused_before_writing(small_fs):
    fs = small_fs(1024)
    big = torch.nn.Linear(1000, 1000)  # 4 MB of weights on a 1 MB disk
    with pytest.raises(OutputError, match=r"Not enough free space for the checkpoint .*needs about 3\.8 MB"):
        save_checkpoint(fs / "run.ckpt", model=big, meta={})
    assert not list(fs.iterdir())  # no temporary, no half file


def test_a_disk_that_fills_during_a_checkpoint_write_is_a_python_error(small_fs, monkeypatch):
    """The estimate passes (another writer fills the disk meanwhile): torch.save meets ENOSPC
    through a Python file object, so the error is OutputError naming the path, not a c10::Error."""
    import transferkit.checkpoints as ckpt_mod

    fs = small_fs(1024)
    small = torch.nn.Linear(10, 10)
    save_checkpoint(fs / "run.ckpt", model=small, meta={"epoch": 1})
    monkeypatch.setattr(ckpt_mod, "check_free_space", lambda *a, **k: None)
    big = torch.nn.Linear(600, 600)  # 1.4 MB
    with pytest.raises(OutputError) as info:
        save_checkpoint(fs / "run.ckpt", model=big, meta={"epoch": 2})
    msg = str(info.value)
    assert f"Cannot write the checkpoint '{fs / 'run.ckpt'}': no space left on the device" in msg
    assert "unexpected pos" not in msg and "enforce fail" not in msg
    assert load_checkpoint(fs / "run.ckpt")["transferkit"] == {"epoch": 1}  # the previous one is intact
    assert sorted(p.name for p in fs.iterdir()) == ["run.ckpt"]


def test_free_space_is_checked_with_the_state_size(tmp_path, monkeypatch):
    """Without mounting: disk_usage says 100 kB free; a 400 kB state is refused, a small one written."""
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 100_000, 100_000))
    with pytest.raises(OutputError, match="Not enough free space for the checkpoint"):
        save_checkpoint(tmp_path / "a.ckpt", model=torch.nn.Linear(300, 300), meta={})
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 0, 10**9))
    save_checkpoint(tmp_path / "a.ckpt", model=torch.nn.Linear(300, 300), meta={})
    assert load_checkpoint(tmp_path / "a.ckpt")["model"]["weight"].shape == (300, 300)


def test_python_writer_turns_a_short_write_into_enospc(tmp_path, monkeypatch):
    """A raw write that stops short (a full disk) is an OSError(ENOSPC), also inside torch.save."""
    from transferkit._io import python_writer

    real_open = open

    class Full:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, b):
            if self.written > 1000:
                return 0
            self.written += len(b)
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    import builtins

    monkeypatch.setattr(builtins, "open", lambda *a, **k: Full(real_open(*a, **k)))
    with pytest.raises(OSError) as info:
        with python_writer(tmp_path / "x.pt") as f:
            torch.save(torch.nn.Linear(100, 100).state_dict(), f)
    assert info.value.errno == errno.ENOSPC and not isinstance(info.value, RuntimeError)


# -- exports -------------------------------------------------------------------------------
def test_an_export_that_cannot_fit_is_refused_before_training(small_fs, image_folder, no_training_loop):
    fs = small_fs(1024, free_kb=300)
    with pytest.raises(OutputError, match=r"Not enough free space for the export '.*m\.pt' \(export\): it needs about"):
        tk.finetune(data=image_folder, export=fs / "m.pt", **FAST)
    assert sorted(p.name for p in fs.iterdir()) == ["filler"]


def test_a_checkpoint_whose_optimizer_state_cannot_fit_is_refused_before_training(small_fs, image_folder,
                                                                                  no_training_loop):
    """The check before training counted the weights alone: a disk with room for them, not for the
    optimizer's moments and the best epoch's copy, failed at the second epoch's checkpoint."""
    model = tk.build_model(tk.get_backbone("tk:small_cnn", weights=None), 2)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    fs = small_fs(2048, free_kb=(3 * weights) // 1024)  # the weights fit, with room; a checkpoint does not
    with pytest.raises(OutputError, match=r"Not enough free space for the checkpoint '.*run\.ckpt' \(checkpoint\)"):
        tk.finetune(data=image_folder, checkpoint=fs / "run.ckpt", **FAST)
    assert sorted(p.name for p in fs.iterdir()) == ["filler"]


@pytest.mark.parametrize("key", ["plots_dir", "cache_dir", "log_dir", "checkpoint"])
def test_an_output_on_a_full_disk_is_refused_before_anything_runs(small_fs, image_folder, key):
    fs = small_fs(256, free_kb=8)
    target = fs / ("run.ckpt" if key == "checkpoint" else "out")
    with pytest.raises(OutputError, match=f"' \\({key}\\) is on a full file system \\(8 kB free\\)"):
        tk.finetune(data=image_folder, **{**FAST, key: target})


def test_an_export_onto_a_disk_that_filled_keeps_the_weights_in_a_named_fallback(small_fs, image_folder, tmp_path,
                                                                                  monkeypatch):
    """The disk had room when the run started and is full when the export is written."""
    monkeypatch.setattr(sys.modules["transferkit.api"], "check_output_space", lambda *a, **k: None)
    fs = small_fs(1024, free_kb=300)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError) as info:
        tk.finetune(data=image_folder, export=fs / "m.pt", **FAST)
    err = info.value
    assert f"Could not write the export '{fs / 'm.pt'}' (export): Not enough free space" in str(err)
    assert err.fallback is not None and err.fallback.parent == tmp_path  # the full disk could not hold it
    assert f"The trained weights are saved in '{err.fallback}'" in str(err)
    assert load_checkpoint(err.fallback)["model"]
    assert sorted(p.name for p in fs.iterdir()) == ["filler"]


EXPORT_FULL = """
    import sys
    import transferkit.export.torchscript as ts
    import transferkit.api
    ts.check_free_space = lambda *a, **k: None  # the disk fills after the estimate: the write itself meets ENOSPC
    sys.modules["transferkit.api"].check_output_space = lambda *a, **k: None
    import transferkit as tk
    from transferkit.errors import OutputError
    try:
        tk.finetune("tk:small_cnn", data=sys.argv[1], export=sys.argv[2], weights=None, policy="finetune", epochs=1,
                    batch_size=8, augment="none", verbose=False, num_workers=0, image_size=16)
    except OutputError as exc:
        print("OutputError:", exc)
"""


def test_torchscript_save_to_a_full_disk_does_not_abort_the_process(small_fs, image_folder, tmp_path):
    """torch.jit.save to a path on a full disk aborts the process (c10::Error, exit 134): the
    export writes through a Python file object, so it is an OSError and the weights are kept."""
    fs = small_fs(1024, free_kb=200)
    r = _child(tmp_path, EXPORT_FULL, str(image_folder), str(fs / "m.pt"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"OutputError: Could not write the export '{fs / 'm.pt'}' (export): Cannot write the export" in r.stdout
    assert "no space left on the device" in r.stdout and "The trained weights are saved in" in r.stdout
    assert "terminate called" not in r.stderr and "unexpected pos" not in r.stdout


def test_transferkit_export_onto_a_full_disk_is_one_line(small_fs, image_folder, tmp_path, capsys):
    from transferkit.cli import main

    tk.finetune(data=image_folder, checkpoint=tmp_path / "c1.ckpt", **FAST)
    fs = small_fs(1024, free_kb=300)
    assert main(["export", str(tmp_path / "c1.ckpt"), "--out", str(fs / "m.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("transferkit: error: Not enough free space for the export")


# -- feature cache -------------------------------------------------------------------------
FEATURES_FULL = """
    import sys, warnings
    import torch
    import transferkit.train.features as F
    if sys.argv[2] == "race":
        F.check_free_space = lambda *a, **k: None  # the estimate passed; the disk filled afterwards
    ds = torch.utils.data.TensorDataset(torch.randn(64, 3), torch.arange(64) % 2)
    lin = torch.nn.Linear(3, 8192)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        store = F.compute_features(lin, ds, key="k", views=1, batch_size=16, device=torch.device("cpu"),
                                   num_workers=0, seed=0, cache_dir=sys.argv[1], forward=lin)
    print("shape", tuple(store.features.shape), "path", store.path)
    print("same", bool(torch.allclose(torch.from_numpy(store.features[0]), lin(ds.tensors[0]).detach())))
    print("warnings", [str(x.message) for x in w])
"""


@pytest.mark.parametrize("when", ["estimate", "race"])
def test_a_feature_cache_on_a_full_disk_is_not_a_bus_error(small_fs, tmp_path, when):
    """The 2 MB entry does not fit the 1 MB disk. Before: SIGBUS writing the memory map (exit
    135). Now: refused by the free-space estimate, or (the disk filled after it) by reserving
    the file's blocks first; the run goes on with its features in memory, with a warning."""
    fs = small_fs(1024)
    r = _child(tmp_path, FEATURES_FULL, str(fs / "cache"), when)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert "shape (1, 64, 8192) path None" in r.stdout and "same True" in r.stdout
    assert "feature-cache entry" in r.stdout and "kept in memory" in r.stdout
    if when == "estimate":  # refused before anything was written, with the sizes
        assert "it needs about 2.0 MB (2.2 MB with a margin) and 1.0 MB are free there" in r.stdout, r.stdout
    else:  # the blocks could not be reserved
        assert "(cache_dir): No space left on device" in r.stdout, r.stdout
    assert [p.name for p in (fs / "cache").iterdir()] == []  # no half entry, no temporary


def test_a_feature_cache_run_on_a_full_disk_is_a_clear_error(small_fs, image_folder, monkeypatch, tmp_path):
    """The run's feature store meets a cache disk that filled since the start: one clear error
    (not a Bus error), and the weights are not lost."""
    monkeypatch.setattr(sys.modules["transferkit.outputs"], "MIN_FREE", 0)  # the disk filled since the start
    monkeypatch.chdir(tmp_path)
    fs = small_fs(256, free_kb=8)
    with pytest.raises(OutputError, match="Not enough free space for the feature"):
        tk.finetune(data=image_folder, cache_dir=fs / "cache", **{**FAST, "policy": "feature_extraction"})


def test_a_cache_entry_replaced_by_a_folder_is_recomputed(tmp_path):
    import numpy as np

    from transferkit.train.features import compute_features

    ds = torch.utils.data.TensorDataset(torch.randn(6, 3), torch.arange(6) % 2)
    lin = torch.nn.Linear(3, 4)
    kw = dict(key="k", views=1, batch_size=4, device=torch.device("cpu"), num_workers=0, seed=0,
              cache_dir=tmp_path, forward=lin)
    first = compute_features(lin, ds, **kw)
    ref = np.array(first.features)
    del first
    (tmp_path / "k" / "features.npy").unlink()
    (tmp_path / "k" / "features.npy").mkdir()  # a folder where the array was
    with pytest.warns(UserWarning, match="is damaged .*features.npy"):
        again = compute_features(lin, ds, **kw)
    assert np.allclose(again.features, ref) and not again.reused


DECODE_FULL = """
    import collections, shutil, sys, warnings
    sys.path.insert(0, sys.argv[3])
    from pathlib import Path
    from tests.conftest import make_image_folder
    from transferkit.backbones import InputSpec
    from transferkit.data import prepare_data
    from transferkit.data.decoded import decoded_dataset, plan_decode

    bundle = prepare_data(make_image_folder(Path(sys.argv[2]), per_class=20, size=64), val_split=0)
    usage = collections.namedtuple("usage", "total used free")
    real = shutil.disk_usage
    shutil.disk_usage = lambda p: usage(10**12, 0, 10**12)  # the plan sees room; the disk is full when written
    spec = InputSpec(image_size=64)
    plan = plan_decode(bundle.train, spec, augment="standard", cache_dir=sys.argv[1])
    shutil.disk_usage = real
    print("plan", plan.mode)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds, used = decoded_dataset(bundle.train, spec, augment="standard", cache_dir=sys.argv[1], num_workers=0,
                                   plan=plan)
    x, y = ds[0]
    print("used", used.mode, tuple(x.shape))
    print("warnings", [str(m.message) for m in w])
"""


def test_decode_once_entries_on_a_disk_that_filled_decode_every_epoch(small_fs, tmp_path):
    fs = small_fs(256)
    r = _child(tmp_path, DECODE_FULL, str(fs / "cache"), str(tmp_path / "imgs"),
               str(Path(__file__).resolve().parents[1]))
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert "plan disk" in r.stdout and "used off (3, 64, 64)" in r.stdout
    assert "decoding every epoch instead" in r.stdout


@pytest.mark.parametrize("when", ["estimate", "write"])
def test_a_disk_filling_during_per_epoch_checkpoints(small_fs, image_folder, tmp_path, monkeypatch, when):
    """The first epoch's checkpoint fits, the second does not (the old file and the new one's
    temporary cannot both be there): one clear error, the last good checkpoint intact, and the
    weights of the epoch just trained kept in a named file elsewhere."""
    import transferkit.checkpoints as ckpt_mod

    if when == "write":  # the estimate passes; the write itself meets ENOSPC
        monkeypatch.setattr(ckpt_mod, "check_free_space", lambda *a, **k: None)
    monkeypatch.chdir(tmp_path)
    fs = small_fs(3584)
    ckpt = fs / "run.ckpt"
    with pytest.raises(OutputError) as info:
        tk.finetune(data=image_folder, checkpoint=ckpt, **{**FAST, "epochs": 3})
    msg = str(info.value)
    assert msg.startswith("Not enough free space for the checkpoint" if when == "estimate" else
                          f"Cannot write the checkpoint '{ckpt}': no space left on the device"), msg
    assert f"The checkpoint '{ckpt}' still holds the last epoch it completed" in msg and "transferkit.resume" in msg
    assert "unexpected pos" not in msg
    assert load_checkpoint(ckpt)["epoch"] == 1
    assert info.value.fallback.parent == tmp_path and load_checkpoint(info.value.fallback)["model"]
    assert sorted(p.name for p in fs.iterdir()) == ["run.ckpt"]  # no temporary, no lock left


def test_plots_on_a_full_disk_do_not_cost_the_export(small_fs, image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules["transferkit.outputs"], "MIN_FREE", 0)  # the disk filled since the start
    fs = small_fs(64, free_kb=4)
    with pytest.warns(UserWarning, match=r"The plots could not be written to .*\(plots_dir\)"):
        r = tk.finetune(data=image_folder, plots_dir=fs / "plots", export=tmp_path / "m.pt", **FAST)
    assert r.export_path.is_file() and tk.load(r.export_path).labels == ["dark", "light"]


def test_tensorboard_logs_that_cannot_be_written_do_not_stop_the_run(tmp_path):
    pytest.importorskip("tensorboard")
    from transferkit.train.reporting import TensorBoardLogger

    tb = TensorBoardLogger(tmp_path / "logs")

    class Full:
        def add_scalar(self, *a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")

        flush = close = add_scalar

    tb.writer = Full()
    with pytest.warns(UserWarning, match="TensorBoard logs can no longer be written .*No space left on device"):
        tb.log_epoch({"epoch": 1, "train_loss": 0.5})
    tb.log_epoch({"epoch": 2, "train_loss": 0.4})  # no second warning, no error
    tb.log_metrics({"val_acc": 1.0}, 2)
    tb.close()
