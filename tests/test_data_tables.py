"""Parquet files and Hugging Face datasets read in place through data=."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import make_image_folder
from shard_helpers import folder_files

import transferkit as tk
from transferkit.data import eval_transform, prepare_data

SPEC = tk.InputSpec(image_size=16)
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _rows(folder):
    files = folder_files(folder)
    classes = sorted({c for _, c in files})
    return [f.read_bytes() for f, _ in files], [classes.index(c) for _, c in files], classes


def test_parquet_gives_the_folder_samples_and_pixels(tmp_path):
    folder = make_image_folder(tmp_path / "img", per_class=5)
    images, labels, classes = _rows(folder)
    table = pa.table({"image": pa.array(images, pa.binary()), "label": labels})
    pq.write_table(table.slice(0, 4), tmp_path / "a.parquet", row_group_size=3)
    pq.write_table(table.slice(4), tmp_path / "b.parquet", row_group_size=3)
    as_folder = prepare_data(folder, val_split=0)
    as_table = prepare_data([str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")], val_split=0,
                            classes=classes)
    assert as_table.train.targets == as_folder.train.targets
    a, b = as_folder.train.view(transform=eval_transform(SPEC)), as_table.train.view(transform=eval_transform(SPEC))
    for i in range(len(a)):
        assert torch.equal(a[i][0], b[i][0])
    assert prepare_data(str(tmp_path), val_split=0).classes == ["0", "1"]  # a folder of Parquet files


def test_a_parquet_file_rewritten_with_its_size_and_mtime_kept_is_other_data(tmp_path):
    """The data's identity (what keys cached features) holds each file's change time, as an
    image file's does: a file rewritten in place with its size and modification time kept
    (``cp -p``, ``touch -r``) is not taken for the one before."""
    from transferkit.data.fingerprint import data_fingerprint

    folder = make_image_folder(tmp_path / "img", per_class=3)
    images, labels, _ = _rows(folder)
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "label": labels}), path, compression="none")
    before, fp = os.stat(path), data_fingerprint(prepare_data(str(path), val_split=0).train)
    assert data_fingerprint(prepare_data(str(path), val_split=0).train) == fp
    a, b = [i for i, t in enumerate(labels) if t == labels[0]][:2]
    images[a], images[b] = images[b], images[a]  # two images of a class trade places: the same size and labels
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "label": labels}), path, compression="none")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert data_fingerprint(prepare_data(str(path), val_split=0).train) != fp


def test_parquet_named_labels_and_hashed_split(tmp_path):
    folder = make_image_folder(tmp_path / "img", per_class=20)
    images, labels, classes = _rows(folder)
    pq.write_table(pa.table({"jpg": pa.array(images, pa.binary()), "cls": [classes[t] for t in labels],
                             "__key__": [f"k{i}" for i in range(len(images))]}), tmp_path / "t.parquet")
    b = prepare_data(str(tmp_path / "t.parquet"), val_split=0.3)
    assert b.classes == classes and len(b.train) + len(b.val) == 40
    assert all(k.startswith("k") for k in b.val.keys)
    # a key column of few values (a group id): samples of one key go together, and a split that fails says so
    pq.write_table(pa.table({"jpg": pa.array(images, pa.binary()), "cls": [classes[t] for t in labels],
                             "id": [i % 2 for i in range(len(images))]}), tmp_path / "g.parquet")
    with pytest.raises(tk.DataError, match=r"leaves no (validation|training) sample\. The samples have 2 distinct keys "
                                           r"\(the column 'id'\), and the samples of one key are held out together\. "
                                           r"Pass val_data or another val_split, or give each sample a key of its own"):
        for seed in range(20):  # two keys: a seed that puts both on one side
            prepare_data(str(tmp_path / "g.parquet"), val_split=0.3, seed=seed)


def test_parquet_class_names_are_checked_like_a_csv_s(tmp_path):
    """'Ants' beside 'ants' made a 3-class model without a word, and a name with a line break
    trained a whole run whose export then failed: refused before training, as in a CSV.
    Validation labels in the other Unicode form match their class."""
    folder = make_image_folder(tmp_path / "img", per_class=4)
    images, labels, _ = _rows(folder)
    for names, said in ((["ants", "Ants"], "differ only in case"), (["ants\nsmall", "bees"], "line break")):
        path = tmp_path / f"{len(said)}.parquet"
        pq.write_table(pa.table({"image": pa.array(images, pa.binary()),
                                 "label": [names[i % 2] if t == 0 else "bees" for i, t in enumerate(labels)]}), path)
        with pytest.raises(tk.DataError, match=said):
            prepare_data(str(path), val_split=0)
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "label": [[composed, "tea"][t] for t in labels]}),
                   tmp_path / "train.parquet")
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()),
                             "label": [[decomposed, "tea"][t] for t in labels]}), tmp_path / "val.parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no sample left out
        b = prepare_data(str(tmp_path / "train.parquet"), str(tmp_path / "val.parquet"))
    assert b.classes == [composed, "tea"] and sorted(b.val.targets) == sorted(b.train.targets)


def test_parquet_rows_are_scanned_before_training_and_the_scan_is_kept(tmp_path, monkeypatch):
    """scan= did nothing for Parquet (and Hugging Face) data: a garbage cell and a cut JPEG
    passed scan="full" with on_bad_file="raise", and the run stopped mid-training. They are
    found before training; under cache_dir the scan is kept for the next run."""
    import transferkit.data.tables as tables

    folder = make_image_folder(tmp_path / "img", per_class=5)
    images, labels, classes = _rows(folder)
    jpeg = next(i for i, f in enumerate(folder_files(folder)) if f[0].suffix == ".jpg" and i > 1)
    images[1], images[jpeg] = b"not an image", images[jpeg][: len(images[jpeg]) // 2]
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "label": labels}), path, row_group_size=4)
    with pytest.raises(tk.DataError, match=r"Bad image 't.parquet:row 1' of the training rows: cannot be read as an "
                                           r"image.*Remove or replace its row, or pass on_bad_file='skip'"):
        prepare_data(str(path), val_split=0, on_bad_file="raise")
    with pytest.warns(UserWarning, match=r"Left out 2 bad images of the training rows"):
        b = prepare_data(str(path), val_split=0, cache_dir=tmp_path / "c", classes=classes)
    assert len(b.train) == 8 and [p for p, _ in b.report.bad_files] == ["t.parquet:row 1", f"t.parquet:row {jpeg}"]
    assert len(list((tmp_path / "c" / "scans").glob("*-quick.json"))) == 1
    monkeypatch.setattr(tables, "check_image_stream", lambda *a, **k: pytest.fail("scanned again"))
    with pytest.warns(UserWarning, match="Left out 2 bad image"):  # from the kept scan
        assert len(prepare_data(str(path), val_split=0, cache_dir=tmp_path / "c").train) == 8
    assert len(prepare_data(str(path), val_split=0, scan="none").train) == 10  # left to fail when loaded
    monkeypatch.setattr(tables, "SCAN_RULES", tables.SCAN_RULES + 1)  # the rules changed: the kept scan is not used
    with pytest.raises(pytest.fail.Exception, match="scanned again"):
        prepare_data(str(path), val_split=0, cache_dir=tmp_path / "c")


def test_classlabel_names_meet_classes_in_either_unicode_form_and_names_are_strings(tmp_path):
    """A ClassLabel's NFC names met classes= written in NFD as no name at all: classes= was
    taken for a renaming by position and the 'th\u00e9' row became 'caf\u00e9' without a word.
    Names that are not strings were an AttributeError."""
    import json

    from transferkit.data.tables import open_parquet

    names = ["th\u00e9", "caf\u00e9"]
    meta = {b"huggingface": json.dumps({"info": {"features": {"label": {"_type": "ClassLabel",
                                                                        "names": names}}}}).encode()}
    images, _, _ = _rows(make_image_folder(tmp_path / "img", per_class=1))
    table = pa.table({"image": pa.array(images, pa.binary()), "label": [0, 1]}).replace_schema_metadata(meta)
    pq.write_table(table, tmp_path / "t.parquet")
    decomposed = ["cafe\u0301", "the\u0301"]
    for what in ("training", "validation"):
        ds = open_parquet(tmp_path / "t.parquet", classes=decomposed, what=what, scan="none")
        assert [decomposed[t] for t in ds.targets] == ["the\u0301", "cafe\u0301"]  # each row by its name
    with pytest.raises(tk.DataError, match=r"the class name 0 is a int; class names are strings"):
        open_parquet(tmp_path / "t.parquet", classes=[0, 1], scan="none")


def test_parquet_without_an_image_column_is_a_clear_error(tmp_path):
    pq.write_table(pa.table({"x": [1, 2], "label": [0, 1]}), tmp_path / "t.parquet")
    with pytest.raises(tk.DataError, match="no image column"):
        prepare_data(str(tmp_path / "t.parquet"))


def test_the_image_column_is_the_one_named_like_images_and_several_others_are_refused(tmp_path):
    """A table with a binary ``mask`` before its ``image`` column trained on the masks."""
    folder = make_image_folder(tmp_path / "img", per_class=3)
    images, labels, _ = _rows(folder)
    masks = pa.array([b"\x89PNG not this"] * len(images), pa.binary())
    pq.write_table(pa.table({"mask": masks, "image": pa.array(images, pa.binary()), "label": labels}),
                   tmp_path / "m.parquet")
    assert tk.data.open_parquet([str(tmp_path / "m.parquet")]).source.image_column == "image"
    for one in (str(tmp_path / "m.parquet"), tmp_path / "m.parquet"):  # one file, as a string or a Path
        assert len(tk.data.open_parquet(one)) == len(images)
    pq.write_table(pa.table({"mask": masks, "photo": pa.array(images, pa.binary()), "label": labels}),
                   tmp_path / "two.parquet")
    with pytest.raises(tk.DataError, match=r"has 2 image columns, \['mask', 'photo'\], and none is named like "
                                           r"images .* data=transferkit.data.open_parquet\(files, image_column="):
        prepare_data(str(tmp_path / "two.parquet"))
    chosen = tk.data.open_parquet([str(tmp_path / "two.parquet")], image_column="photo")
    assert len(prepare_data(chosen, val_split=0).train) == len(images)  # finetune(data=...) takes it


def test_missing_pyarrow_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "t.parquet").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(tk.DataError, match=r"transferkit\[parquet\]"):
        prepare_data(str(tmp_path / "t.parquet"))


def test_missing_datasets_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(tk.DataError, match=r"transferkit\[hf\]"):
        prepare_data(str(tmp_path / "d"))


def _hf(folder):
    datasets = pytest.importorskip("datasets")
    files = folder_files(folder)
    classes = sorted({c for _, c in files})
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    return datasets.Dataset.from_dict({"image": [str(f) for f, _ in files],
                                       "label": [classes.index(c) for _, c in files]}, features=feats)


def test_parquet_labels_that_are_not_class_indices_or_names_are_refused_or_left_out(tmp_path):
    """A float label column was cut to class indices without a word (0.7 -> 0, 1.9 -> 1), NaN
    (pandas' missing value) was a raw ValueError, and an empty name was a class named ''."""
    images, _, _ = _rows(make_image_folder(tmp_path / "img", per_class=2))
    path = tmp_path / "l.parquet"

    def read(labels):
        pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "label": labels}), path)
        return prepare_data(str(path), val_split=0)
    for labels in ([0.7, 1.9, 0.2, 1.4], [0.0, float("inf"), 1.0, 0.0]):
        with pytest.raises(tk.DataError, match=r"labels are class indices \(0, 1, ...\) or class names, and \d labels? "
                                               r"(is|are) not a whole number \(e.g. (0.7|inf)\), which would be cut"):
            read(labels)
    with pytest.raises(tk.DataError, match=r"the labels '01' and '1' are one number written in 2 ways"):
        read(["1", "01", "2", "2"])  # as a CSV refuses them
    for labels, classes, targets in (([0.0, 1.0, float("nan"), 1.0], ["0", "1"], [0, 1, 1]),
                                     (["cat", "", "dog", " "], ["cat", "dog"], [0, 1])):
        with pytest.warns(UserWarning, match=r"training row\(s\) have no usable label; they are left out"):
            b = read(labels)
        assert b.classes == classes and list(b.train.targets) == targets
    with pytest.warns(UserWarning, match=r"has 2 samples labelled 'NaN', which reads as a missing value \(as pandas "
                                         r"writes one\); it is a class of its own here\. Remove those samples"):
        b = read(["cat", "NaN", "dog", "NaN"])  # text, as a CSV's 'NaN' is warned of
    assert b.classes == ["NaN", "cat", "dog"]
    for labels, kind in (([[0], [1], [0], [1]], "list"), ([b"x", b"y", b"x", b"y"], "bytes")):
        with pytest.raises(tk.DataError, match=rf"4 labels are of type {kind} \(e.g. .*\)\. Store one class index or "
                                               r"name per sample"):
            read(labels)


