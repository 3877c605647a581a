"""Turning user inputs into the raw batches an exported model takes, from its input spec.

Images: file paths, PIL images, numpy arrays (HxW or HxWxC, uint8 or float in [0, 1]) and
tensors ([C,H,W] or [N,C,H,W]) are resized and cropped as the spec says (the evaluation
transform used in training) and stacked into a uint8 (or float) batch ``[N, 3, H, W]``.
Audio: file paths, waveforms ``[T]`` at the model's rate (a ``[N, T]`` tensor is N clips) and
``(waveform, sample_rate)`` pairs go through the audio module's evaluation transform and are
NaN-padded into ``[N, T]``.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from PIL import Image

from transferkit.backbones._base import InputSpec
from transferkit.data import audio
from transferkit.data.checks import DataReport
from transferkit.data.folders import list_class_files, not_a_file, warn_unnamed
from transferkit.data.sampling import stack_images
from transferkit._text import hide_url
from transferkit.data.images import IMAGE_EXTENSIONS, check_image_tensor, image_from_array, load_image
from transferkit.data.transforms import eval_transform
from transferkit.errors import DataError, warn


class InputPipeline:
    """Single items -> model batches for one [`InputSpec`][transferkit.InputSpec].

    Example:
        >>> pipe = InputPipeline(InputSpec(image_size=32))
        >>> pipe.batch([np.zeros((40, 50, 3), np.uint8), torch.ones(3, 20, 20)]).shape
        torch.Size([2, 3, 32, 32])
    """

    def __init__(self, spec: InputSpec, *, max_seconds: float | None = None) -> None:
        self.spec = spec
        self.max_seconds = max_seconds  # audio: clips are cropped to their middle max_seconds, as in training
        self.cropped: list[str] = []  # audio longer than the model's window (`window_seconds`) met by `prepare`
        self.loud: list[tuple[float, str]] = []  # (peak, place) of waveforms of float samples far outside [-1, 1]
        self.audio = spec.kind == "audio"
        if self.audio:
            self._audio, self._to_waveform = audio, audio.to_waveform
            self._transform = audio.AudioTransform(spec)
            self.extensions: tuple[str, ...] = audio.audio_extensions()  # those this libsndfile decodes
        else:
            self._transform = eval_transform(spec)
            self.extensions = IMAGE_EXTENSIONS

    def forget(self) -> None:
        """Forget the clips met so far (`cropped`, `loud`): a call starts with none, whatever
        a call before it that failed had met."""
        self.cropped.clear()
        self.loud.clear()

    def split(self, inputs: Any) -> list[Any]:
        """One input or many -> a list of single items (a batch tensor/array is several); a path
        of any kind (``os.DirEntry``, ``PurePath``) is a `Path`."""
        return [Path(os.fsdecode(x)) if isinstance(x, os.PathLike) and not isinstance(x, Path) else x
                for x in self._split(inputs)]

    def _split(self, inputs: Any) -> list[Any]:
        batch_ndim = 2 if self.audio else 4
        if isinstance(inputs, Mapping):  # iterating it would predict on its keys
            raise DataError(f"Cannot predict on a {type(inputs).__name__}: pass one input or a list of them (the "
                            "inputs of a mapping: list(d.values())).")
        if isinstance(inputs, (bytes, bytearray, memoryview)):
            raise DataError(f"Cannot predict on {type(inputs).__name__}: pass a file path, or decode the bytes first "
                            "(PIL.Image.open(io.BytesIO(data)) for an image, soundfile.read(io.BytesIO(data)) for "
                            "audio).")
        if isinstance(inputs, np.ndarray) and inputs.ndim == 1 and inputs.dtype.kind in "UO":  # df.path.values
            return [str(x) if isinstance(x, str) else x for x in inputs]  # paths, or waveforms (dtype object)
        if self.audio and isinstance(inputs, (torch.Tensor, np.ndarray)) and inputs.ndim == 2 \
                and inputs.shape[1] <= audio.MAX_CHANNELS < inputs.shape[0]:
            return [inputs]  # one clip [T, C], as soundfile.read returns it (a batch [N, T] has N < T)
        if self.audio and isinstance(inputs, (torch.Tensor, np.ndarray)) and inputs.ndim == 2 \
                and inputs.shape[0] > inputs.shape[1] > audio.MAX_CHANNELS \
                and inputs.shape[1] < math.ceil(audio.MIN_CLIP_SECONDS * int(self.spec.sample_rate)):  # type: ignore
            n, k = inputs.shape
            raise DataError(f"An array of shape {(n, k)} is read as {n} clips of {k} samples each, shorter than the "
                            f"model takes ({1000 * audio.MIN_CLIP_SECONDS:g} ms); as one clip [T, C] of {k} channels "
                            f"it has more than the {audio.MAX_CHANNELS} channels read in that layout. Pass one clip "
                            "as [C, T] (x.T), or a batch as [N, T] with N clips of T samples.")
        if isinstance(inputs, (torch.Tensor, np.ndarray)) and inputs.ndim == batch_ndim:
            return list(inputs)
        # (waveform, sample_rate): a rate of any number type (np.int64 from pandas, 44100.0), checked when read
        pair = self.audio and isinstance(inputs, tuple) and len(inputs) == 2 and audio.is_rate(inputs[1])
        if isinstance(inputs, (str, os.PathLike, Image.Image, torch.Tensor, np.ndarray)) or pair \
                or is_open_file(inputs):
            return [inputs]  # an open file is one input, not the lines it would iterate over
        if isinstance(inputs, Sequence) or hasattr(inputs, "__iter__"):
            return list(inputs)
        raise DataError(f"Cannot predict on a {type(inputs).__name__}; pass one input or a list of them.")

    def prepare(self, item: Any) -> torch.Tensor:
        """One item -> ``[3, H, W]`` image tensor or ``[T]`` waveform."""
        if isinstance(item, str) and re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", item):
            raise DataError(f"Cannot read {hide_url(item)!r}: predict reads local files, not URLs. Download it first "
                            "(urllib.request.urlretrieve), or pass its bytes as io.BytesIO(body).")
        why = not_a_file(item) if isinstance(item, (str, os.PathLike)) else ""
        if why:
            folder = " Predict the files below it with predictor.predict_folder(folder) (transferkit predict takes " \
                "folders too)." if why.startswith("a folder") else ""
            raise DataError(f"Cannot read {str(item)!r}: {why}.{folder}")
        return self._waveform(item) if self.audio else self._image(item)

    def batch(self, items: Sequence[Any]) -> torch.Tensor:
        """Items -> one model batch."""
        return self.collate([self.prepare(x) for x in items])

    def collate(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Prepared items (`prepare`) -> one model batch."""
        if self.audio:
            return self._audio.pad_waveforms(xs)
        return stack_images(list(xs))  # mixed uint8 and float images: float in [0, 1]

    def list_files(self, folder: str | Path) -> list[str]:
        """The files below ``folder`` of this input kind, sorted by path, walked as training walks a
        class folder (`list_class_files`: linked folders followed, hidden ones and ``__MACOSX``
        skipped, hidden files skipped). Audio files of a type the installed libsndfile cannot
        decode are left out with a warning (or named in the error when nothing else is found)."""
        root = Path(folder)
        if not root.is_dir():
            raise DataError(f"{str(folder)!r} is not a folder.")
        known = self.extensions + (audio.AUDIO_EXTENSIONS if self.audio else ())
        report = DataReport()
        found = list_class_files(root, lambda name: not name.startswith(".") and name.lower().endswith(known),
                                 report)
        files = [f for f in found if f.lower().endswith(self.extensions)]
        # images (clips) named without an extension are left out as training leaves them out, and said to be
        warn_unnamed(report.ignored_files, "audio files" if self.audio else "images", self.extensions, report)
        note = audio.undecodable_note(found) if self.audio else ""
        if not files:
            raise DataError(f"No {self.spec.kind} files under {str(folder)!r} (looked for "
                            f"{', '.join(self.extensions)}).{' ' + note if note else ''}")
        if note:
            warn(f"{str(folder)!r}: {note}")
        return files

    def _image(self, item: Any) -> torch.Tensor:
        encoded = _unread_jpeg_file(item)
        if encoded is not None:  # read as its file is: at the reduced scale training decodes it at
            item = load_image(io.BytesIO(encoded), min_size=self.spec.resize_size or self.spec.image_size,
                              name=getattr(item, "filename", None) or None)
        elif isinstance(item, (str, Path)):
            item = load_image(item, min_size=self.spec.resize_size or self.spec.image_size)
        elif is_open_file(item):  # an open binary file (a request's body, a member of an archive)
            item = load_image(item, min_size=self.spec.resize_size or self.spec.image_size,
                              name=getattr(item, "name", None))
        elif isinstance(item, np.ndarray):
            item = image_from_array(item)
        elif isinstance(item, torch.Tensor):
            item = check_image_tensor(item)
        elif not isinstance(item, Image.Image):
            raise DataError(f"Cannot predict on a {type(item).__name__}; pass file paths, PIL images, numpy arrays "
                            "HxWx3 (or HxW) or tensors [3,H,W] / [N,3,H,W], uint8 or float in [0, 1].")
        w, h = (item.size if isinstance(item, Image.Image) else (item.shape[-1], item.shape[-2]))
        if w == 0 or h == 0:
            raise DataError(f"Cannot predict on an empty image ({h}x{w} pixels).")
        if isinstance(item, Image.Image) and getattr(item, "fp", "") is None:  # its file is closed: read already?
            try:
                item.load()
            except (ValueError, AssertionError):  # Pillow's words differ by format
                raise DataError("Cannot predict on a PIL image that was closed (image.close(), or the end of the "
                                "`with Image.open(...)` block it came from) before its pixels were read: call "
                                "image.load() inside the block, or pass the file's path.") from None
        return self._transform(item)

    def _waveform(self, item: Any) -> torch.Tensor:
        if not isinstance(item, (str, Path, np.ndarray, torch.Tensor, tuple)):
            raise DataError(f"Cannot predict on a {type(item).__name__} with an audio model; pass audio file paths, "
                            "waveforms [T] at the model's sample rate, or (waveform, sample_rate) pairs.")
        clip, rate = self.spec.clip_seconds, int(self.spec.sample_rate)  # type: ignore[arg-type]
        is_file = isinstance(item, (str, Path))
        long_file = is_file and self.max_seconds is not None and self._longer(item)
        cut: list[float] = []  # the seconds of an in-memory waveform max_seconds crops

        def loud(peak: float) -> None:  # named by its shape as given (worked out only for such a clip)
            self.loud.append((peak, f"one of shape {tuple(np.shape(item[0] if isinstance(item, tuple) else item))}"))
        wav = self._to_waveform(item, rate, max_seconds=self.max_seconds, on_crop=cut.append, on_loud=loud)
        # the model sees less than a longer clip (its middle max_seconds, or clip_seconds), as in training: say so
        if long_file or cut or (clip is not None and wav.shape[-1] > round(clip * rate)):
            seconds = cut[0] if cut else wav.shape[-1] / rate
            self.cropped.append(repr(str(item)) if is_file else f"a waveform of {seconds:.1f} s")
        shortest = math.ceil(audio.MIN_CLIP_SECONDS * rate)
        if wav.shape[-1] < shortest:  # shorter than the audio trunks' first window: no output to speak of
            ms = math.floor(10000 * wav.shape[-1] / rate) / 10  # rounded down: 24.99 ms is not 25.0
            raise DataError(f"The clip is {ms:.1f} ms long ({wav.shape[-1]} samples at the "
                            f"model's {rate} Hz); the model needs at least {1000 * audio.MIN_CLIP_SECONDS:g} ms "
                            f"({shortest} samples).")
        return self._transform(wav)

    @property
    def window_seconds(self) -> float | None:
        """The most of a clip the model sees: its backbone's ``clip_seconds``, else the
        training run's ``max_seconds`` (None: whole clips)."""
        return self.spec.clip_seconds or self.max_seconds

    def _longer(self, path: str | Path) -> bool:
        """Whether an audio file lasts longer than ``max_seconds`` (from its header)."""
        try:
            import soundfile as sf

            info = sf.info(str(path))
            return info.frames > float(self.max_seconds) * info.samplerate  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - the read itself reports a bad file
            return False


def _unread_jpeg_file(item: Any) -> bytes | None:
    """The bytes of the JPEG file a PIL image was opened from while its pixels are not decoded
    yet (what ``Image.open(path)`` gives), else None: read from them, it gets the pixels its
    path gets (JPEG draft mode, as training decodes it). They are read from the file the image
    holds open, not by its name (which may lead elsewhere since: another folder, a file
    replaced), with ``os.pread`` (its position and the object are left as they are), and only
    when the file starts as a JPEG does (an image opened from inside a larger file does not)."""
    if not (isinstance(item, Image.Image) and item.format == "JPEG" and getattr(item, "tile", None)
            and hasattr(getattr(item, "fp", None), "fileno")):
        return None
    try:
        fd = item.fp.fileno()
        data = os.pread(fd, os.fstat(fd).st_size, 0)
    except (OSError, ValueError):  # a closed file, an in-memory one (no descriptor)
        return None
    return data if data[:3] == b"\xff\xd8\xff" else None


def is_open_file(item: Any) -> bool:
    """Whether ``item`` is an open file object (what ``open(path, "rb")`` or ``io.BytesIO`` gives)."""
    return isinstance(item, io.IOBase) or (hasattr(item, "read") and hasattr(item, "seek"))
