"""WebDataset-format tar shards, read in place with random access.

A shard is an uncompressed tar file; its members are grouped into samples by key as
WebDataset does: the key of ``dir/000042.cls`` is ``dir/000042`` (the path up to the first
dot of the file name), its extension ``cls``, and consecutive members with the same key
form one sample. Members whose file name starts with ``_`` or ``.`` are not samples.

- The image: the first member with extension ``jpg``, ``jpeg``, ``png`` or ``webp`` (then
  ``bmp``, ``gif``, ``tif``, ``tiff``, ``ppm``, ``pgm``).
- The label: ``cls`` (a class index, as text: ``3``; a non-numeric ``cls`` is a class
  name), else ``txt`` (a class name), else ``json`` (an object whose ``"label"`` is a
  class index or a class name).
- The class names: ``classes=[...]`` when given, else the ``"classes"`` list of
  ``_info.json`` (or ``info.json``) in the shards' folder, else the sorted class names
  (for named labels) or ``"0"``, ``"1"``, ... (for class indices).

Random access: each shard is read once to list where each sample's image lies (offset
and size in the tar) and to read its label (and, with ``scan="quick"`` or ``"full"``, to
check each image as image files are checked). That *member index* is cached under
``cache_dir/shard-index/`` keyed by the shard's path, size and modification time (written
atomically; without ``cache_dir`` it is rebuilt each run), so a run starts with one small
read per shard. A dataset's identity for cache keys (`ShardSource.fingerprint`) covers the
shards' paths, sizes and modification times: its cost grows with the number of shards.

Shards are given as a brace pattern (``train-{000000..000127}.tar``, ``{a,b}`` lists too),
a folder of ``.tar`` files, one ``.tar`` file, or a list of them. Remote shards
(``pipe:`` commands, ``http(s)://``, ``s3://``, ...) are not supported yet: copy them to a
local or mounted disk.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transferkit._io import atomic_write
from transferkit.data.checks import ON_BAD_FILE, SCANS, DataReport, check_image_stream
from transferkit.data.encoded import EncodedImageDataset, labels_to_targets
from transferkit.errors import DataError, check_choice

INDEX_FORMAT = 2
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")
LABEL_EXTS = ("cls", "txt", "json")
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "gcs://", "az://", "hf://", "ftp://")
_KEY_EXT = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")  # WebDataset's base_plus_ext
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def named_files(spec: str, what: str) -> list[str]:
    """The files a name or brace pattern ``spec`` names; a DataError when some do not exist."""
    paths = expand_braces(spec)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{len(missing)} of the {len(paths)} {what} named by {spec!r} do not exist, e.g. "
                        f"{missing[:3]}.")
    return paths


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{000..003}`` ranges (zero-padded like the first bound) and ``{a,b}`` lists.

    Example:
        >>> expand_braces("s-{00..02}.tar")
        ['s-00.tar', 's-01.tar', 's-02.tar']
        >>> expand_braces("{train,val}-{0..1}.tar")
        ['train-0.tar', 'train-1.tar', 'val-0.tar', 'val-1.tar']
    """
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    r = _RANGE.fullmatch("{" + body + "}")
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        if hi < lo:
            raise DataError(f"Shard pattern {pattern!r}: the range {{{body}}} is empty (its end is below its start).")
        width = len(r.group(1))
        parts = [str(k).zfill(width) for k in range(lo, hi + 1)]
    elif "," in body:
        parts = body.split(",")
    else:
        parts = ["{" + body + "}"]
        return [head + parts[0] + t for t in expand_braces(tail)]
    return [head + p + t for p in parts for t in expand_braces(tail)]


def is_remote(spec: Any) -> bool:
    return isinstance(spec, str) and spec.lower().startswith(REMOTE_PREFIXES)


def _check_local(spec: str) -> None:
    if is_remote(spec):
        raise DataError(f"Remote shards ({spec[:60]!r}) are not supported yet: transferkit reads tar shards in place "
                        "from a local or mounted disk. Copy them there (or mount the bucket) and pass the local "
                        "pattern.")


def _tar_name(p: str) -> bool:
    return p.lower().endswith(".tar")


def _compressed_tar(p: str) -> bool:
    return p.lower().endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst"))


