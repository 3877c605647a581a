"""JPEG decoding on the GPU for image folders (CUDA only, an option of the data layer).

Workers only read the files' bytes; each batch of JPEGs is decoded on the GPU with
``torchvision.io.decode_jpeg(..., device="cuda")`` (nvJPEG), then resized, cropped and
flipped there, so a fast GPU is not starved by CPU decoding. Files that are not JPEG (PNG,
GIF, ...) are decoded by the workers as usual (Pillow) and joined to the batch. The items
match the CPU pipeline's (``eval_transform`` / ``train_transform``) up to decoder and
resampling differences (no draft mode: the GPU decodes at full size, then resizes), so the
decoder must be part of a feature-cache key.

Batches come as ``(uint8 [B, 3, S, S] on the device, targets)``; the order and the random
crops are a function of ``(seed, epoch, index)`` as with
`transferkit.train.loaders.make_loader` (call ``loader.set_epoch(e)``).

Not tested on a GPU in this repository's CI (no GPU there): the batching, transforms and
seeding are tested with the CPU decoder; ``benchmarks/gpu_throughput.py`` measures the GPU
decoder against CPU workers on a CUDA machine.

Example:
    >>> loader = gpu_jpeg_loader(ds, spec, augment="none", batch_size=64, device=torch.device("cuda"))  # doctest: +SKIP
    >>> x, y = next(iter(loader))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from transferkit.backbones._base import InputSpec
from transferkit.data.transforms import AUGMENTATIONS
from transferkit.errors import ConfigError, check_choice
from transferkit.data.images import load_image
from transferkit.data.sampling import EpochSampler, default_num_workers, mix_seed

_JPEG_MAGIC = b"\xff\xd8\xff"


def _tiny_jpeg() -> torch.Tensor:
    """An 8x8 JPEG, to check that the GPU decoder works before relying on it."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buf, "JPEG")
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def gpu_jpeg_available(device: torch.device) -> tuple[bool, str]:
    """Whether batches can be decoded on ``device`` with nvJPEG, and why not."""
    if device.type != "cuda":
        return False, f"GPU JPEG decoding needs a CUDA device, got {device.type!r}"
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    try:
        decode_jpeg(_tiny_jpeg(), device=device)
    except Exception as exc:  # noqa: BLE001 - a torchvision built without nvJPEG, an old driver
        return False, f"torchvision.io.decode_jpeg(device='cuda') failed: {type(exc).__name__}: {exc}"
    return True, "nvJPEG through torchvision.io.decode_jpeg"


class EncodedImages(Dataset):
    """``(("jpeg", bytes) or ("pixels", uint8 [3, H, W]), target)`` for each file of an
    image-folder dataset: JPEGs stay encoded, other formats are decoded here (Pillow)."""

    def __init__(self, dataset: Any) -> None:
        if not hasattr(dataset, "samples"):
            raise ConfigError("GPU JPEG decoding reads image files: it needs an image folder (or CSV) dataset, got "
                              f"{type(dataset).__name__}; use the CPU decoder for in-memory datasets.")
        self.base = dataset

    def __len__(self) -> int:
        return len(self.base.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[tuple[str, torch.Tensor], Any, tuple[int, int]]:
        index = key[0] if isinstance(key, tuple) else key
        path, target = self.base.samples[index]
        with open(path, "rb") as f:
            head = f.read(3)
        if head == _JPEG_MAGIC:
            return ("jpeg", read_file(str(path))), target, key
        img = load_image(path)
        return ("pixels", T.functional.pil_to_tensor(img)), target, key


def _collate(items: list) -> list:
    return items


def _device_transform(spec: InputSpec, augment: str) -> T.Compose:
    interp = InterpolationMode(spec.interpolation)
    if augment == "standard":
        return T.Compose([T.RandomResizedCrop(spec.image_size, interpolation=interp, antialias=True),
                          T.RandomHorizontalFlip()])
    size = spec.image_size
    resize = [T.Resize(spec.resize_size, interpolation=interp, antialias=True), T.CenterCrop(size)] \
        if spec.resize_size else [T.Resize((size, size), interpolation=interp, antialias=True)]
    return T.Compose(resize + ([T.RandomHorizontalFlip()] if augment == "flip" else []))


class DeviceDecodedLoader:
    """Iterates ``(uint8 images [B, 3, S, S] on device, targets)``: bytes from worker processes,
    JPEGs decoded in one call per batch on ``device``, transforms applied there per image
    (random draws seeded from ``(seed, epoch, index)``)."""

    def __init__(self, dataset: Any, spec: InputSpec, *, augment: str, batch_size: int, device: torch.device,
                 shuffle: bool = False, seed: int = 0, num_workers: int | None = None, drop_last: bool = False) -> None:
        check_choice("augment", augment, AUGMENTATIONS)
        self.device, self.seed, self.transform = device, seed, _device_transform(spec, augment)
        n = len(dataset.samples)
        self.sampler = EpochSampler(n, shuffle=shuffle, seed=seed, drop_last=drop_last and n > batch_size)
        workers = default_num_workers(dataset) if num_workers is None else num_workers
        self.loader = DataLoader(EncodedImages(dataset), batch_size=batch_size, sampler=self.sampler,
                                 num_workers=workers, collate_fn=_collate, persistent_workers=workers > 0,
                                 pin_memory=device.type == "cuda", drop_last=drop_last and n > batch_size,
                                 prefetch_factor=4 if workers > 0 else None)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for items in self.loader:
            jpeg = [i for i, (enc, _, _) in enumerate(items) if enc[0] == "jpeg"]
            decoded: dict[int, torch.Tensor] = {}
            if jpeg:
                out = decode_jpeg([items[i][0][1] for i in jpeg], mode=ImageReadMode.RGB, device=self.device,
                                  apply_exif_orientation=True)
                decoded.update(zip(jpeg, out))
            images = []
            for i, (enc, _, key) in enumerate(items):
                img = decoded[i] if i in decoded else enc[1].to(self.device, non_blocking=True)
                index, epoch = key if isinstance(key, tuple) else (key, 0)
                with torch.random.fork_rng(devices=[]):  # the same random crop for (seed, epoch, index)
                    torch.default_generator.manual_seed(mix_seed(self.seed, epoch, index))
                    images.append(self.transform(img))
            yield torch.stack(images), torch.as_tensor([t for _, t, _ in items])


def gpu_jpeg_loader(dataset: Any, spec: InputSpec, *, augment: str, batch_size: int, device: torch.device,
                    shuffle: bool = False, seed: int = 0, num_workers: int | None = None,
                    drop_last: bool = False) -> DeviceDecodedLoader:
    """A loader decoding ``dataset``'s JPEGs on the CUDA ``device`` (see the module
    docstring); raises ConfigError elsewhere or when nvJPEG is not usable."""
    ok, why = gpu_jpeg_available(device)
    if not ok:
        raise ConfigError(f"{why}. Use the CPU decoder (the default) on this machine.")
    return DeviceDecodedLoader(dataset, spec, augment=augment, batch_size=batch_size, device=device, shuffle=shuffle,
                               seed=seed, num_workers=num_workers, drop_last=drop_last)