def test_validation_class_indices_are_read_by_the_training_classes_place_said_or_refused_where_ambiguous(tmp_path):
    """Validation data that give class indices beside training data that name their classes are
    read by place with a warning; where the training classes are named by numbers ('1', '2',
    '3'), an index is ambiguous (1: the class '1', or the class at place 1, '2') and refused."""
    images, labels, _ = _rows(make_image_folder(tmp_path / "img", per_class=3))

    def table(name, column):
        pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "label": column}), tmp_path / name)
        return str(tmp_path / name)
    ints = table("val.parquet", [t + 1 for t in labels])  # 1 and 2
    with pytest.raises(tk.DataError, match=r"The validation data give class indices without class names "
                                           r"\(e.g. 1\), and the training data's classes are named by numbers "
                                           r"\(\['1', '2', '3'\]\): 1 could be the class named '1' or the training "
                                           r"data's class at place 1 \('2'\)"):
        prepare_data(table("digits.parquet", [str(t + 1) for t in labels[:-1]] + ["3"]), val_data=ints)
    with pytest.warns(UserWarning, match=r"The validation data give class indices without class names: each "
                                         r"index is read as the training data's class of that place \(0 = 'a', "
                                         r"1 = 'b', 2 = 'c'\)"):
        b = prepare_data(table("named.parquet", ["c"] + ["ab"[t] for t in labels[1:]]), val_data=ints)
    assert b.classes == ["a", "b", "c"] and sorted(set(b.val.targets)) == [1, 2]
    # training data that give indices too (named by classes=, or by an _info.json) read validation indices alike
    from shard_helpers import folder_items, write_shards

    items = folder_items(make_image_folder(tmp_path / "f", per_class=3))
    train = write_shards(items, tmp_path / "t", [6], info=False)[0]
    val = write_shards(folder_items(make_image_folder(tmp_path / "g", per_class=3, seed=3)), tmp_path / "v", [6],
                       info=False)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for names in (["1", "2"], ["dark", "light"]):
            assert prepare_data(str(train), val_data=str(val), classes=names).classes == names
        write_shards(items, tmp_path / "t", [6])  # an _info.json beside the training shards only
        assert prepare_data(str(tmp_path / "t"), val_data=str(val)).classes == ["dark", "light"]
    with pytest.warns(UserWarning, match=r"The validation data give class indices without class names: each index "
                                         r"is read as the training data's class of that place \(0 = 'dark'"):
        prepare_data(str(tmp_path / "f"), val_data=str(val))  # a folder names its classes: the indices said


