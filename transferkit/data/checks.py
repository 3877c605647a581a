"""Cheap checks that find bad image files before training starts.

The quick check opens each file's header (format, size: catches non-images, empty files,
decompression-bomb sizes) and, for JPEG and PNG, looks for the end-of-image marker in the
last bytes (catches truncated downloads) - without decoding pixels. ``scan="full"``
decodes every image as well, for the rare file whose header and ending are fine but
whose pixels are not.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import unicodedata
import uuid
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import BinaryIO
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from transferkit._io import file_digest, kind_of_bytes
from transferkit._text import hide_secrets, not_utf8, one_line, plural
from transferkit.errors import DataError, check_choice, warn
from transferkit.data.late import BOMB_HINT, register_report

ON_BAD_FILE = ("skip", "raise")
SCANS = ("quick", "full", "none")
# what a scan accepts, part of the key of every kept scan (shard indexes, Parquet and Hugging
# Face scans), so that a change of the rules scans again; 2: data after an image's end marker
SCAN_RULES = 2
# audio file types by extension, and the libsndfile format that decodes each (MP3: libsndfile >= 1.1)
AUDIO_FORMATS = {".wav": "WAV", ".wave": "WAV", ".flac": "FLAC", ".ogg": "OGG", ".opus": "OGG/OPUS", ".aiff": "AIFF",
                 ".aif": "AIFF", ".mp3": "MP3", ".w64": "W64", ".caf": "CAF", ".au": "AU",
                 # audio no libsndfile decodes (a phone's voice memos): known, so that they are said, not ignored
                 ".m4a": "M4A", ".aac": "AAC", ".wma": "WMA"}  # extension -> libsndfile format (/subtype if needed)
NOT_LIBSNDFILE = ("M4A", "AAC", "WMA")  # of AUDIO_FORMATS, the formats no libsndfile version decodes
AUDIO_EXTENSIONS = tuple(AUDIO_FORMATS)  # every known one; data.audio.audio_extensions(): those decoded here


def _pillow_opens(ext: str) -> bool:
    """Whether this Pillow reads files named ``*ext`` (AVIF: Pillow 11.2 or later, built with libavif)."""
    Image.init()
    return Image.registered_extensions().get(ext) in Image.OPEN


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp",
                    *[e for e in (".avif",) if _pillow_opens(e)], ".tif", ".tiff", ".ppm", ".pgm")
IGNORED_NAMES = {".ds_store", "thumbs.db", "desktop.ini"}


def _kind_by_content(path: object) -> tuple[str, str] | None:
    """``("audio file", "WAV")`` or ``("image", "PNG")`` for a file whose first bytes are those
    of a common audio or image format, else None (or where it cannot be read)."""
    try:
        if not os.path.isfile(path):  # type: ignore[arg-type]  # a FIFO would block the read
            return None
        with open(path, "rb") as f:  # type: ignore[arg-type]
            head = f.read(12)
    except (OSError, TypeError, ValueError):
        return None
    return kind_of_bytes(head)


def other_kind(path: object, reads: str) -> str:
    """What to say of a file of the other kind of data than the reader's (``reads``:
    ``"image"`` or ``"audio"``), by its name or, under another name, by its first bytes: an
    audio file listed as an image (a CSV's row, ``predict`` on an image model), or the other
    way; ``""`` otherwise.

    Example:
        >>> other_kind("clip.WAV", "image")
        'It is an audio file by its name (.wav), and images are read here (an image model): give image files.'
        >>> other_kind("cat.png", "audio"), other_kind("cat.png", "image")
        ('It is an image by its name (.png), and audio is read here (an audio model): give audio files.', '')
        >>> other_kind("train-000.tar", "image")[:30]
        'It is a tar archive (.tar): sh'
    """
    if not isinstance(path, (str, os.PathLike)):
        return ""
    other, named = ("audio file", AUDIO_EXTENSIONS) if reads == "image" else ("image", IMAGE_EXTENSIONS)
    here = "images are read here (an image model)" if reads == "image" else "audio is read here (an audio model)"
    ext = os.path.splitext(str(path))[1].lower()
    if ext in named:
        return f"It is an {other} by its name ({ext}), and {here}: give {reads} files."
    if ext == ".tar" and reads == "image":  # shards hold many labelled images: scored, or given as training data
        return ("It is a tar archive (.tar): shards of labelled images are scored with `transferkit evaluate` (or "
                "trained on as data=); give image files to predict.")
    found = _kind_by_content(path)
    if found is not None and found[0] == other:
        return f"It is an {other} ({found[1]}) by its content, and {here}: give {reads} files."
    return ""


LINK_LOOP = "a link back into a folder already walked"  # why a linked sub-folder is not walked (a loop)
# files Pillow registers as readable that are no photographs (scientific stubs, documents, video, vector drawings)
_NOT_PHOTOS = {".bufr", ".grib", ".h5", ".hdf", ".fit", ".fits", ".mpeg", ".mpg", ".ps", ".eps", ".emf", ".wmf"}


def other_image_extensions() -> set[str]:
    """Extensions of images that Pillow opens and that are not in `IMAGE_EXTENSIONS` (``.ico``,
    ``.psd``, ``.tga``, ``.jp2``, ...): a folder scan ignores such files, and says so."""
    return {e for e in Image.registered_extensions() if _pillow_opens(e)} - set(IMAGE_EXTENSIONS) - _NOT_PHOTOS


@dataclass
class DataReport:
    """What the data checks found: files left out (with reasons), what was ignored, and warnings.

    ``bad_files``: ``(path, reason)`` of every file left out, found before training (the
    pre-scan) or while loading it during training (also in ``bad_at_load``; its place in
    the batch is taken by another file, see `transferkit.data.late.load_or_replace`).
    ``ignored_files``: files that are not data by their name or extension, or that lie outside
    the class folders; ``ignored_reasons``: why, for those of them with a reason of their own
    (an audio type the installed libsndfile cannot decode, an image type not read, a file
    beside the class folders), and for a linked folder not walked (`LINK_LOOP`);
    ``ignored_folders``: hidden sub-folders (``.thumbnails``, ``.ipynb_checkpoints``) and
    linked ones that loop, which were not walked; ``unreadable_folders``:
    ``(path, reason)`` of folders that could not be listed; ``lost_classes``: classes none
    of whose training files loaded (their samples were replaced by other classes' files, so
    they were never trained; found when training ends); ``warnings``: every warning issued (each also went through
    ``warnings.warn`` unless told not to say it: what another DDP rank says).

    Example:
        >>> r = DataReport()
        >>> r.bad_files.append(("a.jpg", "empty file (0 bytes)"))
        >>> r.summary()
        '1 bad file left out'
    """

    bad_files: list[tuple[str, str]] = field(default_factory=list)
    ignored_files: list[str] = field(default_factory=list)
    ignored_reasons: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    ignored_folders: list[str] = field(default_factory=list)
    unreadable_folders: list[tuple[str, str]] = field(default_factory=list)
    bad_at_load: list[str] = field(default_factory=list)
    lost_classes: list[str] = field(default_factory=list)
    token: str = field(default_factory=lambda: uuid.uuid4().hex, repr=False, compare=False)

    def __post_init__(self) -> None:
        register_report(self)

    def warn(self, message: str, *, say: bool = True) -> None:
        """Record ``message`` and (``say``) warn of it; ``say=False``: another DDP rank says it."""
        message = hide_secrets(message)  # kept for the result's record, printed as JSON
        self.warnings.append(message)
        if say:
            warn(message)

    def merge(self, other: DataReport) -> None:
        if other is self:
            return
        self.bad_files += other.bad_files
        self.ignored_files += other.ignored_files
        self.ignored_reasons.update(other.ignored_reasons)
        self.warnings += other.warnings
        self.ignored_folders += other.ignored_folders
        self.unreadable_folders += other.unreadable_folders
        self.bad_at_load += other.bad_at_load
        self.lost_classes += [c for c in other.lost_classes if c not in self.lost_classes]

    def summary(self) -> str:
        """One line: what was left out or ignored ('' when nothing was)."""
        n_late = len(self.bad_at_load)
        parts = []
        if self.bad_files:
            n = len(self.bad_files)
            late = f" ({n_late} of them failed to load during the run)" if n_late else ""
            parts.append(f"{n} bad file{'s' if n != 1 else ''} left out{late}")
        if self.lost_classes:
            parts.append(f"{plural(len(self.lost_classes), 'class', 'classes')} with no training file that "
                         f"loaded, never trained ({', '.join(self.lost_classes[:5])})")
        if self.unreadable_folders:
            parts.append(f"{plural(len(self.unreadable_folders), 'unreadable folder')} skipped")
        if self.ignored_files:
            parts.append(f"{plural(len(self.ignored_files), 'file')} ignored ({self._ignored_examples()})")
        loops = [p for p in self.ignored_folders if self.ignored_reasons.get(p) == LINK_LOOP]
        if len(self.ignored_folders) > len(loops):
            parts.append(f"{plural(len(self.ignored_folders) - len(loops), 'hidden folder')} ignored")
        if loops:
            parts.append(f"{plural(len(loops), 'linked folder')} ignored ({LINK_LOOP}: {loops[0]})")
        return ", ".join(parts)

    def _ignored_examples(self, per_reason: int = 3) -> str:
        """The ignored files grouped by why, a few names each: ``'not data by their extension:
        notes.txt; hidden or system files: .DS_Store'``."""
        groups: dict[str, list[str]] = {}
        for path in self.ignored_files:
            name = os.path.basename(path)
            why = self.ignored_reasons.get(path) or (
                "hidden or system files" if name.startswith(".") or name.lower() in IGNORED_NAMES
                else "not data by their extension")
            groups.setdefault(why, []).append(name)
        return "; ".join(f"{why}: {', '.join(names[:per_reason])}{' ...' if len(names) > per_reason else ''}"
                         for why, names in groups.items())


_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}



