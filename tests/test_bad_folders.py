"""Hostile image folders built from scratch: hidden and unreadable sub-folders, classes
emptied by bad files, files that break after the pre-scan, and split layouts
(``train/`` + ``test/``, ``valid/``, ...) resolved by the one rule the recipes share."""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import damaged_png, make_image_folder
from PIL import Image

import transferkit as tk
from transferkit.data import check_image_file, dataset_targets, eval_transform, find_split_folders, prepare_data
from transferkit.data.decoded import decoded_dataset
from transferkit.data.late import BadFileError
from transferkit.recipes import image_folder_splits
from transferkit.train.loaders import make_loader

SPEC = tk.InputSpec(image_size=16)


def _png(path: Path, value: int = 128, size: int = 20) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)
    return path


def _quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


def test_hidden_folders_are_ignored_and_listed(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=4)
    thumbs = [_png(root / "dark" / ".thumbnails" / f"t{i}.png", 250) for i in range(3)]  # light pixels in 'dark'
    _png(root / "dark" / ".ipynb_checkpoints" / "x.png")
    _png(root / ".ipynb_checkpoints" / "y.png")  # at the top: not a class either
    _png(root / "__MACOSX" / "dark" / "z.png")
    bundle = prepare_data(root, val_split=0)
    assert bundle.classes == ["dark", "light"] and len(bundle.train) == 8
    assert not any(str(t) in {p for p, _ in bundle.train.samples} for t in thumbs)
    ignored = {str(Path(p).relative_to(root)) for p in bundle.report.ignored_folders}
    assert ignored == {"dark/.thumbnails", "dark/.ipynb_checkpoints", ".ipynb_checkpoints", "__MACOSX"}
    assert "2 hidden" not in bundle.report.summary() and "4 hidden folders ignored" in bundle.report.summary()


def test_images_the_scan_leaves_out_are_said(tmp_path):
    """JPEGs named .jfif or .jpe, and AVIF files, were ignored as "not data by their extension",
    images directly in the data folder left no trace, and a link loop counted as a hidden
    folder: training went on with fewer images and nothing said why."""
    root = make_image_folder(tmp_path / "d", per_class=4)
    Image.fromarray(np.full((20, 20, 3), 30, np.uint8)).save(root / "dark" / "x.jfif", format="JPEG")
    Image.fromarray(np.full((20, 20, 3), 30, np.uint8)).save(root / "dark" / "y.JPE", format="JPEG")
    avif = ".avif" in tk.data.IMAGE_EXTENSIONS  # Pillow 11.2 or later reads AVIF
    if avif:
        Image.fromarray(np.full((20, 20, 3), 220, np.uint8)).save(root / "light" / "z.avif")
    Image.fromarray(np.full((20, 20, 3), 220, np.uint8)).save(root / "light" / "icon.ico")
    for name in ("3f9a0c", "b71e22"):  # downloads named by a hash, without an extension
        Image.fromarray(np.full((20, 20, 3), 220, np.uint8)).save(root / "light" / name, format="PNG")
    (root / "light" / "NOTES").write_text("not an image")
    os.mkfifo(root / "light" / "pipe")  # not read: opening it would wait for a writer
    _png(root / "stray.png")
    (root / "dark" / "loop").symlink_to(root / "dark", target_is_directory=True)
    with pytest.warns(UserWarning) as caught:
        bundle = prepare_data(root, val_split=0)
    assert len(bundle.train) == 10 + avif
    assert {"x.jfif", "y.JPE", *["z.avif"] * avif} <= {Path(p).name for p, _ in bundle.train.samples}
    said = [str(w.message) for w in caught]
    assert any(m.startswith("1 image lies directly in") and "'stray.png'" in m and "move it into its class's folder"
               in m for m in said)
    assert any(m.startswith("1 image file of a type not read (.ico; e.g. 'icon.ico') is left out") for m in said)
    assert "2 images without an extension (e.g. '3f9a0c', PNG) are left out: images are chosen by their extension " \
        "(.jpg," in " ".join(said) and "Rename them (e.g. '3f9a0c' to '3f9a0c.png')." in " ".join(said), said
    summary = bundle.report.summary()
    assert "images of a type not read: icon.ico" in summary and "outside the class folders: stray.png" in summary
    assert "hidden folder" not in summary and "1 linked folder ignored (a link back into a folder already walked" \
        in summary
    for p in root.rglob("*.png"):  # images only beside the class folders: the error says where they are
        if p.parent != root:
            p.unlink()
    for p in [*root.rglob("*.j*"), *root.rglob("*.avif"), *root.rglob("*.JPE")]:
        p.unlink()
    with pytest.raises(tk.DataError, match=r"No images found .* 1 image lies directly in .*'stray.png'"):
        _quiet(prepare_data, root, val_split=0)


def test_class_folders_that_differ_only_in_surrounding_spaces_are_refused(tmp_path):
    """'cat' and 'cat ' were two classes that print alike."""
    _png(tmp_path / "d" / "cat" / "a.png")
    _png(tmp_path / "d" / "cat " / "b.png", 200)
    with pytest.raises(tk.DataError, match=r"the class names 'cat' and 'cat ' differ only in surrounding spaces"):
        prepare_data(tmp_path / "d", val_split=0)
    _png(tmp_path / "e" / "Cat" / "a.png")  # case alone: two classes (EMNIST's 'A' and 'a')
    _png(tmp_path / "e" / "cat" / "b.png", 200)
    assert _quiet(prepare_data, tmp_path / "e", val_split=0).classes == ["Cat", "cat"]


def test_unreadable_folder_is_reported(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "d", per_class=4)
    locked = root / "light" / "more"
    _png(locked / "a.png")
    real = os.scandir

    def scandir(path="."):  # what chmod 000 does for a user who is not root
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.warns(UserWarning, match=r"Cannot read folder .*more.*Permission denied"):
        bundle = prepare_data(root, val_split=0)
    assert [(Path(p).name, r) for p, r in bundle.report.unreadable_folders] == [("more", "PermissionError: "
                                                                                         "Permission denied")]
    assert len(bundle.train) == 8 and "1 unreadable folder skipped" in bundle.report.summary()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads chmod-000 folders")
def test_chmod_000_folder_is_reported(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=4)
    _png(root / "light" / "locked" / "a.png")
    os.chmod(root / "light" / "locked", 0)
    try:
        with pytest.warns(UserWarning, match="Cannot read folder"):
            bundle = prepare_data(root, val_split=0)
        assert [Path(p).name for p, _ in bundle.report.unreadable_folders] == ["locked"]
    finally:
        os.chmod(root / "light" / "locked", 0o755)