def test_relative_paths_of_parquet_rows_are_read_from_the_parquet_file_s_folder(tmp_path, monkeypatch):
    """A row's relative path was read from the working directory: a table beside its images
    ('img/0.png' next to the .parquet) had every row "No such file" from anywhere else."""
    from transferkit.data.fingerprint import data_fingerprint

    folder = make_image_folder(tmp_path / "tables" / "img", per_class=3)
    files = [f for f, _ in folder_files(folder)]
    _, labels, _ = _rows(folder)
    rows = [{"bytes": None, "path": str(f.relative_to(tmp_path / "tables"))} for f in files]
    pq.write_table(pa.table({"image": pa.array(rows), "label": labels}), tmp_path / "tables" / "t.parquet")
    monkeypatch.chdir(tmp_path)  # elsewhere: the paths are read from the table's folder
    b = prepare_data(str(tmp_path / "tables" / "t.parquet"), val_split=0)
    assert len(b.train) == 6 and b.train.source.read(0) == files[0].read_bytes()
    before = data_fingerprint(b.train)
    assert data_fingerprint(prepare_data("tables/t.parquet", val_split=0).train) == before  # however it is spelt
    files[2].write_bytes(files[3].read_bytes())  # the file a relative path names is in the identity
    assert data_fingerprint(prepare_data(str(tmp_path / "tables" / "t.parquet"), val_split=0).train) != before


