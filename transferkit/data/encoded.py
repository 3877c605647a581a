"""Datasets of encoded images read in place: members of tar shards, cells of Parquet
files, rows of a Hugging Face dataset.

Each kind of input is a *source*: ``len(source)`` samples, ``source.read(i)`` the encoded
bytes of sample ``i``, ``source.key(i)`` its key (stable across runs, used for the hashed
validation split), ``source.sample_name(i)`` what messages call it, and
``source.fingerprint()`` an identity that changes when the data change, computed from
per-file metadata (so its cost grows with the number of shards, not of samples).

[`EncodedImageDataset`][transferkit.data.encoded.EncodedImageDataset] turns a source and its
labels into the map-style dataset the rest of transferkit expects from a folder of images:
``targets``, ``classes``, ``samples``, ``view(indices, transform)``, ``on_bad_file`` and a
[`DataReport`][transferkit.data.DataReport] shared by its views, a sample that fails to decode
during training is replaced as `transferkit.data.late` says.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, default_collate

from transferkit._text import fs_bytes, plural
from transferkit.data.checks import (ON_BAD_FILE, DataReport, check_class_names, check_label_names, class_index,
                                     class_order, nfc, warn_single_sample_classes)
from transferkit.data.images import load_image
from transferkit.data.late import ReportingCollate, load_or_replace
from transferkit.errors import DataError, check_choice


class EncodedSource(Protocol):
    """What [`EncodedImageDataset`][transferkit.data.encoded.EncodedImageDataset] reads from."""

    name: str

    def __len__(self) -> int: ...

    def read(self, i: int) -> bytes: ...

    def key(self, i: int) -> str: ...

    def sample_name(self, i: int) -> str: ...

    def fingerprint(self) -> str: ...

    def listing(self) -> str: ...


class SampleRef:
    """One sample of a source, as ``samples[i][0]`` gives it: ``str()`` names it
    (``train-000003.tar:000042``), ``sample_id`` identifies it (for the bad-file memory)."""

    __slots__ = ("source", "index")

    def __init__(self, source: EncodedSource, index: int) -> None:
        self.source, self.index = source, index

    @property
    def sample_id(self) -> tuple[str, int]:
        return (self.source.name, self.index)

    def __str__(self) -> str:
        return self.source.sample_name(self.index)

    def __repr__(self) -> str:
        return f"SampleRef({str(self)!r})"


class _Samples(Sequence):
    """``(SampleRef, target)`` for each sample of a dataset, made on access (no per-sample objects kept)."""

    def __init__(self, ds: EncodedImageDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds.indices)

    def __getitem__(self, j: Any) -> Any:
        if isinstance(j, slice):
            return [self[k] for k in range(*j.indices(len(self)))]
        i = int(self.ds.indices[j])
        return SampleRef(self.ds.source, i), int(self.ds.all_targets[i])


def hashed_unit(seed: int, key: str) -> float:
    """A number in [0, 1) from ``(seed, key)``, the same on every machine and run.

    Example:
        >>> hashed_unit(0, "000042") == hashed_unit(0, "000042") != hashed_unit(1, "000042")
        True
    """
    h = hashlib.blake2b(fs_bytes(f"{seed}\0{key}"), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0 ** 64


class EncodedImageDataset(Dataset):
    """``(transform(image), class_index)`` for the samples ``indices`` of an encoded ``source``.

    ``all_targets[i]`` is the class index of source sample ``i``; ``indices`` the source
    samples this dataset holds (default: all, in order; samples without a usable image or
    label are left out by whoever builds it). Images are decoded with
    [`load_image`][transferkit.data.load_image] (EXIF orientation, RGB, draft mode for JPEG
    with ``min_size``).
    """

    def __init__(self, source: EncodedSource, all_targets: np.ndarray, classes: Sequence[str], *,
                 indices: np.ndarray | None = None, transform: Callable | None = None, min_size: int | None = None,
                 on_bad_file: str = "skip", report: DataReport | None = None, _known_bad: dict | None = None) -> None:
        check_choice("on_bad_file", on_bad_file, ON_BAD_FILE)
        self.source = source
        self.all_targets = np.asarray(all_targets, dtype=np.int64)
        self.indices = (np.arange(len(source), dtype=np.int64) if indices is None
                        else np.asarray(indices, dtype=np.int64))
        self.classes = list(classes)
        self.transform, self.min_size, self.on_bad_file = transform, min_size, on_bad_file
        self.report = report if report is not None else DataReport()
        self._known_bad: dict = {} if _known_bad is None else _known_bad

    @property
    def root(self) -> str:
        return self.source.name

    @property
    def samples(self) -> _Samples:
        """``(sample, class_index)`` pairs, made on access; ``str(sample)`` names the sample."""
        return _Samples(self)

    @property
    def targets(self) -> list[int]:
        return self.all_targets[self.indices].tolist()

    @property
    def keys(self) -> list[str]:
        """The samples' keys (WebDataset's ``__key__``, a key column, or the row number)."""
        return [self.source.key(int(i)) for i in self.indices]

    def signatures(self) -> np.ndarray | None:
        """A hash per sample identifying it without reading it (see
        `transferkit.data.shards.ShardSource.signatures`), where the source gives them; else None."""
        sig = getattr(self.source, "signatures", None)
        every = sig() if callable(sig) else None
        return every[self.indices] if every is not None else None

    @property
    def collate_fn(self) -> ReportingCollate:
        return ReportingCollate(self.report.token, default_collate)

    def __len__(self) -> int:
        return len(self.indices)

    def sample_groups(self) -> np.ndarray | None:
        """The group (shard) of each sample when the source asks to be read group by group
        (remote shards larger than the shard cache: see `transferkit.data.sampling.EpochSampler`), else None."""
        return self._groups("sample_groups")

    def fetch_groups(self) -> np.ndarray | None:
        """The group (remote shard, fetched whole) of each sample when some are remote, else None."""
        return self._groups("fetch_groups")

    def _groups(self, kind: str) -> np.ndarray | None:
        groups = getattr(self.source, kind, None)
        out = groups() if groups is not None else None
        return None if out is None else np.asarray(out)[self.indices]

    def read_bytes(self, j: int) -> bytes:
        """The encoded bytes of this dataset's sample ``j``."""
        return self.source.read(int(self.indices[j]))

    def image_size(self, j: int) -> tuple[int, int]:
        """``(width, height)`` of sample ``j`` without decoding it: from the shard index when the
        source keeps sizes, else from the image header in its bytes."""
        i = int(self.indices[j])
        sized = getattr(self.source, "image_size", None)
        if sized is not None:
            return sized(i)
        with Image.open(io.BytesIO(self.source.read(i))) as img:
            return img.size

    def _load(self, j: int) -> Image.Image:
        i = int(self.indices[j])
        name = self.source.sample_name(i)
        try:
            data = self.source.read(i)
        except OSError as exc:
            raise DataError(f"Cannot read {name!r}: {type(exc).__name__}: {exc}.") from exc
        return load_image(io.BytesIO(data), min_size=self.min_size, name=name)

    def __getitem__(self, j: int) -> tuple[Any, int]:
        img, target = load_or_replace(self.samples, j, self._load, on_bad_file=self.on_bad_file,
                                      report=self.report, known_bad=self._known_bad)
        return (self.transform(img) if self.transform else img), target

    def view(self, indices: Sequence[int] | None = None, transform: Callable | None = None) -> EncodedImageDataset:
        """The same samples (or the subset at positions ``indices``) with another transform."""
        idx = self.indices if indices is None else self.indices[np.asarray(indices, dtype=np.int64)]
        return EncodedImageDataset(self.source, self.all_targets, self.classes, indices=idx, transform=transform,
                                   min_size=self.min_size, on_bad_file=self.on_bad_file, report=self.report,
                                   _known_bad=self._known_bad)

    def fingerprint(self) -> str:
        """The identity of these samples for cache keys: the source's (per-file metadata), the
        labels, the decoding size and the selected samples; no sample is read."""
        return self._digest(f"{self.source.fingerprint()}\0{self.min_size}")

    def listing_digest(self) -> str:
        """What copies of these samples on other machines share (every rank of a job must read
        the same data): the source's listing (no file times), the labels and the selected samples."""
        return self._digest(self.source.listing())

    def _digest(self, source: str) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(fs_bytes(f"{type(self.source).__name__}\0{source}\0"))
        h.update("\0".join(self.classes).encode())
        h.update(self.all_targets.tobytes())
        h.update(self.indices.tobytes())
        return h.hexdigest()

    def hash_split(self, val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
        """Positions ``(train, val)``: a sample is held out when a hash of ``(seed, key)`` is
        below ``val_fraction``. Stable (a sample stays on its side when shards are added,
        removed or reordered) and reads no image; class proportions hold on average only.
        For tar shards the image's byte size joins the key (shards whose keys restart at 0
        hold other images under one key: they are split apart, while copies land together)."""
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"val_split must be between 0 and 1 (exclusive), got {val_fraction!r}.")
        positions = self.indices.tolist()
        keys = [self.source.key(i) for i in positions]
        sizes = getattr(self.source, "sizes", None)
        if sizes is not None:
            keys = [f"{k}\0{int(sizes[i])}" for k, i in zip(keys, positions)]
        train, val = [], []
        for j, key in enumerate(keys):
            (val if hashed_unit(seed, key) < val_fraction else train).append(j)
        if not train or not val:
            distinct, column = len(set(keys)), getattr(self.source, "key_column", None)
            few = (f" The samples have {distinct} distinct keys" + (f" (the column {column!r})" if column else "") +
                   ", and the samples of one key are held out together." if distinct < len(keys) else "")
            raise DataError(f"val_split={val_fraction} of {len(self)} samples leaves "
                            f"{'no training' if not train else 'no validation'} sample.{few} Pass val_data or "
                            "another val_split" + (f", or give each sample a key of its own in {column!r}"
                                                   if few and column else "") + ".")
        return train, val


