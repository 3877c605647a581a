"""JPEG decoding on the GPU for image files (CUDA, an option of the data layer), and the rule that picks it.

Workers only read the files' bytes; each batch of JPEGs is decoded on the device with
``torchvision.io.decode_jpeg(..., device="cuda")`` (nvJPEG), then resized, cropped and
flipped there, so a fast GPU is not starved by CPU decoding. Files that are not JPEG (PNG,
GIF, ...) are decoded by the workers as usual (Pillow) and joined to the batch; a JPEG the
device decoder refuses, and a file that cannot be read, go through the dataset's own
(Pillow) loading in the main process, so an unreadable file is replaced and reported, or
raises, as ``on_bad_file`` says. The items match the CPU pipeline's (``eval_transform`` /
``train_transform``) up to decoder and resampling differences (no draft mode: the device
decodes at full size, then resizes), so the decoder is part of a feature-cache key.

Batches come as ``(uint8 [B, 3, S, S] on the device, targets)``; the order comes from the
same `EpochSampler` as `transferkit.train.loaders.make_loader`'s (split by rank the same
way) and the random crops are a function of ``(seed, epoch, index)`` (call
``loader.sampler.set_epoch(e)``). ``device`` may be the CPU: torchvision's CPU decoder
then runs the same code path (how it is tested here).

The decision (``input_decode="auto"|"cpu"|"gpu"``) has the two parts every decision of a
run has: `input_decode_facts` looks (which images are JPEG, whether ``decode_jpeg`` works
on the device, and on CUDA the two decoders timed on a few batches of the run's own
files); `decide_input_decode` decides from that alone (pure).

The batching, transforms, seeding, rank split and the run's wiring are tested with the CPU
decoder; on a CUDA machine ``tests/test_cuda.py`` compares nvJPEG batches with the CPU
pipeline and ``benchmarks/gpu_throughput.py`` times the GPU decoder against CPU workers.

Example:
    >>> loader = gpu_jpeg_loader(ds, spec, augment="none", batch_size=64, device=torch.device("cuda"))  # doctest: +SKIP
    >>> x, y = next(iter(loader))  # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from transferkit._io import read_json_object, store_timing
from transferkit._text import exception_line
from transferkit.backbones._base import InputSpec
from transferkit.data.images import load_image
from transferkit.data.late import NOT_BAD_FILES, bad_file_reason, raising, replaces_bad_files
from transferkit.data.sampling import EpochSampler, SeededItems, data_loader, default_num_workers, mix_seed
from transferkit.data.transforms import AUGMENTATIONS, eval_transform, resize_and_crop
from transferkit.errors import ConfigError, DataError, check_choice

_JPEG_MAGIC = b"\xff\xd8\xff"
INPUT_DECODE = ("auto", "cpu", "gpu")
JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")
MIN_JPEG_SHARE = 0.9  # below this the Pillow share of the batches keeps the CPU busy: not worth it
MIN_SPEEDUP = 1.1  # the device decoder must beat the CPU workers by this factor (timing noise)
MIN_IMAGES_TO_TIME = 1000  # below this the timing costs more than it can save
TIMED_BATCHES = 4  # batches timed per decoder (after one warm-up batch each)
STORE_FORMAT = 1


def _tiny_jpeg() -> torch.Tensor:
    """An 8x8 JPEG, to check that the GPU decoder works before relying on it."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buf, "JPEG")
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def gpu_jpeg_available(device: torch.device) -> tuple[bool, str]:
    """Whether batches can be decoded on ``device`` with nvJPEG, and why not (one tiny real
    decode on CUDA; a failure is the reason, never an error)."""
    if device.type != "cuda":
        return False, f"GPU JPEG decoding needs a CUDA device, got {device.type!r}"
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    try:
        decode_jpeg(_tiny_jpeg(), device=device)
    except Exception as exc:  # noqa: BLE001 - a torchvision built without nvJPEG, an old driver
        return False, f"torchvision.io.decode_jpeg(device='cuda') failed: {type(exc).__name__}: {exc}"
    return True, "nvJPEG through torchvision.io.decode_jpeg"


