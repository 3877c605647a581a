"""Bad audio, built from scratch: every broken WAV gets a defined, reported outcome
(``on_bad_file`` as for images), NaN/inf samples are bad input named at load, and
``max_seconds`` bounds the memory of a batch."""

from __future__ import annotations

import os
import re
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import transferkit as tk
from transferkit.backbones import InputSpec
from transferkit.data.audio import (
    DEFAULT_MAX_SECONDS,
    AudioDataset,
    check_audio_file,
    load_audio,
    pad_collate,
    prepare_audio_data,
    to_waveform,
)
from transferkit.data.late import BadFileError
from transferkit.errors import DataError
from transferkit.train.loaders import make_loader

SPEC = InputSpec(kind="audio", sample_rate=8000)
RATE = 8000


def _tone(freq: float, n: int = 1600, seed: int = 0) -> np.ndarray:
    t = np.arange(n) / RATE
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(n)).astype(np.float32)


def _good_folder(root: Path, per_class: int = 4) -> Path:
    for c, f in (("high", 2000.0), ("low", 300.0)):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            sf.write(root / c / f"{c}_{i}.wav", _tone(f, 1600 + 200 * i, seed=i), RATE, subtype="PCM_16")
    return root


def _bad_wavs(folder: Path) -> dict[str, Path]:
    """Every kind of broken .wav (and an MP3 renamed .wav, which libsndfile >= 1.1 decodes)."""
    folder.mkdir(parents=True, exist_ok=True)
    sf.write(folder / "ok.wav", _tone(300), RATE, subtype="PCM_16")
    full = (folder / "ok.wav").read_bytes()
    files = {
        "zero": folder / "zero.wav",
        "header_only": folder / "header_only.wav",
        "text": folder / "text.wav",
        "no_channels": folder / "no_channels.wav",
    }
    files["zero"].write_bytes(b"")
    files["header_only"].write_bytes(full[:44])  # RIFF header, data chunk of 0 bytes
    files["text"].write_text("this is not a WAV file\n")
    bad = bytearray(full)
    bad[22:24] = struct.pack("<H", 0)  # channel count 0
    files["no_channels"].write_bytes(bytes(bad))
    return files


def _float_wav(path: Path, values: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, values.astype(np.float32), RATE, subtype="FLOAT")  # only float WAVs can hold NaN/inf
    return path


def test_an_ogg_file_cut_short_is_a_bad_file(tmp_path):
    """An Ogg file declares no length: cut short, libsndfile reads it as 0 frames or not at all,
    and the quick scan leaves it out either way."""
    if "OGG" not in sf.available_formats():
        pytest.skip("this libsndfile writes no Ogg files")
    whole = tmp_path / "whole.ogg"
    sf.write(whole, (0.3 * np.sin(np.arange(RATE) * 0.2)).astype(np.float32), RATE, format="OGG")
    assert check_audio_file(whole) is None
    data = whole.read_bytes()
    for share in (0.2, 0.5, 0.9):
        cut = tmp_path / f"cut{share}.ogg"
        cut.write_bytes(data[:int(len(data) * share)])
        reason = check_audio_file(cut)
        assert reason is not None and (reason.startswith("cannot be read as audio") or "cut short" in reason), reason


def test_every_broken_wav_is_found_by_the_header_scan(tmp_path):
    files = _bad_wavs(tmp_path)
    reasons = {k: check_audio_file(p) for k, p in files.items()}
    assert reasons["zero"] == "empty file (0 bytes)"
    assert reasons["header_only"] == "no audio data (0 frames): a header alone, or a file cut short"
    assert reasons["text"].startswith("cannot be read as audio")
    assert reasons["no_channels"].startswith("cannot be read as audio")
    assert check_audio_file(tmp_path / "ok.wav") is None
    assert check_audio_file(tmp_path / "missing.wav").startswith("cannot be read as audio")
    # shorter than the predictor takes: left out of training by the same rule (199 samples at 8 kHz < 25 ms)
    sf.write(tmp_path / "short.wav", _tone(300, 199), RATE, subtype="PCM_16")
    assert check_audio_file(tmp_path / "short.wav") == ("24.8 ms long (199 samples at 8000 Hz), shorter than the "
                                                        "25 ms an audio model takes (prediction refuses it too)")
    sf.write(tmp_path / "short.wav", _tone(300, 200), RATE, subtype="PCM_16")
    assert check_audio_file(tmp_path / "short.wav") is None
    with pytest.raises(DataError, match=r"is an empty file \(0 bytes\)"):  # read (predict) as scanned (training)
        load_audio(files["zero"], RATE)
    # one period; a type it reads is not listed as if it were not: the file is the trouble
    with pytest.raises(DataError, match=r"Error opening .*: Format not recognised\. Its name says WAV, a type this "
                                        r"installation reads: the file is damaged or holds something else"):
        load_audio(files["text"], RATE)
    (tmp_path / "text.xyz").write_text("no audio")
    with pytest.raises(DataError, match=r"Format not recognised\. Supported: \.wav"):
        load_audio(tmp_path / "text.xyz", RATE)