def index_names(n: int) -> list[str]:
    """The names of ``n`` classes known by index only: ``['0', '1', ...]``."""
    return [str(i) for i in range(n)]


def no_shared_class(own: Sequence[str], classes: Sequence[str], what: str) -> DataError:
    """The error for data scored against the training classes that name their own classes,
    none of which is a training class (their labels cannot be matched by name)."""
    fix = ("The training data's classes are known by index only: give classes=[...] (the names of the training "
           "labels in index order) to match these by name, or leave their names out to read their class indices "
           "as the training data's." if list(classes) == index_names(len(classes)) else
           "Give them the training data's class names (an _info.json beside shards, a ClassLabel column, the "
           "dataset's classes), or leave their names out to read their class indices as the training data's.")
    return DataError(f"The classes of {what[:1].lower() + what[1:]} ({list(own)[:10]}) include no class of the "
                     f"training data ({list(classes)[:10]}): their labels cannot be read as those classes. {fix}")


def labels_by_own_names(parts: Sequence[tuple[str, Sequence[str] | None, Sequence[Any]]], what: str,
                        listed_in: str) -> tuple[list[str] | None, list[Any]]:
    """``(classes, labels)`` of data in parts ``(where, its own class names or None, its
    labels)`` that may each list their classes (shards per folder: an ``_info.json``; Parquet
    files: a ClassLabel, ``listed_in``). Where every part lists them alike (or none does): that
    list, and the labels as they are. Where they differ: each class index read as its own
    part's class name (an index of one part is another class in the next), and all the names,
    in the order the parts list them; an index beside no list, or outside its list, is refused.

    Example:
        >>> labels_by_own_names([("a", ["x", "y"], [0, 1]), ("b", ["y", "x"], [0])], "shards", "an _info.json")
        (['x', 'y'], ['x', 'y', 'y'])
    """
    lists = [names for _, names, _ in parts]
    if all(names == lists[0] for names in lists):
        return (None if lists[0] is None else list(lists[0])), [lab for _, _, labs in parts for lab in labs]
    listed = next(where for where, names, _ in parts if names is not None)
    labels = []
    for where, names, labs in parts:
        for lab in labs:
            if isinstance(lab, (int, np.integer)):
                if names is None:
                    raise DataError(f"The {what} of {listed!r} list their classes in {listed_in}, and {where!r} "
                                    "gives class indices without one: its indices cannot be read by name. Give "
                                    "every one the same list of classes, or label the samples by name.")
                if not 0 <= lab < len(names):
                    raise DataError(f"The {what}: {where!r} has the class index {int(lab)}, outside "
                                    f"0..{len(names) - 1} for the classes of its {listed_in} {list(names)[:10]}.")
                lab = names[int(lab)]
            labels.append(lab)
    return list(dict.fromkeys(c for names in lists if names for c in names)), labels


