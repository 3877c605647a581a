"""Distributed data parallel through ``torchrun`` (NCCL on GPUs, gloo on CPUs).

``finetune`` reads torchrun's ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK``; each process
trains on its shard of every epoch's permutation, gradients are averaged by
``DistributedDataParallel`` wrapped around the trainable module only (the head alone
when features are cached), and only rank 0 writes checkpoints and exports. When a
policy unfreezes blocks during training, the DDP wrapper is rebuilt at that epoch
(DDP registers the parameters that require gradients when it is built).

What the ranks share and what they do not:

- **Seeds.** The data order (the `EpochSampler`
  permutation), the per-item augmentation seeds ``(seed, epoch, index)``, the model's
  initialisation and the cached features use the run's ``seed`` on every rank, so the
  shards are disjoint and each image is augmented as in a single-process run. The
  global RNGs that training draws from (dropout, anything using ``random`` / NumPy,
  DataLoader worker seeds) are seeded with `rank_seed` before training, so the
  ranks' dropout masks differ.
- **Timeouts.** Every collective (and `barrier`) fails after
  `DEFAULT_TIMEOUT_S` seconds (30 min) instead of waiting forever; set
  ``TRANSFERKIT_DIST_TIMEOUT`` (seconds) or ``init_distributed(timeout=...)``.
- **Failures.** Inside `rank_guard`, an exception on one rank is recorded in the
  process group's store; every other rank ends within a few seconds with an error that
  names the failing rank and its message, even when it is blocked in a collective.

Launch::

    torchrun --nproc_per_node=2 train.py      # train.py calls finetune(...) then exit_cleanly()
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from transferkit._io import run_exit_functions
from transferkit._signals import end_with_the_launcher, terminate_at_once
from transferkit._text import hide_secrets
from transferkit.errors import ConfigError, TrainingError
from transferkit.train.loaders import mix_seed

DEFAULT_TIMEOUT_S = 1800.0
"""Seconds a collective operation or barrier may wait for the other ranks (30 min: long
enough for rank 0 to write a large export while the others wait)."""

TIMEOUT_ENV = "TRANSFERKIT_DIST_TIMEOUT"


class DistributedError(TrainingError):
    """Another rank failed, or the ranks stopped meeting in collective operations."""


def collective_timeout(seconds: float | None = None) -> float:
    """The collective timeout in seconds: ``seconds``, else ``$TRANSFERKIT_DIST_TIMEOUT``, else
    `DEFAULT_TIMEOUT_S`.

    Example:
        >>> collective_timeout(60)
        60.0
    """
    source = "timeout"
    if seconds is None and os.environ.get(TIMEOUT_ENV):
        seconds, source = os.environ[TIMEOUT_ENV], TIMEOUT_ENV  # type: ignore[assignment]
    if seconds is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(seconds, bool) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{source} must be a positive number of seconds, got {seconds!r} "
                          f"(default {DEFAULT_TIMEOUT_S:g}: 30 minutes).")
    return value


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (``world_size == 1``: not distributed) and the
    seconds a collective may wait for the other ranks."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info(timeout: float | None = None) -> DistInfo:
    """Read torchrun's environment variables (and the collective timeout, see `collective_timeout`)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistInfo(rank=int(os.environ.get("RANK", "0")), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                    world_size=world, timeout_s=collective_timeout(timeout))


