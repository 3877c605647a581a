"""Images in tables: Parquet files and Hugging Face ``datasets``, read in place.

- **Parquet** (the ``[parquet]`` extra: pyarrow): one or more ``.parquet`` files (a path, a
  brace pattern, a folder, a list) with an image column and a label column. The image
  column holds the encoded bytes (binary), or a struct with a ``bytes`` field (how
  Hugging Face stores its ``Image`` feature); by default the first such column, else the
  column named ``image``/``img``/``jpg``/``png``. The label column: ``label``, ``labels``,
  ``cls``, ``class`` or ``target`` (class indices, or class names). Class names come from
  ``classes=[...]``, else from the ``ClassLabel`` names Hugging Face writes into the file's
  metadata, else from the labels. A ``__key__``/``key``/``id`` column names the samples
  (and seeds the hashed validation split); without one, the file name and row number do.
  Rows are read a row group at a time (the last two are kept per process): shuffled
  access costs a row-group read per sample, so write files with small row groups
  (``row_group_size`` of a few hundred rows) or use tar shards for training at scale.
- **Hugging Face** (the ``[hf]`` extra: datasets): a ``datasets.Dataset`` (map-style) or a
  folder written by ``save_to_disk`` (a ``DatasetDict`` gives its ``train`` split, and its
  ``validation``/``val``/``test`` split when no ``val_data`` is given). The ``Image`` column
  is read undecoded and decoded by transferkit (EXIF orientation, RGB, draft mode); the
  ``ClassLabel`` column's names are the classes. ``IterableDataset`` (streaming) is not
  supported yet.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from transferkit._signals import raise_if_interrupted
from transferkit._io import atomic_write, entry_not_kept
from transferkit.data.checks import (ON_BAD_FILE, SCAN_RULES, SCANS, DataReport, check_image_stream,
                                     holds_class_folders, leave_out_bad)
from transferkit.data.encoded import (EncodedImageDataset, given_by_index, labels_by_name, labels_by_own_names,
                                      labels_to_targets)
from transferkit.data.fingerprint import from_common_folder
from transferkit.data.shards import file_names, named_files
from transferkit.errors import DataError, TransferkitError, check_choice

LABEL_COLUMNS = ("label", "labels", "cls", "class", "target")
IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp")
KEY_COLUMNS = ("__key__", "key", "id")


def _pyarrow() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise_if_interrupted(exc)
        raise DataError("Reading Parquet files needs pyarrow: pip install 'transferkit[parquet]'.") from exc
    return pq


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as exc:
        raise_if_interrupted(exc)
        raise DataError("Reading Hugging Face datasets needs the datasets package: pip install 'transferkit[hf]'.") \
            from exc
    return datasets


def _parquet_name(p: str) -> bool:
    return p.lower().endswith(".parquet")


def parquet_list(data: Any) -> list[str] | None:
    """The Parquet files ``data`` names (a path, a brace pattern, a folder holding
    ``.parquet`` files or sub-folders of them, or a list), or None."""
    if isinstance(data, (list, tuple)):
        if not data or not all(isinstance(d, (str, os.PathLike)) and _parquet_name(str(d)) for d in data):
            return None
        return [p for d in data for p in (parquet_list(d) or [])]
    if not isinstance(data, (str, os.PathLike)):
        return None
    spec = str(data)
    if _parquet_name(spec):
        return named_files(spec, "Parquet file(s)")
    if os.path.isdir(spec) and not is_saved_hf(spec):
        root = Path(spec)
        subs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith((".", "_"))]
        if holds_class_folders(subs):
            return None  # class folders: a folder of images (a stray .parquet in it is not data)
        top = sorted(str(p) for p in root.glob("*.parquet") if not p.name.startswith("."))
        # else one level down: the Hugging Face layout data/train-00000-of-00004.parquet
        nested = sorted(str(p) for d in subs for p in d.glob("*.parquet") if not p.name.startswith("."))
        return top or nested or None
    return None


def split_parquet_files(files: Sequence[str], report: DataReport | None = None) -> tuple[list[str], list[str]] | None:
    """``(train, validation)`` files when the names say so (``train-00000-of-00002.parquet``
    beside ``validation-...``/``val-...``/``dev-...``/``test-...``, or in folders named so), else
    None. ``report`` is told which files are not used, and when files named as training data
    lie beside files named as no split (all are then trained on), as for shards."""
    def split_of(p: str) -> str:
        parts = [q.lower() for q in Path(p).parts[-2:]]
        for name in parts[::-1]:
            for s in ("train", "validation", "valid", "val", "dev", "test"):
                if name == s or name.startswith((s + "-", s + "_", s + ".")):
                    return s
        return ""
    groups: dict[str, list[str]] = {}
    for f in files:
        groups.setdefault(split_of(f), []).append(f)
    held = next((s for s in ("validation", "valid", "val", "dev", "test") if groups.get(s)), None)
    if groups.get("train") and held is None and groups.get("") and report is not None:
        report.warn(f"Parquet files named as training data ({file_names(groups['train'])}) lie beside files named "
                    f"as no split ({file_names(groups[''])}): all of them are trained on, as none is named as "
                    "validation data. "
                    "Name the held-out files validation-*.parquet to validate on them, or pass the training files "
                    "alone.")
    if not groups.get("train") or held is None:
        return None
    unused = [f for s, fs in groups.items() if s not in ("train", held) for f in fs]
    if unused and report is not None:
        report.warn(f"The Parquet files hold training and {held} files; the others are not used: {file_names(unused)}.")
    return groups["train"], groups[held]


class _RowGroupCache:
    def __init__(self, size: int = 2) -> None:
        self.size, self.items = size, OrderedDict()

    def get(self, key: Any, load: Any) -> Any:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = self.items[key] = load()
        if len(self.items) > self.size:
            self.items.popitem(last=False)
        return value


def _hf_class_names(schema: Any, label: str) -> list[str] | None:
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    try:
        feat = json.loads(meta)["info"]["features"][label]
    except (ValueError, KeyError, TypeError):
        return None
    names = feat.get("names") if isinstance(feat, dict) else None
    return list(names) if isinstance(names, list) else None


def _pick(names: Sequence[str], wanted: Sequence[str], given: str | None, what: str, where: str) -> str | None:
    if given is not None:
        if given not in names:
            raise DataError(f"{where} has no column {given!r} for the {what}; its columns: {list(names)[:20]}.")
        return given
    return next((c for c in wanted if c in names), None)


def _pick_image(cols: Sequence[str], typed: Sequence[str], given: str | None, where: str, how: str) -> str | None:
    """The image column: ``given``; else among the columns of an image type (``typed``) the one
    named like images (`IMAGE_COLUMNS`), else the only one; several of them, none so named (an
    image and its mask), is a DataError naming them and ``how`` to choose. None: no image column."""
    if given is not None:
        return _pick(cols, [], given, "images", where)
    named = [c for c in IMAGE_COLUMNS if c in typed]
    if named:
        return named[0]
    if len(typed) > 1:
        raise DataError(f"{where} has {len(typed)} image columns, {list(typed)[:10]}, and none is named like images "
                        f"({', '.join(IMAGE_COLUMNS)}); name the one to train on: {how}.")
    return typed[0] if typed else None


def row_path(path: str, folder: str | None) -> str:
    """The image file a table row names by ``path``: as it is when absolute; a relative path
    from ``folder`` (the Parquet file's), as a CSV's paths are read, where a file lies there,
    else from the working directory (a table written there).

    Example:
        >>> row_path("/data/img/0.png", "/tables")
        '/data/img/0.png'
    """
    if folder and not os.path.isabs(path):
        beside = os.path.join(folder, path)
        if os.path.exists(beside):
            return beside
    return path


def _files_read_by_path(parts: Any) -> list[Any]:
    """``[path, size, modification and change time]`` (``[path, None]`` when it cannot be
    read) of each image file that a row of a table reads by its path (``parts``: ``(paths,
    bytes empty, the table's folder)``): what the table's own file stats cannot tell, an image
    edited in place. The path is the row's own (`row_path` finds the file), so the identity
    does not depend on how the table's path is spelt. Empty when every row holds its bytes."""
    out: list[Any] = []
    for paths, empty, folder in parts:
        for path, none in zip(paths, empty):
            if none and path:  # the path as the row writes it (however the table's own path is spelt)
                try:
                    st = os.stat(row_path(path, folder))
                    out.append([path, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
                except OSError:
                    out.append([path, None])
    return out


def _struct_rows(chunks: Any) -> Any:
    """``(paths, bytes empty, None)`` of each chunk of an arrow array of ``{bytes, path}`` structs,
    read without copying the bytes (paths from the working directory)."""
    for chunk in chunks:
        yield chunk.field("path").to_pylist(), chunk.field("bytes").is_null().to_pylist(), None


class ParquetSource:
    """The rows of Parquet files, readable by position (see the module docstring)."""

    def __init__(self, files: Sequence[str], image_column: str | None = None, label_column: str | None = None) -> None:
        pq = _pyarrow()
        import pyarrow as pa

        self.files = [str(f) for f in files]
        self.name = self.files[0] if len(self.files) == 1 else f"{self.files[0]} (+{len(self.files) - 1} files)"
        metas = []
        for f in self.files:
            try:
                metas.append(pq.ParquetFile(f))
            except (OSError, pa.ArrowException) as exc:
                raise DataError(f"Cannot read {f!r} as a Parquet file: {exc}.") from exc
        schema = metas[0].schema_arrow
        cols = list(schema.names)
        where = repr(self.files[0])

        def is_image(t: Any) -> bool:
            return (pa.types.is_binary(t) or pa.types.is_large_binary(t)) or (
                pa.types.is_struct(t) and t.get_field_index("bytes") >= 0)

        how = "data=transferkit.data.open_parquet(files, image_column=...)"
        self.image_column = _pick_image(cols, [c for c in cols if is_image(schema.field(c).type)], image_column,
                                        where, how)
        if self.image_column is None or not is_image(schema.field(self.image_column).type):
            raise DataError(f"{where} has no image column (binary bytes, or a struct with 'bytes'); its columns: "
                            f"{cols[:20]}. Store the encoded images in a binary column.")
        self.label_column = _pick(cols, LABEL_COLUMNS, label_column, "labels", where)
        if self.label_column is None:
            raise DataError(f"{where} has no label column (looked for {', '.join(LABEL_COLUMNS)}); its columns: "
                            f"{cols[:20]}.")
        self.key_column = next((c for c in KEY_COLUMNS if c in cols), None)
        self.struct = pa.types.is_struct(schema.field(self.image_column).type)
        for f, m in zip(self.files[1:], metas[1:]):  # files read together: one set of columns
            other = m.schema_arrow
            for col in (self.image_column, self.label_column):
                if col not in other.names:
                    raise DataError(f"{f!r} has no column {col!r}, which {self.files[0]!r} has (its columns: "
                                    f"{other.names[:20]}): Parquet files read together need the same columns. "
                                    "Write them with one schema, or read them apart.")
            kind = other.field(self.image_column).type
            if not is_image(kind) or pa.types.is_struct(kind) != self.struct:  # bytes in one, {bytes, path} in another
                raise DataError(f"{f!r}: its column {self.image_column!r} holds {kind}, and that of "
                                f"{self.files[0]!r} {schema.field(self.image_column).type}: Parquet files read "
                                "together need the same column types. Write them with one schema, or read them "
                                "apart.")
        self._file_classes = [_hf_class_names(m.schema_arrow, self.label_column) for m in metas]
        self.class_names = labels_by_own_names([(f, c, []) for f, c in zip(self.files, self._file_classes)],
                                               "Parquet files", "a ClassLabel")[0]
        # where each row lies: (file, row group, row in group)
        groups = [(fi, g, m.metadata.row_group(g).num_rows) for fi, m in enumerate(metas)
                  for g in range(m.metadata.num_row_groups)]
        counts = np.array([n for _, _, n in groups], dtype=np.int64)
        self.group_file = np.array([fi for fi, _, _ in groups], dtype=np.int32)
        self.group_index = np.array([g for _, g, _ in groups], dtype=np.int32)
        self.group_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        stats = [os.stat(f) for f in self.files]
        # (path from the folder holding them all, bytes, times): a folder moved whole keeps it; a file rewritten
        # with its size and modification time kept does not (its change time is new), as with image files
        self._ident = [(rel, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                       for rel, st in zip(from_common_folder(self.files), stats)]
        self._cache = _RowGroupCache()
        self._keys: list[str] | None = None
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return int(self.group_start[-1])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = _RowGroupCache()
        return state

    def labels(self) -> list[Any]:
        """The label of each row; a class index of a file whose ClassLabel lists its classes in
        another order than the others' is read as its own class's name (`labels_by_own_names`)."""
        pq = _pyarrow()
        parts = [(f, names, pq.read_table(f, columns=[self.label_column]).column(0).to_pylist())
                 for f, names in zip(self.files, self._file_classes)]
        return labels_by_own_names(parts, "Parquet files", "a ClassLabel")[1]

    def _locate(self, i: int) -> tuple[int, int]:
        gi = int(np.searchsorted(self.group_start, i, side="right")) - 1
        return gi, i - int(self.group_start[gi])

    def read(self, i: int) -> bytes:
        pq = _pyarrow()
        gi, row = self._locate(i)
        fi, g = int(self.group_file[gi]), int(self.group_index[gi])
        col = self._cache.get((fi, g), lambda: pq.ParquetFile(self.files[fi]).read_row_group(
            g, columns=[self.image_column]).column(0).combine_chunks())
        value = col[row].as_py()
        if self.struct:
            data = (value or {}).get("bytes")
            if data is None and (value or {}).get("path"):
                with open(row_path(value["path"], os.path.dirname(self.files[fi])), "rb") as f:
                    data = f.read()
        else:
            data = value
        if data is None:
            raise OSError("the image cell is empty")
        return data

    def key(self, i: int) -> str:
        if self.key_column is None:
            return self.sample_name(i)
        if self._keys is None:
            pq = _pyarrow()
            self._keys = [str(k) for f in self.files
                          for k in pq.read_table(f, columns=[self.key_column]).column(0).to_pylist()]
        return self._keys[i]

    def sample_name(self, i: int) -> str:
        gi, row = self._locate(i)
        fi = int(self.group_file[gi])
        first = int(self.group_start[np.flatnonzero(self.group_file == fi)[0]])
        return f"{os.path.basename(self.files[fi])}:row {i - first}"

    def fingerprint(self) -> str:
        """The files' paths (from the folder holding them all), sizes and times and the columns;
        and the stats of image files that rows read by path (`_files_read_by_path`). Computed
        once per source (the scan and the data's views ask for it)."""
        if self._fingerprint is None:
            by_path = _files_read_by_path(self._path_rows()) if self.struct else []
            self._fingerprint = hashlib.blake2b(json.dumps([self._ident, self.image_column, self.label_column] +
                                                           ([by_path] if by_path else [])).encode(),
                                                digest_size=16).hexdigest()
        return self._fingerprint

    def _path_rows(self) -> Any:
        """``(paths, bytes empty, folder)`` per row group that may hold a row read by path: one whose
        statistics do not say that every row holds its bytes, and that holds a path. The bytes
        of a row group holding both kinds are read (once, here)."""
        pq = _pyarrow()
        for f in self.files:
            pf = pq.ParquetFile(f)
            field = pf.schema_arrow.field(self.image_column).type
            if field.get_field_index("path") < 0:  # {bytes} alone: no row is read by path
                return
            meta = pf.metadata
            for g in range(meta.num_row_groups):
                group = meta.row_group(g)
                stats = next((group.column(c).statistics for c in range(group.num_columns)
                              if group.column(c).path_in_schema == f"{self.image_column}.bytes"), None)
                nulls = stats.null_count if stats is not None and stats.has_null_count else None
                if nulls == 0:
                    continue
                paths = pf.read_row_group(g, columns=[f"{self.image_column}.path"]).column(0).combine_chunks()
                paths = paths.field("path").to_pylist()
                if not any(paths):
                    continue
                folder = os.path.dirname(f)
                if nulls == group.num_rows:
                    yield paths, [True] * len(paths), folder
                else:
                    data = pf.read_row_group(g, columns=[f"{self.image_column}.bytes"]).column(0)
                    empty = [e for chunk in data.chunks for e in chunk.field("bytes").is_null().to_pylist()]
                    yield paths, empty, folder

    def listing(self) -> str:
        """What copies of these files share: their places and sizes (no times), and the columns."""
        return hashlib.blake2b(json.dumps([[i[:2] for i in self._ident], self.image_column,
                                           self.label_column]).encode(), digest_size=16).hexdigest()


def open_parquet(files: str | os.PathLike | Sequence[str], *, classes: Sequence[str] | None = None,
                 min_size: int | None = None, on_bad_file: str = "skip", report: DataReport | None = None,
                 what: str = "training", image_column: str | None = None, label_column: str | None = None,
                 scan: str = "quick", cache_dir: str | Path | None = None) -> EncodedImageDataset:
    """A map-style dataset over Parquet files (see the module docstring). Rows without a
    label, and (with ``scan``, as image files are checked) bad images, are left out and
    reported, or raise with ``on_bad_file="raise"``; `scan_rows` says how a scan is kept."""
    check_choice("on_bad_file", on_bad_file, ON_BAD_FILE)
    check_choice("scan", scan, SCANS)
    files = [files] if isinstance(files, (str, os.PathLike)) else files  # one file, not a sequence of its letters
    report = report if report is not None else DataReport()
    source = ParquetSource(files, image_column, label_column)
    if len(source) == 0:
        raise DataError(f"The {what} Parquet files {list(files)[:3]} hold no row.")
    labels = labels_by_name(source.labels(), source.class_names, classes, what, "Parquet data", report)
    source.labels_by_index = given_by_index(labels)  # read against the classes by place (`check_read_by_place`)
    targets, names = labels_to_targets(labels, list(classes) if classes else source.class_names,
                                       f"The {what} Parquet data", report, part=what)
    return _kept(source, targets, names, min_size, on_bad_file, report, what,
                 bad=scan_rows(source, scan, cache_dir, where=f"the {what} Parquet data"))


def scan_rows(source: Any, scan: str, cache_dir: str | Path | None, *, where: str) -> dict[int, str]:
    """Why each bad row of ``source`` (a Parquet or Hugging Face source) cannot be used as an
    image: every row's image checked as image files are (``scan`` ``"quick"``: the header and
    the end marker; ``"full"``: a decode; ``"none"``: no check). The scan reads every image
    once; under ``cache_dir`` its result is kept (``scans/<key>-<scan>.json``, the key a digest
    of the source's fingerprint and `SCAN_RULES`) for the next run on the same data."""
    if scan == "none":
        return {}
    key = hashlib.blake2b(f"{SCAN_RULES}\0{source.fingerprint()}".encode(), digest_size=16).hexdigest()
    path = Path(cache_dir) / "scans" / f"{key}-{scan}.json" if cache_dir is not None else None  # other rules: again
    if path is not None:
        try:
            return {int(k): str(v) for k, v in json.loads(path.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            pass  # not kept yet (or damaged): scanned again
    bad: dict[int, str] = {}
    for i in range(len(source)):
        try:
            data = source.read(i)
            reason = check_image_stream(io.BytesIO(data), len(data), full=scan == "full")
        except OSError as exc:
            reason = f"cannot be read ({exc})"
        if reason:
            bad[i] = reason
    if path is not None:
        try:
            atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(bad)), what=f"scan of {where}")
        except (OSError, TransferkitError) as exc:  # a cache_dir that cannot take it: the next run scans again
            entry_not_kept(exc, cache_dir=cache_dir, what=f"scan of {where}", later="the next run scans again")
    return bad


def _kept(source: Any, targets: np.ndarray, names: list[str], min_size: int | None, on_bad_file: str,
          report: DataReport, what: str, *, bad: dict[int, str]) -> EncodedImageDataset:
    leave_out_bad([(source.sample_name(i), r) for i, r in sorted(bad.items()) if targets[i] >= 0],
                  on_bad_file=on_bad_file, report=report, where=f" of the {what} rows",
                  fix="Remove or replace its row")
    labelled = np.flatnonzero(targets >= 0).astype(np.int64)
    keep = np.array([i for i in labelled if int(i) not in bad], dtype=np.int64) if bad else labelled
    missing = len(targets) - len(labelled)
    if missing:
        if on_bad_file == "raise":
            raise DataError(f"{missing} {what} row(s) have no label (e.g. {source.sample_name(int(np.flatnonzero(targets < 0)[0]))}).")
        report.warn(f"{missing} {what} row(s) have no usable label; they are left out.")
    if len(keep) == 0:
        raise DataError(f"No {what} row has a usable label and image.")
    return EncodedImageDataset(source, targets, names, indices=keep, min_size=min_size, on_bad_file=on_bad_file,
                               report=report)


# -- Hugging Face datasets --------------------------------------------------------------
def is_hf_dataset(data: Any) -> bool:
    """A ``datasets`` object (``Dataset``, ``IterableDataset``, ``DatasetDict``), told by its
    type's module so that ``datasets`` need not be installed to ask."""
    return type(data).__module__.split(".")[0] == "datasets"


def is_saved_hf(path: Any) -> bool:
    """A folder written by ``datasets``' ``save_to_disk``."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        return False
    p = Path(path)
    return (p / "dataset_dict.json").is_file() or ((p / "state.json").is_file() and (p / "dataset_info.json").is_file())


def load_hf(data: Any) -> Any:
    """A ``datasets`` object from an object or a ``save_to_disk`` folder."""
    if isinstance(data, (str, os.PathLike)):
        return _datasets().load_from_disk(str(data))
    return data


def split_hf(data: Any, *, need_train: bool = True) -> tuple[Any, Any] | None:
    """``(train, validation)`` of a ``DatasetDict`` (or a folder holding one); None for one
    dataset. ``need_train=False`` (validation data): a missing train split is None."""
    if not (is_hf_dataset(data) or is_saved_hf(data)):
        return None
    obj = load_hf(data)
    if type(obj).__name__ not in ("DatasetDict", "IterableDatasetDict"):
        return None
    if "train" not in obj and not need_train:
        return None, next((obj[s] for s in ("validation", "valid", "val", "test") if s in obj), None)
    if "train" not in obj:
        raise DataError(f"The Hugging Face DatasetDict has splits {list(obj)}, none named 'train'; pass "
                        "data=dd['<split>'] and val_data=dd['<split>'].")
    val = next((obj[s] for s in ("validation", "valid", "val", "test") if s in obj), None)
    return obj["train"], val


class HFSource:
    """The rows of a ``datasets.Dataset``, readable by position; images undecoded."""

    def __init__(self, ds: Any, image_column: str | None = None, label_column: str | None = None) -> None:
        datasets = _datasets()
        feats = ds.features
        cols = list(feats)
        where = "The Hugging Face dataset"
        images = [c for c in cols if isinstance(feats[c], datasets.Image)]
        how = "data=ds.remove_columns([...]) keeping one, or data=transferkit.data.open_hf(ds, image_column=...)"
        self.image_column = _pick_image(cols, images or [c for c in IMAGE_COLUMNS if c in cols], image_column,
                                        where, how)
        if self.image_column is None:
            raise DataError(f"{where} has no Image column; its columns: {cols[:20]}. Cast the column of images to "
                            "datasets.Image() (ds.cast_column(name, datasets.Image())).")
        labels = [c for c in cols if isinstance(feats[c], datasets.ClassLabel)]
        self.label_column = _pick(cols, labels + list(LABEL_COLUMNS), label_column, "labels", where)
        if self.label_column is None:
            raise DataError(f"{where} has no ClassLabel or label column; its columns: {cols[:20]}.")
        lab = feats[self.label_column]
        self.class_names = list(lab.names) if isinstance(lab, datasets.ClassLabel) else None
        self.key_column = next((c for c in KEY_COLUMNS if c in cols), None)
        view = ds.select_columns([self.image_column])
        if isinstance(feats[self.image_column], datasets.Image):
            view = view.cast_column(self.image_column, datasets.Image(decode=False))
        self.ds, self.full = view, ds
        self.name = f"Hugging Face dataset {getattr(ds, '_fingerprint', '')}".strip()
        self._keys: list[str] | None = None
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.ds)

    def labels(self) -> list[Any]:
        return self.full.with_format("arrow")[self.label_column].to_pylist()

    def read(self, i: int) -> bytes:
        value = self.ds[int(i)][self.image_column]
        if isinstance(value, dict):
            data = value.get("bytes")
            if data is None and value.get("path"):
                with open(value["path"], "rb") as f:
                    data = f.read()
        else:
            data = value
        if not isinstance(data, (bytes, bytearray)):
            raise OSError(f"the image cell holds {type(data).__name__}, not encoded bytes")
        return bytes(data)

    def key(self, i: int) -> str:
        if self.key_column is None:
            return str(i)
        if self._keys is None:
            self._keys = [str(k) for k in self.full.with_format("arrow")[self.key_column].to_pylist()]
        return self._keys[i]

    def sample_name(self, i: int) -> str:
        return f"row {i}" + (f" ({self.key(i)})" if self.key_column else "")

    def fingerprint(self) -> str:
        """The datasets library's identity of the table and its transforms, and the columns; and
        the stats of image files that rows read by path (`_files_read_by_path`). Computed once
        per source, as a Parquet source's."""
        if self._fingerprint is not None:
            return self._fingerprint
        fp = getattr(self.full, "_fingerprint", None)  # datasets' own identity of the table and its transforms
        if not fp:
            raise DataError("The Hugging Face dataset has no fingerprint; save it (save_to_disk) and pass the folder.")
        by_path = []
        if isinstance(self.ds.features[self.image_column], _datasets().Image):  # {bytes, path} (else bytes)
            by_path = _files_read_by_path(_struct_rows(self.ds.with_format("arrow")[self.image_column].chunks))
        files = ":" + hashlib.blake2b(json.dumps(by_path).encode(), digest_size=16).hexdigest() if by_path else ""
        self._fingerprint = f"{fp}:{self.image_column}:{self.label_column}{files}"
        return self._fingerprint

    def listing(self) -> str:
        """What copies of the table share: its rows, columns and their types (the datasets
        library's own fingerprint is random, per process, after a ``map`` with a function it
        cannot hash)."""
        return hashlib.blake2b(json.dumps([len(self.full), list(self.full.column_names), repr(self.full.features),
                                           self.image_column, self.label_column]).encode(),
                               digest_size=16).hexdigest()


def open_hf(data: Any, *, classes: Sequence[str] | None = None, min_size: int | None = None,
            on_bad_file: str = "skip", report: DataReport | None = None, what: str = "training",
            image_column: str | None = None, label_column: str | None = None, scan: str = "quick",
            cache_dir: str | Path | None = None) -> EncodedImageDataset:
    """A map-style dataset over a ``datasets.Dataset`` or a ``save_to_disk`` folder (see the
    module docstring); rows are checked as Parquet rows are (`open_parquet`)."""
    check_choice("on_bad_file", on_bad_file, ON_BAD_FILE)
    check_choice("scan", scan, SCANS)
    report = report if report is not None else DataReport()
    ds = load_hf(data)
    kind = type(ds).__name__
    if kind in ("IterableDataset", "IterableDatasetDict"):
        raise DataError("A streaming Hugging Face IterableDataset is not supported yet: transferkit needs random "
                        "access. Load it as a Dataset (streaming=False), or save it to disk (save_to_disk) or to "
                        "Parquet files and pass the folder.")
    if kind == "DatasetDict":
        raise DataError(f"Pass one split of the DatasetDict (data=dd['train'], val_data=dd['validation']); it has "
                        f"{list(ds)}.")
    if len(ds) == 0:
        raise DataError(f"The {what} Hugging Face dataset is empty.")
    source = HFSource(ds, image_column, label_column)
    labels = labels_by_name(source.labels(), source.class_names, classes, what, "Hugging Face dataset", report)
    source.labels_by_index = given_by_index(labels)  # read against the classes by place (`check_read_by_place`)
    targets, names = labels_to_targets(labels, list(classes) if classes else source.class_names,
                                       f"The {what} Hugging Face dataset", report, part=what)
    return _kept(source, targets, names, min_size, on_bad_file, report, what,
                 bad=scan_rows(source, scan, cache_dir, where=f"the {what} Hugging Face dataset"))
