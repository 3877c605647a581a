"""Decode once: images decoded and resized a single time for multi-epoch training.

When the backbone trains, every epoch used to decode every JPEG again and resize it before
the random crop. `decoded_dataset` decodes each image once into ``uint8`` pixels and
applies only the per-epoch random part of the training transform to them:

- ``augment="standard"`` (random-resized crop + flip): each image is kept with its shorter
  side resized to the transform's ``resize_size`` (``image_size / 0.875`` when the spec has
  none), aspect ratio kept; every epoch draws the crop and the flip from that. The crop's
  position and size relative to the image follow the same distribution as before; pixels
  differ from cropping the full-resolution decode only by resampling (a crop smaller than
  the output is upscaled from the stored image instead of from the original).
- ``augment="flip"``: the eval crop is kept; every epoch flips it (the same items as the
  training transform, bit for bit, under the same seed).
- ``augment="none"``: the eval transform's output is kept (identical items).

Where the pixels live (`plan_decode` decides and says why):

- with ``cache_dir``: a memory-mapped entry ``cache_dir/decoded/<key>/`` (written to a
  temporary folder and renamed, reused by later runs; the operating system's page cache
  keeps it in memory when it fits; under DDP written by one rank per machine, see
  `transferkit.steps.input_loaders`), if the disk has room. Its ``meta.json`` records each
  file's digest and stats: a file changed since (other stats) is hashed, and an entry whose
  files do not match is said to be damaged and decoded again;
- without: in memory, if the estimate (from the image headers) is at most
  ``budget_bytes`` (default `DEFAULT_BUDGET_BYTES`, 2 GiB, for the training and validation
  images together, and per machine: under DDP each of a node's ranks holds its own copy,
  so each gets its share of it);
- otherwise not at all: the returned dataset decodes every epoch, as before.

The key (`decoded_key`) covers the data (``data_fingerprint``: paths, sizes and
modification times of image files, the content of in-memory data), the stored size and
interpolation, the draft-mode decoding size and the Pillow version; a changed input gets a
new entry.

Example:
    >>> from transferkit.backbones import get_backbone
    >>> from transferkit.data import ImageFolderDataset
    >>> spec = get_backbone("tk:small_cnn", weights=None).input_spec
    >>> ds, plan = decoded_dataset(ImageFolderDataset("images"), spec, augment="standard")  # doctest: +SKIP
    >>> plan.mode, plan.reason  # doctest: +SKIP
    ('memory', 'decoded once: 63 MB in memory (budget 2048 MB)')
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from transferkit._io import create_temp, file_digest, file_stat, read_only_folder, remove_stale_temps_in, reserve_blocks
from transferkit.backbones._base import InputSpec
from transferkit.data.fingerprint import data_fingerprint
from transferkit.data.images import UNREADABLE_IMAGE
from transferkit.data.late import reporting
from transferkit.data.sampling import default_num_workers, data_loader
from transferkit.data.transforms import AUGMENTATIONS, ShorterSideResize, ToImageTensor, ToRGB, eval_transform
from transferkit.errors import check_choice, warn
from transferkit.data.transforms import train_transform

DECODED_FORMAT = 2  # 2: meta.json records the files' digests and stats
ENTRY_FILES = ("pixels.npy", "index.npy", "targets.npy")
DEFAULT_BUDGET_BYTES = 2 * 2**30
STANDARD_CROP_FRACTION = 0.875  # resize_size = image_size / 0.875 when the spec has no resize_size


@dataclass(frozen=True)
class DecodePlan:
    """Where decoded pixels go (``"memory"``, ``"disk"`` or ``"off"``), the estimate, and why."""

    mode: str
    estimate_bytes: int
    reason: str
    key: str | None = None
    path: Path | None = None
    capacity_bytes: int | None = None  # what to allocate for image files (an upper bound)


def stored_short_side(spec: InputSpec) -> int:
    """The shorter side images are kept at for ``augment="standard"``."""
    return int(spec.resize_size or round(spec.image_size / STANDARD_CROP_FRACTION))


def _store_transform(spec: InputSpec, augment: str) -> T.Compose:
    """Decode-time part of the training transform (deterministic), ending in a uint8 tensor."""
    if augment == "standard":
        interp = InterpolationMode(spec.interpolation)
        return T.Compose([ToRGB(), ShorterSideResize(stored_short_side(spec), interp), ToImageTensor()])
    return eval_transform(spec)


def epoch_transform(spec: InputSpec, augment: str) -> T.Compose | None:
    """The per-epoch random part applied to the stored pixels (``None`` for ``"none"``)."""
    if augment == "standard":
        return T.Compose([T.RandomResizedCrop(spec.image_size, interpolation=InterpolationMode(spec.interpolation),
                                              antialias=True), T.RandomHorizontalFlip()])
    if augment == "flip":
        return T.RandomHorizontalFlip()
    return None


def decoded_key(dataset: Any, spec: InputSpec, augment: str) -> str:
    """The key of a decoded entry: the data, what is stored, and the decoder.

    Example:
        >>> from transferkit.data import TransformedDataset
        >>> ds = TransformedDataset(torch.utils.data.TensorDataset(torch.zeros(2, 3, 8, 8), torch.tensor([0, 1])))
        >>> decoded_key(ds, InputSpec(image_size=8), "flip") != decoded_key(ds, InputSpec(image_size=8), "standard")
        True
    """
    stored = "resized" if augment == "standard" else "eval-crop"
    parts = {"format": DECODED_FORMAT, "data": data_fingerprint(dataset), "stored": stored,
             "size": stored_short_side(spec) if stored == "resized" else [spec.resize_size, spec.image_size],
             "interpolation": spec.interpolation, "draft": getattr(dataset, "min_size", None),
             "pillow": PIL.__version__}
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=16).hexdigest()


def _stored_shape(w: int, h: int, spec: InputSpec, augment: str) -> tuple[int, int]:
    if augment != "standard":
        return spec.image_size, spec.image_size
    s = stored_short_side(spec)
    short, long = min(w, h), max(w, h)
    return s, int(s * long / short)  # torchvision's Resize: the long side truncated


def estimate_bytes(dataset: Any, spec: InputSpec, augment: str) -> tuple[int, int | None]:
    """The bytes of the stored pixels, from the image headers (no decoding) for image files,
    from the items themselves for in-memory data; and for image files an upper bound to
    allocate (draft-mode decoding rounds sizes: two columns of slack per image), else None.
    An image file whose header cannot be read (not scanned, ``scan="none"``) counts as the
    largest of the others: a replacement of its class takes its place when it is loaded."""
    total, bound, unread, largest = 0, 0, 0, (spec.image_size, spec.image_size)
    samples = getattr(dataset, "samples", None)
    sized = getattr(dataset, "image_size", None)  # encoded images (shards, tables): sizes without decoding
    files = sized is not None or (samples is not None and all(isinstance(p, (str, os.PathLike)) for p, _ in samples))
    for i in range(len(dataset)):
        try:
            if sized is not None:
                w, h = sized(i)
            elif files:
                with Image.open(samples[i][0]) as img:
                    w, h = img.size
            elif augment != "standard":
                w = h = spec.image_size
            else:
                item = dataset[i][0]
                w, h = item.size if isinstance(item, Image.Image) else (item.shape[-1], item.shape[-2])
        except UNREADABLE_IMAGE:
            if not files:
                raise
            unread += 1  # an unreadable image (not scanned: scan="none") is replaced by another when it is loaded
            continue
        a, b = _stored_shape(w, h, spec, augment)
        total, bound, largest = total + 3 * a * b, bound + 3 * a * (b + 2), max(largest, (a, b), key=math.prod)
    a, b = largest  # what a replacement may take at most
    total, bound = total + unread * 3 * a * b, bound + unread * 3 * a * (b + 2)
    return total, (bound if files else None)


def decode_census(dataset: Any, spec: InputSpec, *, augment: str,
                  cache_dir: str | Path | None = None) -> dict[str, Any]:
    """What deciding where decoded pixels go needs to know (the only I/O of that decision):
    the bytes they take, an existing entry under ``cache_dir``, and the free space there."""
    check_choice("augment", augment, AUGMENTATIONS)
    if spec.kind != "image":
        return {"kind": spec.kind}
    need, cap = estimate_bytes(dataset, spec, augment)
    out: dict[str, Any] = {"kind": spec.kind, "need": need, "capacity": cap, "key": None, "path": None,
                           "exists": False, "free": None, "cache_dir": None}
    if cache_dir is not None:
        key = decoded_key(dataset, spec, augment)
        path = Path(cache_dir) / "decoded" / key
        free_at = Path(cache_dir)
        while not free_at.exists() and free_at != free_at.parent:
            free_at = free_at.parent
        out.update(key=key, path=str(path), exists=(path / "meta.json").exists(), cache_dir=str(cache_dir),
                   free=shutil.disk_usage(free_at).free, read_only=read_only_folder(cache_dir))
    return out


def decide_decode(census: dict[str, Any], *, budget_bytes: int = DEFAULT_BUDGET_BYTES,
                  budget_why: str = "") -> DecodePlan:
    """Where the decoded pixels go, and why: a pure function of `decode_census`.
    ``budget_why``: how ``budget_bytes`` came about, said with it (e.g. shared by the ranks of
    a node)."""
    if census["kind"] != "image":
        return DecodePlan("off", 0, f"decoding every epoch: {census['kind']} input is not decoded once")
    need, cap = census["need"], census["capacity"]
    mb = need / 2**20
    kept = ""  # why a cache_dir does not take the pixels, said with the in-memory decision
    if census["cache_dir"] is not None:
        key, path = census["key"], Path(census["path"])
        if census["exists"]:
            return DecodePlan("disk", need, f"decoded once: {mb:.0f} MB read back from {path}", key, path, cap)
        if census.get("read_only"):
            kept = f"cache_dir is read-only ({census['read_only']}) and holds no entry for these images; "
    if census["cache_dir"] is not None and not kept:
        free = census["free"]
        if need * 1.1 + 2**26 <= free:
            return DecodePlan("disk", need, f"decoded once: {mb:.0f} MB memory-mapped under {path}", key, path, cap)
        return DecodePlan("off", need, f"decoding every epoch: {mb:.0f} MB of decoded pixels do not fit the "
                                       f"{free / 2**20:.0f} MB free in {census['cache_dir']}")
    budget = f"{budget_bytes / 2**20:.0f} MB{budget_why}"
    if need <= budget_bytes:
        return DecodePlan("memory", need, f"{kept}decoded once: {mb:.0f} MB in memory (budget {budget})",
                          capacity_bytes=cap)
    fix = "give a writable cache_dir" if kept else "pass cache_dir"
    return DecodePlan("off", need, f"{kept}decoding every epoch: {mb:.0f} MB of decoded pixels exceed the memory "
                                   f"budget of {budget}; {fix} to keep them memory-mapped on disk")


def plan_decode(dataset: Any, spec: InputSpec, *, augment: str, cache_dir: str | Path | None = None,
                budget_bytes: int = DEFAULT_BUDGET_BYTES) -> DecodePlan:
    """Decide where the decoded pixels of ``dataset`` go, and say why (see the module docstring)."""
    return decide_decode(decode_census(dataset, spec, augment=augment, cache_dir=cache_dir), budget_bytes=budget_bytes)


class DecodedDataset(Dataset):
    """Stored ``uint8`` images ``[3, h, w]`` (one flat array, memory-mapped or in memory, and
    an index of ``(offset, h, w)``) seen through a per-epoch random ``transform``."""

    def __init__(self, pixels: np.ndarray, index: np.ndarray, targets: list[Any], transform: Any = None) -> None:
        self.pixels, self.index, self.targets_, self.transform = pixels, index, targets, transform

    def __len__(self) -> int:
        return len(self.index)

    def image(self, i: int) -> torch.Tensor:
        off, h, w = (int(v) for v in self.index[i])
        return torch.from_numpy(np.array(self.pixels[off:off + 3 * h * w])).view(3, h, w)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        img = self.image(i)
        return (self.transform(img) if self.transform is not None else img), self.targets_[i]

    @property
    def targets(self) -> list[Any]:
        return list(self.targets_)


def _first(batch: list) -> Any:
    return batch[0]


def decoded_dataset(dataset: Any, spec: InputSpec, *, augment: str, cache_dir: str | Path | None = None,
                    budget_bytes: int = DEFAULT_BUDGET_BYTES, num_workers: int | None = None,
                    plan: DecodePlan | None = None) -> tuple[Dataset, DecodePlan]:
    """``dataset`` (training data without a transform: an ``ImageFolderDataset`` or a
    ``TransformedDataset``) seen through ``train_transform(spec, augment)``, decoded once
    when `plan_decode` allows it. Returns the dataset to load from and the plan (log
    ``plan.reason``). Items: ``(uint8 [3, image_size, image_size], target)``.

    Random transforms draw from torch's generator, so under
    `SeededItems` each ``(seed, epoch, index)`` gives the same crop.
    Decoding runs in ``num_workers`` processes (default: as for training loaders). ``plan``:
    a decision `plan_decode` already took for these arguments (not taken again).
    """
    plan = plan or plan_decode(dataset, spec, augment=augment, cache_dir=cache_dir, budget_bytes=budget_bytes)
    if plan.mode == "off":
        return dataset.view(transform=train_transform(spec, augment)), plan
    tf = epoch_transform(spec, augment)
    if plan.path is not None and plan.path.exists():  # written whole and renamed: anything less is damage
        stored = _load_entry(plan.path)
        if stored is not None:
            return DecodedDataset(*stored, transform=tf), plan
        damaged = f"The decoded images in {str(plan.path)!r} (cache_dir) are damaged (a file is missing, cut short " \
            "or changed since it was written)"
        read_only = read_only_folder(plan.path.parent)
        if read_only is None:
            warn(f"{damaged}; decoding them again.")
            shutil.rmtree(plan.path, ignore_errors=True)
        else:  # read, never written: in memory where they fit, as without cache_dir
            fits = plan.estimate_bytes <= budget_bytes
            warn(f"{damaged}, and the cache_dir is read-only ({read_only}): "
                 f"{'decoding them once into memory' if fits else 'decoding them every epoch'}.")
            plan = DecodePlan("memory" if fits else "off", plan.estimate_bytes,
                              f"decoded once: {plan.estimate_bytes / 2**20:.0f} MB in memory (the entry in the "
                              f"read-only cache_dir is damaged)" if fits else
                              "decoding every epoch: the entry in the read-only cache_dir is damaged",
                              capacity_bytes=plan.capacity_bytes)
            if not fits:
                return dataset.view(transform=train_transform(spec, augment)), plan
    view = dataset.view(transform=_store_transform(spec, augment))
    workers = default_num_workers(dataset) if num_workers is None else num_workers
    capacity = plan.capacity_bytes
    if plan.mode == "memory":
        buf = np.empty(capacity, dtype=np.uint8) if capacity is not None else None
        pixels, index, targets = _decode_into(view, workers, buf)
        return DecodedDataset(pixels, index, targets, transform=tf), plan
    assert plan.path is not None
    try:
        _write_entry(plan.path, view, workers, capacity, plan.estimate_bytes)
    except OSError as exc:  # the disk filled since the plan measured it: this run decodes every epoch
        warn(f"Cannot write the decoded images to {str(plan.path)!r} (cache_dir): "
             f"{os.strerror(exc.errno) if exc.errno else exc}; decoding every epoch instead.")
        off = DecodePlan("off", plan.estimate_bytes, f"decoding every epoch: writing {plan.path} failed ({exc})")
        return dataset.view(transform=train_transform(spec, augment)), off
    stored = _load_entry(plan.path)
    if stored is None:
        raise OSError(f"The decoded entry {plan.path} was written but cannot be read back.")
    return DecodedDataset(*stored, transform=tf), plan


def _decode_into(view: Dataset, workers: int, pixels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, list[Any]]:
    """Decode every item of ``view`` in order (``workers`` processes) into ``pixels`` (a flat
    preallocated uint8 array or memory map), or into a new array when ``None``. An array too
    small for what was decoded (a replacement larger than the file it stands for) is grown;
    a memory map raises OSError."""
    loader = data_loader(view, batch_size=1, shuffle=False, num_workers=workers, collate_fn=reporting(view, _first))
    index = np.zeros((len(view), 3), dtype=np.int64)  # type: ignore[arg-type]
    chunks: list[np.ndarray] = []
    targets, offset = [], 0
    for i, (img, target) in enumerate(loader):
        if not (isinstance(img, torch.Tensor) and img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3):
            raise TypeError(f"Item {i} decoded to {type(img).__name__} {getattr(img, 'shape', '')}, not a uint8 "
                            "image [3, H, W].")
        _, h, w = img.shape
        flat = img.contiguous().numpy().reshape(-1)
        if pixels is None:
            chunks.append(flat)
        else:
            if offset + flat.size > pixels.shape[0]:  # a file that failed was replaced by a larger image
                if isinstance(pixels, np.memmap):  # reserved on disk: the caller decodes every epoch instead
                    raise OSError(f"Image {i} decoded to {tuple(img.shape)}, more than the space reserved from the "
                                  "image headers (a file that failed to load was replaced by a larger image of its "
                                  "class)")
                grown = np.empty(pixels.shape[0] + 2 * flat.size, dtype=np.uint8)  # room for one more such
                grown[:offset] = pixels[:offset]
                pixels = grown
            pixels[offset:offset + flat.size] = flat
        index[i] = (offset, h, w)
        offset += flat.size
        targets.append(target)
    if pixels is None:
        pixels = np.concatenate(chunks) if chunks else np.zeros(0, np.uint8)
    return pixels, index, targets


def _write_entry(final: Path, view: Dataset, workers: int, capacity: int | None, estimate: int) -> None:
    """Write ``pixels.npy`` (flat uint8), ``index.npy``, ``targets.npy`` and ``meta.json`` into a
    temporary folder beside ``final``, then rename it (a crash never leaves a half entry)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps_in(final.parent)  # what killed writers left (a reserved entry's full size each)
    tmp = create_temp(final, directory=True)  # with the umask's mode: a shared cache_dir serves other users
    try:
        if capacity is not None:  # sizes known from the headers: decode straight into the memory map
            mm = np.lib.format.open_memmap(tmp / "pixels.npy", mode="w+", dtype=np.uint8, shape=(max(capacity, 1),))
            try:
                reserve_blocks(tmp / "pixels.npy")  # a full disk: ENOSPC now, not SIGBUS while decoding
            except OSError:
                del mm
                raise
            _, index, targets = _decode_into(view, workers, mm)
            mm.flush()
            del mm
        else:
            flat, index, targets = _decode_into(view, workers, None)
            np.save(tmp / "pixels.npy", flat)
        np.save(tmp / "index.npy", index)
        np.save(tmp / "targets.npy", np.asarray([_plain_target(t) for t in targets]))
        meta = {"format": DECODED_FORMAT, "n": len(index), "estimate_bytes": estimate,
                "digests": {n: file_digest(tmp / n) for n in ENTRY_FILES},
                "stats": {n: file_stat(tmp / n) for n in ENTRY_FILES}}
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.replace(tmp, final)
        except OSError:  # another process wrote the same entry first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _plain_target(t: Any) -> Any:
    return t.numpy() if isinstance(t, torch.Tensor) else t