def shard_list(data: Any) -> list[str] | None:
    """The local tar shards that ``data`` names, or None when it does not name tar shards.

    ``data``: a brace pattern or path ending in ``.tar``, a folder holding ``.tar`` files
    and no sub-folders (a folder with sub-folders is a folder of images), or a list of ``.tar`` paths or patterns. Raises
    [`DataError`][transferkit.DataError] for remote or compressed shards and missing files.
    """
    if isinstance(data, (list, tuple)):
        if not data or not all(isinstance(d, (str, os.PathLike)) for d in data):
            return None
        items = [str(d) for d in data]
        if not all(_tar_name(d) or _compressed_tar(d) or is_remote(d) for d in items):
            return None
        out: list[str] = []
        for d in items:
            out += shard_list(d) or []
        return out
    if not isinstance(data, (str, os.PathLike)):
        return None
    spec = str(data)
    if is_remote(spec) and (".tar" in spec.lower() or spec.startswith("pipe:")):
        _check_local(spec)
    if _compressed_tar(spec):
        raise DataError(f"{spec!r} is a compressed tar: shards are read in place with random access, which needs "
                        "uncompressed tar files (JPEG/PNG members are already compressed). Decompress them "
                        "(e.g. gunzip) and pass the .tar files.")
    if _tar_name(spec):
        return named_files(spec, "shard(s)")
    if os.path.isdir(spec):
        entries = list(Path(spec).iterdir())
        tars = sorted(str(p) for p in entries if p.is_file() and _tar_name(p.name) and not p.name.startswith("."))
        if any(p.is_dir() and not p.name.startswith((".", "_")) for p in entries):
            return None  # class sub-folders: an image folder (a stray .tar in it is not data)
        if tars:
            return tars
        if any(p.is_file() and _compressed_tar(p.name) for p in Path(spec).iterdir()):
            raise DataError(f"{spec!r} holds compressed tar files: shards must be uncompressed .tar files.")
    return None


def split_shard_folder(folder: str | Path) -> tuple[list[str], list[str]] | None:
    """``(train shards, validation shards)`` of a folder whose ``.tar`` files are named
    ``train*`` and ``val*`` / ``valid*`` / ``validation*`` (else ``test*``), or None."""
    shards = shard_list(folder) if os.path.isdir(str(folder)) else None
    if not shards:
        return None
    def named(prefixes: tuple[str, ...]) -> list[str]:
        return [s for s in shards if os.path.basename(s).lower().startswith(prefixes)]
    train = named(("train",))
    val = named(("validation", "valid", "val")) or named(("test",))
    return (train, val) if train and val else None


# -- the member index of one shard ------------------------------------------------------
@dataclass
class ShardIndex:
    """Where each sample of one shard lies: keys, image offsets and sizes, raw labels
    (an index, a name, or None), and why an image is bad ("" when it is fine)."""

    keys: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    labels: list[Any] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    dims: list[list[int]] = field(default_factory=list)  # [width, height] from the header; [0, 0] unknown
    no_image: int = 0
    no_label: int = 0

    def to_json(self) -> str:
        return json.dumps({"format": INDEX_FORMAT, "keys": self.keys, "offsets": self.offsets, "sizes": self.sizes,
                           "labels": self.labels, "bad": self.bad, "dims": self.dims, "no_image": self.no_image,
                           "no_label": self.no_label}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ShardIndex:
        d = json.loads(text)
        if d.get("format") != INDEX_FORMAT:
            raise ValueError(f"index format {d.get('format')}, expected {INDEX_FORMAT}")
        return cls(d["keys"], d["offsets"], d["sizes"], d["labels"], d["bad"], d["dims"], d["no_image"],
                   d["no_label"])


class _Region(io.RawIOBase):
    """A read-only, seekable view of ``size`` bytes at ``offset`` of an open file."""

    def __init__(self, f: Any, offset: int, size: int) -> None:
        self.f, self.offset, self.size, self.pos = f, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size}[whence]
        self.pos = max(0, base + pos)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self.size - self.pos))
        if n == 0:
            return 0
        self.f.seek(self.offset + self.pos)
        data = self.f.read(n)
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)


def image_header_size(f: Any) -> tuple[int, int]:
    """``(width, height)`` from an image's header (no pixel decoded)."""
    from PIL import Image

    with Image.open(f) as img:
        return img.size


def _parse_label(ext: str, data: bytes) -> Any:
    text = data.decode("utf-8", errors="replace").strip()
    if ext == "json":
        try:
            obj = json.loads(text)
        except ValueError:
            return None
        lab = obj.get("label", obj.get("cls")) if isinstance(obj, dict) else obj
        if isinstance(lab, bool) or not isinstance(lab, (int, str)):
            return None
        return lab
    if ext == "cls" and re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    return text or None