def test_class_left_empty_by_bad_files_is_reported_like_an_empty_class(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=("a", "b", "c"), per_class=3)
    for f in (root / "c").iterdir():
        f.write_bytes(b"")  # every file of class c is bad
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bundle = prepare_data(root, val_split=0)
    text = " | ".join(str(w.message) for w in caught)
    assert "Class folders without readable images" in text and "['c']" in text
    assert bundle.classes == ["a", "b", "c"]  # like an empty class folder: kept, with the warning
    two = make_image_folder(tmp_path / "e", classes=("a", "b"), per_class=2)
    for f in (two / "b").iterdir():
        f.write_bytes(b"junk")
    with pytest.raises(tk.DataError, match="single class"):
        _quiet(prepare_data, two, val_split=0)
    for f in (two / "a").iterdir():
        f.write_bytes(b"junk")  # every file: the count and the first with its reason (it was a list of tuples)
    first = sorted((two / "a").iterdir())[0]
    with pytest.raises(tk.DataError, match=rf"No readable images under '.*e': every file was bad \(4 files; the "
                                           rf"first, '{first}': cannot be read as an image \(.*\)\)\.$"):
        _quiet(prepare_data, two, val_split=0)
    split = tmp_path / "split"  # two bad training files, every validation file bad: the validation files are said
    make_image_folder(split / "train", per_class=3)
    make_image_folder(split / "val", per_class=2, seed=1)
    for f in [*sorted((split / "train").rglob("*.*"))[:2], *(split / "val").rglob("*.*")]:
        f.write_bytes(b"junk")
    with pytest.raises(tk.DataError, match=r"under '.*val': every file was bad \(4 files; the first, '.*val"):
        _quiet(prepare_data, split)


@pytest.mark.parametrize("workers", [0, 2])
def test_decode_failure_during_training_is_replaced_counted_and_reported(tmp_path, workers):
    root = make_image_folder(tmp_path / "d", per_class=4)
    damaged = damaged_png(root / "dark" / "damaged.png")
    assert check_image_file(str(damaged)) is None and check_image_file(str(damaged), full=True)
    bundle = prepare_data(root, val_split=0)
    ds = bundle.train.view(transform=eval_transform(SPEC))
    loader = make_loader(ds, batch_size=3, shuffle=False, device=torch.device("cpu"), num_workers=workers)
    with pytest.warns(UserWarning, match="damaged.png.*failed to load during the run"):
        labels = [y for _ in range(2) for _, y in loader]  # two epochs
    assert [len(y) for y in labels[:3]] == [3, 3, 3]  # batch sizes are kept
    assert torch.cat(labels[:3]).tolist() == [0] * 5 + [1] * 4  # its place is taken by its own class
    assert bundle.report.bad_at_load == [str(damaged)]  # once, though it failed in two epochs
    assert "OSError" in dict(bundle.report.bad_files)[str(damaged)]
    assert "1 of them failed to load during the run" in bundle.report.summary()


@pytest.mark.parametrize("policy, cache", [("full", False), ("feature_extraction", True)])
def test_a_class_whose_every_training_file_fails_to_load_is_reported_as_never_trained(tmp_path, policy, cache):
    """Its samples are replaced by other classes' files with their own labels: the warnings
    said "the next readable file with its label takes its place", and the class was exported
    untrained without a word. The same when the frozen features are stored in cache_dir (the
    rows masked); a class whose validation files alone fail is trained, and not listed."""
    root = make_image_folder(tmp_path / "d", per_class=6, size=16)
    (root / "zebra").mkdir()
    for name in ("a.png", "b.png", "c.png"):
        damaged_png(root / "zebra" / name)
    val = make_image_folder(tmp_path / "v", per_class=2, size=16)
    for f in (val / "dark").iterdir():
        damaged_png(f)
    (val / "zebra").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(val / "zebra" / "ok.png")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        r = tk.finetune("tk:small_cnn", weights=None, data=root, val_data=val, epochs=1, batch_size=4, image_size=16,
                        policy=policy, verbose=False, num_workers=0,
                        cache_dir=tmp_path / "cache" if cache else None)
    assert r.classes == ["dark", "light", "zebra"] and r.data_report.lost_classes == ["zebra"]
    lost = [str(w.message) for w in seen if "No training file of class" in str(w.message)]
    assert len(lost) == 1 and "'zebra' loaded" in lost[0] and "never trained" in lost[0]
    assert "1 class with no training file that loaded, never trained (zebra)" in r.data_report.summary()


@pytest.mark.parametrize("how", ["feature store", "features in memory", "images every epoch"])
def test_a_validation_file_that_fails_to_load_counts_in_no_metric(tmp_path, monkeypatch, how):
    """Its row took the next readable image of its class, and the run's accuracy, confusion
    matrix and the accuracy the export records counted that image twice, while the warning
    said the file was left out; `evaluate` on the same folder gave other figures."""
    root = tmp_path / "d"
    make_image_folder(root / "train", per_class=6, size=16)
    make_image_folder(root / "val", per_class=4, size=16, seed=1)
    damaged = damaged_png(sorted((root / "val" / "light").glob("*.png"))[0])  # passes scan="quick"
    kw = {"feature store": dict(cache_dir=tmp_path / "cache"), "features in memory": {},
          "images every epoch": dict(policy="full", decode_once=False)}[how]
    import transferkit.train.interpret as interpret

    drawn = []  # the grids the run draws: how many validation rows they stand for
    real_grid = interpret._grid
    monkeypatch.setattr(interpret, "_grid", lambda ds, *a, **k: drawn.append(len(ds)) or real_grid(ds, *a, **k))
    with pytest.warns(UserWarning, match=f"Left out '{damaged}'"):
        r = tk.finetune("tk:small_cnn", weights=None, data=root, epochs=2, batch_size=4, image_size=16,
                        verbose=False, num_workers=0, precision="fp32", export=tmp_path / "m.pt",
                        plots_dir=tmp_path / "plots", **kw)
    assert r.data_report.bad_at_load == [str(damaged)]
    ev = tk.evaluate(tmp_path / "m.pt", root / "val", progress=False)
    assert len(ev.files) == 7
    assert r.metrics["confusion_matrix"] == ev.confusion_matrix.tolist()
    assert sum(row["support"] for c, row in r.metrics["per_class"].items() if c in ("dark", "light")) == 7
    assert r.metrics["accuracy"] == pytest.approx(ev.accuracy)
    assert r.history[-1]["val_acc"] == pytest.approx(ev.accuracy)  # the figure that picks the best epoch
    assert len(r.val_logits) == 8  # still one row per validation file, in their order
    assert int(r.val_kept.sum()) == 7  # the damaged file's row is not counted
    r.show_results(path=tmp_path / "again.png")
    assert drawn == [7, 7, 7]  # show_results and top_losses of the run, then the result's show_results
    wrong = int((torch.tensor(ev.confusion_matrix).sum() - torch.tensor(ev.confusion_matrix).trace()))
    assert sum(c for _, _, c in r.most_confused()) == wrong
    if how == "features in memory":
        assert r.feature_report["masked_samples"] == 1


