"""A run's data: training and validation sets without transforms, their classes and the report
of bad files; stratified splits and the split-folder rule that every entry point shares."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from transferkit.data.checks import DataReport, find_duplicates, nfc, warn_copies_across_classes
from transferkit.data.folders import find_split_folders, warn_split_like_classes
from transferkit.data.encoded import EncodedImageDataset, check_read_by_place, index_names, no_shared_class
from transferkit.data.images import (ImageFolderDataset, TransformedDataset, check_image_tensor, class_index,
                                     dataset_classes, dataset_targets, image_from_array)
from transferkit.data.shards import (confirmed_copies, copies_said, file_names, shard_list, shard_split,
                                     split_shard_folder, warn_held_out_listed)
from transferkit.data.sources import open_encoded, shared_shards, split_encoded
from transferkit._text import fs_bytes, plural
from transferkit.config import VAL_SPLIT
from transferkit.errors import DataError


@dataclass
class DataBundle:
    """Training and validation data without transforms, and the class names.

    ``train.view(transform=...)`` gives the dataset seen through a transform.
    """

    train: ImageFolderDataset | TransformedDataset | EncodedImageDataset
    val: ImageFolderDataset | TransformedDataset | EncodedImageDataset | None
    classes: list[str]
    report: DataReport = field(default_factory=DataReport)
    targets: torch.Tensor | None = None  # regression: training targets read before training [N, D]


def stratified_split(targets: Sequence[int], val_fraction: float, seed: int = 0,
                     keys: Sequence[str] | None = None) -> tuple[list[int], list[int]]:
    """Split indices so that every class keeps its proportion in both parts
    (at least one sample of each class with two or more samples goes to each part; a class
    with a single sample stays in training: `warn_unvalidated_classes` says so).

    ``keys`` (one per sample, e.g. `split_keys`: each file's path relative to the data's
    folder): each class's samples are ordered by a seeded hash of their key, and the first
    ``round(n * val_fraction)`` are held out. Adding or removing one file then moves at most
    one other file of its class between the parts (a seeded permutation of the list, used
    without keys, moves many: every index after the new file shifts).

    Example:
        >>> stratified_split([0, 0, 0, 0, 1, 1, 1, 1], 0.25, keys=list("abcdefgh"))
        ([0, 1, 3, 4, 5, 6], [2, 7])
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_split must be between 0 and 1 (exclusive), got {val_fraction!r}.")
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    train_idx, val_idx = [], []
    for _, idx in sorted(by_class.items()):
        if keys is not None:
            idx = [idx[j] for j in hashed_order([keys[i] for i in idx], seed)]
        else:
            idx = list(rng.permutation(idx))
        n_val = int(round(len(idx) * val_fraction))
        n_val = min(max(n_val, 1 if len(idx) >= 2 else 0), len(idx) - 1)
        val_idx += idx[:n_val]
        train_idx += idx[n_val:]
    return sorted(int(i) for i in train_idx), sorted(int(i) for i in val_idx)


def split_keys(samples: Sequence[tuple[Any, Any]], root: str | Path | None = None) -> list[str] | None:
    """What `stratified_split` orders files by: each sample's path relative to the data's
    ``root`` (a folder, or the folder of a ``.csv`` listing; without one, the folder that holds
    them all), in one Unicode form and with ``/``: the same on every machine and copy of the
    data, and for a file added anywhere, so that the ranks of a job and later runs split alike.
    None when a sample is not a file.

    Example:
        >>> split_keys([("/data/ants/1.jpg", 0), ("/data/bees/2.jpg", 1)], root="/data")
        ['ants/1.jpg', 'bees/2.jpg']
    """
    paths = [p for p, _ in samples]
    if not paths or not all(isinstance(p, (str, Path)) for p in paths):
        return None
    absolute = [os.path.abspath(p) for p in paths]
    if root is not None:
        base = os.path.abspath(root)
        base = os.path.dirname(base) if base.lower().endswith(".csv") else base
    else:
        base = os.path.commonpath(absolute) if len(set(absolute)) > 1 else os.path.dirname(absolute[0])
    return [nfc(os.path.relpath(p, base).replace(os.sep, "/")) for p in absolute]


