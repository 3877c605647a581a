"""TransferModel: preprocessing + backbone trunk + head in one scriptable module."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from transferkit.config import MIN_CLIP_SECONDS
from transferkit.heads import build_head

# how far outside [0, 1] a float image may go: a bicubic resize (torch's, a = -0.75, with or without
# antialiasing) of pixels in [0, 1] reaches [-0.4453, 1.4453] in 2-D (1-D weights of positive sum
# 1.1875 and negative sum -0.1875: 1.1875**2 + 0.1875**2), where 0.25 refused images in [0, 1]
FLOAT_SLACK = 0.5


class ImagePreprocess(nn.Module):
    """Raw pixels to the backbone's normalised input.

    Accepts ``uint8`` images in [0, 255] or floating-point images in [0, 1], shape
    ``[N, C, H, W]`` (another number of dimensions, or of channels, raises ``ValueError``);
    subtracts ``mean`` and divides by ``std`` per channel, in the dtype of its buffers (float32
    unless the module was cast). Other integer pixels (``int64`` from
    ``torch.tensor(list)``) raise ``ValueError``: read as float they would give other outputs
    without a word. Scripted (an exported file, run where transferkit's own checks are not),
    float pixels further than `FLOAT_SLACK` outside [0, 1] (pixels in [0, 255]) raise too, and
    so do images of another size than ``size`` (set by the export from its metadata's
    ``input_spec``), with ``geometry``: how the predictor resizes and crops them (a file loaded
    with plain ``torch.jit.load`` would otherwise score images of any size, resized or not,
    without a word).

    Example:
        >>> ImagePreprocess([0.5], [0.5])(torch.tensor([[[[0, 255]]]], dtype=torch.uint8)).tolist()
        [[[[-1.0, 1.0]]]]
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], size: int = 0, geometry: str = "") -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))
        self.float_slack = FLOAT_SLACK
        self.size = int(size or 0)  # the side of the images the model takes (0: any)
        self.geometry = str(geometry)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:  # [C, H, W] broadcasts: one image's scores, or a grayscale batch read as RGB
            c = str(self.mean.shape[1])
            raise ValueError("Images are a batch [N, C, H, W] (C = " + c + "), got a tensor of " + str(x.dim())
                             + " dimensions " + str(list(x.shape)) + ": one image [C, H, W] is x.unsqueeze(0), a "
                             "batch of grayscale images [N, H, W] is x.unsqueeze(1).expand(-1, " + c + ", -1, -1).")
        if x.shape[1] != self.mean.shape[1]:  # [N, H, W, C] (PIL's and numpy's order), RGBA, grayscale
            raise ValueError("Images are a batch [N, C, H, W] with C = " + str(self.mean.shape[1]) + " channels, got "
                             + str(list(x.shape)) + ": pixels of shape [N, H, W, C] are x.permute(0, 3, 1, 2); "
                             "convert RGBA or grayscale images to RGB first.")
        if torch.jit.is_scripting() and self.size > 0 and (x.shape[2] != self.size or x.shape[3] != self.size):
            raise ValueError("This model takes images of " + str(self.size) + " x " + str(self.size) + " pixels ["
                             "N, C, " + str(self.size) + ", " + str(self.size) + "], got " + str(list(x.shape))
                             + ": " + self.geometry + " (transferkit.load(path).predict does it for you).")
        # in the module's own dtype (float32, or what ``model.double()`` made it)
        if x.dtype == torch.uint8:
            x = x.to(self.mean.dtype) / 255.0
        elif not x.is_floating_point():
            raise ValueError("Image pixels that are neither uint8 nor float (other integers, bool, complex) cannot "
                             "be read: pass uint8 pixels in [0, 255] "
                             "(e.g. x.to(torch.uint8)) or float pixels in [0, 1] (x / 255.0).")
        else:
            if torch.jit.is_scripting():  # eager training passes are not checked (a reduction per step)
                self.check_float_pixels(x)
            x = x.to(self.mean.dtype)
        return (x - self.mean) / self.std

    def check_float_pixels(self, x: torch.Tensor) -> None:
        """ValueError for float pixels further than `FLOAT_SLACK` outside [0, 1], or NaN: what a
        scripted (exported) model refuses, and what an export checks its examples against."""
        if x.numel() > 0:
            lo, hi = torch.aminmax(x.detach())
            if not (float(lo) >= -self.float_slack and float(hi) <= 1.0 + self.float_slack):  # NaN too
                raise ValueError("Float image pixels must be in [0, 1] (not NaN), got [" + str(float(lo)) + ", "
                                 + str(float(hi)) + "]: pass uint8 pixels, or divide by 255 (the model "
                                 "normalises its input itself).")


