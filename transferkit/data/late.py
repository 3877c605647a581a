"""Files that pass the pre-scan but fail when they are loaded during the run (training or validation).

With ``on_bad_file="skip"`` such a file never stops the run. Its item is replaced by the
next readable file of the **same class** (the next one in the dataset's order, of any
class when none of its class can be read; for multilabel and regression targets listed in a
CSV, the next one with the same targets), and the file is added to the
[`DataReport`][transferkit.data.DataReport] that the result carries (``bad_files`` and
``bad_at_load``), with a warning. Why replace rather than drop: the replacement depends
only on the item's index, so every epoch, every resumed run and every number of workers
sees the same batches; batch sizes stay what was asked (no batch of one for BatchNorm, no
empty batch); and the feature cache keeps one row per item. The cost is that the
replacement file counts twice in that training epoch, which the report makes visible.
Validation leaves the item out of its metrics (`failed_items`: its row stays, aligned with
the files, and counts nowhere). With ``on_bad_file="raise"`` the error names the file.

DataLoader workers are other processes, and what they write into their copy of the report
is lost. So a worker remembers the files it replaced, and the collate function
(`ReportingCollate`) sends them back with the batch: the batch travels as a small
carrier whose unpickling, in the main process, records the files in the main process's
report (found through its ``token``) and hands the loop the plain batch.
"""

from __future__ import annotations

import copy
import errno
import os
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch.utils.data import Dataset, default_collate, get_worker_info

from transferkit.data.remote import ShardFetchError
from transferkit.errors import DataError, stream_named

if TYPE_CHECKING:
    from transferkit.data.checks import DataReport

# main process: the reports that datasets record into, by token
_REPORTS: weakref.WeakValueDictionary[str, DataReport] = weakref.WeakValueDictionary()
# a worker process: files replaced since its last collate, by report token
_PENDING: dict[str, list[tuple[str, str]]] = {}


# what to do about an image larger than Pillow's decompression-bomb limit (said wherever one is refused)
BOMB_HINT = ("if the image is genuine, raise Pillow's limit: `transferkit --max-image-pixels 0 ...` (0: no limit; or a "
             "number of pixels) (in Python: PIL.Image.MAX_IMAGE_PIXELS = None, or a number of pixels)")


class BadFileError(DataError):
    """A file that cannot be loaded during the run (``on_bad_file="raise"``). Raised in a
    DataLoader worker, it reaches the main process as its one line naming the file
    (`transferkit.errors.TransferkitError`).

    Example:
        >>> str(BadFileError("Caught BadFileError in DataLoader worker process 0.\\nOriginal Traceback ...\\n"
        ...                  "transferkit.data.late.BadFileError: Cannot read image 'a.png'\\n"))
        "Cannot read image 'a.png'"
    """


def register_report(report: DataReport) -> None:
    """Make ``report`` reachable by its token (done by ``DataReport`` itself)."""
    _REPORTS[report.token] = report


def record_bad_at_load(report: DataReport, path: str, reason: str, *, say: bool = True) -> None:
    """Add a file that failed while loading to ``report`` (once per file) and (``say``) warn:
    not where another DDP rank met it and said so."""
    if path in report.bad_at_load:
        return
    report.bad_at_load.append(path)
    report.bad_files.append((path, reason))
    report.warn(f"Left out {path!r}, which failed to load during the run ({reason}); the next readable file with its "
                "label (or targets) takes its place in training batches, and validation metrics do not count it. "
                + replace_advice(reason, in_memory=path.startswith("in-memory item ")), say=say)


def replace_advice(reason: str, *, in_memory: bool = False) -> str:
    """What to do about a file left out for ``reason``: remove or replace it, where its reason
    does not already say how to keep it (an image over Pillow's pixel limit: raise the limit if
    the image is genuine, `BOMB_HINT`; otherwise remove or replace it). ``in_memory``: an item
    of data passed in memory, which no scan of files finds."""
    if in_memory:
        return "Remove or repair the item in the data passed."
    return (f"{'Otherwise remove' if BOMB_HINT in reason else 'Remove'} or replace the file (scan='full' finds such "
            "files before training).")


def load_failures(report: DataReport) -> list[tuple[str, str]]:
    """``(path, reason)`` of the files that failed while loading, as ``report`` holds them."""
    reasons = dict(report.bad_files)
    return [(path, reasons.get(path, "")) for path in report.bad_at_load]