def hashed_order(keys: Sequence[str], seed: int) -> list[int]:
    """The indices of ``keys`` ordered by a seeded hash of each key: where a key stands does not
    depend on the others (adding one moves no other)."""
    return sorted(range(len(keys)), key=lambda i: hashlib.blake2b(fs_bytes(f"{seed}\0{keys[i]}"),
                                                                  digest_size=8).digest())


def warn_unvalidated_classes(targets: Sequence[int], val_idx: Sequence[int], names: Sequence[str],
                             report: DataReport) -> None:
    """One warning naming the classes of ``targets`` (the training data before the split) with
    no example among ``val_idx`` (the held-out part): a class with a single example stays in
    training (`stratified_split`), so it is trained on but never validated."""
    counts = Counter(int(t) for t in targets)
    held = {int(targets[i]) for i in val_idx}
    missing = [c for c in sorted(counts) if c not in held]
    if not missing:
        return
    shown = ", ".join(f"{names[c]!r} ({plural(counts[c], 'example')})" for c in missing[:10])
    of = f"{len(counts)}" if len(counts) == len(names) else f"the {len(counts)} with training examples"
    report.warn(f"{plural(len(missing), 'class', 'classes')} of {of} {'has' if len(missing) == 1 else 'have'} "
                f"no validation example: {shown}{' ...' if len(missing) > 10 else ''}. They are trained on but never "
                "validated (the validation metrics, the best epoch and early stopping do not see them). Add examples "
                "of them, or give validation data that hold them (val_data=, or a val/ folder beside train/).")


def _as_dataset(data: Any, classes: list[str] | None, min_size: int | None, what: str, report: DataReport,
                cache_dir: Any = None, **checks: Any):
    encoded = open_encoded(data, classes=classes, min_size=min_size, cache_dir=cache_dir, report=report, what=what,
                           **checks)
    if encoded is not None:  # tar shards, Parquet files, a Hugging Face dataset
        return encoded
    if isinstance(data, (str, Path)):
        return ImageFolderDataset(data, classes=classes, min_size=min_size, report=report, purpose=what, **checks)
    if isinstance(data, ImageFolderDataset):  # keeps its files and checks; reports into this bundle's report
        report.merge(data.report)
        names, samples = list(data.classes), list(data.samples)
        relabel = _relabel(names, classes, what, report)
        if relabel is not None:
            samples = [(p, relabel[t]) for p, t in samples if relabel[t] >= 0]
            names = list(classes or [])
        return ImageFolderDataset(data.root, classes=names, samples=samples,
                                  min_size=data.min_size if min_size is None else min_size,
                                  on_bad_file=checks["on_bad_file"], report=report)
    if isinstance(data, (bytes, bytearray)):
        raise DataError(f"The {what} data is {type(data).__name__}; give a path as text (a str or a pathlib.Path), "
                        "e.g. data=os.fsdecode(path).")
    if isinstance(data, dict):  # (a Hugging Face DatasetDict is read above)
        raise DataError(f"The {what} data is a dict (keys {list(data)[:5]}): give a folder of class folders, a CSV "
                        "of path,label rows, shards, Parquet files, a Hugging Face dataset or a torch Dataset of "
                        "(image, label); splits go to data= (training) and val_data= (validation).")
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        if len(data) == 0:
            raise DataError(f"The {what} dataset is empty.")
        out = TransformedDataset(data)
        _check_first_image(data, what, out.labels_read)
        own = dataset_classes(data)
        relabel = _relabel(own, classes, what, report) if own else None
        if relabel is not None:
            labels = dataset_targets(out)
            bad = sorted({t for t in labels if not 0 <= t < len(own)})
            if bad:
                raise DataError(f"{what.capitalize()} labels {bad[:5]} are outside 0..{len(own) - 1} for the "
                                f"dataset's classes {list(own)[:10]}.")
            out.relabel = relabel
            out = out.view([i for i, t in enumerate(labels) if relabel[t] >= 0])
        return out
    raise DataError(f"{what} must be a folder path or a torch Dataset of (image, label), got {type(data).__name__}.")