@pytest.mark.parametrize("cache", [False, True])
def test_the_probe_chooses_c_on_the_validation_files_that_loaded(tmp_path, monkeypatch, cache):
    """Features held in memory: the probe chose C on 8 validation rows, one of them another
    file's features; the feature store's rows were 7."""
    import transferkit.train.probe as probe

    root = tmp_path / "d"
    make_image_folder(root / "train", per_class=6, size=16)
    make_image_folder(root / "val", per_class=4, size=16, seed=1)
    damaged_png(sorted((root / "val" / "light").glob("*.png"))[0])
    rows = []
    real = probe.fit_logistic_probe
    monkeypatch.setattr(probe, "fit_logistic_probe", lambda x, y, vx, vy, **k: rows.append(len(vy)) or
                        real(x, y, vx, vy, **k))
    with pytest.warns(UserWarning, match="Left out"):
        tk.linear_probe("tk:small_cnn", weights=None, data=root, image_size=16, verbose=False, num_workers=0,
                        precision="fp32", cache_dir=tmp_path / "cache" if cache else None)
    assert rows == [7]


def test_a_validation_folder_whose_every_file_is_damaged_is_said(tmp_path):
    root = tmp_path / "d"
    make_image_folder(root / "train", per_class=6, size=16)
    make_image_folder(root / "val", per_class=2, size=16, seed=1)
    for f in (root / "val").rglob("*.*"):
        damaged_png(f)
    with pytest.raises(tk.DataError, match=r"None of the 4 files of this dataset \(under '.*/d/val'\) can be loaded "
                                        r"any more \(e.g. .*val.*"
                                        r"or are its files all damaged\?"):
        _quiet(tk.finetune, "tk:small_cnn", weights=None, data=root, image_size=16, epochs=1, verbose=False,
               num_workers=0, scan="none", policy="full")


def test_a_training_file_that_fails_while_features_are_computed_in_memory_is_left_out(tmp_path):
    """Its row took the next readable image of its class, which the head then fitted twice."""
    root = tmp_path / "d"
    make_image_folder(root / "train", per_class=6, size=16)
    make_image_folder(root / "val", per_class=2, size=16, seed=1)
    kw = dict(weights=None, epochs=1, image_size=16, verbose=False, num_workers=0, precision="fp32")
    without = tk.linear_probe("tk:small_cnn", data=root, **kw)
    damaged_png(root / "train" / "dark" / "dark_99.png")  # listed last of its class: its place goes to dark_0
    with pytest.warns(UserWarning, match="dark_99.png"):
        probe = tk.linear_probe("tk:small_cnn", data=root, **kw)
    assert probe.feature_report["masked_samples"] == 1
    stored = _quiet(tk.linear_probe, "tk:small_cnn", data=root, cache_dir=tmp_path / "cache", **kw)
    # the masked row counts in the samples, as in a store on disk (it was left out of the count in memory)
    assert probe.feature_report["splits"]["train"]["samples"] == stored.feature_report["splits"]["train"]["samples"] \
        == 13
    for k, v in without.model.head.state_dict().items():
        torch.testing.assert_close(probe.model.head.state_dict()[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_a_file_that_fails_while_worker_processes_decode_images_once_is_reported(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=4)
    damaged = damaged_png(root / "dark" / "damaged.png")
    bundle = prepare_data(root, val_split=0)
    with pytest.warns(UserWarning, match="damaged.png.*failed to load during the run"):
        ds, plan = decoded_dataset(bundle.train, SPEC, augment="none", num_workers=2)
    assert plan.mode == "memory" and len(ds) == 9
    assert bundle.report.bad_at_load == [str(damaged)]  # was []: what the workers met stayed in the workers


def test_a_failed_file_replaced_by_a_larger_image_while_decoding_once(tmp_path):
    """Space for the decoded pixels comes from the image headers; a damaged file replaced by a
    wide image of its class overflowed it and the run crashed ("more pixels than its header
    promised"). In memory the space grows; on disk the run decodes every epoch, saying why."""
    root = make_image_folder(tmp_path / "d", per_class=4)
    damaged = damaged_png(root / "dark" / "a_damaged.png")
    Image.fromarray(np.full((24, 600, 3), 50, np.uint8)).save(root / "dark" / "b_wide.png")  # takes its place
    bundle = prepare_data(root, val_split=0)
    with pytest.warns(UserWarning, match="a_damaged.png.*failed to load during the run"):
        ds, plan = decoded_dataset(bundle.train, SPEC, augment="standard", num_workers=0)
    assert plan.mode == "memory" and len(ds) == 10 and bundle.report.bad_at_load == [str(damaged)]
    wide = ds.image(1).shape
    assert ds.image(0).shape == wide and wide[2] > 10 * wide[1]  # the wide image, twice
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ds, plan = decoded_dataset(bundle.train, SPEC, augment="standard", num_workers=0, cache_dir=tmp_path / "c")
    said = " | ".join(str(w.message) for w in seen)
    assert plan.mode == "off" and "more than the space reserved from the image headers (a file that failed to " \
        "load was replaced by a larger image of its class); decoding every epoch instead" in said, said
    assert len(ds) == 10 and not list((tmp_path / "c" / "decoded").iterdir())  # no half entry left


def test_decode_failure_in_raise_mode_names_the_file_in_one_line(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=4)
    damaged_png(root / "dark" / "damaged.png")
    bundle = prepare_data(root, val_split=0, on_bad_file="raise")
    ds = bundle.train.view(transform=eval_transform(SPEC))
    loader = make_loader(ds, batch_size=3, shuffle=False, device=torch.device("cpu"), num_workers=1)
    with pytest.raises(BadFileError) as err:
        list(loader)
    assert str(err.value).startswith("Cannot read image ") and "damaged.png" in str(err.value)
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)
    assert isinstance(err.value, tk.DataError)


def test_finetune_result_lists_a_file_that_broke_after_the_scan(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=6)
    damaged_png(root / "light" / "damaged.png")
    r = _quiet(tk.finetune, "tk:small_cnn", weights=None, data=root, epochs=1, batch_size=4, image_size=16,
               policy="full", verbose=False, num_workers=0, val_split=0.25)
    assert [Path(p).name for p in r.data_report.bad_at_load] == ["damaged.png"]
    assert np.isfinite(r.history[-1]["train_loss"])


def _split_layout(root: Path, *splits: str, classes=("ants", "bees")) -> Path:
    for i, s in enumerate(splits):
        make_image_folder(root / s, classes=classes, per_class=3, seed=i)
    return root


@pytest.mark.parametrize("held_out", ["val", "valid", "validation", "dev", "test"])
def test_a_held_out_folder_next_to_train_is_the_validation_split(tmp_path, held_out):
    root = _split_layout(tmp_path / "data", "train", held_out)
    bundle = prepare_data(root)
    assert bundle.classes == ["ants", "bees"]  # not ["test", "train"]
    assert {Path(p).parts[-3] for p, _ in bundle.val.samples} == {held_out}
    assert {Path(p).parts[-3] for p, _ in bundle.train.samples} == {"train"}
    recipe = image_folder_splits(root)  # the recipes use the same rule
    assert recipe.train == root / "train"
    assert (recipe.test if held_out == "test" else recipe.val) == root / held_out
    with pytest.warns(UserWarning, match=rf"val_split=0.5 is not used: '.*data' holds its own validation data \(its "
                                         rf"{held_out}/ folder\)"):  # was: ignored without a word
        assert len(prepare_data(root, val_split=0.5).val) == len(bundle.val)


def test_a_split_layout_given_with_val_data_trains_on_its_train_folder(tmp_path):
    """It was read as two classes, 'train' and 'val', and the error then told the user to
    rename val_data's class folders."""
    root = _split_layout(tmp_path / "data", "train", "val")
    other = _split_layout(tmp_path / "other", "val") / "val"
    with pytest.warns(UserWarning, match=r"is a split layout: training uses its train/, and val_data= validates; "
                                         r"its val/ is not used"):
        bundle = prepare_data(root, val_data=other)
    assert bundle.classes == ["ants", "bees"]
    assert {Path(p).parts[-3] for p, _ in bundle.train.samples} == {"train"}
    assert {Path(p).parent.parent for p, _ in bundle.val.samples} == {other}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert prepare_data(root, val_data=root / "val").classes == ["ants", "bees"]
    assert not [w for w in seen if "not used" in str(w.message)]  # its own val/ as val_data: nothing left unused


def test_copies_within_a_class_that_val_split_puts_on_both_sides_are_warned_about(tmp_path):
    """A validation folder's copies of training files were warned about; the same copies held
    out by val_split (a file twice in one class folder) were not."""
    root = make_image_folder(tmp_path / "d", per_class=10, size=16)
    for f in list((root / "dark").iterdir())[:5]:
        (f.parent / f"copy_{f.name}").write_bytes(f.read_bytes())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        bundle = prepare_data(root, val_split=0.5, seed=0)
    said = [str(w.message) for w in seen if "byte-identical to training files" in str(w.message)]
    names = lambda ds: {Path(p).name.removeprefix("copy_") for p, _ in ds.samples}  # noqa: E731
    straddle = names(bundle.train) & names(bundle.val)
    assert straddle and len(said) == 1 and said[0].startswith(f"Validation data hold {len(straddle)} file")


def test_files_added_to_a_folder_move_at_most_one_file_per_class_across_the_split(tmp_path):
    """The split was a seeded permutation of the sorted list: one image added to a class moved
    earlier validation images into training, so a model trained after it had seen images the
    earlier model was validated on. A copy of the folder elsewhere splits the same."""
    root = make_image_folder(tmp_path / "d", per_class=20, size=16)

    def held_out(data):
        folder = data.parent if data.suffix == ".csv" else data
        bundle = _quiet(prepare_data, data, val_split=0.25)
        return {Path(p).relative_to(folder).as_posix() for p, _ in bundle.val.samples}

    before = held_out(root)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "dark" / "dark_new.png")
    after = held_out(root)
    moved = (before ^ after) - {"dark/dark_new.png"}
    assert len(moved) <= 1 and all(m.startswith("dark/") for m in moved), moved
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(root, copy)
    assert held_out(copy) == after
    # a CSV's files, by their path from the CSV's folder: one added in another folder moves no other
    listing = tmp_path / "list.csv"
    files = sorted(root.rglob("*.*"))
    listing.write_text("".join(f"{p.relative_to(tmp_path).as_posix()},{p.parent.name}\n" for p in files))
    before = held_out(listing)
    (tmp_path / "more").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "more" / "x.png")
    listing.write_text(listing.read_text() + "more/x.png,light\n")
    moved = (before ^ held_out(listing)) - {"more/x.png"}
    assert len(moved) <= 1, moved