def init_distributed(device: torch.device, *, timeout: float | None = None) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun and return the info and this process's
    device (``cuda:LOCAL_RANK`` on GPUs). On CUDA the group is ``cuda:nccl,cpu:gloo`` (NCCL for
    GPU tensors, gloo for the small CPU reductions); otherwise gloo. Collectives time out after
    ``timeout`` seconds (see `collective_timeout`)."""
    info = dist_info(timeout)
    if not info.enabled:
        return info, device
    end_with_the_launcher()
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        with terminate_at_once():  # torchrun's SIGTERM when another rank failed before joining: nothing to save yet
            try:
                dist.init_process_group(backend="cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo",
                                        timeout=timedelta(seconds=info.timeout_s))
            except (RuntimeError, dist.DistStoreError) as exc:  # DistStoreError: a rank that did not join in time
                if not _is_timeout(exc) and not isinstance(exc, dist.DistStoreError):
                    raise
                raise DistributedError(f"Rank {info.rank}: the {info.world_size} processes of the job did not all "
                                       f"join within {info.timeout_s:g} s ({str(exc).splitlines()[0]}). One of them "
                                       f"started late or not at all; raise the limit with {TIMEOUT_ENV}=<seconds> "
                                       "if its start is slow.") from exc
    return info, device


def rank_seed(seed: int, rank: DistInfo | int) -> int:
    """The seed of the global RNGs (dropout, ``random``, NumPy) on ``rank`` (a rank number or a
    `DistInfo`): ``seed`` on rank 0 (a single-process run is rank 0), a distinct mix of
    ``(seed, rank)`` on the others, so no rank of one run shares a stream with a rank of a run
    with a neighbouring seed (as ``seed + rank`` would). The data order and the per-item
    augmentation seeds keep ``seed`` on every rank.

    Example:
        >>> rank_seed(0, 0), rank_seed(0, DistInfo(rank=1, world_size=2)) == rank_seed(0, 1) != rank_seed(1, 0)
        (0, True)
    """
    r = rank.rank if isinstance(rank, DistInfo) else int(rank)
    return int(seed) if r == 0 else mix_seed(seed, r)


def rank_seeds(seed: int, world_size: int) -> list[int]:
    """`rank_seed` of every rank of a job (for a run plan or a log).

    Example:
        >>> rank_seeds(7, 1)
        [7]
    """
    return [rank_seed(seed, r) for r in range(world_size)]


def wrap_ddp(module: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(module)`` over its parameters that currently require gradients
    (``module`` itself when not distributed or when nothing trains)."""
    if not info.enabled or not any(p.requires_grad for p in module.parameters()):
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def _collective_device() -> torch.device:
    """Where small tensors must live for a collective: CPU when the group has gloo, else the GPU."""
    if "gloo" in str(dist.get_backend()):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum numbers over ranks (identity when not distributed)."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.tolist()