def labelled_data(data: str | Path, classes: Sequence[str], *, what: str = "test", on_bad_file: str = "skip",
                  scan: str = "quick", cache_dir: str | Path | None = None,
                  report: DataReport | None = None) -> EncodedImageDataset | None:
    """Encoded labelled ``data`` (tar shards, Parquet files, a Hugging Face dataset: see
    `open_encoded`) read with a model's ``classes``, as validation data are: matched by name,
    never renamed (data whose classes share no name with ``classes`` are refused); samples of
    other classes are left out with a warning. Returns the dataset (``.samples``: ``(sample,
    class index)``), or None when ``data`` is not encoded (a folder of images, a CSV).
    ``report``: where what the reading found is recorded (a new one by default). A folder of
    training and held-out shards (``train-*.tar`` beside ``val-*.tar``) is refused, as a folder
    of split folders is: read whole, it would score the training samples too."""
    split = split_shard_folder(data) if isinstance(data, (str, Path)) else None
    if split is not None and split[0]:
        train, held = split
        word = shard_split(held[0])
        raise DataError(f"{str(data)!r} holds training shards ({file_names(train)}) and {word} shards "
                        f"({file_names(held)}): read whole, the {what} data would hold the training samples too. "
                        f"Point at the {word} shards, e.g. {os.path.join(str(data), word + '*.tar')!r} if their names "
                        "start so.")
    ds = open_encoded(data, classes=list(classes), min_size=None, on_bad_file=on_bad_file, scan=scan,
                      cache_dir=cache_dir, report=DataReport() if report is None else report, what=what)
    if ds is not None and not len(ds):
        raise DataError(f"{str(data)!r} holds no sample of the classes {list(classes)[:10]}.")
    return ds


def _check_first_image(data: Any, what: str, labels_read: dict[int, int]) -> None:
    """Check a Dataset's first image as training will read it (the transforms' ``ToRGB``, with
    the checks of ``predict``), so that images of a type, shape or range the model cannot take
    (a float tensor in [0, 255], an array [C,H,W]) fail now, with their reason, rather than
    inside a DataLoader worker. Its label joins ``labels_read`` (a dataset without a
    ``targets`` attribute loads each item once for its label)."""
    item = data[0]
    if isinstance(data, (list, tuple)) and isinstance(item, (str, os.PathLike)):  # `data: [../imgs]` in a config
        raise DataError(f"The {what} data are a list of {len(data)} path{'s' if len(data) != 1 else ''} "
                        f"({str(item)!r}, ...): a list of paths names tar shards or Parquet files. Give a folder or a "
                        "CSV file alone, not in a list (data: ../imgs, not [../imgs]).")
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise DataError(f"The {what} dataset's item 0 is {_shown(item)}: a dataset item is a pair (image, label) "
                        "(an image held in memory: a PIL image, an array [H, W, C] or a tensor [C, H, W]).")
    image = item[0]
    if isinstance(image, (bytes, bytearray, memoryview)):
        raise DataError(f"The {what} dataset's item 0 holds {len(image)} bytes, where a decoded image goes: decode "
                        "encoded image bytes first (PIL.Image.open(io.BytesIO(data)) in the dataset's __getitem__), "
                        "or keep the files and give a folder or a CSV of path,label rows.")
    if isinstance(image, (str, os.PathLike)):
        raise DataError(f"The {what} dataset's item 0 holds the file path {_shown(image)}, where an image held in "
                        "memory goes. For (path, label) pairs write a CSV of path,label rows and pass its path (e.g. "
                        "pandas.DataFrame(pairs, columns=['path', 'label']).to_csv('data.csv', index=False)), or give "
                        "a folder of class folders.")
    if isinstance(item, (tuple, list)) and len(item) == 2:
        labels_read[0] = class_index(item[1], 0)
    try:
        if isinstance(image, np.ndarray):
            image_from_array(image, "train on")
        elif isinstance(image, torch.Tensor):
            check_image_tensor(image, "train on")
    except DataError as exc:
        raise DataError(f"The {what} dataset's item 0: {exc}") from exc