def pcm_to_float(x: torch.Tensor) -> torch.Tensor:
    """Waveform samples as float in [-1, 1]: PCM integers scaled as their files store them
    (``int16``, ``int32``, ``int8``, and ``uint8``: 8-bit WAV, unsigned); float as it is; other
    integers (no known full scale), bool and complex raise ``ValueError``. Scriptable: an exported audio model
    reads its input with it, as training and prediction do.

    Example:
        >>> pcm_to_float(torch.tensor([-32768, 16384], dtype=torch.int16)).tolist()
        [-1.0, 0.5]
    """
    if x.is_floating_point():
        return x
    if x.dtype == torch.int16:
        return (x.double() / 32768.0).float()
    if x.dtype == torch.int32:
        return (x.double() / 2147483648.0).float()
    if x.dtype == torch.int8:
        return (x.double() / 128.0).float()
    if x.dtype == torch.uint8:
        return ((x.double() - 128.0) / 128.0).float()
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError("bool and complex samples are not audio samples: pass float samples in [-1, 1], or PCM as "
                         "int16, int32, int8 or uint8 (8-bit WAV)")
    raise ValueError("integer samples of this dtype have no known full scale: pass float samples in [-1, 1], or PCM "
                     "as int16, int32, int8 or uint8 (8-bit WAV)")


AUDIO_CHANNELS_MAX = 8
"""The most channels a ``[T, C]`` clip is read with (`transferkit.data.audio.MAX_CHANNELS`); a
batch ``[N, C, T]`` of more channels than this and than samples is refused by `AudioPreprocess`
as soundfile's ``[N, T, C]`` layout read the wrong way round."""


class AudioPreprocess(nn.Module):
    """Raw waveforms to the audio trunk's input ``[N, T]`` float.

    Accepts float waveforms in [-1, 1] or PCM integers (`pcm_to_float`), shaped ``[N, T]``,
    ``[N, C, T]`` (mixed down to mono; channels NaN-padded to different lengths, and more
    channels than samples beyond `AUDIO_CHANNELS_MAX`, are refused) or ``[T]`` (one clip), in the
    module's dtype (float32 unless the module was cast). NaN padding at the end of shorter clips
    marks their length and is kept (see ``transferkit.data.audio.pad_waveforms``). In a
    TorchScript export, a clip of fewer than ``min_samples`` samples (the shortest an audio model
    takes, `MIN_CLIP_SECONDS` at its rate) is refused: a soundfile array ``[T, 1]`` read as T
    clips of one sample each gave T rows of scores. In Python the predictor refuses such a clip
    before the model, and training reads none; the check is scripted only (it would break a
    compiled graph and wait for the GPU in every forward), so a traced or ONNX export lacks it.

    Example:
        >>> AudioPreprocess().double()(torch.tensor([[-32768, 16384]], dtype=torch.int16))
        tensor([[-1.0000,  0.5000]], dtype=torch.float64)
    """

    def __init__(self, min_samples: int = 1) -> None:
        super().__init__()
        # no state: it follows ``.double()`` / ``.to(dtype)`` so the output has the model's dtype
        self.register_buffer("dtype_of", torch.zeros(0), persistent=False)
        self.max_channels = AUDIO_CHANNELS_MAX
        self.min_samples = int(min_samples)
        self.shortest = f"{1000 * MIN_CLIP_SECONDS:g} ms"  # what min_samples is, said in the refusal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x.dim() > 3 or x.numel() == 0:
            raise ValueError("audio input is a batch of waveforms [N, T], of clips with channels [N, C, T], or one "
                             "clip [T], each with at least one sample; got the shape " + str(list(x.shape)))
        if x.dim() == 3 and x.size(1) > self.max_channels and x.size(1) > x.size(2):  # [N, T, C] taken for [N, C, T]
            raise ValueError("a batch [N, C, T] of " + str(x.size(1)) + " channels of " + str(x.size(2)) + " samples "
                             "(more channels than samples, and more than " + str(self.max_channels) + "): a batch of "
                             "soundfile's layout [N, T, C] is x.transpose(1, 2)")
        x = pcm_to_float(x).to(self.dtype_of.dtype)
        if x.dim() == 3:
            pad = torch.isnan(x)  # padding: NaN at a clip's end, in every channel alike
            if bool((pad.any(1) != pad.all(1)).any()):
                raise RuntimeError("the channels of a clip [N, C, T] end at different samples, or hold NaN in some "
                                   "channels only (NaN marks padding, at a clip's end and in every channel alike): "
                                   "pass channels of one length, or mix them down to [N, T] first")
            x = x.mean(1)
        if x.dim() == 1:
            x = x.unsqueeze(0)
        if torch.jit.is_scripting():  # the exported file: its callers have no predictor to check for them
            shortest = int((~torch.isnan(x)).sum(1).min())  # a clip's samples: NaN pads it at its end
            if shortest < self.min_samples:
                raise ValueError("a clip of " + str(shortest) + " samples is shorter than the " +
                                 str(self.min_samples) + " the model takes (" + self.shortest + " at its sample "
                                 "rate); a clip read as [T, C] (soundfile's layout) is x.T, or x[:, 0] for its "
                                 "first channel")
        return x


