"""Audio data: WAV/FLAC files read with soundfile, class folders and CSV file lists,
mono mix-down, resampling to the backbone's rate, pad/crop and waveform augmentations.

Waveforms travel as float32 tensors in [-1, 1]. Batches of clips of different lengths
are padded at the end with ``NaN`` (`PAD_VALUE`): the audio trunks read the valid
length of each clip from the padding, so one plain ``[N, T]`` tensor carries waveforms
*and* lengths through the training loop, the feature cache, the exported TorchScript
file and the predictor. A batch without NaN is a batch of full-length clips.
"""

from __future__ import annotations

import functools
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferkit.backbones._base import InputSpec
from transferkit.backbones.spectrogram import resample_ratio
from transferkit.config import MIN_CLIP_SECONDS, MIN_SAMPLE_RATE, VAL_SPLIT, check_seconds, is_rate, sample_rate_of
from transferkit.data.bundle import (
    DataBundle,
    check_training_classes,
    resolve_split_folders,
    split_keys,
    split_views,
    stratified_split,
    warn_validation_copies,
)
from transferkit.data.checks import (
    AUDIO_EXTENSIONS,
    AUDIO_FORMATS,
    NOT_LIBSNDFILE,
    ON_BAD_FILE,
    other_kind,
    SCANS,
    DataReport,
    every_file_bad,
    readable_samples,
    warn_copies_across_classes,
)
from transferkit.data.folders import scan_class_folders, scan_csv, warn_split_like_classes
from transferkit.data.images import class_index
from transferkit.data.late import FileDataset
from transferkit.model import AUDIO_CHANNELS_MAX, pcm_to_float
from transferkit._text import plural
from transferkit.errors import ConfigError, DataError, check_choice, unreadable_file, warn

PAD_VALUE = float("nan")
AUDIO_AUGMENTATIONS = ("none", "standard")
# clips longer than this are cropped to their middle (see prepare_audio_data): a 10-minute
# clip at 16 kHz is 38 MB of float32, and a batch of 32 of them 1.2 GB before the model runs
DEFAULT_MAX_SECONDS = 30.0


@functools.lru_cache(maxsize=1)
def audio_extensions() -> tuple[str, ...]:
    """The audio file extensions (of `AUDIO_FORMATS`) whose format the installed
    soundfile/libsndfile decodes: what folder scans and the predictor take as audio.

    Example:
        >>> ".wav" in audio_extensions()
        True
    """
    import soundfile as sf

    def decoded(fmt: str) -> bool:
        name, _, subtype = fmt.partition("/")
        return name in sf.available_formats() and (not subtype or subtype in sf.available_subtypes(name))

    return tuple(ext for ext, fmt in AUDIO_FORMATS.items() if decoded(fmt))


def undecodable_audio(paths: Sequence[str | Path]) -> list[str]:
    """The files among ``paths`` of a known audio type (`AUDIO_FORMATS`) that the installed
    libsndfile cannot decode (hidden files left out)."""
    decodable = audio_extensions()
    return sorted(str(p) for p in paths if not os.path.basename(p).startswith(".")
                  and str(p).lower().endswith(AUDIO_EXTENSIONS) and not str(p).lower().endswith(decodable))


def undecodable_reason(path: str | Path) -> str:
    """Why ``path`` (a file of a known audio type) is not read here: ``'MP3, a format the
    installed libsndfile 1.0.31 cannot decode'``."""
    import soundfile as sf

    ext = os.path.splitext(str(path))[1].lower()
    fmt = AUDIO_FORMATS[ext].replace("/", " ")
    if fmt in NOT_LIBSNDFILE:
        return f"{fmt}, a format libsndfile does not decode: convert it (e.g. ffmpeg -i in{ext} out.flac)"
    return f"{fmt}, a format the installed libsndfile {sf.__libsndfile_version__} cannot decode"


def undecodable_note(paths: Sequence[str | Path]) -> str:
    """A sentence on the files among ``paths`` of a known audio type that the installed
    libsndfile cannot decode (``''`` when there are none)."""
    hits = undecodable_audio(paths)
    if not hits:
        return ""
    names = ", ".join(os.path.basename(p) for p in hits[:3]) + (" ..." if len(hits) > 3 else "")
    reasons = "; ".join(sorted({undecodable_reason(p) for p in hits}))
    return f"{plural(len(hits), 'audio file')} ({names}) left out: {reasons}{_mp3_advice(hits)}."


def _mp3_advice(paths: Sequence[str]) -> str:
    return " (libsndfile decodes MP3 from version 1.1 on: pip install -U soundfile)" \
        if any(p.lower().endswith(".mp3") for p in paths) else ""


CANCELLING_MIX = 0.01  # a mix that peaks below this fraction of its loudest channel: the channels cancel


