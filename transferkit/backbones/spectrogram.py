"""Spectrogram backbones: waveform -> (resample) -> log-mel -> any image backbone.

Everything runs inside one scriptable module, so the exported model takes raw
waveforms at the declared sample rate. Names: ``spec:<image backbone>``, e.g.
``spec:tv:resnet18`` or ``spec:tk:small_cnn``; any other image backbone is wrapped with
`spectrogram_backbone`.

Input convention (shared with the speech trunks): a float ``[N, T]`` batch in [-1, 1],
clips shorter than T padded at the end with NaN (see ``transferkit.data.audio``).
"""

from __future__ import annotations

import math
import numbers
import warnings
from fractions import Fraction
from typing import Any

import torch
import torchaudio
from torch import Tensor, nn

from transferkit.config import check_seconds, sample_rate_of
from transferkit.backbones._base import Backbone, Block, InputSpec, check_blocks
from transferkit.backbones.registry import check_weights_tag, get_backbone, get_source, register_source
from transferkit.backbones.weights import is_weights_path, load_into, read_state_dict
from transferkit.errors import BackboneError, ConfigError, warn


def split_padding(x: Tensor, check: bool = False) -> tuple[Tensor, Tensor]:
    """``(waveforms with NaN padding replaced by 0, valid lengths [N])`` of a ``[N, T]`` batch.
    NaN marks the padding after a clip's end. ``check`` (the trunks: outside training, where
    inputs come from callers rather than the data pipeline; a device sync): a NaN followed
    by a sample is an error, as the clip would be cut short, and so are an infinite sample
    (its scores were NaN) and a clip without a sample (empty, or NaN only: it was scored), in
    Python and in scripted TorchScript files (an ONNX graph cannot raise: the predictor refuses
    such clips first)."""
    valid = ~torch.isnan(x)
    if check and bool((valid[:, 1:] & ~valid[:, :-1]).any()):
        raise ValueError("An audio clip holds NaN before its end; NaN marks only the padding after a clip. Replace "
                         "NaN samples (e.g. torch.nan_to_num) before the model.")
    if check and bool(torch.isinf(x).any()):
        raise ValueError("An audio clip holds an infinite sample (inf or -inf); samples are in [-1, 1]. Replace them "
                         "(e.g. torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)) or leave the clip out.")
    lengths = valid.sum(-1)
    if check and bool((lengths == 0).any()):
        raise ValueError("An audio clip holds no sample (it is empty, or NaN only, which marks padding); leave it "
                         "out.")
    return torch.where(valid, x, torch.zeros_like(x)), lengths


RESAMPLE_TERMS = 1000
"""The largest terms of the rate ratio `resample` filters with: torchaudio's kernel holds
``new x orig`` taps of the ratio in lowest terms, which for rates with few common factors
(11127 -> 16000 Hz) took seconds and gigabytes per call."""


def resample_ratio(orig_rate: int, new_rate: int) -> tuple[int, int]:
    """``(orig, new)``: ``new_rate / orig_rate`` in lowest terms, or where those exceed
    `RESAMPLE_TERMS`, the nearest ratio whose larger term is within it (11127 -> 16000 Hz:
    564 -> 811, off by 3.3e-7, which stretches 30 s by 10 us).

    Example:
        >>> resample_ratio(44100, 16000), resample_ratio(11127, 16000)
        ((441, 160), (564, 811))
    """
    exact = Fraction(int(new_rate), int(orig_rate))
    if max(exact.numerator, exact.denominator) <= RESAMPLE_TERMS:
        return exact.denominator, exact.numerator
    if exact < 1:  # the larger term (the original rate's) within the limit
        near = exact.limit_denominator(RESAMPLE_TERMS)
        return near.denominator, near.numerator
    near = (1 / exact).limit_denominator(RESAMPLE_TERMS)
    return near.numerator, near.denominator


class Resample(torchaudio.transforms.Resample):
    """torchaudio's resampler by the ratio `resample_ratio` gives, as the data are resampled,
    its kernel rebuilt from the rates, not stored in checkpoints (a TorchScript export holds it,
    as TorchScript keeps every buffer): the kernel holds ``new x orig`` taps of the ratio in
    lowest terms, which for a model taking 22254 Hz input was 357 MB in every checkpoint and
    export, and seconds to build."""

    def __init__(self, orig_rate: int, new_rate: int) -> None:
        orig, new = resample_ratio(orig_rate, new_rate)
        super().__init__(orig, new)
        kernel = self.kernel
        del self.kernel
        self.register_buffer("kernel", kernel, persistent=False)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        state_dict.pop(prefix + "kernel", None)  # written by earlier versions: rebuilt from the rates
        super()._load_from_state_dict(state_dict, prefix, *args)


