"""Output paths that collide, names too long for the file system, resume without a checkpoint,
settings that would be ignored: one clear error before any work, and nothing overwritten."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import transferkit as tk
import transferkit.train.loop as loop
from transferkit.errors import ConfigError, FileLockedError, OutputError
from transferkit.checkpoints import load_checkpoint, save_checkpoint

FAST = dict(backbone="tk:small_cnn", weights=None, policy="finetune", epochs=1, batch_size=8, augment="none",
            verbose=False, num_workers=0, image_size=16, precision="fp32")


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if the run gets as far as building the backbone: the error must come first."""
    import transferkit.api  # noqa: F401  (every module that builds a backbone is loaded)

    def built(*a, **k):
        raise AssertionError("the backbone was built: the error came after work was spent")

    monkeypatch.setattr(sys.modules["transferkit.facts"], "get_backbone", built)  # where the run builds it


def _bytes(p: Path) -> bytes:
    return p.read_bytes()


def test_export_and_checkpoint_on_one_file_are_refused(tmp_path, image_folder, no_training):
    with pytest.raises(ConfigError, match="export and checkpoint are the same file"):
        tk.finetune(data=image_folder, export=tmp_path / "same.pt", checkpoint=tmp_path / "same.pt", **FAST)
    with pytest.raises(ConfigError, match="same file"):  # spelled differently, still one file
        tk.finetune(data=image_folder, export=tmp_path / "same.pt", checkpoint=f"{tmp_path}/./x/../same.pt", **FAST)
    for name, fix in (("same.pt", "checkpoint='.*same.ckpt'"), ("same.ckpt", "export='.*same.pt'")):
        with pytest.raises(ConfigError, match=f"Give them two paths, e.g. {fix}"):  # never the path it already is
            tk.finetune(data=image_folder, export=tmp_path / name, checkpoint=tmp_path / name, **FAST)
    assert not list(tmp_path.glob("*same*"))


def test_the_exporters_called_directly_refuse_the_other_format_s_name(tmp_path):
    """export_torchscript(m, "m.onnx") wrote a TorchScript file under an ONNX name, which other
    tools go by; finetune and the command line refused it, the exporters did not."""
    from transferkit.export import export_onnx

    bb = tk.get_backbone("tk:small_cnn", weights=None)
    model, meta = tk.build_model(bb, 2), {"labels": ["a", "b"], "input_spec": bb.input_spec.to_dict()}
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with pytest.raises(ConfigError, match=r"m\.onnx' is where the TorchScript export goes, but its name ends in .onnx"):
        tk.export_torchscript(model, tmp_path / "m.onnx", example_inputs=images, metadata=meta)
    with pytest.raises(ConfigError, match=r"m\.pt' is where the ONNX export goes, but its name ends in .pt"):
        export_onnx(model, tmp_path / "m.pt", example_inputs=images, metadata=meta)
    assert not list(tmp_path.iterdir())


def test_a_torchscript_export_named_onnx_is_refused_before_training(tmp_path, image_folder, no_training):
    with pytest.raises(ConfigError, match=r"'.*model\.onnx' is where export \(the TorchScript file\) goes, but its "
                                          r"name ends in \.onnx"):
        tk.finetune(data=image_folder, export=tmp_path / "model.onnx", **FAST)
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize("out", ["checkpoint", "export"])
def test_the_pretrained_weights_file_is_never_overwritten(tmp_path, image_folder, no_training, out):
    w = tmp_path / "w.th"
    save_checkpoint(w, model=torch.nn.Linear(2, 2), meta={})
    before = _bytes(w)
    with pytest.raises(ConfigError, match=f"{out}='{w}' is the weights file the run reads"):
        tk.finetune(data=image_folder, **{**FAST, "weights": str(w), out: str(w)})
    assert _bytes(w) == before