def record_lost_class(report: DataReport, name: str, example: str, *, say: bool = True) -> None:
    """Add a training class none of whose files loaded to ``report`` (once) and (``say``) warn:
    its samples were replaced by other classes' files (``example``: one of its files)."""
    if name in report.lost_classes:
        return
    report.lost_classes.append(name)
    report.warn(f"No training file of class {name!r} loaded (e.g. {example!r}): its samples were replaced by files of "
                "other classes, with their own labels, so the model's output for it was never trained. Repair or "
                "replace its files, or remove the class from the data.", say=say)


def classes_never_loaded(dataset: Any, report: DataReport) -> dict[int, str]:
    """``{class index: one of its files}`` for the classes of the training ``dataset`` none of
    whose samples loaded (each is in ``report.bad_at_load``); ``{}`` when nothing failed to
    load, or the samples are not files or shard members of one class index each (in-memory
    items, the targets of regression or multilabel data)."""
    bad = set(report.bad_at_load)
    samples = getattr(listing_of(dataset) or dataset, "samples", None)
    if not bad or samples is None:
        return {}
    loaded: set[int] = set()
    failed: dict[int, str] = {}
    for i, (source, target) in enumerate(samples):
        if not is_named(source) or isinstance(target, bool) \
                or not isinstance(target, (int, np.integer)):
            return {}
        name = source_name(source, i)
        if name in bad:
            failed.setdefault(int(target), name)
        else:
            loaded.add(int(target))
    return {t: f for t, f in sorted(failed.items()) if t not in loaded}


def note_bad_at_load(report: DataReport, path: str, reason: str) -> None:
    """Record now (main process) or when the batch reaches the main process (worker)."""
    if get_worker_info() is None:
        record_bad_at_load(report, path, reason)
    else:
        _PENDING.setdefault(report.token, []).append((path, reason))


class ReportingCollate:
    """A DataLoader ``collate_fn``: ``collate(items)``, carrying the files that the worker
    replaced while loading these items back to the main process's report.

    Example:
        >>> from torch.utils.data import default_collate
        >>> ReportingCollate("no-report", default_collate)([(1, 0), (2, 1)])
        [tensor([1, 2]), tensor([0, 1])]
    """

    def __init__(self, token: str, collate: Callable[[Sequence[Any]], Any]) -> None:
        self.token, self.collate = token, collate

    def __call__(self, items: Sequence[Any]) -> Any:
        batch = self.collate(items)
        pending = _PENDING.pop(self.token, None)  # only ever set in a worker process
        return _Carrier(batch, self.token, pending) if pending else batch


class _Carrier:
    """A batch on its way from a worker; unpickled in the main process as the plain batch."""

    __slots__ = ("batch", "token", "pending")

    def __init__(self, batch: Any, token: str, pending: list[tuple[str, str]]) -> None:
        self.batch, self.token, self.pending = batch, token, pending

    def __reduce__(self):
        return _deliver, (self.batch, self.token, self.pending)


def _deliver(batch: Any, token: str, pending: list[tuple[str, str]]) -> Any:
    report = _REPORTS.get(token)
    if report is not None:
        for path, reason in pending:
            try:
                record_bad_at_load(report, path, reason)
            except Warning:  # warnings turned into errors (-W error): the report holds the file and the message
                pass  # already; raising here, possibly in the pin-memory thread, would kill the loader
    return batch


class FileDataset(Dataset):
    """What the datasets of listed files (images, audio) share: ``samples`` as
    ``[(source, class index)]``, items loaded by ``_load(j)`` through `load_or_replace` (a file
    that fails is replaced and reported, or raises), then ``transform``; batches collated by
    ``batch_collate`` through `ReportingCollate`. A subclass sets ``samples``, ``transform``,
    ``report``, ``on_bad_file`` and ``known_bad`` (shared by its views), and defines ``_load``."""

    samples: list[tuple[Any, int]]
    transform: Callable | None
    report: DataReport
    on_bad_file: str
    known_bad: dict[Any, str]
    batch_collate: Callable[[Any], Any] = staticmethod(default_collate)

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.samples]

    @property
    def collate_fn(self) -> ReportingCollate:
        """The DataLoader collate function: ``batch_collate``, reporting replaced files."""
        return ReportingCollate(self.report.token, self.batch_collate)

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, j: int) -> Any:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[Any, int]:
        item, target = load_or_replace(self.samples, i, self._load, on_bad_file=self.on_bad_file, report=self.report,
                                       known_bad=self.known_bad)
        return (self.transform(item) if self.transform else item), target