def test_an_mp3_renamed_wav_is_not_bad_when_libsndfile_decodes_it(tmp_path):
    if "MP3" not in sf.available_formats():
        pytest.skip("this libsndfile has no MP3 support")
    sf.write(tmp_path / "tone.mp3", _tone(300, 8000), RATE, format="MP3")
    os.rename(tmp_path / "tone.mp3", tmp_path / "tone.wav")
    assert check_audio_file(tmp_path / "tone.wav") is None
    wav = load_audio(tmp_path / "tone.wav", RATE)
    assert wav.shape[0] >= 8000 and torch.isfinite(wav).all()


def test_bad_audio_files_are_skipped_and_listed_or_raise(tmp_path):
    root = _good_folder(tmp_path / "clips")
    _bad_wavs(tmp_path / "clips" / "low")
    with pytest.warns(UserWarning, match="Left out 4 bad audio file"):
        bundle = prepare_audio_data(root, spec=SPEC, val_split=0)
    names = {Path(p).name for p, _ in bundle.report.bad_files}
    assert names == {"zero.wav", "header_only.wav", "text.wav", "no_channels.wav"}
    assert len(bundle.train) == 9  # 8 good + ok.wav
    for i in range(len(bundle.train)):  # every clip left decodes
        assert torch.isfinite(bundle.train[i][0]).all()
    with pytest.raises(tk.DataError, match=r"Bad audio file .*(zero|header_only|text|no_channels)\.wav"):
        prepare_audio_data(root, spec=SPEC, val_split=0, on_bad_file="raise")
    with pytest.raises(tk.ConfigError, match="on_bad_file"):
        prepare_audio_data(root, spec=SPEC, on_bad_file="ignore")


def test_unreadable_audio_file_is_a_bad_file(tmp_path, monkeypatch):
    root = _good_folder(tmp_path / "clips")
    locked = root / "low" / "locked.wav"
    sf.write(locked, _tone(300), RATE)
    import soundfile

    real_info = soundfile.info

    def info(path, *a, **k):  # what chmod 000 does for a user who is not root
        if Path(path).name == "locked.wav":
            raise soundfile.LibsndfileError(0, prefix="Error opening 'locked.wav': System error : Permission denied.")
        return real_info(path, *a, **k)

    monkeypatch.setattr(soundfile, "info", info)
    with pytest.warns(UserWarning, match="locked.wav"):
        bundle = prepare_audio_data(root, spec=SPEC, val_split=0)
    assert [Path(p).name for p, _ in bundle.report.bad_files] == ["locked.wav"]


@pytest.mark.parametrize("kind", ["nan", "inf", "one_nan"])
def test_non_finite_samples_are_bad_input_named_at_load(tmp_path, kind):
    values = {"nan": np.full(1600, np.nan), "inf": np.full(1600, np.inf),
              "one_nan": np.where(np.arange(1600) == 700, np.nan, _tone(300))}[kind]
    path = _float_wav(tmp_path / f"{kind}.wav", values)
    assert check_audio_file(path) is None  # the header is fine: only decoding finds it
    assert "non-finite" in check_audio_file(path, full=True)
    with pytest.raises(tk.DataError, match=f"{kind}.wav.*non-finite samples"):
        load_audio(path)
    from transferkit.data.audio import filter_bad_audio

    with pytest.raises(tk.DataError) as info:  # the reason's own fix was said, then another: "it.. Remove it"
        filter_bad_audio([(str(path), 0)], on_bad_file="raise", scan="full")
    assert str(info.value).count("Remove") == 1 and ".." not in str(info.value), str(info.value)
    with pytest.raises(tk.DataError, match="non-finite"):
        to_waveform(torch.tensor([0.1, float("inf"), 0.2]), RATE)
    # NaN at the end of an in-memory waveform is padding, not data
    assert to_waveform(torch.tensor([0.1, 0.2, float("nan")]), RATE).tolist() == pytest.approx([0.1, 0.2])


