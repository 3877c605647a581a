"""More bad inputs: CSV files as spreadsheets write them, one image under two labels, class
names that cannot be exported, empty arrays and bytes given to ``predict``, long audio at
predict time, settings that would fail late, and the CLI's output piped to ``head``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

import transferkit as tk
from transferkit.backbones import InputSpec
from transferkit.data import prepare_data
from transferkit.errors import ConfigError, DataError
from transferkit.export.predictor import Predictor
from transferkit.model import AudioPreprocess

from tests.conftest import make_image_folder


def _quiet(fn, *a, **k):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


def _csv(tmp_path: Path, text: str, *, encoding: str = "utf-8", bom: bool = False) -> Path:
    make_image_folder(tmp_path / "img", per_class=3, size=16)
    p = tmp_path / "list.csv"
    p.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode(encoding))
    return p


def _rows(tmp_path: Path, extra: str = "") -> str:
    files = sorted(f for f in (tmp_path / "img").rglob("*") if f.is_file())
    return "".join(f"{p.relative_to(tmp_path)},{p.parent.name}{extra}\n" for p in files)


# -- CSV files -----------------------------------------------------------------------------------
def test_a_csv_with_excels_byte_order_mark_reads_like_any_other(tmp_path):
    make_image_folder(tmp_path / "img", per_class=3, size=16)
    p = _csv(tmp_path, "path,label\n" + _rows(tmp_path), bom=True)
    bundle = prepare_data(p, val_split=0)
    assert bundle.classes == ["dark", "light"] and len(bundle.train) == 6


def test_a_header_other_than_path_label_is_named_as_a_header(tmp_path):
    make_image_folder(tmp_path / "img", per_class=3, size=16)
    p = _csv(tmp_path, "file,class\n" + _rows(tmp_path))  # read as a row, it would be a missing file 'file'
    with pytest.raises(DataError, match="first row 'file,class' names no file, and reads as a header"):
        prepare_data(p, val_split=0)
    p.write_text("file,class\n" + _rows(tmp_path) + "img/dark/gone.png,dark\n")  # another row's file is missing too
    with pytest.raises(DataError, match="first row 'file,class' names no file, and reads as a header"):
        prepare_data(p, val_split=0)
    rows = _rows(tmp_path)
    p.write_text(rows)
    (tmp_path / rows.split(",")[0]).unlink()  # a headerless list whose first file is gone: a missing file
    with pytest.raises(DataError, match="lists 1 missing file"):
        prepare_data(p, val_split=0)


def test_a_latin1_csv_is_one_clear_error(tmp_path):
    make_image_folder(tmp_path / "img", per_class=3, size=16)
    p = _csv(tmp_path, "path,label\n" + _rows(tmp_path) + "img/dark/x.png,caf\u00e9\n", encoding="latin-1")
    with pytest.raises(DataError, match="is not UTF-8 text .*save it as UTF-8"):
        prepare_data(p)


def test_a_row_with_an_extra_column_is_named(tmp_path):
    make_image_folder(tmp_path / "img", per_class=3, size=16)
    p = _csv(tmp_path, "path,label\n" + _rows(tmp_path) + "img/dark/dark_1.png,dark,junk\n")
    with pytest.raises(DataError, match=r"rows \[8\] do not have the form 'path,label' \(they have 3 column"):
        prepare_data(p)
    marked = _csv(tmp_path, "path,label,split\n" + _rows(tmp_path, ",train"))  # a split column is not read: said
    with pytest.warns(UserWarning, match=r"has a column 'split', which is not read: a CSV of classes reads 'path' and "
                                         r"'label', so every row trains"):
        assert len(prepare_data(marked, val_split=0).train) == 6
    semi = _csv(tmp_path, _rows(tmp_path).replace(",", ";"))  # another separator: said
    with pytest.raises(DataError, match=r"\(they have 1 column\(s\); .*\); its rows are separated by ';': separate "
                                        r"the columns with commas\.$"):
        prepare_data(semi)


def test_a_row_with_an_empty_label_or_path_is_named_as_such(tmp_path):
    make_image_folder(tmp_path / "img", per_class=3, size=16)
    with pytest.raises(DataError, match=r"rows \[8\] have an empty label; give each row a label"):
        prepare_data(_csv(tmp_path, "path,label\n" + _rows(tmp_path) + "img/dark/dark_1.png, \n"))
    with pytest.raises(DataError, match=r"rows \[8\] have an empty path"):
        prepare_data(_csv(tmp_path, "path,label\n" + _rows(tmp_path) + ",dark\n"))


def test_a_validation_csv_sharing_no_label_with_the_training_classes_says_so(tmp_path):
    make_image_folder(tmp_path / "img", per_class=3, size=16)
    train = _csv(tmp_path, _rows(tmp_path))
    val = tmp_path / "val.csv"
    val.write_text(_rows(tmp_path).replace(",dark\n", ",0\n").replace(",light\n", ",1\n"))
    with pytest.raises(DataError, match=r"has labels \['0', '1'\], none of them one of the classes "
                                        r"\['dark', 'light'\]"):
        prepare_data(train, val_data=str(val))
    with pytest.raises(DataError, match=r"none of them one of the classes \[.a., .b.\] \(the training data.s, "
                                        r"or classes=\)"):
        prepare_data(train, classes=["a", "b"])


def test_one_file_with_two_labels_is_refused(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "img", per_class=3, size=16)
    p = _csv(tmp_path, _rows(tmp_path) + "img/dark/dark_1.png,light\n")
    with pytest.raises(DataError, match=r"lists 'img/dark/dark_1.png' twice \(however spelled\), with labels 'dark' "
                                        "and 'light'"):
        prepare_data(p)
    from transferkit.data.folders import scan_csv

    with pytest.raises(DataError, match=r"with labels 'dark' and 'light': one image has one true class here\. Keep "):
        scan_csv(p, ["dark", "light"], purpose="scoring")  # transferkit evaluate: no training advice
    _csv(tmp_path, _rows(tmp_path) + f"{tmp_path / 'img' / 'dark' / 'dark_1.png'},light\n")  # spelled apart
    monkeypatch.chdir(tmp_path)  # the CSV named by a relative path: its rows' paths are relative, this one absolute
    with pytest.raises(DataError, match=r"dark_1.png' twice \(however spelled\), with labels 'dark' and 'light'"):
        prepare_data("list.csv")


def test_a_class_of_classes_that_no_row_of_a_csv_names_is_said(tmp_path):
    """classes= naming a class no row uses (here 'Light', the rows' 'light' in another case)
    gave an output that cannot learn, with no word; the rows left out gave no hint of case."""
    make_image_folder(tmp_path / "img", classes=("dark", "grey", "light"), per_class=3, size=16)
    p = _csv(tmp_path, _rows(tmp_path))
    with pytest.warns(UserWarning) as said:
        b = prepare_data(p, classes=["dark", "grey", "Light"])
    text = " ".join(str(w.message) for w in said)
    assert "has labels ['light'] that are not training classes ('light' differs from the class 'Light' only in " \
           "case); those rows are left out" in text
    assert "1 class of 3 has no training sample: ['Light']" in text and b.classes == ["dark", "grey", "Light"]


def test_labels_differing_only_in_case_are_refused(tmp_path):
    make_image_folder(tmp_path / "img", per_class=3, size=16)
    rows = _rows(tmp_path).replace(",light\n", ",Light\n", 1)
    with pytest.raises(DataError, match="the class names 'Light' and 'light' differ only in case"):
        prepare_data(_csv(tmp_path, rows))


def test_labels_that_read_alike_are_refused_or_said(tmp_path):
    """'1', '01' and '1.0' were three classes, and a label 'NaN' (how pandas writes a missing
    value) a class, without a word; a 'path,Class' header was not told to be 'path,label'."""
    make_image_folder(tmp_path / "img", per_class=3, size=16)
    rows = _rows(tmp_path).replace(",dark\n", ",1\n").replace(",light\n", ",2\n")
    spelled = rows.replace(",1\n", ",01\n", 1).replace(",2\n", ",2.0\n", 1)
    with pytest.raises(DataError, match=r"the labels '01' and '1' are one number written in 2 ways, so they would be "
                                        r"2 classes; write them alike"):
        prepare_data(_csv(tmp_path, spelled), val_split=0)
    codes = rows.replace(",1\n", ",1.1\n").replace(",2\n", ",1.10\n")  # numbers that are not whole: codes
    assert _quiet(prepare_data, _csv(tmp_path, codes), val_split=0).classes == ["1.1", "1.10"]
    with pytest.warns(UserWarning, match=r"has 1 row labelled 'NaN', which reads as a missing value .* a class of its "
                                         r"own here"):
        bundle = prepare_data(_csv(tmp_path, rows.replace(",2\n", ",NaN\n", 1)), val_split=0)
    assert bundle.classes == ["1", "2", "NaN"]
    with pytest.raises(DataError, match=r"A header of path and one column per output is read for task='regression' "
                                        r"or task='multilabel'\. If the column 'Class' holds class names, name it "
                                        r"'label'\.$"):
        prepare_data(_csv(tmp_path, "Path,Class\n" + rows), val_split=0)


def test_an_audio_file_list_with_a_bom_and_a_ragged_row(tmp_path):
    """Audio lists are read by the image lists' reader: the same rules, the clip named."""
    from transferkit.data.folders import scan_csv

    for i, lab in enumerate(["a", "b"]):
        sf.write(tmp_path / f"{lab}.wav", np.zeros(800, np.float32), 8000)
    p = tmp_path / "list.csv"
    p.write_bytes(b"\xef\xbb\xbfpath,label\na.wav,a\nb.wav,b\n")
    samples, classes = scan_csv(p, kind="audio")
    assert classes == ["a", "b"] and len(samples) == 2
    p.write_bytes(b"path,label\na.wav,a\nb.wav,b,junk\n")
    with pytest.raises(DataError, match=r"rows \[3\] do not have the form 'path,label'"):
        scan_csv(p, kind="audio")
    p.write_bytes(b"path,label\na.wav,a\n./a.wav,b\n")  # one file, spelled two ways
    with pytest.raises(DataError, match=r"twice \(however spelled\), with labels 'a' and 'b': one clip cannot teach "
                                        "two classes. Keep"):
        scan_csv(p, kind="audio")
    p.write_bytes(b"path,label\na.wav,a\nc.wav,b\n")
    with pytest.raises(DataError, match=r"lists 1 missing file, e.g. \[.*c.wav'\]"):
        scan_csv(p, kind="audio")


# -- the same image (or clip) under two labels -------------------------------------------------
def test_the_same_image_in_two_class_folders_is_warned(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=4, size=16)
    shutil.copy(root / "dark" / "dark_1.png", root / "light" / "copy.png")
    with pytest.warns(UserWarning, match="same content as a file of another class"):
        bundle = prepare_data(root, val_split=0)
    assert any("same content as a file of another class" in w and "copy.png (light)" in w
               for w in bundle.report.warnings)


def test_the_same_clip_in_two_class_folders_is_warned_as_a_clip(tmp_path):
    from transferkit.data.audio import prepare_audio_data

    for c, f in (("high", 2000.0), ("low", 300.0)):
        (tmp_path / "clips" / c).mkdir(parents=True)
        for i in range(3):
            sf.write(tmp_path / "clips" / c / f"{i}.wav", 0.3 * np.sin(np.arange(1600 + 100 * i) * f / 8000), 8000)
    shutil.copy(tmp_path / "clips" / "low" / "0.wav", tmp_path / "clips" / "high" / "copy.wav")
    with pytest.warns(UserWarning, match=r"same content as a file of another class \(the same clip under two labels"):
        bundle = prepare_audio_data(tmp_path / "clips", spec=InputSpec(kind="audio", sample_rate=8000), val_split=0)
    assert not any("image" in w for w in bundle.report.warnings)


def test_a_class_folder_linked_to_another_is_warned(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=4, size=16)
    os.symlink(root / "dark", root / "zlinked")
    with pytest.warns(UserWarning, match="class folder linked to another"):
        bundle = prepare_data(root, val_split=0)
    assert any("4 training file(s)" in w and "(zlinked)" in w for w in bundle.report.warnings)


def test_a_linked_sub_folder_of_a_class_is_read_and_a_loop_is_not(tmp_path):
    """A linked class folder was followed but a linked folder inside one was skipped, unreported."""
    root = make_image_folder(tmp_path / "d", per_class=4, size=16)
    more = make_image_folder(tmp_path / "elsewhere", classes=("more",), per_class=3, size=16) / "more"
    os.symlink(more, root / "dark" / "more")
    os.symlink(root / "dark", root / "dark" / "more" / "back")  # a loop: dark/more/back is dark
    bundle = prepare_data(root, val_split=0)
    dark = [p for p, t in bundle.train.samples if bundle.classes[t] == "dark"]
    assert len(dark) == 4 + 3 and sum("/more/" in p for p in dark) == 3
    assert [Path(p).name for p in bundle.report.ignored_folders] == ["back"]


def test_a_class_name_with_a_line_break_is_refused_before_training(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=4, size=16)
    (root / "light").rename(root / "li\nght")
    with pytest.raises(DataError, match=r"the class name 'li\\nght' holds a line break"):
        prepare_data(root)
    for breaking in ("\u2028", "\x85", "\u2029"):  # what labels.txt, read back line by line, would split on too
        (root / next(p.name for p in root.iterdir() if p.name.startswith("li"))).rename(root / f"li{breaking}ght")
        with pytest.raises(DataError, match=r"holds a line break"):
            prepare_data(root)
    from transferkit.export.metadata import complete_metadata

    with pytest.raises(tk.ExportError, match="one-line strings"):  # an export made by hand is checked the same way
        complete_metadata({"labels": ["ant\u2028s", "bees"], "input_spec": {"image_size": 32}}, num_outputs=2)
    # a tab is refused in labels being written (it splits predict's output), but a file that holds one (written
    # before that rule) still loads, and its other metadata can be changed
    meta = {"labels": ["a\tb", "c"], "input_spec": {"image_size": 32}}
    with pytest.raises(tk.ExportError, match="'a\\\\tb' holds a control character"):
        complete_metadata(meta, num_outputs=2)
    from transferkit.export.metadata import validate_metadata

    held = {**complete_metadata({**meta, "labels": ["ab", "c"]}, num_outputs=2), "labels": ["a\tb", "c"]}
    assert validate_metadata(held, source="'old.pt'")["labels"][0] == "a\tb"


# -- predict -------------------------------------------------------------------------------------
class _Mean(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.float().mean((1, 2, 3)) / 255.0
        return torch.stack([m, 1.0 - m], 1)


class _Length(torch.nn.Module):
    """[N, T] NaN-padded -> (number of valid samples, 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = (~torch.isnan(x)).sum(1).float()
        return torch.stack([n, torch.zeros_like(n)], 1)


def _image_predictor() -> Predictor:
    meta = {"labels": ["a", "b"], "task": "multiclass", "input_spec": InputSpec(image_size=16).to_dict()}
    return Predictor(torch.jit.script(_Mean()), meta, source="test model")


@pytest.mark.parametrize("shape", [(0, 0, 3), (0, 10, 3), (10, 0)])
def test_an_empty_image_array_is_refused(shape):
    with pytest.raises(DataError, match="empty image"):
        _image_predictor().predict(np.zeros(shape, np.uint8))
    with pytest.raises(DataError, match="empty image"):
        _image_predictor().predict(torch.zeros(3, *shape[:2], dtype=torch.uint8))


def test_bytes_are_refused_with_how_to_decode_them():
    with pytest.raises(DataError, match=r"Cannot predict on bytes: pass a file path, or decode the bytes first"):
        _image_predictor().predict(b"\x89PNG...")
    with pytest.raises(DataError, match=r"Cannot predict on a dict: .*list\(d.values\(\)\)"):  # not on its keys
        _image_predictor().predict({"a": "x.png"})


def test_predict_errors_do_not_give_training_advice(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    pred = _image_predictor().predict([str(tmp_path / "bad.png")])[0]
    assert not pred.ok and "Cannot read image" in pred.error and "on_bad_file" not in pred.error


def _png16_rgb(path, pixels: np.ndarray) -> None:
    """Write ``pixels`` (HxWx3 uint16) as a 16-bit RGB PNG (Pillow writes none)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = pixels.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_a_16_bit_array_or_tensor_is_scaled_as_its_16_bit_png_is(tmp_path):
    """Grayscale is scaled (rounded); a colour 16-bit PNG is read by Pillow by its high bytes,
    and an HxWx3 array or [3, H, W] tensor was scaled instead (1 level apart in 26% of pixels)."""
    deep = np.random.default_rng(0).integers(0, 65536, (16, 16), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")  # a 16-bit grayscale PNG
    colour = np.random.default_rng(1).integers(0, 65536, (16, 16, 3), dtype=np.uint16)
    _png16_rgb(tmp_path / "colour.png", colour)
    as_tensor = lambda a: torch.from_numpy(a.astype(np.int32)).to(torch.uint16)  # noqa: E731
    for file, items in (("deep.png", (deep, as_tensor(deep)[None])),
                        ("colour.png", (colour, as_tensor(colour).permute(2, 0, 1)))):
        from_file = _image_predictor().predict_proba(str(tmp_path / file))
        for item in items:
            assert torch.equal(_image_predictor().predict_proba(item), from_file), (file, type(item))
    with pytest.raises(DataError, match=r"uint8 in \[0, 255\], uint16 \(16-bit\) or float in \[0, 1\], got torch.int32"):
        _image_predictor().predict(torch.zeros(3, 4, 4, dtype=torch.int32))


def test_non_finite_pixels_are_refused_and_a_float_tiff_in_0_1_is_read_as_such(tmp_path):
    """NaN compares false with any bound: a float image holding it passed the range check, and
    an ONNX export (which casts to uint8) returned a confident label for it."""
    from transferkit.data.images import load_image

    img = np.full((16, 16, 3), 0.8, np.float32)
    img[5, 5, 0] = np.nan
    for item in (img, torch.from_numpy(img).permute(2, 0, 1)):
        with pytest.raises(DataError, match="holds 1 non-finite values"):
            _image_predictor().predict(item)
    Image.fromarray(np.full((8, 8), 0.6, np.float32), "F").save(tmp_path / "f.tif")  # a 32-bit float TIFF
    assert np.asarray(load_image(tmp_path / "f.tif"))[0, 0].tolist() == [153, 153, 153]
    Image.fromarray(np.full((8, 8), 200.0, np.float32), "F").save(tmp_path / "f255.tif")  # float in [0, 255]
    assert np.asarray(load_image(tmp_path / "f255.tif"))[0, 0].tolist() == [200, 200, 200]


def test_a_missing_file_is_reported_as_missing_with_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = InputSpec(kind="audio", sample_rate=8000, clip_seconds=None)
    audio = Predictor(torch.jit.script(_Length()), {"labels": ["a", "b"], "task": "multiclass",
                                                    "input_spec": spec.to_dict()}, source="test model")
    for predictor, name in ((_image_predictor(), "gone.jpg"), (audio, "gone.wav")):
        pred = predictor.predict([name])[0]
        assert not pred.ok and "does not exist" in pred.error and str(tmp_path / name) in pred.error
        assert "Remove" not in pred.error and "libsndfile" not in pred.error
    with pytest.raises(DataError, match=r"The image 'gone.jpg' does not exist"):
        tk.data.load_image("gone.jpg")
    with pytest.raises(DataError, match=r"The audio file 'gone.wav' does not exist"):
        tk.data.audio.load_audio("gone.wav")


def test_an_audio_model_cast_to_double_gets_double_waveforms(tmp_path):
    class Loudness(torch.nn.Module):  # [N, T] NaN-padded -> [N, 2], through a float64 layer
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Linear(1, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.scale(torch.nan_to_num(x).abs().mean(1, keepdim=True))

    spec = InputSpec(kind="audio", sample_rate=8000, clip_seconds=None)
    meta = {"labels": ["a", "b"], "task": "multiclass", "input_spec": spec.to_dict()}
    sf.write(tmp_path / "a.wav", np.full(800, 0.25, np.float32), 8000)
    model = torch.nn.Sequential(AudioPreprocess(), Loudness())
    predictor = Predictor(model, meta, source="test model")
    model.double()  # after the predictor was made
    out = predictor.outputs([str(tmp_path / "a.wav")])
    w, b = model[1].scale.weight[:, 0], model[1].scale.bias
    assert out.dtype == torch.float32
    assert out[0].tolist() == pytest.approx(torch.softmax(w * 0.25 + b, 0).tolist(), abs=1e-6)

    # the model itself, given PCM or float32 clips: its preprocessing hands the trunk its own dtype
    pcm = torch.full((1, 800), 8192, dtype=torch.int16)  # 0.25 of full scale
    for clip in (pcm, pcm.float() / 32768, torch.jit.script(AudioPreprocess())(pcm)):
        assert model(clip)[0].tolist() == pytest.approx((w * 0.25 + b).tolist(), abs=1e-12)
    assert "dtype_of" not in AudioPreprocess().state_dict()  # checkpoints keep their keys


def test_long_audio_is_cropped_at_predict_time_as_in_training(tmp_path):
    spec = InputSpec(kind="audio", sample_rate=8000, clip_seconds=None)
    meta = {"labels": ["a", "b"], "task": "multiclass", "input_spec": spec.to_dict(),
            "decisions": {"config": {"max_seconds": 2.0}}}  # where finetune's exports keep the run's settings
    p = Predictor(torch.jit.script(_Length()), meta, source="test model")
    sf.write(tmp_path / "long.wav", np.random.default_rng(0).uniform(-0.1, 0.1, 8000 * 10).astype(np.float32), 8000)
    sf.write(tmp_path / "short.wav", np.zeros(4000, np.float32) + 0.01, 8000)
    with pytest.warns(UserWarning, match=r"1 audio clip last longer than the model's window of 2 s "
                                         r".*long.wav.*the max_seconds of its training run") as caught:
        out = p.outputs([str(tmp_path / "long.wav"), str(tmp_path / "short.wav")])
    assert out.shape == (2, 2)
    from transferkit.cli import cli_spelling  # `transferkit predict` shows warnings with the CLI's spelling

    shown = cli_spelling(str(caught[0].message))
    assert "--max-seconds" not in shown and "the max_seconds of its training run" in shown, shown
    raw = Predictor(torch.jit.script(_Length()), {**meta, "decisions": {"config": {"max_seconds": None}}}, source="m")
    lengths = raw.module(raw.inputs.batch([str(tmp_path / "long.wav")]))[:, 0]
    cropped = p.module(p.inputs.batch([str(tmp_path / "long.wav")]))[:, 0]
    assert float(cropped) == 16000 and float(lengths) == 80000  # 2 s of 10 s; whole clips with max_seconds=None
    fixed = Predictor(torch.jit.script(_Length()), {**meta, "input_spec": {**spec.to_dict(), "clip_seconds": 1.0}},
                      source="m")
    with pytest.warns(UserWarning, match=r"1 audio clip last longer than the model's window of 1 s "
                                         r".*long.wav.*its middle 1 s.*its backbone's clip_seconds"):
        fixed.outputs([str(tmp_path / "long.wav")])
    assert float(fixed.module(fixed.inputs.batch([str(tmp_path / "long.wav")]))[0, 0]) == 8000
    # in memory too: a [T] waveform longer than the window, and a [T, C] one (as soundfile.read gives) as one clip
    stereo = np.stack([np.full(8000 * 3, 0.01, np.float32)] * 2, 1)
    for model, window in ((p, 2), (fixed, 1)):
        model.inputs.cropped.clear()  # the direct batch() calls above said nothing
        with pytest.warns(UserWarning, match=rf"2 audio clips last longer than the model's window of {window} s "
                                             r"\(e.g. a waveform of 3.0 s\)"):
            out = model.outputs([np.full(8000 * 3, 0.01, np.float32), stereo])
        assert out.shape == (2, 2)
        with pytest.warns(UserWarning, match="1 audio clip last longer"):
            assert model.outputs(stereo).shape == (1, 2)
    # [T, 9]: T clips of 9 samples, or one clip of more channels than [T, C] is read with: said as both
    with pytest.raises(DataError, match=r"shape \(8000, 9\) is read as 8000 clips of 9 samples each, shorter than the "
                                        r"model takes \(25 ms\); as one clip \[T, C\] of 9 channels .*\(x.T\)"):
        p.outputs(np.zeros((8000, 9), np.float32))
    assert p.outputs(np.zeros((9, 8000), np.float32) + 0.01).shape == (9, 2)  # 9 clips of 1 s: a batch


# -- settings that failed late ------------------------------------------------------------------
def test_backbone_options_the_builder_rejects_are_a_config_error(image_folder):
    with pytest.raises(ConfigError, match=r"cannot be built with the options \{'widths': \[1\]\} \(backbone_options\)"):
        tk.finetune("tk:cifar_resnet20", weights=None, data=image_folder, backbone_options={"widths": [1]},
                    verbose=False, num_workers=0)


def test_class_weights_all_zero_are_refused():
    with pytest.raises(ConfigError, match=r"class_weights=\[0, 0\] is out of range; expected at least one weight > 0"):
        tk.FinetuneConfig(data="x", class_weights=[0, 0])


# -- the CLI piped to head ----------------------------------------------------------------------
def test_a_closed_pipe_ends_the_cli_quietly(monkeypatch, capsys):
    from transferkit import cli

    def backbones(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_cmd_backbones", backbones)
    monkeypatch.setattr(os, "dup2", lambda *a: None)  # keep pytest's stdout
    assert cli.main(["backbones"]) == 141
    assert "error" not in capsys.readouterr().err


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX shell")
def test_predict_json_piped_to_head(tmp_path):
    from tests.export_helpers import export_tiny

    model = tmp_path / "m.pt"
    export_tiny(model)
    folder = make_image_folder(tmp_path / "imgs", per_class=300, size=8)  # a JSON larger than the pipe buffer
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run(f"'{sys.executable}' -m transferkit predict --json {model} {folder} | head -c 10",
                       shell=True, capture_output=True, text=True, env=env, timeout=300)
    assert r.stdout.startswith("[") and "Broken pipe" not in r.stderr and "error" not in r.stderr, r.stderr
