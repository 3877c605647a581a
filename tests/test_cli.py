"""The command line: export from a finetune checkpoint, predict, inspect, errors, --help, a fresh process."""

from __future__ import annotations

import json
import shutil
import warnings
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.conftest import make_image_folder, needs_onnx

import transferkit
from transferkit.cli import main
from transferkit.export import read_metadata

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finetune run on two separable classes, saved as a checkpoint (MLP head, 16 px)."""
    root = tmp_path_factory.mktemp("cli")
    data = make_image_folder(root / "images", per_class=8, size=20)
    result = transferkit.finetune("tk:small_cnn", weights=None, data=str(data), epochs=2, batch_size=8,
                                  image_size=16, head_hidden=(8,), lr=1e-2, checkpoint=root / "run.ckpt",
                                  verbose=False, num_workers=0)
    return root, data, result


@pytest.fixture(scope="module")
def exported(trained):
    """``transferkit export run.ckpt --out model.pt --examples images --num-examples 4``, and its stdout."""
    import contextlib
    import io

    root, data, _ = trained
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["export", str(root / "run.ckpt"), "--out", str(root / "model.pt"), "--examples", str(data),
                     "--num-examples", "4"])
    assert code == 0
    return root / "model.pt", buf.getvalue()


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_export_predict_inspect_round_trip(trained, exported, capsys):
    root, data, result = trained
    out, stdout = exported
    assert "max |exported - eager|" in stdout and "4 image files from" in stdout
    meta = read_metadata(out)
    assert meta["labels"] == result.classes and meta["decisions"]["config"]["head_hidden"] == [8]
    assert meta["input_spec"]["image_size"] == 16 and meta["export"]["batch_sizes"] == [1, 4]
    code, stdout, _ = _run(capsys, "inspect", out)  # each size once, with the dtypes it was checked in
    assert code == 0 and "at batch sizes [1, 4] (uint8, float32 inputs)" in stdout, stdout

    files = sorted(str(p) for p in data.rglob("*.png"))[:3]
    code, stdout, _ = _run(capsys, "predict", out, *files, "--top-k", "2", "--json")
    assert code == 0
    got = json.loads(stdout)
    want = transferkit.load(out).predict(files, top_k=2)
    assert [g["source"] for g in got] == files and [g["label"] for g in got] == [w.label for w in want]
    assert [len(g["top_k"]) for g in got] == [2, 2, 2]
    # the exported file computes what the trained model computes on the same preprocessed inputs
    x = transferkit.export.InputPipeline(transferkit.InputSpec(image_size=16)).batch(files)
    with torch.no_grad():
        probs = torch.softmax(result.model.cpu().eval()(x), 1)
    assert [g["probability"] for g in got] == pytest.approx(probs.max(1).values.tolist(), abs=1e-5)

    code, stdout, _ = _run(capsys, "predict", out, data / "dark")  # a folder: every image below it
    assert code == 0 and len(stdout.strip().splitlines()) == 8 and all("\t" in line for line in stdout.splitlines())

    code, stdout, _ = _run(capsys, "inspect", out)
    assert code == 0 and "task:        multiclass (2 outputs)" in stdout and "dark, light" in stdout
    code, stdout, _ = _run(capsys, "inspect", out, "--json")
    assert code == 0 and json.loads(stdout) == meta
    shutil.copy(out, root / "commas.pt")  # the module's export stays as it is
    transferkit.export.update_metadata(root / "commas.pt", {"labels": ["red, dark", "light"]})  # read as 3 labels
    code, stdout, _ = _run(capsys, "inspect", root / "commas.pt")
    assert code == 0 and "labels:      'red, dark', 'light'" in stdout


def test_export_examples_skip_an_unreadable_file(trained, capsys, tmp_path):
    root, data, _ = trained
    examples = tmp_path / "examples"
    examples.mkdir()
    (examples / "a_fake.png").write_bytes(b"not an image")
    for i, p in enumerate(sorted(data.rglob("*.png"))[:3]):
        (examples / f"b{i}.png").write_bytes(p.read_bytes())
    code, stdout, err = _run(capsys, "export", root / "run.ckpt", "--out", tmp_path / "m.pt", "--examples", examples)
    assert code == 0, err
    assert "3 image files from" in stdout and "1 unreadable file skipped, e.g." in stdout and "a_fake.png" in stdout
    assert "on-bad-file" not in stdout + err
    (examples / "a_fake.png").rename(tmp_path / "b.png")
    for p in examples.iterdir():
        p.write_bytes(b"junk")
    code, _, err = _run(capsys, "export", root / "run.ckpt", "--out", tmp_path / "m2.pt", "--examples", examples)
    assert code == 2 and "None of the image files under" in err and "on-bad-file" not in err


def test_export_with_random_examples_optimize_and_onnx(trained, capsys, tmp_path):
    needs_onnx()
    root, _, _ = trained
    code, stdout, _ = _run(capsys, "export", root / "run.ckpt", "--out", tmp_path / "m.pt", "--optimize",
                           "--onnx", tmp_path / "m.onnx")
    assert code == 0 and "random uint8 images" in stdout and "(onnx, " in stdout
    assert read_metadata(tmp_path / "m.pt")["export"]["optimization"] in ("freeze_channels_last", "freeze",
                                                                          "optimize_for_inference")
    from transferkit.export import read_onnx_metadata

    onnx_meta = read_onnx_metadata(tmp_path / "m.onnx")
    assert onnx_meta["labels"] == ["dark", "light"]
    # the ONNX file records its own check against eager, as the TorchScript one does, and inspect shows it
    record = onnx_meta["export"]
    assert record["mode"] == "onnx" and record["batch_sizes"][0] == 1 and 0 <= record["max_abs_diff"] <= 1e-4
    code, stdout, _ = _run(capsys, "inspect", tmp_path / "m.onnx")
    assert code == 0 and "export:      onnx, opset 17, checked on onnxruntime " in stdout
    assert "input:       image [N, 3, 16, 16], uint8 only (transferkit.load converts other inputs)" in stdout
    assert f"max_abs_diff={record['max_abs_diff']} at batch sizes {record['batch_sizes']}" in stdout
    # an earlier ONNX export is replaced; a file that is not ONNX is kept, whatever its name
    code, _, _ = _run(capsys, "export", root / "run.ckpt", "--out", tmp_path / "m.pt", "--onnx", tmp_path / "m.onnx")
    assert code == 0
    notes = tmp_path / "notes.onnx"
    notes.write_text("opset notes\n")
    code, _, err = _run(capsys, "export", root / "run.ckpt", "--out", tmp_path / "m.pt", "--onnx", notes)
    assert code == 2 and "is an existing file that is not an ONNX file" in err and notes.read_text() == "opset notes\n"


def test_errors_exit_2_with_one_line(trained, capsys, tmp_path):
    root, data, _ = trained
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04 truncated")
    cases = [
        (["predict", tmp_path / "missing.pt", "a.jpg"], "does not exist"),
        (["predict", tmp_path / "broken.pt", "a.jpg"], "Cannot load"),
        (["inspect", tmp_path / "broken.pt"], "Cannot load"),
        (["export", tmp_path / "broken.pt", "--out", tmp_path / "x.pt"], "Cannot read checkpoint"),
        (["export", root / "run.ckpt", "--out", tmp_path / "x.pt", "--examples", tmp_path / "nothing"],
         "is not a folder"),
    ]
    for argv, message in cases:
        code, stdout, err = _run(capsys, *argv)
        assert code == 2 and message in err, (argv, err)
        assert err.startswith("transferkit: error: ") and err.count("\n") == 1
    assert not (tmp_path / "x.pt").exists()
    with pytest.raises(SystemExit) as exc:  # argparse usage errors exit 2 as well
        main(["predict", "--top-k", "x"])
    assert exc.value.code == 2


def test_help_shows_defaults_and_old_commands_work(capsys):
    for cmd, default in (("predict", "(default: 1)"), ("export", "(default: 1e-05)"), ("inspect", "--json")):
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0 and default in capsys.readouterr().out
    code, stdout, _ = _run(capsys, "backbones", "tk:*")
    assert code == 0 and "tk:small_cnn" in stdout.split()
    assert _run(capsys, "backbones", "tk:")[1] == stdout  # a source alone: every name in it
    code, stdout, err = _run(capsys, "backbones", "zzz")
    assert code == 1 and stdout == "" and "no backbone matches zzz" in err
    found = _run(capsys, "backbones", "cifar")[1].split()  # words without a wildcard: names that hold them
    assert "tk:cifar_resnet20" in found and "spec:tk:cifar_resnet56" in found and "tk:small_cnn" not in found
    assert _run(capsys, "backbones", "tk:cifar")[1].split() == [n for n in found if n.startswith("tk:")]
    assert _run(capsys, "backbones", "tk:CIFAR 56")[1].split() == ["tk:cifar_resnet56"]  # every word, any case
    assert _run(capsys, "backbones", "TK:")[1] == _run(capsys, "backbones", "tk:")[1]  # a source, any case


def test_an_image_over_the_decompression_bomb_limit_says_how_to_raise_it(exported, tmp_path, capsys, monkeypatch):
    """A genuine 108-megapixel photo was refused with Pillow's words alone, and from Python with
    advice (on_bad_file) that predict does not take; the command line could not raise the limit."""
    from PIL import Image

    model, _ = exported
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # restored after the test: main() sets it
    Image.new("RGB", (40, 40), (200, 90, 30)).save(tmp_path / "big.png")  # 1600 pixels: over the limit
    code, out, err = _run(capsys, "predict", model, tmp_path / "big.png")
    assert code == 1 and "decompression-bomb size (1,600 pixels, over the limit of 1,000 pixels)" in out
    assert "`transferkit --max-image-pixels 0 ...`" in out and "in Python" not in out  # a command, no Python call
    error = transferkit.load(model).predict(tmp_path / "big.png")[0].error
    assert "PIL.Image.MAX_IMAGE_PIXELS = None" in error and "on_bad_file" not in error
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # over twice the limit: Pillow raises, naming twice it
    error = transferkit.load(model).predict(tmp_path / "big.png")[0].error
    assert "(1,600 pixels, over the limit of 100 pixels)" in error
    code, out, err = _run(capsys, "predict", model, tmp_path / "big.png", "--max-image-pixels", "0")
    assert code == 0 and "error" not in out and Image.MAX_IMAGE_PIXELS is None
    code, out, err = _run(capsys, "--max-image-pixels", "2000", "predict", model, tmp_path / "big.png")
    assert code == 0 and Image.MAX_IMAGE_PIXELS == 2000
    with pytest.raises(SystemExit):
        main(["predict", str(model), str(tmp_path / "big.png"), "--max-image-pixels", "-5"])
    assert "expected a whole number of pixels" in capsys.readouterr().err


def test_predict_in_a_fresh_process(trained, exported):
    """A new interpreter loads the export and prints the same predictions."""
    _, data, _ = trained
    out = exported[0]
    files = sorted(str(p) for p in data.rglob("*.jpg"))[:2]
    proc = subprocess.run([sys.executable, "-m", "transferkit.cli", "predict", str(out), *files, "--json"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    want = transferkit.load(out).predict(files)
    got = json.loads(proc.stdout)
    assert [g["label"] for g in got] == [w.label for w in want]
    assert [g["probability"] for g in got] == pytest.approx([w.probability for w in want], abs=1e-6)


def test_finetune_dry_run_prints_the_decisions_and_trains_nothing(tmp_path, capsys, monkeypatch):
    import transferkit.train.features as features

    data = make_image_folder(tmp_path / "images", per_class=4, size=20)
    monkeypatch.setattr(features, "extract_features", lambda *a, **k: pytest.fail("features computed"))
    args = ["finetune", "--backbone", "tk:small_cnn", "--weights", "none", "--data", data, "--image-size", 16,
            "--epochs", 2, "--export", tmp_path / "m.pt", "--dry-run", "--set", "cache_features=false",
            "--feature-engine", "onnxruntime"]
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    code, out, _ = _run(capsys, *args)
    assert code == 0 and out.startswith("plan: tk:small_cnn")
    assert "features: not cached (--set cache_features=False" in out and "on the cached features" not in out
    assert "  note:     --feature-engine onnxruntime is not used" in out  # the notes a run would warn with, as typed
    code, out, _ = _run(capsys, *args, "--json")  # and as one JSON object, as a run prints
    record = json.loads(out)
    assert record["dry_run"] and record["decisions"]["feature_cache"] is False
    assert record["summary"].startswith("plan: tk:small_cnn") and "is not used" in record["notes"][0]
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    assert json.loads(_run(capsys, *args)[1]) == record  # piped: the same object
    assert not (tmp_path / "m.pt").exists()
    (data / "dark" / "broken.png").write_bytes(b"not an image")  # what the data check finds is in the record
    code, out, err = _run(capsys, *args, "--json")
    said = json.loads(out)["warnings"]
    assert code == 0 and len(said) == 1 and "broken.png" in said[0] and "broken.png" in err
    (data / "dark" / "broken.png").unlink()
    import transferkit.decisions as decisions

    def warn_then_fail(**kw):
        warnings.warn("a data check's warning")
        raise transferkit.DataError("a later refusal")
    monkeypatch.setattr(decisions, "plan", warn_then_fail)
    code, _, err = _run(capsys, *args)
    assert code == 2 and "a data check's warning" in err and "a later refusal" in err  # shown before the error
    monkeypatch.undo()
    other = make_image_folder(tmp_path / "other", per_class=2, size=20, seed=3)
    for flags in (["--set", f"data={other}"], ["--set", f"data_dir={other}"],  # --set wins
                  ["--val-data", data, "--set", f"val_data={other}"]):
        got = json.loads(_run(capsys, *args, *flags)[1])["decisions"]["config"]
        assert str(other) in (got["data"], got["val_data"]), flags


def test_lr_find_says_what_the_range_test_does_not_a_training_plan(tmp_path, capsys):
    data = make_image_folder(tmp_path / "images", per_class=8, size=20)
    rc = main(["lr-find", "--backbone", "tk:small_cnn", "--weights", "none", "--data", str(data), "--policy",
               "fine_tune", "--epochs", "3", "--image-size", "16", "--batch-size", "4", "--set", "num_workers=0",
               "--num-steps", "8", "--start-lr", "1e-5", "--precision", "fp32"])
    out, err = capsys.readouterr()
    assert rc == 0
    res = json.loads(out.strip().splitlines()[-1])
    assert res["phase"] == "frozen" and res["suggested_lr"] > 0
    assert "learning-rate range test" in err and "frozen phase of fine_tune:frozen=1" in err
    assert "plan:" not in err and "(default)" not in err and "10 epochs" not in err


def test_finetune_json_summary_reports_the_feature_store(tmp_path, capsys):
    data = make_image_folder(tmp_path / "images", per_class=4, size=20)
    args = ["finetune", "--backbone", "tk:small_cnn", "--weights", "none", "--data", data, "--image-size", 16,
            "--epochs", 1, "--set", f"cache_dir={tmp_path / 'cache'}", "--set", "num_workers=0"]
    runs = []
    for _ in range(2):
        code, out, _ = _run(capsys, *args)
        assert code == 0
        runs.append(json.loads(out)["features"])
    assert runs[0]["computed"] == runs[0]["shards"] == 2 and runs[0]["samples"] == 8
    assert runs[1]["reused"] == runs[1]["shards"] == 2 and runs[1]["computed"] == 0


def test_lr_find_help_offers_no_training_lr_or_schedule():
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["lr-find", "--help"])
    text = out.getvalue()
    assert "--start-lr" in text and "--phase" in text
    assert "--lr " not in text and "--schedule" not in text and "--export" not in text and "--checkpoint" not in text
    assert "epochs of the run the test prepares" in text


def _tone_folder(root: Path, rate: int = 8000) -> Path:
    """Two classes of short tones (a low and a high one), 4 WAV files each."""
    import numpy as np
    import soundfile as sf

    for name, freq in (("high", 2000.0), ("low", 300.0)):
        (root / name).mkdir(parents=True)
        for i in range(4):
            t = np.arange(2000 + 300 * i) / rate
            sf.write(root / name / f"{i}.wav", (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate)
    return root


def test_export_rebuilds_an_audio_backbone_with_the_runs_backbone_options(tmp_path, capsys):
    """A checkpoint keeps the run's backbone_options: the export rebuilds that backbone (its mel
    bins, widths, resampler), also when the run was given a backbone get_backbone built (its
    options recorded with it), where options that keep the weights' shapes (the hop length)
    would otherwise be lost without a word. A backbone whose options are not known is rebuilt
    with its defaults, and a warning says so."""
    data = _tone_folder(tmp_path / "tones")
    options = {"sample_rate": 8000, "n_mels": 16, "image_options": {"widths": [8, 8, 8]}}
    kw = dict(weights=None, data=str(data), val_split=0.25, epochs=1, batch_size=4, verbose=False, num_workers=0)
    result = transferkit.finetune("spec:tk:small_cnn", backbone_options=options, checkpoint=tmp_path / "run.ckpt",
                                  **kw)
    code, _, err = _run(capsys, "export", tmp_path / "run.ckpt", "--out", tmp_path / "m.pt")
    assert code == 0, err
    files = sorted(str(p) for p in data.rglob("*.wav"))
    got = transferkit.load(tmp_path / "m.pt").predict_proba(files)
    assert torch.allclose(got, result.predictor().predict_proba(files), atol=1e-5)

    same_shapes = {"hop_length": 64, "f_max": 3000.0}  # the default's weight and buffer shapes
    built = transferkit.get_backbone("spec:tk:small_cnn", weights=None, **same_shapes)
    result = transferkit.finetune(built, checkpoint=tmp_path / "built.ckpt", **kw)
    code, _, err = _run(capsys, "export", tmp_path / "built.ckpt", "--out", tmp_path / "b.pt")
    assert code == 0, err
    got = transferkit.load(tmp_path / "b.pt").predict_proba(files)
    assert torch.allclose(got, result.predictor().predict_proba(files), atol=1e-5)

    unknown = transferkit.get_backbone("spec:tk:small_cnn", weights=None, **same_shapes)
    unknown.build_options = None  # built otherwise (by hand, or by an older transferkit)
    transferkit.finetune(unknown, checkpoint=tmp_path / "unknown.ckpt", **kw)
    code, _, err = _run(capsys, "export", tmp_path / "unknown.ckpt", "--out", tmp_path / "u.pt")
    assert code == 0 and "records no backbone_options" in err and "was rebuilt with its default options" in err, err


def test_export_of_a_checkpoint_whose_backbone_is_the_user_s_own_module_says_so(tmp_path, capsys):
    """The backbone's name (its class's, from from_module) was looked up in the registry:
    'Unknown backbone 'MyNet'. Did you mean 'mixnet_l' ...?'"""
    from transferkit.backbones import from_module

    class MyNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x):
            return self.stem(x).mean((2, 3))

    data = make_image_folder(tmp_path / "images", per_class=3, size=16)
    transferkit.finetune(from_module(MyNet(), input_spec={"image_size": 16}), data=data, epochs=1, verbose=False,
                         num_workers=0, val_split=0, checkpoint=tmp_path / "run.ckpt")
    code, _, err = _run(capsys, "export", tmp_path / "run.ckpt", "--out", tmp_path / "m.pt")
    assert code == 2 and "trained with the backbone 'MyNet', which no registered source builds" in err, err
    assert "Did you mean" not in err and not (tmp_path / "m.pt").exists()


@pytest.fixture
def tiny_run(tmp_path, monkeypatch):
    """A folder holding images/ (the current one), and a finetune command line on it."""
    monkeypatch.chdir(tmp_path)
    make_image_folder(Path("images"), per_class=4, size=20)
    return ["finetune", "--data", "images", "--backbone", "tk:small_cnn", "--weights", "none", "--image-size", "16",
            "--epochs", "1", "--set", "num_workers=0"]


@pytest.mark.parametrize("given, said", [
    (["--export", "/tmp"], "The export path '/tmp' (export) is a folder"),
    (["--export", "a.pt", "--checkpoint", "./x/../a.pt"], "export and checkpoint are the same file 'a.pt'"),
    (["--plots", "images/plots"], "lies inside the data folder 'images'"),
    (["--export", "e.pt", "--set", "log_dir=e.pt"], "--set log_dir=e.pt is a folder at the path of the export 'e.pt'"),
    (["--checkpoint", "c.ckpt", "--plots", "c.ckpt/plots"], "is a folder below the path of the checkpoint 'c.ckpt'"),
    (["--export", "/proc/x.pt"], "The export path '/proc/x.pt' (export) cannot be written: its folder is not "
                                 "writable (no new file can be made in it: No such file or directory, as in a virtual "
                                 "file system such as /proc or /sys)"),
    (["--checkpoint", "m.pt"], "--checkpoint m.pt is an exported model: the run's checkpoints would replace it"),
    (["--weights", "DEFAULT"], "tk:small_cnn has no published pretrained weights, so --weights DEFAULT cannot be"),
    (["--backbone", "tv:resnet18", "--weights", "IMAGENET9K"], "Unknown weights 'IMAGENET9K' for tv:resnet18"),
])
def test_a_dry_run_refuses_the_outputs_and_weights_the_run_refuses(tiny_run, given, said, capsys, monkeypatch):
    """The dry run checks the output paths and the weights tag as the run does before it builds
    anything, and creates, locks and downloads nothing."""
    if "m.pt" in given:
        bb = transferkit.get_backbone("tk:small_cnn", weights=None)
        transferkit.export_torchscript(transferkit.build_model(bb, 2), "m.pt",
                                       example_inputs=torch.rand(2, 3, 32, 32),
                                       metadata={"labels": ["a", "b"], "input_spec": bb.input_spec.to_dict()})
    before = sorted(str(p) for p in Path(".").rglob("*"))
    for dry in (["--dry-run"], []):
        code, out, err = _run(capsys, *tiny_run, *given, *dry)
        assert code == 2 and said in err and out == "", (dry, err)
        assert "epoch" not in err  # refused before anything trained
        assert sorted(str(p) for p in Path(".").rglob("*")) == before
    code, _, err = _run(capsys, *tiny_run, "--export", "b.pt", "--backbone", "tv:resnet18", "--weights",
                        "IMAGENET1K_V1", "--dry-run")
    assert code == 0, err  # a tag the source has: the dry run loads no weights, and downloads nothing
    assert not Path("b.pt").exists()


def test_lr_find_refuses_the_settings_it_ignores(tiny_run, capsys):
    """lr-find refuses on the command line, as it refuses a recipe key, every setting the range
    test does not use; a config file of the run it prepares may hold them."""
    lr_find = ["lr-find", *tiny_run[1:]]
    for key, why in (("export=lf.pt", "writes no outputs"), ("lr=5", "ramps its own lr"),
                     ("schedule=step", "ramps its own lr"), ("early_stopping=2", "trains no epochs"),
                     ("checkpoint=c.ckpt", "writes no outputs"), ("limit=3", "read by the recipes")):
        code, out, err = _run(capsys, *lr_find, "--set", key)
        assert code == 2 and out == "" and f"--set: {key.split('=')[0]} " in err and why in err, err
        assert "which would ignore it; remove it" in err
    Path("run.yaml").write_text("export: lf.pt\nlr: 5\nschedule: step\nepochs: 1\n")
    code, out, err = _run(capsys, *lr_find, "--config", "run.yaml", "--num-steps", "4")
    assert code == 0 and json.loads(out)["suggested_lr"] is not None and not Path("lf.pt").exists(), err


def test_a_flag_that_takes_none_reads_none_or_null_and_says_what_it_expects(tiny_run, capsys, monkeypatch):
    """`none`, `None` and `null` mean None for every flag, --set and config-file setting that takes it,
    as they do for --weights; a flag's wrong value is named with what it expects."""
    for flag, value in (("--image-size", "32.5"), ("--image-size", "abc"), ("--lr", "fast"),
                        ("--max-seconds", "1s")):
        with pytest.raises(SystemExit) as info:
            main([*tiny_run, flag, value, "--dry-run"])
        what = "an integer" if flag == "--image-size" else "a number"
        assert info.value.code == 2
        assert f"argument {flag}: expects {what} (or none), got '{value}'" in capsys.readouterr().err
    Path("w.yaml").write_text("weights: None\nlr: none\n")
    unweighted = [a for i, a in enumerate(tiny_run) if "--weights" not in tiny_run[i - 1:i + 1]]
    for given in (["--weights", "none", "--lr", "None"], ["--weights", "None", "--max-seconds", "null"],
                  ["--weights", "null", "--image-size", "none"], ["--weights", "none", "--set", "lr=None"],
                  ["--weights", "DEFAULT", "--set", "weights=none"], ["--config", "w.yaml"],
                  ["--weights", "NULL"]):
        code, out, err = _run(capsys, *unweighted, *given, "--dry-run", "--json")
        assert code == 0, (given, err)
        config = json.loads(out)["decisions"]["config"]
        assert config["weights"] is None and config["lr"] is None and config["max_seconds"] in (None, 30.0)
    code, _, err = _run(capsys, *tiny_run, "--set", "lr=abc", "--dry-run")
    assert code == 2 and "--lr abc has type str; expected None or float or int (None is written null or none)" in err