def _file_samples(dataset: Any) -> list[tuple[Any, Any]] | None:
    """``dataset.samples`` when every sample is a file on disk (a path), else None."""
    samples = getattr(dataset, "samples", None)
    if samples is None or not hasattr(dataset, "view"):
        return None
    return samples if all(isinstance(s[0], (str, Path)) for s in samples) else None


def jpeg_census(dataset: Any) -> dict[str, int] | None:
    """``{"files": n, "jpeg": k}`` (JPEGs by file suffix: no file is opened) for a dataset of
    image files on disk; None for anything else (in-memory data, tar shards, tables)."""
    samples = _file_samples(dataset)
    if samples is None:
        return None
    return {"files": len(samples), "jpeg": sum(str(s[0]).lower().endswith(JPEG_SUFFIXES) for s in samples)}


class EncodedImages(Dataset):
    """``(("jpeg", bytes) | ("pixels", uint8 [3, H, W]) | ("bad", None), target, key)`` for
    each file of an image-file dataset: JPEGs stay encoded, other formats are decoded here
    (Pillow); a file that cannot be read is left to the main process (``"bad"``)."""

    def __init__(self, dataset: Any) -> None:
        samples = _file_samples(dataset)
        if samples is None:
            raise ConfigError("GPU JPEG decoding reads image files: it needs an image folder (or CSV) dataset, got "
                              f"{type(dataset).__name__}; use the CPU decoder (input_decode='cpu') for other data.")
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: Any) -> tuple[tuple[str, torch.Tensor | None], Any, Any]:
        index = key[0] if isinstance(key, tuple) else key
        path, target = self.samples[index]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            return ("bad", None), target, key
        if data[:3] == _JPEG_MAGIC:
            return ("jpeg", torch.frombuffer(bytearray(data), dtype=torch.uint8)), target, key
        try:
            img = load_image(io.BytesIO(data), name=str(path))
        except DataError:
            return ("bad", None), target, key
        return ("pixels", T.functional.pil_to_tensor(img)), target, key


def _collate(items: list) -> list:
    return items


def _device_transform(spec: InputSpec, augment: str) -> T.Compose:
    interp = InterpolationMode(spec.interpolation)
    if augment == "standard":
        return T.Compose([T.RandomResizedCrop(spec.image_size, interpolation=interp, antialias=True),
                          T.RandomHorizontalFlip()])
    return T.Compose(resize_and_crop(spec) + ([T.RandomHorizontalFlip()] if augment == "flip" else []))


def _pixels(img: Any) -> torch.Tensor:
    return T.functional.pil_to_tensor(img)


