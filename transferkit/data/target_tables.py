"""Multilabel and regression targets from a CSV file: ``path`` then one column per output.

A header row is required; its first column is ``path`` (relative paths are relative to
the CSV's folder). The other columns:

- **regression**: one column per output, a number in each row (``path,age`` or
  ``path,x,y``). Column names are the output names; ``classes=[...]`` picks and orders
  columns by name.
- **multilabel**, either one column per label holding 1 or 0 (or a soft target in
  [0, 1]: ``path,cat,dog,bird``), or one ``labels`` column holding the row's label names
  separated by ``;`` (``path,labels`` then ``a.jpg,cat;dog``; an empty cell is an image with
  no label; the names as ``transferkit predict --csv`` writes them in its ``labels`` column).
  The label names are
  ``classes=[...]``, else the sorted names the rows use; names outside ``classes`` are left
  out with a warning. A label that reads as labels of the file joined with ``,``, ``|`` or
  ``/`` (``dark|x`` beside ``dark``) gets a warning (it is a label of its own; it may be
  meant as one: ``animal/cat`` beside ``animal``); labels that differ only in case (``Cat``,
  ``cat``) are a [`DataError`][transferkit.DataError].

Output names (columns, labels, ``classes``) holding a line break, tab or other control
character are a `DataError`: exports store them and ``transferkit predict`` prints them.

Every row is read and checked when the data are opened (a number per output, finite, in
[0, 1] for multilabel), and a bad one is a [`DataError`][transferkit.DataError] naming its
row and column. The images are pre-scanned as the images of class folders are
(``on_bad_file``, ``scan``).

Example:
    >>> ds = open_target_csv("faces.csv", task="regression")  # doctest: +SKIP
    >>> ds.classes, ds.samples[0]  # doctest: +SKIP
    (['age'], ('/data/faces/0001.jpg', (34.0,)))
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from transferkit.data.checks import (DataReport, check_label_names, class_order, every_file_bad, filter_bad_images, nfc,
                                     parse_number)
from transferkit.data.folders import (check_listed_files, csv_file_key, csv_file_path, other_separator,
                                      read_csv_rows)
from transferkit.data.images import ImageFolderDataset
from transferkit.errors import DataError

LABEL_LIST_COLUMN = "labels"  # multilabel: label names separated by LABEL_SEPARATOR
LABEL_SEPARATOR = ";"
OTHER_SEPARATORS = (",", "|", "/")  # what a label list written with another separator holds
FLOAT32_MAX = float(np.finfo(np.float32).max)


def is_csv(data: object) -> bool:
    """Whether ``data`` names a ``.csv`` file."""
    return isinstance(data, (str, Path)) and str(data).lower().endswith(".csv")


def scan_target_csv(csv_path: str | Path, *, task: str, classes: Sequence[str] | None = None,
                    report: DataReport | None = None,
                    purpose: str = "training") -> tuple[list[tuple[str, tuple[float, ...]]], list[str]]:
    """``[(path, target values)]`` and the output names of a multilabel or regression CSV
    (see the module docstring). ``purpose``: ``"training"``, ``"validation"`` (``classes``: the
    training data's outputs), or ``"scoring"`` (`evaluate`:
    ``classes`` are the model's outputs), as the messages say it."""
    report = report if report is not None else DataReport()
    csv_path = Path(csv_path)
    where = repr(str(csv_path))
    rows = read_csv_rows(csv_path)
    example = "'path,labels' (names separated by ';') or 'path,cat,dog' (1 or 0)" if task == "multilabel" else \
        "'path,age' or 'path,x,y'"
    if not rows or rows[0][0].strip().lower() != "path" or len(rows[0]) < 2:
        raise DataError(f"{where} needs a header row for task={task!r}: 'path' and then one column per output, e.g. "
                        f"{example}.")
    header = [h.strip() for h in rows[0]]
    body = rows[1:]
    if not body:
        raise DataError(f"{where} has a header but no rows.")
    short = [i + 2 for i, r in enumerate(body) if len(r) != len(header)]
    if short:
        raise DataError(f"{where}: rows {short[:5]} do not have the header's {len(header)} columns (a value holding "
                        f"a comma must be quoted){other_separator([body[i - 2] for i in short])}.")
    blank = [i + 2 for i, r in enumerate(body) if not r[0].strip()]
    if blank:
        raise DataError(f"{where}: rows {blank[:5]} have an empty path; give each row a path, or remove the rows.")
    if task == "multilabel" and [h.lower() for h in header[1:]] == [LABEL_LIST_COLUMN]:
        targets, names = _label_lists(body, classes, where, report)
    else:
        targets, names = _columns(header, body, classes, task, where, purpose)
        if task == "multilabel":
            check_label_names(names, f"{where} (its label columns)", task=task)
    check_label_names(names, f"{where} (its output names)", case=False, task=task)
    samples: list[tuple[str, tuple[float, ...]]] = []
    seen: dict[str, tuple[float, ...]] = {}
    for i, (r, t) in enumerate(zip(body, targets)):
        path, key = csv_file_path(csv_path, r[0]), csv_file_key(csv_path, r[0])
        if seen.setdefault(key, t) != t:
            raise DataError(f"{where} lists {r[0].strip()!r} twice (however spelled) with different targets "
                            f"({seen[key]} and {t}, row {i + 2}): one image cannot have two true answers. Keep one "
                            "row.")
        samples.append((path, t))
    if len(seen) < len(samples):
        report.warn(f"{where} lists {len(samples) - len(seen)} file(s) more than once with the same target; they "
                    f"count that many times in {'the scores' if purpose == 'scoring' else purpose}.")
    check_listed_files(csv_path, [p for p, _ in samples])
    return samples, names


def _label_lists(body: list[list[str]], classes: Sequence[str] | None, where: str,
                 report: DataReport) -> tuple[list[tuple[float, ...]], list[str]]:
    # a label matches its class in either Unicode form (macOS writes decomposed names), as folders' do
    lists = [[nfc(x.strip()) for x in r[1].split(LABEL_SEPARATOR) if x.strip()] for r in body]
    used = class_order([x for labels in lists for x in labels])  # 0, 5, 10 in that order, as a CSV of classes
    check_label_names(used, f"{where} (its labels)", task="multilabel")
    _warn_joined_labels(lists, used, set(used) | set(classes or ()), where, report)
    names = list(classes) if classes is not None else used
    if not names:
        raise DataError(f"{where}: no row names a label; give each image its labels, separated by "
                        f"{LABEL_SEPARATOR!r}.")
    unknown = sorted(set(used) - {nfc(n) for n in names})
    if unknown:
        report.warn(f"{where} names labels {unknown[:10]} that are not among the classes {names[:10]}; they are left "
                    "out of the targets.")
    return [tuple(1.0 if nfc(n) in labels else 0.0 for n in names) for labels in map(set, lists)], names


def _warn_joined_labels(lists: list[list[str]], used: Sequence[str], known: set[str], where: str,
                        report: DataReport) -> None:
    """Warn about a label that reads as other labels joined with another separator (``dark|x``,
    ``dark, x`` beside ``dark``): it trains as a label of its own. A warning, not an error:
    such a label may be one (a hierarchical tag ``animal/cat`` beside ``animal``)."""
    for label in used:
        for sep in OTHER_SEPARATORS:
            parts = [x.strip() for x in label.split(sep) if x.strip()]
            if len(parts) > 1 and any(x in known for x in parts):
                i, labels = next((i, ls) for i, ls in enumerate(lists) if label in ls)
                fixed = LABEL_SEPARATOR.join(dict.fromkeys(x for y in labels for x in (parts if y == label else [y])))
                report.warn(f"{where}, row {i + 2}: the label {label!r} reads as the labels {parts} joined with "
                            f"{sep!r}, but labels are separated by {LABEL_SEPARATOR!r}, so it is a label of its own. "
                            f"If they are separate labels, write the row's labels as {fixed!r}.")
                return


def _columns(header: list[str], body: list[list[str]], classes: Sequence[str] | None, task: str,
             where: str, purpose: str = "training") -> tuple[list[tuple[float, ...]], list[str]]:
    columns = header[1:]
    if any(not c for c in columns) or len(set(columns)) < len(columns):
        raise DataError(f"{where}: the header's output columns {columns} need a name each, each name once.")
    joined = [c for c in columns if LABEL_SEPARATOR in c] if task == "multilabel" else []
    if joined:
        raise DataError(f"{where}: the label name {joined[0]!r} holds {LABEL_SEPARATOR!r}, which separates the labels "
                        f"of a '{LABEL_LIST_COLUMN}' column (and of predict's CSV output, where it would read as two "
                        "labels); rename the column.")
    names = list(classes) if classes is not None else columns
    absent = [n for n in names if n not in columns]
    if absent:
        why = {"training": "classes= names the columns to read",
               "validation": f"the training data's outputs are {names[:10]}: the validation CSV needs a column for "
                             "each",
               }.get(purpose, f"the model's outputs are {names[:10]}: the CSV needs a column for each")
        raise DataError(f"{where} has no column {absent[0]!r} ({why}); its columns "
                        f"are {columns}.")
    at = [header.index(n) for n in names]
    targets = []
    for i, r in enumerate(body):
        values = []
        for j, name in zip(at, names):
            cell = r[j].strip()
            v = parse_number(cell)
            if v is None or (task == "multilabel" and not 0.0 <= v <= 1.0) or abs(v) > FLOAT32_MAX:
                need = "1 or 0 (or a soft target in [0, 1])" if task == "multilabel" else \
                    f"a finite number within float32's range (+-{FLOAT32_MAX:.4g}: targets are read as float32)"
                names_hint = f" A column of label names is named '{LABEL_LIST_COLUMN}' (the names separated by " \
                    f"{LABEL_SEPARATOR!r})." if task == "multilabel" and v is None and len(names) == 1 else ""
                raise DataError(f"{where}, row {i + 2}, column {name!r}: {cell!r} is not {need}. Fix the value, or "
                                f"remove the row.{names_hint}")
            values.append(v)
        targets.append(tuple(values))
    return targets, names


def open_target_csv(csv_path: str | Path, *, task: str, classes: Sequence[str] | None = None,
                    min_size: int | None = None, on_bad_file: str = "skip", scan: str = "quick",
                    report: DataReport | None = None, purpose: str = "training") -> ImageFolderDataset:
    """The images a multilabel or regression CSV lists, pre-scanned, as a dataset of
    ``(image, target values)`` (``classes``: the output names; ``purpose`` as for
    `scan_target_csv`)."""
    report = report if report is not None else DataReport()
    listed, names = scan_target_csv(csv_path, task=task, classes=classes, report=report, purpose=purpose)
    before = len(report.bad_files)
    kept = filter_bad_images(listed, on_bad_file=on_bad_file, scan=scan, report=report)
    if not kept:
        raise every_file_bad(f"No readable images in {str(csv_path)!r}", report.bad_files[before:])
    return ImageFolderDataset(csv_path, classes=names, samples=kept, min_size=min_size, on_bad_file=on_bad_file,
                              report=report)


__all__ = ["is_csv", "open_target_csv", "scan_target_csv"]
