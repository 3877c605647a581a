"""Device selection, and the global torch settings a run may change (restored afterwards)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from transferkit.errors import ConfigError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA, then Apple MPS, then the CPU; other values are checked."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"Unknown device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available here; use device='auto' or 'cpu'.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device={device!r} but this machine has {torch.cuda.device_count()} CUDA device(s); "
                          f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}.")
    mps = getattr(torch.backends, "mps", None)
    if dev.type == "mps" and not (mps is not None and mps.is_available()):
        raise ConfigError(f"device={device!r} but Apple MPS is not available here; use device='auto' or 'cpu'.")
    return dev


@contextlib.contextmanager
def preserved_torch_settings() -> Iterator[None]:
    """Restore the caller's global torch settings (deterministic algorithms and their
    warn-only flag, cuDNN deterministic/benchmark) when the block ends.

    Example:
        >>> with preserved_torch_settings():
        ...     torch.use_deterministic_algorithms(True)
        >>> torch.are_deterministic_algorithms_enabled()
        False
    """
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