def test_split_layout_edge_cases(tmp_path):
    both = _split_layout(tmp_path / "both", "train", "val", "test")
    with pytest.warns(UserWarning, match="test/ is not used"):
        bundle = prepare_data(both)
    assert {Path(p).parts[-3] for p, _ in bundle.val.samples} == {"val"}
    assert image_folder_splits(both).test == both / "test"
    two = _split_layout(tmp_path / "two", "train", "val", "valid")
    with pytest.raises(tk.DataError, match=r"several validation folders \['val', 'valid'\]"):
        prepare_data(two)
    capital = _split_layout(tmp_path / "capital", "Training", "Val")  # Kaggle's spelling: splits, not two classes
    bundle = prepare_data(capital)
    assert bundle.classes == ["ants", "bees"] and {Path(p).parts[-3] for p, _ in bundle.val.samples} == {"Val"}
    assert image_folder_splits(capital).train == capital / "Training"
    beside = _split_layout(tmp_path / "beside", "Train")
    (beside / "notes").mkdir()  # a recipe's data folder: Train/ beside another folder is still its training data
    assert image_folder_splits(beside).train == beside / "Train"
    with pytest.raises(tk.DataError, match=r"several training folders \['Train', 'training'\]"):
        prepare_data(_split_layout(tmp_path / "twice", "Train", "training", "val"))
    alone = _split_layout(tmp_path / "alone", "train")
    assert find_split_folders(alone).held_out is None
    assert prepare_data(alone).classes == ["ants", "bees"]  # train/ alone: a split of it validates


def test_class_names_that_look_like_splits_warn(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=("bus", "car", "train"), per_class=2)
    assert find_split_folders(root) is None  # 'train' among other classes is a class
    with pytest.warns(UserWarning, match=r"Class folder names \['train'\] .* look like split names"):
        bundle = prepare_data(root, val_split=0)
    assert bundle.classes == ["bus", "car", "train"]
    nested = _split_layout(tmp_path / "nested", "train", "test", classes=("train", "test"))
    with pytest.warns(UserWarning, match="look like split names"):
        prepare_data(nested / "train", val_split=0)


def test_validation_folder_sharing_no_class_is_a_clear_error(tmp_path):
    make_image_folder(tmp_path / "train", classes=("ants", "bees"), per_class=3)
    make_image_folder(tmp_path / "val", classes=("cats", "dogs"), per_class=3)
    with pytest.raises(tk.DataError, match=r"shares no class with the classes it is read for: its class folders "
                                           r"are \['cats', 'dogs'\], the classes \['ants', 'bees'\]"):
        prepare_data(tmp_path / "train", tmp_path / "val")
    with pytest.raises(tk.DataError, match=r"'.*train' shares no class .* the classes \['Ants', 'Bees'\] \(classes= "
                                           r"for training data.* the folder 'ants' differs from the class 'Ants', the "
                                           r"folder 'bees' differs from the class 'Bees' only in case"):
        prepare_data(tmp_path / "train", classes=["Ants", "Bees"])  # the training folder: classes= is wrong
    make_image_folder(tmp_path / "cased", classes=("Ants", "bees"), per_class=3)
    with pytest.warns(UserWarning, match=r"class folders \['Ants'\] that are not among the classes it is read for"
                                         r".* the "
                                         r"folder 'Ants' differs from the class 'ants' only in case"):
        prepare_data(tmp_path / "train", tmp_path / "cased")
    with pytest.raises(tk.DataError, match=r"It holds split folders \(train, val\): point at one of them, e.g. "
                                           r"'.*val'"):  # validation data given one level too high
        prepare_data(tmp_path / "train", tmp_path)