def test_relative_paths_in_a_config_file_are_read_from_its_folder(tiny_run, capsys, monkeypatch):
    Path("cfgdir").mkdir()
    Path("cfgdir/rel.yaml").write_text("data: ../images\nbackbone: tk:small_cnn\nweights: none\nimage_size: 16\n"
                                       "epochs: 1\nnum_workers: 0\nexport: out/m.pt\n")
    Path("elsewhere").mkdir()
    monkeypatch.chdir("elsewhere")
    code, out, err = _run(capsys, "finetune", "--config", "../cfgdir/rel.yaml", "--dry-run", "--json")
    assert code == 0, err
    config = json.loads(out)["decisions"]["config"]
    here = Path.cwd().parent
    assert config["data"] == str(here / "images") and config["export"] == str(here / "cfgdir" / "out" / "m.pt")
    code, out, err = _run(capsys, "finetune", "--config", "../cfgdir/rel.yaml", "--data", "images", "--dry-run")
    assert code == 2 and "'images' does not exist" in err  # a flag's path: from the current folder


def test_outputs_of_evaluate_and_export_never_replace_what_the_user_has(trained, exported, capsys, tmp_path,
                                                                          monkeypatch):
    """--confusion-matrix over the model, the scored CSV or a scored image, and export --out over an
    image, wrote there (the model became a PNG); they are refused before any work, and the default
    picture inside the scored folder is not drawn (it would be scored next time)."""
    import shutil

    root, data, _ = trained
    model, _ = exported
    mine = tmp_path / "m.pt"
    shutil.copy(model, mine)
    val = tmp_path / "val"
    shutil.copytree(data, val)
    image = sorted((val / "dark").iterdir())[0]
    csv = tmp_path / "t.csv"
    csv.write_text("".join(f"{p},{p.parent.name}\n" for p in sorted(val.rglob("*.*"))))
    before = {p: p.read_bytes() for p in (mine, csv, image)}
    for source, picture, said in ((val, mine, "is the model this command reads"),
                                  (csv, csv, "is the data this command reads"),
                                  (val, image, "lies inside the data folder"),
                                  (csv, image, "is the scored file this command reads" if image.suffix == ".png" else
                                   "is an existing file that is not a confusion-matrix picture")):
        code, _, err = _run(capsys, "evaluate", mine, source, "--confusion-matrix", picture)
        assert code == 2 and said in err, (picture, err)
    monkeypatch.chdir(val / "dark")
    code, _, err = _run(capsys, "evaluate", mine, val)
    assert code == 0 and "the confusion matrix was not drawn: --confusion-matrix 'confusion_matrix.png' lies inside " \
        "the data folder" in err and not (val / "dark" / "confusion_matrix.png").exists()
    code, _, err = _run(capsys, "export", root / "run.ckpt", "--out", image, "--examples", val)
    assert code == 2 and "is an existing file that is not a TorchScript export: writing the TorchScript export " \
        "there would replace it" in err, err
    assert {p: p.read_bytes() for p in (mine, csv, image)} == before


