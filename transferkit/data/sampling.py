"""Deterministic sampling: seeds mixed from integers, a per-epoch sampler that splits
across ranks, items with per-(epoch, index) seeded augmentation, and the decoding worker count."""

from __future__ import annotations

import copy
import os
import random
import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from transferkit._signals import held_signals


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

    The order is a function of ``(seed, epoch)`` only: the same with any number of
    DataLoader workers (the sampler runs in the main process), of shards, or of files.

    ``pad=True`` (training): every rank gets ``ceil(n / world_size)`` indices, the last
    ranks repeating the first indices of the permutation (as ``DistributedSampler`` does),
    or ``floor(n / world_size)`` with ``drop_last``; every rank then runs the same number
    of batches, so no rank waits at a gradient all-reduce that another will not reach.
    ``pad=False`` (validation): rank ``r`` gets exactly the indices ``r, r + W, ...`` of
    the permutation, so across ranks each sample is seen exactly once; ranks may differ by
    one sample, so reduce their sums once after the loop (never per batch).

    Example:
        >>> s = EpochSampler(4, shuffle=False)
        >>> list(s)
        [(0, 0), (1, 0), (2, 0), (3, 0)]
        >>> [len(EpochSampler(5, shuffle=False, rank=r, world_size=2, pad=False)) for r in (0, 1)]
        [3, 2]
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False, pad: bool = True, groups: Any = None) -> None:
        self.n, self.shuffle, self.seed, self.rank, self.world = n, shuffle, seed, rank, world_size
        self.drop_last, self.pad, self.epoch = drop_last, pad, 0
        self.groups = None if groups is None else np.asarray(groups, dtype=np.int64)
        if self.groups is not None and len(self.groups) != n:
            raise ValueError(f"groups has {len(self.groups)} entries for {n} indices")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _grouped(self) -> list[int]:
        assert self.groups is not None
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            names, of = np.unique(self.groups, return_inverse=True)
            group_rank = torch.randperm(len(names), generator=g).numpy()
            within = torch.randperm(self.n, generator=g).numpy()
            order = np.lexsort((within, group_rank[of])).tolist()  # by group rank, then shuffled within
        else:
            order = list(range(self.n))
        if self.world == 1:
            return order
        if not self.pad:
            base, extra = divmod(self.n, self.world)
            start = self.rank * base + min(self.rank, extra)
            return order[start:start + base + (self.rank < extra)]
        per_rank = self.n // self.world if self.drop_last else -(-self.n // self.world)
        order = (order * (-(-per_rank * self.world // max(self.n, 1))))[: per_rank * self.world]  # pad
        return order[self.rank * per_rank:(self.rank + 1) * per_rank]

    def _indices(self) -> list[int]:
        if self.groups is not None:
            return self._grouped()
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.world > 1:
            if not self.pad:
                return order[self.rank::self.world]
            per_rank = self.n // self.world if self.drop_last else -(-self.n // self.world)
            order = (order * (-(-per_rank * self.world // max(self.n, 1))))[: per_rank * self.world]  # pad
            order = order[self.rank::self.world]
        return order

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(i, self.epoch) for i in self._indices()])

    def indices_of(self, rank: int) -> list[int]:
        """The indices rank ``rank`` takes this epoch (what its own sampler yields).

        Example:
            >>> EpochSampler(5, shuffle=False, rank=0, world_size=2, pad=False).indices_of(1)
            [1, 3]
        """
        other = copy.copy(self)
        other.rank = int(rank)
        return other._indices()

    def __len__(self) -> int:
        if self.world == 1:
            return self.n
        if not self.pad:
            return len(range(self.rank, self.n, self.world))
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


def default_num_workers(dataset: Any, world_size: int = 1, *, alone: bool = False) -> int:
    """Decoding workers for file-backed datasets: the CPUs this process may use split across
    the processes of this node (``LOCAL_WORLD_SIZE``, which torchrun sets; else
    ``world_size``; all of them when this process decodes ``alone`` while the node's others
    wait), at most 8; 0 for in-memory data, where worker start-up costs more than it saves.

    Example:
        >>> import os
        >>> class Files:
        ...     samples = []
        >>> os.environ["LOCAL_WORLD_SIZE"] = "1"  # 2 nodes x 1 process: each node's CPUs serve one
        >>> default_num_workers(Files(), world_size=2) == default_num_workers(Files(), world_size=1)
        True
        >>> del os.environ["LOCAL_WORLD_SIZE"]
    """
    if not hasattr(dataset, "samples"):
        return 0
    cpus = usable_cpus()
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    per_node = 1 if alone else int(local) if local.isdecimal() and int(local) > 0 else max(world_size, 1)
    return max(0, min(8, cpus // per_node))


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


READ_AHEAD_BYTES = 256 * 2**20
READ_AHEAD_BATCHES = 256  # and at most this many batches (fewer under a low `ulimit -n`: `read_ahead_batches`)


def read_ahead_batches() -> int:
    """How many batches a read-ahead block may hold: `READ_AHEAD_BATCHES`, or an eighth of
    the process's open-file limit where that is lower (each tensor of a batch that came from
    a DataLoader worker holds a file descriptor while it lives: two for ``(x, y)``)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return READ_AHEAD_BATCHES
    return READ_AHEAD_BATCHES if soft == resource.RLIM_INFINITY else max(8, min(READ_AHEAD_BATCHES, soft // 8))


def decode_then_compute(loader: Any, device: Any) -> bool:
    """Whether a CPU pass over ``loader`` should let its workers decode a block of batches
    and then compute the block (`in_blocks`), rather than compute while they decode: on a
    CPU whose cores the compute threads and the decoding workers would share
    (``num_workers + torch threads > usable CPUs``), interleaving them slows both (a
    worker that takes a core from a multi-threaded kernel stalls all its threads). On a GPU,
    or with cores to spare, decoding overlaps computing as usual.

    Example:
        >>> class L:
        ...     num_workers = usable_cpus()
        >>> decode_then_compute(L(), torch.device("cpu")), decode_then_compute(L(), torch.device("meta"))
        (True, False)
    """
    workers = int(getattr(loader, "num_workers", 0) or 0)
    return getattr(device, "type", device) == "cpu" and workers > 0 and \
        workers + torch.get_num_threads() > usable_cpus()


def _nbytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj`` (a tensor, or lists and tuples of them and of other things)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    return sum(_nbytes(o) for o in obj) if isinstance(obj, (tuple, list)) else 0


def in_blocks(batches: Any, budget_bytes: int = READ_AHEAD_BYTES, most: int | None = None) -> Iterator[Any]:
    """The items of ``batches``, read ahead a block at a time: batches are drawn until they
    hold ``budget_bytes`` of tensors, or there are ``most`` of them (`read_ahead_batches`: a
    batch from a DataLoader worker holds descriptors while it lives), or the iterable ends; then they are handed
    out one by one; the next block is drawn only when the consumer has taken the whole block.

    Example:
        >>> list(in_blocks([(torch.zeros(2), 0), (torch.zeros(2), 1), (torch.zeros(2), 2)], budget_bytes=16))
        [(tensor([0., 0.]), 0), (tensor([0., 0.]), 1), (tensor([0., 0.]), 2)]
    """
    most = read_ahead_batches() if most is None else most
    block: list[Any] = []
    size = 0
    for item in batches:
        block.append(item)
        size += _nbytes(item)
        if size >= budget_bytes or len(block) >= most:
            yield from block
            block, size = [], 0
    yield from block


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too


def stack_images(xs: list[torch.Tensor]) -> torch.Tensor:
    """Image tensors ``[C, H, W]`` stacked into one batch, as training, the feature pass and
    ``predict`` batch them: where uint8 pixels come beside float ones in [0, 1] (a dataset that
    returns both, e.g. a ``ConcatDataset`` of PIL images and ``ToTensor()`` output), all are
    brought to float in [0, 1] first (``torch.stack`` alone would put the uint8 ones at 0..255).

    Example:
        >>> stack_images([torch.full((1, 1, 1), 255, dtype=torch.uint8), torch.ones(1, 1, 1)]).flatten().tolist()
        [1.0, 1.0]
    """
    if len({x.dtype for x in xs}) > 1:
        xs = [x.float() / 255.0 if x.dtype == torch.uint8 else x.float() for x in xs]
    return torch.stack(xs)


def collate_items(batch: list[Any]) -> Any:
    """The DataLoader ``collate_fn`` of datasets that bring none of their own:
    ``default_collate``, with the images of ``(image, ...)`` items that mix uint8 and float
    pixels batched by `stack_images` (a list, as ``default_collate`` returns for tuples; a
    named tuple stays one). Any other mix is ``default_collate``'s to take or refuse."""
    first = batch[0] if batch else None
    if isinstance(first, (tuple, list)) and first and isinstance(first[0], torch.Tensor) and first[0].ndim == 3:
        kinds = {item[0].dtype for item in batch if isinstance(item[0], torch.Tensor)}
        if torch.uint8 in kinds and len(kinds) > 1 and all(k == torch.uint8 or k.is_floating_point for k in kinds):
            xs = stack_images([item[0] for item in batch])
            rest = default_collate([tuple(item[1:]) for item in batch])
            return type(first)(xs, *rest) if hasattr(first, "_fields") else [xs, *rest]
    return default_collate(batch)


def data_loader(dataset: Dataset, **options: Any) -> DataLoader:
    """``torch.utils.data.DataLoader(dataset, **options)`` whose worker processes exit quietly
    on SIGTERM and whose worker seeds come from a generator of its own (``generator=``, by
    default seeded with ``torch.initial_seed()``), so that iterating it draws no number from
    torch's global generator, and whose batches of mixed image types are brought to one
    (`collate_items`, unless ``collate_fn`` is given); every DataLoader of the package is made here.

    Example:
        >>> [b.tolist() for b in data_loader(torch.arange(5), batch_size=2)]
        [[0, 1], [2, 3], [4]]
    """
    if "worker_init_fn" in options:
        raise TypeError("data_loader sets worker_init_fn itself")
    batching = options.get("batch_size", 1) is not None or options.get("batch_sampler") is not None
    if options.get("collate_fn") is None and batching:  # (without batches, DataLoader converts items alone)
        options["collate_fn"] = collate_items
    from PIL import Image

    if options.get("generator") is None:
        # the workers' base seed is drawn from this, never from torch's global generator: a
        # loader with persistent workers draws it once per process, so drawing from the global
        # one shifted the model's random numbers (dropout, SpecAugment) after a resume. (Every loader of a
        # process gets the same base seed: the items' random numbers come from `SeededItems`, per item.)
        options["generator"] = torch.Generator().manual_seed(torch.initial_seed())

    sigint = signal.getsignal(signal.SIGINT)
    if getattr(sigint, "raises_interruptions", False):  # a run's `first_interruption_holds`: Ctrl-C as Python's
        sigint = signal.default_int_handler
    plain = sigint if sigint in (signal.SIG_IGN, signal.SIG_DFL, signal.default_int_handler) else None
    return _Loader(dataset, worker_init_fn=WorkerInit(Image.MAX_IMAGE_PIXELS, plain), **options)


class _Loader(DataLoader):
    """A DataLoader that starts its worker processes with SIGINT and SIGTERM held
    (`transferkit._signals.held_signals`), then raises for one that came meanwhile. A signal
    that lands while workers are forked otherwise runs its handler inside Python's fork hooks,
    which drop the exception ("Exception ignored in ... _after_fork"): the run went on as if
    nothing had come, or a worker killed half-started was reported as a crash."""

    def _get_iterator(self):  # noqa: ANN202  torch's own signature
        handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
        if self.num_workers == 0 or None in handlers:  # a handler installed from C could not be put back
            return super()._get_iterator()
        with held_signals():
            return super()._get_iterator()


class WorkerInit:
    """DataLoader ``worker_init_fn`` of every loader: `quiet_exit_on_sigterm`, and Pillow's
    decompression-bomb limit and the SIGINT handler (default, ignored or Python's) as the
    process that made the loader had them (a worker started by spawn, macOS's default, imports
    Pillow anew: a raised limit would not reach it; a forked one inherits the recorder of the
    signals held while it starts, `_Loader`)."""

    def __init__(self, max_image_pixels: int | None, sigint: Any = None) -> None:
        self.max_image_pixels = max_image_pixels
        self.sigint = sigint  # the SIGINT handler of the process that made the loader, where it is a plain one

    def __call__(self, worker_id: int) -> None:
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = self.max_image_pixels
        quiet_exit_on_sigterm(worker_id)
        if self.sigint is not None:  # a forked worker inherits the hold's recorder: Ctrl-C as the loader's maker had it
            signal.signal(signal.SIGINT, self.sigint)


def quiet_exit_on_sigterm(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a worker that gets SIGTERM exits quietly (status 0). A
    SIGTERM sent to the whole job (a scheduler's, or ``kill -- -<pgid>``) then leaves the main
    process to save the weights: a worker killed by the signal is reported by torch as a crash,
    raised in the middle of that save. (DataLoader's own ``terminate()`` of a stuck worker
    still ends it.)"""
    signal.signal(signal.SIGTERM, _exit_quietly)


def _exit_quietly(signum: int, frame: Any) -> None:
    os._exit(0)