def test_class_folders_in_two_unicode_forms_are_one_class(tmp_path):
    """A class folder named on macOS (decomposed, NFD: 'cafe' and a combining accent) beside one
    named on Linux (composed, NFC): the validation images of that class were left out with a
    warning naming two classes that print alike; in one folder the two were two classes."""
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    make_image_folder(tmp_path / "train", classes=(composed, "tea"), per_class=3)
    make_image_folder(tmp_path / "val", classes=(decomposed, "tea"), per_class=2, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no folder left out, no class missing
        bundle = prepare_data(tmp_path / "train", tmp_path / "val")
    assert bundle.classes == [composed, "tea"] and sorted(dataset_targets(bundle.val)) == [0, 0, 1, 1]
    from transferkit.data.folders import scan_csv

    table = tmp_path / "val.csv"  # a CSV's labels too
    table.write_text("".join(f"{p},{p.parent.name}\n" for p in sorted((tmp_path / "val").rglob("*.*"))))
    samples, classes = scan_csv(table, [composed, "tea"], purpose="scoring")
    assert classes == [composed, "tea"] and sorted(label for _, label in samples) == [0, 0, 1, 1]
    with pytest.raises(tk.DataError, match="classes=: the class names .* are one name written in two Unicode forms"):
        prepare_data(tmp_path / "train", val_split=0, classes=[composed, decomposed, "tea"])  # one output never trained
    make_image_folder(tmp_path / "both", classes=(composed, decomposed), per_class=2)
    with pytest.raises(tk.DataError, match=r"the class names '.*' and '.*' are one name written in two Unicode forms "
                                           r"\(both print as 'café'\).*rename 'cafe\\u0301' to 'caf\\xe9'"):
        prepare_data(tmp_path / "both", val_split=0)


def test_a_class_with_a_single_image_is_named_as_never_validated(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=4)
    _png(root / "rare" / "only.png", 200)
    with pytest.warns(UserWarning, match=r"1 class of 3 has no validation example: 'rare' \(1 example\)\. They are "
                                         r"trained on but never validated.*Add examples.*val_data=, or a val/ folder"):
        bundle = prepare_data(root, val_split=0.25)
    assert "rare" not in {bundle.classes[t] for t in bundle.val.targets} and len(bundle.report.warnings) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every class validated: no warning
        prepare_data(make_image_folder(tmp_path / "even", per_class=4), val_split=0.25)
    (root / "empty").mkdir()  # a class without images: counted apart, not among those that could be validated
    with pytest.warns(UserWarning) as said:
        prepare_data(root, val_split=0.25)
    assert any("1 class of the 3 with training examples has no validation example: 'rare'" in str(w.message)
               for w in said), [str(w.message) for w in said]


def test_a_dataset_s_own_class_names_are_matched_by_name(tmp_path):
    """A Dataset that names its classes (torchvision's ImageFolder, transferkit's) is read by
    those names: ``classes=`` in another order or a subset relabels (and leaves out) its items,
    and validation data whose classes are a subset meet the training classes by name (their
    labels used to be taken as the training indices: 'cat' scored as 'bee')."""
    import torchvision

    from transferkit.data import ImageFolderDataset, dataset_targets
    from transferkit.data.fingerprint import data_fingerprint

    tr = make_image_folder(tmp_path / "tr", classes=("ant", "bee", "cat"), per_class=2)
    va = make_image_folder(tmp_path / "va", classes=("ant", "cat"), per_class=2, seed=1)
    b = prepare_data(torchvision.datasets.ImageFolder(str(tr)), classes=["cat", "bee", "ant"], val_split=0)
    assert dataset_targets(b.train) == [b.train[i][1] for i in range(6)] == [2, 2, 1, 1, 0, 0]
    for kind in (torchvision.datasets.ImageFolder, ImageFolderDataset):
        b = prepare_data(kind(str(tr)), val_data=kind(str(va)))
        assert b.classes == ["ant", "bee", "cat"] and dataset_targets(b.val) == [0, 0, 2, 2], kind
    with pytest.warns(UserWarning, match=r"items of 1 class not among the classes \['cat', 'ant'\] are left out"):
        b = prepare_data(ImageFolderDataset(str(tr)), classes=["cat", "ant"], val_split=0)
    assert dataset_targets(b.train) == [1, 1, 0, 0]
    renamed = prepare_data(torchvision.datasets.ImageFolder(str(tr)), classes=["a", "b", "c"], val_split=0)
    assert dataset_targets(renamed.train) == [0, 0, 1, 1, 2, 2]  # no shared name: classes= names the labels
    ids = make_image_folder(tmp_path / "ids", classes=("n01", "n02"), per_class=1)
    with pytest.raises(tk.DataError, match=r"The classes of the validation dataset \(\['n01', 'n02'\]\) include no "
                                           r"class of the training data"):  # not read as 'ant' and 'bee'
        prepare_data(torchvision.datasets.ImageFolder(str(tr)), val_data=torchvision.datasets.ImageFolder(str(ids)))
    # the order is part of the data's identity (cached features carry their targets)
    same = [prepare_data(torchvision.datasets.ImageFolder(str(tr)), classes=c, val_split=0).train
            for c in (["ant", "bee", "cat"], ["cat", "bee", "ant"])]
    assert data_fingerprint(same[0]) != data_fingerprint(same[1])
    more = prepare_data(torchvision.datasets.ImageFolder(str(tr)), classes=["ant", "bee", "cat", "dog"], val_split=0)
    assert data_fingerprint(more.train) == data_fingerprint(same[0])  # the same labels: the same identity
    unlabelled = torchvision.datasets.ImageFolder(str(tr))
    unlabelled.targets = [-1] * len(unlabelled.targets)  # STL10's unlabelled split: -1, beside its class names
    unlabelled.samples = [(p, -1) for p, _ in unlabelled.samples]
    with pytest.raises(tk.DataError, match=r"Training labels \[-1\] are outside 0..2"):
        prepare_data(unlabelled, classes=["cat", "bee", "ant"], val_split=0)


def test_a_dataset_without_a_targets_attribute_is_loaded_once_for_its_labels(tmp_path):
    """Its labels are read by loading each item (decoding it): once, however many steps
    (relabelling by name, the split, the checks) need them."""
    import collections

    import torchvision

    folder = torchvision.datasets.ImageFolder(str(make_image_folder(tmp_path / "tr", classes=("a", "b", "c"))))

    class Untargeted(torch.utils.data.Dataset):
        classes = folder.classes

        def __init__(self):
            self.loads = collections.Counter()

        def __len__(self):
            return len(folder)

        def __getitem__(self, i):
            self.loads[i] += 1
            return folder[i]

    ds = Untargeted()
    b = prepare_data(ds, classes=["c", "a", "b"], val_split=0.25)
    assert set(ds.loads.values()) == {1} and len(ds.loads) == len(folder)
    assert sorted(dataset_targets(b.train) + dataset_targets(b.val)) == sorted([1, 2, 0] * 12)
    assert set(ds.loads.values()) == {1}


def test_a_dataset_with_names_for_labels_is_told_what_labels_must_be():
    img = Image.fromarray(np.zeros((20, 20, 3), np.uint8))
    with pytest.raises(tk.DataError, match=r"labels are class indices \(0, 1, ...\); item 0's label is 'ant'"):
        prepare_data([(img, "ant"), (img, "bee")] * 3, val_split=0)
    # integers in any form (numpy, one-element tensors, whole floats, bools) are class indices
    labels = [np.int64(0), torch.tensor(1), 1.0, True, 0, np.float32(0.0)]
    train = prepare_data([(img, y) for y in labels], val_split=0).train
    assert [train[i][1] for i in range(6)] == [0, 1, 1, 1, 0, 0]
    assert prepare_data([(img, "1"), (img, "0")] * 2, val_split=0).train[0][1] == 1  # a class index as text
    with pytest.raises(tk.DataError, match="item 0's label is '²'"):
        prepare_data([(img, "²"), (img, "0")] * 2, val_split=0)

    class Named(torch.utils.data.Dataset):  # its labels in a targets attribute, read without its items
        targets = ["ant", "bee"] * 2

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return img, self.targets[i]

    with pytest.raises(tk.DataError, match="item 0's label is 'ant'"):
        prepare_data(Named(), val_split=0)


def test_a_split_that_holds_out_nothing_trains_without_validation(tmp_path):
    """Every class has a single image: `val_split` keeps them all for training, and the run
    trained on an empty validation set until torch.cat failed on it."""
    make_image_folder(tmp_path / "one", per_class=1, size=16)
    with pytest.warns(UserWarning, match=r"val_split=0.2 held out no example \(2 in all\), so the run has no "
                                         "validation data"):
        r = tk.finetune("tk:small_cnn", weights=None, data=tmp_path / "one", image_size=16, epochs=1,
                        num_workers=0, verbose=False)
    assert r.decisions.n_val == 0 and len(r.history) == 1
    with pytest.raises(tk.ConfigError, match=r"no validation data \(val_split=0.2 held out no example of the 2\)"), \
            pytest.warns(UserWarning, match="held out no example"):
        tk.finetune("tk:small_cnn", weights=None, data=tmp_path / "one", image_size=16, epochs=1, early_stopping=1,
                    num_workers=0, verbose=False)


def test_a_fifo_named_like_an_image_is_left_out_not_waited_on(tmp_path):
    """Opening a FIFO waits for a writer that never comes: a training scan or a prediction
    would hang. It is no file to read, and is said so."""
    import threading

    root = make_image_folder(tmp_path / "d", per_class=3, size=16)
    fifo = root / "dark" / "pipe.jpg"
    os.mkfifo(fifo)
    readers, done = [], threading.Event()

    def release_readers():  # a reader that opened the FIFO is counted and let go (EOF), so the test fails, not hangs
        while not done.wait(0.05):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO while no reader has it open
                readers.append(1)
            except OSError:
                pass

    thread = threading.Thread(target=release_readers, daemon=True)
    thread.start()
    try:
        with pytest.warns(UserWarning, match=r"Left out .*pipe.jpg.*not a regular file \(a FIFO\)"):
            bundle = prepare_data(root, val_split=0)
        assert len(bundle.train) == 6 and bundle.report.bad_files == [
            (str(fifo), "not a regular file (a FIFO); only files can be read")]
        from tests.export_helpers import export_tiny

        export_tiny(tmp_path / "m.pt", labels=("dark", "light"))
        got = tk.load(tmp_path / "m.pt").predict([str(fifo)] + sorted(str(p) for p in (root / "light").iterdir()))
        assert not got[0].ok and "not a regular file (a FIFO)" in got[0].error and all(p.ok for p in got[1:])
    finally:
        done.set()
        thread.join()
    assert not readers, "the FIFO was opened for reading"


def test_a_csv_listing_a_fifo_says_what_it_is_not_that_it_is_missing(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=2, size=16)
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    rows = [f"{p},{p.parent.name}" for p in sorted(root.rglob("*.*"))] + [f"{fifo},dark"]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(tk.DataError, match=r"lists 1 path of no file to read, e.g. '.*pipe.jpg': not a regular file "
                                           r"\(a FIFO\)"):
        prepare_data(tmp_path / "list.csv", val_split=0)
    (tmp_path / "list.csv").write_text("\n".join(rows[:-1] + [f"{root / 'dark'},dark"]) + "\n")
    with pytest.raises(tk.DataError, match=r"lists 1 path of no file to read, e.g. '.*dark': a folder, not a file"):
        prepare_data(tmp_path / "list.csv", val_split=0)


def test_a_data_warning_names_the_line_that_called_transferkit(tmp_path):
    """Warnings named a line of transferkit's own source (images.py:174, `return
    scan_class_folders(...`) instead of the caller's."""
    import inspect

    root = make_image_folder(tmp_path / "d", per_class=3)
    _png(root / "stray.png")
    with pytest.warns(UserWarning) as caught:
        line = inspect.currentframe().f_lineno + 1
        prepare_data(root, val_split=0)
    assert [(w.filename, w.lineno) for w in caught] == [(__file__, line)]
    (root / "stray.png").unlink()
    damaged_png(root / "dark" / "dark_0.png")  # found while a torch DataLoader reads it: still the caller's line
    with pytest.warns(UserWarning, match="failed to load during the run") as caught:
        line = inspect.currentframe().f_lineno + 1
        tk.finetune("tk:small_cnn", weights=None, data=root, epochs=1, image_size=16, verbose=False, num_workers=0,
                    scan="none", policy="full", val_split=0, precision="fp32")
    assert {(w.filename, w.lineno) for w in caught} == {(__file__, line)}


def test_a_warning_given_in_a_worker_thread_names_the_line_the_main_thread_waits_at():
    """A worker thread has no caller of the user's: its warning named threading's own line."""
    import inspect
    from concurrent.futures import ThreadPoolExecutor

    from transferkit.errors import warn

    with ThreadPoolExecutor(1) as pool, pytest.warns(tk.TransferkitWarning, match="from a worker") as caught:
        line = inspect.currentframe().f_lineno + 1
        pool.submit(warn, "from a worker").result()  # the main thread is on this line while the worker warns
    assert [(w.filename, w.lineno) for w in caught] == [(__file__, line)]


def test_a_warning_from_a_worker_thread_survives_a_main_stack_read_while_it_changes(monkeypatch):
    """The main thread's stack, read from a worker while it runs, once held a lock where a frame
    was: the warning raised AttributeError in the worker, and was not given."""
    import inspect
    import sys
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from transferkit.errors import warn

    real, reads = sys._current_frames, []

    def changing():  # the first read: what a stack walked mid-change gave
        reads.append(1)
        return {threading.main_thread().ident: threading.Lock()} if len(reads) == 1 else real()

    monkeypatch.setattr(sys, "_current_frames", changing)
    with ThreadPoolExecutor(1) as pool, pytest.warns(tk.TransferkitWarning, match="from a worker") as caught:
        line = inspect.currentframe().f_lineno + 1
        pool.submit(warn, "from a worker").result()
    assert len(reads) == 2 and [(w.filename, w.lineno) for w in caught] == [(__file__, line)]


def test_transferkit_s_warnings_are_one_category_to_silence_or_raise(tmp_path):
    """Every warning is a TransferkitWarning: one filter silences them (and none of another
    library's), or makes them errors."""
    root = make_image_folder(tmp_path / "d", per_class=3)
    _png(root / "stray.png")
    with pytest.warns(tk.TransferkitWarning, match="stray.png"):
        prepare_data(root, val_split=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=tk.TransferkitWarning)
        prepare_data(root, val_split=0)
        warnings.warn("another library's warning")
    assert [str(w.message) for w in caught] == ["another library's warning"]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=tk.TransferkitWarning)
        with pytest.raises(tk.TransferkitWarning, match="stray.png"):
            prepare_data(root, val_split=0)


