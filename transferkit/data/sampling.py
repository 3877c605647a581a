"""Deterministic sampling: seeds mixed from integers, a per-epoch sampler that splits
across ranks, items with per-(epoch, index) seeded augmentation, and the decoding worker count."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64-style mixing, stable across runs and platforms)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class EpochSampler(Sampler):
    """Yields ``(index, epoch)``; shuffles with a permutation seeded by ``(seed, epoch)``;
    under distributed training each rank takes every ``world_size``-th index of that
    permutation (so the union of the ranks' batches is the single-process batch).

    Example:
        >>> s = EpochSampler(4, shuffle=False)
        >>> list(s)
        [(0, 0), (1, 0), (2, 0), (3, 0)]
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False) -> None:
        self.n, self.shuffle, self.seed, self.rank, self.world = n, shuffle, seed, rank, world_size
        self.drop_last, self.epoch = drop_last, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.world > 1:
            per_rank = self.n // self.world if self.drop_last else -(-self.n // self.world)
            order = (order + order[: per_rank * self.world - self.n])[: per_rank * self.world]  # pad like DistributedSampler
            order = order[self.rank::self.world]
        return order

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(i, self.epoch) for i in self._indices()])

    def __len__(self) -> int:
        if self.world == 1:
            return self.n
        return self.n // self.world if self.drop_last else -(-self.n // self.world)


class SeededItems(Dataset):
    """``base[index]`` with torch's RNG seeded from ``(seed, epoch, index)`` for the call
    (the caller's RNG state is restored afterwards), so random augmentations repeat exactly."""

    def __init__(self, base: Dataset, seed: int = 0) -> None:
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: Any):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed() would also queue a lazy CUDA seeding that
            # records a stack trace each call (about 6 ms, more than decoding a small image)
            torch.default_generator.manual_seed(mix_seed(self.seed, epoch, index))
            return self.base[index]


def default_num_workers(dataset: Any, world_size: int = 1) -> int:
    """Decoding workers for file-backed datasets: the CPUs this process may use (split across
    local ranks), at most 8; 0 for in-memory data, where worker start-up costs more than it saves."""
    if not hasattr(dataset, "samples"):
        return 0
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    return max(0, min(8, cpus // max(world_size, 1)))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too
