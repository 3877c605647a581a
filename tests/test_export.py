"""TorchScript / ONNX export: parity after reload, modes, optimization, metadata schema and tampering."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import warnings

import numpy as np
import pytest
import torch
from tests.conftest import needs_onnx, onnx_usable
from tests.export_helpers import (
    attention_model,
    export_tiny,
    export_tiny_onnx,
    images,
    length_as_number_model,
    rewrite_zip,
    tiny_model,
)
from torch import nn

import transferkit
from transferkit.errors import ExportError
from transferkit.export import export_torchscript, load_scripted, read_metadata, update_metadata
from transferkit.export.metadata import FORMAT, complete_metadata
from transferkit.model import ImagePreprocess, TransferModel


def _previous_export(path):
    """An earlier export at ``path`` (what a failed export must leave as it was); its bytes."""
    export_tiny(path)
    return path.read_bytes()


def test_script_export_reloads_with_parity_and_metadata(tmp_path):
    path = tmp_path / "m.pt"
    report, model = export_tiny(path)
    assert report.mode == "script" and report.optimization == "none"
    assert 0.0 <= report.max_abs_diff <= report.tolerance
    assert report.batch_sizes == (1, 3) and report.input_dtypes == ("uint8", "float32")
    module, meta = load_scripted(path)
    x = images(5, 16, seed=7)  # inputs the export never saw, uint8 and float
    with torch.no_grad():
        assert torch.allclose(module(x), model(x), atol=1e-5)
        assert torch.allclose(module(x.float() / 255), model(x.float() / 255), atol=1e-5)
    assert meta["format"] == FORMAT and meta["labels"] == ["ant", "bee", "cat"] and meta["num_outputs"] == 3
    assert meta["task"] == "multiclass" and meta["torch_version"] == torch.__version__
    assert meta["transferkit_version"] == transferkit.__version__ and meta["training"]["backbone"] == "tk:small_cnn"
    assert meta["export"]["max_abs_diff"] == report.max_abs_diff and meta["export"]["mode"] == "script"
    assert not list(tmp_path.glob(".m.pt.*")), "temporary files must not be left behind"


def test_the_exported_file_refuses_pixels_it_would_misread(tmp_path):
    """Integer pixels other than uint8 (``torch.tensor(list)`` gives int64) and float pixels in
    [0, 255] were read as float in [0, 1] by the exported file: confident outputs, no error.
    The file is run where transferkit's own input checks are not (plain torch.jit.load, C++)."""
    path = tmp_path / "m.pt"
    _, model = export_tiny(path)
    module = torch.jit.load(str(path))
    x = images(2, 16, seed=3)
    for wrong in (torch.int64, torch.int32, torch.int16, torch.bool, torch.complex64):
        with pytest.raises(Exception, match="Image pixels that are neither uint8 nor float .* cannot be read"):
            module(x.to(wrong))
        with pytest.raises(ValueError, match="cannot be read"):
            model(x.to(wrong))  # the eager model as well
    with pytest.raises(Exception, match=r"Float image pixels must be in \[0, 1\] \(not NaN\), got \[.*\].*divide by"):
        module(x.float())
    one_nan = x.float() / 255
    one_nan[0, 0, 0, 0] = float("nan")  # NaN made both ends of the range NaN, and the check passed
    with pytest.raises(Exception, match=r"Float image pixels must be in \[0, 1\] \(not NaN\), got \[.?nan"):
        module(one_nan)
    with pytest.raises(ExportError, match=r"The example inputs are float pixels in \[\d+, \d+\], which the exported "
                                             r"model refuses: .* divide by 255; nothing was written\."):
        export_torchscript(model, tmp_path / "other.pt", example_inputs=x.float(),  # in [0, 255]
                           metadata={"labels": ["ant", "bee", "cat"], "input_spec": read_metadata(path)["input_spec"]})
    assert not (tmp_path / "other.pt").exists()
    for one in (x[0], x[:, 0]):  # one image without its batch dimension; a grayscale batch read as RGB
        with pytest.raises(Exception, match=r"Images are a batch \[N, C, H, W\] \(C = 3\), got a tensor of 3 "
                                            r"dimensions"):
            module(one)
        with pytest.raises(ValueError, match="Images are a batch"):
            model(one)
    with torch.no_grad():  # the accepted forms, a resampling's overshoot included
        assert torch.allclose(module(x.float() / 255), module(x), atol=1e-5)
        module(x.float() / 255 * 1.2 - 0.1)
        model(x.float())  # eager training passes are not checked (no reduction per step)


