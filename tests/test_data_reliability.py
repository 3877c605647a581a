"""Messy real-world image folders: every hostile input gets a defined, reported outcome."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

import transferkit as tk
from transferkit.data import check_image_file, load_image, prepare_data


def _rgb(size=(20, 16), value=128):
    return Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8))


def build_hostile_folder(root: Path) -> dict[str, Path]:
    """One class of good images in every odd format, one class of bad files."""
    good, bad = root / "good", root / "bad"
    good.mkdir(parents=True)
    bad.mkdir(parents=True)
    files = {}
    _rgb().save(good / "plain.jpg")
    _rgb().convert("L").save(good / "gray.png")
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    rgba.save(good / "transparent.png")
    files["transparent"] = good / "transparent.png"
    _rgb().convert("P").save(good / "palette.gif")
    _rgb().convert("CMYK").save(good / "cmyk.jpg")
    Image.fromarray(np.full((6, 6), 65535, np.uint16)).save(good / "sixteen.png")
    files["sixteen"] = good / "sixteen.png"
    Image.new("RGB", (1, 1), (0, 255, 0)).save(good / "tiny.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    _rgb((30, 10)).save(good / "rotated.jpg", exif=exif)
    files["rotated"] = good / "rotated.jpg"
    # bad files with image extensions
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("this is not a JPEG")
    data = (good / "plain.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(data[: len(data) // 2])
    png = (good / "gray.png").read_bytes()
    (bad / "truncated.png").write_bytes(png[:-20])
    # non-image files that should be ignored, not counted as bad
    (good / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (good / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (good / "notes.txt").write_text("labels checked by Ann")
    return files


def test_load_image_normalises_modes(tmp_path):
    files = build_hostile_folder(tmp_path / "d")
    images = [f for f in sorted((tmp_path / "d" / "good").iterdir()) if f.suffix in tk.data.IMAGE_EXTENSIONS]
    assert len(images) == 8
    for f in images:
        img = load_image(f)
        assert img.mode == "RGB", f
    assert load_image(files["transparent"]).getpixel((0, 0)) == (255, 255, 255)  # composited on white
    assert load_image(files["sixteen"]).getpixel((0, 0)) == (255, 255, 255)      # 16-bit full scale -> 255
    assert load_image(files["rotated"]).size == (10, 30)                         # EXIF orientation applied


def test_bad_files_are_found_before_training_and_listed(tmp_path):
    build_hostile_folder(tmp_path / "d")
    (tmp_path / "d" / "bad" / "ok.png").write_bytes((tmp_path / "d" / "good" / "gray.png").read_bytes())
    with pytest.warns(UserWarning, match="Left out 4 bad image"):
        bundle = prepare_data(tmp_path / "d", val_split=0)
    reasons = dict(bundle.report.bad_files)
    names = {Path(p).name for p in reasons}
    assert names == {"empty.jpg", "text.jpg", "truncated.jpg", "truncated.png"}
    assert "truncated" in reasons[str(tmp_path / "d" / "bad" / "truncated.jpg")].lower()
    ignored = {Path(p).name for p in bundle.report.ignored_files}
    assert ignored == {".DS_Store", "Thumbs.db", "notes.txt"}
    summary = bundle.report.summary()  # the ignored files are in the one-line summary, with why
    assert summary.startswith("4 bad files left out, 3 files ignored (") and "not data by their extension: notes.txt" \
        in summary and "hidden or system files: " in summary and ".DS_Store" in summary, summary
    assert len(bundle.train) == 9  # 8 good + ok.png
    for i in range(len(bundle.train)):  # everything left decodes
        bundle.train.view(transform=tk.data.eval_transform(tk.InputSpec(image_size=8)))[i]


@pytest.mark.parametrize("full", [False, True])
def test_a_whole_image_with_data_after_its_end_marker_is_used(tmp_path, full):
    """A phone's motion photo (a JPEG with a video after it) or a vendor's trailer pushes the
    end marker out of the last 1024 bytes: the file was left out as "truncated", even by a
    full scan that had decoded it whole. Whole with its marker further up, it is used; a file
    cut short stays bad."""
    files = build_hostile_folder(tmp_path / "d")
    trailer = b"\x00\x00\x00\x18ftypmp42" + bytes(np.random.default_rng(0).integers(0, 255, 4096, np.uint8))
    motion = tmp_path / "motion.jpg"
    motion.write_bytes((tmp_path / "d" / "good" / "plain.jpg").read_bytes() + trailer)
    png = tmp_path / "trailer.png"
    png.write_bytes(files["sixteen"].read_bytes() + trailer)
    assert check_image_file(str(motion), full=full) is None and check_image_file(str(png), full=full) is None
    assert load_image(motion).size == _rgb().size
    jpeg = (tmp_path / "d" / "good" / "plain.jpg").read_bytes()
    cut = tmp_path / "cut.jpg"  # cut short inside the image, a trailer after it: no end marker, no decode
    cut.write_bytes(jpeg[:-20] + trailer)
    reason = check_image_file(str(cut), full=full)  # a full scan says what the decode said
    assert reason == "truncated JPEG file (no end-of-image marker)" if not full else "cannot be read" in reason
    png_cut = tmp_path / "cut.png"  # an end marker in the data after it, and pixels that do not decode
    png_cut.write_bytes(files["sixteen"].read_bytes()[:-30] + b"IEND" + trailer)
    reason = check_image_file(str(png_cut), full=full)
    assert reason.startswith("truncated or damaged PNG file (its end-of-image marker is not at its end, and it does "
                             "not decode: ") if not full else "cannot be read" in reason, reason


def test_on_bad_file_raise_names_the_file(tmp_path):
    build_hostile_folder(tmp_path / "d")
    with pytest.raises(tk.DataError, match=r"(empty|text|truncated)\.(jpg|png).*on_bad_file='skip'"):
        prepare_data(tmp_path / "d", on_bad_file="raise")
    with pytest.raises(tk.ConfigError, match="on_bad_file"):
        prepare_data(tmp_path / "d", on_bad_file="ignore")


def test_decompression_bomb_is_reported(tmp_path, monkeypatch):
    _rgb((200, 200)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    said = r"decompression-bomb size \(40,000 pixels, over the limit of 1,000 pixels\); if the image is genuine"
    assert re.search(said, check_image_file(str(tmp_path / "big.png")))
    with pytest.raises(tk.DataError, match=said):  # the limit in force (Pillow's message names twice it)
        load_image(tmp_path / "big.png")


def test_validation_folder_uses_training_mapping_and_reports_mismatch(tmp_path):
    for split, classes in (("train", ["ant", "bee", "wasp"]), ("val", ["bee", "ant", "moth"])):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                _rgb(value=20 * i + 30).save(tmp_path / split / c / f"{c}{i}.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bundle = prepare_data(tmp_path / "train", tmp_path / "val")
    text = " ".join(str(w.message) for w in caught)
    assert "['moth']" in text and "left out" in text and "['wasp']" in text
    assert bundle.classes == ["ant", "bee", "wasp"]
    val_labels = {Path(p).parent.name: t for p, t in bundle.val.samples}
    assert val_labels == {"ant": 0, "bee": 1}


def test_duplicates_across_train_and_val_warn(tmp_path):
    for split in ("train", "val"):
        for c, v in (("a", 10), ("b", 240)):
            (tmp_path / split / c).mkdir(parents=True)
            _rgb(value=v).save(tmp_path / split / c / "x.png")
            _rgb(value=v + (3 if split == "train" else 5)).save(tmp_path / split / c / "y.png")
    with pytest.warns(UserWarning, match="hold 2 files byte-identical"):
        prepare_data(tmp_path)


def test_csv_labels_with_unknown_classes(tmp_path):
    for i in range(4):
        _rgb(value=40 * i).save(tmp_path / f"{i}.png")
    (tmp_path / "train.csv").write_text("path,label\n0.png,cat\n1.png,dog\n2.png,cat\n3.png,dog\n")
    (tmp_path / "val.csv").write_text("0.png,cat\n1.png,dog\n2.png,horse\n")
    with pytest.warns(UserWarning, match="horse"):
        bundle = prepare_data(tmp_path / "train.csv", tmp_path / "val.csv")
    assert bundle.classes == ["cat", "dog"] and len(bundle.val) == 2
    (tmp_path / "broken.csv").write_text("0.png\n")
    with pytest.raises(tk.DataError, match="path,label"):
        prepare_data(tmp_path / "broken.csv")
    (tmp_path / "missing.csv").write_text("0.png,cat\nnope.png,dog\n")
    with pytest.raises(tk.DataError, match="lists 1 missing file"):
        prepare_data(tmp_path / "missing.csv")


def test_single_class_and_empty_folders(tmp_path):
    (tmp_path / "only").mkdir()
    _rgb().save(tmp_path / "only" / "a.png")
    with pytest.raises(tk.DataError, match="single class"):
        prepare_data(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.warns(UserWarning, match="without images"), pytest.raises(tk.DataError, match="single class"):
        prepare_data(tmp_path)
    (tmp_path / "other").mkdir()
    _rgb().save(tmp_path / "other" / "b.png")
    with pytest.warns(UserWarning, match=r"\['empty'\]: each is still a class, an output of the model that no "
                                         "image trains"):  # what the warning means for the model
        assert prepare_data(tmp_path, val_split=0).classes == ["empty", "only", "other"]
    with warnings.catch_warnings():  # scored against those classes, an empty folder is no output of its own
        warnings.simplefilter("error", UserWarning)
        with pytest.raises(UserWarning, match=r"without images in .*\['empty'\]\.$"):
            prepare_data(tmp_path, val_split=0, classes=["empty", "only", "other"])


layouts = st.dictionaries(
    keys=st.text(alphabet="abcdefgh_", min_size=1, max_size=5),
    values=st.lists(st.sampled_from(["ok", "empty", "text", "note"]), max_size=4),
    max_size=4,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=layouts)
def test_any_folder_layout_gives_a_bundle_or_a_data_error(tmp_path_factory, layout):
    root = tmp_path_factory.mktemp("layout")
    for c, kinds in layout.items():
        (root / c).mkdir()
        for i, kind in enumerate(kinds):
            if kind == "ok":
                _rgb(value=30 * i).save(root / c / f"{i}.png")
            elif kind == "empty":
                (root / c / f"{i}.jpg").write_bytes(b"")
            elif kind == "text":
                (root / c / f"{i}.png").write_text("no")
            else:
                (root / c / f"{i}.txt").write_text("note")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bundle = prepare_data(root, val_split=0)
    except tk.DataError:
        return
    labels = tk.data.dataset_targets(bundle.train)
    assert len(set(labels)) >= 2 and all(0 <= t < len(bundle.classes) for t in labels)
    assert all(Path(p).suffix in (".png",) for p, _ in bundle.train.samples)


def test_finetune_reports_left_out_files(tmp_path):
    from conftest import make_image_folder

    root = make_image_folder(tmp_path / "imgs", per_class=6)
    (root / "dark" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    with pytest.warns(UserWarning, match="Left out 1 bad image"):
        r = tk.finetune("tk:small_cnn", weights=None, data=root, epochs=1, batch_size=4, image_size=16,
                        verbose=False, num_workers=0)
    assert [p.endswith("broken.jpg") for p, _ in r.data_report.bad_files] == [True]
    with pytest.raises(tk.DataError, match="broken.jpg"):
        tk.finetune("tk:small_cnn", weights=None, data=root, epochs=1, on_bad_file="raise", verbose=False)


def test_a_shorter_side_resize_of_an_extreme_strip_stays_bounded_and_keeps_the_centre_crop():
    """Resizing a 40000 x 1 strip's shorter side to 256 made a 10 million x 256 image (8 GB) in
    prediction, evaluation and training alike. The longer side is now cut first to its middle
    part that comes out 16 x 256 long; the centre crop that follows is T.Resize's, up to a shift
    of a source pixel (a smooth image: within a grey level or two); an ordinary shape's exactly."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2 as T

    from transferkit.backbones._base import InputSpec
    from transferkit.data.transforms import ShorterSideResize, eval_transform

    resize = ShorterSideResize(256, InterpolationMode.BILINEAR)
    assert resize(Image.new("RGB", (40000, 1))).size == (4096, 256)
    assert resize(Image.new("RGB", (2, 30000))).size == (256, 4096)
    spec, reference = InputSpec(image_size=224, resize_size=256), T.Compose([
        T.Resize(256, antialias=True), T.CenterCrop(224), T.PILToTensor()])
    ramp = np.tile(np.linspace(0, 255, 4999)[None, :, None], (250, 1, 3)).astype(np.uint8)  # 0.05 levels a pixel
    strip = Image.fromarray(ramp)
    got, expected = eval_transform(spec)(strip), reference(strip)
    assert resize(strip).size == (4096, 256) and (got.int() - expected.int()).abs().max() <= 2
    ordinary = Image.fromarray(np.random.default_rng(0).integers(0, 255, (250, 3000, 3), dtype=np.uint8))
    assert torch.equal(eval_transform(spec)(ordinary), reference(ordinary))