def build_index(path: str, *, scan: str = "quick") -> ShardIndex:
    """Read one shard's member headers (and label members) and list its samples; with
    ``scan`` ``"quick"`` or ``"full"``, check each image as image files are checked."""
    index = ShardIndex()
    if os.path.getsize(path) == 0:
        return index
    cur: dict[str, Any] = {}

    def flush() -> None:
        if not cur:
            return
        img = next((cur["members"][e] for e in IMAGE_EXTS if e in cur["members"]), None)
        label = next((cur["labels"][e] for e in LABEL_EXTS if e in cur["labels"]), None)
        if img is None:
            index.no_image += 1
        elif label is None:
            index.no_label += 1
        else:
            index.keys.append(cur["key"])
            index.offsets.append(img[0])
            index.sizes.append(img[1])
            index.labels.append(label)
            reason, dims = None, [0, 0]
            if scan != "none":
                reason = check_image_stream(io.BufferedReader(_Region(f, img[0], img[1])), img[1],
                                            full=scan == "full")
                if reason is None:
                    dims = list(image_header_size(io.BufferedReader(_Region(f, img[0], img[1]))))
            index.bad.append(reason or "")
            index.dims.append(dims)

    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            pending: list[tuple[str, str, int, int, Any]] = []
            for m in tar:
                if not m.isfile():
                    continue
                mm = _KEY_EXT.match(m.name)
                if mm is None or os.path.basename(m.name).startswith(("_", ".")):
                    continue
                key, ext = mm.group(1), mm.group(2).lower()
                label_bytes = tar.extractfile(m).read() if ext in LABEL_EXTS and m.size < 1 << 20 else None
                pending.append((key, ext, m.offset_data, m.size, label_bytes))
            # the checks seek in the file: run them after the headers were walked
            for key, ext, off, size, label_bytes in pending:
                if cur and cur["key"] != key:
                    flush()
                    cur = {}
                if not cur:
                    cur = {"key": key, "members": {}, "labels": {}}
                cur["members"].setdefault(ext, (off, size))
                if label_bytes is not None:
                    lab = _parse_label(ext, label_bytes)
                    if lab is not None:
                        cur["labels"].setdefault(ext, lab)
            flush()
    except tarfile.TarError as exc:
        raise DataError(f"Cannot read the shard {path!r} as a tar file: {exc}.") from exc
    return index


def _index_path(cache_dir: str | Path, path: str, scan: str) -> Path:
    st = os.stat(path)
    ident = f"{INDEX_FORMAT}\0{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{scan}"
    return Path(cache_dir) / "shard-index" / (hashlib.blake2b(ident.encode(), digest_size=16).hexdigest() + ".json")


def shard_index(path: str, *, scan: str = "quick", cache_dir: str | Path | None = None) -> tuple[ShardIndex, bool]:
    """The member index of ``path`` and whether it came from ``cache_dir`` (see `build_index`)."""
    if cache_dir is not None:
        p = _index_path(cache_dir, path, scan)
        try:
            return ShardIndex.from_json(p.read_text()), True
        except (OSError, ValueError, KeyError):
            pass
    index = build_index(path, scan=scan)
    if cache_dir is not None:
        atomic_write(p, lambda tmp: Path(tmp).write_text(index.to_json()), what="shard index")
    return index, False


