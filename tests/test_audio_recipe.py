"""The FSDD recipe: its splits, and a run end to end on a tiny slice of the real data."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch

from transferkit import ConfigError, DataError
from transferkit.config import load_config, merge_config
from transferkit.export.torchscript import load_scripted

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "fsdd.py"


@pytest.fixture(scope="module")
def recipe():
    return runpy.run_path(str(RECIPE), run_name="recipe_under_test")


def test_fsdd_config_fits_finetune():
    cfg = merge_config(load_config(RECIPE.with_suffix(".yaml")), source="fsdd.yaml")
    assert cfg["backbone"].startswith("spec:") and cfg["backbone_options"]["sample_rate"] == 8000


def test_official_and_speaker_splits(recipe, shared_data):
    files = recipe["fsdd_files"](shared_data / "fsdd")
    train, test = recipe["split_fsdd"](files, "official")
    assert (len(train), len(test)) == (2700, 300)
    assert all(int(Path(p).stem.split("_")[2]) < 5 for p, _ in test)
    train, test = recipe["split_fsdd"](files, "speaker:theo")
    assert (len(train), len(test)) == (2500, 500)
    assert all("_theo_" in p for p, _ in test) and not any("_theo_" in p for p, _ in train)
    assert sorted({d for _, d in test}) == list(range(10))
    with pytest.raises(DataError, match="george"):
        recipe["split_fsdd"](files, "speaker:nobody")
    with pytest.raises(DataError, match=r"Unknown FSDD split 'speaker:theoo'\. Did you mean 'speaker:theo'\?"):
        recipe["split_fsdd"](files, "speaker:theoo")


def test_stray_files_beside_the_recordings_are_not_recordings(recipe, tmp_path):
    """A macOS '._0_george_5.wav' sidecar or a '0_george_6 copy.wav' crashed the recipe with a
    traceback (ValueError: too many values to unpack): a hidden file is no recording, and a name
    not FSDD's is left out with a warning."""
    folder = tmp_path / "recordings"
    folder.mkdir()
    for name in ("0_george_5.wav", "1_theo_0.wav", "._0_george_5.wav", "0_george_6 copy.wav", "notes_a_b_c.wav"):
        (folder / name).write_bytes(b"RIFF")
    with pytest.warns(UserWarning, match=r"Left out 2 WAV file\(s\) .* not named as FSDD's recordings .*"
                                         r"'0_george_6 copy\.wav'"):
        files = recipe["fsdd_files"](tmp_path)
    assert [f.name for f in files] == ["0_george_5.wav", "1_theo_0.wav"]
    assert recipe["split_fsdd"](files, "official") == ([(str(files[0]), 0)], [(str(files[1]), 1)])


def test_recipe_runs_on_a_tiny_slice(recipe, shared_data, tmp_path, capsys):
    out = tmp_path / "out"
    summary = recipe["main"](["--data-dir", str(shared_data / "fsdd"), "--limit", "3", "--epochs", "1",
                              "--out", str(out), "--set", "batch_size=8", "--set", "verbose=false"])
    assert 0.0 <= summary["test_acc"] <= 1.0
    lines = capsys.readouterr().out.splitlines()  # the results, a JSON line per run, and nothing else
    assert lines and all(json.loads(line) for line in lines)
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["backbone"] == "spec:tk:small_cnn"
    # what chose the data besides the folder: a run of another split or --limit is told apart by its record
    assert saved["options"] == {"split": "official", "threads": None, "limit": 3} == json.loads(lines[0])["options"]
    module, meta = load_scripted(out / "model.pt")
    assert meta["input_spec"]["kind"] == "audio" and meta["input_spec"]["sample_rate"] == 8000
    assert meta["labels"] == [str(d) for d in range(10)]
    with torch.no_grad():
        assert module(torch.zeros(2, 4000)).shape == (2, 10)


def test_recipe_options_are_real_argparse_options(recipe):
    from transferkit.recipes import build_parser

    parser = build_parser("fsdd", "FSDD", recipe["fsdd_arguments"])
    args = parser.parse_args(["--split", "speaker:theo", "--threads", "1"])
    assert args.split == "speaker:theo" and args.threads == 1
    assert "--split" in parser.format_help() and "fsdd options" in parser.format_help()


@pytest.mark.parametrize("backbone", [["--backbone=ta:wav2vec2_tiny"], ["--set", "backbone=ta:wav2vec2_tiny"]])
def test_a_speech_model_gets_the_sample_rate_not_the_configs_spectrogram_options(backbone, recipe, shared_data,
                                                                                 tmp_path):
    out = tmp_path / "out"
    summary = recipe["main"](["--data-dir", str(shared_data / "fsdd"), "--limit", "1", "--epochs", "1", *backbone,
                              "--weights", "none", "--out", str(out), "--set", "batch_size=4", "--set", "val_split=0",
                              "--set", "verbose=false"])
    assert summary["config"]["backbone"] == "ta:wav2vec2_tiny"
    assert summary["config"]["backbone_options"] == {"sample_rate": 8000, "clip_seconds": 0.8}
    with pytest.raises(ConfigError, match="cannot be built with the options"):  # options the user gave are kept
        recipe["main"](["--data-dir", str(shared_data / "fsdd"), "--limit", "1", "--epochs", "1", *backbone,
                        "--weights", "none", "--out", str(out), "--set", "backbone_options={n_mels: 16}"])


def test_another_spectrogram_backbone_leaves_out_the_configs_image_options(recipe, shared_data, tmp_path, capsys):
    """The config's image_options (tk:small_cnn's widths) went to any spec: backbone given with
    --backbone: spec:tv:resnet18, which the docs name, failed with 'unexpected keyword argument'."""
    summary = recipe["main"](["--data-dir", str(shared_data / "fsdd"), "--limit", "1", "--epochs", "1",
                              "--backbone", "spec:tk:cifar_resnet20", "--weights", "none", "--out",
                              str(tmp_path / "out"), "--set", "batch_size=4", "--set", "val_split=0",
                              "--set", "verbose=false"])
    options = summary["config"]["backbone_options"]
    assert "image_options" not in options and options["n_mels"] == 32 and options["clip_seconds"] == 0.8
    assert "image_options={'widths': [16, 32, 64]} (written for the config's spec:tk:small_cnn) does not apply to " \
        "spec:tk:cifar_resnet20; left out" in capsys.readouterr().err
    common = ["--data-dir", str(shared_data / "fsdd"), "--limit", "1", "--epochs", "1", "--backbone",
              "spec:tk:cifar_resnet20", "--weights", "none", "--out", str(tmp_path / "out2"), "--set", "batch_size=4",
              "--set", "val_split=0", "--set", "verbose=false"]
    fsdd_yaml = RECIPE.with_suffix(".yaml")  # the same file given with --config: the same rule
    summary = recipe["main"]([*common, "--config", str(fsdd_yaml)])
    assert "image_options" not in summary["config"]["backbone_options"]
    with pytest.raises(ConfigError, match="cannot be built with the options"):  # given beside the file: kept
        recipe["main"]([*common, "--set", "backbone_options={image_options: {widths: [4, 8, 8]}}"])