def test_a_channel_array_that_cannot_be_mixed_down_says_which_part_is_missing():
    nan, audio = torch.full((100,), float("nan")), torch.full((100,), 0.1)
    half = torch.cat([audio[:50], nan[:50]])  # NaN-padded at its end: mixing down cut the clip to 50 samples
    ends = r"The channels of the waveform of shape \(2, 100\) end at different samples .*: channel {} ends at sample "
    cases = [(torch.stack([nan, audio]), ends.format(0) + "0, channel 1 at 100"),
             (torch.stack([audio, half]), ends.format(1) + "50, channel 0 at 100. Pass channels of one length"),
             (torch.stack([nan, nan]), r"got shape \(2, 100\) \(all of it NaN"),  # the shape as passed
             (torch.zeros(0, 100), r"got shape \(0, 100\) \(no channels\)"),
             (torch.zeros(2, 0), r"got shape \(2, 0\) \(no samples\)")]
    for wav, message in cases:
        with pytest.raises(tk.DataError, match=message):
            to_waveform(wav, RATE)
    from transferkit.model import AudioPreprocess, preprocess_for  # an exported model's [N, C, T] input: the same

    # a clip shorter than an audio model takes, or soundfile's [T, 1] read as T clips of one sample: refused by
    # the scripted module (the exported file), and left to the predictor in Python (no graph break, no GPU wait)
    scripted = torch.jit.script(preprocess_for(InputSpec(kind="audio", sample_rate=2000)))  # 25 ms: 50 samples
    with pytest.raises(torch.jit.Error, match=r"a clip of 1 samples is shorter than the 50 the model takes \(25 ms "
                                              r"at its sample rate\); a clip read as \[T, C\] .* is x\.T"):
        scripted(audio[:, None])
    with pytest.raises(torch.jit.Error, match=r"a clip of 20 samples"):
        scripted(torch.stack([audio, torch.cat([audio[:20], nan[:80]])]))  # NaN pads it to the first's length
    assert scripted(torch.stack([audio, half])).shape == (2, 100)
    assert preprocess_for(InputSpec(kind="audio", sample_rate=2000))(audio[:, None]).shape == (100, 1)  # eager
    assert torch.jit.script(preprocess_for(InputSpec(kind="audio")))(audio[:1]).shape == (1, 1)  # no rate: no limit

    with pytest.raises(torch.jit.Error, match=r"the channels of a clip \[N, C, T\] end at different samples"):
        torch.jit.script(AudioPreprocess())(torch.stack([audio, half])[None])
    assert torch.jit.script(AudioPreprocess())(torch.stack([half, half])[None]).isnan().sum() == 50
    # soundfile's [T, C] layout in a batch read as 100 channels of 2 samples, and shapes that gave
    # tracebacks from deep inside the trunk
    with pytest.raises(torch.jit.Error, match=r"of 100 channels of 2 samples \(more channels than samples, and more "
                                              r"than 8\): a batch of soundfile's layout \[N, T, C\] is x.transpose"):
        torch.jit.script(AudioPreprocess())(torch.stack([audio, audio], 1)[None])
    array = torch.jit.script(AudioPreprocess())(torch.stack([audio] * 16)[None])  # 16 microphones: mixed down
    assert array.shape == (1, 100) and torch.allclose(array, audio[None])
    for shape in ([], [1, 1, 2, 100], [0, 100], [2, 0]):
        with pytest.raises(torch.jit.Error, match=r"audio input is a batch of waveforms \[N, T\].* got the shape "
                                                  + re.escape(str(shape))):
            torch.jit.script(AudioPreprocess())(torch.zeros(shape))
    assert to_waveform(torch.stack([audio, -audio]), RATE).abs().max() == 0  # two channels are mixed down
    assert to_waveform(audio.clone().requires_grad_(), RATE).tolist() == pytest.approx([0.1] * 100)  # no numpy error
    stereo = torch.stack([audio, audio * 3])  # [C, T], and [T, C] as soundfile.read returns it
    assert to_waveform(stereo, RATE).tolist() == pytest.approx([0.2] * 100)
    assert to_waveform(stereo.T.numpy(), RATE).tolist() == pytest.approx([0.2] * 100)
    with pytest.raises(tk.DataError, match=r"shape \(100, 12\) is ambiguous: .*Pass it as \[C, T\]"):
        to_waveform(torch.zeros(100, 12), RATE)  # more channels than [T, C] is read with
    assert to_waveform(torch.zeros(12, 100), RATE).shape == (100,)  # [C, T] with 12 channels


