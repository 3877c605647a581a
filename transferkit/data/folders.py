"""Folder layouts and file lists shared by image and audio data: split folders (``train/``
next to ``val/`` or ``test/``), class folders, walking them without hidden or unreadable
sub-folders slipping through unnoticed, and CSV lists of ``path,label``.

One rule finds the splits for [`transferkit.data.prepare_data`][transferkit.data.prepare_data], the audio data and
the recipes ([`find_split_folders`][transferkit.data.find_split_folders]).
"""

from __future__ import annotations

import csv
import os
import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transferkit._io import kind_of_bytes, packed_kind
from transferkit._text import home_not_expanded, plural
from transferkit.data.checks import (AUDIO_EXTENSIONS, IMAGE_EXTENSIONS, LINK_LOOP, DataReport, check_class_names,
                                     check_label_names, class_index, class_order, nfc, other_image_extensions,
                                     parse_number, warn_single_sample_classes)
from transferkit.errors import DataError

TRAIN_NAMES = ("train", "training")
VAL_NAMES = ("val", "valid", "validation", "dev")
TEST_NAMES = ("test",)
SPLIT_NAMES = (*TRAIN_NAMES, *VAL_NAMES, *TEST_NAMES)  # in any case: Train/, VALID/
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


def _loose_files(root: Path, is_data: Callable[[str], bool]) -> list[str]:
    """The data files (``is_data``) that lie directly in ``root``, beside its class folders."""
    try:
        return sorted(str(root / e.name) for e in os.scandir(root) if not e.is_dir() and is_data(e.name))
    except OSError:
        return []


_ARCHIVES = {"zip": ("zip archive", "unzip it"), "gzip": ("gzip file", "extract it (tar -xzf)"),
             "bzip2": ("bzip2 file", "extract it (tar -xjf)"), "xz": ("xz file", "extract it (tar -xJf)"),
             "zstd": ("zstd file", "extract it (tar --zstd -xf)"), "7-Zip": ("7-Zip archive", "extract it"),
             "tar": ("tar archive", "extract it (tar -xf)")}


_LISTED = re.compile(rb"[^,]+\.(jpe?g|png|webp|bmp|gif|tiff?|wav|flac|mp3|ogg|aiff?),")  # a row: a file, then


def _not_a_folder(path: Path) -> str:
    """Why ``path``, given as a data folder, is not one: missing, or a file (an archive to extract first)."""
    if not path.exists():
        raw = str(path)
        if raw != raw.strip():  # a space pasted with a path, or a quoted pattern's (a list of shards is not read)
            there = " (which exists)" if os.path.exists(raw.strip()) else ""
            return f"does not exist: it starts or ends with white space; without it, it reads {raw.strip()!r}{there}"
        return "does not exist"
    if not path.is_file():  # a FIFO (--data <(...)), a device: never read here (a pipe would wait for a writer)
        return "is not a folder"
    try:
        with open(path, "rb") as f:
            head = f.read(262)
    except OSError:
        return "is not a folder"
    packed = packed_kind(head)
    if packed is not None:
        what, how = _ARCHIVES[packed]
        return f"is a {what}, not a folder: {how} and give the folder it holds"
    first = head.split(b"\n", 1)[0].strip().lower()
    listing = first.startswith((b"path,", b"file,")) or re.match(_LISTED, first) is not None  # path,label rows
    if path.suffix.lower() in (".tsv", ".txt", ".lst", ".list", "") and listing:
        return ("is a file, not a folder (a table of paths, its header 'path,...', is read from a name ending in "
                ".csv: rename it)")
    return "is a file, not a folder"