def _entry_intact(path: Path, meta: dict[str, Any]) -> bool:
    """Whether the files of the entry at ``path`` are those written: files whose size,
    modification and status-change times and inode are those recorded are trusted without
    reading them; any other file is hashed against its digest (an entry that passes records
    its files' new stats, e.g. after a copy of the cache)."""
    digests, stats = meta.get("digests"), meta.get("stats")
    if not isinstance(digests, dict) or set(digests) != set(ENTRY_FILES):
        return False
    now = {n: file_stat(path / n) for n in ENTRY_FILES}
    if now == stats:
        return True
    if any(file_digest(path / n) != h for n, h in digests.items()):
        return False
    with contextlib.suppress(OSError):  # a read-only cache: checked again next time
        tmp = create_temp(path / "meta.json")
        tmp.write_text(json.dumps({**meta, "stats": now}))
        os.replace(tmp, path / "meta.json")
    return True


def _load_entry(path: Path) -> tuple[np.ndarray, np.ndarray, list[Any]] | None:
    """The pixels (memory-mapped), index and targets of the entry at ``path``; None when it
    is damaged: unreadable, of another format, or its files not those written."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        if not isinstance(meta, dict) or meta.get("format") != DECODED_FORMAT or not _entry_intact(path, meta):
            return None
        pixels = np.load(path / "pixels.npy", mmap_mode="r")
        index = np.load(path / "index.npy")
        raw = np.load(path / "targets.npy")
    except (OSError, ValueError):
        return None
    if len(index) != meta.get("n") or len(raw) != len(index) or \
            (len(index) and int((index[:, 0] + 3 * index[:, 1] * index[:, 2]).max()) > pixels.shape[0]):
        return None
    ints = raw.ndim == 1 and np.issubdtype(raw.dtype, np.integer)
    targets = [int(t) if ints else torch.from_numpy(np.array(t)) for t in raw]
    return pixels, index, targets
