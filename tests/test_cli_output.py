"""What the command line prints: help without torch, a human summary on a terminal and JSON
when piped, --resume, predict --csv, evaluate, and hints written in the CLI's own syntax."""

from __future__ import annotations

import csv
import io
import shutil
import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.conftest import make_image_folder

import transferkit
from transferkit.cli import cli_spelling, main
from transferkit.spelling import recipe_spelling

REPO = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "tk:small_cnn", "--weights", "none", "--epochs", "2", "--image-size", "16",
        "--batch-size", "8", "--set", "num_workers=0"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``transferkit finetune ... --export --checkpoint`` through main(), stdout captured (not a terminal)."""
    root = tmp_path_factory.mktemp("cli_out")
    data = make_image_folder(root / "images", per_class=8, size=20)
    buf = io.StringIO()
    from contextlib import redirect_stdout

    with redirect_stdout(buf):
        code = main(["finetune", "--data", str(data), *TINY, "--export", str(root / "m.pt"),
                     "--checkpoint", str(root / "r.ckpt")])
    assert code == 0
    return root, data, buf.getvalue()


def test_help_never_imports_torch():
    """`transferkit --help` and every command's --help, in a fresh interpreter, load no torch."""
    code = ("import sys\nfrom transferkit.cli import main\n"
            "for argv in ([], ['finetune'], ['lr-find'], ['predict'], ['evaluate'], ['export'], ['inspect'],"
            " ['backbones'], ['demo']):\n"
            "    try:\n        main(argv + ['--help'])\n    except SystemExit as e:\n        assert e.code == 0\n"
            "import transferkit\nassert transferkit.__version__\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'numpy'))))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=_env(),
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    *helps, modules = proc.stdout.strip().splitlines()
    assert modules == "[]"
    assert "usage: transferkit evaluate" in proc.stdout and max(len(line) for line in helps) <= 100


def test_lazy_package_attributes_are_the_real_objects():
    from transferkit.api import finetune
    from transferkit.decisions import plan

    assert transferkit.finetune is finetune and transferkit.plan is plan
    assert set(transferkit.__all__) <= set(dir(transferkit))
    for name in transferkit.__all__:
        assert getattr(transferkit, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'finetun'"):
        transferkit.finetun  # noqa: B018


def test_piped_finetune_prints_json_alone(run):
    root, _, stdout = run
    record = json.loads(stdout)
    assert record["export"] == str(root / "m.pt") and record["checkpoint"] == str(root / "r.ckpt")
    assert record["export_check"]["max_abs_diff"] <= record["export_check"]["tolerance"]
    assert record["best"]["epoch"] in (1, 2)


def test_finetune_on_a_terminal_ends_with_a_summary(tmp_path):
    """A pseudo-terminal on stdout: no JSON, a few readable lines naming the best epoch, the
    export and its check; --json brings the JSON back."""
    data = make_image_folder(tmp_path / "images", per_class=6, size=20)
    argv = [sys.executable, "-m", "transferkit", "finetune", "--data", str(data), *TINY,
            "--export", str(tmp_path / "t.pt"), "--policy", "fine_tune"]
    outs = []
    for extra in ([], ["--json"]):
        master, slave = pty.openpty()
        proc = subprocess.Popen(argv + extra, stdout=slave, stderr=subprocess.PIPE, cwd=tmp_path, env=_env())
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=300) == 0, err
        os.close(master)
        outs.append((b"".join(chunks).decode().replace("\r\n", "\n"), err))
    text, err = outs[0]
    assert "{" not in text
    assert "best epoch" in text and f"export:     {tmp_path / 't.pt'} (verified after reloading" in text
    assert f"transferkit evaluate {tmp_path / 't.pt'}" in text
    assert "epoch   1/2" in err and "incl. features" in err  # the feature pass counted in epoch 1
    plan = err.split("\nepoch ")[0].splitlines()
    assert plan[0].startswith("plan:") and all(len(line) <= 100 for line in plan)
    assert json.loads(outs[1][0])["export"] == str(tmp_path / "t.pt") and json.loads(outs[1][0])["warnings"] == []


def test_resume_flag_continues_with_the_stored_settings(run, capsys, monkeypatch):
    root, data, _ = run
    # one command for every start of a job: started again once the run is complete, it has nothing to do (was: exit 2)
    code, out, err = _run(capsys, "finetune", "--checkpoint", root / "r.ckpt", "--resume")
    assert code == 0 and err == f"transferkit: {root / 'r.ckpt'} holds a complete run (2 epochs): nothing to " \
        f"resume. A new run can start from its trained backbone (--weights {root / 'r.ckpt'}; the head starts " \
        "anew).\n"
    assert json.loads(out) == {"complete": True, "checkpoint": str(root / "r.ckpt"), "epochs": 2,
                               "export": str(root / "m.pt"), "export_missing": False}  # piped: one JSON object
    config = root / "job.yaml"  # the same with a config file, as the docs' job command has it
    config.write_text(f"data: {data}\ncheckpoint: {root / 'r.ckpt'}\nresume: true\n")
    assert _run(capsys, "finetune", "--config", config, *TINY)[0] == 0
    code, _, err = _run(capsys, "finetune", "--checkpoint", root / "r.ckpt", "--resume", "--set", "epoch=3")
    assert code == 2 and "unknown key 'epoch'" in err  # the options are checked first
    from transferkit.checkpoints import save_checkpoint

    save_checkpoint(root / "weights.pt", model=torch.nn.Linear(2, 2), meta={"task": "multiclass"})  # no run in it
    code, _, err = _run(capsys, "finetune", "--checkpoint", root / "weights.pt", "--resume")
    assert code == 2 and "has no stored configuration" in err, err  # not taken for a complete run
    (root / "m.pt").rename(root / "kept.pt")  # the run stopped while exporting
    try:
        code, _, err = _run(capsys, "finetune", "--checkpoint", root / "r.ckpt", "--resume")
    finally:
        (root / "kept.pt").rename(root / "m.pt")
    assert code == 1 and f"its export {root / 'm.pt'} is missing (the run stopped while exporting); make it with " \
        f"`transferkit export {root / 'r.ckpt'} --out {root / 'm.pt'}`" in err
    # settings that would not be used, and an export that would not be written, are not a success (was: exit 0)
    code, _, err = _run(capsys, "finetune", "--checkpoint", root / "r.ckpt", "--resume", "--epochs", "5")
    assert code == 2 and "holds a complete run, of other settings than those given (epochs 2 -> 5): none of them " \
        "would be used" in err, err
    code, out, err = _run(capsys, "finetune", "--checkpoint", root / "r.ckpt", "--resume", "--export", root / "new.pt")
    assert code == 1 and f"--export {root / 'new.pt'} is not written (the run is complete; its export is " \
        f"{root / 'm.pt'}); make it with `transferkit export {root / 'r.ckpt'} --out {root / 'new.pt'}`" in err, err
    assert json.loads(out)["export_not_written"] == str(root / "new.pt") and not (root / "new.pt").exists()
    assert _run(capsys, "finetune", "--checkpoint", root / "r.ckpt", "--resume", "--export", root / "m.pt",
                *TINY)[0] == 0  # the run's own settings given again (a job's command): as before
    from transferkit.checkpoints import run_in

    decided = run_in(root / "r.ckpt")["decisions"]["channels_last"]  # "auto" stored, given as decided: the same run
    monkeypatch.setenv("HOME", str(root))
    assert _run(capsys, "finetune", "--checkpoint", root / "r.ckpt", "--resume", "--set",
                f"channels_last={str(decided).lower()}", "--set", "export=~/m.pt")[0] == 0
    with pytest.raises(transferkit.ConfigError, match="the run it holds is complete"):  # in Python: an error
        transferkit.resume(root / "r.ckpt")
    code, _, err = _run(capsys, "finetune", "--resume", "--data", data)
    assert code == 2 and "--resume continues the run saved in --checkpoint PATH" in err


def test_a_dry_run_of_a_resume_plans_the_run_with_the_stored_settings(run, capsys, tmp_path, monkeypatch):
    """`--checkpoint PATH --resume --dry-run` plans what the resume would run: the checkpoint's
    settings (no --data needed), the flags and --set replacing some."""
    root, data, _ = run
    monkeypatch.chdir(tmp_path)  # the stored paths are absolute: any folder resumes the run
    code, out, err = _run(capsys, "finetune", "--checkpoint", root / "r.ckpt", "--resume", "--dry-run", "--json",
                          "--set", "top_k=1")
    assert code == 0, err
    config = json.loads(out)["decisions"]["config"]
    assert config["checkpoint"] == str(root / "r.ckpt") and config["resume"] is True
    assert config["data"] == str(data) and config["epochs"] == 2 and config["image_size"] == 16
    assert config["export"] == str(root / "m.pt") and config["top_k"] == 1
    assert not list(tmp_path.iterdir())
    # the plan says what it resumes (it read like a fresh run's: 'random init', no epoch)
    assert json.loads(out)["notes"][0] == f"{root / 'r.ckpt'} holds a complete run (2 epochs): a run would have " \
        "nothing to resume"

    class Stop(Exception):
        pass

    def stop(row):
        if row["epoch"] == 1:
            raise Stop
    with pytest.raises(Stop):
        transferkit.finetune("tk:small_cnn", weights=None, data=data, epochs=2, image_size=16, batch_size=8,
                             num_workers=0, verbose=False, checkpoint=tmp_path / "half.ckpt", callbacks=[stop])
    code, out, err = _run(capsys, "finetune", "--checkpoint", tmp_path / "half.ckpt", "--resume", "--dry-run")
    assert code == 0 and json.loads(out)["notes"][0] == f"resumes {tmp_path / 'half.ckpt'} after its epoch 1, with " \
        "its weights and training state"
    code, _, err = _run(capsys, "finetune", "--checkpoint", root / "r.ckpt", "--resume", "--dry-run",
                        "--set", "epoch=3")
    assert code == 2 and "unknown key 'epoch'. Did you mean 'epochs'?" in err
    code, _, err = _run(capsys, "finetune", "--checkpoint", root / "r.ckpt", "--resume", "--dry-run",
                        "--set", "checkpoint=other.ckpt")
    assert code == 0, err  # as the resume: the run continues in the checkpoint it was given


def test_resume_flag_starts_a_run_whose_checkpoint_does_not_exist_yet(tmp_path, capsys):
    """One command for every start of a job that may be preempted (docs/cli.md); the Python
    API refuses resume=True without the checkpoint (a typo would silently start over)."""
    data = make_image_folder(tmp_path / "images", per_class=6, size=20)
    ckpt = tmp_path / "new.ckpt"
    (tmp_path / "cfg.yaml").write_text(f"data: {data}\ncheckpoint: {tmp_path / 'cfg.ckpt'}\n")
    for argv in (["--data", data, "--checkpoint", ckpt], ["--config", tmp_path / "cfg.yaml"]):
        code, out, err = _run(capsys, "finetune", *argv, *TINY, "--resume")
        assert code == 0, err
        assert "does not exist yet; a new run starts and saves it there" in err and "epoch   1/2" in err
    assert ckpt.is_file() and (tmp_path / "cfg.ckpt").is_file()
    with pytest.raises(transferkit.ConfigError, match="does not exist: nothing to resume"):
        transferkit.finetune("tk:small_cnn", weights=None, data=data, checkpoint=tmp_path / "typo.ckpt", resume=True)
    code, _, err = _run(capsys, "finetune", "--checkpoint", tmp_path / "typo.ckpt", "--resume")  # no --data
    assert code == 2 and "typo.ckpt does not exist, so there is nothing to resume, and a new run needs --data" in err


def test_a_run_resumed_from_another_folder_reads_and_writes_where_it_ran(tmp_path, capsys, monkeypatch):
    """Relative paths of the run (data, export, plots) are recorded absolute: resumed from
    another folder, the run neither reads that folder's data nor writes over its files."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    make_image_folder(Path("images"), per_class=6, size=20)

    def stop(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        transferkit.finetune("tk:small_cnn", weights=None, data="images", epochs=2, image_size=16, batch_size=8,
                             num_workers=0, checkpoint="run.ckpt", export="model.pt", callbacks=[stop])
    monkeypatch.chdir(tmp_path / "b")
    (tmp_path / "b" / "model.pt").write_text("precious")
    capsys.readouterr()
    code, out, err = _run(capsys, "finetune", "--checkpoint", tmp_path / "a" / "run.ckpt", "--resume")
    assert code == 0, err
    assert (tmp_path / "b" / "model.pt").read_text() == "precious" and (tmp_path / "a" / "model.pt").is_file()
    assert json.loads(out)["export"] == str(tmp_path / "a" / "model.pt")


def test_resume_flag_after_an_interrupted_run(tmp_path, capsys):
    data = make_image_folder(tmp_path / "images", per_class=6, size=20)
    ckpt = tmp_path / "r.ckpt"

    def stop(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # started from Python, quiet: the command's resume is not
        transferkit.finetune("tk:small_cnn", weights=None, data=str(data), epochs=2, image_size=16, batch_size=8,
                             num_workers=0, checkpoint=ckpt, callbacks=[stop], verbose=False)
    capsys.readouterr()
    code, out, err = _run(capsys, "finetune", "--checkpoint", ckpt, "--resume")
    assert code == 0, err
    assert len(json.loads(out)["metrics"]) and "epoch   2/2" in err and "epoch   1/2" not in err
    metrics = json.loads(out)["metrics"]  # all of them, as `evaluate --json` gives: per class, the confusion matrix
    assert set(metrics["per_class"]) >= {"dark", "light", "macro avg"}
    assert torch.tensor(metrics["confusion_matrix"]).sum() == metrics["per_class"]["macro avg"]["support"] > 0


def test_hints_use_the_cli_syntax():
    complete = cli_spelling("Cannot resume from 'r.pt': the run it holds is complete (2 epochs); to train further "
                            "start a new run from its weights: finetune(..., weights='r.pt').")
    assert complete.endswith("`transferkit finetune ... --weights r.pt`.")
    assert cli_spelling("continue exactly with transferkit.resume('r.pt').") == \
        "continue exactly with `transferkit finetune --checkpoint r.pt --resume`."
    assert cli_spelling("Pass checkpoint=... to finetune() to be able to resume") == \
        "Pass --checkpoint ... to `transferkit finetune` to be able to resume"
    assert cli_spelling("call finetune(..., checkpoint=path, resume=True).") == \
        "call `transferkit finetune ... --checkpoint path --resume`."
    assert cli_spelling("Export it first: `transferkit export r.ckpt --out model.pt` (in Python: "
                        "transferkit.export.export_checkpoint('r.ckpt', 'model.pt')), then load model.pt.") == \
        "Export it first: `transferkit export r.ckpt --out model.pt`, then load model.pt."
    assert cli_spelling("export it: `transferkit export 'a(1)/x.ckpt' --out m.pt` (in Python: "
                        "transferkit.export.export_checkpoint('a(1)/x.ckpt', 'm.pt')), or start from it.") == \
        "export it: `transferkit export 'a(1)/x.ckpt' --out m.pt`, or start from it."  # a path's own parentheses
    assert cli_spelling("predict with it: `transferkit predict m.pt IMAGES` (in Python: "
                        "transferkit.load('m.pt').predict(...)).") == \
        "predict with it: `transferkit predict m.pt IMAGES`."
    assert cli_spelling("lr_find needs 0 < start_lr < end_lr, got start_lr=1.0.") == \
        "lr_find needs 0 < start_lr < end_lr, got --start-lr 1.0."
    assert cli_spelling("lr_find(): label_smoothing applies to task='multiclass' only") == \
        "label_smoothing applies to --task multiclass only"
    assert cli_spelling("use head_hidden=[256] or `lr=1` as is") == "use --set head_hidden='[256]' or `lr=1` as is"
    assert cli_spelling("continue with transferkit.resume('out/ck ü.pt') or weights='my w.pt'") == \
        "continue with `transferkit finetune --checkpoint 'out/ck ü.pt' --resume` or --weights 'my w.pt'"
    assert cli_spelling("overrides: head_hidden=[1, -2] is out of range; expected a list") == \
        "overrides: --set head_hidden='[1, -2]' is out of range; expected a list"
    assert cli_spelling("backbone_options={'weights_only': False, 'name': 'café'}, or lr=(1, 2).") == \
        "--set backbone_options='{\"weights_only\": false, \"name\": \"café\"}', or --lr '(1, 2)'."  # JSON
    assert cli_spelling("class_weights={0: 2.0}.") == "--set class_weights='{0: 2.0}'."  # not JSON: as written
    # a path or a list of options holding key=value is no setting (`runs/--lr 0.1/m.pt` was printed)
    for path in ("runs/lr=0.1/m.pt", "C:\\runs\\lr=0.1\\m.pt", "outputs/epochs=5,seed=1/m.pt", "lr=0.1/m.pt",
                 "~/runs:lr=0.1/m.pt", "runs/lr=0.1+epochs=2/m.pt", "runs/lr=0.1;epochs=2/m.pt"):
        assert cli_spelling(f"export:     {path} (verified)") == f"export:     {path} (verified)"
    # a colon before a space ends a value, as a sentence's period does; one inside a value does not
    assert cli_spelling("trial (compile='auto': tried ...), backbone=timm:vit_tiny: with") == \
        "trial (--set compile=auto: tried ...), --backbone timm:vit_tiny: with"


def test_a_recipe_s_hints_use_its_own_flags():
    """A recipe script is typed with its flags (--weights, --epochs, ...) and --set for the rest,
    never as the Python call or as `transferkit finetune`'s flags."""
    prog = "recipes/fsdd.py"
    assert recipe_spelling("Pass checkpoint=... to finetune() to be able to resume a run exactly.", prog) == \
        "Pass --set checkpoint=... to `python recipes/fsdd.py` to be able to resume a run exactly."
    assert recipe_spelling("continue exactly with transferkit.resume('runs/a b.pt').", prog) == \
        "continue exactly with `python recipes/fsdd.py ... --set resume=true`."  # the same command: same checkpoint
    assert recipe_spelling("Pass checkpoint=... to finetune(); or data='x'.", prog, run="full") == \
        "Pass --run full --set checkpoint=... to `python recipes/fsdd.py`; or data='x'."  # data: the recipe's own
    assert recipe_spelling("start a new run from its weights: finetune(..., weights='r.pt', batch_size=8).", prog) == \
        "start a new run from its weights: `python recipes/fsdd.py ... --weights r.pt --set batch_size=8`."
    assert recipe_spelling("recipe: head_hidden=[8, -2] is out of range; epochs=0 too, limit=0 too", prog) == \
        "recipe: --set head_hidden='[8, -2]' is out of range; --epochs 0 too, --limit 0 too"
    # in a command, a value the config file sets is left to the file (its `key: value (file)` is no shell word)
    written = {"backbone": ("recipes/fsdd.yaml", "spec:tk:small_cnn")}
    assert recipe_spelling("start anew: finetune(..., backbone='spec:tk:small_cnn', weights='c.pt'), as backbone="
                           "'spec:tk:small_cnn' says.", prog, written_in=written) == \
        "start anew: `python recipes/fsdd.py ... --weights c.pt`, as backbone: spec:tk:small_cnn " \
        "(recipes/fsdd.yaml) says."


def test_predict_goes_on_past_a_folder_without_inputs(run, capsys, tmp_path, monkeypatch):
    root, data, _ = run
    image = sorted(str(p) for p in data.rglob("*.jpg"))[0]
    (tmp_path / "empty").mkdir()
    code, out, err = _run(capsys, "predict", root / "m.pt", image, tmp_path / "empty")
    assert code == 1 and out.startswith(f"{image}\t")
    assert f"warning: {tmp_path / 'empty'}: No image files under" in err and "1 of 2 inputs could not" in err
    code, _, err = _run(capsys, "predict", root / "m.pt", tmp_path / "empty")
    assert code == 2 and "No image files under" in err
    odd = tmp_path / "new\nline\tcat.jpg"  # one line and two columns per input, whatever the file's name
    shutil.copy(image, odd)
    code, out, err = _run(capsys, "predict", root / "m.pt", odd, tmp_path / "nothing\n.jpg")
    lines = out.splitlines()
    assert code == 1 and len(lines) == 2 and [len(line.split("\t")) for line in lines] == [2, 2]
    assert lines[0].startswith(str(tmp_path / "new\\nline\\tcat.jpg") + "\t")
    assert len(err.splitlines()) == 2 and "nothing\\n.jpg" in err
    # on a terminal each failure's line is on the screen already: it is not said again on stderr
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    code, out, err = _run(capsys, "predict", root / "m.pt", odd, tmp_path / "nothing\n.jpg", tmp_path / "empty")
    assert code == 1 and "nothing\\n.jpg\terror: " in out and "nothing" not in err
    assert f"warning: {tmp_path / 'empty'}: No image files under" in err  # no line of its own: said here
    assert "2 of 3 inputs could not be predicted" in err
    # a pattern the shell did not expand (quoted) stands for the files it matches; one that matches none is said
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    pattern = str(data / "*" / "*.jpg")
    code, out, err = _run(capsys, "predict", root / "m.pt", pattern, str(tmp_path / "none-*.png"))
    assert code == 1 and [line.split("\t")[0] for line in out.splitlines()] == sorted(
        str(p) for p in data.glob("*/*.jpg"))
    assert f"{tmp_path / 'none-*.png'}: no file matches" in err
    code, _, err = _run(capsys, "predict", root / "m.pt", str(tmp_path / "none-*.png"))
    assert code == 2 and "No file matches the pattern" in err


def test_predict_csv(run, capsys):
    root, data, _ = run
    files = sorted(str(p) for p in data.rglob("*.jpg"))[:3]
    code, out, _ = _run(capsys, "predict", root / "m.pt", *files, "--csv", "--top-k", "2")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    want = transferkit.load(root / "m.pt").predict(files, top_k=2)
    assert [r["path"] for r in rows] == files
    assert [r["label"] for r in rows] == [w.label for w in want]
    assert [float(r["probability"]) for r in rows] == pytest.approx([w.probability for w in want], abs=1e-6)
    assert [r["label_2"] for r in rows] == [w.top_k[1][0] for w in want] and all(r["error"] == "" for r in rows)
    broken = root / "broken.jpg"
    broken.write_bytes(b"not an image")
    code, out, _ = _run(capsys, "predict", root / "m.pt", files[0], broken, "--csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 1 and rows[1]["label"] == "" and "broken.jpg" in rows[1]["error"]


def test_evaluate_folder_and_csv(run, capsys, tmp_path, monkeypatch):
    root, data, _ = run
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(capsys, "evaluate", root / "m.pt", data, "--worst", "3")
    assert code == 0, err
    res = json.loads(out)  # not a terminal: JSON
    ev = transferkit.evaluate(root / "m.pt", data)
    assert res["files"] == 16 and res["accuracy"] == pytest.approx(ev.accuracy)
    assert sum(map(sum, res["confusion_matrix"])) == 16 and set(res["per_class"]) >= {"dark", "light", "macro avg"}
    assert len(res["worst"]) == 3 and res["worst"][0]["loss"] >= res["worst"][-1]["loss"]
    assert Path(res["confusion_matrix_png"]).read_bytes()[:4] == b"\x89PNG"
    listing = tmp_path / "labels.csv"
    files = sorted(data.rglob("*.*"))
    listing.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in files[:5]))
    code, out, err = _run(capsys, "evaluate", root / "m.pt", listing, "--json", "--confusion-matrix", "cm.png")
    assert code == 0 and json.loads(out)["files"] == 5 and (tmp_path / "cm.png").exists()
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    listing.write_text(listing.read_text() + f"{tmp_path / 'broken.jpg'},dark\n")
    code, out, err = _run(capsys, "evaluate", root / "m.pt", listing)
    res = json.loads(out)
    assert code == 1 and res["files"] == 5 and [f["file"] for f in res["failed"]] == [str(tmp_path / "broken.jpg")]
    assert "1 of 6 files could not be predicted" in err
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    code, out, _ = _run(capsys, "evaluate", root / "m.pt", data)
    assert code == 0 and out.startswith("accuracy ") and "macro avg" in out and "worst" in out
    code, _, err = _run(capsys, "evaluate", root / "m.pt", tmp_path / "nothing")
    assert code == 2 and "The data to score" in err and "do not exist" in err
    (tmp_path / "notes.json").write_text("{}")
    code, _, err = _run(capsys, "evaluate", root / "m.pt", tmp_path / "notes.json")
    assert code == 2 and "neither a folder" in err
    # the default picture cannot be written here: the scores still come, with the reason on stderr
    (tmp_path / "confusion_matrix.png").unlink()
    (tmp_path / "confusion_matrix.png").mkdir()
    code, out, err = _run(capsys, "evaluate", root / "m.pt", data)
    assert code == 0 and out.startswith("accuracy ") and "confusion matrix: not drawn (" in out
    assert "warning: the confusion matrix was not drawn" in err and "--confusion-matrix a writable path" in err
    code, _, err = _run(capsys, "evaluate", root / "m.pt", data, "--confusion-matrix", "confusion_matrix.png")
    assert code == 2  # a path that was asked for is an error


