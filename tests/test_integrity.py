"""Content digests of checkpoints and exports: bytes flipped inside tensor records or metadata
are caught by every reader (load, predict, inspect, load_checkpoint, weights=, export)."""

from __future__ import annotations

import hashlib
import json
import struct
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from tests.conftest import needs_onnx
from tests.export_helpers import export_tiny, export_tiny_onnx, images, rewrite_zip, tiny_model

import transferkit
from transferkit.errors import (
    ConfigError,
    CorruptCheckpointError,
    CorruptExportError,
    CorruptFileError,
    ExportError,
    WeightsError,
)
from transferkit.export import export_checkpoint, read_metadata, update_metadata
from transferkit.export.metadata import encode_metadata
from transferkit.checkpoints import load_checkpoint, save_checkpoint

LABELS = ["antzz", "beezz", "catzz"]


def record_span(path: Path, pick) -> tuple[str, int, int]:
    """``(name, offset, size)`` of the largest zip record whose name passes ``pick``: where
    its bytes start in the file (after the local header)."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if pick(i.filename.split("/", 1)[1])), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.filename.split("/", 1)[1], info.header_offset + 30 + name_len + extra_len, info.file_size


def flip(src: Path, dst: Path, pick, n: int = 16) -> str:
    """Copy ``src`` to ``dst`` with ``n`` bytes inverted in the middle of a record; returns its name."""
    name, offset, size = record_span(src, pick)
    data = bytearray(src.read_bytes())
    start = offset + max(0, size // 2 - n // 2)
    for i in range(start, min(start + n, offset + size)):
        data[i] ^= 0xFF
    dst.write_bytes(bytes(data))
    return name


def is_tensor(name: str) -> bool:
    return name.startswith("data/")


def _checkpoint(path: Path, backbone: str = "tk:small_cnn") -> tuple[Path, torch.nn.Module]:
    model, bb = tiny_model(3, backbone=backbone)
    opt = torch.optim.AdamW(model.parameters())
    model(images(2, 16)).sum().backward()
    opt.step()
    meta = {"labels": LABELS, "task": "multiclass", "input_spec": bb.input_spec.replace(image_size=16).to_dict(),
            "training": {"backbone": bb.name}}
    return save_checkpoint(path, model=model, meta=meta, optimizer=opt, epoch=1, history=[{"epoch": 1}]), model


@pytest.fixture(scope="module")
def export_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("integrity") / "m.pt"
    export_tiny(path, labels=tuple(LABELS))
    return path


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("integrity") / "run.ckpt")[0]


def _raises_corrupt(fn, path: Path, cls=CorruptFileError) -> str:
    with pytest.raises(cls) as info:
        fn(path)
    msg = str(info.value)
    assert str(path) in msg and "corrupt" in msg, msg
    return msg


def test_flipped_tensor_bytes_in_an_export_fail_every_reader(export_file, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    name = flip(export_file, bad, is_tensor)
    for reader in (transferkit.load, read_metadata, lambda p: update_metadata(p, {"training": {}})):
        msg = _raises_corrupt(reader, bad, CorruptExportError)
        assert f"tensor data record {name!r}" in msg
    assert isinstance(pytest.raises(ExportError, transferkit.load, bad).value, ExportError)
    from transferkit.cli import main

    for argv in (["inspect", str(bad)], ["predict", str(bad), str(tmp_path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "corrupt" in err and str(bad) in err, argv


def test_a_changed_tensor_record_with_a_valid_zip_crc_is_caught_by_its_digest(export_file, tmp_path):
    """A forger who rewrites the zip (so the CRC-32s are right) still meets the SHA-256 list."""
    name, _, _ = record_span(export_file, is_tensor)
    bad = rewrite_zip(export_file, tmp_path / "forged.pt", lambda n, d: bytes(b ^ 1 for b in d) if n == name else d)
    msg = _raises_corrupt(transferkit.load, bad)
    assert f"tensor data record {name!r} does not match the SHA-256 recorded at export" in msg
    dropped = rewrite_zip(export_file, tmp_path / "dropped.pt", lambda n, d: None if n == "data.pkl" else d)
    assert "'data.pkl' (missing)" in _raises_corrupt(transferkit.load, dropped)


@pytest.mark.parametrize("record", ["extra/transferkit.json", "extra/transferkit.records.json", "data.pkl",
                                    "constants.pkl"])
def test_flipped_metadata_and_pickle_bytes_in_an_export(export_file, tmp_path, record):
    bad = tmp_path / "bad.pt"
    flip(export_file, bad, lambda n: n == record, n=2)
    _raises_corrupt(read_metadata, bad, CorruptExportError)
    _raises_corrupt(transferkit.load, bad, CorruptExportError)


@pytest.mark.parametrize("at, mask", [(6, 0x80), (8, 0x01)])  # a record's "version needed", its "encrypted" flag
def test_a_flipped_bit_in_the_zip_directory_is_a_corrupt_export(export_file, tmp_path, capsys, at, mask):
    data = bytearray(export_file.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    directory = struct.unpack("<I", data[end + 16:end + 20])[0]  # where the central directory starts
    data[directory + at] ^= mask
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(data))
    for reader in (transferkit.load, read_metadata):
        _raises_corrupt(reader, bad, CorruptExportError)
    from transferkit.cli import main

    assert main(["predict", str(bad), str(tmp_path)]) == 2 and "corrupt" in capsys.readouterr().err


def test_a_tensor_record_marked_as_a_folder_is_a_corrupt_export(export_file, tmp_path, capsys):
    """One bit of a tensor record's attributes in the zip's directory (MS-DOS "folder", 0x10):
    Python's zipfile read and hashed the record intact while torch's reader skipped it and left
    the weights unwritten; the file loaded and predicted from uninitialised memory."""
    data = bytearray(export_file.read_bytes())
    at = data.find(b"PK\x01\x02")
    while True:  # the central directory entry of the first tensor record
        size = struct.unpack("<H", data[at + 28:at + 30])[0]
        if "/data/" in data[at + 46:at + 46 + size].decode():
            break
        at = data.find(b"PK\x01\x02", at + 4)
    data[at + 38] ^= 0x10
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(data))
    for reader in (transferkit.load, read_metadata):
        said = _raises_corrupt(reader, bad, CorruptExportError)
        assert "is marked as a folder in the zip's directory" in said, said
    from transferkit.cli import main

    assert main(["inspect", str(bad)]) == 2 and "corrupt" in capsys.readouterr().err
    repacked = tmp_path / "repacked.pt"  # unzipped and zipped again (zip -r): folder entries beside the records
    with zipfile.ZipFile(export_file) as zin, zipfile.ZipFile(repacked, "w", zipfile.ZIP_STORED) as zout:
        folders = sorted({n.rsplit("/", 1)[0] + "/" for n in zin.namelist()})
        for folder in folders:
            entry = zipfile.ZipInfo(folder)
            entry.external_attr = (0o40755 << 16) | 0x10
            zout.writestr(entry, b"")
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    assert transferkit.load(repacked).labels == transferkit.load(export_file).labels


def test_the_file_checked_is_the_file_loaded(tmp_path, monkeypatch):
    """An export replaced by an atomic rename while it is loaded (a re-export, a deploy) cannot
    pair the checked file's labels with the new file's weights: a file changed meanwhile is
    loaded again, checks and all."""
    import transferkit.export.torchscript as ts

    export_tiny(tmp_path / "a.pt", labels=("ant", "bee"))
    torch.manual_seed(1)
    other = transferkit.build_model(transferkit.get_backbone("tk:small_cnn", weights=None), 2).eval()
    ts.export_torchscript(other, tmp_path / "b.pt", metadata={**read_metadata(tmp_path / "a.pt"), "labels": ["x", "y"]},
                          example_inputs=images(3, 16))
    live = tmp_path / "live.pt"
    live.write_bytes((tmp_path / "a.pt").read_bytes())
    real = ts.zip_records

    def then_replaced(*args, **kwargs):
        out = real(*args, **kwargs)
        if (tmp_path / "b.pt").exists():  # once: after the checks read the file, before the module is loaded
            (tmp_path / "b.pt").replace(live)
        return out
    monkeypatch.setattr(ts, "zip_records", then_replaced)
    got = transferkit.load(live)
    monkeypatch.setattr(ts, "zip_records", real)
    x = images(2, 16)
    assert got.labels == ["x", "y"]
    assert torch.equal(got.module(x), transferkit.load(live).module(x))  # b's weights with b's labels
    assert not torch.equal(got.module(x), transferkit.load(tmp_path / "a.pt").module(x))


def test_flipped_tensor_bytes_in_a_checkpoint_fail_every_reader(checkpoint_file, tmp_path):
    bad = tmp_path / "bad.ckpt"
    flip(checkpoint_file, bad, is_tensor)
    msg = _raises_corrupt(load_checkpoint, bad, CorruptCheckpointError)
    assert "tensor 'model/" in msg or "tensor 'optimizer/" in msg
    assert isinstance(pytest.raises(WeightsError, load_checkpoint, bad).value, WeightsError)
    _raises_corrupt(lambda p: transferkit.get_backbone("tk:small_cnn", weights=p), bad, CorruptCheckpointError)
    _raises_corrupt(lambda p: export_checkpoint(p, tmp_path / "out.pt"), bad, CorruptCheckpointError)
    assert not (tmp_path / "out.pt").exists()


def test_export_checkpoint_checks_the_output_path_first(checkpoint_file, tmp_path):
    from transferkit.errors import OutputError

    with pytest.raises(OutputError, match=f"The export path '{tmp_path}' is a folder"):
        export_checkpoint(tmp_path / "missing.ckpt", tmp_path)  # reported before the (missing) checkpoint is read
    reports, _ = export_checkpoint(checkpoint_file, tmp_path / "ok.pt")
    assert transferkit.load(tmp_path / "ok.pt").labels == LABELS and reports[0].max_abs_diff <= reports[0].tolerance


def test_every_tensor_of_a_checkpoint_is_covered(checkpoint_file, tmp_path):
    """Each storage record in turn: model weights, optimizer moments, step counters."""
    with zipfile.ZipFile(checkpoint_file) as zf:
        names = [i.filename.split("/", 1)[1] for i in zf.infolist() if "/data/" in i.filename and i.file_size]
    assert len(names) > 20
    for i, name in enumerate(names[::5]):
        bad = tmp_path / f"b{i}.ckpt"
        flip(checkpoint_file, bad, lambda n, name=name: n == name, n=1)
        _raises_corrupt(load_checkpoint, bad, CorruptCheckpointError)


def test_changed_metadata_in_a_checkpoint(checkpoint_file, tmp_path):
    data = checkpoint_file.read_bytes()
    assert data.count(b"antzz") == 1
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(data.replace(b"antzz", b"antzy"))  # torch.load does not check the zip CRC
    msg = _raises_corrupt(load_checkpoint, bad, CorruptCheckpointError)
    assert "metadata or other non-tensor content" in msg
    pkl = tmp_path / "pkl.ckpt"
    flip(checkpoint_file, pkl, lambda n: n == "data.pkl", n=16)  # unreadable or changed: corrupt either way
    _raises_corrupt(load_checkpoint, pkl, WeightsError)


def test_an_intact_checkpoint_round_trips_without_its_digests(checkpoint_file):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckpt = load_checkpoint(checkpoint_file)
    assert "integrity" not in ckpt and ckpt["transferkit"]["labels"] == LABELS and ckpt["optimizer"]["state"]


def test_files_without_digests_load_with_a_warning(tmp_path):
    model, bb = tiny_model(2)
    old = tmp_path / "old.ckpt"
    torch.save({"transferkit": {"labels": ["a", "b"]}, "model": model.state_dict(), "epoch": 1}, old)
    with pytest.warns(UserWarning, match="no content digest"):
        assert load_checkpoint(old)["epoch"] == 1
    with pytest.warns(UserWarning, match="no content digest"):
        transferkit.get_backbone("tk:small_cnn", weights=old)
    meta = {"labels": ["a", "b"], "input_spec": bb.input_spec.to_dict(), "task": "multiclass", "training": {},
            "format": "transferkit.torchscript/1", "num_outputs": 2, "transferkit_version": "0.1.0",
            "torch_version": torch.__version__}
    torch.jit.save(torch.jit.script(model), str(tmp_path / "old.pt"), _extra_files=encode_metadata(meta))
    with pytest.warns(UserWarning, match="no content digest"):
        assert transferkit.load(tmp_path / "old.pt").labels == ["a", "b"]


def _forge(path: Path, dst: Path, **changes) -> Path:
    meta = read_metadata(path)
    text = json.dumps({**meta, **changes}, indent=1, sort_keys=True).encode()
    files = {"extra/transferkit.json": text, "extra/transferkit.sha256": hashlib.sha256(text).hexdigest().encode(),
             "extra/labels.txt": ("\n".join(changes.get("labels", meta["labels"])) + "\n").encode()}
    return rewrite_zip(path, dst, lambda n, d: files.get(n, d))


def test_inspect_checks_the_label_count_against_the_output_width(export_file, tmp_path):
    forged = _forge(export_file, tmp_path / "f.pt", labels=["x", "y"], num_outputs=2)
    with pytest.raises(ExportError, match=r"returns \(1, 3\) but its metadata lists 2 labels"):
        read_metadata(forged)
    four = _forge(export_file, tmp_path / "f4.pt", labels=["w", "x", "y", "z"], num_outputs=4)
    with pytest.raises(ExportError, match="lists 4 labels"):
        read_metadata(four)
    assert read_metadata(export_file)["labels"] == LABELS


def test_checkpoints_and_exports_are_not_mistaken_for_each_other(export_file, checkpoint_file, tmp_path):
    with pytest.raises(ExportError, match=r"is a transferkit checkpoint .*`transferkit export "):
        transferkit.load(checkpoint_file)
    torch.save({"w": torch.zeros(2)}, tmp_path / "sd.pt")
    with pytest.raises(ExportError, match="saved with torch.save .* not an exported model"):
        transferkit.load(tmp_path / "sd.pt")
    torch.save({"w": torch.zeros(2)}, tmp_path / "old.th", _use_new_zipfile_serialization=False)  # torch < 1.6
    with pytest.raises(ExportError, match=r"old.th' is a file saved with torch.save in its format before torch 1.6 "
                                          r"\(a state dict or checkpoint\), not an exported model"):
        transferkit.load(tmp_path / "old.th")  # was "Cannot load ... BadZipFile: File is not a zip file"
    with pytest.raises(WeightsError, match="is an exported model .*transferkit.load"):
        load_checkpoint(export_file)
    with pytest.raises(WeightsError, match="is an exported model"):
        transferkit.get_backbone("tk:small_cnn", weights=export_file)



def test_an_unreadable_checkpoint_says_why_in_one_clause(tmp_path):
    cases = {"empty.ckpt": (b"", r"is empty \(0 bytes\)"),
             "zip.ckpt": (b"PK\x03\x04", r"RuntimeError: PytorchStreamReader failed reading zip archive: .*\.$"),
             "text.ckpt": (b"garbage", r"its content does not unpickle as checkpoint data\.$")}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(WeightsError, match=message) as info:
            load_checkpoint(tmp_path / name)
        assert "weights_only" not in str(info.value) and len(str(info.value)) < 300  # none of torch's advice


def test_cifar_resnet_takes_transferkit_checkpoints_as_weights(tmp_path):
    ckpt, model = _checkpoint(tmp_path / "cifar.ckpt", backbone="tk:cifar_resnet20")
    bb = transferkit.get_backbone("tk:cifar_resnet20", weights=ckpt)
    want = {k[len("trunk."):]: v for k, v in model.state_dict().items() if k.startswith("trunk.")}
    got = bb.trunk.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(WeightsError) as info:  # another architecture's checkpoint: strict, no strict=False advice
        transferkit.get_backbone("tk:cifar_resnet32", weights=ckpt)
    assert "missing keys" in str(info.value) and "strict=False" not in str(info.value)


def test_a_device_that_is_not_here_is_a_config_error(export_file):
    cases = ["cuda:99", "bogus", "meta", "xpu"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in cases:
        with pytest.raises(ConfigError, match="device|Unknown device") as info:
            transferkit.load(export_file, device=device)
        assert "corrupt" not in str(info.value)  # about the device, not the file
    from transferkit.hardware import resolve_device

    for device in ("meta", "xpu"):  # the same answer for a torch.device, and before a run starts
        with pytest.raises(ConfigError, match="not a device transferkit runs on"):
            resolve_device(torch.device(device))
        with pytest.raises(ConfigError, match="device"):
            transferkit.FinetuneConfig(device=device)
    assert transferkit.load(export_file, device="auto").device.type in ("cpu", "cuda", "mps")


def test_flipped_weights_in_an_onnx_export(tmp_path):
    needs_onnx()
    import onnx

    from transferkit.export import read_onnx_metadata

    path = tmp_path / "m.onnx"
    export_tiny_onnx(path)
    assert read_onnx_metadata(path)["integrity"]["records"] > 3
    proto = onnx.load(str(path))
    init = max(proto.graph.initializer, key=lambda i: len(i.raw_data))
    data = bytearray(path.read_bytes())
    at = bytes(data).index(init.raw_data) + len(init.raw_data) // 2
    data[at:at + 16] = bytes(b ^ 0xFF for b in data[at:at + 16])
    (tmp_path / "bad.onnx").write_bytes(bytes(data))
    msg = _raises_corrupt(read_onnx_metadata, tmp_path / "bad.onnx", CorruptExportError)
    assert f"weight {init.name!r}" in msg