def resampler(orig_rate: int, new_rate: int) -> tuple[nn.Module, float]:
    """A scriptable resampling module and the ratio of lengths it gives (new / old): identity
    and 1.0 when the rates match, or where their ratio within `RESAMPLE_TERMS` is 1 (16001 Hz
    to 16000 Hz), as the data are not resampled then either."""
    orig, new = resample_ratio(orig_rate, new_rate)
    if orig == new:
        return nn.Identity(), 1.0
    return Resample(int(orig_rate), int(new_rate)), new / orig


def _band_masks(x: Tensor, dim: int, limits: Tensor, num: int, max_width: int) -> Tensor:
    """Zero ``num`` random bands of up to ``max_width`` along ``dim`` (1 or 2) of ``[N, A, B]``,
    each inside the first ``limits[n]`` positions of example n."""
    n, size = x.shape[0], x.shape[dim]
    idx = torch.arange(size, device=x.device).unsqueeze(0)
    for _ in range(num):
        width = torch.floor(torch.rand(n, device=x.device) * (max_width + 1))
        width = torch.minimum(width, limits.to(width.dtype))
        start = torch.floor(torch.rand(n, device=x.device) * (limits.to(width.dtype) - width + 1))
        band = (idx >= start.unsqueeze(1)) & (idx < (start + width).unsqueeze(1))
        x = x.masked_fill(band.unsqueeze(1) if dim == 2 else band.unsqueeze(2), 0.0)
    return x


class SpecAugment(nn.Module):
    """SpecAugment (Park et al. 2019) on ``[N, freq, time]`` features, active only in
    training mode: ``freq_masks`` bands of up to ``freq_width`` bins and ``time_masks``
    bands of up to ``time_width`` frames (inside each clip's valid frames) set to 0.

    Example:
        >>> sa = SpecAugment(freq_masks=1, freq_width=4, time_masks=1, time_width=5).train()
        >>> sa(torch.ones(2, 16, 20), torch.tensor([20, 10])).shape
        torch.Size([2, 16, 20])
    """

    def __init__(self, *, freq_masks: int = 2, freq_width: int = 8, time_masks: int = 2, time_width: int = 10) -> None:
        super().__init__()
        if min(freq_masks, freq_width, time_masks, time_width) < 0:
            raise ConfigError("SpecAugment counts and widths must be >= 0.")
        self.freq_masks, self.freq_width = int(freq_masks), int(freq_width)
        self.time_masks, self.time_width = int(time_masks), int(time_width)

    def forward(self, x: Tensor, frames: Tensor) -> Tensor:
        if not self.training:
            return x
        bins = torch.full_like(frames, x.shape[1])
        x = _band_masks(x, 1, bins, self.freq_masks, self.freq_width)
        return _band_masks(x, 2, frames, self.time_masks, self.time_width)


def as_spec_augment(value: Any) -> SpecAugment | None:
    """``None``/``False`` (off), ``True`` (defaults), a dict of SpecAugment kwargs, or a SpecAugment."""
    if value is None or value is False:
        return None
    if value is True:
        return SpecAugment()
    if isinstance(value, dict):
        return SpecAugment(**value)
    if isinstance(value, SpecAugment):
        return value
    raise ConfigError(f"spec_augment must be None, True, a dict of SpecAugment options or a SpecAugment, got {value!r}.")