@pytest.mark.parametrize("mode", [[], ["--csv"]])
def test_an_interrupted_predict_keeps_the_rows_of_the_batches_it_ran(trained, exported, capsys, monkeypatch, mode):
    """Rows were printed at the very end: Ctrl-C after 20,000 files of 30 s left nothing."""
    from transferkit.export.predictor import Predictor

    _, data = trained[:2]
    model, _ = exported
    run, calls = Predictor._run, []

    def interrupted_after_one_batch(self, x):
        calls.append(len(x))
        if len(calls) > 1:
            raise KeyboardInterrupt
        return run(self, x)

    monkeypatch.setattr(Predictor, "_run", interrupted_after_one_batch)
    code, out, err = _run(capsys, "predict", model, data, "--batch-size", "4", *mode)
    rows = [line for line in out.splitlines() if line and not line.startswith("path,")]
    assert code == 130 and "interrupted" in err and len(rows) == 4, out


@pytest.mark.parametrize("restore_best", [True, False])
def test_an_export_says_which_epochs_weights_it_holds(restore_best, tmp_path, capsys):
    """``training.weights_epoch`` is the best epoch where the run restored it, else the last;
    inspect says so where the two differ, and the export holds the model the run returned."""
    make_image_folder(tmp_path / "d", per_class=4, size=20)
    result = transferkit.finetune("tk:small_cnn", weights=None, data=tmp_path / "d", image_size=16, epochs=3,
                                  policy="full", lr=0.05, num_workers=0, verbose=False, restore_best=restore_best,
                                  export=tmp_path / "m.pt", checkpoint=tmp_path / "run.ckpt")
    held = result.best["epoch"] if restore_best else 3
    assert _run(capsys, "export", tmp_path / "run.ckpt", "--out", tmp_path / "c.pt")[0] == 0
    for name in ("m.pt", "c.pt"):  # finetune's export, and the checkpoint's
        assert transferkit.export.read_metadata(tmp_path / name)["training"]["weights_epoch"] == held, name
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(tmp_path / "m.pt"))(x), result.model.eval()(x), atol=1e-5)
    said = "the model holds epoch 3's weights (restore_best=False)"
    assert (said in result.summary()) is (not restore_best and result.best["epoch"] != 3), result.summary()
    transferkit.export.update_metadata(tmp_path / "m.pt", {"training": {"best": {"epoch": 1}, "weights_epoch": 3}})
    code, out, err = _run(capsys, "inspect", tmp_path / "m.pt")
    why = "the last: restore_best=False" if not restore_best else "the last completed epoch of an unfinished run"
    assert code == 0 and f"weights:     epoch 3's ({why}), not the best epoch 1's" in out, err
    transferkit.export.update_metadata(tmp_path / "m.pt", {"training": {"best": {"epoch": 3}, "weights_epoch": 3}})
    assert "weights:" not in _run(capsys, "inspect", tmp_path / "m.pt")[1]


