"""Image folders and datasets of ``(image, label)``."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from transferkit.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def load_image(path: str | Path, *, min_size: int | None = None) -> Image.Image:
    """Open an image as RGB, applying its EXIF orientation.

    With ``min_size``, JPEG decoding uses Pillow's draft mode to decode directly at the
    smallest power-of-two reduction whose shorter side stays >= ``min_size``: several
    times faster for large photos fed to small models, and the same for both training
    and prediction.
    """
    try:
        with Image.open(path) as img:
            if min_size and img.format == "JPEG":
                img.draft("RGB", (min_size, min_size))
            img = ImageOps.exif_transpose(img)
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"Cannot read image {str(path)!r}: {type(exc).__name__}: {exc}") from exc


def _is_image_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def scan_image_folder(root: str | Path, classes: Sequence[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """List ``(path, class_index)`` for ``root/<class>/**/<image>``.

    ``classes`` fixes the class-to-index mapping (use the training folder's for a
    validation folder); folders not in it raise.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Data folder {str(root)!r} does not exist or is not a folder. "
                        "Expected a folder with one sub-folder of images per class: root/<class>/<image>.jpg.")
    found = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise DataError(f"Data folder {str(root)!r} has no class sub-folders. Expected root/<class>/<image>.jpg.")
    if classes is None:
        classes = found
    else:
        extra = [c for c in found if c not in classes]
        if extra:
            raise DataError(f"Folder {str(root)!r} has classes {extra} that the training data does not have "
                            f"(training classes: {list(classes)}).")
    index = {c: i for i, c in enumerate(classes)}
    samples: list[tuple[str, int]] = []
    empty = []
    for c in found:
        files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(root / c) for f in fs if _is_image_file(f))
        if not files:
            empty.append(c)
        samples.extend((f, index[c]) for f in files)
    if not samples:
        raise DataError(f"No images found under {str(root)!r} (looked for {', '.join(IMAGE_EXTENSIONS)} in "
                        f"{len(found)} class folders). Expected root/<class>/<image>.jpg.")
    if empty:
        warnings.warn(f"Class folders without images in {str(root)!r}: {empty}.", stacklevel=2)
    return samples, list(classes)


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` as a dataset of ``(transform(image), class_index)``.

    Example:
        >>> ds = ImageFolderDataset("hymenoptera/train")  # doctest: +SKIP
        >>> ds.classes
        ['ants', 'bees']
    """

    def __init__(self, root: str | Path | None = None, *, classes: Sequence[str] | None = None,
                 transform: Callable | None = None, samples: list[tuple[str, int]] | None = None,
                 min_size: int | None = None) -> None:
        if samples is None:
            if root is None:
                raise DataError("ImageFolderDataset needs a root folder or a list of samples.")
            samples, classes = scan_image_folder(root, classes)
        self.root = None if root is None else str(root)
        self.samples = samples
        self.classes = list(classes or [])
        self.transform = transform
        self.min_size = min_size

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        path, target = self.samples[i]
        img = load_image(path, min_size=self.min_size)
        return (self.transform(img) if self.transform else img), target

    def view(self, indices: Sequence[int] | None = None, transform: Callable | None = None) -> ImageFolderDataset:
        """The same files (or a subset) with another transform."""
        samples = self.samples if indices is None else [self.samples[i] for i in indices]
        return ImageFolderDataset(self.root, classes=self.classes, transform=transform, samples=samples,
                                  min_size=self.min_size)


class TransformedDataset(Dataset):
    """Any dataset of ``(image, label)`` seen through ``transform`` (and an index subset)."""

    def __init__(self, base: Dataset, transform: Callable | None = None, indices: Sequence[int] | None = None) -> None:
        self.base, self.transform = base, transform
        self.indices = list(range(len(base))) if indices is None else list(indices)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        item = self.base[self.indices[i]]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise DataError(f"A dataset item must be (image, label); item {self.indices[i]} is {type(item).__name__}.")
        img, target = item[0], item[1]
        if isinstance(img, np.ndarray):
            img = Image.fromarray(img)
        return (self.transform(img) if self.transform else img), int(target)

    def view(self, indices: Sequence[int] | None = None, transform: Callable | None = None) -> TransformedDataset:
        idx = self.indices if indices is None else [self.indices[i] for i in indices]
        return TransformedDataset(self.base, transform, idx)


def dataset_targets(ds: Dataset) -> list[int]:
    """The labels of a dataset, read from ``targets`` when present, else by iterating."""
    if isinstance(ds, ImageFolderDataset):
        return ds.targets
    if isinstance(ds, TransformedDataset):
        base_t = getattr(ds.base, "targets", None)
        if base_t is not None and len(base_t) == len(ds.base):  # type: ignore[arg-type]
            return [int(base_t[i]) for i in ds.indices]
        return [int(ds.base[i][1]) for i in ds.indices]
    return [int(ds[i][1]) for i in range(len(ds))]  # type: ignore[arg-type]