class DeviceDecodedLoader:
    """Iterates ``(uint8 images [B, 3, S, S] on device, targets)``: bytes from worker processes,
    JPEGs decoded in one call per batch on ``device``, transforms applied there per image
    (random draws seeded from ``(seed, epoch, index)``).

    The order: ``EpochSampler(n, shuffle, seed, rank, world_size, drop_last, pad)``, the
    split of `transferkit.train.loaders.make_loader` (``loader.sampler.set_epoch(e)``), or
    ``keys``: an explicit list of ``(index, epoch)`` to decode. ``checked=True`` yields lists
    of ``(index, image on device or None, target, why)`` instead: a file that cannot be read
    gives ``None`` and why (what the sharded feature store masks), or, with
    ``on_bad_file="raise"``, raises.
    """

    def __init__(self, dataset: Any, spec: InputSpec, *, augment: str, batch_size: int, device: torch.device,
                 shuffle: bool = False, seed: int = 0, num_workers: int | None = None, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1, pad: bool = True, keys: list[tuple[int, int]] | None = None,
                 checked: bool = False) -> None:
        check_choice("augment", augment, AUGMENTATIONS)
        encoded = EncodedImages(dataset)
        self.device, self.seed, self.checked = device, seed, checked
        self.transform = _device_transform(spec, augment)
        raw = dataset.view(transform=_pixels)  # the dataset's own (Pillow) loading: replaced or raised
        self.masks = replaces_bad_files(raw)  # checked and skip: a bad file is masked by the caller, not replaced
        self.raw = raising(raw) if checked else raw
        n = len(encoded)
        if keys is not None:
            self.sampler: Any = list(keys)
        else:
            self.sampler = EpochSampler(n, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
                                        drop_last=drop_last and n > batch_size * world_size, pad=pad)
        workers = default_num_workers(dataset, world_size) if num_workers is None else num_workers
        self.loader = data_loader(encoded, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
                                 collate_fn=_collate, persistent_workers=workers > 0 and keys is None,
                                 pin_memory=device.type == "cuda",
                                 drop_last=drop_last and len(self.sampler) > batch_size,
                                 prefetch_factor=4 if workers > 0 else None)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def _decode(self, items: list) -> list[tuple[int, torch.Tensor | None, Any, str]]:
        """``(index, decoded uint8 [3, H, W] on the device or None, target, why)`` per item."""
        jpeg = [i for i, (enc, _, _) in enumerate(items) if enc[0] == "jpeg"]
        decoded: dict[int, torch.Tensor] = {}
        if jpeg:
            try:
                out = decode_jpeg([items[i][0][1] for i in jpeg], mode=ImageReadMode.RGB, device=self.device,
                                  apply_exif_orientation=True)
                decoded.update(zip(jpeg, out))
            except (RuntimeError, ValueError):  # one bad JPEG fails the batch: decode them one by one
                for i in jpeg:
                    try:
                        decoded[i] = decode_jpeg(items[i][0][1], mode=ImageReadMode.RGB, device=self.device,
                                                 apply_exif_orientation=True)
                    except (RuntimeError, ValueError):
                        pass  # the dataset's own loading below decides (Pillow; replaced or raised)
        out_items = []
        for i, (enc, target, key) in enumerate(items):
            index = key[0] if isinstance(key, tuple) else key
            if i in decoded:
                img = decoded[i]
            elif enc[0] == "pixels":
                img = enc[1].to(self.device, non_blocking=True)
            else:
                try:
                    pixels, target = self.raw[index]
                except NOT_BAD_FILES:
                    raise
                except DataError as exc:
                    if not (self.checked and self.masks):
                        raise
                    name = str(self.raw.samples[index][0])  # as the CPU extraction names it
                    out_items.append((index, None, target, f"{name}: {bad_file_reason(exc)}"))
                    continue
                img = pixels.to(self.device)
            out_items.append((index, img, target, ""))
        return out_items

    def _transformed(self, index: int, epoch: int, img: torch.Tensor) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):  # the same random crop for (seed, epoch, index)
            torch.default_generator.manual_seed(mix_seed(self.seed, epoch, index))
            return self.transform(img)

    def __iter__(self) -> Iterator[Any]:
        for items in self.loader:
            epochs = [key[1] if isinstance(key, tuple) else 0 for _, _, key in items]
            decoded = self._decode(items)
            if self.checked:
                yield [(i, None if x is None else self._transformed(i, e, x), y, why)
                       for (i, x, y, why), e in zip(decoded, epochs)]
                continue
            images = [self._transformed(i, e, x) for (i, x, _, _), e in zip(decoded, epochs)]
            yield torch.stack(images), torch.stack([torch.as_tensor(y) for _, _, y, _ in decoded])


def gpu_jpeg_loader(dataset: Any, spec: InputSpec, *, augment: str, batch_size: int, device: torch.device,
                    shuffle: bool = False, seed: int = 0, num_workers: int | None = None,
                    drop_last: bool = False, rank: int = 0, world_size: int = 1,
                    pad: bool = True) -> DeviceDecodedLoader:
    """A loader decoding ``dataset``'s JPEGs on the CUDA ``device`` (see the module
    docstring); raises ConfigError elsewhere or when nvJPEG is not usable."""
    ok, why = gpu_jpeg_available(device)
    if not ok:
        raise ConfigError(f"{why}. Use the CPU decoder (the default) on this machine.")
    return DeviceDecodedLoader(dataset, spec, augment=augment, batch_size=batch_size, device=device, shuffle=shuffle,
                               seed=seed, num_workers=num_workers, drop_last=drop_last, rank=rank,
                               world_size=world_size, pad=pad)