def listing_of(ds: Any) -> FileDataset | None:
    """The `FileDataset` that ``ds`` is, or that ``ds`` views (``ds.base``: e.g. the targets of a
    CSV seen through a ``TargetDataset``); None for other datasets."""
    if isinstance(ds, FileDataset):
        return ds
    base = getattr(ds, "base", None)
    return base if isinstance(base, FileDataset) else None


def _loading(ds: Any) -> Any:
    """What loads ``ds``'s items and reports the files that fail: ``ds`` itself when it has a
    ``report`` (listed files, tar shards, tables), else the dataset it views (``ds.base``), else None."""
    for owner in (ds, getattr(ds, "base", None)):
        if getattr(owner, "report", None) is not None and hasattr(owner, "on_bad_file"):
            return owner
    return None


def reporting(ds: Any, collate: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``collate`` carrying back to the main process the files that a DataLoader worker replaced
    while loading items of ``ds`` (see `ReportingCollate`); ``collate`` itself for datasets
    that report nothing."""
    owner = _loading(ds)
    return ReportingCollate(owner.report.token, collate) if owner is not None else collate


def replaces_bad_files(ds: Any) -> bool:
    """Whether ``ds`` (or the dataset it views) replaces a file that fails to load
    (``on_bad_file="skip"``), where a pass may mask the item instead; False where such a file
    raises (``"raise"``: the run stops with its error, as the user asked)."""
    owner = _loading(ds)
    return owner is None or owner.on_bad_file == "skip"


def raising(ds: Any) -> Any:
    """``ds`` whose files that fail to load raise (`BadFileError`) instead of being replaced by
    another file, for passes that mask such an item themselves: a shallow copy of ``ds`` (and
    of the dataset it views, when that one loads) with ``on_bad_file="raise"``. Datasets
    that replace nothing are returned as they are."""
    owner = _loading(ds)
    if owner is None or owner.on_bad_file != "skip":
        return ds
    strict = copy.copy(owner)
    strict.on_bad_file = "raise"
    if owner is ds:
        return strict
    out = copy.copy(ds)
    out.base = strict
    return out


def failed_items(dataset: Any) -> list[int]:
    """The items of ``dataset`` whose file (or shard member) failed to load in this process, by
    index: the loader served each as the next readable file of its class and recorded it in
    the data report (a feature store records the ones it masked there too). Validation leaves
    them out of its metrics, and a head trained on features held in memory leaves them out of
    training, so that no file counts twice. Items that are not files or shard members are
    never named."""
    owner, listing = _loading(dataset), listing_of(dataset)
    samples = getattr(listing or dataset, "samples", None)
    if owner is None or samples is None or not owner.report.bad_at_load:
        return []
    bad = set(owner.report.bad_at_load)
    rows = [i for i, (source, _) in enumerate(samples)
            if is_named(source) and source_name(source, i) in bad]
    view = getattr(dataset, "indices", None) if listing is not None and listing is not dataset else None
    if view is None:
        return rows
    at = {int(b): r for r, b in enumerate(view)}  # a view of the listing (a CSV's targets): its own rows
    return [at[b] for b in rows if b in at]


def _under(samples: Sequence[tuple[Any, Any]]) -> str:
    """`` (under '<folder>')``: the folder all of ``samples``' files lie in, which says which
    set they are (training or validation files); '' when they are not all files."""
    paths = [str(source) for source, _ in samples if isinstance(source, (str, Path))]
    if not paths or len(paths) != len(samples):
        return ""
    try:
        folder = os.path.commonpath(paths)
    except ValueError:  # relative and absolute paths mixed, or other drives
        return ""
    return f" (under {os.path.dirname(folder) if len(paths) == 1 else folder!r})"


def is_named(source: Any) -> bool:
    """Whether a sample's source has a name of its own (a file's path, a shard member): what the
    data report lists it by."""
    return isinstance(source, (str, Path)) or hasattr(source, "sample_id")


def source_name(source: Any, index: int) -> str:
    """A file's path, a shard member's name (``train-000003.tar:key``), or ``in-memory item <index>``."""
    if is_named(source):
        return str(source)
    return f"in-memory item {index}"


def _source_key(samples: Sequence[tuple[Any, int]], i: int) -> Any:
    """What identifies ``samples[i]`` in ``known_bad``: a path, a shard member's ``sample_id``
    (its samples are made on access, so their ``id`` is not stable), else the item's ``id``."""
    source = samples[i][0]
    if isinstance(source, (str, Path)):
        return source
    sample_id = getattr(source, "sample_id", None)
    return sample_id if sample_id is not None else id(samples[i])