def test_out_of_range_options_are_named_as_typed(trained, exported, capsys, tmp_path):
    """--top-k 0 was refused as 'top_k must be a positive integer', --num-examples 0 as
    'num_examples=0', while finetune's options were named as flags; /dev/null 'did not exist'."""
    root, data, _ = trained
    model, _ = exported
    image = next(data.rglob("*.png"))
    for argv, said in ((("predict", model, image, "--threshold", "2"), "--threshold 2.0 is out of range"),
                       (("finetune", "--data", data, "--set", "top_k=0", "--dry-run"), "--set top_k=0 is out of range"),
                       (("export", root / "run.ckpt", "--out", tmp_path / "m.pt", "--examples", data,
                         "--num-examples", "0"), "--num-examples 0 is out of range"),
                       (("inspect", "/dev/null"), "'/dev/null' is not a regular file")):
        code, _, err = _run(capsys, *argv)
        assert code == 2 and err.startswith("transferkit: error: ") and said in err, err
    with pytest.raises(SystemExit):
        main(["predict", str(model), str(image), "--top-k", "0"])
    assert "argument --top-k: expected a positive whole number, got '0'" in capsys.readouterr().err
    odd = tmp_path / "epochs=3" / "bad.png"  # a folder named like a setting (Hive-style): the path stays as it is
    odd.parent.mkdir()
    odd.write_bytes(b"junk")
    code, out, err = _run(capsys, "predict", model, odd, "--csv")
    assert code == 1 and f"Cannot read image '{odd}'" in out and f"{odd}: " in err, (out, err)