def test_metadata_with_numbers_that_are_not_finite_is_written_as_json(tmp_path, capsys):
    """A user's own ``training`` record holding NaN (an undefined R^2) was written as ``NaN``,
    which is not JSON: a strict parser refused the file's metadata and `inspect --json`."""
    model, bb = tiny_model(2)
    meta = {"labels": ["a", "b"], "input_spec": bb.input_spec.to_dict(),
            "training": {"val_r2": float("nan"), "lr": [float("inf"), 0.1]}}
    export_torchscript(model, tmp_path / "m.pt", metadata=meta, example_inputs=images(2))
    assert load_scripted(tmp_path / "m.pt")[1]["training"] == {"val_r2": None, "lr": [None, 0.1]}
    from transferkit.cli import main

    def no_constants(name):
        raise ValueError(f"{name} is not JSON")

    assert main(["inspect", str(tmp_path / "m.pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out, parse_constant=no_constants)["training"]["val_r2"] is None
    update_metadata(tmp_path / "m.pt", {"training": {"val_r2": float("nan")}})  # an update writes the file too
    import zipfile

    with zipfile.ZipFile(tmp_path / "m.pt") as z:
        text = z.read(next(n for n in z.namelist() if n.endswith("extra/transferkit.json")))
    assert json.loads(text, parse_constant=no_constants)["training"] == {"val_r2": None}


class _VarArgs(nn.Module):
    """Not scriptable (``*args``), with data-dependent control flow."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.fc = nn.Linear(3, n)

    def forward(self, x, *args):
        pooled = x.mean((2, 3))
        if float(pooled.mean()) > 0.0:  # a branch tracing freezes
            return self.fc(pooled)
        return -self.fc(pooled)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_trace_fallback_warns_and_keeps_the_scripted_preprocessing(tmp_path):
    model = TransferModel(ImagePreprocess((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), nn.Identity(), nn.Identity())
    model.trunk = _VarArgs(2)
    model.head = nn.Identity()
    meta = {"labels": ["a", "b"], "input_spec": {"image_size": 8}}
    with pytest.warns(UserWarning, match="falling back to torch.jit.trace"):
        report = export_torchscript(model, tmp_path / "t.pt", metadata=meta, example_inputs=images(3, 8))
    assert report.mode == "trace"
    module, _ = load_scripted(tmp_path / "t.pt")
    x = images(2, 8, seed=3)
    # uint8 and float inputs both right: the preprocessing's dtype branch was scripted, not traced
    assert torch.allclose(module(x.float() / 255), model(x.float() / 255), atol=1e-6)
    assert torch.allclose(module(x), model(x), atol=1e-6)


class _IgnoredPool(nn.Module):
    """Scripts, but calls a ``@torch.jit.ignore`` function (as timm's MobileViTv2 does): the
    scripted module runs in this process and cannot be saved."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    @torch.jit.ignore
    def _pool(self, x):  # unannotated: TorchScript takes Tensor -> Tensor (string annotations are not read here)
        return x.mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._pool(self.conv(x))


def test_a_model_that_calls_python_from_torchscript_is_traced_instead(tmp_path):
    model = TransferModel(ImagePreprocess((0.5,) * 3, (0.25,) * 3), _IgnoredPool(), nn.Linear(4, 2)).eval()
    meta = {"labels": ["a", "b"], "input_spec": {"image_size": 8}}
    with pytest.warns(UserWarning, match=r"cannot hold \(_pool: @torch.jit.ignore\)\); falling back to torch.jit.trace"):
        report = export_torchscript(model, tmp_path / "t.pt", metadata=meta, example_inputs=images(3, 8))
    assert report.mode == "trace"
    module, _ = load_scripted(tmp_path / "t.pt")
    x = images(2, 8, seed=3)
    with torch.no_grad():
        assert torch.allclose(module(x), model(x), atol=1e-6)
    with pytest.raises(ExportError, match=r"torch.jit.script failed: .*_pool"):
        export_torchscript(model, tmp_path / "s.pt", metadata=meta, example_inputs=images(3, 8), mode="script")


class _Twice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


class _CustomFunction(nn.Module):
    def forward(self, x, *args):  # *args: does not script, so it is traced
        return _Twice.apply(x.mean((2, 3)))


def test_a_model_that_neither_scripts_nor_saves_as_a_trace_is_an_export_error(tmp_path):
    model = TransferModel(ImagePreprocess((0.5,) * 3, (0.25,) * 3), _CustomFunction(), nn.Linear(3, 2)).eval()
    path = tmp_path / "t.pt"
    previous = _previous_export(path)
    with pytest.raises(ExportError, match=r"cannot be converted to TorchScript: scripting failed .*its trace calls "
                                          r"Python functions .*\(_Twice: .*ONNX export may still work"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_torchscript(model, path, metadata={"labels": ["a", "b"], "input_spec": {"image_size": 8}},
                           example_inputs=images(3, 8))
    assert path.read_bytes() == previous and not list(tmp_path.glob(".t.pt.*"))


def test_export_files_writes_the_onnx_file_of_a_model_that_torchscript_cannot_hold(tmp_path):
    needs_onnx()
    from transferkit.export.onnx import export_files

    model = TransferModel(ImagePreprocess((0.5,) * 3, (0.25,) * 3), _CustomFunction(), nn.Linear(3, 2)).eval()
    meta = {"labels": ["a", "b"], "input_spec": {"image_size": 8}}
    with pytest.raises(ExportError, match=r"The ONNX export '.*m\.onnx' is written and checked; the TorchScript "
                                          r"export '.*m\.pt' is not: .*\(_Twice: "), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_files(model, tmp_path / "m.pt", onnx=tmp_path / "m.onnx", metadata=meta, example_inputs=images(3, 8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    x = images(2, 8, seed=3)
    with torch.no_grad():
        assert torch.allclose(transferkit.load(tmp_path / "m.onnx").outputs(x), model(x).softmax(1), atol=1e-5)
    # when neither file can be written, the error gives both reasons and nothing is on disk
    with pytest.raises(ExportError, match=r"Neither export was written\. TorchScript '.*n\.pt': .*_Twice.* ONNX "
                                          r"'.*n\.onnx': The ONNX model differs"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_files(model, tmp_path / "n.pt", onnx=tmp_path / "n.onnx", metadata=meta, example_inputs=images(3, 8),
                     atol=1e-30, rtol=0.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_trace_that_breaks_parity_raises_and_leaves_the_previous_file(tmp_path):
    model = TransferModel(nn.Identity(), _VarArgs(2), nn.Identity())
    path = tmp_path / "t.pt"
    previous = _previous_export(path)
    x = torch.cat([torch.ones(1, 3, 4, 4), -torch.ones(2, 3, 4, 4)])  # batch 1 takes the other branch
    with pytest.raises(ExportError, match=r"differs from the eager model by .* tolerance"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_torchscript(model, path, metadata={"labels": ["a", "b"], "input_spec": {}}, example_inputs=x)
    assert path.read_bytes() == previous
    assert not list(tmp_path.glob(".t.pt.*"))


def test_mode_script_raises_when_scripting_fails(tmp_path):
    model = TransferModel(nn.Identity(), _VarArgs(2), nn.Identity())
    with pytest.raises(ExportError, match="torch.jit.script failed"):
        export_torchscript(model, tmp_path / "s.pt", metadata={"labels": ["a", "b"], "input_spec": {}},
                           example_inputs=torch.rand(2, 3, 4, 4), mode="script")


def test_optimize_keeps_an_optimization_only_with_parity(tmp_path):
    report, model = export_tiny(tmp_path / "o.pt", optimize=True)
    assert report.optimization in ("freeze_channels_last", "optimize_for_inference", "freeze")
    assert report.max_abs_diff <= report.tolerance
    module, meta = load_scripted(tmp_path / "o.pt")
    assert meta["export"]["optimization"] == report.optimization
    x = images(3, 16, seed=11)
    with torch.no_grad():
        assert torch.allclose(module(x), model(x), atol=1e-4)
    for note in report.notes:  # every rejected optimization says why
        assert "rejected" in note


def test_an_optimization_torch_cannot_load_back_is_said_as_such_not_as_a_corrupt_file(tmp_path, monkeypatch):
    """torch cannot load some frozen modules it has just written (MobileNetV3, LeViT, ViT): the
    note said "Cannot load ... (truncated, corrupt, or not a transferkit export)"."""
    import transferkit.export.torchscript as ts

    real = ts._save_and_check

    def frozen_fails(module, tmp, meta, reference, batches, kind, how, *args, **kwargs):
        if how != "none":
            try:
                raise RuntimeError("required keyword attribute 'value' is undefined")
            except RuntimeError as exc:
                raise ExportError(ts._UNREADABLE.format(source=repr(tmp)) + f": RuntimeError: {exc}") from exc
        return real(module, tmp, meta, reference, batches, kind, how, *args, **kwargs)

    monkeypatch.setattr(ts, "_save_and_check", frozen_fails)
    with pytest.warns(UserWarning, match="no optimization kept parity or reloaded"):
        report, _ = export_tiny(tmp_path / "o.pt", optimize=True)
    assert report.optimization == "none" and report.notes
    for note in report.notes:
        assert note.endswith("rejected: torch could not load the optimized file back (RuntimeError: required keyword "
                             "attribute 'value' is undefined)"), note


def test_export_checks_each_example_batch_and_the_output_shape(tmp_path):
    model, bb = tiny_model(2)
    meta = {"labels": ["a", "b"], "input_spec": bb.input_spec.replace(image_size=16).to_dict()}
    r = export_torchscript(model, tmp_path / "m.pt", metadata=meta, example_inputs=[images(3, 16), images(2, 16)])
    assert r.batch_sizes == (1, 2, 3)
    # the file takes the input_spec's size only (the predictor resizes to it), and says how to resize
    with pytest.raises(ExportError, match=r"An example batch of shape \(2, 3, 20, 20\) is not of the 16 x 16 images "
                                          r"the model takes"):
        export_torchscript(model, tmp_path / "x.pt", metadata=meta, example_inputs=[images(3, 16), images(2, 20)])
    for x, said in ((images(1, 20), r"This model takes images of 16 x 16 pixels \[N, C, 16, 16\], got \[1, 3, 20, "
                                    r"20\]: resize to 16 x 16 pixels \(bilinear, antialiased; the aspect ratio is not "
                                    r"kept\)"),
                    (images(1, 16).permute(0, 2, 3, 1), r"Images are a batch \[N, C, H, W\] with C = 3 channels, got "
                                                        r"\[1, 16, 16, 3\]: pixels of shape \[N, H, W, C\] are "
                                                        r"x.permute\(0, 3, 1, 2\)")):
        with pytest.raises(Exception, match=said):  # plain torch.jit.load: no transferkit around it
            torch.jit.load(str(tmp_path / "m.pt"))(x)
    # one example (`--num-examples 1`): checked at batch size 1 only, which a file that runs one
    # input at a time passes; it is checked as a batch of 2 too
    assert export_torchscript(model, tmp_path / "m.pt", metadata=meta, example_inputs=images(1, 16)).batch_sizes \
        == (1, 2)

    class OneAtATime(nn.Module):
        def forward(self, x):
            return x.float().reshape(1, -1)[:, :2]
    with pytest.raises(ExportError, match=r"The model returns \(1, 2\) for the example batch \(2, 3, 16, 16\): "
                                          r"not one row per input"):
        export_torchscript(OneAtATime(), tmp_path / "x.pt", metadata=meta, example_inputs=images(1, 16))
    with pytest.raises(ExportError, match="2 labels"):  # labels do not match the 3 outputs
        export_torchscript(tiny_model(3)[0], tmp_path / "x.pt", metadata=meta, example_inputs=images(2, 16))
    with pytest.raises(ExportError, match="example_inputs"):
        export_torchscript(model, tmp_path / "x.pt", metadata=meta, example_inputs=torch.zeros(0, 3, 8, 8))
    # images [N, H, W]: the eager model ran them as one image [C, H, W], and the batch sizes 1
    # and 3 that the export recorded were one image's scores
    with pytest.raises(ExportError, match=r"Images are a batch \[N, C, H, W\] \(C = 3\), got a tensor of 3 "
                                          r"dimensions \[1, 16, 16\]: one image .* is x.unsqueeze\(1\)"
                                          r".expand\(-1, 3, -1, -1\); nothing was written"):
        export_torchscript(model, tmp_path / "x.pt", metadata=meta, example_inputs=images(3, 16)[:, 0])

    class Pooled(nn.Module):  # one row for the whole batch
        def forward(self, x):
            return x.float().mean((0, 2, 3))[None, :2]
    with pytest.raises(ExportError, match=r"The model returns \(1, 2\) for the example batch \(3, 3, 16, 16\): "
                                          r"not one row per input"):
        export_torchscript(Pooled(), tmp_path / "x.pt", metadata=meta, example_inputs=images(3, 16))
    assert not (tmp_path / "x.pt").exists()
    if onnx_usable():  # the ONNX export checks its examples the same way (it wrote Pooled's file)
        from transferkit.export import export_onnx

        meta = {**meta, "input_spec": {**meta["input_spec"], "image_size": 16}}  # one size per ONNX file

        with pytest.raises(ExportError, match=r"\(1, 2\) for the example batch \(3, 3, 16, 16\): not one row per"):
            export_onnx(Pooled(), tmp_path / "x.onnx", metadata=meta, example_inputs=images(3, 16))
        with pytest.raises(ExportError, match=r"Images are a batch .*; nothing was written"):  # was a raw ValueError
            export_onnx(model, tmp_path / "x.onnx", metadata=meta, example_inputs=images(3, 16)[:, 0])
        assert export_onnx(model, tmp_path / "m.onnx", metadata=meta, example_inputs=images(1, 16)).batch_sizes \
            == (1, 2)
        assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("change, message", [
    ({"task": "multi-class"}, "task is 'multi-class'; valid tasks"),
    ({"labels": ["a", "a"]}, "not unique"),
    ({"labels": []}, "non-empty list"),
    ({"input_spec": {"kind": "video"}}, "input_spec.kind is 'video'"),
    ({"input_spec": {"kind": "audio"}}, "sample_rate must be a positive integer"),
    ({"input_spec": {"image_size": 0}}, "image_size must be a positive integer"),
    ({"input_spec": {"mean": [0.5]}}, "mean must be a list of 3 numbers"),
    ({"training": "yes"}, "'training' must be a dict"),
    ({"labels": ["x"], "extra": object()}, "JSON-serialisable"),
])
def test_metadata_schema_rejects_bad_metadata_before_writing(change, message):
    meta = {"labels": ["a", "b"], "input_spec": {"image_size": 32}, **change}
    with pytest.raises(ExportError, match=message) as err:
        complete_metadata(meta, num_outputs=len(meta["labels"]) or 1)
    if "JSON" not in message:
        assert str(err.value).startswith("The metadata to export is invalid: ") and "re-export" not in str(err.value)


def _set_metadata(name, data, new_meta, *, digest=True, labels=True):
    """A forger who rewrites the metadata and (optionally) recomputes digest and labels.txt."""
    text = json.dumps(new_meta, indent=1, sort_keys=True).encode()
    if name == "extra/transferkit.json":
        return text
    if name == "extra/transferkit.sha256" and digest:
        return hashlib.sha256(text).hexdigest().encode()
    if name == "extra/labels.txt" and labels and isinstance(new_meta, dict) and "labels" in new_meta:
        return ("\n".join(new_meta["labels"]) + "\n").encode()
    return data


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "m.pt"
    export_tiny(path)
    return path, read_metadata(path)


def test_untampered_copy_loads(exported, tmp_path):
    path, meta = exported
    assert read_metadata(rewrite_zip(path, tmp_path / "copy.pt", lambda n, d: d)) == meta


def test_tampering_is_detected_with_a_clear_error(exported, tmp_path):
    path, meta = exported
    cases = {
        "edited label": (lambda n, d: d.replace(b'"ant"', b'"ent"') if n == "extra/transferkit.json" else d,
                         "modified after export: its SHA-256 does not match"),
        "no metadata": (lambda n, d: None if n.startswith("extra/") else d, "has no transferkit metadata"),
        "no digest": (lambda n, d: None if n == "extra/transferkit.sha256" else d, "no digest"),
        "labels.txt": (lambda n, d: b"ant\nbee\ndog\n" if n == "extra/labels.txt" else d,
                       "labels.txt of .* does not match"),
        "forged, task missing": (lambda n, d: _set_metadata(n, d, {k: v for k, v in meta.items() if k != "task"}),
                                 "the field 'task' is missing"),
        "forged, wrong format": (lambda n, d: _set_metadata(n, d, {**meta, "format": "transferkit.torchscript/9"}),
                                 "has export format 'transferkit.torchscript/9'"),
        "forged, num_outputs": (lambda n, d: _set_metadata(n, d, {**meta, "num_outputs": 4}),
                                "num_outputs is 4 but there are 3 labels"),
    }
    for name, (edit, message) in cases.items():
        bad = rewrite_zip(path, tmp_path / f"{name}.pt", edit)
        with pytest.raises(ExportError, match=message):
            transferkit.load(bad)
        assert str(bad) in str(pytest.raises(ExportError, read_metadata, bad).value), name


def test_forged_json_that_is_not_json_says_so(exported, tmp_path):
    path, _ = exported
    raw = b"{not json"

    def edit(n, d):
        if n == "extra/transferkit.json":
            return raw
        return hashlib.sha256(raw).hexdigest().encode() if n == "extra/transferkit.sha256" else d

    with pytest.raises(ExportError, match="corrupt \\(not valid JSON"):
        read_metadata(rewrite_zip(path, tmp_path / "j.pt", edit))


def test_truncated_missing_and_foreign_files(exported, tmp_path):
    path, _ = exported
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match="Cannot load .*trunc.pt.* as TorchScript \\(truncated"):
        transferkit.load(tmp_path / "trunc.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ExportError, match="Cannot load"):
        transferkit.load(tmp_path / "text.pt")
    with pytest.raises(ExportError, match="does not exist"):
        transferkit.load(tmp_path / "nope.pt")
    with pytest.raises(ExportError, match=r"'/dev/null' is not a regular file"):  # it exists
        read_metadata("/dev/null")
    plain = torch.jit.script(nn.Linear(2, 2))
    torch.jit.save(plain, str(tmp_path / "plain.pt"))
    with pytest.raises(ExportError, match="no transferkit metadata"):
        transferkit.load(tmp_path / "plain.pt")
    for name, kind in (("empty.pt", "Model"), ("empty.onnx", "ONNX")):  # empty, not "no metadata"
        (tmp_path / name).write_bytes(b"")
        if kind == "ONNX" and not onnx_usable():
            continue
        for read in (transferkit.load, read_metadata):
            with pytest.raises(ExportError, match=f"{kind} file '.*{name}' is empty \\(0 bytes\\)"):
                read(tmp_path / name)


def test_update_metadata_keeps_the_digest_valid(exported, tmp_path):
    path = tmp_path / "m.pt"
    shutil.copy(exported[0], path)
    new = update_metadata(path, {"labels": ["ant", "bee", "wasp"], "training": {"note": "renamed"}})
    assert read_metadata(path)["labels"] == ["ant", "bee", "wasp"] == new["labels"]
    with pytest.raises(ExportError, match="cannot change \\['num_outputs'\\]"):
        update_metadata(path, {"num_outputs": 4})
    with pytest.raises(ExportError, match=r"Export metadata must be JSON-serialisable: Object of type object .*\(the "
                                          r"field training\.run\[1\]\)"):
        update_metadata(path, {"training": {"run": [1, object()]}})  # a raw TypeError, where the exporter says this
    assert update_metadata(path, {"labels": ("ant", "bee", "fly")})["labels"] == ["ant", "bee", "fly"]
    # NumPy's arrays and numbers (scikit-learn's LabelEncoder.classes_, a metric) were refused as not serialisable
    new = update_metadata(path, {"labels": np.array(["ant", "bee", "moth"]), "training": {"acc": np.float32(0.5)}})
    assert new["labels"] == ["ant", "bee", "moth"] and read_metadata(path)["training"]["acc"] == 0.5
    with pytest.raises(ExportError, match="The metadata change is invalid: num_outputs is 3 but there are 2 labels. "
                                          "Nothing was written; the file is unchanged"):
        update_metadata(path, {"labels": ["a", "b"]})
    spec = read_metadata(path)["input_spec"]
    for change in ({"task": "regression"}, {"input_spec": {**spec, "image_size": 64}},
                   {"input_spec": {**spec, "mean": [0.0, 0.0, 0.0]}}):  # what the model was trained and checked with
        with pytest.raises(ExportError, match=f"cannot change \\['{next(iter(change))}'\\]: the model was trained"):
            update_metadata(path, change)
    update_metadata(path, {"input_spec": spec, "labels": ["ant", "bee", "hornet"]})  # unchanged values pass
    assert read_metadata(path)["input_spec"] == spec
    update_metadata(path, {"labels": ["ant;queen", "bee", "hornet"]})  # a classifier's label may hold a ';'


def test_update_metadata_refuses_a_multilabel_label_that_reads_as_two(tmp_path):
    """Training refuses a multilabel label holding ';' (it separates the labels of predict's CSV
    output); renaming an export's labels let it in, and 'red;green' read back as two labels."""
    bb = transferkit.get_backbone("tk:small_cnn", weights=None)
    path = tmp_path / "ml.pt"
    export_torchscript(transferkit.build_model(bb, 3), path, example_inputs=torch.randint(0, 256, (2, 3, 32, 32),
                                                                                          dtype=torch.uint8),
                       metadata={"labels": ["red", "green", "blue"], "input_spec": bb.input_spec.to_dict(),
                                 "task": "multilabel"})
    with pytest.raises(ExportError, match="the label 'red;green' holds ';'.* would read as two labels; rename it"):
        update_metadata(path, {"labels": ["red;green", "green", "blue"]})
    assert read_metadata(path)["labels"] == ["red", "green", "blue"]
    # the exporters refuse such a label as update_metadata does (they wrote it), and a label that is not UTF-8
    # text (a file name's undecodable bytes) was a raw TypeError from torch, the whole metadata dumped
    model, example = transferkit.build_model(bb, 3), torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    for labels, task, said in ((["red;green", "green", "blue"], "multilabel", "the label 'red;green' holds ';'"),
                               (["caf\udce9", "green", "blue"], "multiclass", r"the label 'caf\\udce9' is not UTF-8")):
        meta = {"labels": labels, "input_spec": bb.input_spec.to_dict(), "task": task}
        with pytest.raises(ExportError, match=rf"The metadata to export is invalid: {said}.*Nothing was written"):
            export_torchscript(model, tmp_path / "new.pt", example_inputs=example, metadata=meta)
        assert not (tmp_path / "new.pt").exists()


@pytest.mark.parametrize("label", ["a\tb", "a\x00b", "a\nb"])
def test_a_label_with_a_tab_or_control_character_is_refused(label):
    """finetune refuses such class names; export_torchscript and update_metadata took a tab,
    which split `transferkit predict`'s tab-separated output."""
    said = "" if label == "a\nb" else r" \(.* holds a control character, as a tab"
    with pytest.raises(ExportError, match="labels must be a non-empty list of non-empty one-line strings" + said):
        complete_metadata({"labels": [label, "c"], "input_spec": {"image_size": 32}}, num_outputs=2)


@pytest.mark.parametrize("seconds", [-1, 0, "abc", True])
def test_an_audio_window_in_the_metadata_must_be_seconds(seconds):
    """update_metadata took decisions.config.max_seconds=-1 (or "abc"), and every clip then failed
    as "0.1 ms long" or as a damaged file: the window the predictor crops clips to is checked."""
    spec = {"kind": "audio", "sample_rate": 8000, "channels": 1, "clip_seconds": None}
    meta = {"labels": ["a", "b"], "input_spec": spec, "decisions": {"config": {"max_seconds": seconds}}}
    with pytest.raises(ExportError, match=r"decisions.config.max_seconds \(the window the predictor crops clips to\) "
                                          r"must be a number of seconds of at least 0.025 .*, got "):
        complete_metadata(meta, num_outputs=2)
    for fine in (0.5, None):
        assert complete_metadata({**meta, "decisions": {"config": {"max_seconds": fine}}}, num_outputs=2)


def test_onnx_export_matches_under_onnxruntime(tmp_path):
    needs_onnx()
    from transferkit.export import export_onnx, read_onnx_metadata

    model, bb = tiny_model(2)
    meta = {"labels": ["a", "b"], "input_spec": bb.input_spec.to_dict(), "task": "multilabel"}
    report = export_onnx(model, tmp_path / "m.onnx", metadata=meta, example_inputs=images(4))
    assert report.mode == "onnx" and report.max_abs_diff <= report.tolerance and report.batch_sizes == (1, 4)
    got = read_onnx_metadata(tmp_path / "m.onnx")
    assert got["format"] == "transferkit.onnx/1" and got["labels"] == ["a", "b"] and got["task"] == "multilabel"
    import onnxruntime as ort

    x = images(3, seed=5)
    out = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    assert torch.allclose(torch.from_numpy(out), model(x).detach(), atol=1e-4)


class _Returns(nn.Module):
    """Logits times ``factor`` (NaN or inf), in eager mode or only once exported."""

    def __init__(self, factor: float, only_exported: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.factor = factor
        self.only_exported = only_exported

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x.float().mean((2, 3)))
        if torch.jit.is_scripting() or not self.only_exported:
            out = out * self.factor
        return out


class _ReturnsOnnx(_Returns):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x.float().mean((2, 3)))
        return out * self.factor if torch.onnx.is_in_onnx_export() or not self.only_exported else out


_META = {"labels": ["a", "b"], "input_spec": {"image_size": 8}}


@pytest.mark.parametrize("factor", [float("nan"), float("inf")])
@pytest.mark.parametrize("only_exported", [False, True])
def test_parity_check_refuses_non_finite_outputs(tmp_path, factor, only_exported):
    path = tmp_path / "m.pt"
    previous = _previous_export(path)
    with pytest.raises(ExportError, match="returns NaN/inf"):
        export_torchscript(_Returns(factor, only_exported), path, metadata=_META, example_inputs=images(3, 8),
                           mode="script")
    assert path.read_bytes() == previous and [p.name for p in tmp_path.iterdir()] == ["m.pt"]


class _Outputs(nn.Module):
    """Three regression outputs of very different scales; once scripted, ``shift`` is added to
    the small one."""

    def __init__(self, shift: float) -> None:
        super().__init__()
        self.shift = shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.float().mean((1, 2, 3)).unsqueeze(1)
        out = torch.cat([5e4 + m, -3.0 + 1e-4 * m, m], 1)
        if torch.jit.is_scripting():
            out = out + torch.tensor([0.0, self.shift, 0.0])
        return out


class _OutputsOnnx(_Outputs):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.float().mean((1, 2, 3)).unsqueeze(1)
        out = torch.cat([5e4 + m, -3.0 + 1e-4 * m, m], 1)
        return out + torch.tensor([0.0, self.shift, 0.0]) if torch.onnx.is_in_onnx_export() else out


def test_regression_outputs_are_checked_each_at_its_own_scale(tmp_path):
    """One tolerance from the largest output (5e4 x 1e-5 = 0.5) would pass a difference of 0.3 in an
    output of std 3e-4; each regression output has its own. Logits share one scale."""
    meta = {"labels": ["big", "small", "unit"], "input_spec": {"image_size": 8}, "task": "regression"}
    with pytest.raises(ExportError, match=r"by 0.3 in output 1 \('small'\), checked at its own scale"):
        export_torchscript(_Outputs(0.3), tmp_path / "m.pt", metadata=meta, example_inputs=images(3, 8), mode="script")
    assert not (tmp_path / "m.pt").exists()
    report = export_torchscript(_Outputs(0.0), tmp_path / "m.pt", metadata=meta, example_inputs=images(3, 8),
                                mode="script")
    assert report.max_abs_diff <= report.tolerance < 1e-4  # the small output's own tolerance is the one reported
    logits = {**meta, "task": "multiclass"}
    export_torchscript(_Outputs(0.3), tmp_path / "c.pt", metadata=logits, example_inputs=images(3, 8), mode="script")
    if onnx_usable():  # the ONNX check is the same
        from transferkit.export import export_onnx

        with pytest.raises(ExportError, match=r"by 0.3 in output 1, checked at its own scale under onnxruntime"):
            export_onnx(_OutputsOnnx(0.3), tmp_path / "m.onnx", metadata=meta, example_inputs=images(3, 8))
        export_onnx(_OutputsOnnx(0.3), tmp_path / "c.onnx", metadata=logits, example_inputs=images(3, 8))


def test_max_abs_diff_reduces_with_torch_and_sees_nan():
    from transferkit.export.torchscript import max_abs_diff

    exported = torch.jit.script(_Returns(float("nan"), only_exported=True))
    x = images(2, 8)
    with torch.no_grad():
        reference = [_Returns(float("nan"), only_exported=True).eval()(x)]
    with pytest.raises(ExportError, match="exported model returns NaN/inf \\(4 of 4 outputs\\)"):
        max_abs_diff(reference, exported, [x])
    big = torch.jit.script(_Const(-3e38))  # a difference that overflows float32 is still a number
    diff, scale = max_abs_diff([torch.full((2, 2), 3e38)], big, [x])
    assert diff == pytest.approx(6e38, rel=1e-6) and scale == pytest.approx(3e38, rel=1e-6)


class _Const(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 2), self.value)


@pytest.mark.parametrize("factor", [float("nan"), float("inf")])
@pytest.mark.parametrize("only_exported", [False, True])
def test_onnx_parity_check_refuses_non_finite_outputs(tmp_path, factor, only_exported):
    needs_onnx()
    from transferkit.export import export_onnx

    with pytest.raises(ExportError, match="returns NaN/inf"):
        export_onnx(_ReturnsOnnx(factor, only_exported), tmp_path / "m.onnx", metadata=_META, example_inputs=images(3, 8))
    assert not list(tmp_path.iterdir())


def test_onnx_conversion_that_fails_says_which_operation_in_one_line_without_a_graph_dump(tmp_path, capfd):
    needs_onnx()
    from transferkit.export import export_onnx

    bb = transferkit.get_backbone("spec:tk:cifar_resnet20", weights=None)  # its STFT has no ONNX conversion
    model = transferkit.build_model(bb, 2)
    with pytest.raises(ExportError, match=r"model cannot be converted to ONNX \(opset 17\): \w+: STFT .*"
                                          r"Export it without onnx") as err:
        export_onnx(model, tmp_path / "m.onnx", metadata={"labels": ["a", "b"], "input_spec": bb.input_spec.to_dict()},
                    example_inputs=torch.randn(2, 8000))
    assert len(str(err.value).splitlines()) == 1 and len(str(err.value)) < 500
    assert "graph" not in capfd.readouterr().out  # the exporter's dump of the whole graph stays off
    assert not (tmp_path / "m.onnx").exists()
    from transferkit.errors import ConfigError

    for opset in (99, 6, "17"):  # refused before any work, not reported as a conversion failure
        with pytest.raises(ConfigError, match=f"opset={opset!r} is not an ONNX opset this exporter writes"):
            export_onnx(model, tmp_path / "m.onnx", example_inputs=torch.randn(2, 8000), opset=opset,
                        metadata={"labels": ["a", "b"], "input_spec": bb.input_spec.to_dict()})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_an_onnx_export_of_a_model_not_in_float32_is_refused_by_name(tmp_path, dtype):
    """A bf16 or float64 model ended in ONNX Runtime's own error (INVALID_GRAPH, NOT_IMPLEMENTED),
    naming a temporary file, not an ExportError."""
    needs_onnx()
    from transferkit.export import export_onnx

    bb = transferkit.get_backbone("tk:small_cnn", weights=None)
    model = transferkit.build_model(bb, 2).to(dtype)
    with pytest.raises(ExportError, match=rf"An ONNX export takes a float32 model; this one holds "
                                          rf"{str(dtype).replace('torch.', '')} tensors \(e.g. '.*'\)\. Export a "
                                          r"float32 copy"):
        export_onnx(model, tmp_path / "m.onnx", metadata={"labels": ["a", "b"], "input_spec": bb.input_spec.to_dict()},
                    example_inputs=images(2, 32))
    assert not list(tmp_path.iterdir())
    from transferkit.lora import add_lora

    lora = transferkit.build_model(transferkit.get_backbone("tk:small_cnn", weights=None), 2)
    assert add_lora(lora, rank=2, targets=".")  # float64 scales, merged away: exported
    report = export_onnx(lora, tmp_path / "l.onnx", metadata={"labels": ["a", "b"],
                                                               "input_spec": bb.input_spec.to_dict()},
                         example_inputs=images(2, 32))
    assert report.max_abs_diff <= report.tolerance


def test_onnx_export_whose_write_fails_reports_the_write_not_a_conversion(tmp_path, monkeypatch):
    needs_onnx()
    import errno

    from transferkit.errors import OutputError
    from transferkit.export import export_onnx

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch.onnx, "export", full)
    model, bb = tiny_model(2)
    with pytest.raises(OutputError, match="no space left on the device") as err:
        export_onnx(model, tmp_path / "m.onnx", metadata={"labels": ["a", "b"], "input_spec": bb.input_spec.to_dict()},
                    example_inputs=images(2))
    assert "converted" not in str(err.value)
    assert list(tmp_path.iterdir()) == []
    # through export_files, the same OutputError says that the TorchScript file is on disk
    from transferkit.export.onnx import export_files
    with pytest.raises(OutputError, match=r"The TorchScript export '.*m\.pt' is written and checked; the ONNX export "
                                          r"'.*m\.onnx' is not: .*no space left on the device"):
        export_files(model, tmp_path / "m.pt", onnx=tmp_path / "m.onnx", example_inputs=images(2),
                     metadata={"labels": ["a", "b"], "input_spec": bb.input_spec.to_dict()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_a_model_too_large_for_one_onnx_file_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    needs_onnx()
    import transferkit.export.onnx as onnx_export

    model, bb = tiny_model(2)
    monkeypatch.setattr(onnx_export, "ONNX_MAX_WEIGHT_BYTES", 1000)  # a 2 GiB model, scaled down
    called = []
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: called.append(1))  # would write its weights beside it
    with pytest.raises(ExportError, match=r"holds 0.00 GiB of weights; one ONNX file holds at most 2 GiB .*external "
                                          r"data files"):
        onnx_export.export_onnx(model, tmp_path / "m.onnx", example_inputs=images(2),
                                metadata={"labels": ["a", "b"], "input_spec": bb.input_spec.to_dict()})
    assert called == [] and list(tmp_path.iterdir()) == []


def test_export_files_checks_onnx_with_the_same_tolerances_and_names_what_was_written(tmp_path):
    needs_onnx()
    from transferkit.errors import ConfigError
    from transferkit.export.onnx import export_files

    model, bb = tiny_model(2)
    meta = {"labels": ["a", "b"], "input_spec": bb.input_spec.to_dict()}
    (tmp_path / "sub").mkdir()
    with pytest.raises(ConfigError, match="are one file"):  # one file, spelled two ways
        export_files(model, tmp_path / "sub" / "m.pt", onnx=tmp_path / "sub" / ".." / "sub" / "m.pt", metadata=meta,
                     example_inputs=images(4))
    for ts, ox, message in (("a.onnx", "a2.onnx", r"TorchScript export goes, but its name ends in \.onnx"),
                            ("b.pt", "b.pth", r"ONNX export goes, but its name ends in \.pth")):  # swapped names
        with pytest.raises(ConfigError, match=message):
            export_files(model, tmp_path / ts, onnx=tmp_path / ox, metadata=meta, example_inputs=images(4))
    assert not list(tmp_path.glob("[ab]*"))
    reports = export_files(model, tmp_path / "m.pt", onnx=tmp_path / "m.onnx", metadata=meta,
                           example_inputs=images(4), atol=2e-5, rtol=0.0)
    assert [r.mode for r in reports][1] == "onnx" and reports[1].tolerance == pytest.approx(2e-5)
    with pytest.raises(ExportError, match=r"The TorchScript export '.*t\.pt' is written and checked; the ONNX export "
                                          r"'.*t\.onnx' is not: The ONNX model differs"):
        export_files(model, tmp_path / "t.pt", onnx=tmp_path / "t.onnx", metadata=meta, example_inputs=images(4),
                     atol=1e-30, rtol=0.0)
    assert (tmp_path / "t.pt").is_file() and not (tmp_path / "t.onnx").exists()


def test_onnx_predictor_takes_float_and_uint8_images_like_the_torchscript_one(tmp_path):
    needs_onnx()
    import numpy as np

    from transferkit.export.onnx import export_files

    model, bb = tiny_model(3)
    meta = {"labels": ["a", "b", "c"], "input_spec": bb.input_spec.to_dict()}
    export_files(model, tmp_path / "m.pt", onnx=tmp_path / "m.onnx", metadata=meta, example_inputs=images(4))
    ts, ox = transferkit.load(tmp_path / "m.pt"), transferkit.load(tmp_path / "m.onnx")
    u8 = images(3, seed=2)
    as_float = [x.permute(1, 2, 0).numpy().astype(np.float32) / 255 for x in u8]  # exactly uint8 levels
    off_grid = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))  # between grey levels
    for inputs in (as_float, [u8[0], as_float[1]], off_grid):
        torch.testing.assert_close(ox.predict_proba(inputs), ts.predict_proba(inputs), atol=2e-3, rtol=0)
    torch.testing.assert_close(ox.predict_proba(as_float), ts.predict_proba(u8), atol=1e-5, rtol=0)
    with pytest.raises(ExportError, match="one input dtype"):
        export_files(model, tmp_path / "x.pt", onnx=tmp_path / "x.onnx", metadata=meta,
                     example_inputs=[images(2), images(2).float() / 255])


def test_the_format_of_an_export_is_read_from_its_content_not_its_name(tmp_path):
    needs_onnx()
    from transferkit.export import read_metadata, update_metadata
    from transferkit.export.onnx import OnnxRunner, export_files

    model, bb = tiny_model(2)
    meta = {"labels": ["a", "b"], "input_spec": bb.input_spec.to_dict()}
    export_files(model, tmp_path / "m.pt", onnx=tmp_path / "onnx.bin", metadata=meta, example_inputs=images(4))
    shutil.copy(tmp_path / "m.pt", tmp_path / "torchscript.onnx")
    x = images(2, seed=4)
    expected = transferkit.load(tmp_path / "m.pt").predict_proba(x)
    for name, runner in (("onnx.bin", OnnxRunner), ("torchscript.onnx", torch.jit.ScriptModule)):
        p = transferkit.load(tmp_path / name)
        assert isinstance(p.module, runner)
        torch.testing.assert_close(p.predict_proba(x), expected, atol=1e-5, rtol=0)
        assert read_metadata(tmp_path / name)["labels"] == ["a", "b"]
    with pytest.raises(ExportError, match="is an ONNX export, whose metadata is written by exporting it again"):
        update_metadata(tmp_path / "onnx.bin", {"labels": ["x", "y"]})


def test_an_onnx_export_whose_metadata_was_re_signed_with_another_image_size_is_refused(tmp_path):
    needs_onnx()
    import onnx

    from transferkit.export import export_onnx, read_onnx_metadata
    from transferkit.export.metadata import RECORDS_FILE, encode_metadata

    path = tmp_path / "m.onnx"
    model, bb = export_tiny_onnx(path)
    meta = read_onnx_metadata(path)
    proto = onnx.load(str(path))
    records = {p.key: p.value for p in proto.metadata_props}[RECORDS_FILE]
    meta["input_spec"]["image_size"] = 64  # a forger who recomputes the metadata's digest
    del proto.metadata_props[:]
    for key, value in encode_metadata(meta, records).items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))
    with pytest.raises(ExportError, match="takes 32x32 images but its metadata says image_size 64"):
        transferkit.load(path)
    # the exporter refuses that pairing in the first place: the graph keeps the examples' size
    with pytest.raises(ExportError, match=r"the examples include 32x32 images but the metadata's "
                                          r"input_spec.image_size is 64\. Pass examples of 64x64"):
        export_onnx(model, tmp_path / "n.onnx", example_inputs=images(2),
                    metadata={"labels": ["a", "b"], "input_spec": {**bb.input_spec.to_dict(), "image_size": 64}})
    with pytest.raises(ExportError, match=r"include 32x32 images .* is 224 \(the default\)"):  # image_size left out
        export_onnx(model, tmp_path / "n.onnx", example_inputs=images(2),
                    metadata={"labels": ["a", "b"], "input_spec": {"kind": "image"}})
    # every example is checked, and export_files checks before writing either file
    from transferkit.export.onnx import export_files
    with pytest.raises(ExportError, match=r"include 48x48 images but the metadata's input_spec.image_size is 32"):
        export_files(model, tmp_path / "n.pt", onnx=tmp_path / "n.onnx", example_inputs=[images(2), images(2, 48)],
                     metadata={"labels": ["a", "b"], "input_spec": bb.input_spec.to_dict()})
    assert not (tmp_path / "n.onnx").exists() and not (tmp_path / "n.pt").exists()
    for meta in ({"labels": ["a", "b"]}, {"labels": ["a", "b"], "input_spec": "x"}):  # the metadata's own error
        with pytest.raises(ExportError, match="The metadata to export is invalid: the field 'input_spec'"):
            export_files(model, tmp_path / "n.pt", onnx=tmp_path / "n.onnx", example_inputs=images(2), metadata=meta)


def test_an_onnx_export_that_onnxruntime_cannot_open_is_an_export_error(tmp_path):
    needs_onnx()
    import onnx

    path = tmp_path / "m.onnx"
    export_tiny_onnx(path)
    proto = onnx.load(str(path))
    proto.opset_import[0].version = 7  # outside what the digests cover: the graph's ops no longer exist there
    onnx.save(proto, str(path))
    with pytest.raises(ExportError, match=r"onnxruntime .* cannot open '.*m\.onnx': .*export it again"):
        transferkit.load(path)


def test_onnx_export_of_an_attention_trunk_runs_its_standard_path_and_matches(tmp_path):
    needs_onnx()
    from transferkit.export import export_onnx

    model, bb = attention_model()
    assert torch.backends.mha.get_fastpath_enabled()
    report = export_onnx(model, tmp_path / "m.onnx", metadata={"labels": ["a", "b"],
                                                              "input_spec": bb.input_spec.to_dict()},
                         example_inputs=images(4))
    assert report.max_abs_diff <= report.tolerance
    assert torch.backends.mha.get_fastpath_enabled()  # restored for the rest of the process


def test_an_audio_export_that_fixes_the_clip_length_is_refused_at_the_parity_check(tmp_path):
    """The parity check also runs on the examples cut to 3/4 of their length: an ONNX file
    traced at one length that keeps it is refused; a TorchScript file (scripted) follows the
    length and is written."""
    needs_onnx()
    from transferkit.export import export_onnx

    model, bb = length_as_number_model()
    meta = {"labels": ["a", "b"], "input_spec": bb.input_spec.to_dict()}
    clips = torch.randn(3, 16000, generator=torch.Generator().manual_seed(0)) * 0.1
    with pytest.raises(ExportError, match=r"\(3, 12000\)|differ"):
        export_onnx(model, tmp_path / "m.onnx", metadata=meta, example_inputs=clips)
    assert not (tmp_path / "m.onnx").exists()
    report = export_torchscript(model, tmp_path / "s.pt", metadata=meta, example_inputs=clips)  # scripted: follows
    assert report.batch_sizes == (1, 3)  # the examples, and the examples cut to 12000 samples


def test_reading_an_onnx_file_without_the_extra_says_so_after_a_missing_file(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # as where the [onnx] extra is not installed
    with pytest.raises(ExportError, match=r"ONNX file '.*gone.onnx' does not exist"):
        transferkit.load(tmp_path / "gone.onnx")
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07")
    with pytest.raises(ExportError, match=r"^Running an ONNX file needs the optional packages onnx and onnxruntime, "
                                          r"not installed .*pip install 'transferkit\[onnx\]'"):
        transferkit.load(tmp_path / "m.onnx")
    with pytest.raises(ExportError, match=r"^Reading an ONNX file needs the optional packages"):
        transferkit.export.read_metadata(tmp_path / "m.onnx")  # what `transferkit inspect` reads


def test_a_model_that_fails_on_the_example_inputs_is_one_export_error(tmp_path):
    class Refuses(nn.Module):
        def forward(self, x):
            raise ValueError("this model takes audio")

    with pytest.raises(ExportError, match=r"The model fails on the example inputs \(a batch \(1, 3, 16, 16\) "
                                          r"torch.uint8\): ValueError: this model takes audio; nothing was written"):
        export_torchscript(Refuses(), tmp_path / "m.pt", example_inputs=images(2, 16), metadata={"labels": ["a", "b"]})
    assert not (tmp_path / "m.pt").exists()