def _reason(exc: DataError) -> str:
    """Why a file failed: the reader's own error (``exc``'s cause), or the reason the error
    gives itself (``file_reason``: an image over Pillow's pixel limit, with that limit)."""
    own = getattr(exc, "file_reason", None)
    if own:
        return own
    cause = exc.__cause__
    return f"{type(cause).__name__}: {stream_named(str(cause))}" if cause is not None else str(exc)


def bad_file_reason(exc: DataError) -> str:
    """Why a file failed, without the reader's advice on ``on_bad_file`` (a masked sample is
    listed in a run that already leaves bad files out): the reader's own error, as the
    replaced files are recorded (`load_or_replace`)."""
    inner = exc.__cause__ if isinstance(exc, BadFileError) and isinstance(exc.__cause__, DataError) else exc
    return _reason(inner).splitlines()[0] if str(exc) else type(exc).__name__


class OpenFilesError(DataError):
    """A file could not be opened because the process (or the system) has no file
    descriptor left: the file is not bad, and the next ones would fail too."""


# failures that say nothing of the file (it is neither left out nor replaced): raised as they are
NOT_BAD_FILES = (ShardFetchError, OpenFilesError)


def _load(load: Callable[[int], Any], i: int, name: str) -> Any:
    """``load(i)``, with a failure to open for want of file descriptors raised as what it is."""
    try:
        return load(i)
    except DataError as exc:
        cause = exc.__cause__
        if isinstance(cause, OSError) and cause.errno in (errno.EMFILE, errno.ENFILE):
            raise OpenFilesError(f"Cannot open {name!r}: {cause.strerror} (errno {cause.errno}): this process holds as "
                                 "many open files as it may, and the file itself is not known to be bad. Raise the "
                                 "limit (`ulimit -n`, e.g. to 65536, in the shell that starts the run) or close what "
                                 "holds the files.") from cause
        raise


def load_or_replace(samples: Sequence[tuple[Any, int]], i: int, load: Callable[[int], Any], *, on_bad_file: str,
                    report: DataReport, known_bad: dict[Any, str]) -> tuple[Any, int]:
    """``(load(i), target)`` for ``samples[i] = (source, target)``. When ``load`` raises a [`DataError`][transferkit.DataError]
    (other than a remote shard that could not be fetched, or a file that could not be opened for
    want of file descriptors, which are raised as they are):
    raise it (``on_bad_file="raise"``), or record the file in ``report`` and load the next
    readable sample of the same class instead (of any class when none of its class reads).
    ``known_bad`` remembers failed sources in this process, so they are not decoded again."""
    source, target = samples[i]
    key = _source_key(samples, i)
    if key in known_bad and on_bad_file == "raise":  # it failed before, in a copy of this dataset that replaced it
        raise BadFileError(f"Cannot load {source_name(source, i)!r}: {known_bad[key]}")
    if key not in known_bad:
        try:
            return _load(load, i, source_name(source, i)), target
        except NOT_BAD_FILES:
            raise  # not a bad file (a shard that could not be fetched, no descriptor left): the next would fail too
        except DataError as exc:
            if on_bad_file == "raise":
                raise BadFileError(str(exc)) from exc
            known_bad[key] = _reason(exc)
            note_bad_at_load(report, source_name(source, i), known_bad[key])
    n = len(samples)
    for same_class in (True, False):
        for k in range(1, n):
            j = (i + k) % n
            src, tgt = samples[j]
            if (tgt == target) != same_class:
                continue
            kj = _source_key(samples, j)
            if kj in known_bad:
                continue
            try:
                return _load(load, j, source_name(src, j)), tgt
            except NOT_BAD_FILES:
                raise
            except DataError as exc:
                known_bad[kj] = _reason(exc)
                note_bad_at_load(report, source_name(src, j), known_bad[kj])
    raise DataError(f"None of the {n} files of this dataset{_under(samples)} can be loaded any more (e.g. "
                    f"{source_name(source, i)!r}: {known_bad[key]}). Was the data folder moved or unmounted, or are "
                    "its files all damaged? Repair or replace them (scan='full' finds damaged files before training).")