def test_a_class_folder_is_told_from_its_first_data_file(tmp_path, monkeypatch):
    """Whether folders beside shards or Parquet files are class folders is told from the first
    image or audio file below each (nested, any case), not from their whole listings; other
    files are no data; a linked folder is walked as the scan walks it (a loop once)."""
    from transferkit.data import checks

    big, nested, notes, linked = (tmp_path / n for n in ("big", "nested", "notes", "linked"))
    big.mkdir()
    for i in range(500):
        (big / f"{i:03d}.JPG").touch()
    (nested / "a" / "b").mkdir(parents=True)
    (nested / "a" / "b" / "clip.wav").touch()
    notes.mkdir()
    (notes / "readme.txt").touch()
    linked.mkdir()
    (linked / "to_big").symlink_to(big, target_is_directory=True)
    (notes / "loop").symlink_to(notes, target_is_directory=True)
    read = []
    scandir = os.scandir

    class Counted:
        def __init__(self, path):
            self.it = scandir(path)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.it.close()

        def __iter__(self):
            for e in self.it:
                read.append(e.name)
                yield e

    monkeypatch.setattr(checks.os, "scandir", Counted)
    assert [checks.holds_data_files(d) for d in (big, nested, notes, linked)] == [True, True, False, True]
    assert len(read) < 12, read
    assert checks.holds_class_folders([notes, big, nested]) and not checks.holds_class_folders([big, notes])