def test_nan_clip_during_training_is_replaced_and_reported_or_raises(tmp_path):
    root = _good_folder(tmp_path / "clips")
    _float_wav(root / "low" / "silence_nan.wav", np.full(1600, np.nan))
    bundle = prepare_audio_data(root, spec=SPEC, val_split=0)  # the quick scan cannot see NaN
    assert bundle.report.bad_files == []
    i = [Path(p).name for p, _ in bundle.train.samples].index("silence_nan.wav")
    with pytest.warns(UserWarning, match="silence_nan.wav.*failed to load during the run"):
        wav, label = bundle.train[i]
    assert label == bundle.classes.index("low") and torch.isfinite(wav).all()
    assert [Path(p).name for p in bundle.report.bad_at_load] == ["silence_nan.wav"]
    assert "non-finite" in dict(bundle.report.bad_files)[str(root / "low" / "silence_nan.wav")]
    # the same item gives the same replacement every time (reproducible epochs)
    torch.testing.assert_close(bundle.train[i][0], wav)
    loader = make_loader(bundle.train, batch_size=4, shuffle=False, device=torch.device("cpu"), num_workers=0)
    batches = [x for x, _ in loader]
    assert sum(len(x) for x in batches) == len(bundle.train) and not any(torch.isinf(x).any() for x in batches)
    assert len(bundle.report.bad_at_load) == 1  # reported once, not once per epoch or batch

    raising = prepare_audio_data(root, spec=SPEC, val_split=0, on_bad_file="raise")
    with pytest.raises(BadFileError, match="silence_nan.wav.*non-finite"):
        raising.train[i]
    with pytest.warns(UserWarning, match="Left out 1 bad audio file.*silence_nan.wav"):
        full = prepare_audio_data(root, spec=SPEC, val_split=0, scan="full")
    assert len(full.train) == 8


def test_finetune_on_audio_with_bad_files_trains_and_reports_them(tmp_path):
    root = _good_folder(tmp_path / "clips", per_class=6)
    _bad_wavs(tmp_path / "clips" / "high")
    _float_wav(root / "low" / "inf.wav", np.full(1600, np.inf))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = tk.finetune("spec:tk:small_cnn", weights=None, data=str(root), val_split=0.25,
                             backbone_options={"sample_rate": RATE, "n_mels": 16,
                                               "image_options": {"widths": [8, 8, 8]}},
                             policy="full", epochs=1, batch_size=4, verbose=False, num_workers=0)
    names = {Path(p).name for p, _ in result.data_report.bad_files}
    assert names == {"zero.wav", "header_only.wav", "text.wav", "no_channels.wav", "inf.wav"}
    assert [Path(p).name for p in result.data_report.bad_at_load] == ["inf.wav"]
    assert all(np.isfinite(row["train_loss"]) for row in result.history)