def test_image_files_that_rows_read_by_path_are_part_of_the_data_s_identity(tmp_path):
    """Rows of a Parquet file or a Hugging Face dataset holding an image file's path, not its
    bytes: the file edited in place kept the table's identity, so a feature store, decoded
    pixels and a scan of the old image were read back (an all-grey validation set scored 100 %)."""
    from transferkit.data.fingerprint import data_fingerprint

    folder = make_image_folder(tmp_path / "img", per_class=5)
    files = [f for f, _ in folder_files(folder)]
    images, labels, _ = _rows(folder)
    by_path = [False] * 4 + [True] * 4 + [False, True]  # row groups of 4: bytes, paths, both
    rows = [{"bytes": None if p else data, "path": str(f)} for f, data, p in zip(files, images, by_path)]
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"image": pa.array(rows), "label": labels}), path, row_group_size=4)
    ds = _hf(folder)

    def identities():
        return [data_fingerprint(prepare_data(data, val_split=0).train) for data in (str(path), ds)]
    before = identities()
    assert identities() == before
    files[0].write_bytes(files[1].read_bytes())  # read from the table's bytes: the Parquet file's rows hold it
    parquet, hf = identities()
    assert parquet == before[0] and hf != before[1]
    for row in (5, 9):  # read by path: in a row group of paths, and in one holding both
        files[row].write_bytes(files[row - 1].read_bytes())
        assert identities()[0] != parquet
        parquet = identities()[0]
    unsaid = tmp_path / "nostats.parquet"  # written without statistics: every row group's paths are looked at
    pq.write_table(pa.table({"image": pa.array(rows), "label": labels}), unsaid, row_group_size=4,
                   write_statistics=False)
    before = data_fingerprint(prepare_data(str(unsaid), val_split=0).train)
    files[8].write_bytes(files[7].read_bytes())  # row 8 holds its bytes: no change
    assert data_fingerprint(prepare_data(str(unsaid), val_split=0).train) == before
    files[9].write_bytes(files[6].read_bytes())
    assert data_fingerprint(prepare_data(str(unsaid), val_split=0).train) != before
    bare = tmp_path / "bare.parquet"  # {bytes} alone, one cell empty: a bad row left out (it raised IndexError)
    pq.write_table(pa.table({"image": pa.array([{"bytes": b} for b in images[2:7]] + [{"bytes": None}]),
                             "label": labels[2:8]}), bare)
    with pytest.warns(UserWarning, match="the image cell is empty"):
        assert len(prepare_data(str(bare), val_split=0).train) == 5


