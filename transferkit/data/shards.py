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
check each image as image files are checked; a tar cut short, without its end-of-archive
block, is a bad shard). That *member index* is cached under
``cache_dir/shard-index/`` keyed by the shard's path, size, modification and change times
(written atomically; without ``cache_dir`` it is rebuilt each run), so a run starts with one
small read per shard. A dataset's identity for cache keys (`ShardSource.fingerprint`) covers
the shards' paths, sizes, modification and change times: its cost grows with the number of
shards.

Shards are given as a brace pattern (``train-{000000..000127}.tar``, ``{a,b}`` lists too),
a folder of ``.tar`` files, one ``.tar`` file, or a list of them.

Remote shards (``pipe:`` commands, ``http(s)://`` and other fsspec URLs, as a brace pattern or
a list; a remote folder cannot be listed) are streamed into the bounded local shard cache of
`transferkit.data.remote` (``cache_dir/shards/``, else a temporary folder; at most
``TRANSFERKIT_SHARD_CACHE`` bytes) and read there by position like local shards. Their
member index is built from the first fetch and cached under ``cache_dir/shard-index/``
keyed by the URL and its validators (ETag, Content-Length, Last-Modified), so a later run
fetches nothing until samples are read; their identity for cache keys covers the URLs,
validators and sizes. When the shard cache cannot hold them all, `ShardSource.sample_groups`
asks the sampler for a shard-by-shard order (see `transferkit.data.sampling.EpochSampler`),
so that each shard is fetched about once per epoch.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import io
import itertools
import json
import os
import re
import tarfile
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transferkit._io import atomic_write, entry_not_kept, file_digest, packed_kind
from transferkit._text import fs_bytes, hide_url, plural
from transferkit.data.checks import (IMAGE_EXTENSIONS, ON_BAD_FILE, SCAN_RULES, SCANS, DataReport, check_image_stream,
                                     holds_class_folders, leave_out_bad)
from transferkit.data.encoded import (EncodedImageDataset, given_by_index, labels_by_name, labels_by_own_names,
                                      labels_to_targets)
from transferkit.data.fingerprint import from_common_folder
from transferkit.data.folders import SPLIT_NAMES
from transferkit.data.remote import (
    ENV_BUDGET,
    ENV_OFFLINE,
    Held,
    ShardCache,
    ShardFetchError,
    fetch_small,
    is_url,
    offline,
    offline_hint,
    remember,
    remembered,
    remote_validators,
    shard_identity,
    stop_fetches_on_interrupt,
)
from transferkit.errors import DataError, check_choice

# 4: a shard is checked to its end (data after its end); 5: keys repeated in a row, 1 MiB padding; 6: the image
# extensions of a folder (jpe, jfif, avif where Pillow reads it); 7: samples of several images, none plain; a
# class index written as a whole float (1.0); 8: keys that start with '_' are samples, the first keys without an
# image or a label are kept
INDEX_FORMAT = 8
IMAGE_EXTS = tuple(e[1:] for e in IMAGE_EXTENSIONS)  # a sample's image member: the extensions a folder scan reads
LABEL_EXTS = ("cls", "txt", "json")
# zeros a tar ends with: its two end-of-archive blocks and the record padding, GNU tar -b 2048's at most (the
# second block may start a record of its own: a record and a block)
PADDING_MOST = (1 << 20) + 1024
READ_TO_CONFIRM = 1000  # samples of equal signatures read to confirm they are copies (local shards)
MAX_OPEN_REMOTE = 2  # remote shards one process keeps open (and so out of the cache's eviction)
INDEX_THREADS = 8  # remote shards looked up or fetched at once while the indexes are made
_KEY_EXT = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")  # WebDataset's base_plus_ext
# a shell's sequence expressions: {x..y} or {x..y..step}, of whole numbers or of single letters
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?|([A-Za-z])\.\.([A-Za-z])(?:\.\.(-?\d+))?")


def _sequence(body: str, *, count_only: bool = False) -> list[str] | int | None:
    """The names of the sequence expression ``{body}`` as bash makes them (or their count,
    without making them), or None when ``body`` is none: from x to y in either direction by
    the step's size (1 where it is 0 or absent), numbers zero-padded to the wider bound where
    one has a leading zero (``{8..010}``: ``008 .. 010``), letters by their character codes.

    Example:
        >>> _sequence("5..1..2"), _sequence("a..e..2"), _sequence("-1..1"), _sequence("1..10", count_only=True)
        (['5', '3', '1'], ['a', 'c', 'e'], ['-1', '0', '1'], 10)
    """
    m = _RANGE.fullmatch(body)
    if m is None:
        return None
    numbers = m.group(1) is not None
    x, y, step = (m.group(1), m.group(2), m.group(3)) if numbers else (m.group(4), m.group(5), m.group(6))
    lo, hi = (int(x), int(y)) if numbers else (ord(x), ord(y))
    size = abs(int(step)) if step and int(step) else 1
    n = abs(hi - lo) // size + 1
    if count_only:
        return n
    values = range(lo, hi + 1, size) if lo <= hi else range(lo, hi - 1, -size)
    if not numbers:
        return [chr(v) for v in values]
    padded = any(b.lstrip("-").startswith("0") and len(b.lstrip("-")) > 1 for b in (x, y))
    width = max(len(x), len(y)) if padded else 0
    return [f"{v:0{width}d}" for v in values]


def named_files(spec: str, what: str) -> list[str]:
    """The files a name, brace pattern or (local) glob ``spec`` names; a DataError when some
    do not exist (remote shards, ``pipe:`` commands and URLs, are checked when they are read;
    a remote glob cannot be listed)."""
    paths = expand_braces(spec)
    globbed = [p for p in paths if glob.has_magic(_url_path(p)) and not os.path.exists(p)]  # "sh[v2]/a.tar": a name
    if globbed and is_url(spec):
        raise DataError(f"{spec!r}: a remote glob cannot be listed; name the {what} with a brace pattern (e.g. "
                        "https://host/data/train-{000000..000127}.tar) or a list.")
    if globbed:
        paths = [m for p in paths for m in (sorted(glob.glob(p)) if p in globbed else [p])]
        if not paths:
            raise DataError(f"The pattern {spec!r} matches no file.")
    if is_url(spec):
        return paths
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{len(missing)} of the {len(paths)} {what} named by {spec!r} do not exist, e.g. "
                        f"{missing[:3]}.")
    return paths


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{000..003}`` ranges and ``{a,b}`` lists as bash does: outer groups first
    (``{train-{0..1},extra}``), a range zero-padded where a bound has a leading zero (to the
    wider bound: ``{1..010}`` is ``001`` to ``010``), with a step (``{0..8..2}``), counting down
    (``{3..1}``) or of letters (``{a..c}``: `_sequence`), a group without a comma or a range kept.

    Example:
        >>> expand_braces("s-{00..02}.tar")
        ['s-00.tar', 's-01.tar', 's-02.tar']
        >>> expand_braces("{train,val}-{0..1}.tar")
        ['train-0.tar', 'train-1.tar', 'val-0.tar', 'val-1.tar']
        >>> expand_braces("{train-{0..1},extra}.tar")
        ['train-0.tar', 'train-1.tar', 'extra.tar']
    """
    count = _count_names(pattern)
    if count > MAX_PATTERN_NAMES:
        raise DataError(f"Shard pattern {pattern!r} stands for {count:,} names, more than the {MAX_PATTERN_NAMES:,} "
                        "a pattern may name: is a bound mistyped? Split the data into several patterns, or list "
                        "the shards in a folder.")
    return _expand(pattern)


def _expand(pattern: str) -> list[str]:
    """`expand_braces` of a pattern already counted (its parts are not counted again)."""
    group = _outer_group(pattern)
    if group is None:
        return [pattern]
    head, body, tail = pattern[:group[0]], pattern[group[0] + 1:group[1]], pattern[group[1] + 1:]
    sequence = _sequence(body)
    if isinstance(sequence, list):
        parts = sequence
    else:
        alternatives = _split_outer(body)
        if len(alternatives) == 1:  # no list: the braces stay, their inside is expanded
            parts = ["{" + b + "}" for b in _expand(body)]
        else:
            parts = [x for a in alternatives for x in _expand(a)]
    tails = _expand(tail)
    return [head + p + t for p in parts for t in tails]


MAX_PATTERN_NAMES = 1_000_000
"""The most shard names a brace pattern may stand for: a mistyped bound (``{0..99999999999}``)
took all the machine's memory before any shard was looked at."""