def mix_down(wav: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """``[C, T]`` -> ``[T]``, the channels' mean, with a warning where the channels cancel (the
    mix peaks below `CANCELLING_MIX` of its loudest channel, 40 dB down: a channel of inverted
    polarity), so the model would hear near silence without a word. NaN (padding) is ignored.

    Example:
        >>> mix_down(torch.ones(2, 4)).tolist()
        [1.0, 1.0, 1.0, 1.0]
    """
    mono = wav.mean(0)
    if wav.shape[0] > 1:
        loudest = float(wav.nan_to_num().abs().amax()) if wav.numel() else 0.0
        mix = float(mono.nan_to_num().abs().amax()) if mono.numel() else 0.0
        if loudest > 1e-3 and mix < CANCELLING_MIX * loudest:
            below = 20 * math.log10(loudest / max(mix, 1e-12))
            warn(f"The {wav.shape[0]} channels of {name or 'a waveform'} cancel when mixed down to mono: the mix "
                 f"peaks {below:.0f} dB below its loudest channel (a channel of inverted polarity?), so the model "
                 "hears near silence. Pass one channel, or invert the polarity of the inverted one.")
    return mono


def load_audio(path: str | Path, sample_rate: int | None = None, *, mono: bool = True,
               max_seconds: float | None = None) -> torch.Tensor:
    """Read a WAV/FLAC/OGG file as float32 in [-1, 1], mixed down to mono ``[T]``
    (``mono=False``: ``[C, T]``) and resampled to ``sample_rate`` (None: keep the file's rate).
    ``max_seconds``: read only the middle ``max_seconds`` of a longer file.

    Example:
        >>> wav = load_audio("../shared/data/fsdd/recordings/0_george_0.wav", 16000)  # doctest: +SKIP
        >>> wav.shape  # doctest: +SKIP
        torch.Size([4768])
    """
    wav, sr = read_audio(path, max_seconds=max_seconds)
    if mono:
        wav = mix_down(wav, repr(str(path)))
    return resample(wav, sr, sample_rate) if sample_rate else wav


def read_audio(path: str | Path, *, max_seconds: float | None = None) -> tuple[torch.Tensor, int]:
    """Read an audio file with soundfile: ``([C, T] float32 tensor, sample_rate)``; with
    ``max_seconds``, only the middle ``max_seconds`` of a longer file are read. A file with
    no samples, a truncated WAV or AIFF (`_truncation`), or NaN/inf samples (NaN marks padding
    in transferkit batches) raises [`DataError`][transferkit.DataError] naming the file."""
    import soundfile as sf

    if os.path.isfile(path) and os.path.getsize(path) == 0:  # said as the training scan says it
        raise DataError(f"Audio file {str(path)!r} is an empty file (0 bytes): a copy or write cut short.")
    try:
        with sf.SoundFile(str(path)) as f:
            cut, short = _truncation(f.extra_info or ""), _data_size_short(path)
            sr, frames = int(f.samplerate), int(f.frames)
            keep = frames if max_seconds is None else min(frames, max(1, int(round(max_seconds * sr))))
            if cut or short:  # nothing of it is read
                keep = 0
            elif keep < frames:
                f.seek((frames - keep) // 2)
            data = f.read(keep, dtype="float32", always_2d=True)
            if 0 < keep < frames and len(data) < keep:  # the header counts more than there is (an MP3 cut
                data = _middle_read(f, keep)              # short): the middle of what there is
    except (RuntimeError, OSError, ValueError, TypeError) as exc:  # sf.LibsndfileError is a RuntimeError
        raise unreadable_file("audio file", path, exc, other_kind(path, "audio") or _supported(path)) from exc
    if cut:
        raise DataError(f"Audio file {str(path)!r} is {cut}: a copy or download cut short. Copy it again.")
    if short:
        raise DataError(f"Audio file {str(path)!r} {short}: {DATA_SIZE_FIX}.")
    if sr < MIN_SAMPLE_RATE:
        raise DataError(f"Audio file {str(path)!r} says its rate is {sr} Hz, below {MIN_SAMPLE_RATE} Hz, lower than "
                        "audio is recorded at: its header is damaged or was edited. Write it again with its rate.")
    if data.shape[0] == 0:
        raise DataError(f"Audio file {str(path)!r} is empty (0 samples): a header without audio data.")
    check_finite(data, f"audio file {str(path)!r}")
    return torch.from_numpy(np.ascontiguousarray(data.T)), sr


def _middle_read(f: Any, keep: int, block: int = 1 << 16) -> np.ndarray:
    """The middle ``keep`` frames of what the open sound file ``f`` holds, read front to back
    twice (a count, then the frames; at most ``keep`` + ``block`` frames in memory): for a file
    whose header counts more frames than it holds (an MP3 cut short), where a seek lands by the
    header's count."""
    def blocks() -> Iterator[np.ndarray]:  # not SoundFile.blocks, which goes by the header's count
        f.seek(0)
        while len(b := f.read(block, dtype="float32", always_2d=True)):
            yield b

    total = sum(len(b) for b in blocks())
    start, parts, at = max(0, (total - keep) // 2), [], 0
    for b in blocks():
        lo, hi = max(start - at, 0), min(start + keep - at, len(b))
        if hi > lo:
            parts.append(b[lo:hi])
        at += len(b)
        if at >= start + keep:
            break
    return np.concatenate(parts) if parts else np.zeros((0, f.channels), np.float32)


def _supported(path: str | Path) -> str:
    """The formats this installation reads, for a file it could not (and why, for a known
    audio type its libsndfile cannot decode)."""
    hit = undecodable_audio([path])
    ext = os.path.splitext(str(path))[1].lower()
    readable = os.path.isfile(path) and os.access(path, os.R_OK)
    if not hit and readable and ext in audio_extensions():  # a type it reads: the file, not its type, is the trouble
        return (f"Its name says {ext[1:].upper()}, a type this installation reads: the file is damaged or holds "
                "something else (a copy or download cut short, another format renamed). Copy it again, or convert "
                "it.")
    why = f"The file is {undecodable_reason(path)}{_mp3_advice(hit)}. " if hit else ""
    return f"{why}Supported: {', '.join(audio_extensions())} (read with soundfile/libsndfile)."


def check_finite(samples: np.ndarray | torch.Tensor, what: str) -> None:
    """Raise [`DataError`][transferkit.DataError] when ``samples`` hold NaN or inf."""
    arr = samples.detach().cpu().numpy() if isinstance(samples, torch.Tensor) else np.asarray(samples)
    finite = np.isfinite(arr)
    if not finite.all():
        n_nan, n_inf = int(np.isnan(arr).sum()), int((~finite).sum() - np.isnan(arr).sum())
        raise DataError(f"The {what} holds non-finite samples ({n_nan} NaN, {n_inf} inf of {arr.size}); audio must "
                        "be finite (NaN marks padding in transferkit batches). Remove or repair it.")


LOUD_PEAK = 8.0
"""Float samples beyond this (in absolute value) are far outside [-1, 1]: PCM integers cast to
float without scaling, most likely (`loud_note`)."""


def float_peak(samples: Any) -> float:
    """The largest absolute value of in-memory float samples (a ``(waveform, rate)`` pair's
    waveform too; NaN padding aside); 0.0 for a file, PCM integers (they are scaled), an empty
    array, or samples holding inf (refused as non-finite where they are read)."""
    if isinstance(samples, tuple) and len(samples) == 2 and is_rate(samples[1]):
        samples = samples[0]
    if isinstance(samples, (str, Path)):
        return 0.0
    if isinstance(samples, torch.Tensor):
        if not samples.is_floating_point():
            return 0.0
        samples = samples.detach().cpu()
        arr = (samples if samples.dtype in (torch.float32, torch.float64) else samples.float()).numpy()
    else:
        arr = np.asarray(samples)
    if not np.issubdtype(arr.dtype, np.floating) or arr.size == 0:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all NaN: no peak
        peak = float(max(abs(np.nanmax(arr)), abs(np.nanmin(arr))))  # no copy of a long clip
    return peak if math.isfinite(peak) else 0.0


def loud_note(count: int, peak: float, example: str) -> str:
    """The warning for ``count`` in-memory waveforms of float samples far outside [-1, 1]."""
    return (f"{plural(count, 'waveform')} of float samples {'reaches' if count == 1 else 'reach'} far outside "
            f"[-1, 1] (up to {peak:g}, e.g. "
            f"{example}): float audio is read as samples in [-1, 1], as decoded files are, and these look like PCM "
            "integers cast to float. Divide int16 values by 32768, or pass them as int16 (scaled as files are).")


def crop_centre(wav: torch.Tensor, max_samples: int | None) -> torch.Tensor:
    """The middle ``max_samples`` of a ``[T]`` (or ``[C, T]``) waveform; shorter ones unchanged.

    Example:
        >>> crop_centre(torch.arange(10.0), 4).tolist()
        [3.0, 4.0, 5.0, 6.0]
    """
    t = int(wav.shape[-1])
    if max_samples is None or t <= max_samples:
        return wav
    start = (t - max_samples) // 2
    return wav[..., start:start + max_samples]


def resample(wav: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Band-limited resampling along the last axis (torchaudio's sinc interpolation), by the
    ratio `resample_ratio` gives."""
    if int(orig_rate) == int(new_rate):
        return wav
    import torchaudio.functional as AF

    orig, new = resample_ratio(orig_rate, new_rate)
    return AF.resample(wav, orig, new)


def pad_waveforms(waveforms: Sequence[torch.Tensor], length: int | None = None) -> torch.Tensor:
    """Stack 1-D waveforms into ``[N, T]``, padding at the end with NaN (the trunks read
    each clip's valid length from it); ``length`` crops or pads to a fixed T. PCM integers
    are scaled as `transferkit.model.pcm_to_float` does; a clip of several channels is
    refused (mix it down first).

    Example:
        >>> pad_waveforms([torch.zeros(3), torch.zeros(2)]).isnan().sum().item()
        1
    """
    if not waveforms:
        raise DataError("pad_waveforms needs at least one waveform.")
    t = length or max(int(w.shape[-1]) for w in waveforms)
    out = torch.full((len(waveforms), t), PAD_VALUE, dtype=torch.float32)
    for i, w in enumerate(waveforms):
        w = torch.as_tensor(w)
        if sum(int(d) > 1 for d in w.shape) > 1:
            raise DataError(f"pad_waveforms takes 1-D clips; clip {i} is shaped {tuple(w.shape)}. Mix it down to "
                            "mono first (e.g. clip.mean(0) for [channels, samples]).")
        try:
            w = pcm_to_float(w).to(torch.float32).reshape(-1)[:t]
        except ValueError as exc:  # integers of no known full scale
            raise DataError(f"pad_waveforms: clip {i} is {w.dtype}: {exc}.") from exc
        out[i, : w.shape[0]] = w
    return out


def pad_collate(batch: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """DataLoader ``collate_fn`` for clips of different lengths (dynamic NaN padding)."""
    xs, ys = zip(*batch)
    return pad_waveforms(xs), torch.as_tensor(ys, dtype=torch.long)


def valid_lengths(x: torch.Tensor) -> torch.Tensor:
    """Valid samples per row of a NaN-padded batch ``[N, T]`` (padding sits at the end)."""
    return (~torch.isnan(x)).sum(-1)


@dataclass(frozen=True)
class AudioAugment:
    """Waveform augmentations applied in training: a random time shift of up to
    ``shift_seconds`` either way, a random gain in ``±gain_db`` and Gaussian noise at a
    signal-to-noise ratio drawn from ``snr_db`` (each with probability ``p``).
    SpecAugment masks live inside the spectrogram/speech trunks (``spec_augment=``)."""

    shift_seconds: float = 0.1
    gain_db: float = 6.0
    snr_db: tuple[float, float] = (15.0, 40.0)
    p: float = 0.8

    def __call__(self, wav: torch.Tensor, sample_rate: int) -> torch.Tensor:
        g = torch.rand(4)
        if self.shift_seconds and g[0] < self.p:
            k = int(round((float(torch.rand(1)) * 2 - 1) * self.shift_seconds * sample_rate))
            wav = torch.cat([wav.new_zeros(k), wav]) if k > 0 else wav[-k:] if -k < wav.shape[0] // 2 else wav
        if self.gain_db and g[1] < self.p:
            wav = wav * 10 ** ((float(torch.rand(1)) * 2 - 1) * self.gain_db / 20)
        if self.snr_db and g[2] < self.p:
            lo, hi = self.snr_db
            snr = lo + float(torch.rand(1)) * (hi - lo)
            power = wav.pow(2).mean().clamp_min(1e-10)
            wav = wav + torch.randn_like(wav) * torch.sqrt(power / 10 ** (snr / 10))
        return wav


class AudioTransform:
    """Waveform at the spec's rate -> float32 ``[T]``: optional augmentation, then crop
    (at a random place with augmentation, centred otherwise) or NaN-pad to ``spec.clip_seconds`` when set."""

    def __init__(self, spec: InputSpec, augment: str | AudioAugment = "none") -> None:
        if not spec.sample_rate:
            raise ConfigError(f"An audio transform needs an input spec with a sample_rate, got {spec}.")
        if isinstance(augment, str):
            check_choice("audio augment", augment, AUDIO_AUGMENTATIONS)
            augment = AudioAugment() if augment == "standard" else None  # type: ignore[assignment]
        self.sample_rate = int(spec.sample_rate)
        self.augment: AudioAugment | None = augment  # type: ignore[assignment]
        self.clip = int(round(spec.clip_seconds * self.sample_rate)) if spec.clip_seconds else None

    def __call__(self, wav: torch.Tensor) -> torch.Tensor:
        wav = torch.as_tensor(wav, dtype=torch.float32)
        if wav.ndim == 2:
            wav = mix_down(wav)
        if self.augment is not None:
            wav = self.augment(wav, self.sample_rate)
        if self.clip is None:
            return wav
        if wav.shape[0] > self.clip:
            extra = wav.shape[0] - self.clip
            start = int(torch.randint(extra + 1, (1,))) if self.augment is not None else extra // 2
            return wav[start:start + self.clip]
        return pad_waveforms([wav], self.clip)[0]

    def __repr__(self) -> str:
        return f"AudioTransform(sample_rate={self.sample_rate}, clip={self.clip}, augment={self.augment})"


def _is_audio_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(audio_extensions())


def scan_audio_folder(root: str | Path, classes: Sequence[str] | None = None, *,
                      report: DataReport | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """``(path, class_index)`` for ``root/<class>/**/<audio file>``, by the rule image folders
    follow too (`transferkit.data.folders.scan_class_folders`): hidden sub-folders are not
    walked and are listed as ignored, unreadable folders are reported, a class folder the
    training ``classes`` lack is left out with a warning, a training class without a folder is
    reported, and a folder sharing no class with them is an error. Files of a known audio
    type the installed libsndfile cannot decode (MP3 before libsndfile 1.1) are ignored with
    a warning, their reason in ``report.ignored_reasons``."""
    report = report if report is not None else DataReport()
    first = len(report.ignored_files)
    samples, found = scan_class_folders(root, classes, is_data=_is_audio_file, report=report, what="audio files",
                                        layout="root/<class>/<clip>.wav", extensions=audio_extensions(),
                                        explain_ignored=undecodable_note)
    undecodable = undecodable_audio(report.ignored_files[first:])
    if undecodable:
        report.ignored_reasons.update((p, undecodable_reason(p)) for p in undecodable)
        report.warn(f"{str(root)!r}: {undecodable_note(undecodable)}")
    return samples, found


@dataclass(frozen=True)
class AudioFileInfo:
    """What the pre-scan learns from an audio file's header."""

    frames: int
    channels: int
    sample_rate: int

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate


def too_short(frames: int, rate: float) -> str | None:
    """Why a clip of ``frames`` samples at ``rate`` Hz is too short for an audio model (the
    trunks' first convolutions need `MIN_CLIP_SECONDS`), or None."""
    if frames >= MIN_CLIP_SECONDS * rate:
        return None
    ms = math.floor(10000 * frames / rate) / 10  # rounded down: 24.99 ms is not 25.0
    return (f"{ms:.1f} ms long ({frames} samples at {rate:g} Hz), shorter than the {1000 * MIN_CLIP_SECONDS:g} ms an "
            "audio model takes (prediction refuses it too)")


def probe_audio_file(path: str | Path, *, full: bool = False,
                     max_seconds: float | None = None) -> AudioFileInfo | str:
    """The header of ``path`` (soundfile.info: format, frame count, channels, rate), or why
    the file cannot be used: empty, not audio, a header without samples; with ``full``,
    the file is decoded too (finds NaN/inf samples and broken data): its middle
    ``max_seconds``, the part training and prediction read (None: all of it)."""
    import soundfile as sf

    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        info = sf.info(str(path))
    except (RuntimeError, OSError, ValueError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        known = f"; {undecodable_reason(path)}" if undecodable_audio([path]) else ""
        return f"cannot be read as audio ({type(exc).__name__}: {first}{known})"
    short = _data_size_short(path)
    if short:
        return f"{short}: {DATA_SIZE_FIX}"
    if info.frames <= 0:
        return "no audio data (0 frames): a header alone, or a file cut short"
    if info.channels < 1 or info.samplerate < MIN_SAMPLE_RATE:  # a few Hz: a damaged or hand-edited header
        return f"invalid header ({info.channels} channels at {info.samplerate} Hz; audio is recorded at " \
               f"{MIN_SAMPLE_RATE} Hz or more)"
    short = too_short(info.frames, info.samplerate)
    if short:
        return short
    cut = _truncation(getattr(info, "extra_info", "") or "")
    if not cut and info.format == "FLAC":  # its header declares the frames and no byte size
        cut = _tail_cut(path, int(info.frames), int(info.samplerate))
    if cut:
        return cut
    if full:
        try:
            read_audio(path, max_seconds=max_seconds)
        except DataError as exc:
            cause = exc.__cause__
            return f"cannot be decoded ({type(cause).__name__}: {cause})" if cause is not None else str(exc)
    return AudioFileInfo(frames=int(info.frames), channels=int(info.channels), sample_rate=int(info.samplerate))


# libsndfile's log of a file shorter than its header says: a WAV's data, an AIFF's SSND or a W64's riff chunk
# size, in bytes; an RF64's frame count (its ds64 chunk)
_CHUNK_CUT = re.compile(r"^\s*(?:data|SSND|riff)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_FRAMES_CUT = re.compile(r"Calculated frame count (\d+) does not match value from 'ds64' chunk of (\d+)")
# sizes recorders write while they stream a file they cannot seek back into (0xFFFFFFFF; arecord: 0x7FFFFF00):
# the samples are all there
_PLACEHOLDER = 0x7FFF0000


def _tail_cut(path: str | Path, frames: int, rate: int) -> str:
    """Why a FLAC file ends before the frames its header declares, from a read of its last part
    (5 % of the clip, at least 1,024 frames and at most one second): it has no byte size to
    compare, and cut short by a copy it declares the whole clip and fails where its end should
    be. A read that returns less than half of that part counts; ``""`` otherwise. (An MP3 is
    not read so: libmpg123 writes "error:" lines to stderr when a good file is seeked.)"""
    import soundfile as sf

    tail = min(max(1024, frames // 20), rate, frames)
    try:
        with sf.SoundFile(str(path)) as f:
            f.seek(frames - tail)
            got = len(f.read(tail, dtype="float32", always_2d=True))
    except (RuntimeError, OSError, ValueError, TypeError) as exc:  # sf.LibsndfileError is a RuntimeError
        return (f"truncated: its header declares {frames} frames and its last {tail} cannot be read "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    if 2 * got < tail:
        return f"truncated: its header declares {frames} frames and the file ends before its last {tail - got}"
    return ""


def _data_size_short(path: str | Path) -> str:
    """Why a WAV file's header misleads: its data chunk declares fewer bytes than the file holds
    after it, and what follows them is no chunk (its first three bytes are not printable ASCII,
    as a chunk's name and an appended tag's ``ID3`` are): only the declared part would be read
    (a data size of 1,000 bytes on a 1 s clip: 31 ms, without a word, or none at all: "0
    samples"). Read from the file's chunk headers (a few bytes each); ``""`` otherwise, and for
    other files, for sizes a streaming recorder left unwritten (they run past the end), and for
    zero bytes after the samples (padding).

    Example:
        >>> import struct, tempfile
        >>> path = Path(tempfile.mkdtemp()) / "short.wav"
        >>> fmt = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, 1, 8000, 16000, 2, 16)
        >>> _ = path.write_bytes(b"RIFF" + struct.pack("<I", 4 + len(fmt) + 8 + 4000) + b"WAVE" + fmt
        ...                      + b"data" + struct.pack("<I", 1000) + bytes(range(200)) * 20)
        >>> _data_size_short(path)
        'declares 1000 bytes of samples in its header, and 3000 more bytes follow them that are not a chunk'
    """
    try:
        with open(path, "rb") as f:
            head, size = f.read(12), os.fstat(f.fileno()).st_size
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return ""
            at = 12
            for _ in range(64):  # chunk by chunk to the data chunk
                f.seek(at)
                chunk = f.read(8)
                if len(chunk) < 8:
                    return ""
                declared = int.from_bytes(chunk[4:], "little")
                end = at + 8 + declared + (declared & 1)  # a chunk of an odd size is padded to an even one
                if chunk[:4] == b"data":
                    if end + 64 >= size:  # it runs to the end (or past it: a cut, said as truncated)
                        return ""
                    f.seek(end)
                    if all(32 <= b < 127 for b in f.read(3)):  # a chunk's name, or a tag's ('ID3')
                        return ""
                    f.seek(end)
                    if all(block.count(0) == len(block) for block in iter(lambda: f.read(1 << 20), b"")):
                        return ""  # zero bytes only: padding (a block-aligned writer's), no samples left out
                    return (f"declares {declared} bytes of samples in its header, and {size - end} more bytes "
                            "follow them that are not a chunk")
                at = end
    except OSError:
        return ""
    return ""


DATA_SIZE_FIX = ("the header's data size is wrong (a recording stopped early, a hand edit), and only the declared "
                 "samples would be read; write the file again from its source")


def _truncation(log: str) -> str:
    """Why a file is truncated, from libsndfile's header log (``soundfile.info(...).extra_info``):
    its header declares more samples than the file holds (by more than 64 bytes, a last
    partial frame and a pad byte: no cut); ``""`` otherwise, and for a size a streaming
    recorder left unwritten (`_PLACEHOLDER` or more)."""
    m = _CHUNK_CUT.search(log)
    if m is not None:
        declared, held = int(m.group(1)), int(m.group(2))
        if held + 64 < declared < _PLACEHOLDER:
            return (f"truncated: its header declares {declared} bytes of samples and the file holds {held} "
                    f"({held / declared:.0%} of the clip)")
    m = _FRAMES_CUT.search(log)
    if m is not None:
        held, declared = int(m.group(1)), int(m.group(2))
        if held + 1 < declared:
            return (f"truncated: its header declares {declared} frames and the file holds {held} "
                    f"({held / declared:.0%} of the clip)")
    return ""


def check_audio_file(path: str | Path, *, full: bool = False, max_seconds: float | None = None) -> str | None:
    """Why ``path`` cannot be used as audio, or ``None`` when it looks fine (`probe_audio_file`).

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "notes.wav"
        >>> _ = path.write_text("not audio")
        >>> check_audio_file(path).startswith("cannot be read as audio (LibsndfileError")
        True
    """
    found = probe_audio_file(path, full=full, max_seconds=max_seconds)
    return found if isinstance(found, str) else None


def filter_bad_audio(samples: Sequence[tuple[Any, int]], *, on_bad_file: str = "skip", scan: str = "quick",
                     report: DataReport | None = None, max_seconds: float | None = None,
                     rate: int | None = None) -> list[tuple[Any, int]]:
    """The audio counterpart of `transferkit.data.checks.filter_bad_images`: drop
    (``"skip"``, listed in ``report``) or reject (``"raise"``) file samples that fail
    `probe_audio_file` (``scan="quick"``: headers; ``"full"``: decode every file's middle
    ``max_seconds``, what training reads; ``"none"``: no check), and in-memory clips shorter
    than an audio model takes (``rate``: the rate of waveforms given without theirs; None: not
    checked), or under ``scan="full"`` that training could not read (NaN before a clip's end,
    inf). Clips longer than ``max_seconds`` are counted in one warning (they will be cropped)."""
    check_choice("on_bad_file", on_bad_file, ON_BAD_FILE)
    check_choice("scan", scan, SCANS)
    good, bad, long = [], [], []
    for i, (source, target) in enumerate(samples):
        if not isinstance(source, (str, Path)):  # in memory: its length is checked whatever the scan (no read)
            found = too_short(*_lengths([(source, target)], rate)[0]) if rate is not None else None
            if found is None and scan == "full" and rate is not None:  # read as training reads it (NaN, inf)
                try:
                    to_waveform(source, rate, max_seconds=max_seconds)
                except DataError as exc:
                    found = str(exc).rstrip(".")
            if found is None:
                good.append((source, target))
                continue
            source = f"in-memory item {i}"
        elif scan == "none":
            good.append((source, target))
            continue
        else:
            found = probe_audio_file(source, full=scan == "full", max_seconds=max_seconds)
        if isinstance(found, AudioFileInfo):
            good.append((source, target))
            if max_seconds is not None and found.seconds > max_seconds:
                long.append((found.seconds, str(source)))
            continue
        if on_bad_file == "raise":
            kind = "audio file" if isinstance(samples[i][0], (str, Path)) else "clip"
            said = str(found).rstrip(".")
            if "Remove or repair it" in said:  # the reason gives the fix already
                said = said[:said.rindex("Remove or repair it")].rstrip(" .;")
            raise DataError(f"Bad {kind} {str(source)!r}: {said}. Remove or repair it, or pass on_bad_file='skip' to "
                            "leave bad files out (they are listed in the result).")
        bad.append((str(source), found))
    if report is not None and bad:
        report.bad_files += bad
        shown = "; ".join(f"{p} ({r})" for p, r in bad[:5])
        clips = sum(p.startswith("in-memory item ") for p, _ in bad)
        what = " and ".join(plural(n, kind) for n, kind in ((len(bad) - clips, "bad audio file"),
                                                            (clips, "bad in-memory clip")) if n)
        report.warn(f"Left out {what}: {shown}{' ...' if len(bad) > 5 else ''}")
    if report is not None and long:
        _warn_long(report, long, max_seconds)  # type: ignore[arg-type]
    return good


def audio_window(max_seconds: float | None, clip_seconds: float | None) -> float | None:
    """The seconds of a clip that training and prediction keep (its middle): ``max_seconds``,
    never less than ``clip_seconds`` (None: whole clips).

    Example:
        >>> audio_window(30.0, 40.0), audio_window(30.0, 0.5), audio_window(None, 0.5)
        (40.0, 30.0, None)
    """
    return max(float(max_seconds), float(clip_seconds)) if max_seconds is not None and clip_seconds else max_seconds


def _warn_long(report: DataReport, long: list[tuple[float, str]], window: float) -> None:
    """``window``: `audio_window`, max_seconds or the backbone's longer clip_seconds."""
    secs, where = max(long)
    report.warn(f"Cropped {plural(len(long), 'clip')} longer than {window:g} s to their middle {window:g} s (the "
                "window kept of each clip: max_seconds, or the backbone's clip_seconds where that is longer; the "
                f"longest: {secs:.1f} s, {where}); pass a larger max_seconds (or None) to keep more, at the cost of "
                "memory per batch.")


class AudioDataset(FileDataset):
    """Audio files as ``(transform(waveform), class_index)``; waveforms are mono float32
    at ``sample_rate``, at most ``max_seconds`` long (the middle of a longer clip). Decoded
    clips are cached in memory (shared by all views) when ``cache=True``. Clips of
    different lengths are batched by `collate_fn`. A clip that fails to load
    (unreadable, NaN/inf samples) raises with ``on_bad_file="raise"``; with ``"skip"`` the
    next readable clip of its class takes its place and the file is listed in ``report``
    (see `transferkit.data.late`).

    Example:
        >>> ds = AudioDataset.from_source("clips/", sample_rate=16000)  # doctest: +SKIP
        >>> wav, label = ds[0]  # doctest: +SKIP
    """

    def __init__(self, samples: list[tuple[Any, int]], classes: Sequence[str], *, sample_rate: int,
                 transform: Callable | None = None, cache: bool = True, max_seconds: float | None = DEFAULT_MAX_SECONDS,
                 on_bad_file: str = "skip", report: DataReport | None = None, _store: dict | None = None,
                 known_bad: dict | None = None) -> None:
        check_choice("on_bad_file", on_bad_file, ON_BAD_FILE)
        check_seconds(max_seconds, "max_seconds")
        self.samples, self.classes, self.sample_rate = samples, list(classes), int(sample_rate)
        self.transform, self.cache, self.max_seconds, self.on_bad_file = transform, cache, max_seconds, on_bad_file
        self.report = report if report is not None else DataReport()
        self._store: dict[int, torch.Tensor] = {} if _store is None else _store
        self.known_bad: dict = {} if known_bad is None else known_bad

    @classmethod
    def from_source(cls, source: str | Path, *, sample_rate: int, classes: Sequence[str] | None = None,
                    scan: str = "quick", purpose: str = "training", **kw: Any) -> AudioDataset:
        """A class folder or a ``.csv`` file list, pre-scanned (``scan``, see `filter_bad_audio`;
        ``purpose``: what the data are read for, as `transferkit.data.folders.scan_csv` says it)."""
        report = kw.pop("report", None) or DataReport()
        if str(source).lower().endswith(".csv"):
            listed, names = scan_csv(source, classes, report=report, kind="audio", purpose=purpose)
        else:
            listed, names = scan_audio_folder(source, classes, report=report)
        kept = filter_bad_audio(listed, on_bad_file=kw.get("on_bad_file", "skip"), scan=scan, report=report,
                                max_seconds=kw.get("max_seconds", DEFAULT_MAX_SECONDS))
        samples = readable_samples(listed, kept, names, source=source, what="audio files", report=report)
        return cls(samples, names, sample_rate=sample_rate, report=report, **kw)

    batch_collate = staticmethod(pad_collate)  # clips of different lengths, padded

    def _decode(self, source: Any) -> torch.Tensor:
        return to_waveform(source, self.sample_rate, max_seconds=self.max_seconds)

    def waveform(self, i: int) -> torch.Tensor:
        """The decoded, mono, resampled (and cropped to ``max_seconds``) clip ``i`` (no transform);
        raises [`DataError`][transferkit.DataError] when it cannot be loaded."""
        return self._cached(self.samples[i])

    def _cached(self, sample: tuple[Any, int]) -> torch.Tensor:
        key = id(sample)  # the sample tuples are shared by all views
        wav = self._store.get(key)
        if wav is None:
            wav = self._decode(sample[0])
            if self.cache:
                self._store[key] = wav
        return wav

    def _load(self, j: int) -> torch.Tensor:
        return self._cached(self.samples[j])

    def view(self, indices: Sequence[int] | None = None, transform: Callable | None = None) -> AudioDataset:
        """The same clips (or a subset) through another transform, sharing the cache and the report."""
        samples = self.samples if indices is None else [self.samples[i] for i in indices]
        return AudioDataset(samples, self.classes, sample_rate=self.sample_rate, transform=transform,
                            cache=self.cache, max_seconds=self.max_seconds, on_bad_file=self.on_bad_file,
                            report=self.report, _store=self._store, known_bad=self.known_bad)


MAX_CHANNELS = AUDIO_CHANNELS_MAX
"""A 2-D waveform is ``[C, T]`` (torchaudio's layout), or ``[T, C]`` (soundfile's) when its
last axis holds at most this many channels and its first is longer."""


def to_waveform(item: Any, sample_rate: int, *, max_seconds: float | None = None,
                on_crop: Callable[[float], None] | None = None,
                on_loud: Callable[[float], None] | None = None) -> torch.Tensor:
    """A path, a ``(waveform, rate)`` pair or a waveform already at ``sample_rate`` -> mono
    float32 ``[T]`` at ``sample_rate`` (a 2-D waveform is ``[C, T]``, or ``[T, C]`` as
    ``soundfile.read`` returns it: see `MAX_CHANNELS`; PCM integers are scaled to [-1, 1],
    `transferkit.model.pcm_to_float`), at most
    ``max_seconds`` long (the middle of a longer clip). NaN at the end of an in-memory
    waveform is padding and is removed; NaN elsewhere, or inf, raises [`DataError`][transferkit.DataError].
    A pair's rate is any whole number (`sample_rate_of`: ``np.int64(44100)``, ``44100.0``).
    ``on_crop(seconds)`` is told the length of an in-memory waveform that ``max_seconds`` crops,
    ``on_loud(peak)`` the peak of float samples beyond `LOUD_PEAK` (`loud_note`).

    Example:
        >>> to_waveform((torch.zeros(2, 800), 8000), 16000).shape
        torch.Size([1600])
    """
    if isinstance(item, (str, Path)):
        return load_audio(item, sample_rate, max_seconds=max_seconds)
    rate = sample_rate
    if isinstance(item, tuple) and len(item) == 2 and is_rate(item[1]):
        item, rate = item[0], sample_rate_of(item[1], "sample rate of the (waveform, sample_rate) pair")
        if isinstance(item, (str, Path)):
            raise DataError(f"A (path, sample_rate) pair ({str(item)!r}, {rate}): a file's rate is read from the "
                            "file; pass the path alone.")
    elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], (str, bytes)):
        try:
            meant = f"(waveform, {int(item[1])})"
        except ValueError:  # ("fast", "²", "8 kHz")
            meant = "a number, e.g. (waveform, 16000)"
        raise DataError(f"A (waveform, sample_rate) pair's sample rate is a whole number of Hz, got {item[1]!r}: pass "
                        f"{meant}.")
    try:
        wav = torch.as_tensor(np.asarray(item) if not isinstance(item, torch.Tensor) else item.detach().cpu())
    except (TypeError, ValueError, RuntimeError) as exc:  # strings, ragged lists, objects
        raise DataError(f"Cannot read a {type(item).__name__} as a waveform ({exc}): pass a path, a [T] or [C, T] "
                        "array or tensor of samples, or a (waveform, sample_rate) pair.") from None
    given_float = wav.is_floating_point()  # not PCM integers, which are scaled
    try:
        wav = pcm_to_float(wav).float()
    except ValueError as exc:
        raise DataError(f"A waveform of dtype {str(wav.dtype).replace('torch.', '')}: {exc}.") from None
    given = tuple(wav.shape)  # as the caller passed it (before channels are mixed down)
    if time_first(tuple(wav.shape)):  # [T, C], as soundfile.read returns it
        wav = wav.T
    elif wav.ndim == 2 and wav.shape[0] > wav.shape[1] > MAX_CHANNELS:
        raise DataError(f"A 2-D waveform of shape {given} is ambiguous: [C, T] would be {given[0]} channels of "
                        f"{given[1]} samples, and [T, C] is read only up to {MAX_CHANNELS} channels. Pass it as "
                        "[C, T] (waveform.T).")
    if wav.ndim == 2:
        if wav.shape[0] == 0 or wav.shape[1] == 0:
            raise DataError(f"A waveform must be a non-empty [T] or [C, T] array, got shape {given} (no "
                            f"{'channels' if wav.shape[0] == 0 else 'samples'}).")
        # NaN at a channel's end is padding: mixing channels padded unequally would cut the clip to the shortest
        ends = wav.shape[1] - torch.cumprod(torch.isnan(wav).flip(-1).int(), -1).sum(-1)
        if bool((ends != ends[0]).any()):
            short = int(torch.argmin(ends))
            raise DataError(f"The channels of the waveform of shape {given} end at different samples (NaN at the end "
                            f"marks padding): channel {short} ends at sample {int(ends[short])}, channel "
                            f"{int(torch.argmax(ends))} at {int(ends.max())}. Pass channels of one length, or the "
                            "channel alone.")
        wav = mix_down(wav)
    if wav.ndim == 1:
        wav = wav[: int(valid_lengths(wav[None])[0])] if torch.isnan(wav[-1:]).any() else wav  # trailing padding
    if wav.ndim != 1 or wav.shape[0] == 0:
        padding = " (all of it NaN, which marks padding)" if wav.ndim == 1 and given[-1] else ""
        raise DataError(f"A waveform must be a non-empty [T] or [C, T] array, got shape {given}{padding}.")
    check_finite(wav, "waveform")
    if on_loud is not None and given_float and (peak := float_peak(wav)) > LOUD_PEAK:
        on_loud(peak)
    keep = None if max_seconds is None else max(1, int(round(max_seconds * float(rate))))
    if keep is not None and wav.shape[0] > keep and on_crop is not None:
        on_crop(wav.shape[0] / float(rate))
    return resample(crop_centre(wav, keep), int(rate), sample_rate)


def _audio_dataset(data: Any, spec: InputSpec, classes: list[str] | None, what: str, *, report: DataReport,
                   on_bad_file: str, scan: str, max_seconds: float | None) -> AudioDataset:
    rate = int(spec.sample_rate)  # type: ignore[arg-type]
    opts = {"on_bad_file": on_bad_file, "max_seconds": max_seconds, "report": report}
    if isinstance(data, AudioDataset):  # decoded again at the backbone's rate when it differs
        report.merge(data.report)
        return AudioDataset(data.samples, data.classes, sample_rate=rate, cache=data.cache,
                            _store=data._store if data.sample_rate == rate and data.max_seconds == max_seconds else None,
                            **opts)
    if isinstance(data, (str, Path)):
        return AudioDataset.from_source(data, sample_rate=rate, classes=classes, scan=scan, purpose=what, **opts)
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        if len(data) == 0:
            raise DataError(f"The {what} dataset is empty.")
        items = [data[i] for i in range(len(data))]
        if not all(isinstance(it, (tuple, list)) and len(it) in (2, 3) for it in items):
            raise DataError(f"A {what} audio dataset must hold (waveform, label) or (waveform, sample_rate, label).")
        samples = [((it[0], sample_rate_of(it[1], f"sample rate of {what} item {i} (waveform, sample_rate, label)"))
                    if len(it) == 3 else it[0], class_index(it[-1], i, kind="audio")) for i, it in enumerate(items)]
        named = next((i for i, (src, _) in enumerate(samples) if isinstance(src, tuple) and len(src) == 2
                      and isinstance(src[0], (str, Path)) and is_rate(src[1])), None)
        if named is not None:
            raise DataError(f"{what.capitalize()} item {named} gives a file path with a sample rate: a file carries "
                            "its own rate (it is resampled to the model's). Give (path, label).")
        pairs = sorted({t for it, (_, t) in zip(items, samples)
                        if len(it) == 2 and not isinstance(it[0], (str, Path))})  # (waveform, label)
        if not classes and pairs and pairs[0] >= MIN_SAMPLE_RATE:  # (waveform, sample_rate) without its label
            raise DataError(f"Every label of the {what} dataset's (waveform, label) items is {MIN_SAMPLE_RATE} or more "
                            f"({', '.join(map(str, pairs[:4]))}{', ...' if len(pairs) > 4 else ''}), as sample rates "
                            f"are: as class indices they would make {pairs[-1] + 1} classes. Items with a rate are "
                            "(waveform, sample_rate, label); labels are class indices 0, 1, ... (name them with "
                            "classes=[...], one name per index).")
        before = len(report.bad_files)
        samples = filter_bad_audio(samples, on_bad_file=on_bad_file, scan=scan, report=report, max_seconds=max_seconds,
                                   rate=rate)
        if not samples:
            raise every_file_bad(f"No readable clips in the {what} dataset", report.bad_files[before:])
        loud = [(peak, i) for i, (src, _) in enumerate(samples) if (peak := float_peak(src)) > LOUD_PEAK]
        if loud:
            peak, first = max(loud, key=lambda pair: pair[0])
            report.warn(loud_note(len(loud), peak, f"{what} item {first}"))
        if max_seconds is not None:
            long = [(n / r, f"in-memory item {i}") for i, (n, r) in enumerate(_lengths(samples, rate))
                    if n > max_seconds * r]
            if long:
                _warn_long(report, long, max_seconds)
        names = classes or [str(i) for i in range(max(t for _, t in samples) + 1)]
        return AudioDataset(samples, names, sample_rate=rate, **opts)
    raise DataError(f"{what} audio data must be a folder, a .csv file list or a dataset of (waveform, label), "
                    f"got {type(data).__name__}.")


def _lengths(samples: Sequence[tuple[Any, int]], rate: int) -> list[tuple[int, float]]:
    """``(samples, sample_rate)`` of in-memory clips (0 for files; they are probed by the scan)."""
    out = []
    for source, _ in samples:
        r = rate
        if isinstance(source, tuple) and len(source) == 2 and is_rate(source[1]):
            source, r = source[0], sample_rate_of(source[1])
        out.append((0, float(r)) if isinstance(source, (str, Path)) else (clip_frames(np.shape(source)), float(r)))
    return out


def time_first(shape: Sequence[int]) -> bool:
    """Whether a 2-D waveform of ``shape`` is ``[T, C]`` (as ``soundfile.read`` returns it: at
    most `MAX_CHANNELS` columns and more rows), not ``[C, T]``."""
    return len(shape) == 2 and shape[1] <= MAX_CHANNELS < shape[0]


def clip_frames(shape: Sequence[int]) -> int:
    """The samples per channel of a waveform of ``shape`` (``[T]``, ``[C, T]`` or ``[T, C]``)."""
    return int(shape[0] if time_first(shape) else shape[-1])


def prepare_audio_data(data: Any, val_data: Any = None, *, spec: InputSpec, val_split: float = VAL_SPLIT,
                       seed: int = 0, classes: Sequence[str] | None = None, on_bad_file: str = "skip",
                       scan: str = "quick",
                       max_seconds: float | None = DEFAULT_MAX_SECONDS):
    """The audio counterpart of [`transferkit.data.prepare_data`][transferkit.data.prepare_data]: a folder
    ``root/<class>/<clip>.wav`` (or one holding ``train/`` and ``val/``, ``valid/``,
    ``validation/`` or ``test/``), a CSV file list, or a dataset of ``(waveform, label)`` /
    ``(waveform, sample_rate, label)``.

    Every file is pre-scanned (``scan="quick"``: its header with ``soundfile.info``, frame
    count, channels, rate; ``"full"``: decoded too, which finds NaN/inf samples before
    training; ``"none"``). Bad files are left out and listed in ``bundle.report``
    (``on_bad_file="skip"``) or raise (``"raise"``); a file that fails when it is loaded
    later (NaN/inf samples, broken data) is handled as `transferkit.data.late` says.
    Clips longer than ``max_seconds`` (default 30; at least the backbone's
    ``clip_seconds``) are cropped to their middle, which bounds the memory of a batch;
    ``max_seconds=None`` keeps whole clips.

    Example:
        >>> from transferkit.backbones import InputSpec
        >>> clips = [(torch.randn(800), i % 2) for i in range(8)]
        >>> bundle = prepare_audio_data(clips, spec=InputSpec(kind="audio", sample_rate=8000), val_split=0.25)
        >>> len(bundle.train), len(bundle.val), bundle.classes
        (6, 2, ['0', '1'])
    """

    if not spec.sample_rate:
        raise ConfigError(f"Audio data needs a backbone input spec with a sample_rate; got {spec}.")
    check_choice("on_bad_file", on_bad_file, ON_BAD_FILE)
    check_choice("scan", scan, SCANS)
    max_seconds = audio_window(check_seconds(max_seconds, "max_seconds"), spec.clip_seconds)
    report = DataReport()
    data, val_data = resolve_split_folders(data, val_data, report, val_split=val_split)
    opts = {"report": report, "on_bad_file": on_bad_file, "scan": scan, "max_seconds": max_seconds}
    train = _audio_dataset(data, spec, list(classes) if classes else None, "training", **opts)
    names = list(classes) if classes else train.classes
    if isinstance(data, (str, Path)):
        warn_split_like_classes(names, repr(str(data)), report)
        warn_copies_across_classes(train.samples, names, repr(str(data)), report, kind="clip")
    check_training_classes(train.targets, names, report,
                           folder=isinstance(data, (str, Path)) and Path(data).is_dir())
    val = None
    if val_data is not None:
        val = _audio_dataset(val_data, spec, names, "validation", **opts)
        warn_validation_copies(train.samples, val.samples, report, what="clip")
    elif val_split:
        root = data if isinstance(data, (str, Path)) else None
        tr_idx, va_idx = stratified_split(train.targets, val_split, seed, keys=split_keys(train.samples, root))
        train, val = split_views(train, tr_idx, va_idx, targets=train.targets, names=names, val_split=val_split,
                                 report=report, what="clip")
    return DataBundle(train=train, val=val, classes=names, report=report)  # type: ignore[arg-type]