def find_split_folders(root: str | Path) -> SplitFolders | None:
    """The split layout of ``root``, or None when ``root`` is a plain class folder.

    ``root`` is a split layout when it holds ``train/`` (or ``training/``) and a validation or
    test folder (``val/``, ``valid/``, ``validation/``, ``dev/``, ``test/``), or ``train/`` alone, and
    ``train/`` holds class sub-folders or tar shards (a ``train/`` of image files is a class). The names
    match in any case (``Train/``, ``Val/``). Two training or two validation folders (``val/``
    and ``valid/``) are ambiguous: a [`DataError`][transferkit.DataError].

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
    trains, vals, tests = ([n for n in names if n.lower() in kind] for kind in (TRAIN_NAMES, VAL_NAMES, TEST_NAMES))
    if not trains:
        return None
    others = [n for n in names if n.lower() not in SPLIT_NAMES]
    if not vals and not tests and others:
        return None  # 'train' is one class among others (a warning says so: split_like_names)
    if not any(not is_hidden(n) for n in _subfolders(root / trains[0])) and not _holds_shards(root / trains[0]):
        return None  # train/ holds files, not class folders: it is a class (named like a split)
    for found, what in ((trains, "training"), (vals, "validation"), (tests, "test")):
        if len(found) > 1:
            raise DataError(f"{str(root)!r} holds several {what} folders {sorted(found)}; keep one, or pass the "
                            "training and validation folders explicitly (data=.../train, val_data=.../val).")
    return SplitFolders(train=root / trains[0], val=root / vals[0] if vals else None,
                        test=root / tests[0] if tests else None, others=others)


def _holds_shards(folder: Path) -> bool:
    """Whether ``folder`` holds tar shards (``train/000.tar``: a split of shards, not a class)."""
    try:
        return any(p.suffix.lower() == ".tar" and p.is_file() for p in folder.iterdir())
    except OSError:
        return False


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
    listed in ``report.ignored_files``. Linked sub-folders are followed, as a linked class
    folder is; one that links back into a folder already walked (a loop) is listed in
    ``report.ignored_folders``."""
    files: list[str] = []
    walked: set[str] = set()

    def unreadable(exc: OSError) -> None:
        path = exc.filename if exc.filename is not None else str(folder)
        reason = f"{type(exc).__name__}: {exc.strerror or exc}"
        report.unreadable_folders.append((str(path), reason))
        report.warn(f"Cannot read folder {str(path)!r} ({reason}); the files in it are left out. "
                    "Fix its permissions (chmod +rx) or move it out of the data folder.")

    for dp, dirs, fs in os.walk(folder, onerror=unreadable, followlinks=True):
        walked.add(os.path.realpath(dp))
        looped = [d for d in dirs if os.path.realpath(os.path.join(dp, d)) in walked]
        hidden = [d for d in dirs if is_hidden(d)]
        report.ignored_folders += [os.path.join(dp, d) for d in hidden + looped]
        report.ignored_reasons.update((os.path.join(dp, d), LINK_LOOP) for d in looped)
        dirs[:] = sorted(d for d in dirs if not is_hidden(d) and d not in looped)
        for f in fs:
            path = os.path.join(dp, f)
            if not is_data(f):
                report.ignored_files.append(path)
            elif why := not_a_file(path):  # opening a FIFO waits for a writer that never comes
                report.bad_files.append((path, why))
                report.warn(f"Left out {path!r}: {why}.")
            else:
                files.append(path)
    return sorted(files)