def test_long_clips_are_cropped_to_max_seconds_which_bounds_the_batch(tmp_path):
    root = _good_folder(tmp_path / "clips", per_class=2)
    long = _tone(300, RATE * 600)  # a 10-minute clip
    long[: RATE * 285] = 0.0  # silence, then the tone: the middle is kept
    sf.write(root / "low" / "long.wav", long, RATE, subtype="PCM_16")
    with pytest.warns(UserWarning, match=r"Cropped 1 clip longer than 30 s to their middle 30 s \(the window "
                                         r".*: max_seconds, .*600\.0 s"):
        bundle = prepare_audio_data(root, spec=SPEC, val_split=0)
    assert DEFAULT_MAX_SECONDS == 30.0
    i = [Path(p).name for p, _ in bundle.train.samples].index("long.wav")
    wav, _ = bundle.train[i]
    assert wav.shape == (30 * RATE,) and wav.abs().max() > 0.2  # the middle 30 s (the tone), not the silence
    batch, _ = pad_collate([bundle.train[j] for j in range(len(bundle.train))])
    assert batch.shape == (5, 30 * RATE)  # 4.8 MB for 5 clips instead of 96 MB
    whole = prepare_audio_data(root, spec=SPEC, val_split=0, max_seconds=None)
    assert whole.train[i][0].shape == (600 * RATE,)
    with pytest.warns(UserWarning, match="longer than 40 s"):  # never shorter than the backbone's clip_seconds
        longer = prepare_audio_data(root, spec=SPEC.replace(clip_seconds=40.0), val_split=0)
    assert longer.train[i][0].shape == (40 * RATE,)
    with pytest.raises(tk.ConfigError, match="max_seconds"):
        prepare_audio_data(root, spec=SPEC, max_seconds=0)
    # in-memory clips are cropped the same way
    clips = [(torch.from_numpy(_tone(300 + 1000 * (k % 2), RATE * (45 if k == 0 else 1))), k % 2) for k in range(4)]
    with pytest.warns(UserWarning, match="longer than 30 s"):
        mem = prepare_audio_data(clips, spec=SPEC, val_split=0)
    assert mem.train[0][0].shape == (30 * RATE,)


def test_the_full_scan_decodes_the_window_training_reads_not_the_whole_file(tmp_path):
    """A NaN outside the middle max_seconds is never read: the full scan keeps the file (it
    dropped it, decoding the whole recording); a NaN inside the window is found."""
    root = _good_folder(tmp_path / "clips", per_class=2)
    outside, inside = _tone(300, RATE * 60), _tone(300, RATE * 60)
    outside[RATE * 55] = np.nan  # at 55 s of 60: the middle 30 s are 15-45 s
    inside[RATE * 30] = np.nan
    _float_wav(root / "low" / "nan_outside.wav", outside)
    _float_wav(root / "low" / "nan_inside.wav", inside)
    with pytest.warns(UserWarning, match=r"Left out 1 bad audio file: .*nan_inside.wav \(.*non-finite"):
        bundle = prepare_audio_data(root, spec=SPEC, val_split=0, scan="full")
    names = [Path(p).name for p, _ in bundle.train.samples]
    assert "nan_outside.wav" in names and "nan_inside.wav" not in names
    i = names.index("nan_outside.wav")
    assert torch.isfinite(bundle.train[i][0]).all() and not bundle.report.bad_at_load  # as training reads it
    assert "non-finite" in check_audio_file(root / "low" / "nan_outside.wav", full=True)  # the whole file
    assert check_audio_file(root / "low" / "nan_outside.wav", full=True, max_seconds=30) is None


@pytest.mark.parametrize("max_seconds", [0.5, None])
def test_an_export_crops_long_clips_to_the_runs_max_seconds(tmp_path, max_seconds, capsys):
    root = _good_folder(tmp_path / "clips", per_class=3)
    result = tk.finetune("spec:tk:small_cnn", weights=None, data=str(root), val_split=0.34, max_seconds=max_seconds,
                         backbone_options={"sample_rate": RATE, "n_mels": 16, "image_options": {"widths": [8, 8, 8]}},
                         epochs=1, batch_size=4, verbose=False, num_workers=0, export=tmp_path / "m.pt")
    long = tmp_path / "long.wav"
    sf.write(long, _tone(300, RATE * 3), RATE, subtype="PCM_16")
    for predictor in (result.predictor(), tk.load(tmp_path / "m.pt")):
        assert predictor.max_seconds == max_seconds  # the run's window, not the 30 s default
        if max_seconds is None:
            assert predictor.predict([str(long)])[0].ok
        else:
            with pytest.warns(UserWarning, match=r"1 audio clip last longer than the model's window of 0.5 s "
                                                 r".*long.wav"):
                assert predictor.predict([str(long)])[0].ok
    # `transferkit inspect` says what a caller of the file (C++) does to the clips, and only the audio fields
    from transferkit.cli import main

    assert main(["inspect", str(tmp_path / "m.pt")]) == 0
    out = capsys.readouterr().out
    window = "" if max_seconds is None else "; the middle 0.5 s of a longer clip (its run's max_seconds)"
    assert f"input:       waveform [N, T] at 8000 Hz, mono, NaN-padded at the end{window}\n" in out, out
    assert 'input_spec:  {"channels": 1, "clip_seconds": null, "kind": "audio", "sample_rate": 8000}\n' in out