def test_a_class_of_a_csv_left_without_readable_files_is_said_as_a_class_not_a_folder(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=3)
    (tmp_path / "bad.png").write_text("not an image")
    rows = ["path,label"] + [f"{p},{p.parent.name}" for p in sorted(root.rglob("*.png"))]
    rows.append(f"{tmp_path / 'bad.png'},odd")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    with pytest.warns(UserWarning) as caught:
        prepare_data(str(tmp_path / "list.csv"), val_split=0)
    text = " ".join(str(w.message) for w in caught)
    assert "Classes without readable images in" in text and "['odd'] (every file of them was bad" in text, text
    assert "Class folders" not in text


@pytest.mark.parametrize("name", ["accuracy", "macro avg", "weighted avg"])
def test_a_class_named_as_a_summary_row_of_the_report_is_refused(tmp_path, name):
    """A class named 'accuracy' or 'macro avg' lost its row of the per-class report to the
    summary row of that name, and the evaluation's summary failed with a TypeError."""
    import transferkit as tk
    from transferkit.data import prepare_data

    root = make_image_folder(tmp_path / "img", classes=("cat", name), per_class=2)
    with pytest.raises(tk.DataError, match=rf"the class name '{name}' is the name of a summary row of the per-class "
                                           r"report \(accuracy, macro avg, weighted avg\)"):
        prepare_data(root)
    with pytest.raises(tk.DataError, match="summary row"):
        prepare_data(make_image_folder(tmp_path / "ok", per_class=2), classes=["cat", name])
    # other spellings are other keys; a regression output or a multilabel label of the name has no such row
    assert prepare_data(make_image_folder(tmp_path / "cased", classes=("cat", name.title()), per_class=2)).classes
    from transferkit.train.tasks import prepare_task_data

    targets = [(torch.zeros(3, 8, 8), torch.tensor([0.5, 1.0])) for _ in range(4)]
    kw = dict(val_split=0, seed=0, min_size=None)
    prepare_task_data(targets, None, task="regression", classes=[name, "loss"], **kw)
    if name == "accuracy":
        prepare_task_data([(x, torch.tensor([1.0, 0.0])) for x, _ in targets], None, task="multilabel",
                          classes=[name, "dog"], **kw)