# -- the source ------------------------------------------------------------------------
class ShardSource:
    """The samples of a list of local tar shards (see the module docstring), readable by
    position: ``read(i)`` is one seek and one read in sample ``i``'s shard."""

    def __init__(self, paths: Sequence[str], indexes: Sequence[ShardIndex]) -> None:
        self.paths = [str(p) for p in paths]
        self.name = self.paths[0] if len(self.paths) == 1 else f"{self.paths[0]} (+{len(self.paths) - 1} shards)"
        counts = np.array([len(ix.keys) for ix in indexes], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.shard_of = np.repeat(np.arange(len(self.paths), dtype=np.int32), counts)
        self.offsets = np.array([o for ix in indexes for o in ix.offsets], dtype=np.int64)
        self.sizes = np.array([s for ix in indexes for s in ix.sizes], dtype=np.int64)
        self.key_bytes = np.array([k.encode() for ix in indexes for k in ix.keys] or [b""], dtype=np.bytes_)
        self.dims = np.array([d for ix in indexes for d in ix.dims] or np.zeros((0, 2)), dtype=np.int32).reshape(-1, 2)
        stats = [os.stat(p) for p in self.paths]
        self._ident = [(os.path.abspath(p), st.st_size, st.st_mtime_ns) for p, st in zip(self.paths, stats)]
        self._files: dict[int, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_files"] = {}  # open files stay in their process
        return state

    def _file(self, s: int) -> Any:
        if self._pid != os.getpid():  # a forked worker: the parent's files share its offsets
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(s)
        if f is None:
            f = self._files[s] = open(self.paths[s], "rb")
        return f

    def read(self, i: int) -> bytes:
        f = self._file(int(self.shard_of[i]))
        f.seek(int(self.offsets[i]))
        data = f.read(int(self.sizes[i]))
        if len(data) != int(self.sizes[i]):
            raise OSError(f"short read ({len(data)} of {int(self.sizes[i])} bytes): the shard changed or was truncated")
        return data

    def key(self, i: int) -> str:
        return self.key_bytes[i].decode()

    def image_size(self, i: int) -> tuple[int, int]:
        """``(width, height)`` of sample ``i``: from the index (a quick or full scan), else its header."""
        w, h = (int(v) for v in self.dims[i])
        if w and h:
            return w, h
        return image_header_size(io.BytesIO(self.read(i)))

    def sample_name(self, i: int) -> str:
        return f"{self.paths[int(self.shard_of[i])]}:{self.key(i)}"

    def shard_sizes(self) -> list[int]:
        return np.diff(self.starts).tolist()

    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps(self._ident).encode())
        return h.hexdigest()


def _info_classes(paths: Sequence[str]) -> list[str] | None:
    folder = Path(paths[0]).parent
    for name in ("_info.json", "info.json"):
        p = folder / name
        if p.is_file():
            try:
                info = json.loads(p.read_text())
            except ValueError as exc:
                raise DataError(f"{str(p)!r} is not valid JSON ({exc}); fix it or pass classes=[...].") from exc
            names = info.get("classes") if isinstance(info, dict) else None
            if names is not None:
                if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
                    raise DataError(f"{str(p)!r}: 'classes' must be a list of class names.")
                return names
    return None


def open_shards(shards: Sequence[str], *, classes: Sequence[str] | None = None, min_size: int | None = None,
                on_bad_file: str = "skip", scan: str = "quick", cache_dir: str | Path | None = None,
                report: DataReport | None = None, what: str = "training") -> EncodedImageDataset:
    """A map-style dataset over local tar shards (see the module docstring). Samples without
    an image or a label, and (with ``scan``) bad images, are left out and reported, or raise
    with ``on_bad_file="raise"``; empty shards are reported."""
    check_choice("on_bad_file", on_bad_file, ON_BAD_FILE)
    check_choice("scan", scan, SCANS)
    report = report if report is not None else DataReport()
    if not shards:
        raise DataError(f"The {what} data name no shard.")
    indexes = []
    for p in shards:
        try:
            indexes.append(shard_index(p, scan=scan, cache_dir=cache_dir)[0])
        except DataError as exc:
            if on_bad_file == "raise":
                raise
            report.bad_files.append((p, str(exc)))
            report.warn(f"Left out the shard {p!r}: {exc}")
            indexes.append(ShardIndex())
    source = ShardSource(shards, indexes)
    empty = [p for p, ix in zip(shards, indexes) if not ix.keys]
    if empty:
        report.warn(f"{len(empty)} of the {len(shards)} {what} shard(s) hold no sample, e.g. {empty[:3]}.")
    no_image, no_label = sum(ix.no_image for ix in indexes), sum(ix.no_label for ix in indexes)
    if no_image or no_label:
        msg = (f"{no_image + no_label} {what} sample(s) in the shards have no image ({no_image}; looked for "
               f"{', '.join(IMAGE_EXTS[:4])}) or no label ({no_label}; looked for cls, txt, json)")
        if on_bad_file == "raise":
            raise DataError(msg + ".")
        report.warn(msg + "; they are left out.")
    if len(source) == 0:
        raise DataError(f"The {what} shards {list(shards)[:3]} hold no usable sample (an image and a label per "
                        "key, e.g. 000001.jpg and 000001.cls).")
    labels = [lab for ix in indexes for lab in ix.labels]
    names = list(classes) if classes else _info_classes(shards)
    targets, names = labels_to_targets(labels, names, f"The {what} shards", report)
    reasons = [r for ix in indexes for r in ix.bad]
    bad = [(source.sample_name(i), r) for i, r in enumerate(reasons) if r]
    if bad:
        if on_bad_file == "raise":
            raise DataError(f"Bad image in {bad[0][0]!r}: {bad[0][1]}. Remove it from the shard, or pass "
                            "on_bad_file='skip' to leave bad samples out (they are listed in the result).")
        report.bad_files += bad
        shown = "; ".join(f"{p} ({r})" for p, r in bad[:5])
        report.warn(f"Left out {len(bad)} bad image(s) in the shards: {shown}{' ...' if len(bad) > 5 else ''}")
    ok = (targets >= 0) & (np.array([not r for r in reasons], dtype=bool) if reasons else np.ones(0, dtype=bool))
    keep = np.flatnonzero(ok).astype(np.int64)
    if len(keep) == 0:
        raise DataError(f"No usable sample in the {what} shards {list(shards)[:3]}: every one was bad or unlabelled.")
    return EncodedImageDataset(source, targets, names, indices=keep, min_size=min_size, on_bad_file=on_bad_file,
                               report=report)
