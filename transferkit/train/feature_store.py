"""A sharded, resumable store of frozen-backbone features, for data larger than memory.

The store of one key is a folder ``<directory>/<key>/`` of *parts*: part ``p`` holds the
samples ``[p * part_size, min((p + 1) * part_size, num_samples))``, in
``part-<p>/features.npy`` (``[views, rows, dim]``), ``targets.npy`` and ``mask.npy``
(True where the sample could be read), with ``part.json`` recording the files' digests and
stats and the part's masked samples (how many, and their names with why). A part is
written into a temporary folder and renamed when complete, so it is either there whole or
not at all:

- **Resume.** A killed extraction leaves its committed parts; the next run computes only
  `ShardedFeatureStore.missing_parts` (each worker loses at most the part it was writing).
  Parts are keyed by sample range, not by rank, so a resume may use another number of
  ranks: rank ``r`` of ``W`` computes the missing parts ``p`` with ``p % W == r``
  (`ShardedFeatureStore.assigned_parts`).
- **Precision.** Features are stored in the precision they were computed in: ``float32``,
  ``float16``, or ``bfloat16`` (as raw ``uint16`` in the ``.npy`` file, half the bytes of
  ``float32``; `ShardedFeatureStore.load` gives them back as ``torch.bfloat16``).
- **Bad samples.** A sample that cannot be read gets a zero row and ``mask = False``; it is
  listed in ``report()["masked"]`` (by every process and run that reads the store) and left
  out of head training, instead of discarding the store.
- **Disk.** Free space is checked before each part is written (an
  `OutputError` says how much is needed).
- **Memory.** Extraction holds one part at a time: its peak memory does not grow with the
  number of samples.

Head training reads it back (`ShardedFeatureStore.batches`): a store that fits in the
memory budget is loaded into one tensor and batched by indexing it, with no DataLoader; a
larger one is read a part at a time (a contiguous block), the parts in an order seeded by
``(seed, epoch)`` and the rows shuffled within each block.

Example:
    >>> import tempfile, torch
    >>> store = ShardedFeatureStore.open(tempfile.mkdtemp(), "k", num_samples=5, part_size=2, dim=3)
    >>> store.missing_parts()
    [0, 1, 2]
    >>> for p in store.missing_parts():
    ...     a, b = store.part_range(p)
    ...     store.write_part(p, torch.ones(b - a, 3), torch.arange(a, b))
    >>> x, y, mask = store.load()
    >>> tuple(x.shape), y.tolist(), store.report()["computed"]
    ((1, 5, 3), [0, 1, 2, 3, 4], 3)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from transferkit._io import (create_temp, file_digest, file_stat, no_space, remove_path, remove_stale_temps,
                             remove_stale_temps_in, with_margin)
from transferkit._text import plural
from transferkit.errors import ConfigError, DataError, OutputError, warn
from transferkit.data.late import NOT_BAD_FILES, bad_file_reason, raising, replaces_bad_files
from transferkit.data.sampling import SeededItems, data_loader, decode_then_compute, in_blocks, mix_seed, stack_images
from transferkit.train.distributed import (DistInfo, all_ranks, all_reduce_sum, barrier, broadcast_object,
                                           gather_objects)

STORE_FORMAT = 1
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}  # bf16 kept as raw uint16 bits
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TARGET_PARTS = 256  # a killed extraction loses at most 1/256 of the work per worker
MIN_PART_ROWS = 256  # small data: one part, extracted in full batches
MAX_PART_BYTES = 64 * 2**20  # a part (all its views) stays a modest write and a modest read


def part_size_for(num_samples: int, dim: int, *, views: int = 1, dtype: Any = "float32") -> int:
    """Rows per part: ``num_samples / TARGET_PARTS`` (at least ``MIN_PART_ROWS``), at most
    ``MAX_PART_BYTES`` of features per part.

    Example:
        >>> part_size_for(20, 512), part_size_for(1_281_167, 1280, dtype="bfloat16")
        (20, 5005)
    """
    itemsize = 4 if _dtype_name(dtype) == "float32" else 2
    rows = max(MIN_PART_ROWS, -(-num_samples // TARGET_PARTS))
    cap = max(1, MAX_PART_BYTES // max(views * dim * itemsize, 1))
    return max(1, min(rows, cap, num_samples))


def _stored_meta(path: Path) -> Any:
    """The parameters recorded in the store ``path``'s ``store.json``; None when missing or unreadable."""
    try:
        return json.loads((path / "store.json").read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = create_temp(path)
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _read_into(path: Path, out: np.ndarray) -> None:
    """Read the array of the ``.npy`` file ``path`` (C order, ``out``'s bytes) into ``out`` with
    large reads (a copy from a memory map faults each page in on its own: slower)."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(fh)
        if fortran or dtype != out.dtype or int(np.prod(shape)) != out.size:
            raise DataError(f"{str(path)!r} holds {shape} {dtype}, expected {out.shape} {out.dtype}.")
        view = memoryview(out).cast("B")
        got = 0
        while got < len(view):
            k = fh.readinto(view[got:])
            if not k:
                raise DataError(f"{str(path)!r} ends early: {got} of {len(view)} bytes.")
            got += k


def _dtype_name(dtype: Any) -> str:
    name = str(dtype).replace("torch.", "")
    name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}.get(
        name, name)
    if name not in DTYPES:
        raise ConfigError(f"Feature store dtype must be one of {list(DTYPES)}, got {dtype!r}.")
    return name


class ShardedFeatureStore:
    """Parts of features on disk; see the module docstring. Build it with `open`."""

    def __init__(self, path: Path, meta: dict[str, Any], present: list[int], *, read_only: str | None = None) -> None:
        self.path, self.meta = path, meta
        self.read_only = read_only  # why the store's folder cannot be written: read, never written (None: writable)
        self.other = False  # read-only, and its folder holds no store of these parameters (every part missing)
        self.num_samples, self.part_size = int(meta["num_samples"]), int(meta["part_size"])
        self.dim, self.views, self.dtype = int(meta["dim"]), int(meta["views"]), str(meta["dtype"])
        self.reused_parts = sorted(present)  # committed before this process opened the store
        self.computed_parts: list[int] = []  # written by this process

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, directory: str | Path, key: str, *, num_samples: int, part_size: int, dim: int,
             dtype: Any = "float32", views: int = 1, read_only: str | None = None) -> ShardedFeatureStore:
        """The store ``directory/key`` for these parameters: created if absent, reopened (its
        committed parts reused) if it was made with the same ones; a folder of the same key
        made with others (another part size) is replaced.

        ``read_only`` (why ``directory`` cannot be written, see
        `transferkit._io.read_only_folder`): the store is read as it is, never written; a store
        made with other parameters, or none, has every part missing, and `fill_store` says
        what the read-only folder lacks instead of computing it."""
        if num_samples < 1 or part_size < 1 or dim < 1 or views < 1:
            raise ConfigError(f"Feature store needs num_samples, part_size, dim and views >= 1, got {num_samples}, "
                              f"{part_size}, {dim}, {views}.")
        meta = {"format": STORE_FORMAT, "key": key, "num_samples": int(num_samples), "part_size": int(part_size),
                "dim": int(dim), "dtype": _dtype_name(dtype), "views": int(views)}
        path = Path(directory) / key
        if read_only is not None:
            store = cls(path, meta, [], read_only=read_only)
            store.other = _stored_meta(path) != meta
            store.reused_parts = [p for p in range(store.num_parts) if store._committed(p)]
            return store
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"Cannot create the feature store {str(path)!r}: {exc}.") from exc
        meta_file = path / "store.json"
        stored = _stored_meta(path)
        newer = stored.get("format") if isinstance(stored, dict) else None
        if isinstance(newer, int) and not isinstance(newer, bool) and newer > STORE_FORMAT:  # not this version's
            raise OutputError(f"The feature store {str(path)!r} was written by a newer transferkit (store format "
                              f"{newer}; this one writes {STORE_FORMAT}): give this version another cache_dir, or "
                              "upgrade it. Nothing was removed.")
        remove_stale_temps_in(path)  # parts that killed writers left half written (a live writer's stay)
        if stored != meta:
            for p in path.glob("part-*"):
                remove_path(p)
            if not meta_file.is_file():  # a folder (or a FIFO) in its place: damage in a folder of the cache's own
                remove_path(meta_file)
            _write_json(meta_file, meta)
        store = cls(path, meta, [])
        store.reused_parts = [p for p in range(store.num_parts) if store._committed(p)]
        return store

    # -- parts ---------------------------------------------------------------------------
    @property
    def num_parts(self) -> int:
        return -(-self.num_samples // self.part_size)

    def part_range(self, p: int) -> tuple[int, int]:
        """``(start, stop)``: the samples of part ``p``."""
        if not 0 <= p < self.num_parts:
            raise IndexError(f"part {p} of a store with {self.num_parts} parts")
        return p * self.part_size, min((p + 1) * self.part_size, self.num_samples)

    def _part_dir(self, p: int) -> Path:
        return self.path / f"part-{p:06d}"

    def _part_info(self, p: int) -> dict[str, Any] | None:
        """Part ``p``'s ``part.json`` (its digests, file stats and masked count), None when not committed."""
        if self.other:
            return None
        try:
            info = json.loads((self._part_dir(p) / "part.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(info, dict):
            return None
        if "part" in info and [info["part"], info.get("start"), info.get("stop")] != [p, *self.part_range(p)]:
            return None  # another part's folder under this part's name (renamed by hand): its rows are elsewhere
        return info

    def _committed(self, p: int, verify: bool = False) -> bool:
        """Whether part ``p`` is committed; with ``verify``, also whether its files are the
        ones committed: files whose size, modification and status-change times and inode are those recorded when
        they were last verified are trusted without reading them (the store's start-up cost
        grows with the number of parts, not of samples); any other file is hashed in full
        against its digest, and a part that passes records its files' new stats."""
        info = self._part_info(p)
        if info is None:
            return False
        if not verify:
            return True
        d = self._part_dir(p)
        digests, stats = info.get("digests", {}), info.get("stats", {})
        try:
            if not all((d / n).is_file() for n in digests):  # a folder or a FIFO in a file's place: never read
                return False
            now = {n: file_stat(d / n) for n in digests}
            if now == stats:
                return True
            if not all(file_digest(d / n) == h for n, h in digests.items()):
                return False
        except OSError:
            return False
        if self.read_only is None:  # a read-only store (a copy) is hashed again by each run that verifies it
            _write_json(d / "part.json", {**info, "stats": now})
        return True

    def lacks(self, missing: list[int]) -> str:
        """What a read-only store lacks for the run that opened it, and how to go on."""
        folder = self.path.parent
        if self.other:
            held = sorted(p.parent.name for p in folder.glob("*/store.json") if p.parent != self.path)
            found = _stored_meta(self.path)
            what = (f"holds another store of this key (made for {found.get('num_samples')} samples of dim "
                    f"{found.get('dim')}, {found.get('dtype')})" if isinstance(found, dict) else
                    "holds no store of this run's features")
            if held and not isinstance(found, dict):
                what += f" (it holds {plural(len(held), 'store')} of other settings: {', '.join(held[:4])}"
                what += ", ...)" if len(held) > 4 else ")"
        else:
            what = (f"lacks {plural(len(missing), 'part')} of the {self.num_parts} of this run's store "
                    f"{self.path.name} (missing, or their files do not match their digests: parts "
                    f"{missing[:5]}{', ...' if len(missing) > 5 else ''})")
        return (f"The cache_dir {str(folder)!r} is read-only ({self.read_only}) and {what}; the features of this "
                f"run (key {self.path.name}, {self.num_samples} samples) cannot be computed into it. A read-only "
                "cache_dir is read, never written. Compute them once with the same settings into a writable "
                "cache_dir (and copy it there), give a writable cache_dir, or leave cache_dir out to compute them "
                "in memory.")

    def missing_parts(self, *, verify: bool = False) -> list[int]:
        """The parts not yet committed (with ``verify``, also those whose files do not match
        their digests; those are removed)."""
        out = []
        for p in range(self.num_parts):
            if not self._committed(p, verify):
                if self.read_only is None:
                    remove_path(self._part_dir(p))  # a folder, or a file in its place
                out.append(p)
        return out

    def assigned_parts(self, rank: int = 0, world_size: int = 1, missing: list[int] | None = None) -> list[int]:
        """The missing parts rank ``rank`` of ``world_size`` computes.

        Without ``missing``: the missing parts ``p`` with ``p % world_size == rank``, which
        needs no agreement between the ranks (each may look at a different moment: a part
        is either committed already or computed by its one owner). With ``missing`` (the
        same list on every rank, e.g. broadcast from rank 0): every ``world_size``-th of it,
        which balances the ranks after a resume that left parts unevenly.
        """
        if missing is not None:
            return list(missing)[rank::world_size]
        return [p for p in self.missing_parts() if p % world_size == rank]

    def _as_stored(self, feats: Any, rows: int) -> np.ndarray:
        t = torch.as_tensor(feats).detach().cpu()
        if t.dim() == 2:
            t = t.unsqueeze(0)
        if tuple(t.shape) != (self.views, rows, self.dim):
            raise ValueError(f"features of shape {tuple(t.shape)}, expected {(self.views, rows, self.dim)}")
        want = TORCH_DTYPES[self.dtype]
        if t.dtype != want:
            raise ValueError(f"features of dtype {t.dtype}, but the store keeps {want}: store features in the "
                             "precision they were computed in (open the store with that dtype)")
        t = t.contiguous()
        return (t.view(torch.int16).numpy().view(np.uint16) if want == torch.bfloat16 else t.numpy())

    def write_part(self, p: int, feats: Any, targets: Any, mask: Any = None,
                   masked: Sequence[tuple[int, str]] = ()) -> None:
        """Commit part ``p``: ``feats`` ``[rows, dim]`` (or ``[views, rows, dim]``) in the store's
        dtype, ``targets`` ``[rows, ...]``, ``mask`` ``[rows]`` (True: the sample was read; default
        all True), ``masked``: ``(sample, name and why)`` of the masked samples. Written to a temporary
        folder, then renamed; free space checked first."""
        start, stop = self.part_range(p)
        rows = stop - start
        arr = self._as_stored(feats, rows)
        tgt = np.asarray(torch.as_tensor(targets).cpu().numpy())
        if len(tgt) != rows:
            raise ValueError(f"{len(tgt)} targets for the {rows} samples of part {p}")
        m = np.ones(rows, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        need = arr.nbytes + tgt.nbytes + m.nbytes
        try:
            free = shutil.disk_usage(self.path).free
        except FileNotFoundError as exc:
            raise OutputError(f"The feature store {str(self.path)!r} was removed while this run wrote it (a cleanup "
                              "of cache_dir?). Run again: the features are computed anew.") from exc
        if with_margin(need) > free:
            raise no_space(f"feature store {str(self.path)!r} (a part of it)", need, free,
                           "Free some space or use another cache_dir; the parts written so far are kept.")
        final = self._part_dir(p)
        remove_stale_temps(final)
        tmp = create_temp(final, directory=True)
        try:
            np.save(tmp / "features.npy", arr)
            np.save(tmp / "targets.npy", tgt)
            np.save(tmp / "mask.npy", m)
            names = ("features.npy", "targets.npy", "mask.npy")
            info = {"part": p, "start": start, "stop": stop, "masked": int((~m).sum()),
                    "masked_samples": [[int(i), why] for i, why in masked],
                    "digests": {n: file_digest(tmp / n) for n in names},
                    "stats": {n: file_stat(tmp / n) for n in names}}  # kept by the rename below
            (tmp / "part.json").write_text(json.dumps(info))
            try:
                os.replace(tmp, final)
            except OSError:  # another process committed it first: keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.computed_parts.append(p)

    # -- reading -------------------------------------------------------------------------
    def read_part(self, p: int, *, mmap: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(features as stored, targets, mask)`` of a committed part (features memory-mapped)."""
        d = self._part_dir(p)
        if not self._committed(p):
            raise DataError(f"Part {p} of the feature store {str(self.path)!r} is not written yet.")
        return (np.load(d / "features.npy", mmap_mode="r" if mmap else None), np.load(d / "targets.npy"),
                np.load(d / "mask.npy"))

    def to_torch(self, arr: np.ndarray) -> torch.Tensor:
        """Stored features as a tensor of the store's dtype (bf16 from its raw bits)."""
        arr = np.ascontiguousarray(arr)
        t = torch.from_numpy(arr if arr.flags.writeable else np.array(arr))
        return t.view(torch.bfloat16) if self.dtype == "bfloat16" else t

    def load(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The whole store in memory: features ``[views, N, dim]`` (the store's dtype), targets,
        mask. Every part must be committed."""
        missing = self.missing_parts()
        if missing:
            raise DataError(f"The feature store {str(self.path)!r} misses parts {missing[:5]}; extract them first.")
        feats = torch.empty((self.views, self.num_samples, self.dim), dtype=TORCH_DTYPES[self.dtype])
        targets, masks = [], []
        for p in range(self.num_parts):
            a, b = self.part_range(p)
            f, t, m = self.read_part(p)
            feats[:, a:b] = self.to_torch(f)
            targets.append(torch.from_numpy(t))
            masks.append(torch.from_numpy(m))
        return feats, torch.cat(targets), torch.cat(masks)

    @property
    def nbytes(self) -> int:
        """Bytes of the committed parts' files."""
        return sum(f.stat().st_size for f in self.path.glob("part-*/*.npy"))

    def report(self) -> dict[str, Any]:
        """``samples``, ``shards`` (parts), ``part_size``, ``computed`` / ``reused`` (parts written
        by this process / found committed), ``dtype``, ``bytes`` (on disk), ``bytes_per_sample``,
        ``masked`` (the samples of the whole store that could not be read, with why) and
        ``masked_samples`` (how many)."""
        n = self.nbytes
        infos = [self._part_info(p) for p in range(self.num_parts)]
        masked_total = sum(int(i.get("masked", 0)) for i in infos if i is not None)
        return {"samples": self.num_samples, "shards": self.num_parts, "part_size": self.part_size,
                "computed": len(self.computed_parts), "reused": len(self.reused_parts), "dtype": self.dtype,
                "bytes": n, "bytes_per_sample": n / self.num_samples, "views": self.views,
                "masked": list(self.masked_reasons(infos).values()), "masked_samples": masked_total,
                "path": str(self.path)}

    def masked_reasons(self, infos: list[dict[str, Any] | None] | None = None) -> dict[int, str]:
        """``{sample: name and why}`` of the masked samples of every committed part, whichever
        process or run wrote it (``infos``: the parts' `_part_info`, when read already). A part
        that records only how many it masked names them by index."""
        out: dict[int, str] = {}
        for p, info in enumerate(infos if infos is not None else [self._part_info(p) for p in range(self.num_parts)]):
            if info is None:
                continue
            if "masked_samples" in info:
                out.update((int(i), why) for i, why in info["masked_samples"])
            elif info.get("masked"):
                start, _ = self.part_range(p)
                out.update((start + int(i), f"sample {start + int(i)}: masked when the feature store was filled")
                           for i in np.flatnonzero(~self.read_part(p)[2]))
        return out

    def masked_indices(self) -> list[int]:
        """The samples of the whole store (every committed part) that could not be read."""
        out: list[int] = []
        for p in range(self.num_parts):
            if self._committed(p):
                start, _ = self.part_range(p)
                out.extend(int(i) + start for i in np.flatnonzero(~self.read_part(p)[2]))
        return out

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of every feature over all views of the unmasked samples,
        accumulated in float64 a part at a time (the store is never read whole)."""
        n, total, sq = 0, np.zeros(self.dim), np.zeros(self.dim)
        for p in range(self.num_parts):
            f, _, m = self.read_part(p)
            x = self.to_torch(f)[:, torch.from_numpy(m)].double().reshape(-1, self.dim).numpy()
            n, total, sq = n + len(x), total + x.sum(0), sq + np.square(x).sum(0)
        if n == 0:
            raise DataError(f"No features to take statistics of in {str(self.path)!r}: every sample is masked.")
        mean = total / n
        return torch.from_numpy(mean).float(), torch.from_numpy(np.sqrt(np.maximum(sq / n - mean**2, 0.0))).float()

    def arrays(self, *, all_views: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``(x float32 [rows, dim], y)`` of the unmasked samples, view after view (or view 0
        only), in one preallocated float32 array: the one copy a solver that wants the
        features in memory needs (``head="logistic"``)."""
        views = self.views if all_views else 1
        valid = [self.read_part(p)[2] for p in range(self.num_parts)]
        per_view = sum(int(m.sum()) for m in valid)
        x = np.empty((views * per_view, self.dim), dtype=np.float32)
        ys = []
        row = 0
        for v in range(views):
            for p in range(self.num_parts):
                f, t, _ = self.read_part(p)
                m = valid[p]
                block = self.to_torch(np.asarray(f[v]))[torch.from_numpy(m)].float().numpy()
                x[row:row + len(block)] = block
                row += len(block)
                ys.append(t[m])
        return x, np.concatenate(ys)

    def batches(self, batch_size: int, *, seed: int = 0, memory_budget: int = 2 * 2**30,
                device: torch.device | str = "cpu", block_bytes: int = 256 * 2**20, rank: int = 0,
                world_size: int = 1) -> HeadBatches:
        """Training batches of ``(features as float32, targets)`` over the unmasked samples
        (this rank's share under DDP); see [`HeadBatches`][transferkit.train.feature_store.HeadBatches]."""
        return HeadBatches(self, batch_size, seed=seed, memory_budget=memory_budget, device=device,
                           block_bytes=block_bytes, rank=rank, world_size=world_size)


class HeadBatches:
    """``(x float32 [B, dim], y)`` batches of one epoch (call ``set_epoch(e)`` first), the view
    of each sample chosen from ``(seed, epoch, index)``.

    ``mode`` is ``"memory"`` when the store (its dtype) fits ``memory_budget``: it is loaded
    once into one tensor on ``device`` and batches are slices of a seeded permutation, no
    DataLoader; else ``"blocks"``: runs of consecutive parts of about ``block_bytes``
    (at most the memory budget, at least one part) are read whole, sequentially, the blocks
    in an order seeded by ``(seed, epoch)`` and the rows shuffled within each block, so
    memory holds one block at a time.

    Under DDP (``world_size > 1``) every rank walks the same epoch order in global batches of
    ``batch_size * world_size`` rows and takes every ``world_size``-th row of each; the epoch is
    padded to a multiple of ``world_size`` by repeating its first rows, so every rank gets the
    same number of batches of the same sizes (no rank waits at an all-reduce another skips).
    """

    def __init__(self, store: ShardedFeatureStore, batch_size: int, *, seed: int = 0,
                 memory_budget: int = 2 * 2**30, device: torch.device | str = "cpu",
                 block_bytes: int = 256 * 2**20, rank: int = 0, world_size: int = 1) -> None:
        self.store, self.batch_size, self.seed, self.epoch = store, int(batch_size), seed, 0
        self.rank, self.world = int(rank), int(world_size)
        self.block_bytes = min(int(block_bytes), int(memory_budget)) if memory_budget > 0 else int(block_bytes)
        self.device = torch.device(device)
        itemsize = 4 if store.dtype == "float32" else 2
        need = store.views * store.num_samples * store.dim * itemsize
        self.part_bytes = store.views * store.part_size * store.dim * itemsize
        self.mode = "memory" if need <= memory_budget else "blocks"
        self.reason = (f"{need / 2**20:.0f} MB of features {'fit' if self.mode == 'memory' else 'exceed'} the "
                       f"memory budget of {memory_budget / 2**20:.0f} MB")
        if self.mode == "memory":
            feats, targets, mask = store.load()
            self.feats, self.targets = feats.to(self.device), targets.to(self.device)
            self.valid = torch.nonzero(mask).flatten()
            self.valid_count = len(self.valid)
        else:  # targets and masks (a few bytes per sample) stay in memory: an epoch reads features only
            self.labels = [store.read_part(p)[1:] for p in range(store.num_parts)]
            self.valid_count = sum(int(m.sum()) for _, m in self.labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def sampler(self) -> _Epochs:
        """What a training loop reads of a DataLoader's sampler: ``set_epoch(e)`` and
        ``len()`` (the samples this rank sees per epoch)."""
        return _Epochs(self)

    def __len__(self) -> int:
        padded = -(-self.valid_count // self.world) * self.world
        return -(-padded // (self.batch_size * self.world))

    def _views(self, idx: torch.Tensor) -> torch.Tensor:
        v = self.store.views
        if v == 1:
            return torch.zeros_like(idx)
        return torch.tensor([mix_seed(self.seed, self.epoch, int(i)) % v for i in idx.tolist()],
                            dtype=torch.long, device=idx.device)

    def _chunks(self, g: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's rows in their global order, a chunk at a time."""
        if self.mode == "memory":
            order = self.valid[torch.randperm(len(self.valid), generator=g).to(self.valid.device)]
            chunk = max(self.batch_size * self.world, 1) * 64
            for s in range(0, len(order), chunk):
                idx = order[s:s + chunk]
                x = self.feats[0, idx] if self.store.views == 1 else self.feats[self._views(idx), idx]
                yield x.float(), self.targets[idx]
            return
        parts = self.store.num_parts
        per_block = max(1, min(parts, self.block_bytes // max(self.part_bytes, 1)))
        blocks = [list(range(b, min(b + per_block, parts))) for b in range(0, parts, per_block)]
        for k in torch.randperm(len(blocks), generator=g).tolist():
            x, y = self._read_block(blocks[k])
            perm = torch.randperm(len(y), generator=g)
            yield x[perm].float().to(self.device), y[perm].to(self.device)

    def _read_block(self, parts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The valid rows of consecutive ``parts`` (one long sequential read), copied once from
        the memory-mapped files into one array (each sample's view chosen when there are several)."""
        rows_max = sum(b - a for a, b in map(self.store.part_range, parts))
        buf = np.empty((rows_max, self.store.dim), dtype=DTYPES[self.store.dtype])
        ys, n = [], 0
        for p in parts:
            start, _ = self.store.part_range(p)
            t, m = self.labels[p]
            rows = None if m.all() else np.flatnonzero(m)
            path = self.store._part_dir(p) / "features.npy"
            if self.store.views == 1 and rows is None:  # the common case: read the file into place
                _read_into(path, buf[n:n + len(m)])
                ys.append(t)
                n += len(m)
                continue
            f = np.load(path, mmap_mode="r")
            if self.store.views == 1:
                src = f[0][rows]
            else:  # the view of each row, seeded per (seed, epoch, sample)
                idx = np.arange(len(m)) if rows is None else rows
                src = f[self._views(torch.from_numpy(idx + start)).numpy(), idx]
            buf[n:n + len(src)] = src
            ys.append(t if rows is None else t[rows])
            n += len(src)
        return self.store.to_torch(buf[:n]), torch.from_numpy(np.concatenate(ys) if len(ys) > 1 else ys[0])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        step, w, r = self.batch_size * self.world, self.world, self.rank
        first: tuple[torch.Tensor, torch.Tensor] | None = None
        carry: tuple[torch.Tensor, torch.Tensor] | None = None
        for x, y in self._chunks(g):
            if first is None or len(first[1]) < w:
                first = (x[:w], y[:w]) if first is None else (torch.cat([first[0], x])[:w], torch.cat([first[1], y])[:w])
            start = 0
            if carry is not None:  # complete the batch that straddles two chunks (copies < one batch)
                need = step - len(carry[1])
                cx, cy = torch.cat([carry[0], x[:need]]), torch.cat([carry[1], y[:need]])
                if len(cy) < step:
                    carry = (cx, cy)
                    continue
                yield cx[r::w], cy[r::w]
                start, carry = need, None
            end = start + (len(y) - start) // step * step
            for s in range(start, end, step):
                yield x[s + r:s + step:w], y[s + r:s + step:w]
            carry = (x[end:], y[end:]) if end < len(y) else None
        if carry is None or first is None:
            return
        x, y = carry
        short = (-len(y)) % w
        if short:  # pad the epoch to a multiple of world_size with its first rows
            reps = -(-short // len(first[1]))
            x = torch.cat([x, first[0].repeat(reps, 1)[:short]])
            y = torch.cat([y, first[1].repeat(reps, *([1] * (first[1].dim() - 1)))[:short]])
        yield x[r::w], y[r::w]


class _Epochs:
    def __init__(self, batches: HeadBatches) -> None:
        self.batches = batches

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)

    def __len__(self) -> int:
        return -(-self.batches.valid_count // self.batches.world)


# -- extraction ----------------------------------------------------------------------------
class _Checked(Dataset):
    """``(index, x or None, y, why)`` for key ``(index, view)``: the item drawn as epoch
    ``view`` would draw it (its random transforms seeded by ``(seed, view, index)``); a
    sample that cannot be read gives ``x = None`` and why (with ``on_bad_file="raise"`` its
    error is raised)."""

    def __init__(self, base: Any, seed: int) -> None:
        self.masks = replaces_bad_files(base)  # else a failing file stops the run, as on_bad_file="raise" says
        base = raising(base)  # a file that fails raises, so that its sample is masked, not replaced
        self.base, self.seeded = base, SeededItems(base, seed)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, Any, Any, str]:
        i, _ = key
        try:
            x, y = self.seeded[key]
            return i, x, y, ""
        except NOT_BAD_FILES:
            raise  # a remote shard that could not be fetched, no file descriptor left: its samples are not bad
        except DataError as exc:
            if not self.masks:
                raise
            samples = getattr(self.base, "samples", None)
            name = str(samples[i][0]) if samples is not None else f"item {i}"
            target = samples[i][1] if samples is not None else -1
            return i, None, target, f"{name}: {bad_file_reason(exc)}"


class _Range(Dataset):
    def __init__(self, base: _Checked, start: int, stop: int, view: int) -> None:
        self.base, self.start, self.stop, self.view = base, start, stop, view

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, j: int) -> Any:
        return self.base[(self.start + j, self.view)]


class _LoadedInOne:
    """The collate function of `extract_parts`: a batch's items ``(index, x or None, y, why)`` as
    ``([(index, loaded, y, why)], x)``, the ``x`` of the items that loaded stacked into one
    tensor (None when none did) with ``collate`` (a dataset's ``batch_collate``: audio clips
    padded) or `stack_images`, tensor targets as NumPy arrays. From a worker, one
    shared-memory tensor (a file descriptor while it lives) crosses per batch, not one per
    item: the blocks read ahead held thousands, past the usual limit of 1024."""

    def __init__(self, collate: Callable[[Any], Any] | None) -> None:
        self.collate = collate

    def __call__(self, items: list) -> tuple[list[tuple[int, bool, Any, str]], torch.Tensor | None]:
        xs = [x for _, x, _, _ in items if x is not None]
        x = None if not xs else self.collate([(v, 0) for v in xs])[0] if self.collate is not None else \
            stack_images([torch.as_tensor(v) for v in xs])
        return [(i, v is not None, _plain(y), why) for i, v, y, why in items], x


def _plain(y: Any) -> Any:
    """A tensor target as a NumPy array, which crosses from a worker pickled (a tensor would
    take a shared-memory descriptor of its own); other targets as they are."""
    return y.numpy() if isinstance(y, torch.Tensor) and y.dtype != torch.bfloat16 else y


def extract_parts(store: ShardedFeatureStore, dataset: Any, forward: Callable[[torch.Tensor], torch.Tensor], *,
                  batch_size: int = 64, num_workers: int = 0, rank: int = 0, world_size: int = 1,
                  parts: list[int] | None = None, seed: int = 0, progress: Any = None,
                  batches: Callable[[int, int, int], Iterable[list[tuple[int, Any, Any, str]]]] | None = None,
                  device: Any = "cpu") -> list[int]:
    """Compute and commit this rank's missing parts (`ShardedFeatureStore.assigned_parts`,
    or ``parts``) of ``dataset`` (items ``(x, y)``, already transformed) with ``forward``
    (``x`` batch -> ``[B, dim]`` features, in the store's dtype or converted to it). View
    ``v`` of a store with several views draws each item's random transforms as epoch ``v``
    of a loader with this ``seed`` would (`transferkit.data.sampling.SeededItems`). A sample
    that raises a [`DataError`][transferkit.DataError] is masked and recorded in its part
    (`ShardedFeatureStore.masked_reasons`). ``batches(start, stop, view)``: the items ``start..stop`` of ``view``
    in batches of ``(index, x or None, y, why)`` from another decoder (e.g.
    `transferkit.data.gpu_jpeg.DeviceDecodedLoader` with ``checked=True``) instead of a
    DataLoader over ``dataset``; ``device``: where ``forward`` computes (on a CPU whose cores
    the workers share, a block of batches is decoded, then computed: `decode_then_compute`).
    Returns the parts written. Memory: one part at a time."""
    if len(dataset) != store.num_samples:
        raise ValueError(f"the dataset has {len(dataset)} samples, the store {store.num_samples}")
    todo = store.assigned_parts(rank, world_size) if parts is None else list(parts)
    checked = _Checked(dataset, seed)
    want = TORCH_DTYPES[store.dtype]
    in_one = _LoadedInOne(getattr(dataset, "batch_collate", None))  # audio: clips of different lengths, padded
    done = []
    for p in todo:
        start, stop = store.part_range(p)
        feats = torch.zeros((store.views, stop - start, store.dim), dtype=want)
        targets: list[Any] = [None] * (stop - start)
        mask = np.ones(stop - start, dtype=bool)
        masked: list[tuple[int, str]] = []
        for v in range(store.views):
            loader = batches(start, stop, v) if batches is not None else \
                data_loader(_Range(checked, start, stop, v), batch_size=batch_size, shuffle=False,
                           num_workers=num_workers, collate_fn=in_one)
            if batches is None and decode_then_compute(loader, device):
                loader = in_blocks(loader)
            with torch.no_grad():
                for batch in loader:
                    items, x = batch if batches is None else in_one(batch)
                    for i, loaded, y, why in items:
                        targets[i - start] = y
                        if not loaded and mask[i - start]:
                            mask[i - start] = False
                            masked.append((i, why))
                    if x is not None:
                        rows = torch.tensor([i - start for i, loaded, _, _ in items if loaded])
                        feats[v, rows] = forward(x).detach().to("cpu", want)
                    if progress is not None:
                        progress.update(len(items))
        store.write_part(p, feats, torch.stack([torch.as_tensor(t) for t in targets]), mask, masked)
        done.append(p)
    return done


# -- one process or every rank of a job ------------------------------------------------------
def store_complete(directory: str | Path, key: str, *, num_samples: int, dim: int, dtype: Any = "float32",
                   views: int = 1) -> bool:
    """Whether ``directory/key`` holds a store of these parameters (its part size as
    `part_size_for` makes it) with every part committed; nothing is written or hashed."""
    store = ShardedFeatureStore.open(directory, key, num_samples=num_samples, dim=dim, dtype=dtype, views=views,
                                     part_size=part_size_for(num_samples, dim, views=views, dtype=dtype),
                                     read_only="probed")
    return not store.other and len(store.reused_parts) == store.num_parts


def open_store(directory: str | Path, key: str, info: DistInfo | None = None, **params: Any) -> ShardedFeatureStore:
    """`ShardedFeatureStore.open` on every rank of a job (every rank calls it with the same
    arguments): rank 0 opens first, then the local rank 0 of each node, then the others,
    with a barrier between, so that no rank's opening (which replaces a store made with other
    parameters) can remove a part that another rank has committed already."""
    info = info or DistInfo()
    store = None  # (the same turns and barriers where a rank's cache_dir is read-only: the ranks' nodes may differ)
    for turn in (info.rank == 0, info.rank != 0 and info.local_rank == 0, info.local_rank != 0):
        if turn:
            store = ShardedFeatureStore.open(directory, key, **params)
        barrier(info)
    assert store is not None
    return store


def fill_store(store: ShardedFeatureStore, dataset: Any, forward: Callable[[torch.Tensor], torch.Tensor],
               info: DistInfo | None = None, *, bar: Callable[[int], Any] | None = None,
               local_world_size: int | None = None, **extract: Any) -> dict[str, Any]:
    """Compute the missing parts of ``store`` with `extract_parts` (``extract``: its keyword
    arguments), on one process or on every rank of a job, and return the store's report,
    ``computed`` summed over the ranks.

    Under DDP rank 0 broadcasts its `ShardedFeatureStore.missing_parts` and rank ``r`` of
    ``W`` computes every ``W``-th of that list (a committed part whose files do not match
    their digests counts as missing, with a warning) (balanced ranks, also after a resume that
    left parts unevenly); a barrier; then every rank sees the whole store. A ``cache_dir``
    local to each node lacks the parts computed on other nodes: the ranks of that node
    then compute them (part ``p`` by local rank ``p % local_world_size``), so every node
    ends with the whole store (each node computes all of it once; a shared ``cache_dir``
    computes it once in all). A rank whose store is read-only (its ``cache_dir``) computes
    nothing: when it lacks parts, every rank stops with its `ShardedFeatureStore.lacks` before
    any feature is computed. ``bar(total)``: a context manager for the progress of this
    rank's samples, or None.
    """
    info = info or DistInfo()
    local_world = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
    mine = store.missing_parts(verify=True) if info.is_main or store.read_only is not None else None
    missing = broadcast_object(mine, info)
    # a read-only store (its rank's cache_dir; a node's may differ from another's) must hold every part: when one
    # lacks parts, every rank stops with its words, before any feature is computed
    said = gather_objects(store.lacks(mine) if store.read_only is not None and mine else None, info)
    rank, lacking = next(((r, why) for r, why in enumerate(said) if why), (None, None))
    if lacking is not None:
        raise OutputError(lacking if rank == info.rank else f"Rank {rank} stops the job: {lacking}")
    damaged = [p for p in store.reused_parts if p in missing]
    if damaged and info.is_main:
        warn(f"Feature store {str(store.path)!r}: parts {damaged[:5]} are damaged (their files do not "
             "match their digests); recomputing them.")
    store.reused_parts = [p for p in store.reused_parts if p not in missing]
    # a read-only rank computes nothing: its share falls to the ranks of its own store's machine in the second round
    rounds = [store.assigned_parts(info.rank, info.world_size, missing=missing) if store.read_only is None else []]
    for turn in range(2):
        mine = rounds[-1]
        rows = sum(b - a for a, b in map(store.part_range, mine)) * store.views
        with (bar(rows) if bar is not None else contextlib.nullcontext()) as progress:
            extract_parts(store, dataset, forward, parts=mine, progress=progress, **extract)
        barrier(info)  # every rank has committed its parts
        local = store.missing_parts()
        if all_ranks(not local, info):
            break
        if turn == 1:
            # the first rank whose store lacks parts, with the path of its store (each rank may have its own)
            rank, (path, parts) = next((r, got) for r, got in enumerate(gather_objects((str(store.path), local), info))
                                       if got[1])
            raise OutputError(f"The feature store {path!r} still misses parts {parts[:5]} on rank {rank} "
                              "after extraction; check the disk (space, permissions), or give the processes of a "
                              "machine one cache_dir (a folder of each process's own holds only its share of the "
                              "parts).")
        rounds.append([p for p in local if p % local_world == info.local_rank % local_world])  # a node-local cache_dir
    report = store.report()
    report["computed"] = int(all_reduce_sum([float(len(store.computed_parts))], info)[0])
    return report