def test_whole_number_labels_of_a_csv_are_classes_in_the_order_of_their_values(tmp_path):
    """Labels 0, 5 and 10 became the classes ['0', '10', '5']: the class index of the label 10
    was 1, so a prediction's index was not the label the CSV gave."""
    from transferkit.data.folders import scan_csv

    rows = []
    for i, label in enumerate(["10", "5", "0", "10", "2"]):
        _png(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{label}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    samples, classes = scan_csv(tmp_path / "labels.csv")
    assert classes == ["0", "2", "5", "10"]
    assert [classes[y] for _, y in samples] == ["10", "5", "0", "10", "2"]
    (tmp_path / "names.csv").write_text("0.png,b10\n1.png,b5\n")
    assert scan_csv(tmp_path / "names.csv")[1] == ["b10", "b5"]  # names: by name
    from transferkit.data.target_tables import scan_target_csv

    (tmp_path / "multi.csv").write_text("path,labels\n0.png,10;5\n1.png,0\n2.png,2;10\n")
    assert scan_target_csv(tmp_path / "multi.csv", task="multilabel")[1] == ["0", "2", "5", "10"]


def test_a_data_path_that_is_an_archive_or_a_file_says_which(tmp_path):
    """The tutorial's hymenoptera_data.zip given as data was "does not exist or is not a
    folder", though it exists: an archive says to extract it, a file says it is one."""
    import zipfile

    archive = tmp_path / "hymenoptera_data.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("hymenoptera_data/train/ants/a.jpg", b"")
    plain = tmp_path / "notes.txt"
    plain.write_text("not images")
    listing = tmp_path / "rows.tsv"
    listing.write_text("path,label\na.png,ants\n")
    (tmp_path / "labels.json").write_text('{"a.png": "ants", "b.png": "bees"}')
    import gzip
    import tarfile

    with tarfile.open(tmp_path / "images.bak", "w") as t:
        t.add(plain, arcname="notes.txt")
    (tmp_path / "images.gzbin").write_bytes(gzip.compress((tmp_path / "images.bak").read_bytes()))
    fifo = tmp_path / "pipe"
    if hasattr(os, "mkfifo"):
        os.mkfifo(fifo)
    for path, said in ((archive, r"is a zip archive, not a folder: unzip it and give the folder it holds"),
                       (tmp_path / "images.bak", r"is a tar archive, not a folder: extract it \(tar -xf\)"),
                       (tmp_path / "images.gzbin", r"is a gzip file, not a folder: extract it \(tar -xzf\)"),
                       (plain, r"is a file, not a folder\. Expected a folder"),
                       (listing, r"is a file, not a folder \(a table of paths, its header 'path,\.\.\.', is read "
                                 r"from a name ending in \.csv: rename it\)"),
                       (tmp_path / "labels.json", r"is a file, not a folder\. Expected"),  # commas, no table
                       (tmp_path / "missing", r"does not exist\. Expected a folder"),
                       (f"{tmp_path}/train-{{0..3}}.tar ", r"does not exist: it starts or ends with white space; "
                                                          r"without it, it reads '.*/train-\{0\.\.3\}\.tar'\."),
                       *([(fifo, r"is not a folder\. Expected a folder")] if fifo.exists() else [])):  # never read
        with pytest.raises(tk.DataError, match=said):
            tk.plan(tk.FinetuneConfig(backbone="tk:small_cnn", weights=None, data=str(path)))


def test_validation_labels_that_are_a_class_s_number_written_otherwise_say_so(tmp_path):
    """A validation CSV labelled '09' where the training class is '9' had those rows left out
    with a warning that did not say why: it says the label is that class's number."""
    make_image_folder(tmp_path / "img", per_class=4, size=16)
    files = sorted(p for p in (tmp_path / "img").rglob("*.*"))
    (tmp_path / "train.csv").write_text("path,label\n" + "".join(f"{p},{9 if i % 2 else 10}\n"
                                                                 for i, p in enumerate(files[:6])))
    (tmp_path / "val.csv").write_text("path,label\n" + "".join(f"{p},{'09' if i % 2 else 10}\n"
                                                               for i, p in enumerate(files[6:])))
    with pytest.warns(UserWarning, match=r"labels \['09'\] that are not training classes \('09' is the number of the "
                                         r"class '9' written otherwise: write the labels as the classes are written\)"):
        tk.plan(tk.FinetuneConfig(backbone="tk:small_cnn", weights=None, data=str(tmp_path / "train.csv"),
                                  val_data=str(tmp_path / "val.csv"), image_size=16))


def test_a_csv_label_s_surrounding_spaces_are_not_part_of_it(tmp_path):
    """``red`` and ``red `` in a CSV are one class (a field's spaces, as in ``path, label``),
    as the reliability table says."""
    make_image_folder(tmp_path / "img", per_class=4, size=16)
    files = sorted(p for p in (tmp_path / "img").rglob("*.*"))
    rows = [f"{p},{('red' if i % 3 else 'red ') if i % 2 else ' green'}" for i, p in enumerate(files)]
    (tmp_path / "d.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    plan = tk.plan(tk.FinetuneConfig(backbone="tk:small_cnn", weights=None, data=str(tmp_path / "d.csv"),
                                     image_size=16))
    assert list(plan.classes) == ["green", "red"]


def test_evaluate_keeps_what_reading_the_data_said(tmp_path):
    """`evaluate --json` scored 23 of 48 rows, the others left out for labels the model does not
    have, and its results did not say so (only a warning on stderr): they keep what reading the
    data said, and it is still warned."""
    make_image_folder(tmp_path / "img", per_class=4, size=16)
    files = sorted(p for p in (tmp_path / "img").rglob("*.*"))
    bb = tk.get_backbone("tk:small_cnn", weights=None)
    tk.export_torchscript(tk.build_model(bb, 2), tmp_path / "m.pt", example_inputs=torch.rand(2, 3, 16, 16),
                          metadata={"labels": ["10", "9"],
                                    "input_spec": bb.input_spec.replace(image_size=16).to_dict()})
    (tmp_path / "val.csv").write_text("path,label\n" + "".join(f"{p},{'09' if i % 2 else 10}\n"
                                                               for i, p in enumerate(files)))
    with pytest.warns(UserWarning, match=r"labels \['09'\] that are not the model's classes"):
        ev = tk.evaluate(tmp_path / "m.pt", tmp_path / "val.csv", progress=False)
    assert len(ev.files) == (len(files) + 1) // 2
    assert len(ev.data_warnings) == 1 and "those rows are left out" in ev.data_warnings[0]
    assert ev.to_dict()["data_warnings"] == ev.data_warnings


def test_a_csv_whose_paths_are_relative_to_the_working_directory_says_how_they_are_read(tmp_path, monkeypatch):
    """A CSV in meta/ listing imgs/0.png (a path relative to the working directory) was "lists 4
    missing files, e.g. ['meta/imgs/0.png', ...]": it says that rows are read relative to the
    CSV's folder and that the files are there relative to the working directory."""
    make_image_folder(tmp_path / "imgs", per_class=2, size=16)
    files = sorted(p.relative_to(tmp_path) for p in (tmp_path / "imgs").rglob("*.png"))
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "train.csv").write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in files))
    monkeypatch.chdir(tmp_path)
    cfg = tk.FinetuneConfig(backbone="tk:small_cnn", weights=None, data="meta/train.csv")
    with pytest.raises(tk.DataError, match=rf"lists \d+ missing files.* relative to the CSV's folder \('meta'\), and "
                                           rf"these files are there relative to the working directory \(e\.g\. "
                                           rf"{re.escape(repr(str(files[0])))}\): write each path relative"):
        tk.plan(cfg)
    monkeypatch.chdir(tmp_path / "meta")  # not there from here: the error says no more than that they are missing
    with pytest.raises(tk.DataError, match=r"lists \d+ missing files, e\.g\. \[[^]]*\]\.$"):
        tk.plan(tk.FinetuneConfig(backbone="tk:small_cnn", weights=None, data="train.csv"))


def test_names_that_are_not_utf8_a_class_is_refused_a_file_is_read(tmp_path):
    """A folder or file named in Latin-1 (an archive from another system) crashed the run with a
    UnicodeEncodeError where its name was hashed: a class name is refused (no export could hold
    it), saying how to rename it; a file of that name is read, its split and the feature cache's
    key made from its name's bytes."""
    root = make_image_folder(tmp_path / "d", per_class=5, size=16)
    first = sorted((root / "dark").iterdir())[0]
    try:
        os.rename(first, os.fsencode(first.parent) + b"/caf\xe9.png")
        os.mkdir(os.fsencode(tmp_path) + b"/latin\xe9")
    except (OSError, UnicodeError):
        pytest.skip("this file system takes UTF-8 names only")
    kw = dict(backbone="tk:small_cnn", weights=None, image_size=16, epochs=1, verbose=False)
    result = tk.finetune(data=str(root), cache_dir=tmp_path / "fc", **kw)
    assert result.data_report.bad_files == [] and result.feature_report["computed"] > 0
    latin = tmp_path / os.fsdecode(b"latin\xe9")  # a str, its undecodable byte kept as Python keeps it
    shutil.copytree(root / "light", latin / "light")
    shutil.copytree(root / "dark", latin / os.fsdecode(b"caf\xe9"))
    with pytest.raises(tk.DataError, match=r"the class name 'caf\\udce9' is not UTF-8 text .* Rename it to UTF-8"):
        tk.finetune(data=str(latin), **kw)
