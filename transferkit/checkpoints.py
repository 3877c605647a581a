"""Checkpoints: written atomically, read with ``weights_only=True``.

A checkpoint is ``{"transferkit": meta, "model": state_dict, ...}``: it loads as backbone
weights too (``get_backbone(name, weights=path)`` takes its trunk). Written during training
it also carries everything an exact resume needs: optimizer, schedule, gradient scaler,
RNG states (torch CPU and CUDA, NumPy, Python), the epoch, the history, the best epoch
and its weights, and the early-stopping counter. Data order and augmentations are a pure
function of ``(seed, epoch, index)`` (see `transferkit.train.loaders`), so they need
no saved generator.

Integrity: while saving, every tensor is hashed (SHA-256) and the whole content gets one
digest, stored under ``"integrity"``; `load_checkpoint` (and ``weights=`` given a
checkpoint) recomputes them and raises `CorruptCheckpointError`
on a mismatch. A checkpoint written before digests existed has none and loads with a warning.
Writers of one checkpoint path are exclusive: `checkpoint_lock`.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import shlex
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from transferkit._integrity import INTEGRITY_KEY, ZIP_ERRORS, seal, verify_sealed
from transferkit._io import (
    TEMP_NAME_EXTRA,
    atomic_write,
    check_free_space,
    claim_unused_path,
    file_lock,
    name_max,
    python_writer,
)
from transferkit._signals import TrainingInterrupted, held_signals, signal_name
from transferkit._text import exception_line, home_not_expanded
from transferkit.errors import OutputError, TransferkitError, WeightsError, warn

T = TypeVar("T")


def rng_state() -> dict[str, Any]:
    """The RNG states of torch (CPU and every CUDA device), NumPy and Python, as checkpointable data."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, *, model: torch.nn.Module, meta: dict[str, Any],
                    optimizer: torch.optim.Optimizer | None = None, epoch: int | None = None,
                    history: list[dict[str, Any]] | None = None, training: dict[str, Any] | None = None,
                    complete: bool = True) -> Path:
    """Save ``{"transferkit": meta, "model": state_dict, ...}`` atomically (a crash mid-write
    leaves the previous file intact) with the SHA-256 of every tensor and of the whole content.
    ``training`` holds the resume state (see the module docstring); ``complete=False`` marks a
    checkpoint written between epochs. The write holds `checkpoint_lock` (re-entrant:
    free when this process already holds it for the run).

    Example:
        >>> save_checkpoint("run.pt", model=model, meta={"task": "multiclass"})  # doctest: +SKIP
    """
    state: dict[str, Any] = {"transferkit": meta, "model": model.state_dict(), "epoch": epoch,
                             "history": history or [], "complete": complete}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if training is not None:
        state["training"] = training
    state[INTEGRITY_KEY] = seal(state)

    def write(tmp: str) -> None:
        with python_writer(tmp) as f:  # a full disk: OSError, not a c10::Error from the zip writer
            torch.save(state, f)

    with checkpoint_lock(path):
        check_free_space(path, state_bytes(state), what="checkpoint")
        return atomic_write(path, write, what="checkpoint")


def state_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) checkpoint state: about the size of its file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


@contextlib.contextmanager
def checkpoint_lock(path: str | Path, *, flag: str | None = None) -> Iterator[Path]:
    """Hold the checkpoint ``path`` for this process: a second process (another run with the
    same ``checkpoint=``) gets `FileLockedError` at once, naming the
    holder. Hold it for a whole run; the saves inside take it again for free. The lock is a
    ``flock`` on ``.<name>.lock`` beside the checkpoint, released when the block ends or the
    process dies (a stale lock file never blocks).

    Example:
        >>> with checkpoint_lock("runs/run.ckpt"):
        ...     pass  # train, saving runs/run.ckpt after each epoch
    """
    with file_lock(path, what="checkpoint", flag=flag) as lock:
        yield lock