@pytest.mark.parametrize("argv, said", [
    (["finetune", "--data", "x", "--polcy", "full"],
     "transferkit finetune: error: unrecognized arguments: --polcy full. Did you mean '--policy'?"),
    (["finetune", "--data", "x", "--polcy=full", "--optimser", "sgd", "--zzz"],
     "transferkit finetune: error: unrecognized arguments: --polcy=full --optimser sgd --zzz. Did you mean "
     "'--policy' for --polcy, '--optimizer' for --optimser?"),
    (["predict", "m.pt", "a.png", "--qqqqqq"], "transferkit predict: error: unrecognized arguments: --qqqqqq.\n"),
    # said in the Python spelling ("batch_size must be a positive integer") after torch was loaded
    (["predict", "m.pt", "a.png", "--batch-size", "0"], "argument --batch-size: expected a positive whole number"),
    (["finetune", "--data", "x", "--", "y"], "transferkit finetune: error: unrecognized arguments: -- y.\n"),
    (["finetune", "--data", "x", "--version", "--polcy=a", "--polcy=b"],
     "unrecognized arguments: --version --polcy=a --polcy=b. Did you mean '--policy'? --version is an option of "
     "transferkit itself: give it before the command.\n"),
    (["fintune"], "'lr-find', 'inspect'). Did you mean 'finetune'?"),
    (["--verison"], "the following arguments are required: COMMAND; --verison is not an option. Did you mean "
                    "'--version'?"),
    (["predict", "--version"], "the following arguments are required: model, inputs; --version is an option of "
                               "transferkit itself: give it before the command."),
    (["finetune", "--optimizer", "adamm"], "(choose from 'adamw', 'adam', 'sgd'). Did you mean 'adam' or 'adamw'?"),
    # a setting without a flag of its own was said as the nearest flag ('--weights' for --weight-decay)
    (["finetune", "--data", "x", "--weight-decay", "0.1", "--cache-dir=c", "--early-stopping"],
     "unrecognized arguments: --weight-decay 0.1 --cache-dir=c --early-stopping. --weight-decay is a setting without "
     "a flag of its own: give it as --set weight_decay=0.1. --cache-dir is a setting without a flag of its own: give "
     "it as --set cache_dir=c. --early-stopping is a setting without a flag of its own: give it as --set "
     "early_stopping=VALUE.\n"),
    # a value a shell would split, quoted; a backbone given as an argument, said as --backbone
    (["finetune", "--data", "x", '--schedule-options={"min_factor": 0.01}', "timm:resnet18"],
     "--schedule-options is a setting without a flag of its own: give it as --set schedule_options='{\"min_factor\": "
     "0.01}'. timm:resnet18 is no argument of its own: give it as --backbone timm:resnet18.\n"),
    # a flag spelt with underscores, and a setting lr-find ignores, get the nearest flag, not a --set
    (["finetune", "--data", "x", "--batch_size", "32"], "arguments: --batch_size 32. Did you mean '--batch-size'?\n"),
    (["lr-find", "--data", "x", "--lr", "0.1"], "arguments: --lr 0.1. Did you mean '--end-lr'?\n"),
])
def test_a_misspelt_option_or_command_gets_the_nearest_spelling_from_its_command(capsys, argv, said):
    """argparse said "unrecognized arguments: --polcy full" under the top level's usage line,
    and "invalid choice" with no suggestion, where values of settings get one."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and said in err
    assert err.startswith(f"usage: transferkit {argv[0]} ") == (argv[0] in ("finetune", "predict", "lr-find"))


@pytest.mark.parametrize("command", ["finetune", "lr-find"])
def test_a_data_folder_given_as_an_argument_is_said_as_data(capsys, tmp_path, command):
    """`transferkit finetune photos/` said only "unrecognized arguments: photos/"."""
    folder = tmp_path / "my photos"
    folder.mkdir()
    with pytest.raises(SystemExit):
        main([command, str(folder), "--epochs", "1"] if command == "finetune" else [command, str(folder)])
    assert f"is no argument of its own: give it as --data '{folder}'." in capsys.readouterr().err
    with pytest.raises(SystemExit):  # with --data given, an extra folder is not said as the data
        main([command, "--data", str(folder), str(folder)])
    assert "no argument of its own" not in capsys.readouterr().err
    (tmp_path / "run.yaml").write_text("epochs: 1\n")  # a config file is said as one, not as data
    with pytest.raises(SystemExit):
        main([command, str(tmp_path / "run.yaml")])
    assert f"give it as --config {tmp_path / 'run.yaml'}." in capsys.readouterr().err


def test_every_recipes_help_loads_no_torch():
    """`python recipes/<name>.py --help` took 3 s (torch loaded before the arguments were read)."""
    code = ("import runpy, sys\n"
            "for path in sys.argv[1:]:\n"
            "    sys.argv = [path, '--help']\n"
            "    try:\n        runpy.run_path(path, run_name='__main__')\n"
            "    except SystemExit as e:\n        assert e.code in (0, None), (path, e.code)\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'numpy'))))\n")
    recipes = sorted(str(p) for p in (REPO / "recipes").glob("*.py"))
    assert len(recipes) >= 10
    proc = subprocess.run([sys.executable, "-c", code, *recipes], capture_output=True, text=True, cwd=REPO,
                          env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert proc.stdout.count("usage: ") == len(recipes)


def test_predict_top_k_above_the_classes_names_no_flag_predict_lacks(run, capsys):
    """`predict --top-k 4` on a model of 2 classes warned of `--set top_k=4`, which predict does not take."""
    root, data, _ = run
    image = sorted(str(p) for p in data.rglob("*.jpg"))[0]
    code, out, err = _run(capsys, "predict", root / "m.pt", image, "--top-k", "4")
    assert code == 0 and "Asked for the top 4 labels of a model of 2 classes: each prediction lists 2." in err
    assert "--set" not in err and "top_k" not in err
    code, out, err = _run(capsys, "predict", root / "m.pt", image, "--threshold", "0.9")  # multiclass: unused
    assert code == 0 and "A threshold of 0.9 applies to multi-label models; this model is multiclass, so it is not " \
        "used." in err


def test_sigterm_during_any_command_is_said_and_ends_with_143(run, capsys, monkeypatch):
    """`transferkit export` (and every command but finetune) died of SIGTERM without a word (exit
    -15), where cli.md promises one line and 143."""
    import signal

    import transferkit.export as export

    root, _, _ = run

    def terminated(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(export, "export_checkpoint", terminated)
    code, _, err = _run(capsys, "export", root / "r.ckpt", "--out", root / "again.pt")
    assert code == 143 and err == "transferkit: terminated (SIGTERM)\n", err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back



def test_resume_without_a_checkpoint_is_said_whole(capsys, image_folder):
    """The placeholder of the Python message was split as shell words: "--checkpoint '<the'
    checkpoint of the run to continue>"."""
    code, _, err = _run(capsys, "finetune", "--data", image_folder, "--set", "resume=true")
    assert code == 2 and err == ("transferkit: error: --resume needs --checkpoint PATH, the checkpoint of the run to "
                                 "continue; without it there is nothing to resume.\n"), err