def test_a_data_csv_is_never_overwritten(tmp_path, image_folder, no_training):
    csv = tmp_path / "train.csv"
    csv.write_text("".join(f"{p},{p.parent.name}\n" for p in sorted(image_folder.rglob("*.png"))))
    with pytest.raises(ConfigError, match="is the data file the run reads"):
        tk.finetune(data=csv, export=csv, **FAST)


def test_an_output_onto_a_file_of_the_data_folder_is_refused(tmp_path, image_folder, no_training):
    """export= naming one of the training images wrote a zip file over it; an export or a
    checkpoint of an earlier run inside the folder is replaced as before."""
    image = next(image_folder.rglob("*.png"))
    before = _bytes(image)
    for key in ("export", "checkpoint"):
        with pytest.raises(ConfigError, match=rf"{key}=.* is a file inside the data folder .* would replace it"):
            tk.finetune(data=image_folder, **{key: image}, **FAST)
    assert _bytes(image) == before


def test_result_export_onto_a_file_of_the_data_is_refused(tmp_path, image_folder):
    image = next(image_folder.rglob("*.png"))
    before = _bytes(image)
    r = tk.finetune(data=image_folder, **FAST)
    with pytest.raises(ConfigError, match=r"export=.* is a file inside the data folder"):
        r.export(image)
    assert _bytes(image) == before
    r.export(image_folder / "model.pt")  # a new file there: nothing of the data is replaced
    r.export(image_folder / "model.pt")  # nor by replacing that export


def test_plots_inside_the_data_folder_are_refused(tmp_path, image_folder, no_training):
    with pytest.raises(ConfigError, match="lies inside the data folder .*read as data"):
        tk.finetune(data=image_folder, plots_dir=image_folder / "plots", **FAST)


def test_an_export_name_too_long_for_the_temporary_is_refused_before_training(tmp_path, image_folder,
                                                                             no_training):
    long = tmp_path / ("m" * 235 + ".pt")  # 238 bytes: fits 255, but not with the temporary's suffix
    with pytest.raises(OutputError, match=r"has a file name of 238 bytes; this file system takes 255.*at most 202"):
        tk.finetune(data=image_folder, export=long, **FAST)
    with pytest.raises(OutputError, match="holds a name of 300 bytes"):
        tk.finetune(data=image_folder, plots_dir=tmp_path / ("p" * 300), **FAST)


def test_the_longest_accepted_name_is_written_and_so_are_its_fallbacks(tmp_path, image_folder, monkeypatch):
    """A 202-byte export name passes the check and is written; when its export fails, the
    fallback (a longer name) is shortened to fit, so the weights are still kept."""
    from transferkit.errors import ExportError

    name = "m" * 199 + ".pt"
    r = tk.finetune(data=image_folder, export=tmp_path / name, **FAST)
    assert r.export_path.name == name and r.export_path.is_file()

    def refuse(*a, **k):
        raise ExportError("parity check failed")

    monkeypatch.setattr(sys.modules["transferkit.steps"], "export_torchscript", refuse)
    with pytest.raises(ExportError, match="The trained weights are saved in") as info:
        tk.finetune(data=image_folder, export=tmp_path / ("n" * 199 + ".pt"), **FAST)
    fallback = info.value.fallback
    assert fallback.parent == tmp_path and len(fallback.name) <= 255 and load_checkpoint(fallback)["model"]


def test_resume_without_a_checkpoint_is_an_error_naming_the_path(tmp_path, image_folder, no_training):
    with pytest.raises(ConfigError, match=f"resume=True but the checkpoint '{tmp_path / 'typo.ckpt'}' does not exist"):
        tk.finetune(data=image_folder, checkpoint=tmp_path / "typo.ckpt", resume=True, **FAST)
    with pytest.raises(ConfigError, match="resume=True needs checkpoint="):
        tk.finetune(data=image_folder, resume=True, **FAST)
    assert not (tmp_path / "typo.ckpt").exists()