def _shown(value: Any) -> str:
    """``value`` as a message shows it: its type, and its text when short."""
    text = repr(value)
    if len(text) <= 80:
        return f"{type(value).__name__} {text}"
    items = f" of {plural(len(value), 'item')}" if isinstance(value, (tuple, list)) else ""
    return f"a {type(value).__name__}{items}"


def _relabel(own: list[str], classes: list[str] | None, what: str, report: DataReport) -> list[int] | None:
    """The class index in ``classes`` of each of a dataset's own classes ``own`` (its integer
    labels index ``own``; matched by name, so that another order or a subset reads each item
    as its class), -1 for a class that ``classes`` leaves out (its items are left out, with a
    warning); None when ``classes`` is None, the same list, or shares no name with ``own``
    (``classes=`` for training data then names the dataset's labels in their order; validation
    data read against the training classes are refused)."""
    if classes is None or list(own) == list(classes):
        return None
    left_out = [c for c in own if c not in classes]
    if len(left_out) == len(own):
        if what != "training":
            raise no_shared_class(own, classes, f"the {what} dataset")
        return None
    mapping = [classes.index(c) if c in classes else -1 for c in own]
    if mapping == list(range(len(own))):  # the same classes, more after them: nothing to relabel
        return None
    if left_out:
        report.warn(f"The {what} dataset's items of {plural(len(left_out), 'class', 'classes')} not among the classes "
                    f"{classes[:10]} are left out: {left_out[:10]}.")
    return mapping


def resolve_split_folders(data: Any, val_data: Any, report: DataReport, *,
                          val_split: float = VAL_SPLIT) -> tuple[Any, Any]:
    """``(data, val_data)`` with a split layout resolved: a folder holding ``train/`` and
    ``val/`` (or ``valid/``, ``validation/``, else ``test/``) trains on ``train/`` and
    validates on the other; ``train/`` alone trains on it (see
    [`find_split_folders`][transferkit.data.find_split_folders], the rule the recipes use too).
    Anything else is returned as it is. A ``val_split`` other than the default, which data
    holding their own validation split do not use, is warned about.

    Example:
        >>> resolve_split_folders("no/such/folder", None, DataReport())
        ('no/such/folder', None)
    """
    warn_held_out_listed(data, report)
    if val_data is not None:  # data that hold both splits give their own side
        splits = find_split_folders(data) if isinstance(data, (str, Path)) else None
        if splits is not None:  # train/ and val/ (or test/) are never two classes
            given = Path(val_data).resolve() if isinstance(val_data, (str, Path)) else None
            held = [f"{p.name}/" for p in (splits.val, splits.test) if p is not None and p.resolve() != given]
            if held:
                report.warn(f"{str(data)!r} is a split layout: training uses its train/, and val_data= validates; "
                            f"its {' and '.join(held)} {'is' if len(held) == 1 else 'are'} not used.")
            data = splits.train
        data, val_data = _one_split(data, 0, report=report), _one_split(val_data, 1)
        shared = shared_shards(data, val_data)
        if shared:
            raise DataError(f"The training and validation data share {plural(len(shared), 'shard')} "
                            f"({', '.join(shared[:3])}): its samples would be trained on and scored, which inflates "
                            "validation accuracy. Give each shard to one of data and val_data.")
        return data, val_data
    # train*.tar beside val*.tar, Parquet files named by split, a DatasetDict
    encoded = split_encoded(data, report=report)
    if encoded is not None:
        if encoded[1] is not None:
            _val_split_unused(val_split, data, "their validation split", report)
        return _one_split(data, 0, encoded), encoded[1]
    if not isinstance(data, (str, Path)):
        return data, val_data
    splits = find_split_folders(data)
    if splits is None:
        return data, val_data
    if splits.val is not None and splits.test is not None:
        report.warn(f"{str(data)!r} holds {splits.val.name}/ and test/: training uses train/ and validates on "
                    f"{splits.val.name}/; test/ is not used (score the exported model on it, e.g. with "
                    "`transferkit predict`).")
    if splits.others:
        used = ", ".join(f"{p.name}/" for p in (splits.train, splits.val, splits.test) if p is not None)
        report.warn(f"{str(data)!r} is a split layout ({used}); its other folders are not used: {splits.others[:10]}.")
    if splits.held_out is not None:
        _val_split_unused(val_split, data, f"its {splits.held_out.name}/ folder", report)
    return splits.train, splits.held_out