def broadcast_buffers(module: nn.Module, info: DistInfo) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank. DDP does the same at
    the start of each forward; doing it after an epoch makes validation and checkpoints agree."""
    if not info.enabled:
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src=0)


def all_ranks(flag: bool, info: DistInfo) -> bool:
    """True when ``flag`` is true on every rank (``flag`` itself when not distributed).

    Example:
        >>> all_ranks(True, DistInfo())
        True
    """
    if not info.enabled:
        return bool(flag)
    t = torch.tensor([int(bool(flag))], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def broadcast_object(obj: Any, info: DistInfo, *, src: int = 0) -> Any:
    """``obj`` (picklable) as rank ``src`` has it, on every rank (``obj`` itself when not distributed).

    Example:
        >>> broadcast_object([1, 2], DistInfo())
        [1, 2]
    """
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """``obj`` (picklable) of every rank, in rank order (``[obj]`` when not distributed).

    Example:
        >>> gather_objects({"a": 1}, DistInfo())
        [{'a': 1}]
    """
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def shard_size(n: int, world_size: int) -> int:
    """Rows each rank holds when ``n`` rows are dealt round-robin and padded (``ceil(n / world_size)``)."""
    return -(-n // world_size)


def gather_rows(shard: torch.Tensor, n: int, info: DistInfo, *,
                chunk_bytes: int = 16 << 20) -> Iterator[tuple[int, torch.Tensor]]:
    """Assemble an ``n``-row array dealt round-robin over the ranks, on every rank, a block at a time.

    Rank ``r`` holds rows ``r, r + W, r + 2W, ...`` (``W = world_size``), padded to
    `shard_size` rows, which is the order of
    ``EpochSampler(n, shuffle=False, rank=r, world_size=W)``. Yields ``(start, rows)``: rows
    ``start .. start + len(rows)`` of the full array, in order, the same on every rank
    (CPU tensors); padding rows are dropped. Each block moves about ``chunk_bytes`` per rank,
    so the whole array is never held twice. Not distributed: yields ``(0, shard[:n])``.

    Example:
        >>> [(s, b.tolist()) for s, b in gather_rows(torch.arange(3), 3, DistInfo())]
        [(0, [0, 1, 2])]
    """
    if not info.enabled:
        yield 0, shard[:n]
        return
    per_rank, world = shard_size(n, info.world_size), info.world_size
    if shard.shape[0] != per_rank:
        raise DistributedError(f"Rank {info.rank} holds {shard.shape[0]} rows of a {n}-row array over {world} ranks; "
                               f"every rank must hold ceil(n / world_size) = {per_rank} (round-robin, padded).")
    row_bytes = max(1, shard[:1].numel() * shard.element_size())
    step = max(1, chunk_bytes // row_bytes)
    dev = _collective_device()
    for j in range(0, per_rank, step):
        part = shard[j:j + step].contiguous().to(dev)
        parts = [torch.empty_like(part) for _ in range(world)]
        dist.all_gather(parts, part)
        # row j*W + r of the full array is row j of rank r
        block = torch.stack(parts, 1).reshape(-1, *part.shape[1:]).cpu()
        start = j * world
        if start < n:
            yield start, block[: n - start]


def whole_set(share: torch.Tensor, n: int, info: DistInfo, owners: list[list[int]] | None = None) -> torch.Tensor:
    """The ``n`` rows dealt over the ranks without padding, whole and in order, on every rank
    (a CPU tensor; `gather_rows` a block at a time). ``owners[r]``: the rows rank ``r`` holds,
    in its order (each row once over the ranks); default ``r, r + W, ...``
    (``EpochSampler(n, shuffle=False, pad=False)``; with sample groups its ranks take blocks:
    `EpochSampler.indices_of` says which).

    Example:
        >>> whole_set(torch.arange(3), 3, DistInfo()).tolist()
        [0, 1, 2]
    """
    world = info.world_size
    if not info.enabled:
        return share[:n].clone()
    owners = owners if owners is not None else [list(range(r, n, world)) for r in range(world)]
    if sorted(i for rows in owners for i in rows) != list(range(n)) or len(owners[info.rank]) != len(share):
        raise DistributedError(f"Rank {info.rank} holds {len(share)} rows; the ranks' rows must cover the {n} rows "
                               "once each.")
    per = max(len(rows) for rows in owners)
    padded = torch.cat([share, share.new_zeros((per - len(share), *share.shape[1:]))])
    dealt = share.new_empty((per * world, *share.shape[1:]))  # rank r's j-th row at j * W + r
    for start, rows in gather_rows(padded, per * world, info):
        dealt[start:start + len(rows)] = rows.to(dealt.device)
    out = share.new_empty((n, *share.shape[1:]))
    for r, rows in enumerate(owners):
        out[torch.as_tensor(rows, dtype=torch.long)] = dealt[r::world][:len(rows)]
    return out


def barrier(info: DistInfo, *, timeout: float | None = None) -> None:
    """Wait for every rank, at most ``timeout`` seconds (default: ``info.timeout_s``).

    With gloo this is ``monitored_barrier``: on a timeout the error names the ranks that
    did not arrive. With NCCL it is ``dist.barrier()``, bounded by the group's timeout.
    """
    if not (info.enabled and dist.is_initialized()):
        return
    seconds = info.timeout_s if timeout is None else collective_timeout(timeout)
    if dist.get_backend() != "gloo":
        dist.barrier()
        return
    start = time.monotonic()
    try:
        dist.monitored_barrier(timeout=timedelta(seconds=seconds), wait_all_ranks=True)
    except RuntimeError as exc:  # gloo words a peer that left like a late one: the time waited tells them apart
        if time.monotonic() - start >= 0.9 * seconds:
            raise DistributedError(f"Rank {info.rank}: the ranks did not all reach a barrier within {seconds:g} s: "
                                   f"{exc}. If a rank is legitimately slower (a long export, a slow disk), raise the "
                                   f"timeout with {TIMEOUT_ENV}=<seconds>.") from exc
        raise DistributedError(f"Rank {info.rank}: another rank failed or ended while this one waited for it at a "
                               f"barrier ({exc}); that rank's log says why.") from exc


_handoffs = itertools.count()


def local_main_first(info: DistInfo, work: Callable[[], Any], *, poll_s: float = 0.25) -> Any:
    """Run ``work`` on local rank 0 of each machine while the machine's other ranks wait for it
    without a time limit: a long piece of work (decoding a large data set once) is not a
    stuck rank, so the wait is not bounded by the collective timeout; a rank that fails ends
    the job through `rank_guard` (its watchdog ends a waiting rank). Returns what ``work``
    returns on local rank 0, None on the machine's other ranks. Every rank must call it, in
    the same order. Not distributed: returns ``work()``.

    Example:
        >>> local_main_first(DistInfo(), lambda: 42)
        42
    """
    store = _store_for(info) if info.enabled and dist.is_initialized() else None
    if store is None:
        return work()
    key = f"transferkit/local_main_first/{next(_handoffs)}/{info.rank - info.local_rank}"  # one key per machine
    if info.local_rank == 0:
        out = work()  # a failure raises here, and rank_guard ends the waiting ranks with it
        store.set(key, "done")
        return out
    while not store.check([key]):
        time.sleep(poll_s)
    return None


# --- one rank's failure ends every rank ---------------------------------------------------------

_generation = itertools.count()
_failed = threading.Event()  # this process recorded or saw a rank's failure: skip the exit barrier


def _interruption(exc: BaseException) -> bool:
    """Ctrl-C or a signal (`TrainingInterrupted` is a ``KeyboardInterrupt``)."""
    return isinstance(exc, KeyboardInterrupt)


def _said_interrupted(failure: str) -> bool:
    """Whether a ``"rank R failed: <Type>: ..."`` record (`_describe`) is an interruption: every
    rank of a job stopped by a scheduler's SIGTERM keeps its own.

    Example:
        >>> _said_interrupted("rank 1 failed: TrainingInterrupted: Interrupted (SIGTERM).")
        True
    """
    kind = failure.split(" failed: ", 1)[-1].split(":", 1)[0]
    return kind in ("KeyboardInterrupt", "TrainingInterrupted")


def _describe(exc: BaseException) -> str:
    text = hide_secrets(f"{type(exc).__name__}: {exc}")  # printed by the other ranks
    return text if len(text) <= 2000 else text[:2000] + "..."


class _Watchdog(threading.Thread):
    """Polls the store for another rank's failure; if this rank's own code has not raised
    within ``grace_s`` (it is blocked in a collective, which nothing else can interrupt),
    prints the failure and ends the process with ``os._exit(1)``."""

    def __init__(self, store: dist.Store, prefix: str, info: DistInfo, poll_s: float, grace_s: float) -> None:
        super().__init__(name="transferkit-rank-guard", daemon=True)
        self.store, self.prefix, self.info, self.poll_s, self.grace_s = store, prefix, info, poll_s, grace_s
        self.done = threading.Event()

    def run(self) -> None:
        key = self.prefix + "first"
        try:
            while not self.done.wait(self.poll_s):
                if self.store.check([key]):
                    break
            else:
                return
            message = self.store.get(key).decode()
        except Exception:  # the store went away: the job is ending; the collective timeout still applies
            return
        if self.done.wait(self.grace_s):
            return  # this rank's code raised (or finished) by itself; rank_guard reports it
        _failed.set()
        sys.stdout.flush()
        print(f"transferkit: rank {self.info.rank} stops because {message} (this rank was waiting for it in a "
              "collective operation, which cannot be interrupted; the traceback is in that rank's output).",
              file=sys.stderr, flush=True)
        os._exit(1)

    def stop(self) -> None:
        self.done.set()


def _store_for(info: DistInfo) -> dist.Store | None:
    if not info.enabled:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise DistributedError(f"rank_guard() on rank {info.rank} of {info.world_size} needs the process group: "
                               "call init_distributed() before entering it.")
    return dist.distributed_c10d._get_default_store()


def _peer_gone(exc: BaseException) -> bool:
    """Whether a collective failed because another rank's process went away (gloo's words).

    Example:
        >>> _peer_gone(RuntimeError("[gloo/pair.cc:538] Read error [127.0.0.1]: Connection reset by peer"))
        True
    """
    text = str(exc).lower()
    return "connection reset by peer" in text or "connection closed by peer" in text


def _collective(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective's failure: the ``RuntimeError`` torch raises, or the
    `DistributedError` `barrier` made of it."""
    return isinstance(exc, RuntimeError) or isinstance(exc, DistributedError) and isinstance(exc.__cause__,
                                                                                             RuntimeError)