def bomb_reason(exc: Exception) -> str:
    """Why an image over Pillow's pixel limit is refused, with the limit in force (Pillow's own
    message names twice the limit where it raises rather than warns), and `BOMB_HINT`."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
    limit = Image.MAX_IMAGE_PIXELS
    return f"decompression-bomb size ({size}, over the limit of {limit:,} pixels); {BOMB_HINT}"


def _has(f: BinaryIO, marker: bytes, start: int = 0) -> bool:
    """Whether ``marker`` occurs in ``f`` from byte ``start`` on (read in 1 MiB chunks)."""
    f.seek(start)
    tail = b""
    while chunk := f.read(1 << 20):
        if marker in tail + chunk:
            return True
        tail = chunk[-(len(marker) - 1):]
    return False


def _end_problem(f: BinaryIO, size: int, fmt: str | None, *, decoded: bool) -> str | None:
    """Why the file has no proper end, or None: the end-of-image marker of ``fmt`` (JPEG, PNG;
    other formats pass) in the last 1024 bytes, or further up in an image that decodes whole
    (data after the image: a phone's motion photo, a vendor's trailer). ``decoded``: the image
    was decoded whole already (a full scan). JPEGs decode at 1/8 scale here, which still reads
    every byte of their scans. A file cut short has no marker after its image data, or does
    not decode."""
    marker = _END_MARKERS.get(fmt or "")
    if marker is None or _has(f, marker, max(0, size - 1024)):
        return None
    if not _has(f, marker):
        return f"truncated {fmt} file (no end-of-image marker)"
    if decoded:
        return None
    try:
        f.seek(0)
        with Image.open(f) as img:
            if fmt == "JPEG":
                img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
        return None
    except Exception as exc:  # Pillow raises many types; whatever it is, the file is not whole
        return (f"truncated or damaged {fmt} file (its end-of-image marker is not at its end, and it does not "
                f"decode: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")


def check_image_stream(f: BinaryIO, size: int, *, full: bool = False) -> str | None:
    """Why the ``size`` bytes readable from the seekable binary file ``f`` (at position 0)
    cannot be used as an image, or ``None`` when they look fine: the rules of
    `check_image_file` (the header, the end-of-image marker, with ``full`` a decode), for
    images that are members of a tar shard or cells of a table rather than files."""
    try:
        if size == 0:
            return "empty file (0 bytes)"
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f) as img:
                w, h = img.size
                fmt = img.format
                if w < 1 or h < 1:
                    return f"image has no pixels ({w}x{h})"
                if full:
                    img.load()
        problem = _end_problem(f, size, fmt, decoded=full)
        if problem:
            return problem
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return bomb_reason(exc)
    except Exception as exc:  # Pillow raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        first = str(exc).splitlines()[0] if str(exc) else ""
        first = re.sub(r" ?<_io\.\w+[^>]*>", "", first)  # Pillow names the stream object, which says nothing
        return f"cannot be read as an image ({type(exc).__name__}: {first})"
    return None


def check_image_file(path: str, *, full: bool = False) -> str | None:
    """Return why ``path`` cannot be used as an image, or ``None`` when it looks fine."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            return check_image_stream(f, size, full=full)
    except OSError as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        return f"cannot be read as an image ({type(exc).__name__}: {first})"


