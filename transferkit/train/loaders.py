"""Data loaders whose order and augmentations are a pure function of ``(seed, epoch, index)``.

Why: exact resume and distributed training need the same batches and the same random
crops whatever happened before: a run resumed at epoch 3 must draw what an uninterrupted
run draws at epoch 3, with any number of (persistent) workers. The sampler yields
``(index, epoch)`` pairs; `SeededItems` seeds the random transforms of item
``index`` at ``epoch`` from those numbers, in whichever process decodes it.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from transferkit.data.sampling import EpochSampler, SeededItems, data_loader, default_num_workers, mix_seed

__all__ = ["EpochSampler", "SeededItems", "default_num_workers", "make_loader", "mix_seed"]


def make_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, device: torch.device,
                num_workers: int | None = None, seed: int = 0, drop_last: bool = False, rank: int = 0,
                world_size: int = 1, pad: bool = True, persistent: bool = True) -> DataLoader:
    """A loader over ``dataset`` with an `EpochSampler` (call ``loader.sampler.set_epoch(e)``):
    workers sized to the machine and persistent across epochs, pinned memory on CUDA.
    ``pad=False`` for validation under DDP: each sample exactly once across the ranks.
    ``persistent=False``: the workers exit once a pass over the loader ends (a loader read
    once per pass; see `transferkit.train.features.compute_features`).
    A dataset whose ``sample_groups()`` gives groups (remote shards that the shard cache
    cannot hold at once) is drawn group by group (see `EpochSampler`).

    Example:
        >>> ds = torch.utils.data.TensorDataset(torch.arange(6.0), torch.arange(6))
        >>> [b[1].tolist() for b in make_loader(ds, batch_size=4, shuffle=False, device=torch.device("cpu"))]
        [[0, 1, 2, 3], [4, 5]]
    """
    if num_workers is None:
        num_workers = default_num_workers(dataset, world_size)
    n = len(dataset)  # type: ignore[arg-type]
    grouping = getattr(dataset, "sample_groups", None)  # remote shards larger than the shard cache
    sampler = EpochSampler(n, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
                           drop_last=drop_last and n > batch_size * world_size, pad=pad,
                           groups=grouping() if callable(grouping) else None)
    return data_loader(SeededItems(dataset, seed), batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=getattr(dataset, "collate_fn", None),  # audio: pads clips of different lengths
                      pin_memory=device.type == "cuda", persistent_workers=persistent and num_workers > 0,
                      drop_last=drop_last and len(sampler) > batch_size,
                      prefetch_factor=4 if num_workers > 0 else None)