def _is_timeout(exc: BaseException) -> bool:
    """Whether a collective's error says it waited too long (gloo words it several ways: "timed
    out", "Application timeout caused pair closure", "Timeout waiting ...").

    Example:
        >>> _is_timeout(RuntimeError("[gloo/transport/tcp/pair.cc:534] Application timeout caused pair closure"))
        True
        >>> _is_timeout(RuntimeError("Connection reset by peer"))
        False
    """
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text


@contextlib.contextmanager
def rank_guard(info: DistInfo, *, poll_s: float = 0.25, grace_s: float = 2.0) -> Iterator[None]:
    """Run a distributed block so that one rank's exception ends every rank with that error.

    On an exception, this rank writes ``"rank R failed: <Type>: <message>"`` to the process
    group's store (the first failure wins; a collective that failed because another rank's
    process went away is not this rank's failure and is not written) and re-raises. The other
    ranks see it within ``poll_s``: one whose code raises by itself within ``grace_s`` (a
    collective failing because the failed rank left) raises `DistributedError` with that
    message; one blocked in a collective prints it and exits with status 1. A
    ``RuntimeError`` (what a failed collective raises) or an interruption (the SIGTERM torchrun
    sends the other ranks once one has exited) after another rank's failure becomes that
    ``DistributedError``; any other exception of this rank is re-raised as it is. Every rank
    must enter the same guarded blocks in the same order, after `init_distributed`.
    Not distributed: does nothing.

    Example:
        >>> with rank_guard(DistInfo()):  # single process: a plain block
        ...     x = 1
    """
    store = _store_for(info)
    if store is None:
        yield
        return
    prefix = f"transferkit/rank_guard/{next(_generation)}/"
    watchdog = _Watchdog(store, prefix, info, poll_s, grace_s)
    watchdog.start()
    _guards.append((store, prefix + "first", info.rank))
    _watchdogs.append(watchdog)
    try:
        yield
    except BaseException as exc:
        watchdog.stop()
        _failed.set()
        mine = f"rank {info.rank} failed: {_describe(exc)}"
        key = prefix + "first"
        try:
            if isinstance(exc, RuntimeError) and _peer_gone(exc):  # another rank's end, not this rank's failure
                first = store.get(key).decode() if store.check([key]) else mine
            else:
                first = store.compare_set(key, "", mine).decode()
        except Exception:  # the store is gone (the job is ending): report this rank's own error
            first = mine
        # a collective that failed as the failed rank left, or the SIGTERM torchrun sends the
        # other ranks when one exits: this rank stops because of the first failure, said as such
        if first != mine and (_collective(exc) or _interruption(exc) and not _said_interrupted(first)):
            raise DistributedError(f"Rank {info.rank} stops because {first} "
                                   f"(here: {_describe(exc)}).{_kept(exc)}") from exc
        if isinstance(exc, RuntimeError) and _peer_gone(exc):
            raise DistributedError(f"Rank {info.rank}: another rank ended without an error of its own ({exc}): it "
                                   "was killed (out of memory, a signal) or crashed. Look at that rank's log and "
                                   f"the machine's (e.g. dmesg for the out-of-memory killer).{_kept(exc)}") from exc
        if isinstance(exc, RuntimeError) and _is_timeout(exc):
            raise DistributedError(f"Rank {info.rank}: a collective operation waited more than {info.timeout_s:g} s "
                                   f"for the other ranks ({exc}). One of them is stuck or much slower than this one; "
                                   f"if that is expected (a long export, a slow disk), raise the limit with "
                                   f"{TIMEOUT_ENV}=<seconds>.{_kept(exc)}") from exc
        if _kept(exc) and isinstance(exc, DistributedError):  # a barrier's, worded by `barrier`: add where
            raise DistributedError(f"{str(exc).rstrip('.')}.{_kept(exc)}") from exc.__cause__  # rank 0 kept them
        raise
    finally:
        _guards.pop()
        _watchdogs.remove(watchdog)
        watchdog.stop()
        watchdog.join(timeout=1.0)