def test_hf_dataset_with_classlabel_matches_the_folder(tmp_path):
    folder = make_image_folder(tmp_path / "img", per_class=5)
    ds = _hf(folder)
    as_folder = prepare_data(folder, val_split=0)
    as_hf = prepare_data(ds, val_split=0)
    assert as_hf.classes == ["dark", "light"] and as_hf.train.targets == as_folder.train.targets
    a, b = as_folder.train.view(transform=eval_transform(SPEC)), as_hf.train.view(transform=eval_transform(SPEC))
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(len(a)))


def test_a_validation_dataset_s_classlabel_names_in_another_order_are_read_by_name(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = make_image_folder(tmp_path / "img", classes=("ant", "bee", "cat"), per_class=2)
    files = folder_files(folder)
    names = ["cat", "ant", "bee"]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    val = datasets.Dataset.from_dict({"image": [str(f) for f, _ in files], "label": [names.index(c) for _, c in files]},
                                     features=feats)
    b = prepare_data(folder, val_data=val)
    assert b.classes == ["ant", "bee", "cat"] and b.val.targets == [0, 0, 1, 1, 2, 2]


def test_hf_saved_dataset_dict_gives_train_and_validation(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = _hf(make_image_folder(tmp_path / "img", per_class=5))
    dd = datasets.DatasetDict({"train": ds.select(range(7)), "validation": ds.select(range(7, 10))})
    dd.save_to_disk(str(tmp_path / "saved"))
    b = prepare_data(str(tmp_path / "saved"))
    assert (len(b.train), len(b.val), b.classes) == (7, 3, ["dark", "light"])
    b2 = prepare_data(dd)
    assert (len(b2.train), len(b2.val)) == (7, 3)
    # as val_data, a DatasetDict gives its validation split, with or without a train split; as data, its train one
    for val in (dd, datasets.DatasetDict({"validation": ds.select(range(7, 10))}),
                datasets.DatasetDict({"test": ds.select(range(7, 10))})):
        b3 = prepare_data(ds.select(range(7)), val_data=val)
        assert (len(b3.train), len(b3.val)) == (7, 3)
    assert len(prepare_data(dd, val_data=dd).train) == 7


def test_hf_streaming_dataset_is_refused_clearly(tmp_path):
    ds = _hf(make_image_folder(tmp_path / "img", per_class=2))
    with pytest.raises(tk.DataError, match="IterableDataset is not supported yet"):
        prepare_data(ds.to_iterable_dataset())


def test_finetune_on_a_hf_dataset(tmp_path):
    ds = _hf(make_image_folder(tmp_path / "img", per_class=6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = tk.finetune("tk:small_cnn", weights=None, data=ds, epochs=1, batch_size=4, image_size=16,
                        verbose=False, num_workers=0, cache_dir=tmp_path / "cache")
    assert r.classes == ["dark", "light"] and r.used_feature_cache


def test_a_mapped_hf_dataset_has_the_same_listing_in_every_process(tmp_path):
    """After a ``map`` with a function the datasets library cannot hash, its fingerprint is
    random per process; the listing every rank of a job compares is not."""
    pytest.importorskip("datasets")
    import subprocess

    folder = make_image_folder(tmp_path / "img", per_class=3)
    code = ("import sys\nsys.path.insert(0, sys.argv[2])\nfrom test_data_tables import _hf\n"
            "from pathlib import Path\nimport transferkit as tk\n"
            "from transferkit.data.fingerprint import listing_digest\n"
            "class Unpicklable:\n    def __reduce__(self):\n        raise TypeError('not picklable')\n"
            "held = Unpicklable()\n"
            "ds = _hf(Path(sys.argv[1])).map(lambda row: {'label': row['label'] if held else 0})\n"
            "print(ds._fingerprint, listing_digest(tk.data.prepare_data(ds, val_split=0).train))\n")
    runs = [subprocess.run([sys.executable, "-c", code, str(folder), str(Path(__file__).parent)], capture_output=True,
                           text=True, timeout=300, cwd=tmp_path) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    (fp0, listing0), (fp1, listing1) = (r.stdout.split() for r in runs)
    assert fp0 != fp1 and listing0 == listing1


def test_parquet_files_with_their_own_classlabel_orders_are_read_by_name_and_other_schemas_refused(tmp_path):
    """Only the first file's ClassLabel was read: a second file listing the classes in the other
    order had every label flipped, without a word; files of other columns or column types were
    raw pyarrow/TypeError tracebacks."""
    import json

    from transferkit.data.tables import open_parquet

    def meta(names):
        return {b"huggingface": json.dumps({"info": {"features": {"label": {"_type": "ClassLabel",
                                                                            "names": names}}}}).encode()}

    images, targets, classes = _rows(make_image_folder(tmp_path / "img", per_class=4))
    half = len(images) // 2
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"image": pa.array(images[:half], pa.binary()), "label": targets[:half]})
                   .replace_schema_metadata(meta(classes)), tmp_path / "pq" / "a.parquet")
    flipped = classes[::-1]
    pq.write_table(pa.table({"image": pa.array(images[half:], pa.binary()),
                             "label": [flipped.index(classes[t]) for t in targets[half:]]})
                   .replace_schema_metadata(meta(flipped)), tmp_path / "pq" / "b.parquet")
    ds = open_parquet(sorted(str(p) for p in (tmp_path / "pq").iterdir()), scan="none")
    assert [ds.classes[t] for t in ds.targets] == [classes[t] for t in targets]
    renamed = tmp_path / "renamed.parquet"
    pq.write_table(pa.table({"image": pa.array(images[half:], pa.binary()), "target": targets[half:]}), renamed)
    with pytest.raises(tk.DataError, match=r"renamed.parquet' has no column 'label', which .*a.parquet' has \(its "
                                           r"columns: \['image', 'target'\]\): Parquet files read together need"):
        open_parquet([str(tmp_path / "pq" / "a.parquet"), str(renamed)], scan="none")
    struct = tmp_path / "struct.parquet"
    pq.write_table(pa.table({"image": [{"bytes": b, "path": None} for b in images[half:]], "label": targets[half:]}),
                   struct)
    with pytest.raises(tk.DataError, match=r"struct.parquet': its column 'image' holds struct<.*and that of "
                                           r".*a.parquet' binary"):
        open_parquet([str(tmp_path / "pq" / "a.parquet"), str(struct)], scan="none")
    pq.write_table(pa.table({"image": pa.array(images[:half], pa.binary()), "label": targets[:half]}),
                   tmp_path / "plain.parquet")
    named = tmp_path / "named.parquet"  # class names where the other file has indices: Parquet's words, not shards'
    pq.write_table(pa.table({"image": pa.array(images[half:], pa.binary()),
                             "label": [classes[t] for t in targets[half:]]}), named)
    with pytest.raises(tk.DataError, match=r"Parquet data: integer labels and class names are mixed \(e\.g\. 0 and "
                                           r"'.*'\); use one kind \(class indices or class names in the label "):
        open_parquet([str(tmp_path / "plain.parquet"), str(named)], scan="none")
    both = open_parquet([str(tmp_path / "pq" / "a.parquet"), str(named)], scan="none")  # a ClassLabel names indices
    assert [both.classes[t] for t in both.targets] == [classes[t] for t in targets]


def test_a_folder_of_parquet_files_named_by_split_trains_and_validates_on_them(tmp_path):
    """The Hugging Face Hub's layout (train-*, validation-*, test-* Parquet files): training on
    train, validating on validation, the test files named as not used; files named as no split
    beside training ones are all trained on, with a warning."""
    images, labels, classes = _rows(make_image_folder(tmp_path / "img", per_class=6))

    def write(name, rows):
        pq.write_table(pa.table({"image": pa.array([images[i] for i in rows], pa.binary()),
                                 "label": [classes[labels[i]] for i in rows]}), tmp_path / "hub" / name)
    (tmp_path / "hub").mkdir()
    write("train-00000-of-00001.parquet", range(0, 8))
    write("validation-00000-of-00001.parquet", range(8, 10))
    write("test-00000-of-00001.parquet", range(10, 12))
    with pytest.warns(UserWarning, match=r"hold training and validation files; the others are not used: "
                                         r"test-00000-of-00001.parquet"):
        b = prepare_data(str(tmp_path / "hub"))
    assert (len(b.train), len(b.val)) == (8, 2)
    (tmp_path / "hub" / "validation-00000-of-00001.parquet").rename(tmp_path / "hub" / "dev-0.parquet")
    b = prepare_data(str(tmp_path / "hub"))
    assert (len(b.train), len(b.val)) == (8, 2)  # dev is validation data
    for f in ("dev-0.parquet", "test-00000-of-00001.parquet"):
        (tmp_path / "hub" / f).unlink()
    write("extra.parquet", range(8, 12))
    with pytest.warns(UserWarning, match=r"named as training data \(train-00000-of-00001.parquet\) lie beside files "
                                         r"named as no split \(extra.parquet\): all of them are trained on"):
        assert len(prepare_data(str(tmp_path / "hub"), val_split=0).train) == 12