def test_export_md_s_preparation_by_hand_gives_the_predictor_s_pixels(tmp_path):
    """export.md spells out how a program without transferkit prepares a JPEG for the module
    (draft mode, EXIF orientation, RGB, resize and crop); it said that leaving draft mode out
    moved scores by a few thousandths, where on small models it changes labels."""
    import io

    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2 as T

    from transferkit.backbones._base import InputSpec
    from transferkit.export.inputs import InputPipeline

    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 255, (30, 40, 3)), np.ones((10, 10, 1))).astype(np.uint8)  # 300 x 400
    exif = Image.Exif()
    exif[0x0112] = 6  # to be turned upright
    path = tmp_path / "photo.jpg"
    Image.fromarray(smooth).save(path, quality=90, exif=exif.tobytes())
    for spec in (InputSpec(image_size=32), InputSpec(image_size=24, resize_size=28, interpolation="bicubic")):
        r = spec.resize_size or spec.image_size
        how = InterpolationMode(spec.interpolation)
        size = T.Compose(([T.Resize(r, how, antialias=True), T.CenterCrop(spec.image_size)] if spec.resize_size
                          else [T.Resize((r, r), how, antialias=True)]) + [T.PILToTensor()])

        def by_hand(draft: bool) -> torch.Tensor:
            im = Image.open(io.BytesIO(path.read_bytes()))
            if draft:
                im.draft("RGB", (r, r))
            return size(ImageOps.exif_transpose(im).convert("RGB"))

        want = InputPipeline(spec).prepare(str(path))
        assert torch.equal(by_hand(draft=True), want), spec
        assert not torch.equal(by_hand(draft=False), want), spec
