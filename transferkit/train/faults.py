"""What happens when training fails: Ctrl-C, a non-finite loss, running out of GPU memory.

The rule: never lose the user's work, and say what to do next. The per-epoch checkpoint
(``finetune(checkpoint=...)``) is written atomically at the end of every epoch, so a fault
mid-epoch leaves the last good one on disk untouched.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from transferkit._io import file_stat
from transferkit._signals import TrainingInterrupted, held_signals, signal_name
from transferkit.errors import OutputError, TrainingError, TransferkitError
from transferkit.hardware import out_of_memory
from transferkit.train.distributed import failed_for_another_rank, peer_interruption, this_rank_raised


RANK_0_KEEPS = ("The weights are the same on every rank of the job, so rank 0 saves them (its message says "
                "where) and this rank saved none.")


@contextlib.contextmanager
def interrupt_keeps_weights(save_interrupted: Callable[[], Path | None]) -> Iterator[None]:
    """Ctrl-C or SIGTERM after training (evaluation, plots, the final writes): the trained
    weights are saved by ``save_interrupted()`` and `TrainingInterrupted` says where. An
    interruption that already says where the weights are passes through. ``save_interrupted()``
    returns None on a DDP rank other than 0: the weights are the same on every rank, and rank 0
    keeps them."""
    try:
        yield
    except KeyboardInterrupt as exc:
        if isinstance(exc, TrainingInterrupted):
            raise
        with held_signals(reraise=False):
            saved = save_interrupted()
        if saved is None:
            raise TrainingInterrupted(f"Interrupted ({signal_name(exc)}) after training. {RANK_0_KEEPS}", None) from exc
        raise TrainingInterrupted(f"Interrupted ({signal_name(exc)}) after training. The trained weights were saved "
                                  f"to {str(saved)!r} (export them with `transferkit export {saved} --out model.pt`, "
                                  "or start from them with weights=...).", saved) from exc


def _keep_weights(save_interrupted: Callable[[], Path | None]) -> Path | str | None:
    """``save_interrupted()`` as a job ends for another rank's failure: the path (None on a rank
    other than 0), or why the weights could not be saved."""
    this_rank_raised()  # the guard's watchdog must not end the process while the weights are written
    with held_signals(reraise=False):
        try:
            return save_interrupted()
        except (OSError, TransferkitError) as exc:
            return str(exc)


def _is_oom(exc: BaseException) -> bool:
    """Running out of memory in a training step (transferkit's own errors say what they are:
    the feature pass's, whose batch is not the run's ``batch_size``, among them)."""
    return not isinstance(exc, TransferkitError) and out_of_memory(exc)


def suggest_batch_size(step: Callable[[int], None], start: int) -> int | None:
    """The largest of ``start // 2, start // 4, ..., 1`` for which ``step(batch_size)`` (one
    forward and backward pass) runs without running out of memory; None if none does."""
    bs = start // 2
    while bs >= 1:
        try:
            step(bs)
            return bs
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not _is_oom(exc):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        bs //= 2
    return None


def resume_call(checkpoint: str | Path) -> str:
    """How to continue a run from ``checkpoint``: ``transferkit.resume(path)``, under torchrun
    with as many processes as this run's (a resume refuses another number)."""
    call = f"transferkit.resume({str(checkpoint)!r})"
    world = _rank_and_world()[1]
    return call if world == 1 else (f"{call} under torchrun with {world} processes in all, as this run was "
                                    f"launched (--nproc_per_node={world} on one machine)")


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the job's number of processes (``(0, 1)`` outside torchrun)."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def _identity(path: str | Path | None) -> list[int] | None:
    """What tells one file at ``path`` from another written there (each write replaces it);
    None when there is none."""
    try:
        return file_stat(path) if path is not None else None
    except OSError:
        return None