class SpectrogramTrunk(nn.Module):
    """NaN-padded waveforms ``[N, T]`` -> log-mel ``[N, C, n_mels, frames]``, standardised
    per clip over its valid frames (padding set to 0) -> ``image`` trunk -> ``[N, F]``.

    The image trunk sees padded frames as zeros, so a clip's features depend on how far it
    is padded. In training a batch runs as one (BatchNorm needs the batch's statistics),
    padded to its longest clip; outside training each clip is padded to a length of its own
    (`padded_length`: at least ``clip_samples``, the fixed length the data pipeline pads to,
    or ``min_samples``), so that features, validation scores and predictions do not depend
    on the other clips of the batch, and a clip longer than ``clip_samples`` is cut to its middle
    ``clip_samples`` (`crop_middle`: the data pipeline's crop, which an exported file's caller
    need not copy). Clips of one padded length run together. A batch
    shorter than ``clip_samples`` or ``min_samples`` (the centred STFT's reflection and the
    image trunk's smallest input, `min_clip_samples`) is padded to it."""

    def __init__(self, image: nn.Module, *, sample_rate: int, input_sample_rate: int, n_mels: int, n_fft: int,
                 hop_length: int, f_min: float, f_max: float | None, channels: int,
                 image_size: tuple[int, int] | None, spec_augment: SpecAugment | None, clip_samples: int = 0,
                 min_samples: int = 1) -> None:
        super().__init__()
        self.clip_samples, self.min_samples = int(clip_samples), int(min_samples)
        self.resample, self.ratio = resampler(input_sample_rate, sample_rate)
        with warnings.catch_warnings():  # said by check_mel_bands, with what fits
            warnings.filterwarnings("ignore", message="At least one mel filterbank has all zero values")
            self.melspec = torchaudio.transforms.MelSpectrogram(sample_rate, n_fft=n_fft, hop_length=hop_length,
                                                                f_min=f_min, f_max=f_max, n_mels=n_mels)
        self.hop_length, self.channels = int(hop_length), int(channels)
        self.out_h, self.out_w = (int(image_size[0]), int(image_size[1])) if image_size else (0, 0)
        self.spec_augment = spec_augment or SpecAugment(freq_masks=0, time_masks=0)
        self.image = image

    def extra_repr(self) -> str:  # in the trunk's fingerprint: these change what it computes
        return f"clip_samples={self.clip_samples}, min_samples={self.min_samples}"

    def log_mel(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Standardised log-mel ``[N, n_mels, frames]`` and the valid frames per clip."""
        x, lengths = split_padding(x, check=not self.training)
        if self.ratio != 1.0:
            x = self.resample(x)
            lengths = torch.ceil(lengths.to(torch.float64) * self.ratio).to(lengths.dtype)
        mel = torch.log(self.melspec(x) + 1e-6)
        frames = torch.clamp(torch.div(lengths, self.hop_length, rounding_mode="floor") + 1, 1, mel.shape[-1])
        valid = (torch.arange(mel.shape[-1], device=mel.device).unsqueeze(0) < frames.unsqueeze(1)).unsqueeze(1)
        count = (frames * mel.shape[1]).to(mel.dtype).view(-1, 1, 1)
        mean = (mel * valid).sum((1, 2), keepdim=True) / count
        var = ((mel - mean).pow(2) * valid).sum((1, 2), keepdim=True) / count
        return torch.where(valid, (mel - mean) / torch.sqrt(var + 1e-5), torch.zeros_like(mel)), frames

    def forward(self, x: Tensor) -> Tensor:
        if not self.training and 0 < self.clip_samples < x.shape[-1]:
            x = crop_middle(x, self.clip_samples)
        shortest = max(self.clip_samples, self.min_samples)
        if x.shape[-1] < shortest:
            x = nn.functional.pad(x, [0, shortest - x.shape[-1]], value=float("nan"))
        if self.training:
            return self._batch(x)
        lengths = padded_length((~torch.isnan(x)).sum(-1), shortest)
        if bool((lengths == x.shape[-1]).all()):
            return self._batch(x)
        longest = int(lengths.max())
        if x.shape[-1] < longest:
            x = nn.functional.pad(x, [0, longest - x.shape[-1]], value=float("nan"))
        order: list[Tensor] = []
        out: list[Tensor] = []
        sizes: list[int] = torch.unique(lengths).tolist()
        for n in sizes:  # each padded length alone: the padding of a clip does not depend on the batch
            rows = torch.nonzero(lengths == n).flatten()
            order.append(rows)
            out.append(self._batch(x.index_select(0, rows)[:, :n]))
        return torch.cat(out).index_select(0, torch.argsort(torch.cat(order)))

    def _batch(self, x: Tensor) -> Tensor:
        mel, frames = self.log_mel(x)
        mel = self.spec_augment(mel, frames)
        img = mel.unsqueeze(1).expand(-1, self.channels, -1, -1)
        if self.out_h > 0:
            img = nn.functional.interpolate(img, size=[self.out_h, self.out_w], mode="bilinear", align_corners=False)
        return self.image(img)


def crop_middle(x: Tensor, n: int) -> Tensor:
    """``[N, n]``: each clip of a NaN-padded ``[N, T]`` batch longer than ``n`` samples cut to its
    middle ``n`` (from ``(length - n) // 2``, as the data pipeline crops without augmentation),
    shorter ones as they are.

    Example:
        >>> nan = float("nan")
        >>> crop_middle(torch.tensor([[0., 1, 2, 3, 4, 5], [6, 7, 8, nan, nan, nan]]), 3).tolist()
        [[1.0, 2.0, 3.0], [6.0, 7.0, 8.0]]
    """
    _, lengths = split_padding(x, check=True)  # a NaN before a clip's end would move its middle
    start = torch.div((lengths - n).clamp_min(0), 2, rounding_mode="floor")
    return x.gather(1, start.unsqueeze(1) + torch.arange(n, device=x.device).unsqueeze(0))


def padded_length(lengths: Tensor, unit: int) -> Tensor:
    """The length each clip of ``lengths`` (samples) is padded to outside training: at least
    ``unit``, then up a grid of multiples of ``unit`` with 3 significant bits (1, 2, ... 8,
    10, 12, 14, 16, 20, ... units), so that a clip is padded by less than a unit or a quarter
    of its length, whichever is more, and clips of close lengths run together.

    Example:
        >>> padded_length(torch.tensor([1, 100, 101, 799, 801, 1000, 1401]), 100).tolist()
        [100, 100, 200, 800, 1000, 1000, 1600]
    """
    q = torch.div(lengths.clamp_min(1) + unit - 1, unit, rounding_mode="floor")
    step = torch.pow(2, (torch.floor(torch.log2(q.to(torch.float64))) - 2).clamp_min(0)).to(q.dtype)
    return torch.div(q + step - 1, step, rounding_mode="floor") * step * unit


def _empty_bands(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float | None) -> int:
    """How many of the ``n_mels`` mel filters hold no FFT bin of an ``n_fft`` spectrum."""
    with warnings.catch_warnings():  # torchaudio warns of them; check_mel_bands says it as an error
        warnings.simplefilter("ignore")
        fb = torchaudio.functional.melscale_fbanks(n_fft // 2 + 1, float(f_min), float(f_max or sample_rate / 2),
                                                   n_mels, sample_rate)
    return int((fb.amax(0) <= 0).sum())


def check_mel_bands(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0, f_max: float | None = None) -> None:
    """Warn of more mel bands than the spectrum resolves: a band without an FFT bin is a row
    of the log-mel image that never changes (torchaudio's own warning says neither how many
    nor what fits). One such band (128 bands at 16 kHz with ``n_fft=512``, a common setting)
    costs little and is not said; more leave the image partly blank. ConfigError where no
    band holds a bin (the image is the same for every sound).

    Example:
        >>> check_mel_bands(8000, 256, 64)
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     check_mel_bands(8000, 64, 64)
        >>> print(seen[0].message)
        n_mels=64 is more mel bands than n_fft=64 resolves at 8000 Hz: 16 of them hold no frequency bin (an FFT of \
64 samples has 33), rows of the log-mel image that never change. Use n_mels <= 22 or n_fft >= 256.
    """
    empty = _empty_bands(sample_rate, n_fft, n_mels, f_min, f_max)
    if empty <= 1:
        return
    fits = next((m for m in range(n_mels - 1, 0, -1) if not _empty_bands(sample_rate, n_fft, m, f_min, f_max)), 0)
    wider = next((n for n in (2 ** k for k in range(2, 17))
                  if n > n_fft and _empty_bands(sample_rate, n, n_mels, f_min, f_max) <= 1), None)
    fixes = [f"n_fft >= {wider}" if wider else "a larger n_fft"] + ([f"n_mels <= {fits}"] if fits else [])
    bins = f"an FFT of {n_fft} samples has {n_fft // 2 + 1}"
    if empty >= n_mels:  # the image is the same for every sound: the model learns nothing
        raise ConfigError(f"n_fft={n_fft} resolves none of the n_mels={n_mels} mel bands at {sample_rate} Hz: no band "
                          f"holds a frequency bin ({bins}), so the log-mel image is the same for every sound. Use "
                          f"{' or '.join(fixes)}.")
    warn(f"n_mels={n_mels} is more mel bands than n_fft={n_fft} resolves at {sample_rate} Hz: {empty} of them hold "
         f"no frequency bin ({bins}), rows of the log-mel image that never change. Use {' or '.join(fixes[::-1])}.")


def min_clip_samples(trunk: SpectrogramTrunk, *, n_mels: int, n_fft: int, hop_length: int) -> int:
    """The fewest input samples ``trunk`` runs on: more than the centred STFT reflects
    (``n_fft // 2``), and the frames of the narrowest log-mel image its image trunk takes
    (tried at 1, 2, 4, ... 256 frames, in eval mode; a resized image takes any). An image
    trunk that takes none of them (too few mel bands for its depth, or a fixed input size)
    is a `BackboneError`."""
    frames, error = 1, None
    if trunk.out_h == 0:
        image, was = trunk.image, trunk.image.training
        image.eval()
        try:
            with torch.no_grad():
                for frames in (1, 2, 4, 8, 16, 32, 64, 128, 256):
                    try:
                        image(torch.zeros(1, trunk.channels, n_mels, frames))
                        error = None
                        break
                    except RuntimeError as exc:  # too small for its pooling or kernels
                        error = exc
        finally:
            image.train(was)
        if error is not None:
            raise BackboneError(f"The image trunk runs on no log-mel image of {n_mels} mel bands and up to 256 frames "
                                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). Use "
                                "more mel bands (n_mels), or image_size= to resize the spectrogram to the size the "
                                "image backbone takes.")
    model_rate = max(n_fft // 2 + 1, (frames - 1) * hop_length + 1)
    return math.ceil(model_rate / trunk.ratio)


def _positive_whole(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= 1


def _pow2_at_least(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def spectrogram_backbone(image: Backbone | str, *, weights: Any = None, sample_rate: int = 16000,
                         input_sample_rate: int | None = None, n_mels: int = 64, n_fft: int | None = None,
                         hop_length: int | None = None, f_min: float = 0.0, f_max: float | None = None,
                         image_size: int | tuple[int, int] | None = None, clip_seconds: float | None = None,
                         spec_augment: Any = None, image_options: dict[str, Any] | None = None,
                         weights_only: bool = True) -> Backbone:
    """Wrap an image backbone (a [`Backbone`][transferkit.Backbone] or a name built with ``weights``) into an
    audio backbone taking waveforms at ``input_sample_rate`` (default ``sample_rate``).

    The mel frontend works at ``sample_rate`` (resampling inside when the rates differ);
    ``n_fft`` defaults to 25 ms rounded up to a power of two, ``hop_length`` to 10 ms.
    ``image_size`` resizes the spectrogram image (None: keep n_mels x frames). The image
    backbone's blocks are kept (members under ``image.``), so every policy applies.
    ``weights`` are the image backbone's (a tag or a file of its weights), or a file of a
    whole spectrogram trunk: a transferkit checkpoint of a ``spec:`` run (its trained trunk;
    the head starts anew) or a state dict saved from such a trunk, whose mel filterbank and window are
    checked against these settings (``hop_length`` is not in the file: give the run's).
    ``image_options`` go to [`get_backbone`][transferkit.get_backbone] when ``image`` is a name (e.g.
    ``{"widths": [16, 32, 64]}`` for ``tk:small_cnn``); ``spec_augment``: None, True,
    or a dict of `SpecAugment` options (masks applied in training mode only). ``weights_only=False``
    reads a weights file that holds Python objects beyond tensors (trusted files only), as
    [`get_backbone`][transferkit.get_backbone] does.

    Example:
        >>> bb = spectrogram_backbone("tk:small_cnn", sample_rate=8000, n_mels=32)
        >>> bb.trunk(torch.randn(2, 4000)).shape, bb.input_spec.kind
        (torch.Size([2, 128]), 'audio')
    """
    clip_seconds = check_seconds(clip_seconds, "clip_seconds")
    for key, value in (("n_mels", n_mels), ("n_fft", n_fft), ("hop_length", hop_length)):
        if value is not None and not _positive_whole(value):
            raise ConfigError(f"{key} must be a positive whole number, got {value!r}.")
    sizes = image_size if isinstance(image_size, (tuple, list)) else (image_size,) * 2
    if image_size is not None and not (len(sizes) == 2 and all(_positive_whole(v) for v in sizes)):
        raise ConfigError(f"image_size must be a positive whole number or (height, width) of them, got "
                          f"{image_size!r}; None keeps the log-mel image's own size (n_mels x frames).")
    # a file of this kind of trunk (a spec: run's checkpoint or trunk): loaded whole, below
    own, weights_path = None, weights
    if is_weights_path(weights):
        sd = read_state_dict(weights, weights_only=weights_only and (image_options or {}).get("weights_only", True))
        if any(k.startswith("image.") for k in sd):
            own, weights = sd, None
    options = {**({"weights_only": False} if not weights_only else {}), **(image_options or {})}
    img = get_backbone(image, weights=weights, **options) if isinstance(image, str) else image
    if img.input_spec.kind != "image":
        raise BackboneError(f"spectrogram_backbone wraps an image backbone; {img.name} takes {img.input_spec.kind}.")
    sample_rate = sample_rate_of(sample_rate, "backbone option sample_rate", ConfigError)
    if input_sample_rate is not None:
        input_sample_rate = sample_rate_of(input_sample_rate, "backbone option input_sample_rate", ConfigError)
    in_rate = int(input_sample_rate or sample_rate)
    n_fft = int(n_fft if n_fft is not None else _pow2_at_least(int(0.025 * sample_rate)))
    hop = int(hop_length if hop_length is not None else round(0.010 * sample_rate))
    size = None if image_size is None else (int(sizes[0]), int(sizes[1]))
    check_mel_bands(int(sample_rate), n_fft, int(n_mels), f_min, f_max)
    if hop > n_fft:  # frames that do not meet: the samples between them reach no frame
        warn(f"hop_length={hop} is larger than n_fft={n_fft}: the spectrogram's frames leave {hop - n_fft} samples "
             f"out between each two, so the model hears {n_fft / hop:.0%} of each clip. Use hop_length <= {n_fft} "
             f"(a quarter to a half of n_fft is usual), or a larger n_fft.")
    trunk = SpectrogramTrunk(img.trunk, sample_rate=int(sample_rate), input_sample_rate=in_rate, n_mels=int(n_mels),
                             n_fft=n_fft, hop_length=hop, f_min=f_min, f_max=f_max, channels=img.input_spec.channels,
                             image_size=size, spec_augment=as_spec_augment(spec_augment),
                             clip_samples=round(clip_seconds * in_rate) if clip_seconds else 0)
    if own is not None:
        built = trunk.state_dict()
        other = [k for k in own if k.startswith("melspec.") and k in built and (
            own[k].shape != built[k].shape or not torch.allclose(own[k].float(), built[k].float(), atol=1e-6))]
        if other:
            raise ConfigError(f"Weights file {str(weights_path)!r} holds a spectrogram trunk made with other mel "
                              f"settings ({', '.join(other)} differ from what sample_rate, n_fft, n_mels, f_min and "
                              "f_max give here): build the backbone with the options of the run that wrote it (its "
                              "checkpoint records them as backbone_options).")
        load_into(trunk, own, source=f"Weights file {str(weights_path)!r}")
    trunk.min_samples = min_clip_samples(trunk, n_mels=int(n_mels), n_fft=n_fft, hop_length=hop)
    blocks = tuple(Block(b.name, tuple(f"image.{m}" for m in b.members)) for b in img.blocks)
    name = f"spec:{img.name}"
    check_blocks(trunk, blocks, name=name)
    spec = InputSpec(kind="audio", sample_rate=in_rate, clip_seconds=clip_seconds, channels=1)
    return Backbone(name=name, trunk=trunk, num_features=img.num_features, blocks=blocks, input_spec=spec,
                    weights=str(weights_path) if own is not None else img.weights)


# Image backbones offered as ``spec:<name>``; any other one works through spectrogram_backbone().
SPEC_IMAGE_BACKBONES = ("tk:small_cnn", "tk:cifar_resnet20", "tk:cifar_resnet32", "tk:cifar_resnet44",
                        "tk:cifar_resnet56", "tv:resnet18", "tv:resnet34", "tv:resnet50", "tv:mobilenet_v3_small",
                        "tv:mobilenet_v3_large", "tv:efficientnet_b0", "timm:resnet18", "timm:efficientnet_b0")


class SpectrogramSource:
    """``spec:<image backbone>``: the registered image backbones of `SPEC_IMAGE_BACKBONES`."""

    prefix = "spec"

    def names(self) -> list[str]:

        out = []
        for full in SPEC_IMAGE_BACKBONES:
            prefix, rest = full.split(":", 1)
            source = get_source(prefix)
            if source is not None and rest in source.names():
                out.append(full)
        return out

    def build(self, name: str, *, weights: Any = "DEFAULT", **kwargs: Any) -> Backbone:
        return spectrogram_backbone(name, weights=weights, **kwargs)

    def check_weights(self, name: str, weights: Any, **kwargs: Any) -> None:
        """The wrapped image backbone's weights (``image_options`` go to it)."""
        check_weights_tag(name, weights, **(kwargs.get("image_options") or {}))


register_source(SpectrogramSource())
