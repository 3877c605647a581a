"""Audio data: WAV/FLAC files read with soundfile, class folders and CSV file lists,
mono mix-down, resampling to the backbone's rate, pad/crop and waveform augmentations.

Waveforms travel as float32 tensors in [-1, 1]. Batches of clips of different lengths
are padded at the end with ``NaN`` (:data:`PAD_VALUE`): the audio trunks read the valid
length of each clip from the padding, so one plain ``[N, T]`` tensor carries waveforms
*and* lengths through the training loop, the feature cache, the exported TorchScript
file and the predictor. A batch without NaN is a batch of full-length clips.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from transferkit.backbones._base import InputSpec
from transferkit.errors import ConfigError, DataError, check_choice

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".aiff", ".aif")
PAD_VALUE = float("nan")
AUDIO_AUGMENTATIONS = ("none", "standard")


def load_audio(path: str | Path, sample_rate: int | None = None, *, mono: bool = True) -> torch.Tensor:
    """Read a WAV/FLAC/OGG file as float32 in [-1, 1], mixed down to mono ``[T]``
    (``mono=False``: ``[C, T]``) and resampled to ``sample_rate`` (None: keep the file's rate).

    Example:
        >>> wav = load_audio("../shared/data/fsdd/recordings/0_george_0.wav", 16000)  # doctest: +SKIP
        >>> wav.shape  # doctest: +SKIP
        torch.Size([4768])
    """
    wav, sr = read_audio(path)
    if mono:
        wav = wav.mean(0)
    return resample(wav, sr, sample_rate) if sample_rate else wav


def read_audio(path: str | Path) -> tuple[torch.Tensor, int]:
    """Read an audio file with soundfile: ``([C, T] float32 tensor, sample_rate)``."""
    import soundfile as sf

    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, OSError, ValueError, TypeError) as exc:  # sf.LibsndfileError is a RuntimeError
        raise DataError(f"Cannot read audio file {str(path)!r}: {type(exc).__name__}: {exc}. Supported: "
                        f"{', '.join(AUDIO_EXTENSIONS)} (read with soundfile/libsndfile).") from exc
    if data.shape[0] == 0:
        raise DataError(f"Audio file {str(path)!r} is empty (0 samples).")
    return torch.from_numpy(np.ascontiguousarray(data.T)), int(sr)


def resample(wav: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Band-limited resampling along the last axis (torchaudio's sinc interpolation)."""
    if int(orig_rate) == int(new_rate):
        return wav
    import torchaudio.functional as AF

    return AF.resample(wav, int(orig_rate), int(new_rate))


def pad_waveforms(waveforms: Sequence[torch.Tensor], length: int | None = None) -> torch.Tensor:
    """Stack 1-D waveforms into ``[N, T]``, padding at the end with NaN (the trunks read
    each clip's valid length from it); ``length`` crops or pads to a fixed T.

    Example:
        >>> pad_waveforms([torch.zeros(3), torch.zeros(2)]).isnan().sum().item()
        1
    """
    if not waveforms:
        raise DataError("pad_waveforms needs at least one waveform.")
    t = length or max(int(w.shape[-1]) for w in waveforms)
    out = torch.full((len(waveforms), t), PAD_VALUE, dtype=torch.float32)
    for i, w in enumerate(waveforms):
        w = torch.as_tensor(w, dtype=torch.float32).reshape(-1)[:t]
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
    (random in training, centred otherwise) or NaN-pad to ``spec.clip_seconds`` when set."""

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
            wav = wav.mean(0)
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


def scan_audio_folder(root: str | Path, classes: Sequence[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """``(path, class_index)`` for ``root/<class>/**/<audio file>``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Audio folder {str(root)!r} does not exist. Expected root/<class>/<clip>.wav "
                        "or a CSV file list with columns path,label.")
    found = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    classes = list(classes) if classes else found
    extra = [c for c in found if c not in classes]
    if extra:
        raise DataError(f"Folder {str(root)!r} has classes {extra} that the training data does not have "
                        f"(training classes: {classes}).")
    samples = [(os.path.join(dp, f), classes.index(c)) for c in found
               for dp, _, fs in sorted(os.walk(root / c)) for f in sorted(fs)
               if f.lower().endswith(AUDIO_EXTENSIONS) and not f.startswith(".")]
    if not samples:
        raise DataError(f"No audio files ({', '.join(AUDIO_EXTENSIONS)}) under {str(root)!r} in "
                        f"{len(found)} class folders. Expected root/<class>/<clip>.wav.")
    return samples, classes