# -------------------------------------------------------------------------------- facts (I/O)
def time_decoders(dataset: Any, spec: InputSpec, *, device: torch.device, batch_size: int, num_workers: int,
                  batches: int = TIMED_BATCHES) -> dict[str, Any]:
    """Images/s of the CPU workers (the dataset's own Pillow loading, ``eval_transform``,
    copied to ``device``) and of the device decoder (`DeviceDecodedLoader`) on the first
    ``batches`` batches of ``dataset`` after one warm-up batch each (worker start-up not
    counted), both with ``num_workers`` workers."""
    n = min(len(dataset), (batches + 1) * batch_size)
    part = dataset.view(indices=range(n))
    cpu_ds = part.view(transform=eval_transform(spec))
    cpu = data_loader(SeededItems(cpu_ds), batch_size=batch_size, sampler=EpochSampler(n, shuffle=False),
                     num_workers=num_workers, collate_fn=getattr(cpu_ds, "collate_fn", None),
                     pin_memory=device.type == "cuda")
    dev = DeviceDecodedLoader(part, spec, augment="none", batch_size=batch_size, device=device,
                              num_workers=num_workers)

    def rate(loader: Iterable) -> tuple[float, int]:
        it = iter(loader)
        next(it)  # warm-up: worker start-up, the decoder's first call
        count, t0 = 0, time.perf_counter()
        for x, _ in it:
            x = x.to(device, non_blocking=True)
            count += len(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return count / max(time.perf_counter() - t0, 1e-9), count

    cpu_ips, counted = rate(cpu)
    dev_ips, _ = rate(dev)
    return {"cpu_images_per_s": cpu_ips, "gpu_images_per_s": dev_ips, "batches": -(-counted // batch_size),
            "batch_size": batch_size, "workers": num_workers}


def _store_key(device: torch.device, spec: InputSpec, batch_size: int, workers: int, census: dict[str, int]) -> str:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return "|".join([where, f"torch {torch.__version__}", f"torchvision {torchvision.__version__}",
                     json.dumps(spec.to_dict(), sort_keys=True, default=str), f"batch {batch_size}",
                     f"{workers} workers", f"{census['files']} files, {census['jpeg']} jpeg"])


def input_decode_facts(requested: str, *, parts: dict[str, Any], spec: InputSpec, device: torch.device,
                       batch_size: int, num_workers: int | None, world_size: int = 1,
                       cache_dir: str | Path | None = None) -> dict[str, Any]:
    """What `decide_input_decode` reads: ``census`` (`jpeg_census` summed over ``parts``,
    None when a part is not image files on disk), ``available`` (`gpu_jpeg_available`:
    ``[ok, why]``), and on CUDA under ``requested="auto"`` with enough JPEG files
    ``measured`` (`time_decoders` on the training files, read from and written to
    ``cache_dir/input_decode.json`` so that later runs on this machine keep the verdict, and
    with it their feature-cache keys) or ``skipped`` (why it was not timed)."""
    check_choice("input_decode", requested, INPUT_DECODE)
    out: dict[str, Any] = {"census": None, "available": None, "measured": None, "skipped": None}
    if spec.kind != "image":
        return out
    counts = [jpeg_census(ds) for ds in parts.values() if ds is not None]
    if not counts or any(c is None for c in counts):
        return out
    census = {"files": sum(c["files"] for c in counts), "jpeg": sum(c["jpeg"] for c in counts)}  # type: ignore[index]
    out["census"] = census
    if device.type != "cuda":
        return out
    out["available"] = list(gpu_jpeg_available(device))
    if requested != "auto" or not out["available"][0]:
        return out
    if census["jpeg"] < MIN_JPEG_SHARE * census["files"]:
        out["skipped"] = "too few JPEG files"
        return out
    train = parts["train"]
    if len(train) < MIN_IMAGES_TO_TIME:
        out["skipped"] = f"too little data to time the decoders ({len(train)} training images; timing starts at " \
                         f"{MIN_IMAGES_TO_TIME})"
        return out
    workers = default_num_workers(train, world_size) if num_workers is None else num_workers
    store = Path(cache_dir) / "input_decode.json" if cache_dir is not None else None
    key = _store_key(device, spec, batch_size, workers, census)
    saved = read_json_object(store).get(key) if store is not None else None
    if isinstance(saved, dict) and saved.get("format") == STORE_FORMAT and isinstance(saved.get("measured"), dict):
        out["measured"] = {**saved["measured"], "stored": True}
        return out
    try:
        measured = time_decoders(train, spec, device=device, batch_size=batch_size, num_workers=workers)
    except Exception as exc:  # noqa: BLE001 - a timing that fails is the reason for the CPU path, never an error
        out["skipped"] = f"timing failed: {exception_line(exc)}"
        return out
    out["measured"] = measured
    if store is not None:
        store_timing(store, key, {"format": STORE_FORMAT, "measured": measured}, what="input-decode timing")
    return out


# ---------------------------------------------------------------------------- the decision (pure)
def decide_input_decode(requested: str, *, device_type: str, facts: dict[str, Any]) -> tuple[str, str]:
    """Where the images of the passes that decode files are decoded, ``"cpu"`` or ``"gpu"``,
    and why (pure: a function of ``requested`` and `input_decode_facts`).

    ``"auto"`` picks the GPU on CUDA when at least ``MIN_JPEG_SHARE`` of the image files
    are JPEG, ``decode_jpeg`` works on the device, and the device decoder was timed at least
    ``MIN_SPEEDUP`` times faster than the CPU workers on the run's own files; otherwise the
    CPU, with the first reason that failed. ``"gpu"`` forces it (a ConfigError saying why
    where it cannot run); ``"cpu"`` keeps the CPU workers.

    Example:
        >>> decide_input_decode("auto", device_type="cpu", facts={"census": {"files": 10, "jpeg": 10}})
        ('cpu', 'no CUDA device: the CPU workers decode (Pillow)')
    """
    check_choice("input_decode", requested, INPUT_DECODE)
    census, available = facts.get("census"), facts.get("available")
    if requested == "cpu":
        return "cpu", "input_decode='cpu'"
    if requested == "gpu":
        if device_type != "cuda":
            raise ConfigError(f"input_decode='gpu' decodes JPEGs with nvJPEG on a CUDA device; this run is on "
                              f"{device_type!r}. Use input_decode='auto' or input_decode='cpu' (or device='cuda' on "
                              "a machine with a GPU).")
        if census is None:
            raise ConfigError("input_decode='gpu' decodes image files, and the data of this run are not image "
                              "files on disk (in-memory data, tar shards or tables); use input_decode='auto' or "
                              "input_decode='cpu'.")
        if available is not None and not available[0]:
            raise ConfigError(f"input_decode='gpu' cannot run here: {available[1]}. Use input_decode='auto' or "
                              "input_decode='cpu'.")
        return "gpu", f"input_decode='gpu' ({_share(census)} of the images are JPEG)"
    if device_type != "cuda":
        return "cpu", "no CUDA device: the CPU workers decode (Pillow)"
    if census is None:
        return "cpu", "the data are not image files on disk"
    if census["jpeg"] < MIN_JPEG_SHARE * census["files"]:
        other = census["files"] - census["jpeg"]
        return "cpu", (f"{100 * other / max(census['files'], 1):.0f}% of the images are not JPEG (GPU decoding "
                       f"needs {MIN_JPEG_SHARE:.0%} JPEG)")
    if available is not None and not available[0]:
        return "cpu", f"GPU decoding unavailable: {available[1]}"
    m = facts.get("measured")
    if not m:
        return "cpu", f"not timed: {facts.get('skipped') or 'no timing'}"
    ratio = m["gpu_images_per_s"] / max(m["cpu_images_per_s"], 1e-9)
    timed = (f"nvJPEG decoded {ratio:.2f}x {'faster' if ratio >= 1 else 'as fast'} than {m['workers']} CPU workers "
             f"on {m['batches']} batches ({m['gpu_images_per_s']:.0f} vs {m['cpu_images_per_s']:.0f} img/s"
             f"{', stored timing' if m.get('stored') else ''})")
    if ratio >= MIN_SPEEDUP:
        return "gpu", timed
    return "cpu", f"{timed}; the GPU must be {MIN_SPEEDUP:g}x faster"


def _share(census: dict[str, int]) -> str:
    return f"{100 * census['jpeg'] / max(census['files'], 1):.0f}%"


__all__ = ["DeviceDecodedLoader", "EncodedImages", "INPUT_DECODE", "decide_input_decode", "gpu_jpeg_available",
           "gpu_jpeg_loader", "input_decode_facts", "jpeg_census", "time_decoders"]