@contextlib.contextmanager
def training_faults(*, checkpoint: str | Path | None, batch_size: int,
                    save_interrupted: Callable[[], Path | None], probe_step: Callable[[int], None] | None,
                    started: Callable[[], bool] = lambda: True, resumed: bool = False,
                    cache_dir: str | Path | None = None) -> Iterator[None]:
    """Turn faults inside the block into errors that say where the work is and what to do.
    ``started()``: whether training has begun; before it (e.g. during the feature pass) the
    weights are the ones the run started from and nothing is saved. The checkpoint counts as
    this run's once the block has written it (or, ``resumed``, from the start): a file at that
    path from an earlier, finished run does not. ``cache_dir``: the run's, whose features and
    decoded images computed before an interruption are reused when it runs again.

    - Ctrl-C: with ``checkpoint``, the file holds the last completed epoch and
      ``transferkit.resume(path)`` continues exactly; without it, the current weights are
      saved by ``save_interrupted()`` (None: a DDP rank other than 0, which saves nothing).
      Raises `TrainingInterrupted`.
    - A non-finite loss (TrainingError from the loop): the message names the last good checkpoint.
    - Out of memory: a TrainingError suggesting a batch size that fits (probed with ``probe_step``).
    """
    before = _identity(checkpoint)

    def ours() -> bool:
        now = _identity(checkpoint)
        return now is not None and (resumed or now != before)

    def kept_for_another_rank(exc: BaseException) -> bool:
        """Whether ``exc`` is a DDP collective's or barrier's that failed for another rank, once
        training began and before this run wrote a checkpoint: then rank 0 has saved the weights,
        the same on every rank (``exc.kept_weights``: the path, or why not), and `rank_guard`
        says where as it reports the failure."""
        if not (started() and not ours() and failed_for_another_rank(exc)):
            return False
        exc.kept_weights = _keep_weights(save_interrupted)  # type: ignore[attr-defined]
        return True

    try:
        yield
    except KeyboardInterrupt as exc:
        if isinstance(exc, TrainingInterrupted):
            raise
        what = f"Interrupted ({signal_name(exc)})."
        if ours() and _rank_and_world()[0] != 0:
            raise TrainingInterrupted(f"{what} The checkpoint {str(checkpoint)!r} holds the last completed epoch; "
                                      "rank 0's message says how to continue.", Path(checkpoint)) from exc
        if ours():
            raise TrainingInterrupted(f"{what} The checkpoint {str(checkpoint)!r} holds the last completed "
                                      f"epoch; continue exactly with {resume_call(checkpoint)}.",
                                      Path(checkpoint)) from exc
        if not started():
            unwritten = f" (the checkpoint {str(checkpoint)!r} was not written yet)" if checkpoint is not None else ""
            kept = (f"; what it computed into cache_dir {str(cache_dir)!r} (features, decoded images) is kept and "
                    "reused" if cache_dir is not None else "")
            raise TrainingInterrupted(f"{what} Training had not started, so the weights are the ones the run started "
                                      f"from and none were saved{unwritten}. Run it again to train{kept}.", None) \
                from exc
        with held_signals(reraise=False):  # a second Ctrl-C must not stop the save of the weights
            saved = save_interrupted()
        if saved is None:
            raise TrainingInterrupted(f"{what} {RANK_0_KEEPS}", None) from exc
        advice = (f"No epoch had completed, so the checkpoint {str(checkpoint)!r} was not written yet; start the "
                  "run again to train from the beginning." if checkpoint is not None else
                  "Pass checkpoint=... to finetune() to be able to resume a run exactly.")
        raise TrainingInterrupted(f"{what} The current weights were saved to {str(saved)!r} (usable as "
                                  f"weights=... or with `transferkit export`). {advice}", saved) from exc
    except OutputError as exc:  # a checkpoint write failed (a full disk): keep this epoch's weights elsewhere
        if not started():  # nothing trained yet: nothing to keep
            raise
        with held_signals():
            try:
                saved: Path | None = save_interrupted()
            except (OSError, TransferkitError):
                saved = None
        kept = (f" The current weights are saved in {str(saved)!r} (usable as weights=... or with `transferkit "
                "export`)." if saved is not None else " The current weights could not be saved elsewhere either.")
        if ours():
            kept += (f" The checkpoint {str(checkpoint)!r} still holds the last epoch it completed: once the cause "
                     f"above is fixed, continue with {resume_call(checkpoint)}.")
        err = OutputError(f"{str(exc).rstrip('.')}.{kept}")
        err.fallback = saved  # type: ignore[attr-defined]
        raise err from exc
    except TrainingError as exc:
        if kept_for_another_rank(exc):  # a barrier's: another rank failed or left while this one waited
            raise
        if ours():
            raise TrainingError(f"{exc} The last good checkpoint, {str(checkpoint)!r}, was kept.") from exc
        raise
    except ValueError as exc:
        if "Expected more than 1 value per channel when training" not in str(exc):
            raise
        seen = str(exc).split("got ", 1)[-1]  # input size torch.Size([1, 512, 1, 1])
        raise TrainingError(f"A BatchNorm layer that trains saw one value per channel ({seen}): batch_size="
                            f"{batch_size} image(s) per process, 1x1 at that layer at this image size, give it nothing "
                            "to normalise by. Use batch_size >= 2, a larger image_size, or keep the BatchNorm "
                            "statistics as they are (add ',bn=affine' or ',bn=frozen' to the policy).") from exc
    except RuntimeError as exc:
        peer = peer_interruption()  # a collective failed because another rank was interrupted alone
        if peer is not None and started() and not ours():  # its weights are this rank's: rank 0 keeps them
            this_rank_raised()
            with held_signals(reraise=False):
                saved = save_interrupted()
            if saved is not None:
                sig = "SIGTERM" if "(SIGTERM)" in peer else "Ctrl-C"
                err = TrainingInterrupted(f"Interrupted ({sig}) on another rank: {peer.rstrip('.')}. The current "
                                          f"weights were saved to {str(saved)!r} (usable as weights=... or with "
                                          "`transferkit export`). Pass checkpoint=... to finetune() to be able to "
                                          "resume a run exactly.", saved)
                err.signum = signal.SIGTERM if sig == "SIGTERM" else signal.SIGINT  # type: ignore[attr-defined]
                raise err from exc
        if kept_for_another_rank(exc):  # a collective's: another rank was killed, stalled or failed
            raise
        if not _is_oom(exc):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        fits = suggest_batch_size(probe_step, batch_size) if probe_step is not None else None
        hint = (f"batch_size={fits} fits" if fits else f"try batch_size={max(batch_size // 2, 1)}")
        raise TrainingError(f"Out of memory with batch_size={batch_size}: {hint}. Also consider "
                            "precision='bf16', a smaller image_size, or policy='feature_extraction'.") from exc