def _kind_of_zip(path: Path) -> str | None:
    """``"torchscript"`` for an exported model, None otherwise (not a zip, or a torch.save file)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except ZIP_ERRORS:
        return None
    return "torchscript" if any(n.split("/", 1)[-1].startswith("code/") for n in names) else None


def _onnx_head(path: Path) -> bool:
    """Whether ``path`` starts as an ONNX file does (a protobuf ``ModelProto``: ``ir_version``,
    field 1, byte ``0x08``); a torch.save file starts with ``PK`` (zip) or a pickle's ``0x80``."""
    try:
        with open(path, "rb") as f:
            return f.read(1) == b"\x08"
    except OSError:
        return False


def saved_run(path: str | Path) -> tuple[str, dict[str, Any]] | None:
    """What a file that transferkit wrote holds, read without loading its weights (they are
    memory-mapped): ``("export", {})`` for a TorchScript export, ``("checkpoint", {"complete":
    ..., "resumable": ..., "epoch": ..., "epochs": ..., "best": ..., "decisions": ...})`` for a
    checkpoint (``resumable``: it holds a run's training state, which resume continues; ``best``:
    the best epoch so far and its validation metrics, of an unfinished run; ``decisions``: its
    run's record); None for any other file.

    Example:
        >>> saved_run("runs/run.ckpt")  # doctest: +SKIP
        ('checkpoint', {'complete': False, 'resumable': True, 'epoch': 2, 'epochs': 10, 'best': {'epoch': 1}})
    """
    path = Path(path)
    if _kind_of_zip(path) == "torchscript":
        return "export", {}
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not a torch.save file of transferkit's: none of its kinds
        return None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("transferkit"), dict):
        return None
    config = (ckpt["transferkit"].get("decisions") or {}).get("config") or {}
    state = (ckpt.get("training") or {}).get("state") or {}
    return "checkpoint", {"complete": bool(ckpt.get("complete")), "resumable": bool(state), "epoch": ckpt.get("epoch"),
                          "epochs": config.get("epochs"), "best": state.get("best") or {},
                          "decisions": ckpt["transferkit"].get("decisions")}


def run_in(path: str | Path | None) -> dict[str, Any] | None:
    """What the checkpoint ``path`` holds of a run (`saved_run`'s record, its weights not
    loaded): None when it is no file, or holds neither a complete run nor one a resume
    continues (weights alone, a file of ``save_checkpoint``). What a resume of a run that
    already ended, from the command line or a recipe, reads to say so instead of training.

    Example:
        >>> run_in("runs/run.ckpt")["complete"]  # doctest: +SKIP
        True
    """
    if path is None or not Path(path).is_file():
        return None
    found = saved_run(path)
    if found is None or found[0] != "checkpoint":
        return None
    info = found[1]
    run = (info["resumable"] or info["complete"]) and isinstance(info["epoch"], int) and \
        isinstance(info["decisions"], dict)
    return info if run else None