def test_work_that_no_other_file_holds_is_not_replaced_by_a_new_run(tmp_path, image_folder):
    """An unfinished run's checkpoint (forgotten --resume), an export given as the checkpoint, a
    checkpoint given as the export and a file transferkit did not write (it was replaced) are
    refused before training; an earlier export, a finished run's checkpoint and an empty file
    are replaced, as a run writing there again means to."""
    def stop(row):
        raise KeyboardInterrupt

    unfinished = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        tk.finetune(data=image_folder, **{**FAST, "epochs": 3}, checkpoint=unfinished, callbacks=[stop])
    done = tk.finetune(data=image_folder, **FAST, checkpoint=tmp_path / "done.ckpt", export=tmp_path / "m.pt")
    assert done.export_report is not None
    before = {p: _bytes(p) for p in (unfinished, tmp_path / "m.pt", tmp_path / "done.ckpt")}
    for kw, said in [({"checkpoint": unfinished}, r"holds an unfinished run \(epoch 1 of 3\): a new run would "
                                                   r"replace it. Continue it with resume=True"),
                     ({"checkpoint": tmp_path / "m.pt"}, "is an exported model: the run's checkpoints would "
                                                          "replace it"),
                     ({"export": unfinished}, r"is the checkpoint of an unfinished run \(epoch 1 of 3\)"),
                     ({"export": tmp_path / "done.ckpt"}, "is the checkpoint of a finished run")]:
        with pytest.raises(ConfigError, match=said):
            tk.finetune(data=image_folder, **FAST, **kw)
    assert all(_bytes(p) == b for p, b in before.items())
    damaged = tmp_path / "damaged.ckpt"  # the advice to resume is given where a resume can work
    data = bytearray(before[unfinished])
    data[len(data) // 2:len(data) // 2 + 16] = bytes(b ^ 0xFF for b in data[len(data) // 2:len(data) // 2 + 16])
    damaged.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"holds an unfinished run \(epoch 1 of 3\), and it cannot be resumed. The "
                                          r"checkpoint .* is corrupt: .* A new run would replace it: delete the file"):
        tk.finetune(data=image_folder, **FAST, checkpoint=damaged)
    notes = tmp_path / "notes.csv"
    notes.write_bytes(b"kept,1\n")
    for key in ("export", "checkpoint"):
        with pytest.raises(ConfigError, match=f"{key}=.*notes.csv' is an existing file that is not a TorchScript "
                                              f"export or a transferkit checkpoint .*Give the {key} another path, or "
                                              "remove the file first"):
            tk.finetune(data=image_folder, **FAST, **{key: notes})
    assert notes.read_bytes() == b"kept,1\n"
    (tmp_path / "empty.pt").write_bytes(b"")  # as mktemp makes it
    tk.finetune(data=image_folder, **FAST, checkpoint=tmp_path / "done.ckpt", export=tmp_path / "m.pt", seed=1)
    r = tk.finetune(data=image_folder, **FAST, export=tmp_path / "empty.pt")
    assert _bytes(tmp_path / "m.pt") != before[tmp_path / "m.pt"]  # an earlier export is replaced
    assert _bytes(tmp_path / "empty.pt")
    with pytest.raises(ConfigError, match="'.*notes.csv' is an existing file that is not a TorchScript export"):
        r.export(notes)  # the export functions refuse it as well
    with pytest.raises(ConfigError, match="'.*notes.csv' is an existing file that is not an ONNX file"):
        r.export(tmp_path / "m2.pt", onnx=notes)
    assert notes.read_bytes() == b"kept,1\n" and not (tmp_path / "m2.pt").exists()  # checked before either write