def given_by_index(labels: Sequence[Any]) -> bool:
    """Whether raw ``labels`` (after `labels_by_name`) give class indices, not names."""
    return any(isinstance(lab, (int, np.integer)) and not isinstance(lab, bool) for lab in labels)


def check_read_by_place(indices: Sequence[int], classes: Sequence[str], what: str, whose: str,
                        report: DataReport | None) -> None:
    """Data (``what``) that give class ``indices`` without names, read against ``whose`` named
    ``classes`` (a model's; training data that named their classes by their labels): each
    index is read as the class of that place, with a warning into ``report`` that shows the
    order; where the classes are named by numbers and an index ``k`` is not the class named
    ``"k"`` (``['1', '2', '3']``: 1 is ``'2'`` by place), a DataError (ambiguous). Classes
    known by index only (``'0'``, ``'1'``, ...) read indices by place without a word."""
    if not indices or list(classes) == index_names(len(classes)):
        return
    named = {nfc(str(c)): i for i, c in enumerate(classes)}
    clash = next((k for k in indices if named.get(str(k), k) != k), None)
    if clash is not None:  # the index k names another class than the class named "k"
        at = f" ({classes[clash]!r})" if 0 <= clash < len(classes) else ""
        raise DataError(f"{what} give class indices without class names (e.g. {clash}), and {whose} classes are "
                        f"named by numbers ({list(classes)[:10]}): {clash} could be the class named {str(clash)!r} "
                        f"or {whose} class at place {clash}{at}. Give the labels as class names (strings), or name "
                        "the classes of the indices (an _info.json 'classes' list beside shards, a ClassLabel "
                        "column).")
    if report is not None:
        order = ", ".join(f"{i} = {c!r}" for i, c in enumerate(list(classes)[:6])) + \
            (", ..." if len(classes) > 6 else "")
        report.warn(f"{what} give class indices without class names: each index is read as {whose} class of that "
                    f"place ({order}). Give the data their class names (labels as names, an _info.json 'classes' "
                    "list beside shards, a ClassLabel column) to have them read by name.")


