"""Feature caching: a frozen backbone runs once per image (or once per augmented view), not once per epoch.

Features live in memory, or with ``cache_dir`` in a memory-mapped ``.npy`` file on disk
(data larger than RAM; reused across runs). A cache entry is keyed by everything that
changes the features ([`Decisions.feature_key_parts`][transferkit.Decisions.feature_key_parts]): the backbone
name, a hash of the preprocessing and trunk weights (every tensor, BatchNorm statistics
included; not the head), the transform, the precision, memory layout and device type of
the extraction, the number of views and, whenever the transform is random, their seed,
and the data (path, label, size, modification and status-change times of every file for
file-based datasets; the content of in-memory datasets). A changed input gets a new key,
so stale features are never reused: replacing a file with ``cp -p`` or ``rsync -a`` keeps
its mtime but not its ctime. An entry also records a digest of its arrays; a damaged or
truncated entry is recomputed and replaced.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from transferkit.train.distributed import DistInfo, all_ranks, barrier, gather_rows
from transferkit._io import check_free_space, create_temp, file_digest, remove_stale_temps, reserve_blocks
from transferkit.data.fingerprint import data_fingerprint, module_fingerprint, quick_fingerprint  # noqa: F401 (public here too)
from transferkit.errors import OutputError, warn
from transferkit.data.sampling import data_loader, decode_then_compute, in_blocks
from transferkit.train.loaders import EpochSampler, make_loader, mix_seed

CACHE_FORMAT = 2


def cache_key(parts: dict[str, Any]) -> str:
    """The key of a feature-cache entry: a digest of ``parts`` (see
    [`Decisions.feature_key_parts`][transferkit.Decisions.feature_key_parts] for what they cover)."""
    return hashlib.blake2b(json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str).encode(),
                           digest_size=16).hexdigest()


def _write_entry_meta(d: Path, *, key: str, views: int, n: int) -> None:
    digests = {name: file_digest(d / name) for name in ("features.npy", "targets.npy")}
    (d / "meta.json").write_text(json.dumps({"key": key, "views": views, "n": n, "format": CACHE_FORMAT,
                                             "digests": digests}))


@dataclass
class FeatureStore:
    """Cached features ``[views, N, F]`` (a numpy array, memory-mapped when on disk) and targets."""

    features: np.ndarray
    targets: np.ndarray
    key: str
    path: Path | None = None
    reused: bool = False

    @property
    def num_views(self) -> int:
        return int(self.features.shape[0])

    def __len__(self) -> int:
        return int(self.features.shape[1])

    def without(self, items: Sequence[int]) -> FeatureStore:
        """The store less the rows ``items`` (of every view), in memory."""
        keep = np.ones(len(self), dtype=bool)
        keep[list(items)] = False
        return FeatureStore(np.ascontiguousarray(self.features[:, keep]), self.targets[keep], key=self.key)

    def stats(self, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of every feature over all views and items, accumulated
        in float64 a chunk at a time (a memory-mapped store is never read whole)."""
        flat = self.features.reshape(-1, self.features.shape[-1])
        n, total, sq = 0, np.zeros(flat.shape[1]), np.zeros(flat.shape[1])
        for i in range(0, len(flat), chunk):
            part = np.asarray(flat[i:i + chunk], dtype=np.float64)
            n, total, sq = n + len(part), total + part.sum(0), sq + np.square(part).sum(0)
        if n == 0:
            raise ValueError("No features to take statistics of: the training set is empty.")
        mean = total / n
        var = np.maximum(sq / n - np.square(mean), 0.0)
        return torch.from_numpy(mean).float(), torch.from_numpy(np.sqrt(var)).float()