def test_exporting_an_unfinished_run_says_which_epoch_it_holds(tmp_path, image_folder):
    from transferkit.export import export_checkpoint

    def stop(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tk.finetune(data=image_folder, **{**FAST, "epochs": 3}, checkpoint=tmp_path / "run.ckpt", callbacks=[stop])
    with pytest.warns(UserWarning, match=r"holds an unfinished run \(epoch 2 of 3\): the export holds epoch 2's "
                                         r"weights.*Finish the run \(transferkit.resume"):
        export_checkpoint(tmp_path / "run.ckpt", tmp_path / "m.pt")
    tk.resume(tmp_path / "run.ckpt", verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a finished run's checkpoint exports without a word
        export_checkpoint(tmp_path / "run.ckpt", tmp_path / "m.pt")


def test_a_resume_refused_for_changed_data_says_what_the_digest_covers(tmp_path, image_folder):
    def stop(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tk.finetune(data=image_folder, **{**FAST, "epochs": 2}, checkpoint=tmp_path / "run.ckpt", callbacks=[stop])
    first = next(p for p in Path(image_folder).rglob("*") if p.is_file())
    first.chmod(0o600)  # the content is the same; its change time is not
    with pytest.raises(ConfigError, match=r"data: .*The data's digest covers each file's path .*modification and "
                                          r"change time \(a copy with cp -a or rsync -a, or a chmod"):
        tk.resume(tmp_path / "run.ckpt")
    with pytest.raises(ConfigError, match="The epochs cannot change: the learning-rate schedule was built for"):
        tk.resume(tmp_path / "run.ckpt", epochs=5)
    (tmp_path / "m.onnx").write_bytes(b"\x08\x08\x12\x07pytorch")  # how an ONNX file starts
    with pytest.raises(tk.WeightsError, match=r"is an exported model \(ONNX\), not a checkpoint"):
        tk.resume(tmp_path / "m.onnx")
    with pytest.raises(tk.ExportError, match="is a folder; give the exported file in it"):
        tk.load(tmp_path)


def test_tolerances_and_example_counts_are_checked_before_the_export(tmp_path, image_folder, monkeypatch):
    import transferkit.export.from_checkpoint as fc

    tk.finetune(data=image_folder, checkpoint=tmp_path / "c1.ckpt", **FAST)

    def built(*a, **k):
        raise AssertionError("the model was rebuilt before the arguments were checked")

    monkeypatch.setattr(fc, "model_from_checkpoint", built)
    for flags, expected in [(["--atol", "-1"], "atol=-1.0 is out of range"), (["--atol", "nan"], "atol=nan"),
                            (["--rtol", "inf"], "rtol=inf is out of range"),
                            (["--num-examples", "-5"], "num_examples=-5 is out of range"),
                            (["--num-examples", "0"], "num_examples=0")]:
        with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
            fc.export_checkpoint(tmp_path / "c1.ckpt", tmp_path / "x.pt",
                                 **{"atol": float(flags[1])} if flags[0] == "--atol" else
                                 {"rtol": float(flags[1])} if flags[0] == "--rtol" else
                                 {"num_examples": int(flags[1])})
    from transferkit.export import export_torchscript

    with pytest.raises(ConfigError, match="rtol=inf"):
        export_torchscript(torch.nn.Linear(2, 2), tmp_path / "y.pt", metadata={}, example_inputs=torch.zeros(2, 2),
                           rtol=float("inf"))


def test_cli_export_onto_its_own_checkpoint_is_refused(tmp_path, image_folder, capsys):
    from transferkit.cli import main

    tk.finetune(data=image_folder, checkpoint=tmp_path / "c1.pt", **FAST)
    before = _bytes(tmp_path / "c1.pt")
    assert main(["export", str(tmp_path / "c1.pt"), "--out", str(tmp_path / "c1.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is the checkpoint being exported: writing it would replace the checkpoint" in err[0]
    assert _bytes(tmp_path / "c1.pt") == before
    assert main(["export", str(tmp_path / "c1.pt"), "--out", str(tmp_path / "x.pt"), "--atol", "nan"]) == 2
    assert "--atol nan is out of range" in capsys.readouterr().err  # as typed


@pytest.mark.parametrize("setting", ["limit=2", "out_dir=/tmp/x", "download=true", "runs={a: {}}"])
def test_settings_finetune_would_ignore_are_refused(tmp_path, image_folder, capsys, setting):
    from transferkit.cli import main

    assert main(["finetune", "--data", str(image_folder), "--set", setting, "--backbone", "tk:small_cnn"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    key = setting.split("=")[0]
    assert len(err) == 1 and f"--set: {key} is read by the recipes" in err[0] and "would ignore it" in err[0]


def test_a_config_file_with_data_and_data_dir_is_refused(tmp_path, image_folder, capsys):
    from transferkit.cli import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"data_dir: {tmp_path / 'elsewhere'}\ndata: {image_folder}\nbackbone: tk:small_cnn\n")
    assert main(["finetune", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "both" in err and "data_dir=" in err and "Keep one" in err and len(err.strip().splitlines()) == 1
    cfg.write_text(f"limit: 2\ndata: {image_folder}\n")
    assert main(["finetune", "--config", str(cfg)]) == 2
    assert "limit is read by the recipes" in capsys.readouterr().err


HOLD_EXPORT = textwrap.dedent("""
    import sys, time
    from transferkit._io import file_lock
    with file_lock(sys.argv[1], what="export"):
        print("locked", flush=True)
        time.sleep(120)
""")


def test_two_runs_exporting_to_one_path_the_second_is_refused_before_training(tmp_path, image_folder,
                                                                             no_training):
    target = tmp_path / "m.pt"
    script = tmp_path / "holder.py"
    script.write_text(HOLD_EXPORT)
    proc = subprocess.Popen([sys.executable, str(script), str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(FileLockedError, match=f"The export '{target}' \\(export\\) is being written by process "
                                                  f"{proc.pid}"):
            tk.finetune(data=image_folder, export=target, **FAST)
        from tests.export_helpers import images, tiny_model

        from transferkit.export import export_torchscript

        model, bb = tiny_model(2)
        meta = {"labels": ["a", "b"], "input_spec": bb.input_spec.replace(image_size=16).to_dict()}
        with pytest.raises(FileLockedError):  # export_torchscript alone takes the lock too
            export_torchscript(model, target, metadata=meta, example_inputs=images(2, 16))
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert not target.exists()


def test_a_checkpoint_another_run_is_writing_is_refused_as_locked_not_as_unfinished(tmp_path, image_folder):
    def stop(row):
        raise KeyboardInterrupt

    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):  # an unfinished run's checkpoint, as a live run leaves it after an epoch
        tk.finetune(data=image_folder, **{**FAST, "epochs": 3}, checkpoint=ckpt, callbacks=[stop])
    script = tmp_path / "holder.py"
    script.write_text(HOLD_EXPORT)
    proc = subprocess.Popen([sys.executable, str(script), str(ckpt)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(FileLockedError, match=f"is being written by process {proc.pid}"):
            tk.finetune(data=image_folder, checkpoint=ckpt, **FAST)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    with pytest.raises(ConfigError, match="holds an unfinished run"):  # its writer gone: the advice to resume
        tk.finetune(data=image_folder, checkpoint=ckpt, **FAST)


KILLED_WITH_A_CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from transferkit._io import file_lock
    with file_lock(sys.argv[1], what="checkpoint"):
        r, w = os.pipe()
        if os.fork() == 0:  # a DataLoader worker: forked while the lock is held, it outlives its parent
            os.write(w, b"x")  # running (as a worker is long before its parent is killed)
            time.sleep(60)
            os._exit(0)
        os.read(r, 1)
        print("locked", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_lock_is_not_kept_by_the_forked_workers_of_a_killed_run(tmp_path):
    """A run killed with SIGKILL left DataLoader workers (orphaned for seconds) that had inherited
    its lock descriptor: the resume started at once was refused as locked by the dead process."""
    from transferkit._io import file_lock

    script = tmp_path / "killed.py"
    script.write_text(KILLED_WITH_A_CHILD)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "run.ckpt")], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert proc.wait(timeout=30) == -9
        with file_lock(tmp_path / "run.ckpt", what="checkpoint"):  # the child still runs
            pass
    finally:
        os.killpg(proc.pid, 9)  # the child, in the killed process's session


def test_ignored_runs_in_a_recipe_file_are_said(tmp_path, image_folder, capsys):
    from transferkit.cli import main

    cfg = tmp_path / "recipe.yaml"
    cfg.write_text("backbone: tk:small_cnn\nweights: null\nimage_size: 16\nepochs: 1\nverbose: false\n"
                   "runs:\n  a: {epochs: 3}\n")
    assert main(["finetune", "--config", str(cfg), "--data", str(image_folder), "--set", "num_workers=0",
                 "--set", "batch_size=8"]) == 0
    captured = capsys.readouterr()
    assert "the `runs` of this recipe file are not used" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["best"]


def test_plots_without_matplotlib_are_refused_before_any_work(tmp_path, image_folder, no_training, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as where the [plots] extra is not installed
    with pytest.raises(ConfigError, match=r"plots_dir draws plots, which need matplotlib: pip install "
                                          r"'transferkit\[plots\]'"):
        tk.finetune(data=image_folder, plots_dir=tmp_path / "plots", **FAST)
    with pytest.raises(ConfigError, match=r"plot draws plots, which need matplotlib"):
        tk.lr_find(data=image_folder, plot=tmp_path / "lr.png", **FAST)
    assert not (tmp_path / "plots").exists() and not (tmp_path / "lr.png").exists()


def test_a_run_that_stops_before_writing_leaves_no_folder_it_made_for_its_outputs(tmp_path, image_folder):
    """The folders of the export and checkpoint paths are made when the paths are locked, before
    the data are read: a run that stopped there (bad data, Ctrl-C) left them behind, empty."""
    out = tmp_path / "out"
    (out / "kept").mkdir(parents=True)
    (tmp_path / "empty" / "a").mkdir(parents=True)  # a class folder without images: an error after the locks
    with pytest.raises(tk.DataError, match="No images found"):
        tk.finetune(data=tmp_path / "empty", export=out / "runs" / "x" / "model.pt",
                    checkpoint=out / "kept" / "new" / "run.ckpt", **FAST)
    assert [p.name for p in out.iterdir()] == ["kept"] and not list((out / "kept").iterdir())
    r = tk.finetune(data=image_folder, export=out / "runs" / "x" / "model.pt", **FAST)  # written: kept
    assert r.export_path.is_file() and sorted(p.name for p in r.export_path.parent.iterdir()) == ["model.pt"]
    from transferkit._io import file_lock

    first, second = file_lock(out / "new" / "x" / "a.pt"), file_lock(out / "new" / "x" / "b.pt")
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # released out of order: the folder holds the other lock
    assert (out / "new" / "x").is_dir()
    second.__exit__(None, None, None)
    assert not (out / "new").exists()


def test_a_dry_run_beside_a_finished_checkpoint_creates_no_lock_file(tmp_path, image_folder, monkeypatch):
    import transferkit._io as io_

    ckpt = tmp_path / "out" / "run.ckpt"
    tk.finetune(data=image_folder, checkpoint=ckpt, **FAST)
    real_open = io_.os.open

    def no_create(path, flags, *a):  # as in a folder this user may read but not write
        if flags & os.O_CREAT and str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *a)

    monkeypatch.setattr(io_.os, "open", no_create)
    tk.plan(data=image_folder, checkpoint=ckpt, **FAST)  # it asks whether a run holds the checkpoint's lock


def test_evaluate_asked_for_a_confusion_matrix_without_matplotlib_says_so_before_predicting(tmp_path, image_folder,
                                                                                          monkeypatch, capsys):
    from transferkit.cli import main

    tk.finetune(data=image_folder, export=tmp_path / "m.pt", **FAST)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(tk.evaluation, "evaluate", lambda *a, **k: pytest.fail("the data were predicted first"))
    args = ["evaluate", str(tmp_path / "m.pt"), str(image_folder), "--confusion-matrix", str(tmp_path / "c.png")]
    assert main(args) == 2
    assert "--confusion-matrix draws plots, which need matplotlib" in capsys.readouterr().err


def test_ctrl_c_before_a_new_run_writes_its_checkpoint_does_not_call_an_old_finished_one_its_own(tmp_path,
                                                                                               image_folder,
                                                                                               monkeypatch):
    ckpt = tmp_path / "run.ckpt"
    tk.finetune(data=image_folder, checkpoint=ckpt, **FAST)  # a finished run: a new run may replace it
    before = ckpt.read_bytes()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train_one_epoch", interrupted)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(tk.TrainingInterrupted, match=r"Training had not started, so the weights .* none were saved "
                                                     r"\(the checkpoint '.*run.ckpt' was not written yet\)") as info:
        tk.finetune(data=image_folder, checkpoint=ckpt, **{**FAST, "lr": 0.01})  # before its first step
    assert info.value.checkpoint is None and ckpt.read_bytes() == before and "holds the last" not in str(info.value)


def test_a_path_starting_with_a_tilde_is_expanded_by_the_config_and_refused_as_a_new_folder(tmp_path, monkeypatch):
    """``finetune(cache_dir="~/fc", checkpoint="~/ck.pt")`` wrote into a folder named "~" in the
    working directory (``rm -rf ~`` removes the home folder), while the run recorded the home
    folder's path: the config (and resume, which reads what it wrote) expands "~" as a shell and
    a config file do, and an output path given elsewhere that would make a folder named "~" is
    refused, saying how to give it."""
    import transferkit as tk
    from transferkit._io import check_writable
    from transferkit.errors import OutputError, WeightsError
    from transferkit.export.from_checkpoint import export_checkpoint

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    cfg = tk.FinetuneConfig(backbone="tk:small_cnn", data="~/images", cache_dir=Path("~/fc"), checkpoint="~/ck.pt",
                            export="~/m.pt")
    assert (cfg.data, cfg.cache_dir, cfg.checkpoint, cfg.export) == \
        (str(home / "images"), home / "fc", str(home / "ck.pt"), str(home / "m.pt"))
    with pytest.raises(OutputError, match=r"starts with '~', which would be a new folder of that name in .*Python "
                                          r"does not expand '~'. Give the full path "
                                          r"\(os.path.expanduser\('~/m.pt'\)\)"):
        check_writable("~/m.pt", what="export")
    assert not (cwd / "~").exists()
    (cwd / "~").mkdir()  # a folder of that name that is there already is the user's
    assert check_writable("~/m.pt", what="export") == Path("~/m.pt")
    with pytest.raises(WeightsError, match=f"Checkpoint {re.escape(repr(str(home / 'none.pt')))} does not exist"):
        tk.resume("~/none.pt")  # read as finetune(checkpoint="~/none.pt") writes it
    with pytest.raises(WeightsError, match=f"Checkpoint {re.escape(repr(str(home / 'none.pt')))} does not exist"):
        export_checkpoint("~/none.pt", cwd / "m.pt")
    shards = tk.FinetuneConfig(backbone="tk:small_cnn", data=["~/a.tar", "~/b.tar"]).data
    assert shards == [str(home / "a.tar"), str(home / "b.tar")]
    assert tk.FinetuneConfig(backbone="tk:small_cnn", data=("~/a.tar",)).data == (str(home / "a.tar"),)
    assert check_writable("~backup/m.pt", what="export") == Path("~backup/m.pt")  # given as is: a folder of its own