def test_a_picture_path_not_named_png_is_refused_before_the_work(trained, exported, capsys, tmp_path):
    """--confusion-matrix cm.jpg (or cm.txt) wrote PNG bytes under that name."""
    _, data, _ = trained
    model, _ = exported
    for name in ("cm.jpg", "cm.txt"):
        code, out, err = _run(capsys, "evaluate", model, data, "--confusion-matrix", tmp_path / name)
        assert code == 2 and not out and f"--confusion-matrix '{tmp_path / name}': pictures are written as PNG; " \
            f"name the file *.png (e.g. '{Path(name).with_suffix('.png')}')" in err, err
        assert not (tmp_path / name).exists()
    with pytest.raises(transferkit.ConfigError, match=r"plot '.*lr.svg': pictures are written as PNG"):
        transferkit.lr_find("tk:small_cnn", weights=None, data=data, image_size=16, num_workers=0, verbose=False,
                            plot=tmp_path / "lr.svg", num_steps=5)


def test_a_missing_data_path_is_said_before_any_weights_are_fetched(tmp_path, monkeypatch, capsys):
    """tv:resnet18 with its default weights fetched them first (offline: "cannot reach
    download.pytorch.org"), and only then found that the data folder was mistyped."""
    from transferkit import facts

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(facts, "get_backbone", lambda *a, **k: pytest.fail("the backbone was built"))
    for flags in (["--data", "nothere"], ["--data", str(tmp_path), "--val-data", "gone.csv"]):
        code, out, err = _run(capsys, "finetune", *flags, "--backbone", "tv:resnet18", "--epochs", "1")
        which = "validation" if "--val-data" in flags else "training"
        assert code == 2 and f"error: The {which} data '{flags[-1]}' do not exist (looked for " in err, err


def test_set_data_null_unsets_the_data_as_set_overrides_the_flags(tmp_path, monkeypatch, capsys):
    """--set overrides the flags, yet --set data=null was ignored beside --data."""
    from conftest import make_image_folder

    monkeypatch.chdir(tmp_path)
    data = make_image_folder(tmp_path / "images", per_class=2, size=16)
    flags = ["finetune", "--data", str(data), "--backbone", "tk:small_cnn", "--weights", "none", "--dry-run"]
    code, _, err = _run(capsys, *flags, "--set", "data=null")
    assert code == 2 and "No training data" in err
    assert _run(capsys, *flags)[0] == 0