def not_a_file(path: str | Path) -> str:
    """Why ``path`` is no file to read (a folder, a FIFO, a socket, a device), or ``""`` (a
    regular file, or a path that does not exist: its reader says so).

    Example:
        >>> not_a_file("/dev/null")
        'not a regular file (a character device); only files can be read'
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return ""
    if stat.S_ISREG(mode):
        return ""
    if stat.S_ISDIR(mode):
        return "a folder, not a file"
    kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else \
        "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode) else "a special file"
    return f"not a regular file ({kind}); only files can be read"


def class_folders(root: Path, report: DataReport) -> list[str]:
    """The class sub-folders of ``root`` (sorted); hidden ones are listed as ignored."""
    names = _subfolders(root)
    report.ignored_folders += [str(root / n) for n in names if is_hidden(n)]
    return [n for n in names if not is_hidden(n)]


def _other_kind_note(ignored: Sequence[str], what: str) -> str:
    """A sentence for a folder of the other kind of data than the backbone takes (audio clips
    for an image backbone, images for an audio one), or ``""``."""
    other, ext, fix = (("audio file", AUDIO_EXTENSIONS, "an audio backbone reads them (e.g. 'spec:tk:small_cnn', "
                        "'ta:wav2vec2_base'; see docs/audio.md)") if what == "images" else
                       ("image", IMAGE_EXTENSIONS, "an image backbone reads them"))
    found = [p for p in ignored if p.lower().endswith(ext)]
    return f"The class folders hold {plural(len(found), other)} instead: {fix}." if found else ""


def _warn_other_images(ignored: Sequence[str], extensions: Sequence[str], report: DataReport) -> None:
    """Warn about ignored files that Pillow reads as images of a type transferkit does not list
    (`other_image_extensions`: ``.ico``, ``.psd``, ``.jp2``, ...): left out by their extension."""
    others = other_image_extensions()
    found = [p for p in ignored if os.path.splitext(p)[1].lower() in others]
    if not found:
        return
    report.ignored_reasons.update((p, "images of a type not read") for p in found)
    kinds = sorted({os.path.splitext(p)[1].lower() for p in found})
    report.warn(f"{plural(len(found), 'image file')} of a type not read ({', '.join(kinds[:6])}; e.g. "
                f"{os.path.basename(found[0])!r}) {'is' if len(found) == 1 else 'are'} left out: images are read from "
                f"{', '.join(extensions)}. Convert them to one of those types.")


SNIFFED_MAX = 200  # files without an extension whose first bytes are read to tell an image (or clip) among them


def warn_unnamed(ignored: Sequence[str], what: str, extensions: Sequence[str], report: DataReport) -> None:
    """Warn about ignored files without an extension whose first bytes are of the kind scanned
    (images named by a hash, as some downloads are): left out, since files are chosen by their
    extension. The first `SNIFFED_MAX` such files are read (12 bytes each)."""
    kind = "image" if what == "images" else "audio file"
    found = []
    for path in sorted(p for p in ignored if not os.path.splitext(os.path.basename(p).lstrip("."))[1])[:SNIFFED_MAX]:
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would wait for a writer for ever
                continue
            with open(path, "rb") as f:
                got = kind_of_bytes(f.read(12))
        except OSError:
            continue
        if got is not None and got[0] == kind:
            found.append((path, got[1]))
    if not found:
        return
    report.ignored_reasons.update((p, f"{fmt} {kind} without an extension") for p, fmt in found)
    name, fmt = os.path.basename(found[0][0]), found[0][1]
    report.warn(f"{plural(len(found), kind)} without an extension (e.g. {name!r}, {fmt}) "
                f"{'is' if len(found) == 1 else 'are'} left out: {what} are chosen by their extension "
                f"({', '.join(extensions)}). Rename them (e.g. {name!r} to {name + '.' + fmt.lower()!r}).")


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
        raise DataError(f"Data folder {str(root)!r} {_not_a_folder(root)}. Expected a folder with one "
                        f"sub-folder of {what} per class: {layout}.{home_not_expanded(root)}")
    found = class_folders(root, report)
    if not found:
        raise DataError(f"Data folder {str(root)!r} has no class sub-folders. Expected {layout}.")
    check_label_names(found, f"Data folder {str(root)!r}", case=False)
    defines = classes is None  # the folders are the classes: an empty one is an output that nothing trains
    if classes is None:
        classes = found
    else:  # a folder matches its class spelled in either Unicode form (`nfc`: macOS writes NFD)
        check_label_names(list(classes), "classes=", case=False)
        have, want = {nfc(c) for c in found}, {nfc(c) for c in classes}
        extra = [c for c in found if nfc(c) not in want]
        missing = [c for c in classes if nfc(c) not in have]
        cased = [(e, m) for e in extra for m in missing if e.casefold() == m.casefold()]
        case_note = (" Class names are matched exactly: " + ", ".join(f"the folder {e!r} differs from the class {m!r}"
                                                                    for e, m in cased[:3])
                     + " only in case.") if cased else ""
        if len(extra) == len(found):
            splits = split_like_names(extra)
            fix = (f"It holds split folders ({', '.join(splits)}): point at one of them, e.g. "
                   f"{str(root / splits[-1])!r}." if splits else
                   "Name its class folders like those classes (for training data, classes= may name them)." +
                   case_note)
            raise DataError(f"{str(root)!r} shares no class with the classes it is read for: its class folders are "
                            f"{extra[:10]}, the classes {list(classes)[:10]} (classes= for training data, the "
                            f"training data's or the model's for data scored against them). {fix}")
        if extra:
            report.warn(f"{str(root)!r} has class folders {extra} that are not among the classes it is read for; "
                        f"their {what} are left out (the classes: {list(classes)}).{case_note}")
        if missing:
            report.warn(f"{str(root)!r} has no folder for the classes {missing}.")
        found = [c for c in found if c not in extra]
    index = class_index(classes)
    samples: list[tuple[str, int]] = []
    empty = []
    first_ignored = len(report.ignored_files)
    for c in found:
        files = list_class_files(root / c, is_data, report)
        if not files:
            empty.append(c)
        samples.extend((f, index[nfc(c)]) for f in files)
    ignored = report.ignored_files[first_ignored:]
    loose = _loose_files(root, is_data)
    loose_note = (f"{plural(len(loose), what[:-1])} {'lies' if len(loose) == 1 else 'lie'} directly in "
                  f"{str(root)!r}, outside the class folders (e.g. {os.path.basename(loose[0])!r}), and "
                  f"{'is' if len(loose) == 1 else 'are'} not used: move {'it' if len(loose) == 1 else 'each'} into "
                  "its class's folder.") if loose else ""
    if loose:
        report.ignored_files += loose
        report.ignored_reasons.update((p, "outside the class folders") for p in loose)
        if samples:
            report.warn(loose_note[0].upper() + loose_note[1:])
    if what == "images":
        _warn_other_images(ignored, extensions, report)
    warn_unnamed(ignored, what, extensions, report)
    if not samples:
        notes = [explain_ignored(ignored) if explain_ignored is not None else "", _other_kind_note(ignored, what),
                 loose_note[0].upper() + loose_note[1:] if loose else ""]
        note = " ".join(n for n in notes if n)
        raise DataError(f"No {what} found under {str(root)!r} (looked for {', '.join(extensions)} in "
                        f"{len(found)} class folders). Expected {layout}.{' ' + note if note else ''}")
    if empty:
        consequence = (f": each is still a class, an output of the model that no {what[:-1]} trains. Remove the "
                       f"folder, or give it {what}" if defines else "")
        report.warn(f"Class folders without {what} in {str(root)!r}: {empty}{consequence}.")
    return samples, list(classes)


def scan_csv(csv_path: str | Path, classes: Sequence[str] | None = None, *, report: DataReport | None = None,
             purpose: str = "training", kind: str = "image") -> tuple[list[tuple[str, int]], list[str]]:
    """Read the ``path,label`` rows of a CSV of images or audio clips (``kind``; a header row
    naming ``path`` and ``label`` is optional; relative paths are relative to the CSV's
    folder). With ``classes`` given, rows whose label is not one of them are left out and
    reported. ``purpose``: ``"training"``, ``"validation"`` (``classes``: the
    training data's), or ``"scoring"`` (`evaluate`: ``classes`` are a classifier's), as the
    messages say it.

    Example:
        >>> samples, classes = scan_csv("clips.csv", kind="audio")  # doctest: +SKIP
    """
    report = report if report is not None else DataReport()
    csv_path = Path(csv_path)
    rows = read_csv_rows(csv_path)
    head = [x.strip().lower() for x in rows[0]] if rows else []
    named = "path" in head and "label" in head  # a header naming the two columns (in any order; others ignored)
    if head[:1] == ["path"] and not named:
        fix = "not read for audio clips yet (they are read as classes)" if kind == "audio" else \
            "read for task='regression' or task='multilabel'" \
            if purpose == "training" else "the targets of a multilabel or regression model; this model is a " \
            f"single-label classifier ({', '.join(list(classes or [])[:5])})"
        rename = f" If the column {rows[0][1].strip()!r} holds class names, name it 'label'." if len(head) == 2 else ""
        raise DataError(f"{str(csv_path)!r} has the header {','.join(rows[0])!r}: a CSV of classes has the rows "
                        f"'path,label' (the header 'path,label' is optional). A header of path and one column per "
                        f"output is {fix}.{rename}")
    first, width = (2, len(head)) if named else (1, 2)
    rows = rows[first - 1:]
    bad = [i for i, r in enumerate(rows) if len(r) != width]
    if bad:
        widths = sorted({len(rows[i]) for i in bad})
        form = f"the {width} columns of the header" if width != 2 else "the form 'path,label'"
        raise DataError(f"{str(csv_path)!r}: rows {[i + first for i in bad[:5]]} do not have {form} (they have "
                        f"{' or '.join(map(str, widths))} column(s); a path or label holding a comma must be quoted)"
                        f"{other_separator([rows[i] for i in bad])}.")
    if named:
        p, lab = head.index("path"), head.index("label")
        rows = [[r[p], r[lab]] for r in rows]
        split = [c for c in head if c in SPLIT_COLUMNS]
        if split and purpose == "training":  # read past, it would train on the rows it marks for validation
            report.warn(f"{str(csv_path)!r} has a column {split[0]!r}, which is not read: a CSV of classes reads "
                        "'path' and 'label', so every row trains. Give the held-out rows as their own CSV "
                        "(val_data=...), or leave them out of this one.")
    for col, what in ((0, "path"), (1, "label")):
        blank = [i + first for i, r in enumerate(rows) if not r[col].strip()]
        if blank:
            raise DataError(f"{str(csv_path)!r}: rows {blank[:5]} have an empty {what}; give each row a {what}, or "
                            "remove the rows.")
    if not rows:
        raise DataError(f"{str(csv_path)!r} has no 'path,label' rows.")
    labels = [r[1].strip() for r in rows]
    check_class_names(labels, f"{str(csv_path)!r}", report, unit="row")
    fractional = [lab for lab in set(labels) if parse_number(lab) is not None and not float(lab).is_integer()]
    if fractional and all(parse_number(lab) is not None for lab in set(labels)):
        report.warn(f"{str(csv_path)!r} has labels that look like measured values (e.g. {fractional[0]!r}): each "
                    f"distinct one is a class here ({len(set(labels))} classes). For values, give the file a header "
                    "'path,<name>' and pass task='regression' (--task regression).")
    elif purpose == "training":  # validation and scored data are read by the classes training named
        warn_single_sample_classes(labels, f"{str(csv_path)!r}", report, unit="row",
                                   fix="Give each row its class name in the label column.")
    seen: dict[str, str] = {}
    for r, lab in zip(rows, labels):
        path = csv_file_key(csv_path, r[0])
        if seen.setdefault(path, lab) != lab:
            several = "" if kind == "audio" else " (for several labels per image: task='multilabel' with a CSV " \
                "of path,labels, the labels separated by ';')"
            one = "clip" if kind == "audio" else "image"
            why = f"one {one} has one true class here" if purpose == "scoring" else \
                f"one {one} cannot teach two classes{several}"
            raise DataError(f"{str(csv_path)!r} lists {r[0].strip()!r} twice (however spelled), with labels "
                            f"{seen[path]!r} and {lab!r}: {why}. Keep one row.")
    if len(seen) < len(rows):
        report.warn(f"{str(csv_path)!r} lists {len(rows) - len(seen)} file(s) more than once with the same label; "
                    f"they count that many times in {'the scores' if purpose == 'scoring' else purpose}.")
    if classes is None:
        classes = class_order(labels)
    else:
        check_label_names(list(classes), "classes=", case=False)
    index = class_index(classes)  # a label matches its class in either Unicode form
    labels = [nfc(lab) for lab in labels]
    unknown = sorted({lab for lab in labels if lab not in index})
    if unknown and len(unknown) == len(set(labels)):
        whose = "the model's" if purpose == "scoring" else "the training data's, or classes="
        raise DataError(f"{str(csv_path)!r} has labels {unknown[:10]}, none of them one of the classes "
                        f"{list(classes)[:10]} ({whose}): no row can be used. Label its rows with those classes.")
    if unknown:
        whose_classes = "the model's" if purpose == "scoring" else "training"
        folded = {c.casefold(): c for c in index}
        cased = [(u, folded[u.casefold()]) for u in unknown if u.casefold() in folded]
        numbers = {float(c): c for c in index if parse_number(c) is not None}
        same = [(u, numbers[float(u)]) for u in unknown if parse_number(u) is not None and float(u) in numbers]
        hint = f" ({cased[0][0]!r} differs from the class {cased[0][1]!r} only in case)" if cased else \
            f" ({same[0][0]!r} is the number of the class {same[0][1]!r} written otherwise: write the labels as the " \
            "classes are written)" if same else ""
        report.warn(f"{str(csv_path)!r} has labels {unknown[:10]} that are not "
                    f"{whose_classes} classes{hint}; those rows are left out.")
    samples = [(csv_file_path(csv_path, p), index[lab]) for (p, _), lab in zip(rows, labels) if lab in index]
    if first == 1 and len(rows) > 1 and labels[0] not in labels[1:] and \
            not os.path.isfile(csv_file_path(csv_path, rows[0][0])) and \
            (not re.search(r"[./\\]", rows[0][0]) or  # a word such as 'filename', not a path: a header
             all(os.path.isfile(csv_file_path(csv_path, r[0])) for r in rows[1:])):  # a header's "label" is no class
        raise DataError(f"{str(csv_path)!r}: its first row {','.join(rows[0])!r} names no file, and reads as a "
                        "header: a header row must name the columns 'path' and 'label' (or leave the header out).")
    check_listed_files(csv_path, [p for p, _ in samples])
    return samples, list(classes)


def read_csv_rows(csv_path: Path) -> list[list[str]]:
    """The non-blank rows of a UTF-8 CSV file (a byte-order mark is not data), or a
    [`DataError`][transferkit.DataError] saying why it cannot be read."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's byte-order mark is not data
            return [r for r in csv.reader(f) if r and any(x.strip() for x in r)]
    except UnicodeDecodeError as exc:
        byte = exc.object[exc.start:exc.start + 1]
        raise DataError(f"{str(csv_path)!r} is not UTF-8 text (byte {exc.start}: {byte!r}); save it as UTF-8 (e.g. "
                        "'CSV UTF-8' in Excel, or iconv -f latin1 -t utf-8).") from exc
    except csv.Error as exc:
        raise DataError(f"{str(csv_path)!r} cannot be read as CSV: {exc}.") from exc
    except OSError as exc:
        raise DataError(f"Cannot read {str(csv_path)!r}: {exc.strerror or exc}.") from exc


