"""Tar shards (WebDataset format) read in place through data=: the same samples, labels,
bad-file handling and results as the same images in a folder."""

from __future__ import annotations

import io
import re
import json
import os
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import damaged_png_bytes, make_image_folder
from shard_helpers import folder_files, folder_items, uneven_sizes, write_shards

import transferkit as tk
from transferkit.data import eval_transform, prepare_data
from transferkit.data.shards import expand_braces, open_shards, shard_index
from transferkit.data.fingerprint import data_fingerprint
from transferkit.train.loaders import make_loader

SPEC = tk.InputSpec(image_size=16)


def _quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


def _sorted_items(folder: Path):
    """The folder's images in the folder dataset's own order (class, then file name)."""
    return [(f.read_bytes(), f.suffix[1:].lower(), c) for f, c in folder_files(folder)]


def test_shards_named_by_a_glob_multi_dot_extensions_and_members_apart(tmp_path):
    """A glob names local shards (sorted); ``key.input.jpg`` is an image (WebDataset's field
    ``input.jpg``); ``.jfif`` and ``.jpe`` are images as in a folder; members of one key apart
    from each other are named, as WebDataset would read them as several samples; a list mixing
    a shard with another file is refused."""
    items = _sorted_items(make_image_folder(tmp_path / "img", per_class=3))
    write_shards(items, tmp_path / "s", [3, 3])
    assert len(prepare_data(str(tmp_path / "s" / "train-*.tar"), val_split=0).train) == 6
    with pytest.raises(tk.DataError, match="matches no file"):
        prepare_data(str(tmp_path / "s" / "none-*.tar"), val_split=0)
    with pytest.raises(tk.DataError, match=r"A list of shards names .tar files .*notes.txt' is not one"):
        prepare_data([str(tmp_path / "s" / "train-000000.tar"), str(tmp_path / "notes.txt")], val_split=0)

    def shard(path, members):
        with tarfile.open(path, "w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return str(path)

    labels = [str(int(c == "light")).encode() for _, _, c in items]
    named = [json.dumps({"label": c}).encode() for _, _, c in items]
    dotted = shard(tmp_path / "dotted.tar", [m for k, (data, _, _) in enumerate(items)
                                             for m in ((f"k{k}.input.png", data), (f"k{k}.caption.txt", b"a photo"),
                                                       (f"k{k}.json", named[k]))])
    b = prepare_data(dotted, val_split=0)  # a caption is another field, not the label (txt outranks json)
    assert len(b.train) == 6 and b.classes == ["dark", "light"] and b.train.targets == [int(x) for x in labels]
    # every extension a folder scan reads names an image member (jfif, jpe: JPEG's other names; any case)
    jfif = shard(tmp_path / "jfif.tar", [m for k, (data, _, _) in enumerate(items)
                                         for m in ((f"k{k}.{('jfif', 'jpe', 'JPG')[k % 3]}", data),
                                                   (f"k{k}.cls", labels[k]))])
    assert len(prepare_data(jfif, val_split=0).train) == 6
    # a class index written as a whole float (a float column's 1.0) is that index, not "no label"
    floats = shard(tmp_path / "floats.tar", [m for k, (data, _, _) in enumerate(items)
                                             for m in ((f"k{k}.png", data), (f"k{k}.json", json.dumps(
                                                 {"label": float(labels[k])}).encode()))])
    assert prepare_data(floats, val_split=0).train.targets == [int(x) for x in labels]
    # several images in a sample: a plain one is read; of fields only ("mask.png", "input.png"), the first, said
    tiny = items[0][0] if items[0][1] == "png" else items[1][0]
    plain = shard(tmp_path / "plain.tar", [m for k, (data, _, _) in enumerate(items)
                                           for m in ((f"k{k}.mask.png", tiny), (f"k{k}.png", data),
                                                     (f"k{k}.cls", labels[k]))])
    b = prepare_data(plain, val_split=0)
    assert [b.train.source.read(int(i)) for i in b.train.indices] == [data for data, _, _ in items]
    assert not any("several images" in w for w in b.report.warnings)
    fields = shard(tmp_path / "fields.tar", [m for k, (data, _, _) in enumerate(items)
                                             for m in ((f"k{k}.mask.png", tiny), (f"k{k}.input.png", data),
                                                       (f"k{k}.cls", labels[k]))[:3 if k > 1 else 2]])
    with pytest.warns(UserWarning, match=r"4 samples of the training shards hold several images, none of them named "
                                         r"plainly \(e.g. 'k2: mask.png, input.png' in .*fields.tar'\): the first"):
        assert len(prepare_data(fields, val_split=0).train) == 4  # two without a label: left out
    # keys that start with '_' or '-' are samples (YouTube-style ids); hidden files, WebDataset's metadata and a
    # class list packed into the shard are not
    under = shard(tmp_path / "under.tar", [m for k, (data, _, _) in enumerate(items)
                                           for m in ((f"{'_-'[k % 2]}x{k}.png", data), (f"{'_-'[k % 2]}x{k}.cls",
                                                                                          labels[k]))] +
                  [("._x0.png", b"AppleDouble"), (".hidden.png", b"x"), ("__meta__.json", b"{}"),
                   ("_info.json", json.dumps({"classes": ["dark", "light"]}).encode())])
    b = prepare_data(under, val_split=0)
    assert len(b.train) == 6 and b.train.targets == [int(x) for x in labels] and not b.report.warnings
    odd = tmp_path / "sh[v2]"  # a folder whose name reads as a glob: taken as it is
    odd.mkdir()
    (odd / "train-000.tar").write_bytes((tmp_path / "dotted.tar").read_bytes())
    assert len(prepare_data(str(odd / "train-000.tar"), val_split=0).train) == 6
    apart = shard(tmp_path / "apart.tar", [(f"k{k}.png", data) for k, (data, _, _) in enumerate(items)] +
                  [(f"k{k}.cls", labels[k]) for k in range(len(items))])
    with pytest.raises(tk.DataError, match=r"hold no usable sample .* 6 keys of the shards have members apart "
                                           r"from each other \(e.g. 'k0' in .*apart.tar'\): a sample's members"):
        prepare_data(apart, val_split=0)
    # samples in a row under one key (each its image and label): each read on its own, with a warning
    twice = shard(tmp_path / "twice.tar", [(f"k{k // 2}.{ext}", data if ext == "png" else labels[k])
                                           for k, (data, _, _) in enumerate(items) for ext in ("png", "cls")])
    with pytest.warns(UserWarning, match=r"3 samples of the training shards repeat the key of the sample before "
                                         r"\(e.g. 'k0' in .*twice.tar'.*each is read as a sample of its own"):
        b = prepare_data(twice, val_split=0)
    assert len(b.train) == 6 and b.train.targets == [int(x) for x in labels]
    assert [b.train.source.read(int(i)) for i in b.train.indices] == [data for data, _, _ in items]
    # a label met twice in a sample (appended with tar -r) is no sample of its own: the first is read
    relabelled = shard(tmp_path / "relabelled.tar", [m for k, (data, _, _) in enumerate(items)
                                                     for m in ((f"k{k}.png", data), (f"k{k}.cls", labels[k]),
                                                               (f"k{k}.cls", b"0"))])
    with pytest.warns(UserWarning, match=r"6 members of the training shards appear twice in their sample \(e.g. "
                                         r"'k0.cls' in .*relabelled.tar'\): the first is read"):
        b = prepare_data(relabelled, val_split=0)
    assert len(b.train) == 6 and b.train.targets == [int(x) for x in labels]
    assert not any("no image" in w for w in b.report.warnings), b.report.warnings
    with pytest.raises(tk.DataError, match="cannot be read as an image \\(UnidentifiedImageError: cannot identify "
                                           "image file\\)\\."):
        prepare_data(shard(tmp_path / "bad.tar", [("a.png", b"not an image"), ("a.cls", b"0")] +
                           [(f"k{k}.png", d) if i == 0 else (f"k{k}.cls", b"1") for k, (d, _, _) in enumerate(items)
                            for i in range(2)]), val_split=0, on_bad_file="raise")


def test_brace_patterns_expand_like_webdataset():
    assert expand_braces("a-{008..011}.tar") == ["a-008.tar", "a-009.tar", "a-010.tar", "a-011.tar"]
    assert expand_braces("{x,y}/s-{0..1}.tar") == ["x/s-0.tar", "x/s-1.tar", "y/s-0.tar", "y/s-1.tar"]
    # as bash expands them: outer groups first, padding to the wider bound, a lone group kept
    assert expand_braces("s/{train-{0..1},extra-0}.tar") == ["s/train-0.tar", "s/train-1.tar", "s/extra-0.tar"]
    assert expand_braces("s-{1..010}.tar")[:2] == ["s-001.tar", "s-002.tar"]
    assert expand_braces("s-{0..10}.tar")[-2:] == ["s-9.tar", "s-10.tar"]
    assert expand_braces("a{b}c-{0..1}") == ["a{b}c-0", "a{b}c-1"] and expand_braces("a{b") == ["a{b"]
    assert expand_braces("a{b{c,d}") == ["a{bc", "a{bd"]  # a brace none closes is text
    # steps, letters, counting down and negative bounds were kept as text (the literal pattern named as missing)
    assert expand_braces("t-{0..4..2}.tar") == ["t-0.tar", "t-2.tar", "t-4.tar"]
    assert expand_braces("t-{a..c}") == ["t-a", "t-b", "t-c"] and expand_braces("{3..1}") == ["3", "2", "1"]
    assert expand_braces("{-1..1}") == ["-1", "0", "1"] and expand_braces("{-05..1..3}") == ["-05", "-02", "001"]
    assert expand_braces("{1.5..2}") == ["{1.5..2}"] and expand_braces("{aa..c}") == ["{aa..c}"]  # none: text
    # a mistyped bound took all the machine's memory (23 GB) before a MemoryError
    for pattern, count in (("s-{0..99999999999}.tar", "100,000,000,000"), ("s-{000000..999999}{000..999}.tar",
                                                                          "1,000,000,000"),
                           ("s-{a,b}/{0..9}-{0..99999999999}.tar", "2,000,000,000,000")):  # the whole pattern named
        with pytest.raises(tk.DataError, match=re.escape(f"pattern {pattern!r} stands for {count} names, more than "
                                                         "the 1,000,000") + ".* mistyped"):
            expand_braces(pattern)
    assert len(expand_braces("s-{0000..9999}-{0..9}.tar")) == 100_000
    with pytest.raises(tk.DataError, match=r"'s-\{0..99999999999\}-\{9..0\}.tar' stands for 1,000,000,000,000 names"):
        expand_braces("s-{0..99999999999}-{9..0}.tar")  # a range counting down counted none: the huge one was made


@pytest.mark.parametrize("label", ["cls", "txt", "json"])
def test_shards_give_the_folder_samples_labels_and_pixels(tmp_path, label):
    folder = make_image_folder(tmp_path / "img", per_class=7)
    items = _sorted_items(folder)
    sizes = uneven_sizes(len(items), 4)  # uneven, one empty
    write_shards(items, tmp_path / "shards", sizes, label=label)
    pattern = str(tmp_path / "shards" / "train-{000000..000003}.tar")
    as_folder = prepare_data(folder, val_split=0)
    as_shards = _quiet(prepare_data, pattern, val_split=0)
    assert as_shards.classes == as_folder.classes == ["dark", "light"]
    assert as_shards.train.targets == as_folder.train.targets
    a, b = as_folder.train.view(transform=eval_transform(SPEC)), as_shards.train.view(transform=eval_transform(SPEC))
    for i in (0, 5, len(a) - 1):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    assert any("shards holds no sample" in w for w in as_shards.report.warnings)  # the empty shard is reported


def test_folder_list_and_pattern_name_the_same_shards(tmp_path):
    folder = make_image_folder(tmp_path / "img", per_class=4)
    paths = write_shards(_sorted_items(folder), tmp_path / "s", [3, 5])
    by_folder = prepare_data(str(tmp_path / "s"), val_split=0)
    by_list = prepare_data([str(p) for p in paths], val_split=0)
    by_pattern = prepare_data(str(tmp_path / "s" / "train-{000000..000001}.tar"), val_split=0)
    assert by_folder.train.targets == by_list.train.targets == by_pattern.train.targets
    assert len(by_folder.train) == 8


def test_class_names_come_from_info_json_or_classes(tmp_path):
    folder = make_image_folder(tmp_path / "img", per_class=3)
    write_shards(_sorted_items(folder), tmp_path / "s", [6], classes=["dark", "light"])
    info = json.loads((tmp_path / "s" / "_info.json").read_text())
    (tmp_path / "s" / "_info.json").write_text(json.dumps({**info, "classes": ["night", "day"]}))
    assert prepare_data(str(tmp_path / "s"), val_split=0).classes == ["night", "day"]
    assert prepare_data(str(tmp_path / "s"), val_split=0, classes=["a", "b"]).classes == ["a", "b"]
    (tmp_path / "s" / "_info.json").write_text(json.dumps({"classes": ["cat", "dog", "cat"]}))
    with pytest.raises(tk.DataError, match=r"_info.json': its 'classes' list names \['cat'\] more than once"):
        prepare_data(str(tmp_path / "s"), val_split=0)  # refused before training, not when the export checks labels
    # an empty list was said as "class indices [0, 1] lie outside 0..-1", a bare list was passed over
    for text, said in (('{"classes": []}', r"'classes' must be a list of class names, got \[\]"),
                       ('["cat", "dog"]', r"holds a JSON list; it is an object whose 'classes' lists the class names")):
        (tmp_path / "s" / "_info.json").write_text(text)
        with pytest.raises(tk.DataError, match=said):
            prepare_data(str(tmp_path / "s"), val_split=0)
    (tmp_path / "s" / "_info.json").unlink()
    assert prepare_data(str(tmp_path / "s"), val_split=0).classes == ["0", "1"]
    # a shard named twice (or copied) is named in a warning: its samples would count twice
    b = prepare_data([str(tmp_path / "s" / "train-000000.tar")] * 2, val_split=0)
    assert len(b.train) == 12 and any("hold the same 6 sample keys" in w for w in b.report.warnings)
    # shards whose keys restart at 0 (the same keys, other images) are not taken for copies
    items = _sorted_items(folder)
    other = make_image_folder(tmp_path / "img2", per_class=3, seed=5)
    a = write_shards(items, tmp_path / "r1", [6])[0]
    c = write_shards(_sorted_items(other), tmp_path / "r2", [6])[0]
    b = prepare_data([str(a), str(c)], val_split=0)
    assert len(b.train) == 12 and not any("same 6 sample keys" in w for w in b.report.warnings)
    assert not any("copies" in w or "copy" in w for w in b.report.warnings)
    # samples copied into another shard: each copy counts (training), or inflates validation
    mixed = write_shards(items[:2] + _sorted_items(other)[2:], tmp_path / "r3", [6])[0]
    b = prepare_data([str(a), str(mixed)], val_split=0)
    said = [w for w in b.report.warnings if "in the shards repeat another" in w]
    assert len(said) == 1 and "2 training samples with the same image bytes" in said[0], b.report.warnings
    assert "train0000000" in said[0]
    b = prepare_data(str(a), val_data=str(mixed))
    said = [w for w in b.report.warnings if "Validation data hold" in w]
    assert len(said) == 1 and "2 samples with the same image bytes of the training data" in said[0], b.report.warnings
    # another image under the same key, of the same byte size and dimensions (a coincidence): read, not a copy
    x, y = items[0][0], _sorted_items(other)[0][0]
    size = max(len(x), len(y))  # a PNG's decoders ignore bytes after its end: both padded to one size
    a2 = write_shards([(x + bytes(size - len(x)), "png", items[0][2])] + items[1:], tmp_path / "r5", [6])[0]
    alike = write_shards([(y + bytes(size - len(y)), "png", items[0][2])] + _sorted_items(other)[1:],
                         tmp_path / "r4", [6])[0]
    for b in (prepare_data([str(a2), str(alike)], val_split=0), prepare_data(str(a2), val_data=str(alike))):
        assert not any("repeat another" in w or "Validation data hold" in w for w in b.report.warnings)
    assert not any("Validation data hold" in w for w in prepare_data(str(a), val_data=str(c)).report.warnings)
    # uncompressed images of one shape share their byte size: other images under the same keys are no copies
    def bmp(seed):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(buf, "BMP")
        return buf.getvalue()

    x = write_shards([(bmp(i), "bmp", "dark" if i % 2 else "light") for i in range(6)], tmp_path / "b1", [6])[0]
    y = write_shards([(bmp(9 + i), "bmp", "dark" if i % 2 else "light") for i in range(6)], tmp_path / "b2", [6])[0]
    for b in (prepare_data([str(x), str(y)], val_split=0), prepare_data(str(x), val_data=str(y))):
        assert not any("cop" in w or "hold" in w for w in b.report.warnings), b.report.warnings
    for named in ([x, x], [x, y, y]):
        assert any("named twice or copied" in w for w in prepare_data([str(s) for s in named],
                                                                       val_split=0).report.warnings), named
    # a copy whose labels were swapped: said as a copy, not as the two answers it gives
    swap = {"dark": "light", "light": "dark"}
    flipped = write_shards([(d, e, swap[c]) for d, e, c in items], tmp_path / "r6", [6])[0]
    said = prepare_data([str(a), str(flipped)], val_split=0).report.warnings
    assert any("the same samples, and 6 of them with another label in each: one input, two answers" in w
               for w in said), said
    # a class without a sample (listed, or a gap in the indices) is named in a warning
    b = prepare_data(str(tmp_path / "s"), val_split=0, classes=["dark", "light", "wasps"])
    assert any("1 class of 3 has no training sample: ['wasps']" in w for w in b.report.warnings)
    assert not any("no training sample" in w for w in prepare_data(str(tmp_path / "s"), val_split=0).report.warnings)


def test_validation_shards_are_read_by_their_own_class_names(tmp_path):
    """Validation shards whose ``_info.json`` lists the classes in another order (or a subset)
    are read by name: their class indices are their own list's, not the training data's."""
    folder = make_image_folder(tmp_path / "img", classes=("ant", "bee", "cat"), per_class=2)
    items = _sorted_items(folder)
    write_shards(items, tmp_path / "tr", [6])
    write_shards(items, tmp_path / "va", [6], prefix="val", classes=["cat", "bee", "ant"])
    b = prepare_data(str(tmp_path / "tr"), val_data=str(tmp_path / "va"))
    assert b.classes == ["ant", "bee", "cat"] and b.val.targets == b.train.targets == [0, 0, 1, 1, 2, 2]
    write_shards(items[:2] + items[4:], tmp_path / "sub", [4], prefix="val", classes=["cat", "ant"])
    assert prepare_data(str(tmp_path / "tr"), val_data=str(tmp_path / "sub")).val.targets == [0, 0, 2, 2]
    with pytest.raises(tk.DataError, match=r"class indices \[2\] outside 0..1 for their own classes \['cat', 'ant'\]"):
        write_shards(items, tmp_path / "bad", [6], prefix="val", classes=["cat", "ant", "bee"])
        (tmp_path / "bad" / "_info.json").write_text(json.dumps({"classes": ["cat", "ant"]}))
        prepare_data(str(tmp_path / "tr"), val_data=str(tmp_path / "bad"))
    # names that share nothing with the training classes (WordNet ids beside readable names) cannot be matched
    write_shards(items, tmp_path / "ids", [6], prefix="val")
    (tmp_path / "ids" / "_info.json").write_text(json.dumps({"classes": ["n01", "n02", "n03"]}))
    with pytest.raises(tk.DataError, match=r"The classes of the validation shards \(\['n01', 'n02', 'n03'\]\) include "
                                           r"no class of the training data \(\['ant', 'bee', 'cat'\]\)"):
        prepare_data(str(tmp_path / "tr"), val_data=str(tmp_path / "ids"))
    (tmp_path / "ids" / "_info.json").unlink()  # no names of their own: their indices are the training classes'
    assert prepare_data(str(tmp_path / "tr"), val_data=str(tmp_path / "ids")).val.targets == [0, 0, 1, 1, 2, 2]
    (tmp_path / "tr" / "_info.json").unlink()  # training classes known by index: names cannot be matched to them
    with pytest.raises(tk.DataError, match=r"include no class of the training data \(\['0', '1', '2'\]\).*known by "
                                           r"index only: give classes=\[\.\.\.\]"):
        prepare_data(str(tmp_path / "tr"), val_data=str(tmp_path / "va"))
    named = prepare_data(str(tmp_path / "tr"), val_data=str(tmp_path / "va"), classes=["ant", "bee", "cat"])
    assert named.val.targets == [0, 0, 1, 1, 2, 2]
    # for training data, classes= names the indices of shards whose own names it does not share
    renamed = prepare_data(str(tmp_path / "va" / "val-000000.tar"), classes=["x", "y", "z"], val_split=0)
    assert renamed.train.targets == [2, 2, 1, 1, 0, 0]


def test_shard_class_names_are_checked_like_a_csv_s(tmp_path):
    """Two shards spelling one class 'ants' and 'Ants' made a 3-class model without a word; a
    name with a line break trained a whole run whose export then failed."""
    items = folder_items(make_image_folder(tmp_path / "img", per_class=4))
    for k, (names, said) in enumerate(((["ants", "Ants"], "differ only in case"), (["ants\nsmall"] * 2, "line break"))):
        spelled = [(data, ext, names[i % 2] if cls == "dark" else "bees") for i, (data, ext, cls) in enumerate(items)]
        write_shards(spelled, tmp_path / f"s{k}", [4, 4], label="txt", info=False)
        with pytest.raises(tk.DataError, match=said):
            prepare_data(str(tmp_path / f"s{k}"), val_split=0)
    with pytest.raises(tk.DataError, match="line break"):  # class names given are checked too
        prepare_data(str(tmp_path / "s0"), val_split=0, classes=["ants", "Ants", "be\nes"])


def test_a_class_index_of_minus_one_is_refused_not_dropped(tmp_path):
    folder = make_image_folder(tmp_path / "img", per_class=3)
    path = write_shards(_sorted_items(folder), tmp_path / "s", [6])[0]
    with tarfile.open(path, "a") as tar:  # one more sample, "unlabelled" as some data sets mark it
        for name, data in (("extra.png", (folder / "dark").iterdir().__next__().read_bytes()), ("extra.cls", b"-1")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(tk.DataError, match=r"class indices \[-1\] lie outside 0..1"):
        prepare_data(str(path), val_split=0)


def test_hashed_validation_split_is_stable_and_reads_no_image(tmp_path, monkeypatch):
    folder = make_image_folder(tmp_path / "img", per_class=30)
    items = folder_items(folder)
    write_shards(items, tmp_path / "s", [20, 20, 20])
    b1 = prepare_data(str(tmp_path / "s"), val_split=0.25, seed=3)
    keys_val = set(b1.val.keys)
    assert 5 <= len(keys_val) <= 28 and set(b1.train.keys).isdisjoint(keys_val)
    assert len(b1.train) + len(b1.val) == 60
    # the same samples in other shards (re-sharded, listed in another order): the same samples are held out
    resharded = write_shards(items, tmp_path / "t", [7, 53])
    import transferkit.data.shards as shards

    monkeypatch.setattr(shards.ShardSource, "read", lambda self, i: pytest.fail("the split read an image"))
    b2 = prepare_data([str(p) for p in resharded[::-1]], val_split=0.25, seed=3, scan="none")
    assert set(b2.val.keys) == {k for k in keys_val}
    assert set(prepare_data(str(tmp_path / "s"), val_split=0.25, seed=4, scan="none").val.keys) != keys_val


def test_the_hashed_split_of_shards_whose_keys_restart_splits_each_key(tmp_path):
    """Keys restarting at 0 in each shard: the key alone put every image under one key on one
    side (4 keys: only 0, 25, 50, 75 or 100 % held out); its byte size joins it then."""
    items = folder_items(make_image_folder(tmp_path / "img", per_class=12, size=20))
    shards = [write_shards(items[4 * s:4 * s + 4], tmp_path / f"s{s}", [4], prefix="x")[0] for s in range(6)]
    b = _quiet(prepare_data, [str(p) for p in shards], val_split=0.5, seed=0)
    source = b.train.source
    sides = {}
    for side, ds in (("train", b.train), ("val", b.val)):
        for i in ds.indices.tolist():
            sides.setdefault(source.key(i), set()).add(side)
    assert len(sides) == 4 and any(len(s) == 2 for s in sides.values())  # a key's images on both sides
    # one scheme whatever the data: a shard added whose keys repeat others' moves no sample across
    first = _quiet(prepare_data, [str(p) for p in shards[:1]], val_split=0.5, seed=0)
    held = {source.sample_name(int(i)) for i in b.val.indices}
    assert {first.train.source.sample_name(int(i)) for i in first.val.indices} <= held


def test_folder_with_train_and_val_shards_validates_on_val(tmp_path):
    folder = make_image_folder(tmp_path / "img", per_class=5)
    items = folder_items(folder)
    write_shards(items[:7], tmp_path / "s", [7], prefix="train")
    write_shards(items[7:], tmp_path / "s", [3], prefix="val")
    b = prepare_data(str(tmp_path / "s"))
    assert (len(b.train), len(b.val)) == (7, 3)
    # naming one side explicitly: the folder still gives only its own side, never the other's shards
    s = tmp_path / "s"
    for data, val in ((s, s / "val-000000.tar"), (str(s / "train-{000000..000000}.tar"), s), (s, s)):
        b = prepare_data(str(data), val_data=str(val))
        assert (len(b.train), len(b.val)) == (7, 3), (data, val)
    # dev-*.tar is validation data; beside shards named as no split, training shards are all trained on, said
    dev = tmp_path / "dev"
    write_shards(items[:7], dev, [7], prefix="train")
    write_shards(items[7:], dev, [3], prefix="dev")
    assert [len(p) for p in (prepare_data(str(dev)).train, prepare_data(str(dev)).val)] == [7, 3]
    (dev / "dev-000000.tar").rename(dev / "extra-000000.tar")
    with pytest.warns(UserWarning, match=r"holds shards named as training data \(train-000000\.tar\) and shards "
                                         r"named as no split \(extra-000000\.tar\): all of them are trained on"):
        assert len(prepare_data(str(dev), val_split=0).train) == 10
    with pytest.raises(tk.DataError, match=r"share 1 shard \(.*train-000000\.tar\).*inflates validation accuracy"):
        prepare_data(str(s / "train-000000.tar"), val_data=[str(s / "val-000000.tar"), str(s / "train-000000.tar")])
    # a folder of validation shards alone has nothing to train on; as val_data it serves
    (s / "train-000000.tar").rename(tmp_path / "train-000000.tar")
    with pytest.raises(tk.DataError, match=r"holds validation shards \(val-000000\.tar\) but no train\*\.tar"):
        prepare_data(str(s))
    assert len(prepare_data(str(tmp_path / "train-000000.tar"), val_data=str(s), classes=["dark", "light"]).val) == 3
    # the split's name as a word (validated-*.tar is not validation data); shards not named by split beside
    # validation shards are not taken for training ones
    write_shards(items, tmp_path / "w", [5, 5], prefix="validated")
    assert len(prepare_data(str(tmp_path / "w"), val_split=0).train) == 10
    (tmp_path / "train-000000.tar").rename(s / "shard-000000.tar")
    with pytest.raises(tk.DataError, match=r"holds validation shards \(val-000000\.tar\) beside shards not named by "
                                           r"split \(shard-000000\.tar\): name the training shards train-\*\.tar"):
        prepare_data(str(s))
    (s / "shard-000000.tar").rename(tmp_path / "train-000000.tar")
    # a compressed training shard beside plain validation shards is refused, not left out
    (tmp_path / "train-000000.tar").rename(s / "train-000000.tar.gz")
    with pytest.raises(tk.DataError, match=r"holds compressed tar files \(train-000000\.tar\.gz\)"):
        prepare_data(str(s))


def test_a_pattern_naming_training_and_validation_shards_says_it_trains_on_both(tmp_path):
    folder = make_image_folder(tmp_path / "img", per_class=5)
    items = folder_items(folder)
    write_shards(items[:7], tmp_path / "s", [4, 3], prefix="train")
    write_shards(items[7:], tmp_path / "s", [3], prefix="val")
    for data in (str(tmp_path / "s" / "*.tar"), sorted(str(p) for p in (tmp_path / "s").glob("*.tar"))):
        with pytest.warns(UserWarning, match=r"The training shards hold 1 shard named as held-out data "
                                             r"\(val-000000.tar\), and they are trained on.*pass the folder"):
            assert len(prepare_data(data, val_split=0).train) == 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the folder splits itself; a pattern of training shards says nothing
        assert len(prepare_data(str(tmp_path / "s")).train) == 7
        assert len(prepare_data(str(tmp_path / "s" / "train-*.tar"), val_split=0).train) == 7


def test_a_split_named_inside_a_shard_s_name_is_that_split(tmp_path):
    """imagenet-train-0000.tar / imagenet-val-0000.tar, trainval + test: the split is named as a
    word anywhere in the name; shards left unused, or held-out ones trained on, are named."""
    items = folder_items(make_image_folder(tmp_path / "img", per_class=5))

    def folder(name, *parts):
        for prefix, lo, hi in parts:
            write_shards(items[lo:hi], tmp_path / name, [hi - lo], prefix=prefix)
        return str(tmp_path / name)

    b = prepare_data(folder("a", ("imagenet-train", 0, 7), ("imagenet-val", 7, 10)))
    assert (len(b.train), len(b.val)) == (7, 3) and not b.report.warnings
    b = prepare_data(folder("b", ("trainval", 0, 7), ("test", 7, 10)))  # VOC's trainval: training data
    assert (len(b.train), len(b.val)) == (7, 3)
    b = prepare_data(folder("c", ("train", 0, 6), ("val", 6, 8), ("more", 8, 10)))
    assert (len(b.train), len(b.val)) == (6, 2)
    assert any("its other shards are not used: more-000000.tar" in w for w in b.report.warnings), b.report.warnings
    b = prepare_data(folder("d", ("all", 0, 7), ("test", 7, 10)), val_split=0)
    assert len(b.train) == 10
    assert any("named as test data (test-000000.tar) are trained on" in w for w in b.report.warnings)


def test_member_index_is_cached_by_path_size_and_times(tmp_path, monkeypatch):
    """The cached member index and the data's identity go by the shard's path, size,
    modification and change times: a shard rewritten in place, even with its size and
    modification time kept (``touch -r``, ``cp -p``), is indexed again and is other data."""
    folder = make_image_folder(tmp_path / "img", per_class=3)
    (path,) = write_shards(_sorted_items(folder), tmp_path / "s", [6])
    first, cached = shard_index(str(path), cache_dir=tmp_path / "c")
    assert not cached
    again, cached = shard_index(str(path), cache_dir=tmp_path / "c")
    assert cached and again == first
    fp = data_fingerprint(prepare_data(str(path), val_split=0).train)
    write_shards(_sorted_items(folder)[::-1], tmp_path / "s", [6])  # rewritten: new size/mtime
    _, cached = shard_index(str(path), cache_dir=tmp_path / "c")
    assert not cached
    assert data_fingerprint(prepare_data(str(path), val_split=0).train) != fp
    before = os.stat(path)
    fp = data_fingerprint(prepare_data(str(path), val_split=0).train)
    write_shards(_sorted_items(folder), tmp_path / "s", [6])  # the members in another order, same size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    index, cached = shard_index(str(path), cache_dir=tmp_path / "c")
    assert not cached and index == first
    assert data_fingerprint(prepare_data(str(path), val_split=0).train) != fp


def test_fingerprint_reads_no_sample_and_grows_with_shards(tmp_path, monkeypatch):
    folder = make_image_folder(tmp_path / "img", per_class=3)
    write_shards(_sorted_items(folder), tmp_path / "s", [3, 3])
    ds = prepare_data(str(tmp_path / "s"), val_split=0).train
    import transferkit.data.shards as shards

    monkeypatch.setattr(shards.ShardSource, "read", lambda self, i: pytest.fail("the fingerprint read a sample"))
    assert data_fingerprint(ds) == data_fingerprint(ds.view()) != data_fingerprint(ds.view([0, 1]))


def test_bad_and_unlabelled_samples_are_left_out_and_reported(tmp_path):
    folder = make_image_folder(tmp_path / "img", per_class=4)
    items = _sorted_items(folder)
    items[2] = (b"not an image", "jpg", items[2][2])
    write_shards(items, tmp_path / "s", [8])
    with tarfile.open(tmp_path / "s" / "extra.tar", "w") as tar:  # a sample without a label
        data = items[0][0]
        info = tarfile.TarInfo("lonely.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    b = _quiet(prepare_data, str(tmp_path / "s"), val_split=0)
    assert len(b.train) == 7
    assert [p.rsplit(":", 1)[1] for p, _ in b.report.bad_files] == ["train0000002"]
    assert any("no label (1" in w and "(e.g. lonely (jpg) in 'extra.tar')" in w for w in b.report.warnings)
    with pytest.raises(tk.DataError, match=r"no image .* or no label .*\(e.g. lonely \(jpg\) in 'extra.tar'\)"):
        prepare_data(str(tmp_path / "s"), val_split=0, on_bad_file="raise")
    # what a key holds says why, where it shows: an image stored as a link (tar without -h), a dot in the key
    with tarfile.open(tmp_path / "odd.tar", "w") as tar:
        for name, data in (("k0.cls", b"0"), ("cam1.2024-01-05.png", items[0][0]), ("cam1.2024-01-05.cls", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("k0.png")
        link.type, link.linkname = tarfile.SYMTYPE, "../images/k0.png"
        tar.addfile(link)
        for name, data in (("k1.png", items[1][0]), ("k1.json", b'{"class": "dark", "flag": true}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(tk.DataError, match=r"\(e.g. k0 \(cls: its png is a link, which a shard stores without data "
                                           r"\(make the shard with tar -h --hard-dereference\)\) in 'odd.tar', cam1 "
                                           r"\(2024-01-05.png, 2024-01-05.cls: a dot in the member names before the "
                                           r"extension ends the key there.*, k1 \(png, json: its label member holds "
                                           r"no class index or name \(a json object's \"label\" is one"):
        prepare_data(str(tmp_path / "odd.tar"), val_split=0, on_bad_file="raise")


def test_a_shard_that_a_tar_reader_would_end_early_is_a_bad_shard(tmp_path):
    """Tar readers stop at the first zero block or bad header: a second archive appended, a
    damaged header or a zeroed tail would silently cut the shard's samples short."""
    items = _sorted_items(make_image_folder(tmp_path / "img", per_class=4))
    a, b = write_shards([x for pair in zip(items[:4], items[4:]) for x in pair], tmp_path / "s", [4, 4])
    raw = a.read_bytes()
    damaged = bytearray(raw)
    damaged[1536:1546] = b"x" * 10  # inside the second member's header
    cases = {"cat.tar": (raw + b.read_bytes(), "data follow tar's end-of-archive block at byte"),
             "header.tar": (bytes(damaged), "is not a valid tar header: the shard is damaged there"),
             "zeros.tar": (raw + bytes(2_000_000), "bytes of zeros follow its last member"),
             "cut.tar": (raw[:len(raw) // 2], "the shard is truncated")}
    for name, (data, said) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(tk.DataError, match=f"Cannot read the shard .*{name}.*{said}"):
            prepare_data(str(tmp_path / name), val_split=0, on_bad_file="raise")
        bundle = _quiet(prepare_data, [str(a), str(tmp_path / name)], val_split=0)
        assert len(bundle.train) == 4 and bundle.report.bad_files[0][0] == str(tmp_path / name)
        said = [w for w in bundle.report.warnings if name in w]  # one warning, naming the shard once
        assert len(said) == 1 and said[0].count(name) == 1 and said[0].endswith("; the shard is left out."), said
    with tarfile.open(a) as tar:
        last = tar.getmembers()[-1]
    body = raw[:last.offset_data + -(-last.size // 512) * 512]  # up to the end of the last member's data
    for blocking in (20, 512, 2048):  # tar's default, and GNU tar -b 512, -b 2048 (records of 256 KiB, 1 MiB)
        record = 512 * blocking  # the most zeros: a first end block that fills a record, the second in a new one
        (tmp_path / "padded.tar").write_bytes(body + bytes(512 + record))
        assert len(prepare_data(str(tmp_path / "padded.tar"), val_split=0, on_bad_file="raise").train) == 4


@pytest.mark.parametrize("workers", [0, 2])
def test_sample_that_fails_to_decode_in_training_is_replaced_and_reported(tmp_path, workers):
    folder = make_image_folder(tmp_path / "img", per_class=4)
    items = _sorted_items(folder)
    items[1] = (damaged_png_bytes(), "png", items[1][2])  # passes the quick scan, fails to decode
    write_shards(items, tmp_path / "s", [5, 3])
    b = prepare_data(str(tmp_path / "s"), val_split=0)
    loader = make_loader(b.train.view(transform=eval_transform(SPEC)), batch_size=3, shuffle=False,
                         device=torch.device("cpu"), num_workers=workers)
    with pytest.warns(UserWarning, match="train0000001.*failed to load during the run"):
        labels = torch.cat([y for _, y in loader]).tolist()
    assert labels == [0, 0, 0, 0, 1, 1, 1, 1]  # its place taken by its own class
    assert [p.rsplit(":", 1)[1] for p in b.report.bad_at_load] == ["train0000001"]


def test_compressed_shards_and_remote_folders_are_refused_clearly(tmp_path):
    with pytest.raises(tk.DataError, match="compressed"):
        prepare_data("https://example.com/train-{000000..000003}.tar.gz")
    with pytest.raises(tk.DataError, match="cannot be listed"):
        prepare_data("https://example.com/shards/")
    (tmp_path / "a.tar.gz").write_bytes(b"")
    with pytest.raises(tk.DataError, match="compressed"):
        prepare_data(str(tmp_path / "a.tar.gz"))
    with pytest.raises(tk.DataError, match="do not exist"):
        prepare_data(str(tmp_path / "missing-{0..2}.tar"))
    # a compressed shard under a .tar name is recognised by its first bytes
    import gzip

    folder = make_image_folder(tmp_path / "img", per_class=2)
    plain = write_shards(folder_items(folder), tmp_path / "s", [4])[0]
    (tmp_path / "packed.tar").write_bytes(gzip.compress(plain.read_bytes()))
    with pytest.raises(tk.DataError, match=r"packed\.tar' is gzip-compressed under a \.tar name.*gunzip < packed"):
        prepare_data(str(tmp_path / "packed.tar"), on_bad_file="raise")


def test_finetune_on_shards_matches_the_same_images_as_a_folder(tmp_path):
    train = make_image_folder(tmp_path / "train", per_class=8, seed=0)
    val = make_image_folder(tmp_path / "val", per_class=3, seed=1)
    write_shards(_sorted_items(train), tmp_path / "s", uneven_sizes(16, 3), prefix="train")
    write_shards(_sorted_items(val), tmp_path / "s", [6], prefix="val")
    common = dict(weights=None, policy="finetune", epochs=2, batch_size=4, image_size=16, verbose=False,
                  num_workers=0, precision="fp32", augment="none", decode_once=False)
    a = _quiet(tk.finetune, "tk:small_cnn", data=train, val_data=val, **common)
    b = _quiet(tk.finetune, "tk:small_cnn", data=str(tmp_path / "s" / "train-{000000..000002}.tar"),
               val_data=str(tmp_path / "s" / "val-000000.tar"), cache_dir=tmp_path / "cache", **common)
    assert b.classes == a.classes
    assert [r["train_loss"] for r in b.history] == pytest.approx([r["train_loss"] for r in a.history], abs=1e-6)
    assert b.metrics["accuracy"] == a.metrics["accuracy"]
    assert (tmp_path / "cache" / "shard-index").is_dir()


def test_cli_takes_a_shard_pattern(tmp_path):
    from transferkit.cli import main

    folder = make_image_folder(tmp_path / "img", per_class=6)
    write_shards(folder_items(folder), tmp_path / "s", [5, 7])
    code = _quiet(main, ["finetune", "--backbone", "tk:small_cnn", "--weights", "none", "--data",
                         str(tmp_path / "s" / "train-{000000..000001}.tar"), "--epochs", "1", "--image-size", "16",
                         "--batch-size", "4", "--set", "num_workers=0", "--set", "verbose=false"])
    assert code == 0


def test_decode_once_sizes_shard_images_from_the_index_without_decoding(tmp_path, monkeypatch):
    from transferkit.data.decoded import decoded_dataset, estimate_bytes

    folder = make_image_folder(tmp_path / "img", per_class=4)
    write_shards(_sorted_items(folder), tmp_path / "s", [5, 3])
    as_folder = prepare_data(folder, val_split=0).train
    as_shards = prepare_data(str(tmp_path / "s"), val_split=0).train
    import transferkit.data.encoded as encoded

    with monkeypatch.context() as m:
        m.setattr(encoded.EncodedImageDataset, "_load", lambda self, j: pytest.fail("decoded an image"))
        assert estimate_bytes(as_shards, SPEC, "standard") == estimate_bytes(as_folder, SPEC, "standard")
    a, _ = decoded_dataset(as_folder, SPEC, augment="standard")
    b, _ = decoded_dataset(as_shards, SPEC, augment="standard")
    assert all(torch.equal(a.image(i), b.image(i)) for i in range(len(a)))


def test_a_stray_tar_in_an_image_folder_does_not_make_it_shards(tmp_path):
    folder = make_image_folder(tmp_path / "img", per_class=3)
    (folder / "backup.tar").write_bytes(b"")
    (folder / "old.parquet").write_bytes(b"")
    b = prepare_data(folder, val_split=0)
    assert b.classes == ["dark", "light"] and len(b.train) == 6
    for c in ("dark", "light"):  # class folders whose images sit in sub-folders of their own
        (folder / c / "batch1").mkdir()
        for f in [f for f in (folder / c).iterdir() if f.is_file()]:
            f.rename(folder / c / "batch1" / f.name)
    assert prepare_data(folder, val_split=0).classes == ["dark", "light"]


def test_a_cache_dir_inside_a_folder_of_shards_leaves_it_a_folder_of_shards(tmp_path):
    """The second run with ``cache_dir`` inside the shards' folder read it as an image folder."""
    items = _sorted_items(make_image_folder(tmp_path / "img", per_class=3))
    write_shards(items, tmp_path / "s", [6])
    for _ in range(2):  # the first run writes the cache; the second meets it
        b = prepare_data(str(tmp_path / "s"), val_split=0, cache_dir=tmp_path / "s" / "cache")
        assert len(b.train) == 6
    assert (tmp_path / "s" / "cache" / "shard-index").is_dir()


def test_shards_moved_whole_keep_their_identity_and_copies_share_their_listing(tmp_path):
    """A folder of shards renamed keeps its data fingerprint (a resume after staging the data
    elsewhere goes on); a copy on another node has the listing every rank compares; shards with
    the same keys and labels but other images have another listing."""
    import shutil

    from transferkit.data.fingerprint import listing_digest

    folder = make_image_folder(tmp_path / "img", per_class=3)
    items = _sorted_items(folder)
    write_shards(items, tmp_path / "a" / "shards", [4, 2])
    ds = prepare_data(str(tmp_path / "a" / "shards"), val_split=0).train
    fp, listing = data_fingerprint(ds), listing_digest(ds)
    shutil.copytree(tmp_path / "a", tmp_path / "copy", copy_function=shutil.copyfile)  # new file times
    copy = prepare_data(str(tmp_path / "copy" / "shards"), val_split=0).train
    assert listing_digest(copy) == listing and data_fingerprint(copy) != fp
    (tmp_path / "a").rename(tmp_path / "moved")
    moved = prepare_data(str(tmp_path / "moved" / "shards"), val_split=0).train
    assert data_fingerprint(moved) == fp and listing_digest(moved) == listing
    other = [(_reencoded(data), "png", c) for data, _, c in items]  # the same keys and labels, other bytes
    write_shards(other, tmp_path / "other", [4, 2])
    assert listing_digest(prepare_data(str(tmp_path / "other"), val_split=0).train) != listing


def _reencoded(data: bytes) -> bytes:
    out = io.BytesIO()
    with Image.open(io.BytesIO(data)) as img:
        img.resize((img.width + 3, img.height)).save(out, format="PNG")
    return out.getvalue()


def test_thousands_of_shards_are_read_within_the_open_file_limit(tmp_path):
    """Every local shard stays readable with more shards than the process may open at once:
    shards are closed least recently read first; none is taken for a bad file."""
    import subprocess
    import sys

    png = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(png, format="PNG")
    n = 300
    write_shards([(png.getvalue(), "png", ("a", "b")[k % 2]) for k in range(n)], tmp_path / "s", [1] * n)
    code = ("import resource, sys, transferkit as tk\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
            "b = tk.data.prepare_data(sys.argv[1], val_split=0)\n"
            "labels = [b.train[i][1] for i in list(range(len(b.train))) * 2]\n"
            "from transferkit.data.shards import max_open_local\n"
            "print(len(labels), sum(labels), len(b.report.bad_at_load), len(b.train.source._files),\n"
            "      max_open_local())\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(2 * n), str(n), "0", "16", "16"]  # 128 // 8 open at most


def test_no_file_descriptor_left_is_raised_not_taken_for_a_bad_file(tmp_path, monkeypatch):
    import errno

    import transferkit.data.shards as shards
    from transferkit.data.late import OpenFilesError

    folder = make_image_folder(tmp_path / "img", per_class=3)
    write_shards(_sorted_items(folder), tmp_path / "s", [3, 3])
    b = prepare_data(str(tmp_path / "s"), val_split=0)
    assert b.train[0][1] == 0

    def out_of_files(self, i):
        raise OSError(errno.EMFILE, "Too many open files", self.paths[int(self.shard_of[i])])
    monkeypatch.setattr(shards.ShardSource, "read", out_of_files)
    with pytest.raises(OpenFilesError, match=r"Cannot open '.*train-000001.tar:train0000003': Too many open files "
                                             r"\(errno 24\).*not known to be bad.*ulimit -n"):
        b.train[3]
    assert not b.report.bad_at_load


def test_a_member_that_is_no_image_is_named_not_shown_as_a_stream(tmp_path):
    items = _sorted_items(make_image_folder(tmp_path / "img", per_class=3))
    items[1] = (b"\x89PNG\r\n\x1a\n" + bytes(50), "png", items[1][2])  # passes no decoder
    write_shards(items, tmp_path / "s", [6])
    with pytest.warns(UserWarning) as said:
        b = prepare_data(str(tmp_path / "s"), val_split=0, scan="none")
        labels = [b.train[i][1] for i in range(len(b.train))]
    assert labels == [0, 0, 0, 1, 1, 1] and len(b.report.bad_at_load) == 1
    with pytest.raises(tk.DataError) as raised:
        prepare_data(str(tmp_path / "s"), val_split=0, scan="none", on_bad_file="raise").train[1]
    shown = [str(w.message) for w in said] + [str(raised.value)]
    assert "cannot identify image file '" in shown[-1] and not any("_io." in m for m in shown), shown


def test_a_shard_dataset_closes_its_shards_when_it_goes(tmp_path):
    """Each shard a dataset had read stayed open until the interpreter collected the file
    objects one by one, each with a ResourceWarning ("unclosed file ... .tar")."""
    import gc

    write_shards(folder_items(make_image_folder(tmp_path / "f", per_class=3, size=16)), tmp_path / "s", [3, 3])
    ds = open_shards(sorted(str(p) for p in (tmp_path / "s").glob("*.tar")))
    assert all(len(ds.source.read(i)) for i in range(len(ds)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del ds
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]


def test_shards_of_folders_with_their_own_class_lists_are_read_by_name(tmp_path):
    """Each folder's _info.json lists its classes in its own order: the second folder's labels
    were read in the first folder's order (every one of them flipped, without a word)."""
    items = _sorted_items(make_image_folder(tmp_path / "img", per_class=4))
    a = write_shards(items[:4], tmp_path / "a", [4], classes=["dark", "light"])
    b = write_shards(items[4:], tmp_path / "b", [4], classes=["light", "dark"])
    bundle = prepare_data([str(a[0]), str(b[0])], val_split=0)
    assert bundle.classes == ["dark", "light"]
    assert [bundle.classes[t] for t in bundle.train.targets] == [c for _, _, c in items]
    (tmp_path / "b" / "_info.json").unlink()  # indices that no list names
    with pytest.raises(tk.DataError, match=r"shards of .*a' list their classes in an _info.json, and .*b.*tar' "
                                           r"gives class indices without one"):
        prepare_data([str(a[0]), str(b[0])], val_split=0)


def test_validation_shards_named_by_classes_the_training_shards_know_by_index_only_say_so(tmp_path):
    """The error read "No usable sample ... every one was bad or unlabelled"."""
    items = _sorted_items(make_image_folder(tmp_path / "img", per_class=3))
    train = write_shards(items, tmp_path / "t", [6], info=False)
    val = write_shards(items, tmp_path / "v", [6], label="txt", info=False)
    with pytest.raises(tk.DataError, match=r"The validation shards: none of their labels \(\['dark', 'light'\]\) is "
                                           r"one of the classes \['0', '1'\].*known by index only: give classes="):
        prepare_data(str(train[0]), val_data=str(val[0]))
    renamed = [(d, e, {"dark": "night", "light": "day"}[c]) for d, e, c in items]
    named = write_shards(renamed, tmp_path / "n", [6], label="txt", info=False)
    with pytest.raises(tk.DataError, match=r"none of their labels .* is one of the classes \['day', 'night'\], so no "
                                           r"sample can be read\. Label them with the training data's class names\.$"):
        prepare_data(str(named[0]), val_data=str(val[0]))
    # scored against a model (transferkit evaluate): its classes are fixed; no classes= to give
    with pytest.raises(tk.DataError, match=r"The scored shards: none of their labels .* so no sample can be read\. "
                                           r"Label them with the model's classes\.$"):
        open_shards([str(val[0])], classes=["day", "night"], what="scored")


def test_a_label_of_a_class_in_either_unicode_form_is_read_beside_unknown_ones():
    """An unknown name in both Unicode forms made the count of unknown names equal that of all
    names: data with readable 'dog' samples were refused as having no class."""
    import unicodedata

    from transferkit.data.checks import DataReport
    from transferkit.data.encoded import labels_to_targets

    cafe = "caf\u00e9"
    labels = ["dog", unicodedata.normalize("NFD", cafe), cafe]
    report = DataReport()
    with pytest.warns(UserWarning, match="not among the classes"):
        targets, _ = labels_to_targets(labels, ["dog", "cat"], "The test shards", report)
    assert targets.tolist() == [0, -1, -1]


def test_a_shard_cut_short_or_of_zero_bytes_says_so(tmp_path):
    """A shard cut inside a member said only "unexpected end of data", and a 0-byte shard (a
    failed download) only that it holds no sample."""
    shards = write_shards(folder_items(make_image_folder(tmp_path / "f", per_class=10, size=16)), tmp_path / "s",
                          [10, 10])
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[:len(data) // 2 + 100])
    (tmp_path / "s" / "train-000002.tar").write_bytes(b"")
    with pytest.warns(UserWarning) as seen:
        prepare_data(tmp_path / "s")
    said = " ".join(str(w.message) for w in seen)
    assert "train-000001.tar' as a tar file: unexpected end of data (the file ends inside a member: it is " \
        "truncated, a download or copy cut short); the shard is left out" in said, said
    assert "1 of the 3 training shards holds no sample (1 empty file, 0 bytes: a download or copy that failed?)" \
        in said, said


def test_captions_read_as_class_names_are_warned_of(tmp_path):
    """Shards of jpg + txt captions (WebDataset's most common layout) trained one class per
    sample with no word but that most classes had no validation example."""
    items = folder_items(make_image_folder(tmp_path / "f", per_class=10, size=16))
    captions = [(b, e, f"a photo of insect number {i} on a leaf") for i, (b, e, _) in enumerate(items)]
    write_shards(captions, tmp_path / "cap", [20], label="txt", info=False)
    with pytest.warns(UserWarning, match=r"The training shards: 20 of 20 class names label one sample each \(e\.g\. "
                                         r"'a photo of insect number 0 on a leaf'\): are these captions or ids"):
        prepare_data(tmp_path / "cap")
    write_shards(items, tmp_path / "classes", [20], label="txt", info=False)  # two classes: not said
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_data(tmp_path / "classes")
    # a CSV whose label column holds ids: said for training data; validation data of one row per class (read by
    # the training classes) and values (said to look like measurements) are not
    files = sorted(str(p) for p in (tmp_path / "f").rglob("*.*"))
    (tmp_path / "ids.csv").write_text("path,label\n" + "".join(f"{p},id{i}\n" for i, p in enumerate(files[:12])))
    with pytest.warns(UserWarning, match=r"ids\.csv': 12 of 12 class names label one row each .* Give each row its "
                                         r"class name in the label column"):
        prepare_data(tmp_path / "ids.csv")
    (tmp_path / "val.csv").write_text("path,label\n" + "".join(f"{p},id{i}\n" for i, p in enumerate(files[12:])))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        prepare_data(tmp_path / "ids.csv", tmp_path / "val.csv")
    assert sum("captions or ids" in str(w.message) for w in seen) == 1  # the training CSV's alone


def test_a_label_member_starting_with_a_byte_order_mark_is_read_without_it():
    """A .cls written by a Windows editor ('\\ufeff1') was the class name '\\ufeff1', beside the
    class index 1 of the other samples ("integer labels and class names are mixed")."""
    from transferkit.data.shards import _parse_label

    assert [_parse_label("cls", b"\xef\xbb\xbf1\r\n"), _parse_label("txt", b"\xef\xbb\xbfbee"),
            _parse_label("json", b'\xef\xbb\xbf{"label": "ant"}')] == [1, "bee", "ant"]


def test_a_folder_of_split_folders_of_shards_trains_and_validates_on_them(tmp_path):
    """root/train/*.tar and root/val/*.tar were read as two classes named train and val, and
    failed with "No images found" in them."""
    items = _sorted_items(make_image_folder(tmp_path / "img", per_class=5))
    write_shards(items[:7], tmp_path / "root" / "train", [4, 3], prefix="shard")
    write_shards(items[7:], tmp_path / "root" / "val", [3], prefix="shard")
    b = prepare_data(str(tmp_path / "root"))
    assert (len(b.train), len(b.val)) == (7, 3) and b.classes == ["dark", "light"]
    # one _info.json for both, above the split folders, names the classes of both
    for part in ("train", "val"):
        (tmp_path / "root" / part / "_info.json").unlink()
    (tmp_path / "root" / "_info.json").write_text(json.dumps({"classes": ["night", "day"]}))
    b = prepare_data(str(tmp_path / "root"))
    assert b.classes == ["night", "day"] and not b.report.warnings