def _load_failure(exc: BaseException) -> str:
    """Why ``torch.load`` failed, in one clause: its first sentence (torch's messages go on to
    advice that does not fit a damaged file, such as loading with ``weights_only=False``)."""
    if isinstance(exc, pickle.UnpicklingError):
        return "its content does not unpickle as checkpoint data"
    return exception_line(exc).split(". ")[0].rstrip(".")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a transferkit checkpoint (tensors and plain Python data only), checking every
    tensor and the metadata against the digests written with it.

    Raises WeightsError for a missing, truncated or foreign file (an exported model says to
    use transferkit.load), and CorruptCheckpointError (a WeightsError) when the content does
    not match its digests. A checkpoint without digests (an older transferkit) loads with a warning.
    """
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"Checkpoint {str(path)!r} is a folder, not a checkpoint file.")
    if path.is_file() and path.stat().st_size == 0:
        raise WeightsError(f"Checkpoint {str(path)!r} is empty (0 bytes): a copy or write that was cut short. Copy it "
                           "again, or use an earlier checkpoint.")
    if path.is_file() and (_kind_of_zip(path) == "torchscript" or _onnx_head(path)):
        kind = "TorchScript" if _kind_of_zip(path) else "ONNX"
        raise WeightsError(f"{str(path)!r} is an exported model ({kind}), not a checkpoint: predict with it, "
                           f"`transferkit predict {shlex.quote(str(path))} IMAGES` (in Python: "
                           f"transferkit.load({str(path)!r})); checkpoints are what finetune(checkpoint=...) writes.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise WeightsError(f"Checkpoint {str(path)!r} does not exist.{home_not_expanded(path)}") from exc
    except Exception as exc:
        raise WeightsError(f"Cannot read checkpoint {str(path)!r} (truncated, corrupt, or not a transferkit "
                           f"checkpoint): {_load_failure(exc)}.") from exc
    if not isinstance(ckpt, dict) or "transferkit" not in ckpt or "model" not in ckpt:
        raise WeightsError(f"{str(path)!r} is not a transferkit checkpoint (no 'transferkit' metadata).")
    verify_checkpoint(ckpt, source=repr(str(path)))
    return ckpt


def verify_checkpoint(ckpt: dict[str, Any], *, source: str) -> None:
    """Check a loaded checkpoint dict against its digests (and remove them from it); warn
    when it has none."""
    if not verify_sealed(ckpt, source=source, what="checkpoint", error=WeightsError):
        warn(f"Checkpoint {source} has no content digest (written by an older transferkit): its tensors "
             "cannot be checked for damage. It loads as before; the next save adds a digest.")


# -- keeping the trained weights when the final write fails -------------------------------
def fallback_paths(target: str | Path) -> list[Path]:
    """Where `save_with_fallback` tries to put the weights, in order: beside the target,
    the current folder, the temporary folder.

    Example:
        >>> fallback_paths("/runs/model.pt")[0].name  # doctest: +SKIP
        'model.unsaved-20260510-113000.pt'
    """
    target = Path(target)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stem = target.stem or target.name or "model"
    tail = f".unsaved-{stamp}.pt"
    room = min(name_max(target.parent), 255) - TEMP_NAME_EXTRA - len(tail) - len("transferkit-")
    while len(stem.encode()) > max(room, 8):  # a name the file system takes, temporary included
        stem = stem[:-1]
    name = f"{stem}{tail}"
    return [target.parent / name, Path.cwd() / f"transferkit-{name}",
            Path(tempfile.gettempdir()) / f"transferkit-{name}"]


def save_fallback(candidates: list[Path], *, model: torch.nn.Module, meta: dict[str, Any],
                  claimed: Path | None = None, **checkpoint: Any) -> tuple[Path | None, list[str]]:
    """Save ``model`` as a checkpoint at the first of ``candidates`` that works; returns that
    path (None when none worked) and why the others failed. A candidate's name is claimed
    first (`claim_unused_path`): two runs saving in the same second keep both files;
    ``claimed``: a candidate the caller has claimed already."""
    failures = []
    for candidate in candidates:
        ours = claimed is not None and candidate == claimed
        claimed_now = candidate if ours else claim_unused_path(candidate)
        try:
            return save_checkpoint(claimed_now, model=model, meta=meta, complete=False, **checkpoint), failures
        except (OSError, TransferkitError) as again:
            failures.append(f"{claimed_now}: {again}")
            with contextlib.suppress(OSError):
                if not ours and claimed_now.stat().st_size == 0:
                    claimed_now.unlink()  # the empty claim of a write that failed
    return None, failures


def save_interrupted_weights(path: str | Path, *, model: torch.nn.Module, meta: dict[str, Any]) -> Path:
    """Save the weights of an interrupted run at ``path`` (or ``<stem>-2<suffix>``, ... when an
    earlier interrupted run's weights are there: they are never replaced), else at the first
    of its `fallback_paths` that works (a full disk, a name too long); OutputError when none does."""
    existed = os.path.lexists(path)
    target = claim_unused_path(path)

    def free_the_claim() -> None:  # the empty file claim_unused_path made, when nothing was saved in it
        if target != Path(path) or not existed:
            with contextlib.suppress(OSError):
                if target.stat().st_size == 0:
                    target.unlink()

    try:
        saved, failures = save_fallback([target, *fallback_paths(target)], model=model, meta=meta, claimed=target,
                                        epoch=None, history=[])
    except BaseException:  # (a DataLoader worker's death reported in the middle of the save, say)
        free_the_claim()
        raise
    if saved != target:
        free_the_claim()
    if saved is None:
        raise OutputError(f"The weights of the interrupted run could not be saved anywhere ({'; '.join(failures)}).")
    return saved


def save_with_fallback(target: str | Path, save: Callable[[], T], *, what: str, model: torch.nn.Module,
                       meta: dict[str, Any], flag: str | None = None, export: str | Path | None = None,
                       **checkpoint: Any) -> T:
    """Run ``save()`` (e.g. the export or the final checkpoint write); when it fails, save
    ``model`` as a checkpoint at the first of `fallback_paths` that works and raise an
    error naming the target, the reason and where the weights are, with the command that
    exports them (to ``target`` where ``what`` is the export, else to ``export``, the run's
    export path, else to ``model.pt``). ``checkpoint``: more `save_checkpoint` arguments for
    the fallback (``history``, ``training``, ...).

    The error is OutputError for a write failure, else the class of the original error
    (e.g. ExportError for a failed parity check); it has ``.target`` and ``.fallback``.

    Example:
        >>> save_with_fallback("model.pt", lambda: export_torchscript(model, "model.pt", ...),
        ...                    what="export", model=model, meta=meta)  # doctest: +SKIP
    """
    named = f"{str(target)!r}{f' ({flag})' if flag else ''}"
    out = target if what == "export" else export  # where the kept weights are to be exported
    try:
        return save()
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM during the write: keep the weights, then stop
        if isinstance(exc, TrainingInterrupted):
            raise
        if getattr(exc, "written", None) is not None:  # it came once the file was whole at its path
            raise TrainingInterrupted(f"Interrupted ({signal_name(exc)}) just after the {what} {str(target)!r}"
                                      f"{f' ({flag})' if flag else ''} was written: it is complete.",
                                      Path(target)) from exc
        with held_signals(reraise=False):
            fallback, failures = save_fallback(fallback_paths(target), model=model, meta=meta, **checkpoint)
        raise TrainingInterrupted(f"Interrupted ({signal_name(exc)}) while writing the {what} {named}; nothing was "
                                  f"written there. {_kept(fallback, failures, out)}", fallback) from exc
    except Exception as exc:
        reason = (str(exc).strip() or type(exc).__name__).rstrip(".") + "."
        with held_signals():  # Ctrl-C now would lose the weights: it is acted on once they are saved
            fallback, failures = save_fallback(fallback_paths(target), model=model, meta=meta, **checkpoint)
        message = f"Could not write the {what} {named}: {reason} {_kept(fallback, failures, out, fix=True)}"
        cls: type[Exception] = OutputError
        if isinstance(exc, TransferkitError) and not isinstance(exc, OutputError):
            cls = type(exc)
        try:
            err = cls(message)
        except TypeError:
            err = OutputError(message)
        err.target, err.fallback = Path(target), fallback  # type: ignore[attr-defined]
        raise err from exc


def _kept(fallback: Path | None, failures: list[str], export: str | Path | None, *, fix: bool = False) -> str:
    """Where the weights of a failed write are (``fallback``; None where every place failed,
    ``failures`` saying why), and the command that exports them (to ``export``, else to
    ``model.pt``); ``fix``: the write failed for a cause to mend first."""
    if fallback is None:
        return f"The trained weights could not be saved{' either' if fix else ''} ({'; '.join(failures)})."
    out = str(export) if export is not None else "model.pt"
    return (f"The trained weights are saved in {str(fallback)!r} (a transferkit checkpoint): "
            f"{'fix the cause, then ' if fix else ''}export it with `transferkit export {shlex.quote(str(fallback))} "
            f"--out {shlex.quote(out)}` (in Python: transferkit.export.export_checkpoint({str(fallback)!r}, "
            f"{out!r})), or start from it with weights={str(fallback)!r}.")
