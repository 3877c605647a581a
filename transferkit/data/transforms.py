"""Image transforms derived from a backbone's [`InputSpec`][transferkit.InputSpec].

Transforms end in a ``uint8`` tensor ``[3, H, W]``: normalisation (mean/std) happens
inside the model, so the exported file takes raw pixels and no one can forget it.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from transferkit.backbones._base import InputSpec
from transferkit.data.audio import AudioTransform
from transferkit.data.images import check_image_tensor, declared_top, image_from_array, to_rgb
from transferkit.errors import check_choice

AUGMENTATIONS = ("none", "flip", "standard")


class ToRGB(torch.nn.Module):
    """PIL image of any mode, a numpy array or a tensor to 3-channel RGB, as an image file is
    read ([`load_image`][transferkit.data.load_image]) and as ``predict`` reads the same object:
    a PIL image gets its EXIF orientation and `to_rgb` (16-bit scaled, transparent pixels
    composited onto white); arrays and tensors go through `image_from_array` and
    `check_image_tensor` (16-bit scaled to 8 bits, float checked to lie in [0, 1]); an 8-bit
    tensor (uint8, or 16-bit scaled) becomes the PIL image its file is read as, and a float
    4-channel tensor is composited onto white by its alpha channel, so that an image passed
    as an object is the image passed as its file (a float one within its rounding)."""

    def forward(self, img):
        if isinstance(img, np.ndarray):
            img = image_from_array(img, "train on")
        if isinstance(img, Image.Image):
            top = declared_top(img)
            if img.getexif().get(_ORIENTATION, 1) != 1:
                img = ImageOps.exif_transpose(img)
            return to_rgb(img, top=top)
        if isinstance(img, torch.Tensor):
            img = check_image_tensor(img, "train on")
            if img.dtype == torch.uint8:  # as its file: resized by PIL, its alpha composited as PIL does
                pixels = img.permute(1, 2, 0).numpy()
                return self.forward(Image.fromarray(pixels[..., 0] if img.shape[0] == 1 else pixels))
            if img.shape[0] == 1:
                return img.expand(3, -1, -1).contiguous()
            if img.shape[0] == 4:
                top = 255.0 if img.dtype == torch.uint8 else 1.0
                alpha = img[3:].float() / top
                rgb = img[:3].float() * alpha + top * (1 - alpha)
                return rgb.round().to(img.dtype) if img.dtype == torch.uint8 else rgb.to(img.dtype)
        return img


_ORIENTATION = 0x0112  # the EXIF tag


class ToImageTensor(torch.nn.Module):
    """PIL image or tensor to a tensor image; numpy arrays HWC are accepted too."""

    def forward(self, img):
        if isinstance(img, torch.Tensor):
            return img
        return T.functional.pil_to_tensor(img) if isinstance(img, Image.Image) else T.functional.to_image(img)


def _interp(spec: InputSpec) -> InterpolationMode:
    return InterpolationMode(spec.interpolation)


def _audio_transform(spec: InputSpec, augment):
    return AudioTransform(spec, augment)


LONGEST_SIDE_RATIO = 16  # a shorter-side resize keeps at most this many times the shorter side of the longer one


class ShorterSideResize(torch.nn.Module):
    """``T.Resize(size)`` (the shorter side to ``size``), in memory bounded for any aspect ratio:
    where the longer side would come out longer than `LONGEST_SIDE_RATIO` x ``size``, the
    image's longer side is first cut to its middle part that comes out that long. The centre
    crop and the random crops that follow read that part (a whole number of source pixels is
    kept: the crop may sit up to a source pixel off ``T.Resize``'s); a 40000 x 1 strip made
    10 million x 256 pixels (8 GB) before. Images of ordinary shapes are resized exactly as
    ``T.Resize``."""

    def __init__(self, size: int, interpolation: InterpolationMode) -> None:
        super().__init__()
        self.size = int(size)
        self.resize = T.Resize(self.size, interpolation=interpolation, antialias=True)

    def forward(self, img):
        h, w = T.functional.get_size(img)
        short, long = min(h, w), max(h, w)
        longest = LONGEST_SIDE_RATIO * self.size
        if long * self.size > longest * short:
            keep = max(1, -(-longest * short // self.size))  # the source pixels that come out `longest` long
            img = T.functional.center_crop(img, [h, keep] if w > h else [keep, w])
        return self.resize(img)


def resize_and_crop(spec: InputSpec) -> list[torch.nn.Module]:
    """Resize the shorter side to ``spec.resize_size`` and centre-crop ``spec.image_size``, or
    without a resize size resize straight to the crop size: the evaluation geometry."""
    size = spec.image_size
    if spec.resize_size:
        return [ShorterSideResize(spec.resize_size, _interp(spec)), T.CenterCrop(size)]
    return [T.Resize((size, size), interpolation=_interp(spec), antialias=True)]


def eval_transform(spec: InputSpec) -> T.Compose:
    """Resize the shorter side to ``resize_size`` (or straight to the crop size), centre-crop."""
    if spec.kind == "audio":  # waveforms: see transferkit.data.audio
        return _audio_transform(spec, "none")
    return T.Compose([ToRGB(), *resize_and_crop(spec), ToImageTensor()])


def train_transform(spec: InputSpec, augment: str = "standard") -> T.Compose:
    """Training transform: ``"standard"`` is random-resized crop + horizontal flip (the
    torchvision recipe), ``"flip"`` the eval crop + flip, ``"none"`` the eval transform."""
    if spec.kind == "audio":
        return _audio_transform(spec, augment)
    check_choice("augment", augment, AUGMENTATIONS)
    if augment == "none":
        return eval_transform(spec)
    if augment == "flip":
        return T.Compose([*eval_transform(spec).transforms[:-1], T.RandomHorizontalFlip(), ToImageTensor()])
    return T.Compose([ToRGB(), T.RandomResizedCrop(spec.image_size, interpolation=_interp(spec), antialias=True),
                      T.RandomHorizontalFlip(), ToImageTensor()])