_guards: list[tuple[Any, str, int]] = []  # the guarded blocks entered: (store, failure key, this rank)
_watchdogs: list[_Watchdog] = []  # theirs


def this_rank_raised() -> None:
    """Tell the watchdogs of the guarded blocks that this rank's code has raised: the failure is
    on its way to `rank_guard`, which says it, so what runs on the way out (rank 0 saving the
    weights, which can take longer than the watchdog's grace) is not ended by ``os._exit``."""
    for watchdog in _watchdogs:
        watchdog.stop()


def _peer_failure() -> str | None:
    """The failure record of another rank in the innermost `rank_guard` block, where one is
    recorded; else None."""
    if not _guards:
        return None
    store, key, rank = _guards[-1]
    try:
        first = store.get(key).decode() if store.check([key]) else ""
    except Exception:  # noqa: BLE001 - the store is gone with the job
        return None
    return first if first and not first.startswith(f"rank {rank} ") else None


def peer_interruption() -> str | None:
    """The failure record of another rank that was interrupted (Ctrl-C, SIGTERM) in the
    innermost `rank_guard` block, where one is recorded; else None. Read where a collective of
    this rank failed: a rank interrupted alone left it, and its weights, the same as this
    rank's, are kept by rank 0 (`transferkit.train.faults.training_faults`)."""
    first = _peer_failure()
    return first if first is not None and _said_interrupted(first) else None


