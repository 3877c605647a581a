"""``predict`` on many files, some of them bad: each bad file gets its own error, the
others are predicted as if the bad ones were not there."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from transferkit.backbones import InputSpec
from transferkit.errors import TransferkitWarning
from transferkit.export.predictor import Predictor


class _MeanImage(torch.nn.Module):
    """[N, 3, H, W] uint8 -> two logits from the mean pixel; NaN for an all-white image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.float().mean((1, 2, 3)) / 255.0
        out = torch.stack([m, 1.0 - m], 1)
        return torch.where((m > 0.999)[:, None], torch.full_like(out, float("nan")), out)


class _MeanAudio(torch.nn.Module):
    """[N, T] NaN-padded -> two logits from the mean absolute value of the valid samples."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        valid = ~torch.isnan(x)
        m = torch.where(valid, x.abs(), torch.zeros_like(x)).sum(1) / valid.sum(1).clamp(min=1)
        return torch.stack([m, -m], 1)


def _predictor(module: torch.nn.Module, spec: InputSpec) -> Predictor:
    meta = {"labels": ["a", "b"], "task": "multiclass", "input_spec": spec.to_dict()}
    return Predictor(torch.jit.script(module), meta, source="test model")


def test_bad_image_files_get_an_error_each_and_the_rest_is_predicted(tmp_path):
    pred = _predictor(_MeanImage(), InputSpec(image_size=8))
    files = []
    for i, v in enumerate((30, 200, 90)):
        files.append(str(tmp_path / f"good{i}.png"))
        Image.fromarray(np.full((10, 10, 3), v, np.uint8)).save(files[-1])
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    Image.fromarray(np.full((10, 10, 3), 255, np.uint8)).save(tmp_path / "white.png")  # the model returns NaN
    inputs = [files[0], str(tmp_path / "text.jpg"), files[1], str(tmp_path / "missing.png"),
              str(tmp_path / "empty.png"), str(tmp_path / "white.png"), files[2]]
    with pytest.warns(TransferkitWarning, match=r"^4 of the 7 inputs gave no prediction \(e.g. Cannot read "
                                                r".*text.jpg.*\); each such prediction has ok False and error set "
                                                r"to why\.$"):
        preds = pred.predict(inputs, batch_size=2)  # a mistyped path printed an empty top_k, and nothing more
    assert [p.source for p in preds] == inputs
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one at a time, as the command line writes them: each error is said there
        assert [p.ok for p in pred.iter_predict(inputs, batch_size=2)] == [p.ok for p in preds]
    assert [p.ok for p in preds] == [True, False, True, False, False, False, True]
    assert "text.jpg" in preds[1].error and "missing.png" in preds[3].error and "empty.png" in preds[4].error
    assert "non-finite" in preds[5].error
    alone = pred.predict([files[0], files[1], files[2]])
    assert [p.probability for p in alone] == [preds[i].probability for i in (0, 2, 6)]
    assert str(preds[1]).startswith("error: ") and preds[1].label is None
    d = json.loads(json.dumps([p.to_dict() for p in preds]))
    assert d[1]["error"] == preds[1].error and "label" not in d[1] and "error" not in d[0]


def test_predict_proba_on_a_bad_file_offers_no_training_option_and_numpy_integers_are_counts(tmp_path):
    """predict_proba and outputs take no on_bad_file=, which their error advised; top_k and
    batch_size of NumPy were refused as not integers."""
    import pytest

    from transferkit.errors import DataError

    pred = _predictor(_MeanImage(), InputSpec(image_size=8))
    good = tmp_path / "good.png"
    Image.fromarray(np.full((10, 10, 3), 30, np.uint8)).save(good)
    (tmp_path / "bad.jpg").write_text("not an image")
    with pytest.raises(DataError, match=r"bad\.jpg") as exc:
        pred.predict_proba([str(good), str(tmp_path / "bad.jpg")])
    assert "on_bad_file" not in str(exc.value) and "predict() reports such files one by one" in str(exc.value)
    with pytest.raises(DataError, match="channels last") as exc:  # an array is no file: no word about files
        pred.outputs(np.zeros((3, 10, 10), np.uint8))
    assert "predict() reports" not in str(exc.value)
    top = pred.predict([str(good)] * 3, top_k=np.int64(2), batch_size=np.int64(2))
    assert [len(p.top_k) for p in top] == [2, 2, 2]
    import io

    with open(good, "rb") as f:  # an open file is one image (it was iterated as lines of bytes)
        from_file = pred.predict(f)
    from_bytes = pred.predict(io.BytesIO(good.read_bytes()))
    assert len(from_file) == len(from_bytes) == 1 and from_file[0].ok, from_file[0].error
    assert from_file[0].probability == from_bytes[0].probability == top[0].probability


def test_bad_audio_files_get_an_error_each_and_the_rest_is_predicted(tmp_path):
    pred = _predictor(_MeanAudio(), InputSpec(kind="audio", sample_rate=8000))
    good = [str(tmp_path / f"g{i}.wav") for i in range(2)]
    for i, g in enumerate(good):
        sf.write(g, np.full(800 + 100 * i, 0.1 * (i + 1), np.float32), 8000)
    sf.write(tmp_path / "nan.wav", np.full(800, np.nan, np.float32), 8000, subtype="FLOAT")
    sf.write(tmp_path / "inf.wav", np.full(800, np.inf, np.float32), 8000, subtype="FLOAT")
    (tmp_path / "header.wav").write_bytes((tmp_path / "g0.wav").read_bytes()[:44])
    (tmp_path / "text.wav").write_text("hello")
    inputs = [good[0], str(tmp_path / "nan.wav"), str(tmp_path / "inf.wav"), str(tmp_path / "header.wav"),
              str(tmp_path / "text.wav"), good[1]]
    preds = pred.predict(inputs)
    assert [p.ok for p in preds] == [True, False, False, False, False, True]
    assert "nan.wav" in preds[1].error and "non-finite" in preds[1].error
    assert "inf.wav" in preds[2].error and "non-finite" in preds[2].error
    assert "header.wav" in preds[3].error and "text.wav" in preds[4].error
    want = pred.predict(good)
    assert [p.probability for p in want] == [preds[0].probability, preds[5].probability]
    assert [p.source for p in pred.predict_folder(tmp_path) if not p.ok] == \
        sorted(str(tmp_path / n) for n in ("header.wav", "inf.wav", "nan.wav", "text.wav"))


def test_a_folder_named_like_a_file_is_said_to_be_a_folder(tmp_path):
    """A folder ``x.wav`` (or ``x.png``) in a list of inputs was "Format not recognised"."""
    img = _predictor(_MeanImage(), InputSpec(image_size=8))
    wav = _predictor(_MeanAudio(), InputSpec(kind="audio", sample_rate=8000))
    for pred, name in ((img, "dir.png"), (wav, "dir.wav")):
        (tmp_path / name).mkdir()
        got = pred.predict([str(tmp_path / name)])[0]
        assert not got.ok and ": a folder, not a file." in got.error and "predict_folder" in got.error


def test_a_file_of_the_other_kind_and_a_missing_folder_are_said_as_such(tmp_path):
    """A WAV given to an image model was "UnidentifiedImageError: cannot identify image file",
    an image given to an audio model "Format not recognised", and a missing 'photos/' "The
    image 'photos/' does not exist"."""
    img = _predictor(_MeanImage(), InputSpec(image_size=8))
    wav = _predictor(_MeanAudio(), InputSpec(kind="audio", sample_rate=8000))
    sf.write(tmp_path / "clip.wav", np.full(800, 0.1, np.float32), 8000)
    Image.fromarray(np.full((10, 10, 3), 30, np.uint8)).save(tmp_path / "cat.png")
    got = img.predict([str(tmp_path / "clip.wav")])[0]
    assert not got.ok and got.error.endswith("clip.wav': UnidentifiedImageError: cannot identify image file "
                                             f"'{tmp_path / 'clip.wav'}'. It is an audio file by its name (.wav), "
                                             "and images are read here (an image model): give image files.")
    got = wav.predict([str(tmp_path / "cat.png")])[0]
    assert not got.ok and got.error.endswith(". It is an image by its name (.png), and audio is read here (an "
                                             "audio model): give audio files.")
    (tmp_path / "sound.png").write_bytes((tmp_path / "clip.wav").read_bytes())  # the other kind by its content
    (tmp_path / "picture.wav").write_bytes((tmp_path / "cat.png").read_bytes())
    assert img.predict([str(tmp_path / "sound.png")])[0].error.endswith(
        ". It is an audio file (WAV) by its content, and images are read here (an image model): give image files.")
    assert wav.predict([str(tmp_path / "picture.wav")])[0].error.endswith(
        ". It is an image (PNG) by its content, and audio is read here (an audio model): give audio files.")
    got = img.predict([str(tmp_path / "photos") + "/"])[0]
    assert not got.ok and got.error.startswith("The folder '") and "photos/' does not exist" in got.error
    import tarfile

    with tarfile.open(tmp_path / "train-000.tar", "w") as tar:
        tar.add(tmp_path / "cat.png", arcname="k0.png")
    assert img.predict([str(tmp_path / "train-000.tar")])[0].error.endswith(
        "It is a tar archive (.tar): shards of labelled images are scored with `transferkit evaluate` (or trained on "
        "as data=); give image files to predict.")
    got = img.predict([tmp_path / "photos"])[0]  # Path("photos/") is Path("photos"): no kind is said
    assert got.error.startswith("The path '") and "photos' does not exist" in got.error


def test_a_folder_to_predict_says_which_images_it_leaves_out_for_their_names(tmp_path):
    """Images without an extension (downloads named by a hash) were left out of predict_folder
    without a word, where training says so."""
    pred = _predictor(_MeanImage(), InputSpec(image_size=8))
    Image.fromarray(np.full((10, 10, 3), 30, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((10, 10, 3), 90, np.uint8)).save(tmp_path / "3f9a0c", format="JPEG")
    with pytest.warns(TransferkitWarning, match=r"1 image without an extension \(e.g. '3f9a0c', JPEG\) is left out: "
                                                r"images are chosen by their extension .*Rename them"):
        preds = pred.predict_folder(tmp_path)
    assert [Path(p.source).name for p in preds] == ["a.png"]