def preprocess_for(spec: Any) -> nn.Module:
    """The preprocessing of a model taking ``spec``'s input (an `InputSpec`): `AudioPreprocess`
    at its sample rate, else `ImagePreprocess` with its mean and std."""
    if spec.kind == "audio":  # a spec without a rate (a module given by hand): no length to refuse
        rate = spec.sample_rate
        return AudioPreprocess(min_samples=math.ceil(MIN_CLIP_SECONDS * int(rate)) if rate else 1)
    return ImagePreprocess(spec.mean, spec.std)


class TransferModel(nn.Module):
    """``head(trunk(preprocess(x)))``: one module to train, evaluate and export.

    Example:
        >>> from transferkit import get_backbone, build_head
        >>> bb = get_backbone("tk:small_cnn", weights=None)
        >>> m = TransferModel(ImagePreprocess(bb.input_spec.mean, bb.input_spec.std), bb.trunk, build_head(bb.num_features, 3))
        >>> m(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape
        torch.Size([2, 3])
    """

    def __init__(self, preprocess: nn.Module, trunk: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.trunk = trunk
        self.head = head

    @torch.jit.export
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.preprocess(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(backbone: Any, num_outputs: int, *, spec: Any = None, head_hidden: Sequence[int] = (),
                head_activation: str = "relu", head_dropout: float = 0.0, head_norm: bool = False,
                target_norm: bool = False) -> TransferModel:
    """Preprocessing from the input spec + the backbone's trunk + a new head (``head_norm``:
    starting with a [`FeatureNorm`][transferkit.FeatureNorm]; ``target_norm``: ending with a
    [`TargetScale`][transferkit.TargetScale]). The trunk is used, not copied.

    Example:
        >>> from transferkit import get_backbone
        >>> m = build_model(get_backbone("tk:small_cnn", weights=None), 3)
        >>> m(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 3])
    """
    spec = spec or backbone.input_spec
    head = build_head(backbone.num_features, num_outputs, hidden=head_hidden, activation=head_activation,
                      dropout=head_dropout, norm=head_norm, target_norm=target_norm)
    pre = preprocess_for(spec)
    return TransferModel(pre, backbone.trunk, head)


def eval_geometry(spec: Any) -> str:
    """How images are brought to the size an image model takes, in words: the predictor's and
    the validation's resize and centre crop (`transferkit.data.transforms.resize_and_crop`).

    Example:
        >>> from transferkit.backbones import InputSpec
        >>> eval_geometry(InputSpec(image_size=224, resize_size=256))[:60]
        'resize the shorter side to 256 pixels (bilinear, antialiased'
    """
    size, how = spec.image_size, f"{spec.interpolation}, antialiased"
    if spec.resize_size:
        return (f"resize the shorter side to {spec.resize_size} pixels ({how}), then crop the centre {size} x "
                f"{size}, from RGB pixels (uint8, or float in [0, 1])")
    return f"resize to {size} x {size} pixels ({how}; the aspect ratio is not kept), from RGB pixels (uint8, or " \
        "float in [0, 1])"