def _val_split_unused(val_split: float, data: Any, held: str, report: DataReport) -> None:
    if val_split != VAL_SPLIT:
        report.warn(f"val_split={val_split:g} is not used: {str(data)!r} holds its own validation data ({held}), "
                    "which validate the run; nothing is held out of its training data.")


def warn_validation_copies(train: Sequence[tuple[Any, Any]], val: Sequence[tuple[Any, Any]], report: DataReport,
                           what: str = "file") -> None:
    """Warn when validation files (``(path, label)`` samples; in-memory items are skipped) are
    byte-identical to training files: they inflate validation accuracy."""
    def files(samples: Sequence[tuple[Any, Any]]) -> list[str]:
        return [str(p) for p, _ in samples if isinstance(p, (str, Path))]
    dups = find_duplicates(files(train), files(val))
    if dups:
        n_val = len({v for _, v in dups})  # files, not pairs (a file may match several)
        report.warn(f"Validation data hold {plural(n_val, what)} byte-identical to training {what}s, which inflates "
                    f"validation accuracy: e.g. {dups[0][1]} = {dups[0][0]}.")


def _warn_samples_in_both(train: Any, val: Any, report: DataReport) -> None:
    """Warn when validation samples of encoded data (tar shards) are also training samples: the
    same key, image size in bytes and dimensions (local images read to confirm)."""
    a, b = (getattr(ds, "signatures", lambda: None)() for ds in (train, val))
    if a is None or b is None:
        return
    shared = np.flatnonzero(np.isin(b, a))
    if not len(shared):
        return
    first = {int(sig): k for k, sig in reversed(list(enumerate(a)))}  # each signature's first training sample
    pairs = [(int(train.indices[first[int(b[i])]]), int(val.indices[i])) for i in shared]  # in their sources
    copies, unread, example = confirmed_copies(pairs, train.source, val.source)
    if not copies and not unread:
        return
    j, i = example or pairs[0]
    report.warn(f"Validation data hold {copies_said(copies, unread, 'sample')} of the training data, which inflates "
                f"validation accuracy: e.g. {val.source.sample_name(i)!r} = {train.source.sample_name(j)!r}.")


def _one_split(data: Any, i: int, encoded: tuple[Any, Any] | None = None, report: DataReport | None = None) -> Any:
    """Side ``i`` (0: training, 1: validation) of encoded data that hold both splits (see
    `split_encoded`); other data as they are. A folder of ``val*`` shards without ``train*``
    ones is refused as training data: its validation shards would be trained on."""
    encoded = encoded if encoded is not None else split_encoded(data, need_train=i == 0, report=report)
    if encoded is None or encoded[i] is None:
        return data
    if i == 0 and isinstance(encoded[0], list) and not encoded[0]:
        val = [Path(p).name for p in encoded[1]]
        others = [Path(p).name for p in shard_list(data) or [] if Path(p).name not in val]
        held = f"validation shards ({', '.join(val[:3])})"
        raise DataError(f"{str(data)!r} holds {held} beside shards not named by split ({', '.join(others[:3])}): "
                        "name the training shards train-*.tar, or pass them as data and the validation shards as "
                        "val_data." if others else
                        f"{str(data)!r} holds {held} but no train*.tar shards, so it has nothing to train on. Name "
                        "the training shards train-*.tar beside them, or pass the training shards as data and these "
                        "as val_data.")
    return encoded[i]