def labels_by_name(labels: Sequence[Any], own: Sequence[str] | None, classes: Sequence[str] | None,
                   part: str, data: str, report: DataReport | None = None) -> list[Any]:
    """``labels`` of the ``part`` (``"training"``, ``"validation"``, ``"test"``) ``data``
    (``"shards"``, ...) to read against ``classes`` (the training data's, or ``classes=``): the
    class indices of data that name their own classes ``own`` (shards' ``_info.json``, a
    ClassLabel column) become those names where ``own`` differs from ``classes``, so that each
    sample is read as its class by name (another order, a subset); unchanged where they agree,
    or where either is None. Where they share no name, ``classes`` rename the indices of
    training data (``classes=`` given); other parts, read against a model's or the training
    data's classes, are refused. Data scored against a model (a ``part`` other than training
    and validation) that give class indices and no names are read in the model's order
    (`check_read_by_place`; validation data are checked so by `prepare_data`, which knows how
    the training data gave their labels).

    Example:
        >>> labels_by_name([0, 1, 1], ["dog", "cat"], ["cat", "dog"], "validation", "shards")
        ['dog', 'cat', 'cat']
    """
    what = f"The {part} {data}"
    if classes and not own and part not in ("training", "validation"):  # a model's named classes, read by index
        check_read_by_place([int(lab) for lab in labels if isinstance(lab, (int, np.integer))], classes, what,
                            "the model's", report)
    if classes:
        check_label_names(list(classes), what, case=False)
    if own:
        check_label_names(list(own), what, case=False)
    if not classes or not own or [nfc(c) for c in own] == [nfc(c) for c in classes]:
        return list(labels)
    if not {nfc(c) for c in own} & {nfc(c) for c in classes}:  # one name in either Unicode form is one class
        if part != "training":
            raise no_shared_class(own, classes, what)
        return list(labels)  # renamed by classes=
    outside = sorted({int(lab) for lab in labels if isinstance(lab, (int, np.integer)) and not 0 <= lab < len(own)})
    if outside:
        raise DataError(f"{what} have class indices {outside[:5]} outside 0..{len(own) - 1} for their own classes "
                        f"{list(own)[:10]}; fix the labels or the class list.")
    return [own[int(lab)] if isinstance(lab, (int, np.integer)) else lab for lab in labels]


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def labels_to_targets(labels: Sequence[Any], classes: Sequence[str] | None, what: str,
                      report: DataReport, *, part: str = "training") -> tuple[np.ndarray, list[str]]:
    """Class indices (``-1``: no usable label) and the class names for raw labels: integers
    (class indices; names ``classes`` or ``"0"``, ``"1"``, ...), strings (class names; the
    sorted set when ``classes`` is None) or None (no label). A whole number stored as a float
    (a float column's ``1.0``) is that index, NaN (a float column's missing value) and a blank
    name no label; a fraction is refused: a class is named or counted, not measured.
    ``part``: which data these are (``"training"``, ``"validation"``, or data scored against a
    model's classes), for the advice of an error."""
    numbers = [lab for lab in labels if isinstance(lab, (float, np.floating)) and not math.isnan(lab)]
    fractional = [lab for lab in numbers if not float(lab).is_integer()]  # inf too
    if fractional:
        raise DataError(f"{what}: labels are class indices (0, 1, ...) or class names, and "
                        f"{plural(len(fractional), 'label')} {'is' if len(fractional) == 1 else 'are'} not a whole "
                        f"number (e.g. {float(fractional[0])!r}), which would be cut to an index. Store whole "
                        "class indices or class names; for measured values (task='regression'), give a CSV of "
                        "path,<name> rows.")
    if any(isinstance(lab, (float, np.floating)) or (isinstance(lab, str) and not lab.strip()) for lab in labels):
        labels = [None if (isinstance(lab, (float, np.floating)) and math.isnan(lab)) or
                  (isinstance(lab, str) and not lab.strip()) else  # a blank name: no label, as a null cell
                  int(lab) if isinstance(lab, (float, np.floating)) else lab for lab in labels]
    other = [lab for lab in labels if lab is not None and not isinstance(lab, (int, np.integer, str))]
    if other:  # a list (a multi-label column), bytes, a dict: no class index or name
        raise DataError(f"{what}: labels are class indices (0, 1, ...) or class names, and "
                        f"{plural(len(other), 'label')} {'is' if len(other) == 1 else 'are'} of type "
                        f"{type(other[0]).__name__} (e.g. {_shown(other[0])}). Store one class index or name per "
                        "sample (several labels per sample: task='multilabel' with a CSV of path,labels rows).")
    ints = [lab for lab in labels if isinstance(lab, (int, np.integer))]
    names = [lab for lab in labels if isinstance(lab, str)]
    if ints and names:
        kinds = "cls: the class index; txt or json 'label': the class name" if "shards" in what else \
            "class indices or class names in the label column"
        raise DataError(f"{what}: integer labels and class names are mixed (e.g. {ints[0]!r} and {names[0]!r}); use "
                        f"one kind ({kinds}).")
    out = np.full(len(labels), -1, dtype=np.int64)
    if classes:  # given (classes=, a ClassLabel's names): one-line names, one per Unicode form
        check_label_names(list(classes), what, case=False)
    if names:
        if not classes:  # read from the labels: 'Ants' beside 'ants' is a typo, '1' beside '01' too, as in a CSV
            classes = class_order(names)
            check_class_names(names, what, report)
            if part == "training":
                warn_single_sample_classes(names, what, report, unit="sample", fix=(
                    "Give each sample its class (in tar shards: a .cls member with its index, or a .txt or .json "
                    "member with its class name)." if "shards" in what else "Give each sample its class name."))
        index = class_index(classes)  # a label matches its class in either Unicode form
        unknown = sorted({nfc(n) for n in names if nfc(n) not in index})
        if unknown and not any(nfc(n) in index for n in names):  # not one sample could be read
            by_index = list(classes) == index_names(len(classes))
            if part not in ("training", "validation"):  # scored against a model: its classes are fixed
                fix = "Label them with the model's classes" + (" (by class index)" if by_index else "") + "."
            elif part == "validation" and not by_index:
                fix = "Label them with the training data's class names."
            elif by_index:
                fix = ("The classes are known by index only: give classes=[...] (the names of the training labels in "
                       "index order) to read these by name.")
            else:
                fix = "Label the samples with these classes' names, or give the classes they use (classes=[...])."
            raise DataError(f"{what}: none of their labels ({unknown[:10]}) is one of the classes "
                            f"{list(classes)[:10]}, so no sample can be read. {fix}")
        if unknown:
            report.warn(f"{what}: the labels {unknown[:10]} are not among the classes {list(classes)[:10]}; "
                        "those samples are left out.")
        for k, lab in enumerate(labels):
            if isinstance(lab, str) and nfc(lab) in index:
                out[k] = index[nfc(lab)]
        return out, list(classes)
    for k, lab in enumerate(labels):
        if lab is not None:
            out[k] = int(lab)
    if classes is None:
        top = int(out.max()) if len(out) else -1
        classes = index_names(top + 1)
    bad = sorted({int(t) for t in ints if not 0 <= t < len(classes)})  # -1 too: a label, not the "none" mark
    if bad:
        raise DataError(f"{what}: the class indices {bad[:5]} lie outside 0..{len(classes) - 1} for the classes "
                        f"{list(classes)[:10]}; fix the labels or pass classes=[...] with one name per index.")
    return out, list(classes)