def csv_file_path(csv_path: Path, cell: str) -> str:
    """A CSV row's path: as written when absolute, else relative to the CSV's folder."""
    path = Path(cell.strip())
    return str(path if path.is_absolute() else csv_path.parent / path)


SPLIT_COLUMNS = ("split", "fold", "subset", "set", "partition")  # columns that mark rows for a split


def other_separator(rows: Sequence[Sequence[str]]) -> str:
    """What a CSV's rows of one column say when they hold another separator (``;``, a tab):
    the columns of a CSV are separated by commas."""
    found = next((sep for sep in (";", "\t", "|") for r in rows if len(r) == 1 and sep in r[0]), None)
    return f"; its rows are separated by {found!r}: separate the columns with commas" if found else ""


def csv_file_key(csv_path: Path, cell: str) -> str:
    """What tells a CSV row's file from another: its absolute, normalised path, one however the
    row spells it (``./a.png``, ``x/../a.png``, the absolute path)."""
    return os.path.normcase(os.path.abspath(csv_file_path(csv_path, cell)))


def check_listed_files(csv_path: Path, paths: Sequence[str]) -> None:
    """A [`DataError`][transferkit.DataError] when files that ``csv_path`` lists are missing, or
    are no files to read (a FIFO, a device: `not_a_file`)."""
    missing = [p for p in paths if not os.path.isfile(p)]
    special = [(p, why) for p in missing if (why := not_a_file(p))]
    if special:
        raise DataError(f"{str(csv_path)!r} lists {plural(len(special), 'path')} of no file to read, e.g. "
                        f"{special[0][0]!r}: {special[0][1]}. List files only.")
    if missing:
        raise DataError(f"{str(csv_path)!r} lists {plural(len(missing), 'missing file')}, e.g. {missing[:3]}."
                        f"{_relative_to_here(csv_path, missing)}")


def _relative_to_here(csv_path: Path, missing: Sequence[str]) -> str:
    """What a CSV's missing files say when they are there relative to the working directory:
    a row's relative path is read relative to the CSV's folder."""
    folder = csv_path.parent
    if os.path.abspath(folder) == os.getcwd():
        return ""
    try:
        cells = [os.path.relpath(p, folder) for p in missing[:20]]
    except ValueError:  # Windows: a path on another drive than the CSV's
        return ""
    here = [c for c in cells if not os.path.isabs(c) and not c.startswith("..") and os.path.isfile(c)]
    if len(here) < max(1, len(cells) // 2):
        return ""
    return (f" Relative paths in a CSV are read relative to the CSV's folder ({str(folder)!r}), and these files are "
            f"there relative to the working directory (e.g. {here[0]!r}): write each path relative to the CSV's "
            "folder, or absolute.")