def test_a_setting_named_without_a_value_is_said_as_its_flag():
    """"give validation data that hold them (val_data=, or a val/ folder)" reached the command
    line in the Python spelling."""
    from transferkit.spelling import cli_spelling

    assert cli_spelling("give validation data that hold them (val_data=, or a val/ folder).") == \
        "give validation data that hold them (--val-data, or a val/ folder)."
    assert cli_spelling("val_split=0.1 is not used: val_data= gives the validation data; see classes=.") == \
        "--set val_split=0.1 is not used: --val-data gives the validation data; see --set classes=."
    assert cli_spelling("https://h/x.tar?sig= and `val_data=` stay") == "https://h/x.tar?sig= and `val_data=` stay"


def test_a_setting_of_a_config_file_is_said_as_the_files(capsys, image_folder, tmp_path):
    """A value a --config file set was said as a flag the user never typed (`--warmup-epochs 1`),
    and the dry run's notes were left in the Python spelling (`warmup_epochs=1`)."""
    config = tmp_path / "run.yaml"
    config.write_text("backbone: tk:small_cnn\nweights: null\npolicy: full\nepochs: 1\nwarmup_epochs: 1\n")
    code, out, _ = _run(capsys, "finetune", "--data", image_folder, "--config", config, "--dry-run")
    said = [n for n in json.loads(out)["notes"] if "warmup" in n]
    assert code == 0 and said and said[0].startswith(f"warmup_epochs: 1 ({config}) is as long as the run"), said
    code, out, _ = _run(capsys, "finetune", "--data", image_folder, "--config", config, "--dry-run",
                        "--set", "warmup_epochs=1.0")  # typed: said as typed
    said = [n for n in json.loads(out)["notes"] if "warmup" in n]
    assert said and said[0].startswith("--set warmup_epochs=1 is as long as the run"), said


def test_the_plan_is_spelled_as_the_command_line_writes_settings(capsys, image_folder, tmp_path, monkeypatch):
    """The plan a run prints kept the Python spelling on the command line (`features: not
    cached (cache_features=False: ...)`) where its notes said `--set cache_features=False`."""
    said = "features: not cached (--set cache_features=False: the frozen backbone runs in every epoch)"
    code, out, err = _run(capsys, "finetune", "--data", image_folder, *TINY, "--set", "cache_features=false")
    assert code == 0 and said in err, err
    code, out, _ = _run(capsys, "finetune", "--data", image_folder, *TINY, "--set", "cache_features=false",
                        "--dry-run")
    assert code == 0 and said in json.loads(out)["summary"]
    plan = transferkit.plan(data=str(image_folder), backbone="tk:small_cnn", weights=None, cache_features=False)
    assert said.replace("--set ", "") in plan.summary()  # Python's own spelling in Python
    export = tmp_path / "runs" / "lr=0.1,epochs=2" / "m.pt"  # a Hydra-style folder: its path printed as it is
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    code, out, _ = _run(capsys, "finetune", "--data", image_folder, *TINY, "--export", export)
    assert code == 0 and f"export:     {export} (verified" in out, out
