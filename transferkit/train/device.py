"""Device selection, and the global torch settings a run may change (restored afterwards)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from transferkit.hardware import resolve_device

__all__ = ["preserved_torch_settings", "resolve_device"]


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