def test_audio_folders_follow_the_image_folder_rules(tmp_path):
    root = tmp_path / "data"
    _good_folder(root / "train")
    _good_folder(root / "test", per_class=2)
    (root / "train" / "low" / ".backup").mkdir()
    sf.write(root / "train" / "low" / ".backup" / "old.wav", _tone(2000), RATE)  # would teach "low" a high tone
    bundle = prepare_audio_data(root, spec=SPEC)
    assert len(bundle.train) == 8 and len(bundle.val) == 4  # test/ is the validation split
    assert [Path(p).name for p in bundle.report.ignored_folders] == [".backup"]
    other = tmp_path / "other"
    for c in ("cat", "dog"):
        (other / c).mkdir(parents=True)
        sf.write(other / c / "a.wav", _tone(500), RATE)
    with pytest.raises(tk.DataError, match="shares no class with the classes it is read for"):
        prepare_audio_data(root / "train", other, spec=SPEC)


def test_dataset_with_reporting_collate_survives_worker_processes(tmp_path):
    root = _good_folder(tmp_path / "clips")
    _float_wav(root / "high" / "nan.wav", np.full(1200, np.nan))
    ds = AudioDataset.from_source(root, sample_rate=RATE)
    loader = make_loader(ds, batch_size=3, shuffle=False, device=torch.device("cpu"), num_workers=2)
    with pytest.warns(UserWarning, match="nan.wav"):
        n = sum(len(y) for _, y in loader)
    assert n == len(ds) and [Path(p).name for p in ds.report.bad_at_load] == ["nan.wav"]


def test_the_predictor_crops_to_the_window_training_used_never_less_than_clip_seconds():
    from transferkit.export.metadata import audio_max_seconds

    def meta(clip, most):
        return {"input_spec": {"kind": "audio", "sample_rate": RATE, "clip_seconds": clip},
                "decisions": {"config": {"max_seconds": most}}}
    assert audio_max_seconds(meta(40.0, 30.0)) == 40.0  # training raised max_seconds to clip_seconds too
    assert audio_max_seconds(meta(0.5, 30.0)) == 30.0 and audio_max_seconds(meta(0.5, None)) is None
    assert audio_max_seconds({"input_spec": {"kind": "audio"}}) == DEFAULT_MAX_SECONDS