def extract_features(model: Any, loader: DataLoader, device: torch.device, progress: Any = None,
                     forward: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model.features`` (or ``forward(x)``) over ``loader`` in eval mode; return CPU
    ``(features, targets)``. On a CPU that the loader's workers share with the computation
    the batches are decoded a block at a time, then computed (`decode_then_compute`)."""
    was_training = model.training
    model.eval()
    feats, targets = [], []
    fwd = forward or (lambda x: model.features(x.to(device, non_blocking=True)))
    try:
        with torch.no_grad():
            for x, y in in_blocks(loader) if decode_then_compute(loader, device) else loader:
                feats.append(fwd(x).float().cpu())
                targets.append(torch.as_tensor(y))
                if progress is not None:
                    progress.update(len(feats[-1]))
    finally:
        model.train(was_training)
    return torch.cat(feats), torch.cat(targets)


def compute_features(model: Any, dataset: Dataset, *, key: str, views: int, batch_size: int, device: torch.device,
                     num_workers: int | None, seed: int, cache_dir: str | Path | None = None,
                     forward: Callable | None = None, progress: Any = None,
                     info: DistInfo | None = None, loader: Any = None) -> FeatureStore:
    """Features of ``dataset`` (already seen through its transform) for ``views`` passes.

    View ``v`` draws its random augmentations as epoch ``v`` of the loader would, so views
    are reproducible. With ``cache_dir`` the result is stored under ``cache_dir/<key>/``
    (written to a temporary folder, then renamed: a crash never leaves a half entry) and a
    later call with the same key memory-maps it instead of recomputing.

    Distributed (``info.world_size > 1``, every rank calls this with the same arguments):
    rank ``r`` extracts items ``r, r + W, ...`` only and the shards are gathered, so every
    rank gets the same array, in the same order, as one process would compute. ``loader``:
    batches ``(x, y)`` of ``dataset`` in that order (another decoder, e.g.
    `transferkit.data.gpu_jpeg.DeviceDecodedLoader` with the same ``EpochSampler`` split),
    instead of `make_loader`'s. The entry is
    reused only when every rank sees it; otherwise ``local_rank`` 0 of each node writes it
    (one writer per node: a ``cache_dir`` shared between nodes or local to each works) and
    the other ranks memory-map it after a barrier.

    Example:
        >>> ds = torch.utils.data.TensorDataset(torch.randn(5, 3), torch.arange(5))
        >>> lin = torch.nn.Linear(3, 2)
        >>> store = compute_features(lin, ds, key="k", views=1, batch_size=2, device=torch.device("cpu"),
        ...                          num_workers=0, seed=0, forward=lin)
        >>> store.features.shape, store.targets.tolist()
        ((1, 5, 2), [0, 1, 2, 3, 4])
    """
    info = info or DistInfo()
    if cache_dir is not None:
        hit = load_cached(cache_dir, key)
        if all_ranks(hit is not None, info):
            return hit  # type: ignore[return-value]
    if loader is None:
        # workers that outlive a view's reading: a block computed while they live would copy, page by page,
        # every page of this process it writes that they still share since the fork (0.4-0.5 s per pass,
        # measured on Lite0 with ONNX Runtime); once they have exited a write costs a plain page fault
        loader = make_loader(dataset, batch_size=batch_size, shuffle=False, device=device, num_workers=num_workers,
                             seed=seed, rank=info.rank, world_size=info.world_size, persistent=False)
    n = len(dataset)  # type: ignore[arg-type]
    writes = cache_dir is None or info.local_rank == 0  # this rank keeps the gathered array
    tmp = None
    in_memory = False
    if cache_dir is not None and writes:
        try:
            final = Path(_mkdir(cache_dir)) / key
            remove_stale_temps(final)  # what a killed writer of this entry left behind
            tmp = create_temp(final, directory=True)
        except OSError as exc:
            if info.enabled:
                raise
            warn(f"Cannot write a feature-cache entry in {str(cache_dir)!r} (cache_dir): {exc}. The features "
                 "of this run are kept in memory; the next run computes them again.")
            in_memory = True
    try:
        arr, targets = None, None
        for v in range(views):
            loader.sampler.set_epoch(v)  # type: ignore[attr-defined]
            f, t = extract_features(model, loader, device, progress, forward)
            if v == 0:
                shape = (views, n, f.shape[1])
                if tmp is not None:
                    arr = _disk_array(tmp, shape, n, fallback=not info.enabled)
                    if arr is None:  # no room on the cache's disk: this run keeps its features in memory
                        shutil.rmtree(tmp, ignore_errors=True)
                        tmp = None
                        in_memory = True
                if arr is None and writes:
                    arr = np.empty(shape, dtype=np.float32)
                targets = _gathered(t, n, info)
            for start, rows in gather_rows(f, n, info):
                if arr is not None:
                    arr[v, start:start + len(rows)] = rows.numpy()
        assert targets is not None and (arr is not None or not writes)  # n >= 1 is checked by the data layer
        if cache_dir is None or in_memory:
            return FeatureStore(arr, targets, key)  # type: ignore[arg-type]
        if tmp is not None:
            try:
                arr.flush()  # type: ignore[union-attr]
                np.save(tmp / "targets.npy", targets)
                _write_entry_meta(tmp, key=key, views=views, n=n)
            except OSError as exc:
                if info.enabled:
                    raise OutputError(f"Cannot write the feature-cache entry {str(Path(cache_dir) / key)!r} "
                                      f"(cache_dir): {exc}.") from exc
                warn(f"Cannot write the feature-cache entry {str(Path(cache_dir) / key)!r} (cache_dir): "
                     f"{exc}. The features of this run are kept in memory; the next run computes them "
                     "again.")
                arr = np.array(arr)
                shutil.rmtree(tmp, ignore_errors=True)
                return FeatureStore(arr, targets, key)
            del arr
            final = Path(cache_dir) / key
            try:
                os.replace(tmp, final)
            except OSError:  # another process wrote the same entry first: use theirs
                shutil.rmtree(tmp, ignore_errors=True)
            tmp = None
        barrier(info)  # the writers have renamed their entries
        store = load_cached(cache_dir, key)
        if store is None:
            where = f" on rank {info.rank} (local rank 0 of each node writes it: cache_dir must name the same " \
                    "folder on every process of a node)" if info.enabled else ""
            raise OSError(f"The feature-cache entry {str(Path(cache_dir) / key)!r} could not be written or read "
                          f"back{where}; check the disk (space, permissions) or use another cache_dir.")
        store.reused = False
        return store
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _disk_array(tmp: Path, shape: tuple[int, int, int], n: int, *, fallback: bool) -> np.memmap | None:
    """A ``float32`` array of ``shape`` memory-mapped in ``tmp/features.npy``, its blocks
    reserved on the disk first (``posix_fallocate``): writing pages of a memory map that the
    disk cannot hold kills the process with SIGBUS. None, with a warning, when they do not fit
    (``fallback=False``: OutputError)."""
    need = int(np.prod(shape)) * 4 + n * 8
    entry = tmp.parent / _entry_name(tmp)
    try:
        check_free_space(entry, need, what="feature-cache entry", flag="cache_dir")
        arr = np.lib.format.open_memmap(tmp / "features.npy", mode="w+", dtype=np.float32, shape=shape)
        try:
            reserve_blocks(tmp / "features.npy")
        except OSError as exc:
            arr = None  # unmapped before the folder is removed
            raise OutputError(f"Not enough free space for the feature-cache entry {str(entry)!r} (cache_dir): "
                              f"{os.strerror(exc.errno or 0)}.") from exc
        return arr
    except OSError as exc:
        if not fallback:
            raise
        size = f"{need / 2**20:.1f} MB" if need >= 2**20 else f"{need / 2**10:.0f} kB"
        warn(f"{exc} The features of this run are kept in memory instead (about {size}); "
             "the next run computes them again.")
        return None


def _entry_name(tmp: Path) -> str:
    """The entry a temporary folder ``.<key>.tk-...tmp`` is written for."""
    return tmp.name[1:].split(".tk-")[0]


def _gathered(t: torch.Tensor, n: int, info: DistInfo) -> np.ndarray:
    """The full ``n``-row array from the ranks' round-robin shards ``t`` (see `gather_rows`)."""
    blocks = [rows for _, rows in gather_rows(t, n, info)]
    return torch.cat(blocks).numpy()


def _mkdir(d: str | Path | None) -> str:
    Path(d).mkdir(parents=True, exist_ok=True)  # type: ignore[arg-type]
    return str(d)


def load_cached(cache_dir: str | Path, key: str) -> FeatureStore | None:
    """The entry ``key`` in ``cache_dir``, memory-mapped; None when absent. An entry that is
    incomplete, damaged (a digest or a shape disagrees with its meta.json) or of another
    format is removed (with a warning) and None returned, so the caller recomputes it."""
    d = Path(cache_dir) / key
    if not d.exists():
        return None
    problem = _entry_problem(d, key)
    if problem is None:
        try:
            feats = np.load(d / "features.npy", mmap_mode="r")
            targets = np.load(d / "targets.npy")
            meta = json.loads((d / "meta.json").read_text())
            if feats.shape[:2] != (meta["views"], meta["n"]) or len(targets) != meta["n"]:
                problem = f"arrays of shape {feats.shape} / {targets.shape} for {meta['views']} views of {meta['n']}"
        except (OSError, ValueError, KeyError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
    if problem is not None:
        warn(f"Feature-cache entry {str(d)!r} is damaged ({problem}); recomputing it.")
        if d.is_dir() and not d.is_symlink():
            shutil.rmtree(d, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                d.unlink()
        return None
    return FeatureStore(feats, targets, key, path=d, reused=True)


def _entry_problem(d: Path, key: str) -> str | None:
    try:
        meta = json.loads((d / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        return f"no readable meta.json: {exc}"
    if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
        return f"format {meta.get('format')} / key {meta.get('key')}, expected {CACHE_FORMAT} / {key}"
    for name, digest in (meta.get("digests") or {}).items():
        try:
            if not (d / name).is_file() or file_digest(d / name) != digest:
                return f"{name} does not match its digest"
        except OSError as exc:
            return f"{name} cannot be read ({type(exc).__name__}: {exc})"
    return None if meta.get("digests") else "no digests"


class FeatureDataset(Dataset):
    """Batches from a `FeatureStore`: each sample's view is picked from ``(seed, epoch, index)``.

    ``__getitems__`` reads a whole batch at once (one fancy-indexing read from the memory map).
    """

    def __init__(self, store: FeatureStore, seed: int = 0) -> None:
        self.store, self.seed = store, seed

    def __len__(self) -> int:
        return len(self.store)

    def __getitems__(self, keys: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.fromiter((k[0] for k in keys), dtype=np.int64, count=len(keys))
        v = self.store.num_views
        views = (np.zeros_like(idx) if v == 1 else
                 np.fromiter((mix_seed(self.seed, e, i) % v for i, e in keys), dtype=np.int64, count=len(keys)))
        x = torch.from_numpy(np.ascontiguousarray(self.store.features[views, idx]))
        return x, torch.from_numpy(np.asarray(self.store.targets[idx]))

    def __getitem__(self, key: tuple[int, int]):
        x, y = self.__getitems__([key])
        return x[0], y[0]


def _batch_identity(batch):
    return batch


def feature_loader(store: FeatureStore | torch.Tensor, targets: torch.Tensor | None = None, *, batch_size: int,
                   shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1) -> DataLoader:
    """A loader over cached features (in-process: the data are in memory or memory-mapped).

    Example:
        >>> dl = feature_loader(torch.randn(10, 4), torch.arange(10), batch_size=4, shuffle=True)
        >>> [len(y) for _, y in dl]
        [4, 4, 2]
    """
    if isinstance(store, torch.Tensor):
        store = FeatureStore(store.numpy()[None], torch.as_tensor(targets).numpy(), key="")
    sampler = EpochSampler(len(store), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
    return data_loader(FeatureDataset(store, seed), batch_size=batch_size, sampler=sampler, num_workers=0,
                      collate_fn=_batch_identity)