def check_training_classes(targets: Sequence[int], names: Sequence[str], report: DataReport, *,
                           folder: bool = False) -> None:
    """The training labels against the class ``names``: a label outside them or a single class
    is a DataError; a class without a training sample is warned of (the model gets an output it
    cannot learn), except where the data are a folder (``folder``), which names its empty class
    folders itself. Images and audio alike."""
    bad = sorted({t for t in targets if not 0 <= t < len(names)})
    if bad:
        raise DataError(f"Training labels {bad[:5]} are outside 0..{len(names) - 1} for classes {list(names)[:10]}.")
    counts = Counter(targets)
    if len(counts) < 2:
        raise DataError(f"Training data has a single class ({names[next(iter(counts))]!r}); "
                        "a classifier needs at least two.")
    empty = [n for i, n in enumerate(names) if not counts[i]]
    if empty and not folder:
        has = "has" if len(empty) == 1 else "have"
        report.warn(f"{plural(len(empty), 'class', 'classes')} of {len(names)} {has} no "
                    f"training sample: {empty[:10]}. The model still gets an output for each, which it cannot learn; "
                    "give the classes that the data hold (classes=, _info.json), or add their samples.")


def prepare_data(data: Any, val_data: Any = None, *, val_split: float = VAL_SPLIT, seed: int = 0,
                 classes: Sequence[str] | None = None, min_size: int | None = None, on_bad_file: str = "skip",
                 scan: str = "quick", cache_dir: str | Path | None = None) -> DataBundle:
    """Resolve training and validation data.

    ``data`` is a folder ``root/<class>/<image>`` (or a folder holding ``train/`` and
    ``val/``, ``valid/``, ``validation/`` or ``test/``: see `resolve_split_folders`),
    a CSV file of ``path,label`` rows, a Dataset of ``(image, label)``, or encoded images
    read in place: WebDataset tar shards (`transferkit.data.shards`), Parquet files or a
    Hugging Face dataset (`transferkit.data.tables`); ``cache_dir`` keeps the shards'
    member indexes for later runs. Without ``val_data``, a stratified ``val_split`` of the
    training data is held out (``val_split=0``: no validation); for encoded images the
    split is a hash of each sample's key (stable, no sample read). Image files are checked before training
    (``scan="quick"``: headers and truncation, ``"full"``: decode everything, ``"none"``);
    bad ones are left out and listed in ``bundle.report`` (``on_bad_file="skip"``) or
    raise (``"raise"``); files that fail to decode later are handled as
    `transferkit.data.late` says. The validation data always use the training class
    mapping. Class folders named like splits (``train``, ``test``, ...) give a warning.

    Example:
        >>> bundle = prepare_data("hymenoptera")  # doctest: +SKIP
        >>> bundle.classes  # doctest: +SKIP
        ['ants', 'bees']
    """
    report = DataReport()
    data, val_data = resolve_split_folders(data, val_data, report, val_split=val_split)
    checks = {"on_bad_file": on_bad_file, "scan": scan, "cache_dir": cache_dir}
    train = _as_dataset(data, list(classes) if classes else None, min_size, "training", report, **checks)
    if not isinstance(train, ImageFolderDataset):
        report.merge(getattr(train, "report", DataReport()))
    names = list(classes) if classes else list(getattr(train, "classes", []) or
                                                dataset_classes(getattr(train, "base", None)) or [])
    targets = dataset_targets(train)
    named = bool(names)
    if not names:  # indices as names: they match no other data's names
        names = index_names(max(targets) + 1)
    if isinstance(data, (str, Path)):
        warn_split_like_classes(names, repr(str(data)), report)
    if isinstance(train, ImageFolderDataset):
        warn_copies_across_classes(train.samples, names, repr(str(data)), report)
    folder = isinstance(train, ImageFolderDataset) and isinstance(data, (str, Path)) and Path(data).is_dir()
    check_training_classes(targets, names, report, folder=folder)
    val = None
    if val_data is not None:
        val = _as_dataset(val_data, names if named else None, min_size, "validation", report, **checks)
        if not named and (getattr(val, "classes", None) or dataset_classes(getattr(val, "base", None))):
            report.warn("The training data name no classes (they are named by index: '0', '1', ...), so the "
                        "validation data's class names cannot be matched to them: the validation labels are read "
                        "as the same indices. Give classes=[...] (the names of the training labels in index order) "
                        "to match them by name.")
        if not isinstance(val, ImageFolderDataset):
            report.merge(getattr(val, "report", DataReport()))
        vt = dataset_targets(val)
        bad = sorted({t for t in vt if not 0 <= t < len(names)})
        if bad:
            raise DataError(f"Validation labels {bad[:5]} are outside the training classes 0..{len(names) - 1}.")
        if _by_index(val) and _by_index(train) is False:  # indices against classes the training labels named
            check_read_by_place(sorted(set(vt)), names, "The validation data", "the training data's", report)
        if isinstance(train, ImageFolderDataset) and isinstance(val, ImageFolderDataset):
            warn_validation_copies(train.samples, val.samples, report)
        else:
            _warn_samples_in_both(train, val, report)
    elif val_split:
        splitter = getattr(train, "hash_split", None)  # encoded images: by key, reads no sample
        tr_idx, va_idx = splitter(val_split, seed) if splitter else \
            stratified_split(targets, val_split, seed,
                             keys=split_keys(getattr(train, "samples", []), getattr(train, "root", None)))
        train, val = split_views(train, tr_idx, va_idx, targets=targets, names=names, val_split=val_split,
                                 report=report)
    return DataBundle(train=train, val=val, classes=names, report=report)