def _count_names(pattern: str, whole: str = "") -> int:
    """How many names `expand_braces` makes of ``pattern`` (a part of ``whole``), counted without
    making them."""
    group = _outer_group(pattern)
    if group is None:
        return 1
    body, tail = pattern[group[0] + 1:group[1]], pattern[group[1] + 1:]
    whole = whole or pattern
    n = _sequence(body, count_only=True)
    if not isinstance(n, int):
        alternatives = _split_outer(body)
        n = _count_names(body, whole) if len(alternatives) == 1 else sum(_count_names(a, whole) for a in alternatives)
    return n * _count_names(tail, whole)


def _outer_group(pattern: str) -> tuple[int, int] | None:
    """``(start, end)`` of the first ``{...}`` whose braces balance (a ``{`` that none closes is
    text, as in a shell: ``a{b{c,d}`` is ``a{bc a{bd``), or None."""
    for start in (i for i, c in enumerate(pattern) if c == "{"):
        depth = 0
        for i in range(start, len(pattern)):
            depth += (pattern[i] == "{") - (pattern[i] == "}")
            if depth == 0:
                return start, i
    return None


def _split_outer(body: str) -> list[str]:
    """``body`` split at the commas outside inner braces."""
    parts, depth, last = [], 0, 0
    for i, c in enumerate(body):
        depth += (c == "{") - (c == "}" and depth > 0)
        if c == "," and depth == 0:
            parts.append(body[last:i])
            last = i + 1
    return parts + [body[last:]]


def is_remote(spec: Any) -> bool:
    """Whether ``spec`` names remote data: a ``pipe:`` command or a URL (``scheme://...``)."""
    return is_url(spec)


def _check_remote(spec: str) -> None:
    if spec.lower().startswith(("http://", "https://")) and "@" in urllib.parse.urlsplit(spec).netloc:
        raise DataError(f"{spec!r}: a user name or password in an HTTP(S) shard URL is not sent (Python's HTTP "
                        "client reads it as part of the host); give a signed URL, or a command that sends it "
                        "(pipe:curl with its -u option).")
    if spec.endswith("/") and not spec.startswith("pipe:"):
        raise DataError(f"{spec!r} is a remote folder, which cannot be listed: name its shards with a brace pattern "
                        "(e.g. https://host/data/train-{000000..000127}.tar) or a list of URLs.")


def _url_path(p: str) -> str:
    """The path of an HTTP(S) URL without its query and fragment (a signed URL's
    ``?token=...``); anything else as it is (``#`` is part of an object store's key)."""
    return urllib.parse.urlsplit(p).path if p.lower().startswith(("http://", "https://")) else p


def _url_folder(p: str) -> str:
    """The folder of a shard: of a URL's path (its query dropped), or of a local path."""
    if is_url(p) and p.lower().startswith(("http://", "https://")):
        parts = urllib.parse.urlsplit(p)
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rsplit("/", 1)[0], "", ""))
    return p.rsplit("/", 1)[0] if is_url(p) else str(Path(p).parent)


def _tar_name(p: str) -> bool:
    return p.lower().endswith(".tar") or _url_path(p).lower().endswith(".tar")


# why a shard must be an uncompressed tar, as every message about a compressed one says it
_UNCOMPRESSED = ("shards are read in place with random access, which needs uncompressed tar files (JPEG/PNG members "
                 "are already compressed)")


def _compressed_tar(p: str) -> bool:
    return _url_path(p).lower().endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst"))


def shard_list(data: Any) -> list[str] | None:
    """The local tar shards that ``data`` names, or None when it does not name tar shards.

    ``data``: a brace pattern or path ending in ``.tar``, a folder holding ``.tar`` files
    and no sub-folder of images (one with class sub-folders is a folder of images; other
    sub-folders, e.g. a ``cache_dir``, are not data), or a list of ``.tar`` paths or patterns;
    ``pipe:`` commands and URLs name remote shards. Raises [`DataError`][transferkit.DataError] for compressed
    shards, missing local files and remote folders.
    """
    if isinstance(data, (list, tuple)):
        if not data or not all(isinstance(d, (str, os.PathLike)) for d in data):
            return None
        items = [str(d) for d in data]
        shardlike = [_tar_name(d) or _compressed_tar(d) or is_remote(d) for d in items]
        if not all(shardlike):
            if any(shardlike):
                other = next(d for d, ok in zip(items, shardlike) if not ok)
                raise DataError(f"A list of shards names .tar files (or remote shards); {other!r} is not one. Leave "
                                "it out of the list.")
            return None
        out: list[str] = []
        for d in items:
            out += shard_list(d) or []
        return out
    if not isinstance(data, (str, os.PathLike)):
        return None
    spec = str(data)
    if is_remote(spec):
        _check_remote(spec)
        if spec.startswith("pipe:") and not _compressed_tar(spec):
            return expand_braces(spec)
    if _compressed_tar(spec):
        raise DataError(f"{spec!r} is a compressed tar: {_UNCOMPRESSED}. Decompress them (e.g. gunzip) and pass the "
                        ".tar files.")
    if _tar_name(spec):
        return named_files(spec, "shard(s)")
    if os.path.isdir(spec):
        entries = list(Path(spec).iterdir())
        tars = sorted(str(p) for p in entries if p.is_file() and _tar_name(p.name) and not p.name.startswith("."))
        subs = [p for p in entries if p.is_dir() and not p.name.startswith((".", "_"))]
        if subs and (not tars or holds_class_folders(subs)):
            return None  # class sub-folders: an image folder (a stray .tar in it is not data)
        packed = sorted(p.name for p in entries if p.is_file() and _compressed_tar(p.name) and not p.name.startswith("."))
        if packed:  # refused even beside plain shards: leaving them out would change what trains
            raise DataError(f"{spec!r} holds compressed tar files ({', '.join(packed[:3])}): {_UNCOMPRESSED}. "
                            "Decompress them (e.g. gunzip) in place.")
        if tars:
            return tars
    return None


# the words that name a split in a shard's file name, as a word of its own (imagenet-val-0001.tar, not
# interval-0.tar); "trainval" (train and validation merged, as VOC names it) is training data
_SPLIT_WORDS = {"train": ("trainval", "training", "train"), "val": ("validation", "valid", "val", "dev"),
                "test": ("test",)}
