"""Checkpoints: written atomically, read with ``weights_only=True``.

A checkpoint is ``{"transferkit": meta, "model": state_dict, ...}``: it loads as backbone
weights too (``get_backbone(name, weights=path)`` takes its trunk). Written during training
it also carries everything an exact resume needs: optimizer, schedule, gradient scaler,
RNG states (torch CPU and CUDA, NumPy, Python), the epoch, the history, the best epoch
and its weights, and the early-stopping counter. Data order and augmentations are a pure
function of ``(seed, epoch, index)`` (see :mod:`transferkit.train.loaders`), so they need
no saved generator.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferkit._io import atomic_write
from transferkit.errors import WeightsError


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
    """Restore what :func:`rng_state` returned."""
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
    leaves the previous file intact). ``training`` holds the resume state (see the module
    docstring); ``complete=False`` marks a checkpoint written between epochs.

    Example:
        >>> save_checkpoint("run.pt", model=model, meta={"task": "multiclass"})  # doctest: +SKIP
    """
    state: dict[str, Any] = {"transferkit": meta, "model": model.state_dict(), "epoch": epoch,
                             "history": history or [], "complete": complete}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if training is not None:
        state["training"] = training
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a transferkit checkpoint (tensors and plain Python data only)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise WeightsError(f"Checkpoint {str(path)!r} does not exist.") from exc
    except Exception as exc:
        raise WeightsError(f"Cannot read checkpoint {str(path)!r} (truncated or not a transferkit checkpoint): "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if not isinstance(ckpt, dict) or "transferkit" not in ckpt or "model" not in ckpt:
        raise WeightsError(f"{str(path)!r} is not a transferkit checkpoint (no 'transferkit' metadata).")
    return ckpt