def filter_bad_images(samples: Sequence[tuple[str, int]], *, on_bad_file: str = "skip", scan: str = "quick",
                      report: DataReport | None = None) -> list[tuple[str, int]]:
    """Drop (``"skip"``) or reject (``"raise"``) samples whose file fails `check_image_file`."""
    check_choice("on_bad_file", on_bad_file, ON_BAD_FILE)
    check_choice("scan", scan, SCANS)
    if scan == "none":
        return list(samples)
    good, bad = [], []
    for path, target in samples:
        reason = check_image_file(path, full=scan == "full")
        if reason is None:
            good.append((path, target))
            continue
        bad.append((path, reason))
        if on_bad_file == "raise":  # at the first: the rest need not be read
            break
    leave_out_bad(bad, on_bad_file=on_bad_file, report=report, what="image file", fix="Remove it")
    return good


def leave_out_bad(bad: list[tuple[str, str]], *, on_bad_file: str, report: DataReport | None, what: str = "image",
                  where: str = "", fix: str) -> None:
    """Report the ``(name, reason)`` pairs a scan found bad: a DataError naming the first
    (``on_bad_file="raise"``; ``fix`` says what to do about it), else listed in ``report`` with
    one warning. ``what`` names one (``"image file"``), ``where`` the data (``" in the shards"``)."""
    if not bad:
        return
    if on_bad_file == "raise":
        raise DataError(f"Bad {what} {bad[0][0]!r}{where}: {bad[0][1]}. {fix}, or pass on_bad_file='skip' to leave "
                        f"bad {what}s out (they are listed in the result).")
    if report is None:
        return
    report.bad_files += bad
    shown = "; ".join(f"{p} ({r})" for p, r in bad[:5])
    report.warn(f"Left out {plural(len(bad), f'bad {what}')}{where}: {shown}{' ...' if len(bad) > 5 else ''}")