def test_a_flac_file_cut_short_is_found_by_the_quick_scan(tmp_path, capfd):
    """A FLAC declares its whole clip and holds no byte size to compare: cut in half by a copy, it
    passed the quick scan and failed only when decoded. Its last part is read. An MP3 is not read
    so: seeking a good one made libmpg123 print "error:" lines on stderr."""
    whole = tmp_path / "whole.flac"
    sf.write(whole, _tone(300, RATE * 3), RATE, format="FLAC")
    data = whole.read_bytes()
    (tmp_path / "cut.flac").write_bytes(data[: len(data) // 2])
    assert check_audio_file(whole) is None
    assert check_audio_file(tmp_path / "cut.flac").startswith("truncated: its header declares "), \
        check_audio_file(tmp_path / "cut.flac")
    if "MP3" in sf.available_formats():
        sf.write(tmp_path / "good.mp3", _tone(300, RATE), RATE, format="MP3", bitrate_mode="CONSTANT")
        capfd.readouterr()
        assert check_audio_file(tmp_path / "good.mp3") is None
        assert "error" not in capfd.readouterr().err


@pytest.mark.skipif("MP3" not in sf.available_formats(), reason="this libsndfile writes no MP3")
def test_an_mp3_cut_short_gives_the_middle_of_what_it_holds(tmp_path):
    """An MP3's header counts the frames of the whole file: cut short, the middle max_seconds
    were sought past its end ("empty (0 samples)") or read off-centre (its last part)."""
    sf.write(tmp_path / "long.mp3", _tone(300, RATE * 100), RATE, format="MP3", bitrate_mode="CONSTANT")
    data = (tmp_path / "long.mp3").read_bytes()
    for share in (4, 2):
        (tmp_path / "cut.mp3").write_bytes(data[: len(data) // share])
        held = load_audio(tmp_path / "cut.mp3", RATE, max_seconds=None)
        assert 95 / share < len(held) / RATE < 101 / share
        middle = load_audio(tmp_path / "cut.mp3", RATE, max_seconds=30)
        keep = min(len(held), 30 * RATE)
        start = (len(held) - keep) // 2
        assert torch.allclose(middle, held[start:start + keep], atol=1e-6)  # the decoder rounds after a seek


def test_a_header_that_claims_a_rate_of_a_few_hz_is_a_bad_file(tmp_path):
    """A WAV whose header says 1 Hz passed the scan as a 4944 s clip, was cropped to 30 samples
    and upsampled to 30 s of noise, trained on and labelled; in-memory rates so low are refused."""
    sf.write(tmp_path / "good.wav", _tone(300, 4944), RATE, subtype="PCM_16")
    data = bytearray((tmp_path / "good.wav").read_bytes())
    i = data.index(b"fmt ") + 12  # the sample rate field, and the byte rate after it
    data[i:i + 4], data[i + 4:i + 8] = (1).to_bytes(4, "little"), (2).to_bytes(4, "little")
    (tmp_path / "one.wav").write_bytes(bytes(data))
    assert check_audio_file(tmp_path / "good.wav") is None
    assert check_audio_file(tmp_path / "one.wav").startswith("invalid header (1 channels at 1 Hz")
    with pytest.raises(DataError, match=r"one.wav' says its rate is 1 Hz, below 1000 Hz"):
        load_audio(tmp_path / "one.wav", RATE)


def test_rates_with_few_common_factors_resample_by_a_nearby_ratio(tmp_path):
    """11127 Hz (a classic Mac rate) to 16000 Hz built a 16000 x 11127 kernel: seconds and gigabytes
    for half a second of audio. The nearest ratio of small terms gives the same sound."""
    from transferkit.backbones.spectrogram import RESAMPLE_TERMS, resample_ratio

    for orig, new in ((11127, 16000), (16000, 11127), (44101, 8000), (7999, 192000), (22254, 16000)):
        a, b = resample_ratio(orig, new)
        assert max(a, b) <= RESAMPLE_TERMS and abs(b / a - new / orig) <= 2e-4 * new / orig, (orig, new)
    assert resample_ratio(44100, 16000) == (441, 160)  # exact where its terms are small
    t = np.arange(11127 // 2) / 11127
    sf.write(tmp_path / "mac.wav", 0.5 * np.sin(2 * np.pi * 440 * t), 11127, subtype="FLOAT")
    got = load_audio(tmp_path / "mac.wav", 16000)
    want = 0.5 * torch.sin(2 * torch.pi * 440 * torch.arange(len(got)) / 16000)
    assert abs(len(got) - 8000) <= 1 and (got - want)[200:-200].abs().max() < 2e-3  # a 440 Hz tone stays one


@pytest.mark.parametrize("fmt, ext", [("WAV", "wav"), ("AIFF", "aiff"), ("RF64", "wav")])
def test_a_truncated_file_is_a_bad_file_not_a_shorter_clip(tmp_path, fmt, ext):
    """A WAV, AIFF or RF64 cut short by a copy was read as a shorter clip, by the scan, training
    and predict alike; its header says how long it should be. A size a streaming recorder left
    unwritten (0xFFFFFFFF; arecord's 0x7FFFFF00) is no cut: the samples are all there."""
    whole = tmp_path / f"whole.{ext}"
    sf.write(whole, _tone(300, 16000), RATE, format=fmt, subtype="PCM_16")
    data = whole.read_bytes()
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(data[: len(data) * 6 // 10])
    assert check_audio_file(whole) is None and check_audio_file(whole, full=True) is None
    assert check_audio_file(cut).startswith("truncated: its header declares ")
    with pytest.raises(DataError, match=r"cut\.\w+' is truncated: .* \(60% of the clip\): a copy or download "
                                        r"cut short"):
        load_audio(cut, RATE)
    if fmt == "WAV":
        for placeholder in (0xFFFFFFFF, 0x7FFFFF00):
            streamed = bytearray(data)
            i = streamed.index(b"data")
            streamed[i + 4:i + 8] = placeholder.to_bytes(4, "little")
            (tmp_path / "streamed.wav").write_bytes(bytes(streamed))
            assert check_audio_file(tmp_path / "streamed.wav") is None
            assert load_audio(tmp_path / "streamed.wav", RATE).shape == (16000,)
        sf.write(tmp_path / "long.wav", _tone(300, RATE * 60), RATE, subtype="PCM_16")  # 0.5 s cut from 60 s
        long = (tmp_path / "long.wav").read_bytes()
        (tmp_path / "long.wav").write_bytes(long[: len(long) - RATE])
        assert check_audio_file(tmp_path / "long.wav").startswith("truncated")


def test_a_wav_whose_header_declares_fewer_samples_than_it_holds_is_a_bad_file(tmp_path):
    """A data chunk declaring 1,000 of 32,000 bytes was read as 31 ms of a 1 s clip without a
    word, by the scans, training and predict alike; one declaring 0 bytes was said to be "a
    header without audio data". An appended tag after the samples is no such thing."""
    whole = tmp_path / "whole.wav"
    sf.write(whole, _tone(300, 16000), RATE, subtype="PCM_16")
    data = whole.read_bytes()
    i = data.index(b"data")
    for declared in (1000, 0, 1002, 998, 999):  # libsndfile logs sizes off a 4-byte boundary otherwise
        short = bytearray(data)
        short[i + 4:i + 8] = declared.to_bytes(4, "little")
        (tmp_path / "short.wav").write_bytes(bytes(short))
        after = 32000 - declared - declared % 2  # an odd chunk is padded
        said = f"declares {declared} bytes of samples in its header, and {after} more bytes follow them " \
            "that are not a chunk: the header's data size is wrong"
        assert check_audio_file(tmp_path / "short.wav") == f"{said} (a recording stopped early, a hand edit), and " \
            "only the declared samples would be read; write the file again from its source"
        with pytest.raises(DataError, match=re.escape(f"short.wav' {said}")):
            load_audio(tmp_path / "short.wav", RATE)
    (tmp_path / "tagged.wav").write_bytes(data + b"ID3\x03" + bytes(200))  # a tag appended by a player
    assert check_audio_file(tmp_path / "tagged.wav") is None
    assert load_audio(tmp_path / "tagged.wav", RATE).shape == (16000,)
    (tmp_path / "padded.wav").write_bytes(data + bytes(4096))  # zero bytes after the samples (a block-aligned
    assert check_audio_file(tmp_path / "padded.wav") is None  # writer's padding): no samples left unread
    assert torch.equal(load_audio(tmp_path / "padded.wav", RATE), load_audio(whole, RATE))


def test_w64_caf_and_au_files_are_read_and_m4a_is_said_not_ignored(tmp_path):
    """W64, CAF and AU files, which libsndfile reads, were left out of folders and predict as
    "not data by their extension"; M4A voice memos, which no libsndfile decodes, only counted in
    the summary's ignored files, without a warning that says to convert them."""
    from transferkit.data.audio import audio_extensions, prepare_audio_data

    assert {".w64", ".caf", ".au"} <= set(audio_extensions())
    for c, hz in (("high", 1200), ("low", 300)):
        (tmp_path / c).mkdir()
        for fmt, ext in (("WAV", "wav"), ("W64", "w64"), ("CAF", "caf"), ("AU", "au")):
            sf.write(tmp_path / c / f"{hz}.{ext}", _tone(hz, 1600), RATE, format=fmt, subtype="PCM_16")
        (tmp_path / c / "memo.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(100))
    with pytest.warns(UserWarning, match=r"2 audio files \(memo.m4a, memo.m4a\) left out: M4A, a format libsndfile "
                                         r"does not decode: convert it \(e.g. ffmpeg -i in.m4a out.flac\)"):
        bundle = prepare_audio_data(tmp_path, spec=InputSpec(kind="audio", sample_rate=RATE), val_split=0)
    assert len(bundle.train) == 8
    assert torch.equal(bundle.train[1][0], bundle.train[0][0])  # high/1200.au and high/1200.caf: the same clip
