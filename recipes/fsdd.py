#!/usr/bin/env python
"""Free Spoken Digit Dataset (FSDD): spoken digits 0-9, 8 kHz, 6 speakers.

Default: a small CNN on log-mel spectrograms (``spec:tk:small_cnn``), trained from
scratch, all inside one model that takes raw 8 kHz waveforms. Splits (``--split``):
``official`` (recordings with index 0-4 are the test set, 5-49 training) or
``speaker:<name>`` (that speaker's 500 recordings are the test set: speaker-independent).
10 % of the training recordings are held out for validation (best-epoch selection); the
test set is scored on the exported file. Data: --data-dir holding ``recordings/*.wav``
(or the WAV files themselves). Try ``--backbone ta:wav2vec2_base --weights DEFAULT`` (online;
the config's spectrogram options are left out, its 8 kHz sample rate and clip length kept:
the model resamples inside) or ``--backbone spec:tv:resnet18 --weights DEFAULT``. ``--threads N`` sets
torch's CPU threads. See docs/audio.md.
"""

import argparse
import re
import sys
from pathlib import Path

from transferkit.errors import DataError, closest, warn
from transferkit.helpformat import positive_whole_number
from transferkit.recipes import RecipeData, recipe_main, run_recipe, speech_model_options

CLASSES = [str(d) for d in range(10)]


NAME = re.compile(r"(\d)_([^_]+)_(\d+)\.wav")  # {digit}_{speaker}_{index}.wav


def fsdd_files(root: Path) -> list[Path]:
    """The WAV files of FSDD under ``root`` (``root/recordings`` or ``root``); hidden files (macOS
    ``._*`` sidecars) are not recordings, and other names are left out with a warning."""
    folder = root / "recordings" if (root / "recordings").is_dir() else root
    files, others = [], []
    for f in sorted(f for f in folder.glob("*.wav") if not f.name.startswith(".")):
        (files if NAME.fullmatch(f.name) else others).append(f)
    if files and others:
        warn(f"Left out {len(others)} WAV file(s) of {str(folder)!r} not named as FSDD's recordings "
             f"('{{digit}}_{{speaker}}_{{index}}.wav'), e.g. {[f.name for f in others[:3]]}.")
    if not files:
        raise DataError(f"No FSDD recordings ('{{digit}}_{{speaker}}_{{index}}.wav') under {str(folder)!r}. "
                        "Pass --data-dir pointing at the FSDD folder (it holds recordings/).")
    return files


def split_fsdd(files: list[Path], split: str) -> tuple[list, list]:
    """``(train, test)`` lists of ``(path, digit)`` for ``official`` or ``speaker:<name>``."""
    def parse(f: Path) -> tuple[int, str, int]:
        digit, speaker, index = NAME.fullmatch(f.name).groups()
        return int(digit), speaker, int(index)

    speakers = sorted({parse(f)[1] for f in files})
    if split == "official":
        held = lambda d, s, i: i < 5  # noqa: E731
    elif split.startswith("speaker:") and split[8:] in speakers:
        held = lambda d, s, i: s == split[8:]  # noqa: E731
    else:
        near = closest(split.removeprefix("speaker:"), ["official", *speakers], n=1)
        hint = f" Did you mean {(near[0] if near[0] == 'official' else 'speaker:' + near[0])!r}?" if near else ""
        raise DataError(f"Unknown FSDD split {split!r}.{hint} Use 'official' or 'speaker:<name>' with a name in "
                        f"{speakers}.")
    train, test = [], []
    for f in files:
        d, s, i = parse(f)
        (test if held(d, s, i) else train).append((str(f), d))
    return train, test


def fsdd_arguments(group: argparse.ArgumentParser) -> None:
    group.add_argument("--split", default="official",
                       help="'official' (indices 0-4 are the test set) or 'speaker:<name>' (speaker-independent)")
    group.add_argument("--threads", type=positive_whole_number, default=None,
                       help="torch CPU threads (default: torch's choice)")


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)

    def data(root: Path, options: dict) -> RecipeData:
        import torch  # here, not above: --help answers without loading it

        args = options["args"]
        if args.threads:
            torch.set_num_threads(args.threads)
        train, test = split_fsdd(fsdd_files(root), args.split)
        return RecipeData(train=train, val=None, test=test, classes=CLASSES)

    out = run_recipe("fsdd", data, description=__doc__, argv=argv, recipe_dir=Path(__file__).resolve().parent,
                     get_data="Clone github.com/Jakobovski/free-spoken-digit-dataset and pass --data-dir to it.",
                     add_arguments=fsdd_arguments, run_settings=speech_model_options)
    import torch

    print(f"threads: {torch.get_num_threads()}", file=sys.stderr)  # stdout holds the results, a JSON line per run
    return out


if __name__ == "__main__":
    recipe_main(main)