def failed_for_another_rank(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective of a DDP job (inside `rank_guard`) that failed because
    another rank failed, went away (killed, crashed) or stalled past the timeout: this rank's
    weights, the same as every rank's, are whole as of its last step, and rank 0 keeps them
    (`transferkit.train.faults.training_faults`; `rank_guard` then says where)."""
    if not _guards:
        return False
    if isinstance(exc, DistributedError) and isinstance(exc.__cause__, RuntimeError):
        return True  # `barrier`'s: another rank failed, ended or stalled while this one waited
    if not isinstance(exc, RuntimeError):
        return False
    return _peer_gone(exc) or _is_timeout(exc) or _peer_failure() is not None


def _kept(exc: BaseException) -> str:
    """Where `training_faults` saved the weights on the way out of the failure ``exc`` (its
    ``kept_weights``: a path), or why it could not (a message), said; "" where nothing was
    saved (a rank other than 0, or no failure for another rank)."""
    kept = getattr(exc, "kept_weights", None)
    if kept is None:
        return ""
    if isinstance(kept, str):
        return f" The current weights could not be saved: {kept.rstrip('.')}."
    return f" The current weights were saved to {str(kept)!r} (usable as weights=... or with `transferkit export`)."


def exit_cleanly(code: int = 0) -> None:
    """End a torchrun worker: barrier, destroy the process group, flush, ``os._exit(code)``.

    With torch 2.11 a gloo worker aborts at interpreter exit in about 1 run in 4
    ("terminate called without an active exception") after correct training; leaving
    through ``os._exit`` after a clean teardown avoids it. Call it last in a script. With a
    non-zero ``code``, or after a rank failed inside `rank_guard`, it skips the barrier
    (the other ranks are gone or going) and exits at once. transferkit's own exit functions
    (`transferkit._io.at_exit`: a process's temporary shard copies are removed by one) run
    first; other ``atexit`` functions do not, as ``os._exit`` skips them.

    Example:
        >>> exit_cleanly(0)  # doctest: +SKIP
    """
    if code == 0 and not _failed.is_set() and dist.is_available() and dist.is_initialized():
        try:
            barrier(dist_info())
        finally:
            dist.destroy_process_group()
    run_exit_functions()  # transferkit's own: torch's (a DataLoader's worker joins, 5 s each) would delay the exit
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