def _by_index(ds: Any) -> bool | None:
    """Whether ``ds`` gave its labels as class indices (encoded data, read by `labels_by_name`),
    or by name (a class folder, a CSV); None where it is not known (a Dataset of the user's)."""
    if isinstance(ds, ImageFolderDataset):
        return False
    return getattr(getattr(ds, "source", None), "labels_by_index", None)


def split_views(train: Any, tr_idx: Sequence[int], va_idx: Sequence[int], *, targets: Sequence[int],
                names: Sequence[str], val_split: float, report: DataReport, what: str = "file") -> tuple[Any, Any]:
    """The training and validation views of ``train`` split by `val_split` (``targets``: the
    labels before the split, warned about by `warn_unvalidated_classes`); no validation data
    (None, with a warning) when the split held out nothing (every class has a single example,
    or a hashed split of very few samples). Files of one class with identical bytes that the
    split put on both sides are warned about, as a validation folder's copies are."""
    if len(va_idx):
        warn_unvalidated_classes(targets, va_idx, names, report)
    else:
        report.warn(f"val_split={val_split} held out no example ({len(tr_idx)} in all), so the run has no "
                    "validation data: its metrics, best epoch and early stopping come from training. Add examples, "
                    "or give validation data (val_data=, or a val/ folder beside train/).")
        return train.view(tr_idx), None
    tr, va = train.view(tr_idx), train.view(va_idx)
    if hasattr(tr, "samples") and hasattr(va, "samples"):  # a file twice in one class: a copy on each side
        warn_validation_copies(tr.samples, va.samples, report, what=what)
    return tr, va