def nfc(name: str) -> str:
    """``name`` in Unicode's composed form (NFC): "café" typed on Linux, and written by macOS
    (decomposed, NFD: "e" and a combining accent), give one string."""
    return unicodedata.normalize("NFC", name)


def class_index(classes: Sequence[str]) -> dict[str, int]:
    """Each class's index by its name in NFC form (`nfc`): look a label up as ``nfc(label)``,
    and it finds its class in either Unicode form."""
    return {nfc(c): i for i, c in enumerate(classes)}


# the summary rows of the per-class report of each task (scikit-learn's keys), beside one row per class or label
REPORT_ROWS = {"multiclass": ("accuracy", "macro avg", "weighted avg"),
               "multilabel": ("micro avg", "macro avg", "weighted avg", "samples avg"), "regression": ()}


def check_label_names(names: Sequence[str], where: str, *, case: bool = True, task: str = "multiclass") -> None:
    """DataError for class names that would break later: a name that is not a string, one that is
    not UTF-8 text (a file name's undecodable bytes), a line
    break or control character (no export could hold it), two names that are one in two
    Unicode forms (`nfc`: a folder named on macOS beside one named elsewhere), two names
    that differ only in surrounding spaces (they print alike), (``case``) only in case
    (a typo in a CSV, not two classes), or a name of a summary row of the ``task``'s
    per-class report (`REPORT_ROWS`: ``accuracy``, ``macro avg``, ...), whose own row it
    would lose."""
    odd = next((name for name in names if not isinstance(name, str)), None)
    if odd is not None:
        raise DataError(f"{where}: the class name {odd!r} is a {type(odd).__name__}; class names are strings (pass "
                        f"classes=[{', '.join(repr(str(n)) for n in list(names)[:3])}, ...]).")
    rows = REPORT_ROWS.get(task, ())
    row = next((name for name in names if name in rows), None)
    if row is not None:
        raise DataError(f"{where}: the class name {row!r} is the name of a summary row of the per-class report "
                        f"({', '.join(rows)}), which would take the place of the class's own row. Rename the class "
                        "(its folder, or its label in the data).")
    for name in names:
        if not_utf8(name):
            raise DataError(f"{where}: the class name {ascii(name)} is not UTF-8 text (a folder or file name in "
                            "another encoding, e.g. Latin-1, as archives from other systems hold them); no export "
                            "could hold it. Rename it to UTF-8 (e.g. convmv -f latin1 -t utf8 -r --notest FOLDER).")
        if name and not one_line(name):
            raise DataError(f"{where}: the class name {name!r} holds a line break or control character; rename it "
                            "(labels are stored in exports and printed one per line).")
    forms: dict[str, str] = {}
    for name in names:
        other = forms.setdefault(nfc(name), name)
        if other != name:
            odd = name if nfc(name) != name else other
            raise DataError(f"{where}: the class names {ascii(other)} and {ascii(name)} are one name written in two "
                            f"Unicode forms (both print as {name!r}), so they would be two classes; give them one "
                            f"spelling (e.g. rename {ascii(odd)} to {ascii(nfc(odd))}).")
    folded: dict[str, str] = {}
    for name in names:
        other = folded.setdefault(name.strip().casefold() if case else name.strip(), name)
        if other != name:
            how = "case or surrounding spaces" if case else "surrounding spaces (they print alike)"
            raise DataError(f"{where}: the class names {other!r} and {name!r} differ only in {how}, so they "
                            "would be two classes; give them one spelling.")