_SPLIT_WORD = re.compile(r"(?<![a-z])(" + "|".join(w for ws in _SPLIT_WORDS.values() for w in ws) + r")(?![a-z])")


def shard_split(name: str) -> str | None:
    """The split a shard's file name names (``"train"``, ``"val"`` or ``"test"``): the first
    split word in it that stands as a word of its own; None for none.

    Example:
        >>> [shard_split(n) for n in ("train-0.tar", "imagenet-val-0001.tar", "trainval.tar", "values-0.tar")]
        ['train', 'val', 'train', None]
    """
    m = _SPLIT_WORD.search(os.path.basename(name).lower())
    return None if m is None else next(k for k, words in _SPLIT_WORDS.items() if m.group(1) in words)


def file_names(paths: Sequence[str]) -> str:
    """The names of the first five of ``paths``, for a message: ``a.tar, b.tar ...``."""
    return ", ".join(os.path.basename(p) for p in paths[:5]) + (" ..." if len(paths) > 5 else "")


def split_shard_folder(folder: str | Path, report: DataReport | None = None) -> tuple[list[str], list[str]] | None:
    """``(train shards, validation shards)`` of a folder whose ``.tar`` file names name their
    split (`shard_split`): train and validation, else train and test; ``([], val)`` for a
    folder of validation shards without training ones; else None (the folder's shards are
    all training data). ``report`` is told which shards of the folder are not used, and
    which shards named as held-out data are trained on."""
    shards = shard_list(folder) if os.path.isdir(str(folder)) else None
    if not shards:
        return None
    by = {k: [s for s in shards if shard_split(s) == k] for k in (*_SPLIT_WORDS, None)}
    train, held = by["train"], by["val"] or by["test"]
    if by["val"] and not train:
        return [], by["val"]
    if train and held:
        unused = (by["test"] if by["val"] else []) + by[None]
        if unused and report is not None:
            report.warn(f"{str(folder)!r} holds training and {'validation' if by['val'] else 'test'} shards; its "
                        f"other shards are not used: {file_names(unused)}.")
        return train, held
    if train and by[None] and report is not None:
        report.warn(f"{str(folder)!r} holds shards named as training data ({file_names(train)}) and shards named "
                    f"as no split ({file_names(by[None])}): all of them are trained on, as no shard is named as "
                    "validation data. Name the held-out shards val-*.tar (or dev-*, test-*) to validate on them, or "
                    "pass the training shards alone (a pattern such as train-*.tar).")
    if by["test"] and report is not None:
        report.warn(f"{str(folder)!r}: the shards named as test data ({file_names(by['test'])}) are trained on with "
                    f"the others, as no shard is named as training data. Name the training shards train-*.tar to hold "
                    "them out, or pass them as val_data.")
    return None