def read_file_list(path: str | Path, classes: Sequence[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """A CSV file list with a header holding ``path`` and ``label`` columns; relative paths
    are relative to the CSV's folder. Classes are the sorted labels unless given."""
    path = Path(path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise DataError(f"File list {str(path)!r} must be a CSV with a header holding 'path' and 'label' columns "
                        f"(found {list(rows[0]) if rows else 'no rows'}).")
    labels = [r["label"] for r in rows]
    classes = list(classes) if classes else sorted(set(labels))
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise DataError(f"File list {str(path)!r} has labels {unknown[:5]} not in the classes {classes[:10]}.")
    return [(str(path.parent / r["path"]), classes.index(r["label"])) for r in rows], classes


class AudioDataset(Dataset):
    """Audio files as ``(transform(waveform), class_index)``; waveforms are mono float32
    at ``sample_rate``. Decoded clips are cached in memory (shared by all views) when
    ``cache=True``. Clips of different lengths are batched by :attr:`collate_fn`.

    Example:
        >>> ds = AudioDataset.from_source("clips/", sample_rate=16000)  # doctest: +SKIP
        >>> wav, label = ds[0]  # doctest: +SKIP
    """

    collate_fn = staticmethod(pad_collate)

    def __init__(self, samples: list[tuple[Any, int]], classes: Sequence[str], *, sample_rate: int,
                 transform: Callable | None = None, cache: bool = True, _store: dict | None = None) -> None:
        self.samples, self.classes, self.sample_rate = samples, list(classes), int(sample_rate)
        self.transform, self.cache = transform, cache
        self._store: dict[int, torch.Tensor] = {} if _store is None else _store

    @classmethod
    def from_source(cls, source: str | Path, *, sample_rate: int, classes: Sequence[str] | None = None,
                    **kw: Any) -> AudioDataset:
        """A class folder or a ``.csv`` file list."""
        scan = read_file_list if str(source).lower().endswith(".csv") else scan_audio_folder
        samples, names = scan(source, classes)
        return cls(samples, names, sample_rate=sample_rate, **kw)

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def waveform(self, i: int) -> torch.Tensor:
        """The decoded, mono, resampled clip ``i`` (no transform)."""
        key = id(self.samples[i])  # the sample tuples are shared by all views
        wav = self._store.get(key)
        if wav is None:
            wav = to_waveform(self.samples[i][0], self.sample_rate)
            if self.cache:
                self._store[key] = wav
        return wav

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        wav = self.waveform(i)
        return (self.transform(wav) if self.transform else wav), self.samples[i][1]

    def view(self, indices: Sequence[int] | None = None, transform: Callable | None = None) -> AudioDataset:
        """The same clips (or a subset) through another transform, sharing the cache."""
        samples = self.samples if indices is None else [self.samples[i] for i in indices]
        return AudioDataset(samples, self.classes, sample_rate=self.sample_rate, transform=transform,
                            cache=self.cache, _store=self._store)


def to_waveform(item: Any, sample_rate: int) -> torch.Tensor:
    """A path, a ``(waveform, rate)`` pair or a waveform already at ``sample_rate`` -> mono
    float32 ``[T]`` at ``sample_rate`` (int16 PCM is scaled to [-1, 1]).

    Example:
        >>> to_waveform((torch.zeros(2, 800), 8000), 16000).shape
        torch.Size([1600])
    """
    if isinstance(item, (str, Path)):
        return load_audio(item, sample_rate)
    rate = sample_rate
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], (int, float)):
        item, rate = item
    wav = torch.as_tensor(np.asarray(item) if not isinstance(item, torch.Tensor) else item)
    if wav.dtype == torch.int16:
        wav = wav.float() / 32768.0
    wav = wav.float()
    if wav.ndim == 2:
        wav = wav.mean(0)
    if wav.ndim != 1 or wav.shape[0] == 0:
        raise DataError(f"A waveform must be a non-empty [T] or [C, T] array, got shape {tuple(wav.shape)}.")
    return resample(wav, int(rate), sample_rate)


def _audio_dataset(data: Any, spec: InputSpec, classes: list[str] | None, what: str) -> AudioDataset:
    if isinstance(data, AudioDataset):  # decoded again at the backbone's rate when it differs
        if data.sample_rate == int(spec.sample_rate):  # type: ignore[arg-type]
            return data
        return AudioDataset(data.samples, data.classes, sample_rate=int(spec.sample_rate), cache=data.cache)  # type: ignore[arg-type]
    if isinstance(data, (str, Path)):
        return AudioDataset.from_source(data, sample_rate=int(spec.sample_rate), classes=classes)  # type: ignore[arg-type]
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        if len(data) == 0:
            raise DataError(f"The {what} dataset is empty.")
        items = [data[i] for i in range(len(data))]
        if not all(isinstance(it, (tuple, list)) and len(it) in (2, 3) for it in items):
            raise DataError(f"A {what} audio dataset must hold (waveform, label) or (waveform, sample_rate, label).")
        samples = [((it[0], it[1]) if len(it) == 3 else it[0], int(it[-1])) for it in items]
        names = classes or [str(i) for i in range(max(t for _, t in samples) + 1)]
        return AudioDataset(samples, names, sample_rate=int(spec.sample_rate))  # type: ignore[arg-type]
    raise DataError(f"{what} audio data must be a folder, a .csv file list or a dataset of (waveform, label), "
                    f"got {type(data).__name__}.")


def prepare_audio_data(data: Any, val_data: Any = None, *, spec: InputSpec, val_split: float = 0.2, seed: int = 0,
                       classes: Sequence[str] | None = None):
    """The audio counterpart of :func:`transferkit.data.prepare_data`: a folder
    ``root/<class>/<clip>.wav`` (or one holding ``train/`` and ``val/``), a CSV file list,
    or a dataset of ``(waveform, label)`` / ``(waveform, sample_rate, label)``.

    Example:
        >>> from transferkit.backbones import InputSpec
        >>> clips = [(torch.randn(800), i % 2) for i in range(8)]
        >>> bundle = prepare_audio_data(clips, spec=InputSpec(kind="audio", sample_rate=8000), val_split=0.25)
        >>> len(bundle.train), len(bundle.val), bundle.classes
        (6, 2, ['0', '1'])
    """
    from transferkit.data import DataBundle, _split_dirs, stratified_split

    if not spec.sample_rate:
        raise ConfigError(f"Audio data needs a backbone input spec with a sample_rate; got {spec}.")
    if isinstance(data, (str, Path)) and val_data is None and (pair := _split_dirs(Path(data))):
        data, val_data = pair
    train = _audio_dataset(data, spec, list(classes) if classes else None, "training")
    names = list(classes) if classes else train.classes
    if len(set(train.targets)) < 2:
        raise DataError("Training data has a single class; a classifier needs at least two.")
    bad = sorted({t for t in train.targets if not 0 <= t < len(names)})
    if bad:
        raise DataError(f"Training labels {bad[:5]} are outside 0..{len(names) - 1} for classes {names[:10]}.")
    val = None
    if val_data is not None:
        val = _audio_dataset(val_data, spec, names, "validation")
    elif val_split:
        tr_idx, va_idx = stratified_split(train.targets, val_split, seed)
        train, val = train.view(tr_idx), train.view(va_idx)
    return DataBundle(train=train, val=val, classes=names)  # type: ignore[arg-type]


_to_waveform = to_waveform  # the name the predictor looked for first
