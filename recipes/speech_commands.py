#!/usr/bin/env python
"""Speech Commands v0.02: 35 spoken words, 1 s clips at 16 kHz, the official
train/validation/test split (validation_list.txt and testing_list.txt).

Default: a log-mel CNN from scratch (``spec:tk:small_cnn``); try
``--backbone ta:wav2vec2_base --weights DEFAULT --policy unfreeze:last=4`` (pretrained, online).
Data: --data-dir holding the extracted data set (the folder with validation_list.txt,
directly or under SpeechCommands/speech_commands_v0.02), or --download to fetch it
through torchaudio. See docs/recipes/speech_commands.md.
"""

from pathlib import Path

from transferkit.errors import DataError
from transferkit.recipes import RecipeData, download_failed, recipe_main, run_recipe, speech_model_options

NOISE = "_background_noise_"


def find_root(root: Path) -> Path | None:
    for cand in (root, root / "SpeechCommands" / "speech_commands_v0.02", root / "speech_commands_v0.02"):
        if (cand / "validation_list.txt").is_file() and (cand / "testing_list.txt").is_file():
            return cand
    return None


def data(root: Path, options: dict) -> RecipeData:
    folder = find_root(root)
    if folder is None and options.get("download"):
        import torchaudio

        try:
            root.mkdir(parents=True, exist_ok=True)  # torch.hub writes its partial file there
            torchaudio.datasets.SPEECHCOMMANDS(str(root), download=True)
        except OSError as exc:  # no network (URLError is an OSError), a full disk
            raise DataError(download_failed("Speech Commands", root, exc, folders=False)) from exc
        folder = find_root(root)
    if folder is None:
        raise DataError(f"No Speech Commands data under {str(root)!r} (looked for validation_list.txt and "
                        "testing_list.txt). Pass --download (needs internet) or --data-dir pointing at the data.")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name != NOISE and not p.name.startswith("."))
    index = {c: i for i, c in enumerate(classes)}
    val_list = set((folder / "validation_list.txt").read_text().split())
    test_list = set((folder / "testing_list.txt").read_text().split())
    train, val, test = [], [], []
    for c in classes:
        for wav in sorted((folder / c).glob("*.wav")):
            rel = f"{c}/{wav.name}"
            (val if rel in val_list else test if rel in test_list else train).append((str(wav), index[c]))
    return RecipeData(train=train, val=val, test=test, classes=classes)


if __name__ == "__main__":
    recipe_main(lambda: run_recipe("speech_commands", data, description=__doc__,
                                   recipe_dir=Path(__file__).resolve().parent,
                                   run_settings=speech_model_options))
