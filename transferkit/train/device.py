"""Device selection, and the global torch settings a run may change (restored afterwards)."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator

import numpy as np
import torch

from transferkit.hardware import resolve_device

__all__ = ["preserved_torch_settings", "resolve_device"]

CUBLAS_ENV = "CUBLAS_WORKSPACE_CONFIG"  # deterministic cuBLAS needs it set


@contextlib.contextmanager
def preserved_torch_settings() -> Iterator[None]:
    """Restore the caller's global torch settings (deterministic algorithms and their
    warn-only flag, cuDNN deterministic/benchmark, ``CUBLAS_WORKSPACE_CONFIG``) and random
    states (torch's CPU and CUDA generators, NumPy's, Python's) when the block ends: a run
    seeds them for itself, and code after it draws what it would have drawn without it.

    Example:
        >>> _ = torch.manual_seed(7)
        >>> with preserved_torch_settings():
        ...     torch.use_deterministic_algorithms(True)
        ...     _ = torch.manual_seed(0)
        >>> torch.are_deterministic_algorithms_enabled(), torch.initial_seed()
        (False, 7)
    """
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    env = os.environ.get(CUBLAS_ENV)
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    rng = (torch.get_rng_state(), torch.initial_seed(), np.random.get_state(), random.getstate())
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
        if env is None:
            os.environ.pop(CUBLAS_ENV, None)
        else:
            os.environ[CUBLAS_ENV] = env
        torch.manual_seed(rng[1])  # initial_seed() as it was (this also reseeds CUDA: its states follow)
        torch.set_rng_state(rng[0])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(rng[2])
        random.setstate(rng[3])