MISSING_VALUES = {"nan", "n/a", "null", "<na>"}  # how tables write a missing value ('NA', 'none' may be classes)


def class_order(labels: Sequence[str]) -> list[str]:
    """The classes of labels read from a CSV or a table, in index order: by value where every
    label is a whole number written in digits (``'0', '5', '10'``: a class's index is then its
    place among the values, and the label 0 is index 0 where the labels run from 0), else by
    name. (A folder's classes are its sub-folders sorted by name, as torchvision's
    ``ImageFolder`` sorts them.)

    Example:
        >>> class_order(["10", "5", "0", "5"]), class_order(["bee", "ant"])
        (['0', '5', '10'], ['ant', 'bee'])
    """
    names = set(labels)
    if names and all(n.isascii() and n.isdecimal() for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


def check_number_labels(labels: Sequence[str], where: str) -> None:
    """DataError for labels that are one whole number written in several ways (``1``, ``01``,
    ``1.0``): each spelling would be a class of its own. Other numbers may be codes whose
    spelling matters (sections ``1.1`` and ``1.10``).

    Example:
        >>> check_number_labels(["1", "2", "10", "1.1", "1.10"], "labels.csv")
        >>> check_number_labels(["01", "1"], "labels.csv")
        Traceback (most recent call last):
        ...
        transferkit.errors.DataError: labels.csv: the labels '01' and '1' are one number written in 2 ways, so \
they would be 2 classes; write them alike.
    """
    spelled: dict[float, list[str]] = {}
    for lab in labels:
        v = parse_number(lab)
        if v is not None and v.is_integer():
            spelled.setdefault(v, []).append(lab)
    same = next((s for s in spelled.values() if len(s) > 1), None)
    if same is not None:
        names = ", ".join(map(repr, same[:-1])) + f" and {same[-1]!r}"
        raise DataError(f"{where}: the labels {names} are one number written in {len(same)} ways, so they would be "
                        f"{len(same)} classes; write them alike.")


def parse_number(text: str) -> float | None:
    """``text`` as a finite number, or None (``float`` reads ``"1_000"``; a table does not).

    Example:
        >>> parse_number(" 2.5"), parse_number("1_000"), parse_number("nan")
        (2.5, None, None)
    """
    try:
        value = float(text) if "_" not in text else float("nan")
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def check_class_names(labels: Sequence[str], where: str, report: DataReport, *, unit: str = "sample") -> None:
    """The checks of class names read from data's labels (``labels``: one per sample, repeats
    included): `check_label_names` and `check_number_labels` (DataError), and a warning where
    a name reads as a missing value (``'NaN'``, ``'null'``: how pandas and other tables write
    one), which is a class of its own. ``unit``: what one label belongs to (``"row"``)."""
    names = sorted(set(labels))
    check_label_names(names, where)
    check_number_labels(names, where)
    missing = [name for name in names if name.strip().lower() in MISSING_VALUES]
    if missing:
        n = sum(lab in missing for lab in labels)
        report.warn(f"{where} has {plural(n, unit)} labelled {' or '.join(map(repr, missing))}, which reads as a "
                    f"missing value (as pandas writes one); it is a class of its own here. Remove those {unit}s, or "
                    "give them their class.")


def warn_single_sample_classes(labels: Sequence[str], where: str, report: DataReport, *, unit: str,
                               fix: str) -> None:
    """Warn where most of the classes that training labels name label a single sample: a
    caption or an id read as the class (WebDataset's ``.txt`` captions, a file name column).
    Each distinct label is a class, and a class of one example cannot be learnt. ``fix``: how
    the data give a sample its class.

    Example:
        >>> warn_single_sample_classes(["cat", "dog", "cat"], "x.csv", DataReport(), unit="row", fix="...")
    """
    counts = Counter(labels)
    single = [name for name in sorted(counts) if counts[name] == 1]
    if len(counts) >= 10 and len(single) > len(counts) / 2:
        report.warn(f"{where}: {len(single)} of {len(counts)} class names label one {unit} each (e.g. "
                    f"{single[0][:80]!r}): are these captions or ids rather than classes? Each distinct label is a "
                    f"class, and a class of one example cannot be learnt. {fix}")


def warn_copies_across_classes(samples: Sequence[tuple[str, int]], classes: Sequence[str], where: str,
                               report: DataReport, *, kind: str = "image") -> None:
    """Warn when one file (the same path, a symlinked folder) or two files with identical bytes
    carry different labels: the model is taught two answers for one input. ``kind`` names
    one input in the warning (``"image"``, ``"clip"``)."""
    by_size: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for path, label in samples:
        try:
            by_size[os.path.getsize(path)].append((path, label))
        except OSError:
            continue  # a missing file is reported by the scan
    pairs: list[tuple[str, int, str, int]] = []
    for group in by_size.values():
        if len({lab for _, lab in group}) < 2:
            continue
        by_hash: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for path, label in group:
            try:
                by_hash[file_digest(path)].append((path, label))
            except OSError:
                continue
        for items in by_hash.values():
            first = items[0]
            pairs += [(first[0], first[1], p, lab) for p, lab in items[1:] if lab != first[1]]
    if pairs:
        a, la, b, lb = pairs[0]

        def name(i: int) -> str:
            return classes[i] if 0 <= i < len(classes) else str(i)

        report.warn(f"{len(pairs)} training file(s) in {where} have the same content as a file of another class "
                    f"(the same {kind} under two labels, or a class folder linked to another): e.g. {b} "
                    f"({name(lb)}) = {a} ({name(la)}). Remove the copies or fix their labels.")


def every_file_bad(start: str, bad: Sequence[tuple[Any, str]]) -> DataError:
    """The error of data none of whose files could be read: ``start``, the count, and the
    first bad file with its reason (``bad``: ``(name, reason)`` of these data's files only; the
    others' reasons are the warning's)."""
    if not bad:
        return DataError(f"{start}: every file was bad.")
    path, reason = bad[0]
    return DataError(f"{start}: every file was bad ({plural(len(bad), 'file')}; the first, {str(path)!r}: "
                     f"{str(reason).rstrip('.')}).")


def readable_samples(listed: Sequence[tuple[Any, int]], kept: Sequence[tuple[Any, int]], names: Sequence[str], *,
                     source: Any, what: str, report: DataReport) -> list[tuple[Any, int]]:
    """``kept``, what a pre-scan left of the ``listed`` samples of ``source``: a
    [`DataError`][transferkit.DataError] when nothing is left, a warning in ``report`` for the
    classes left without any file. ``what`` names the files (``"images"``, ``"audio files"``)."""
    if not kept:
        mine = {str(p) for p, _ in listed}  # the report may hold the other split's too
        raise every_file_bad(f"No readable {what} under {str(source)!r}",
                             [b for b in report.bad_files if str(b[0]) in mine])
    emptied = [names[t] for t in sorted({t for _, t in listed} - {t for _, t in kept})]
    if emptied:
        listing = str(source).lower().endswith(".csv")
        report.warn(f"{'Classes' if listing else 'Class folders'} without readable {what} in {str(source)!r}: "
                    f"{emptied} (every file {'of' if listing else 'in'} them was bad, see the left-out files).")
    return list(kept)


def find_duplicates(a: Iterable[str], b: Iterable[str]) -> list[tuple[str, str]]:
    """Pairs of files with identical bytes, one from ``a`` and one from ``b`` (hashing only
    files whose sizes collide)."""
    by_size: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for side, paths in ((0, a), (1, b)):
        for p in paths:
            by_size[os.path.getsize(p)].append((side, p))
    pairs = []
    for group in by_size.values():
        if len({s for s, _ in group}) < 2:
            continue
        by_hash: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for side, p in group:
            by_hash[file_digest(p)].append((side, p))
        for items in by_hash.values():
            left = [p for s, p in items if s == 0]
            right = [p for s, p in items if s == 1]
            pairs += [(x, y) for x in left for y in right]
    return pairs


def holds_data_files(folder: str | os.PathLike) -> bool:
    """Whether an image or audio file lies anywhere below ``folder``: a class folder, whose
    files may sit in sub-folders of their own (a ``cache_dir`` holds none). An unreadable
    folder counts as one (its scan says why). It stops at the first such file, so a class
    folder of a million images costs a few entries, not its whole listing; linked sub-folders
    are walked as the scan walks them, each real folder once."""
    known = set(IMAGE_EXTENSIONS) | set(AUDIO_EXTENSIONS)
    below, seen = [os.fspath(folder)], set()
    while below:
        path = below.pop()
        real = os.path.realpath(path)
        if real in seen:  # a link back into a folder already walked
            continue
        seen.add(real)
        try:
            with os.scandir(path) as entries:
                for e in entries:
                    if e.is_dir():
                        below.append(e.path)
                    elif os.path.splitext(e.name)[1].lower() in known:
                        return True
        except OSError:
            return True
    return False


def holds_class_folders(folders: Iterable[str | os.PathLike]) -> bool:
    """Whether two of ``folders`` hold data files (`holds_data_files`): the class folders of a
    folder of images or audio, beside which stray shards or Parquet files are not data. It
    looks no further than the second."""
    return len(list(itertools.islice((f for f in folders if holds_data_files(f)), 2))) == 2