def warn_held_out_listed(data: Any, report: DataReport) -> None:
    """Warn when training shards named by a pattern or a list (not a folder, which splits
    itself: `split_shard_folder`) hold shards named as training data and shards named as
    validation or test data: every one of them is trained on."""
    if isinstance(data, (str, os.PathLike)) and os.path.isdir(str(data)):
        return
    try:
        shards = shard_list(data) or []
    except DataError:  # a missing or refused shard is reported when the data are opened
        return
    held = [os.path.basename(s) for s in shards if shard_split(s) in ("val", "test")]
    if held and any(shard_split(s) == "train" for s in shards):
        report.warn(f"The training shards hold {plural(len(held), 'shard')} named as held-out data "
                    f"({', '.join(held[:5])}{' ...' if len(held) > 5 else ''}), and they are trained on. Name the "
                    "training shards only (e.g. train-*.tar), or pass the folder that holds them: it trains on its "
                    "train shards and validates on the others.")


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
    nbytes: int = 0  # the shard's size
    validators: dict[str, str] = field(default_factory=dict)  # a remote shard's ETag, Content-Length, ...
    scattered: list[str] = field(default_factory=list)  # keys whose members are not adjacent (read as several)
    repeated: list[str] = field(default_factory=list)  # keys of several samples in a row (an image met again)
    doubled: list[str] = field(default_factory=list)  # "key.ext" of another member met twice in a sample (first kept)
    several: list[str] = field(default_factory=list)  # "key: a.png, b.jpg" of samples of several images, none plain
    unusable: list[str] = field(default_factory=list)  # "key (cls)": the first keys without an image or a label
    digest: str = ""  # a remote shard's content (`file_digest`) when indexed: a copy fetched again is compared

    def to_json(self) -> str:
        return json.dumps({"format": INDEX_FORMAT, "keys": self.keys, "offsets": self.offsets, "sizes": self.sizes,
                           "labels": self.labels, "bad": self.bad, "dims": self.dims, "no_image": self.no_image,
                           "no_label": self.no_label, "nbytes": self.nbytes, "validators": self.validators,
                           "scattered": self.scattered, "repeated": self.repeated, "doubled": self.doubled,
                           "several": self.several, "unusable": self.unusable, "digest": self.digest},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ShardIndex:
        d = json.loads(text)
        if d.get("format") != INDEX_FORMAT:
            raise ValueError(f"index format {d.get('format')}, expected {INDEX_FORMAT}")
        return cls(d["keys"], d["offsets"], d["sizes"], d["labels"], d["bad"], d["dims"], d["no_image"],
                   d["no_label"], d["nbytes"], d["validators"], d["scattered"], d["repeated"], d["doubled"],
                   d["several"], d["unusable"], d.get("digest", ""))


def _in_window(pool: Any, fn: Callable[[str], Any], items: Sequence[str], window: int) -> list[Any]:
    """``[fn(x) for x in items]`` on ``pool``, at most ``window`` queued at once (a new one as each
    ends): after a failure no more are queued, and the failure of the first item in order is
    raised once those queued end (a pattern of a million names all queued at once took 3,489
    requests and 37 s to say that its third shard was missing)."""
    from concurrent.futures import FIRST_COMPLETED, wait

    found: list[Any] = [None] * len(items)
    failed: dict[int, BaseException] = {}
    pending: dict[Any, int] = {}
    queue = iter(enumerate(items))
    for i, x in itertools.islice(queue, window):
        pending[pool.submit(fn, x)] = i
    while pending:
        done, _ = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            i = pending.pop(future)
            if future.exception() is not None:
                failed[i] = future.exception()  # type: ignore[assignment]
            else:
                found[i] = future.result()
            for j, x in itertools.islice(queue, 0 if failed else 1):
                pending[pool.submit(fn, x)] = j
    if failed:
        raise failed[min(failed)]
    return found


def same_content(url: str, digest: str, path: str, fetched: str) -> None:
    """Refuse a copy of the shard ``url`` fetched again (at ``path``, its bytes' digest
    ``fetched``) whose bytes are not those it was indexed from (``digest``; "" for an index that
    holds none): a server without ETags keeps a shard's length and date when it changes in
    place, and its stored index (the labels) would be read with other bytes."""
    if digest and fetched != digest:
        given = "the command gives no length or date" if url.startswith("pipe:") else \
            "the server gives the same length and date for it"
        raise ShardFetchError(f"The shard {hide_url(url)!r} changed since it was indexed: the copy fetched again "
                              f"holds other bytes, though {given}. Remove its index from cache_dir/shard-index (and "
                              "the feature stores made from it, or the whole cache_dir) and run again.")


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
    text = data.decode("utf-8-sig", errors="replace").strip()  # -sig: a byte-order mark is not part of the label
    if ext == "json":
        try:
            obj = json.loads(text)
        except ValueError:
            return None
        lab = obj.get("label", obj.get("cls")) if isinstance(obj, dict) else obj
        if isinstance(lab, float) and lab.is_integer():  # 1.0, as a float column writes a class index
            lab = int(lab)
        if isinstance(lab, bool) or not isinstance(lab, (int, str)):
            return None
        return lab
    if ext == "cls" and re.fullmatch(r"[+-]?\d+(\.0*)?", text):
        return int(float(text))
    return text or None


# the compressed formats a tar is often packed in, and their decompressors
_DECOMPRESS = {"gzip": "gunzip", "bzip2": "bunzip2", "xz": "unxz", "zstd": "unzstd"}


def _compression(path: str) -> str | None:
    """The compression a file's first bytes show (``"gzip"``, ...), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError:
        return None
    kind = packed_kind(head)
    return kind if kind in _DECOMPRESS else None


def _check_end(f: Any, at: int, total: int) -> None:
    """Raise a TarError unless the walk of a tar's headers, stopped at byte ``at``, met the
    end-of-archive block and nothing but zero padding after it: a file cut short, a damaged
    header, or data after the end (a second archive appended, ``cat a.tar b.tar``, or a zeroed
    region in the middle) would otherwise leave the samples after that point out unseen."""
    f.seek(at)  # where the walk stopped
    end = f.read(512)
    if len(end) < 512:
        raise tarfile.TarError(f"it ends at byte {total} without tar's end-of-archive block: the shard is truncated")
    if end.count(0) != 512:
        raise tarfile.TarError(f"the block at byte {at} is not a valid tar header: the shard is damaged there (its "
                               "members from there on cannot be read)")
    pos = at + 512
    while chunk := f.read(1 << 20):
        data = len(chunk) - len(chunk.lstrip(b"\0"))
        if data < len(chunk):
            raise tarfile.TarError(f"data follow tar's end-of-archive block at byte {at} (at byte {pos + data} of "
                                   f"{total}): a second archive appended to it (cat a.tar b.tar), or a zeroed region "
                                   "inside it; the members after that point would not be read. Rewrite the shard as "
                                   "one archive (e.g. tar -cf, or GNU tar -A to concatenate)")
        pos += len(chunk)
    if total - at > PADDING_MOST:
        raise tarfile.TarError(f"{total - at} bytes of zeros follow its last member (from byte {at}), more than tar's "
                               f"padding ({PADDING_MOST} bytes at most): a download or copy that stopped early into a "
                               "file of its full size leaves this; the members that belong there are missing. Fetch "
                               "the shard again")


def _metadata_member(key: str, ext: str) -> bool:
    """A member that holds no sample: WebDataset's metadata (``__name__``) or a class list
    (``_info.json``) packed into a shard. A hidden file (``.name``, macOS's ``._name``) has no key
    (`_KEY_EXT`); other keys that start with ``_`` (``_x7Ab``) are samples, as WebDataset reads them."""
    base = key.rsplit("/", 1)[-1]
    return (len(base) > 4 and base.startswith("__") and base.endswith("__")) or (base == "_info" and ext == "json")


def build_index(path: str, *, scan: str = "quick", name: str | None = None) -> ShardIndex:
    """Read one shard's member headers (and label members) and list its samples; with
    ``scan`` ``"quick"`` or ``"full"``, check each image as image files are checked.
    ``name``: what messages call the shard (default ``path``)."""
    total = os.path.getsize(path)
    index = ShardIndex(nbytes=total)
    if total == 0:
        return index
    cur: dict[str, Any] = {}
    done: set[str] = set()  # keys whose members ended: one met again is not adjacent (WebDataset reads two samples)
    linked: dict[str, list[str]] = {}  # key -> extensions of its members that are links (no data in the shard)

    def flush() -> None:
        if not cur:
            return
        if cur["key"] in done and len(index.scattered) < 1000:
            index.scattered.append(cur["key"])
        done.add(cur["key"])
        members = cur["members"]  # an extension's last part names its kind: "input.jpg" is an image
        img = next((members[e] for e in IMAGE_EXTS if e in members), None)
        images: list[str] = []
        if img is None:  # fields named like images ("input.jpg"): the first; several are said
            images = [e for e in members if e.rsplit(".", 1)[-1] in IMAGE_EXTS]
            img = members[images[0]] if images else None
        label = next((cur["labels"][e] for e in LABEL_EXTS if e in cur["labels"]), None)
        if img is None or label is None:
            if img is None:
                index.no_image += 1
            else:
                index.no_label += 1
            if len(index.unusable) < 3:  # named in the warning: what the key holds, and why where it shows
                why = ""
                if img is None and linked.get(cur["key"]):
                    why = (f": its {', '.join(linked[cur['key']])} is a link, which a shard stores without data (make "
                           "the shard with tar -h --hard-dereference)")
                elif label is None and any("." in e and e.rsplit(".", 1)[-1] in LABEL_EXTS for e in members):
                    why = (": a dot in the member names before the extension ends the key there, so its label is "
                           "read as a field of another name (rename the members without dots in their keys)")
                elif label is None and any(e in LABEL_EXTS for e in members):  # there, but no index or name in it
                    why = (": its label member holds no class index or name (a json object's \"label\" is one, "
                           "a cls holds a whole number, a txt a name; true/false and lists are neither)")
                held = ", ".join(list(members)[:4]) + (", ..." if len(members) > 4 else "")
                index.unusable.append(f"{cur['key']} ({held or 'no member'}{why})")
        else:
            if len(images) > 1 and len(index.several) < 1000:  # a sample read (one left out is counted so)
                index.several.append(f"{cur['key']}: {', '.join(images)}")
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
                    mm = _KEY_EXT.match(m.name) if m.issym() or m.islnk() else None
                    if mm is not None and len(linked) < 1000:
                        linked.setdefault(mm.group(1), []).append(mm.group(2))
                    continue
                mm = _KEY_EXT.match(m.name)
                if mm is None or _metadata_member(mm.group(1), mm.group(2)):
                    continue
                key, ext = mm.group(1), mm.group(2).lower()
                if m.offset_data + m.size > total:
                    raise tarfile.TarError(f"the member {m.name!r} ends at byte {m.offset_data + m.size} of a "
                                           f"{total}-byte file: the shard is truncated")
                # a label is a plain cls/txt/json member: key.caption.txt is another field (WebDataset's), not it
                label_bytes = tar.extractfile(m).read() if ext in LABEL_EXTS and m.size < 1 << 20 else None
                pending.append((key, ext, m.offset_data, m.size, label_bytes))
            _check_end(f, tar.offset, total)
            # the checks seek in the file: run them after the headers were walked
            for key, ext, off, size, label_bytes in pending:
                twice = bool(cur) and cur["key"] == key and ext in cur["members"]
                again = twice and ext.rsplit(".", 1)[-1] in IMAGE_EXTS  # an image again: the key's next sample
                if twice and not again and len(index.doubled) < 1000:  # a label or other member again: the first
                    index.doubled.append(f"{key}.{ext}")
                if cur and (cur["key"] != key or again):
                    flush()
                    cur = {}
                if again:
                    done.discard(key)  # in a row: not a scattered sample
                    if len(index.repeated) < 1000:
                        index.repeated.append(key)
                if not cur:
                    cur = {"key": key, "members": {}, "labels": {}}
                cur["members"].setdefault(ext, (off, size))
                if label_bytes is not None:
                    lab = _parse_label(ext, label_bytes)
                    if lab is not None:
                        cur["labels"].setdefault(ext, lab)
            flush()
    except tarfile.TarError as exc:
        packed = _compression(path)
        if packed:
            raise DataError(f"The shard {name or path!r} is {packed}-compressed under a .tar name: {_UNCOMPRESSED}. "
                            f"Decompress it (e.g. `{_DECOMPRESS[packed]} < {os.path.basename(path)} > plain.tar`) and "
                            "pass the .tar file.") from exc
        cut = " (the file ends inside a member: it is truncated, a download or copy cut short)" \
            if "unexpected end of data" in str(exc) else ""
        raise DataError(f"Cannot read the shard {name or path!r} as a tar file: {exc}{cut}.") from exc
    return index


def _file_size(path: str) -> int | None:
    """The size of a local file, None where there is none (a URL, a pipe)."""
    try:
        return os.path.getsize(path)
    except (OSError, ValueError):
        return None


def _index_path(cache_dir: str | Path, path: str, scan: str, validators: dict[str, str] | None = None) -> Path:
    if validators is None:  # a local shard: its path, size and times (as `ShardSource` identifies it)
        st = os.stat(path)
        ident = f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
    else:  # a remote shard: its URL (`shard_identity`) and what its server says identifies its content
        ident = f"{shard_identity(path, validators)}\0{json.dumps(validators, sort_keys=True)}"
    ident = f"{INDEX_FORMAT}\0{SCAN_RULES}\0{ident}\0{scan}"  # a scan by other rules is made again
    return Path(cache_dir) / "shard-index" / (hashlib.blake2b(ident.encode(), digest_size=16).hexdigest() + ".json")


def _cached_index(p: Path) -> ShardIndex | None:
    try:
        return ShardIndex.from_json(p.read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _save_index(p: Path, index: ShardIndex, cache_dir: str | Path, shard: str) -> None:
    """Keep the member index of ``shard`` in ``cache_dir``; one that cannot be kept is built again by the next run
    (see `transferkit._io.entry_not_kept`)."""
    try:
        atomic_write(p, lambda tmp: Path(tmp).write_text(index.to_json()), what="shard index")
    except OSError as exc:
        entry_not_kept(exc, cache_dir=cache_dir, what=f"member index of {shard!r}",
                       later="the next run indexes the shard again")


def shard_index(path: str, *, scan: str = "quick", cache_dir: str | Path | None = None,
                shard_cache: ShardCache | None = None) -> tuple[ShardIndex, bool]:
    """The member index of ``path`` and whether it came from ``cache_dir`` (see `build_index`).

    A remote shard (a URL or ``pipe:`` command) is looked up by its URL and validators
    (`transferkit.data.remote.remote_validators`: no fetch); when its index is not cached it
    is fetched into ``shard_cache`` (default: the one of ``cache_dir``) and indexed there."""
    if is_url(path):
        return _remote_index(path, scan=scan, cache_dir=cache_dir,
                             shard_cache=shard_cache or ShardCache.for_cache_dir(cache_dir))
    if cache_dir is not None:
        p = _index_path(cache_dir, path, scan)
        index = _cached_index(p)
        if index is not None:
            return index, True
    index = build_index(path, scan=scan)
    if cache_dir is not None:
        _save_index(p, index, cache_dir, path)
    return index, False


def _remote_index(url: str, *, scan: str, cache_dir: str | Path | None,
                  shard_cache: ShardCache) -> tuple[ShardIndex, bool]:
    if offline():  # as the last look-up with this cache_dir found it
        validators = remembered(cache_dir, url, "record")["validators"]
        index = _cached_index(_index_path(cache_dir, url, scan, validators))  # type: ignore[arg-type]
        if index is None:
            raise ShardFetchError(f"{ENV_OFFLINE}=1, and cache_dir {str(cache_dir)!r} holds no member index of "
                                  f"{hide_url(url)!r} for scan={scan!r}: run once online with this cache_dir and "
                                  f"scan, or unset {ENV_OFFLINE}.")
        return index, True
    try:
        validators = remote_validators(url)
    except ShardFetchError as exc:  # an offline run would find its index and copy: said
        raise offline_hint(exc, cache_dir, url, lambda v: _cached_index(_index_path(cache_dir, url, scan, v))
                           is not None and shard_cache.holds(url, v)) from None
    remember(cache_dir, url, {"validators": validators})
    if cache_dir is not None:
        index = _cached_index(_index_path(cache_dir, url, scan, validators))
        if index is not None:
            return index, True
    built: list[ShardIndex] = []
    known = validators.get("content-length", validators.get("size", ""))
    held = shard_cache.fetch(url, validators=validators, size=int(known) if known.isdecimal() else None,
                             check=lambda tmp, _: built.append(build_index(tmp, scan=scan, name=url)))
    try:
        index = built[0] if built else build_index(str(held.path), scan=scan, name=url)
        # what a copy fetched again must hold (validators may not tell); taken as it was fetched
        index.digest = held.digest or file_digest(held.path)
    finally:
        held.release()
    index.validators = validators
    if cache_dir is not None:
        _save_index(_index_path(cache_dir, url, scan, validators), index, cache_dir, url)
    return index, False


# -- the source ------------------------------------------------------------------------
class ShardSource:
    """The samples of a list of tar shards (see the module docstring), readable by position:
    ``read(i)`` is one seek and one read in sample ``i``'s shard. A remote shard is read from
    its copy in ``shard_cache``, fetched when absent; a process keeps at most
    `MAX_OPEN_REMOTE` remote shards open (and out of the cache's eviction), and at most
    `max_open_local` local ones (the least recently read is closed first)."""

    def __init__(self, paths: Sequence[str], indexes: Sequence[ShardIndex],
                 shard_cache: ShardCache | None = None) -> None:
        self.paths = [str(p) for p in paths]
        self.name = self.paths[0] if len(self.paths) == 1 else f"{self.paths[0]} (+{len(self.paths) - 1} shards)"
        counts = np.array([len(ix.keys) for ix in indexes], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.shard_of = np.repeat(np.arange(len(self.paths), dtype=np.int32), counts)
        self.offsets = np.array([o for ix in indexes for o in ix.offsets], dtype=np.int64)
        self.sizes = np.array([s for ix in indexes for s in ix.sizes], dtype=np.int64)
        self.key_bytes = np.array([fs_bytes(k) for ix in indexes for k in ix.keys] or [b""], dtype=np.bytes_)
        self.dims = np.array([d for ix in indexes for d in ix.dims] or np.zeros((0, 2)), dtype=np.int32).reshape(-1, 2)
        self.remote = [is_url(p) for p in self.paths]
        if any(self.remote) and shard_cache is None:
            raise ValueError("remote shards need a shard cache")
        self.shard_cache = shard_cache
        self.nbytes = [ix.nbytes for ix in indexes]
        self.validators = [ix.validators for ix in indexes]
        self.digests = [ix.digest for ix in indexes]
        # per shard: a local one's path from the folder holding them all (a folder moved whole
        # keeps it), bytes and times (a shard rewritten with its size and modification time kept
        # has a new change time, as image files do); a remote one's URL (without its signature:
        # `transferkit.data.remote.shard_identity`), validators and bytes
        local = iter(from_common_folder([p for p, remote in zip(self.paths, self.remote) if not remote]))
        self._ident: list[Any] = []
        for p, ix, remote in zip(self.paths, indexes, self.remote):
            if remote:
                self._ident.append((shard_identity(p, ix.validators), ix.validators, ix.nbytes))
            else:
                st = os.stat(p)
                self._ident.append((next(local), st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        self._files: dict[int, Any] = {}  # open shards, least recently read first
        self._held: dict[int, Held] = {}  # open remote shards, least recently read first
        self._pid = os.getpid()
        self._max_local = max_open_local()  # read once per process (a getrlimit call)
        self._signatures: np.ndarray | None = None  # computed once, see signatures()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_files"], state["_held"] = {}, {}  # open files stay in their process
        state["_signatures"] = None  # the data checks' (main process), not the workers'
        return state

    def _file(self, s: int) -> Any:
        if self._pid != os.getpid():  # a forked worker: the parent's files share its offsets
            for held in self._held.values():
                held.release()  # this process's copy of the descriptor; the parent keeps its own
            self._files, self._held, self._pid, self._max_local = {}, {}, os.getpid(), max_open_local()
        f = self._files.pop(s, None)
        if f is None:
            if self.remote[s]:
                return self._open_remote(s)
            local = [t for t in self._files if not self.remote[t]]
            for t in local[:max(0, len(local) - self._max_local + 1)]:
                self.close_shard(t)
            f = open(self.paths[s], "rb")
        elif self.remote[s]:
            self._held[s] = self._held.pop(s)  # most recently read
        self._files[s] = f  # most recently read
        return f

    def _open_remote(self, s: int) -> Any:
        while len(self._held) >= MAX_OPEN_REMOTE:
            self.close_shard(next(iter(self._held)))
        assert self.shard_cache is not None
        held = self.shard_cache.fetch(self.paths[s], validators=self.validators[s], size=self.nbytes[s] or None,
                                      check=functools.partial(same_content, self.paths[s], self.digests[s]))
        try:
            f = open(held.path, "rb")
        except OSError:
            held.release()
            raise
        self._files[s], self._held[s] = f, held
        return f

    def close_shard(self, s: int) -> None:
        """Close shard ``s`` in this process (a remote one may then be evicted from the cache)."""
        f, held = self._files.pop(s, None), self._held.pop(s, None)
        if f is not None:
            f.close()
        if held is not None:
            held.release()

    def close(self) -> None:
        """Close every shard this process holds open (a later read opens its shard again)."""
        for s in list(self._files):
            self.close_shard(s)

    def __del__(self) -> None:  # shards close with their source, not one by one with a ResourceWarning each
        with contextlib.suppress(Exception):
            self.close()

    def cached_fraction(self) -> float:
        """How much of the remote shards' bytes the shard cache's budget holds (1.0: all of them,
        or no remote shard)."""
        need = sum(n for n, r in zip(self.nbytes, self.remote) if r)
        if not need or self.shard_cache is None:
            return 1.0
        return min(1.0, self.shard_cache.budget / need)

    def read(self, i: int) -> bytes:
        f = self._file(int(self.shard_of[i]))
        f.seek(int(self.offsets[i]))
        data = f.read(int(self.sizes[i]))
        if len(data) != int(self.sizes[i]):
            raise OSError(f"short read ({len(data)} of {int(self.sizes[i])} bytes): the shard changed or was truncated")
        return data

    def key(self, i: int) -> str:
        return self.key_bytes[i].decode("utf-8", "surrogateescape")

    def image_size(self, i: int) -> tuple[int, int]:
        """``(width, height)`` of sample ``i``: from the index (a quick or full scan), else its header."""
        w, h = (int(v) for v in self.dims[i])
        if w and h:
            return w, h
        return image_header_size(io.BytesIO(self.read(i)))

    def sample_name(self, i: int) -> str:
        return f"{self.paths[int(self.shard_of[i])]}:{self.key(i)}"

    def signatures(self) -> np.ndarray:
        """A hash per sample of what identifies it without reading it: its key, the byte size of
        its image and the image's dimensions (where a scan read them). Equal for a sample copied
        into another shard; for two samples under the same key (shards whose keys restart at
        0), equal only if their images also have the same size in bytes and in pixels. A sample
        of a shard whose byte sizes do not tell its images apart (`sizes_tell_apart`) gets a
        signature of its own (its copies are not looked for). Valid within this process
        (Python's salted ``hash``); computed once (the training data's checks and the check
        against the validation data share it)."""
        if self._signatures is not None:
            return self._signatures
        told = np.array([sizes_tell_apart(self.sizes[a:b]) for a, b in zip(self.starts[:-1], self.starts[1:])],
                        dtype=bool)[self.shard_of] if len(self) else np.zeros(0, bool)
        self._signatures = np.array([hash((k, int(s), int(w), int(h))) if ok else hash(("sample", self.paths[0], i))
                                     for i, (k, s, (w, h), ok) in enumerate(zip(self.key_bytes[:len(self)], self.sizes,
                                                                                self.dims, told))], dtype=np.int64)
        return self._signatures

    def shard_sizes(self) -> list[int]:
        return np.diff(self.starts).tolist()

    def sample_groups(self) -> np.ndarray | None:
        """The shard of each sample when the samples should be drawn shard by shard: remote
        shards that the shard cache cannot hold all at once (a global shuffle would fetch
        each shard again for nearly every sample); else None."""
        return self.shard_of if self.cached_fraction() < 1.0 else None

    def fetch_groups(self) -> np.ndarray | None:
        """The shard of each sample when some shards are remote (each fetched whole, the first
        time one of its samples is read), else None."""
        return self.shard_of if any(self.remote) else None

    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps(self._ident).encode())
        return h.hexdigest()

    def listing(self) -> str:
        """What copies of these shards share: each shard's place and size, and each sample's
        key and image size; no file times."""
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps([(i[0], i[2] if remote else i[1]) for i, remote in zip(self._ident, self.remote)]).encode())
        h.update(self.key_bytes.tobytes())
        h.update(self.sizes.tobytes())
        return h.hexdigest()


def max_open_local() -> int:
    """How many local shards a data set keeps open in one process: an eighth of the process's
    open-file limit now (`ulimit -n`: 128 of the usual 1,024), at least 16 and at most 1,024.
    ImageNet's 1,024 or more shards held open at once would pass the usual limit, and closing
    and opening a shard again costs most on a network file system."""
    try:
        import resource  # POSIX only

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 64
    return 1024 if soft == resource.RLIM_INFINITY else max(16, min(1024, soft // 8))


def _size(n: int) -> str:
    return f"{n} bytes" if n < 2**20 else f"{n / 2**20:.1f} MB" if n < 2**30 else f"{n / 2**30:.2f} GB"


def _info_text(folder: str, name: str, cache_dir: str | Path | None = None) -> tuple[str, str | None]:
    """``(where, text)`` of the info file ``name`` beside the shards (text None when absent);
    a remote one as the last look-up with ``cache_dir`` found it when offline (`offline`)."""
    if is_url(folder):
        where = folder.rstrip("/") + "/" + name
        if offline():
            return where, remembered(cache_dir, where, "record of the info file")["text"]
        data = fetch_small(where)
        text = None if data is None else data.decode("utf-8", errors="replace")
        remember(cache_dir, where, {"text": text})
        return where, text
    p = Path(folder) / name
    return str(p), p.read_text() if p.is_file() else None


def _info_classes(path: str, cache_dir: str | Path | None = None) -> list[str] | None:
    """The ``classes`` of the ``_info.json`` (or ``info.json``) beside the shard ``path``, or
    (a local shard in a folder named as a split, ``root/train/``) in the folder above."""
    if path.startswith("pipe:"):
        return None  # a command has no folder to look in
    folder = _url_folder(path)
    places = [(folder, name) for name in ("_info.json", "info.json")]
    if not is_url(path) and Path(folder).name.lower() in SPLIT_NAMES:
        places.append((str(Path(folder).parent), "_info.json"))
    for folder, name in places:
        p, text = _info_text(folder, name, cache_dir)
        if text is not None:
            try:
                info = json.loads(text)
            except ValueError as exc:
                raise DataError(f"{str(p)!r} is not valid JSON ({exc}); fix it, or remove it and pass "
                                "classes=[...].") from exc
            if not isinstance(info, dict):  # a list of names given bare was passed over without a word
                raise DataError(f"{str(p)!r} holds a JSON {type(info).__name__}; it is an object whose 'classes' "
                                'lists the class names in the order of their indices ({"classes": ["cat", "dog"]}).')
            names = info.get("classes")
            if names is not None:
                if not isinstance(names, list) or not names or not all(isinstance(c, str) for c in names):
                    raise DataError(f"{str(p)!r}: 'classes' must be a list of class names, got "
                                    f"{str(json.dumps(names))[:80]}.")
                twice = sorted({c for c in names if names.count(c) > 1})
                if twice:  # an index of either place would be one name: the model's labels could not be told apart
                    raise DataError(f"{str(p)!r}: its 'classes' list names {twice[:5]} more than once; each class "
                                    "is named once, in the order of its index. Fix the list.")
                return names
    return None


def _own_classes(shards: Sequence[str], indexes: Sequence[ShardIndex], what: str,
                 cache_dir: str | Path | None = None) -> tuple[list[str] | None, list]:
    """``(classes, labels)`` of shards that may lie in several folders, each with the class list
    of its own ``_info.json`` (read once per folder; `labels_by_own_names`)."""
    lists: dict[str, list[str] | None] = {}
    parts = []
    for path, ix in zip(shards, indexes):
        folder = _url_folder(path) if not path.startswith("pipe:") else path
        if folder not in lists:
            lists[folder] = _info_classes(path, cache_dir)
        parts.append((folder if lists[folder] is not None else path, lists[folder], ix.labels))
    return labels_by_own_names(parts, f"{what} shards", "an _info.json")


def sizes_tell_apart(sizes: Any) -> bool:
    """Whether the byte sizes of a shard's images tell them apart: no one size is shared by
    more than half of them. Compressed images (JPEG, PNG, WebP) vary in size; uncompressed
    ones (BMP, PPM) of one shape all have the same.

    Example:
        >>> sizes_tell_apart([5120, 4987, 5302, 5120]), sizes_tell_apart([3126, 3126, 3126, 2000])
        (True, False)
    """
    sizes = np.asarray(sizes)
    return len(sizes) > 0 and 2 * int(np.unique(sizes, return_counts=True)[1].max()) <= len(sizes)


def _warn_repeated_shards(shards: Sequence[str], indexes: Sequence[ShardIndex], what: str,
                          report: DataReport) -> bool:
    """Warn when shards hold the same samples (the same keys, file size and image sizes: a
    shard named twice, or copied under another name), whose samples would count twice;
    whether one did."""
    seen: dict[tuple[Any, ...], tuple[str, ShardIndex]] = {}
    named: set[str] = set()
    for p, ix in zip(shards, indexes):
        if not ix.keys:
            continue
        # keys, file size and image sizes: shards whose keys restart at 0 differ in their images, where the
        # images' byte sizes tell them apart; a path named twice is a copy whatever its images
        sig = (ix.keys[0], ix.keys[-1], len(ix.keys), ix.nbytes, hash(tuple(ix.sizes)))
        first = (p, ix) if p in named else seen.get(sig) if sizes_tell_apart(ix.sizes) else None
        if first is not None:
            differ = sum(a != b for a, b in zip(first[1].labels, ix.labels))
            said = ("a shard named twice or copied; its samples count twice" if not differ else
                    f"the same samples, and {differ} of them with another label in each: one input, two answers "
                    "(a copy relabelled?); they count twice")
            report.warn(f"The {what} shards {first[0]!r} and {p!r} hold the same {len(ix.keys)} sample keys "
                        f"({sig[0]} .. {sig[1]}): {said}.")
            return True
        named.add(p)
        seen.setdefault(sig, (p, ix))
    return False


def same_image(a: ShardSource, i: int, b: ShardSource, j: int) -> bool | None:
    """Whether sample ``i`` of ``a`` and sample ``j`` of ``b`` hold the same image bytes; None
    when that is not read: a remote shard (a fetch each), or a shard that cannot be read."""
    if a.remote[int(a.shard_of[i])] or b.remote[int(b.shard_of[j])]:
        return None
    try:
        return a.read(i) == b.read(j)
    except OSError:
        return None


def confirmed_copies(pairs: Any, a: ShardSource, b: ShardSource) -> tuple[int, int, tuple[int, int] | None]:
    """Of candidate copies ``pairs`` (``(i in a, j in b)``: equal signatures), ``(copies whose
    image bytes are equal, candidates not read, the first copy)``: local images are read to
    confirm, at most `READ_TO_CONFIRM` pairs (the others count as not read)."""
    copies, unread, example = 0, 0, None
    for n, (i, j) in enumerate(pairs):
        same = same_image(a, int(i), b, int(j)) if n < READ_TO_CONFIRM else None
        if same is None:
            unread += 1
        elif same:
            copies += 1
            example = example or (int(i), int(j))
    return copies, unread, example


def copies_said(copies: int, unread: int, what: str) -> str:
    """How many copies a warning names: read and equal, and those only alike (not read)."""
    said = f"{plural(copies, what)} with the same image bytes" if copies else ""
    if unread:
        said += (" and " if said else "") + f"{plural(unread, what)} of the same key, image size in bytes and " \
            "dimensions (not read)"
    return said


def _warn_repeated_samples(source: ShardSource, what: str, report: DataReport) -> None:
    """Warn when samples appear more than once across the shards (the same key, image size in
    bytes and dimensions, `ShardSource.signatures`: copied into a second shard; local images
    read to confirm, so that other images under one key of the same size are not named),
    where each copy counts."""
    sig = source.signatures()
    order = np.argsort(sig, kind="stable")
    ordered = sig[order]
    later = np.flatnonzero(ordered[1:] == ordered[:-1]) + 1  # each sample alike with the one before it in order
    if not len(later):
        return
    starts = np.maximum.accumulate(np.where(np.r_[True, ordered[1:] != ordered[:-1]], np.arange(len(sig)), 0))
    pairs = sorted((int(order[starts[k]]), int(order[k])) for k in later)  # (the first of its group, the copy)
    copies, unread, example = confirmed_copies(pairs, source, source)
    if not copies and not unread:
        return
    i, j = example or pairs[0]
    report.warn(f"{copies_said(copies, unread, f'{what} sample')} in the shards repeat another, e.g. "
                f"{source.sample_name(i)!r} and {source.sample_name(j)!r}; each copy counts in training and scoring. "
                "Remove the copies from the shards.")


def open_shards(shards: Sequence[str], *, classes: Sequence[str] | None = None, min_size: int | None = None,
                on_bad_file: str = "skip", scan: str = "quick", cache_dir: str | Path | None = None,
                report: DataReport | None = None, what: str = "training") -> EncodedImageDataset:
    """A map-style dataset over tar shards (see the module docstring). Samples without
    an image or a label, and (with ``scan``) bad images, are left out and reported, or raise
    with ``on_bad_file="raise"``; empty shards are reported."""
    check_choice("on_bad_file", on_bad_file, ON_BAD_FILE)
    check_choice("scan", scan, SCANS)
    report = report if report is not None else DataReport()
    if not shards:
        raise DataError(f"The {what} data name no shard.")
    shard_cache = ShardCache.for_cache_dir(cache_dir) if any(is_url(p) for p in shards) else None

    def one(p: str) -> ShardIndex | DataError:
        try:
            return shard_index(p, scan=scan, cache_dir=cache_dir, shard_cache=shard_cache)[0]
        except ShardFetchError:
            raise  # nothing was read: not a bad shard
        except DataError as exc:
            return exc

    if shard_cache is None:
        found = [one(p) for p in shards]
    else:  # remote: look-ups and fetches wait on the network, several at once
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(min(INDEX_THREADS, len(shards)))
        try:
            with stop_fetches_on_interrupt() as stoppable:  # Ctrl-C: the running fetches stop, not only the wait
                found = _in_window(pool, stoppable(one), shards, 2 * INDEX_THREADS)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # after a failed fetch: start no other
    indexes, left_out = [], set()
    for p, ix in zip(shards, found):
        if isinstance(ix, DataError):
            left_out.add(p)
            if on_bad_file == "raise":
                raise ix
            report.bad_files.append((p, str(ix)))
            report.warn(f"{str(ix).rstrip('.')}; the shard is left out.")  # the error names the shard
            ix = ShardIndex()
        indexes.append(ix)
    source = ShardSource(shards, indexes, shard_cache)
    if source.sample_groups() is not None and shard_cache is not None:
        need = sum(n for n, r in zip(source.nbytes, source.remote) if r)
        # whether training draws its samples shard by shard is the run's decision (a run that decodes the images
        # once or caches their features shuffles globally): `transferkit.decisions` notes it where it does
        report.warn(f"The remote {what} shards ({_size(need)}) do not fit the shard cache "
                    f"({_size(shard_cache.budget)}, {ENV_BUDGET}): they are read shard by shard, each fetched about "
                    "once a pass.")
    empty = [p for p, ix in zip(shards, indexes) if not ix.keys and p not in left_out]  # bad ones said above
    if empty:
        holds = "holds" if len(empty) == 1 else "hold"
        zero = [p for p in empty if _file_size(p) == 0]
        said = f" ({plural(len(zero), 'empty file')}, 0 bytes: a download or copy that failed?)" if zero else ""
        report.warn(f"{len(empty)} of the {plural(len(shards), what + ' shard')} {holds} no sample{said}, e.g. "
                    f"{(zero or empty)[:3]}.")
    if not _warn_repeated_shards(shards, indexes, what, report):
        _warn_repeated_samples(source, what, report)
    scattered = [(p, k) for p, ix in zip(shards, indexes) for k in ix.scattered]
    apart = ""
    if scattered:
        apart = (f" {plural(len(scattered), 'key')} of the shards {'has' if len(scattered) == 1 else 'have'} members "
                 f"apart from each other (e.g. {scattered[0][1]!r} in {scattered[0][0]!r}): a sample's members must be "
                 "adjacent in the tar, as WebDataset reads them; write each sample's files together (sort the "
                 "members by key).")
    for listed, noun, says in (
            ("repeated", "sample", "repeat the key of the sample before (e.g. {key!r} in {shard!r}: its members "
                                   "appear again): each is read as a sample of its own, with the members that follow "
                                   "it (WebDataset refuses such a shard). Give each sample its own key."),
            ("doubled", "member", "appear twice in their sample (e.g. {key!r} in {shard!r}): the first is read, the "
                                  "later one is not. Rewrite the shard with one copy of each member."),
            ("several", "sample", "hold several images, none of them named plainly (e.g. {key!r} in {shard!r}): the "
                                  "first is read. Name the image to train on plainly (000001.jpg beside "
                                  "000001.mask.png), as the one a sample is read by.")):
        found = [(p, k) for p, ix in zip(shards, indexes) for k in getattr(ix, listed)]
        if found:
            report.warn(f"{plural(len(found), noun)} of the {what} shards " + says.format(shard=found[0][0],
                                                                                         key=found[0][1]))
    no_image, no_label = sum(ix.no_image for ix in indexes), sum(ix.no_label for ix in indexes)
    if no_image or no_label:
        n = no_image + no_label
        msg = (f"{plural(n, what + ' sample')} in the shards {'has' if n == 1 else 'have'} "
               f"no image ({no_image}; looked for an image extension: jpg, png, webp, ...) or no label ({no_label}; "
               "looked for cls, txt, json)")
        named = [(p, k) for p, ix in zip(shards, indexes) for k in ix.unusable][:3]
        msg += " (e.g. " + ", ".join(f"{k} in {os.path.basename(str(p))!r}" for p, k in named) + ")" if named else ""
        if on_bad_file == "raise":
            raise DataError(msg + "." + apart)
        report.warn(msg + "; they are left out." + apart)
    elif apart:
        report.warn(apart.strip())
    if len(source) == 0:
        raise DataError(f"The {what} shards {list(shards)[:3]} hold no usable sample (an image and a label per "
                        f"key, e.g. 000001.jpg and 000001.cls).{apart}")
    own, raw = _own_classes(shards, indexes, what, cache_dir)
    labels = labels_by_name(raw, own, classes, what, "shards", report)
    source.labels_by_index = given_by_index(labels)  # read against the classes by place (`check_read_by_place`)
    targets, names = labels_to_targets(labels, list(classes) if classes else own, f"The {what} shards", report,
                                       part=what)
    reasons = [r for ix in indexes for r in ix.bad]
    leave_out_bad([(source.sample_name(i), r) for i, r in enumerate(reasons) if r], on_bad_file=on_bad_file,
                  report=report, where=" in the shards", fix="Remove it from the shard")
    ok = (targets >= 0) & (np.array([not r for r in reasons], dtype=bool) if reasons else np.ones(0, dtype=bool))
    keep = np.flatnonzero(ok).astype(np.int64)
    if len(keep) == 0:
        raise DataError(f"No usable sample in the {what} shards {list(shards)[:3]}: every one was bad or unlabelled.")
    return EncodedImageDataset(source, targets, names, indices=keep, min_size=min_size, on_bad_file=on_bad_file,
                               report=report)
