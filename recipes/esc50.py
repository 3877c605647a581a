#!/usr/bin/env python
"""ESC-50: 2,000 five-second environmental recordings in 50 classes, 5 folds.
Fold 5 is the test set by default (``--set`` cannot change it: use ``--fold N``); the
others train, with ``val_split`` (10 %) of each class held out for validation: whole source
recordings, so that no recording is heard in training and in validation.

Default: a log-mel CIFAR ResNet-20 initialised from the CIFAR-10 weights in
../shared/data (``spec:tk:cifar_resnet20``): transfer from images to sound.
Data: --data-dir holding ``audio/*.wav`` and ``meta/esc50.csv`` (the ESC-50 GitHub
repository's layout). See docs/recipes/esc50.md.
"""

import argparse
from collections import Counter
from pathlib import Path

from transferkit.config import VAL_SPLIT
from transferkit.errors import DataError
from transferkit.recipes import RecipeData, recipe_main, run_recipe, speech_model_options


def read_esc50(root: Path, fold: int, val_split: float = 0.1, seed: int = 0) -> RecipeData:
    """The clips of the folds other than ``fold`` train, ``fold``'s are the test set, and
    ``val_split`` of the training clips of each class validate: whole source recordings (the
    ``src_file`` column; ESC-50 cut several clips from one recording and keeps them in one fold),
    drawn by a seeded hash, so that no recording is heard in training and in validation."""
    meta = root / "meta" / "esc50.csv"
    if not meta.is_file():
        raise DataError(f"No ESC-50 metadata at {str(meta)!r}. Clone or download the ESC-50 repository "
                        "(karolpiczak/ESC-50) and pass --data-dir pointing at it.")
    from transferkit.data.folders import read_csv_rows  # here, not above: --help answers without loading torch

    table = read_csv_rows(meta)  # UTF-8 with or without Excel's byte-order mark; unreadable text said in one line
    header = [c.strip() for c in table[0]] if table else []
    missing = [c for c in ("filename", "fold", "target", "category") if c not in header]
    if missing:
        raise DataError(f"{str(meta)!r} has no column {missing[0]!r} (its header: {header}); ESC-50's metadata "
                        "has filename, fold, target and category.")
    rows = [dict(zip(header, r)) for r in table[1:]]
    bad = next((r for r in rows if not (r.get("fold", "").strip().isdecimal()
                                        and r.get("target", "").strip().isdecimal())), None)
    if bad is not None:
        raise DataError(f"{str(meta)!r}: the row {bad} has no whole-number fold and target.")
    names = {int(r["target"]): r["category"] for r in rows}
    order = sorted(names)
    index = {target: k for k, target in enumerate(order)}  # a subset's targets (ESC-10's) need not be 0..N-1
    classes = [names[t] for t in order]
    folds = sorted({int(r["fold"]) for r in rows})
    if fold not in folds:
        raise DataError(f"--fold {fold} is not one of the folds in {str(meta)!r}: {folds}.")
    train, test = [], []
    for r in rows:
        item = (str(root / "audio" / r["filename"]), index[int(r["target"])], r.get("src_file") or r["filename"])
        (test if int(r["fold"]) == fold else train).append(item)
    from transferkit.data.encoded import hashed_unit

    held: set[str] = set()
    firsts = []  # of each class with two recordings or more, the first in hash order
    for label in range(len(classes)):
        clips = Counter(src for _, y, src in train if y == label)  # a recording's clips of the class
        order = sorted(clips, key=lambda s: hashed_unit(seed, s))
        want, count = round(val_split * sum(clips.values())), 0
        firsts += order[:1] if len(order) > 1 else []
        for src in order[:-1]:  # whole recordings, each that brings the count nearer val_split's (the first, as
            nearer = abs(count + clips[src] - want) - abs(count - want)  # near as none); the last trains
            if nearer < 0 or (nearer == 0 and count == 0):
                held.add(src)
                count += clips[src]
    if not held and val_split > 0:  # no recording as small as val_split: one of each class, not a split of clips
        held.update(firsts)
    return RecipeData(train=[(p, y) for p, y, src in train if src not in held],
                      val=[(p, y) for p, y, src in train if src in held] or None,  # None: finetune's own split
                      test=[(p, y) for p, y, _ in test], classes=classes)


def esc50_arguments(group: argparse.ArgumentParser) -> None:
    group.add_argument("--fold", type=int, default=5, help="the fold held out as the test set")


def main(argv: list[str] | None = None) -> dict:
    def data(root: Path, options: dict) -> RecipeData:
        settings = options["settings"]
        return read_esc50(root, options["args"].fold, settings.get("val_split", VAL_SPLIT), settings.get("seed", 0))

    return run_recipe("esc50", data, description=__doc__,
                      argv=argv, recipe_dir=Path(__file__).resolve().parent, add_arguments=esc50_arguments,
                      run_settings=speech_model_options,
                      get_data="Clone github.com/karolpiczak/ESC-50 and pass --data-dir to it.")


if __name__ == "__main__":
    recipe_main(main)
