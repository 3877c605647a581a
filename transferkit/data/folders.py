"""Folder layouts shared by image and audio data: split folders (``train/`` next to
``val/`` or ``test/``), class folders, and walking them without hidden or unreadable
sub-folders slipping through unnoticed.

One rule finds the splits for [`transferkit.data.prepare_data`][transferkit.data.prepare_data], the audio data and
the recipes ([`find_split_folders`][transferkit.data.find_split_folders]).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transferkit.data.checks import DataReport, check_label_names
from transferkit.errors import DataError

VAL_NAMES = ("val", "valid", "validation")
TEST_NAMES = ("test",)
SPLIT_NAMES = ("train", *VAL_NAMES, *TEST_NAMES)
# folders that archivers and notebooks leave behind; never data
IGNORED_FOLDERS = {"__macosx", "__pycache__"}


@dataclass
class SplitFolders:
    """``root/train`` with the validation folder (``val/``, ``valid/`` or ``validation/``)
    and the test folder (``test/``) found beside it, and the other sub-folders there."""

    train: Path
    val: Path | None = None
    test: Path | None = None
    others: list[str] = field(default_factory=list)

    @property
    def held_out(self) -> Path | None:
        """The folder [`finetune`][transferkit.finetune] validates on: ``val/`` (or ``valid/``,
        ``validation/``), else ``test/``."""
        return self.val or self.test


def is_hidden(name: str) -> bool:
    """Hidden (``.thumbnails``, ``.ipynb_checkpoints``) or archiver litter (``__MACOSX``)."""
    return name.startswith(".") or name.lower() in IGNORED_FOLDERS


def _subfolders(root: Path) -> list[str]:
    try:
        return sorted(d.name for d in os.scandir(root) if d.is_dir())
    except OSError as exc:
        raise DataError(f"Cannot list the data folder {str(root)!r}: {type(exc).__name__}: {exc.strerror or exc}. "
                        "Check that it exists and that you may read it.") from exc


def find_split_folders(root: str | Path) -> SplitFolders | None:
    """The split layout of ``root``, or None when ``root`` is a plain class folder.

    ``root`` is a split layout when it holds ``train/`` and a validation or test folder
    (``val/``, ``valid/``, ``validation/``, ``test/``), or ``train/`` alone, and ``train/``
    holds class sub-folders (a ``train/`` of image files is a class). Two validation
    folders (``val/`` and ``valid/``) are ambiguous: a [`DataError`][transferkit.DataError].

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> for d in ("train/ants", "test/ants"):
        ...     (root / d).mkdir(parents=True)
        >>> s = find_split_folders(root)
        >>> s.train.name, s.val, s.test.name, s.held_out.name
        ('train', None, 'test', 'test')
    """
    root = Path(root)
    if not root.is_dir():
        return None
    names = [n for n in _subfolders(root) if not is_hidden(n)]
    if "train" not in names:
        return None
    vals = [n for n in VAL_NAMES if n in names]
    tests = [n for n in TEST_NAMES if n in names]
    others = [n for n in names if n not in SPLIT_NAMES]
    if not vals and not tests and others:
        return None  # 'train' is one class among others (a warning says so: split_like_names)
    if not any(not is_hidden(n) for n in _subfolders(root / "train")):
        return None  # train/ holds files, not class folders: it is a class (named like a split)
    if len(vals) > 1:
        raise DataError(f"{str(root)!r} holds several validation folders {vals} next to train/; keep one, or pass "
                        "the training and validation folders explicitly (data=.../train, val_data=.../val).")
    return SplitFolders(train=root / "train", val=root / vals[0] if vals else None,
                        test=root / tests[0] if tests else None, others=others)


def split_like_names(classes: Sequence[str]) -> list[str]:
    """The class names that are split names (``train``, ``val``, ``test``, ...)."""
    return [c for c in classes if c.lower() in SPLIT_NAMES]


def warn_split_like_classes(classes: Sequence[str], where: str, report: DataReport) -> None:
    """Warn when class folders are named like splits: a ``train/`` + ``test/`` layout one level
    too deep or too shallow trains a "train vs test" classifier."""
    odd = split_like_names(classes)
    if odd:
        report.warn(f"Class folder names {odd} in {where} look like split names, yet they are trained on as classes "
                    f"{list(classes)[:10]}. If they are splits, point data at the folder holding train/ and "
                    "val/ (or test/), each with one sub-folder per class.")


def list_class_files(folder: Path, is_data: Callable[[str], bool], report: DataReport) -> list[str]:
    """The data files below one class folder, sorted. Hidden sub-folders (``.thumbnails``,
    ``.ipynb_checkpoints``, ``__MACOSX``) are not walked and are listed in
    ``report.ignored_folders``; sub-folders that cannot be read are listed in
    ``report.unreadable_folders`` (and warned about); files that ``is_data`` rejects are
    listed in ``report.ignored_files``."""
    files: list[str] = []

    def unreadable(exc: OSError) -> None:
        path = exc.filename if exc.filename is not None else str(folder)
        reason = f"{type(exc).__name__}: {exc.strerror or exc}"
        report.unreadable_folders.append((str(path), reason))
        report.warn(f"Cannot read folder {str(path)!r} ({reason}); the files in it are left out. "
                    "Fix its permissions (chmod +rx) or move it out of the data folder.")

    for dp, dirs, fs in os.walk(folder, onerror=unreadable):
        hidden = [d for d in dirs if is_hidden(d)]
        report.ignored_folders += [os.path.join(dp, d) for d in hidden]
        dirs[:] = sorted(d for d in dirs if not is_hidden(d))
        for f in fs:
            (files if is_data(f) else report.ignored_files).append(os.path.join(dp, f))
    return sorted(files)


def class_folders(root: Path, report: DataReport) -> list[str]:
    """The class sub-folders of ``root`` (sorted); hidden ones are listed as ignored."""
    names = _subfolders(root)
    report.ignored_folders += [str(root / n) for n in names if is_hidden(n)]
    return [n for n in names if not is_hidden(n)]


def scan_class_folders(root: str | Path, classes: Sequence[str] | None, *, is_data: Callable[[str], bool],
                       report: DataReport, what: str, layout: str, extensions: Sequence[str],
                       explain_ignored: Callable[[list[str]], str] | None = None
                       ) -> tuple[list[tuple[str, int]], list[str]]:
    """``(path, class_index)`` for ``root/<class>/**/<file>`` (the files ``is_data`` accepts),
    and the classes: the image and the audio folder scanners' one rule.

    ``classes`` fixes the class-to-index mapping (pass the training folder's for a validation
    folder): a class folder not in it is left out and reported, a class of it without a
    folder is reported, and a folder sharing no class with it is an error. Hidden and
    unreadable sub-folders are handled by `list_class_files`. ``what`` names the files in
    messages (``"images"``), ``layout`` shows the expected one (``"root/<class>/<image>.jpg"``).
    ``explain_ignored`` turns the files of this scan that ``is_data`` rejected into a sentence
    for the error raised when no data file is found (``''``: nothing to add).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Data folder {str(root)!r} does not exist or is not a folder. Expected a folder with one "
                        f"sub-folder of {what} per class: {layout}.")
    found = class_folders(root, report)
    if not found:
        raise DataError(f"Data folder {str(root)!r} has no class sub-folders. Expected {layout}.")
    check_label_names(found, f"Data folder {str(root)!r}", case=False)
    if classes is None:
        classes = found
    else:
        extra = [c for c in found if c not in classes]
        missing = [c for c in classes if c not in found]
        if len(extra) == len(found):
            raise DataError(f"{str(root)!r} shares no class with the training data: its class folders are "
                            f"{extra[:10]}, the training classes {list(classes)[:10]}. Validation folders need "
                            "class sub-folders named like the training ones.")
        if extra:
            report.warn(f"{str(root)!r} has class folders {extra} that the training data does not have; their {what} "
                        f"are left out (training classes: {list(classes)}).")
        if missing:
            report.warn(f"{str(root)!r} has no folder for training classes {missing}.")
        found = [c for c in found if c in classes]
    index = {c: i for i, c in enumerate(classes)}
    samples: list[tuple[str, int]] = []
    empty = []
    first_ignored = len(report.ignored_files)
    for c in found:
        files = list_class_files(root / c, is_data, report)
        if not files:
            empty.append(c)
        samples.extend((f, index[c]) for f in files)
    if not samples:
        note = explain_ignored(report.ignored_files[first_ignored:]) if explain_ignored is not None else ""
        raise DataError(f"No {what} found under {str(root)!r} (looked for {', '.join(extensions)} in "
                        f"{len(found)} class folders). Expected {layout}.{' ' + note if note else ''}")
    if empty:
        report.warn(f"Class folders without {what} in {str(root)!r}: {empty}.")
    return samples, list(classes)
