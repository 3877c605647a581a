"""Checkpoints: written atomically, read with ``weights_only=True``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from transferkit._io import atomic_write
from transferkit.errors import WeightsError


def save_checkpoint(path: str | Path, *, model: torch.nn.Module, meta: dict[str, Any],
                    optimizer: torch.optim.Optimizer | None = None, epoch: int | None = None,
                    history: list[dict[str, Any]] | None = None) -> Path:
    """Save ``{"transferkit": meta, "model": state_dict, ...}`` atomically.

    The file loads as backbone weights too: ``get_backbone(name, weights=path)`` takes its trunk.
    """
    state = {"transferkit": meta, "model": model.state_dict(), "epoch": epoch, "history": history or []}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
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
