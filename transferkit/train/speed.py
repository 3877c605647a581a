"""Speed paths: mixed precision, channels_last, torch.compile, determinism.

On the CPU every default here is a no-op, so CPU runs are unaffected: ``precision="fp32"``,
``channels_last="auto"`` (on for CUDA only), ``compile=False``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch

from transferkit.errors import ConfigError, check_choice

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class SpeedConfig:
    """How tensors run on ``device``.

    Example:
        >>> SpeedConfig.make(torch.device("cpu")).autocast_dtype is None
        True
    """

    device: torch.device
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def make(cls, device: torch.device, *, precision: str = "fp32", channels_last: bool | str = "auto",
             compile: bool = False) -> SpeedConfig:
        check_choice("precision", precision, PRECISIONS)
        if precision == "fp16" and device.type != "cuda":
            raise ConfigError(f"precision='fp16' needs a CUDA device, got device {device}; use 'bf16' or 'fp32'.")
        if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("precision='bf16' is not supported by this GPU; use 'fp16' or 'fp32'.")
        if channels_last not in (True, False, "auto"):
            raise ConfigError(f"channels_last must be True, False or 'auto', got {channels_last!r}.")
        cl = device.type == "cuda" if channels_last == "auto" else bool(channels_last)
        return cls(device=device, precision=precision, channels_last=cl, compile=bool(compile))

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return _DTYPES.get(self.precision)

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` for bf16/fp16, a no-op context for fp32."""
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def grad_scaler(self) -> Any:
        """A gradient scaler for fp16 (bf16 and fp32 need none)."""
        return torch.amp.GradScaler("cuda") if self.precision == "fp16" else None

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """Copy a batch to the device (non-blocking from pinned memory), channels_last for 4-d images."""
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def prepare(self, module: torch.nn.Module) -> None:
        """Move ``module`` to channels_last when asked (in place, parameters keep their identity)."""
        if self.channels_last:
            module.to(memory_format=torch.channels_last)

    def maybe_compile(self, module: torch.nn.Module) -> torch.nn.Module:
        """``torch.compile(module)`` when asked (sharing its parameters), else ``module``.
        Checkpoints and exports keep using the uncompiled module."""
        if not self.compile:
            return module
        if not hasattr(torch, "compile"):
            raise ConfigError("compile=True needs torch >= 2.0.")
        return torch.compile(module)


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels (``torch.use_deterministic_algorithms``), no cuDNN autotuning.

    When off, cuDNN benchmarks convolution algorithms (fast for fixed image sizes)."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(bool(enabled), warn_only=False)
    torch.backends.cudnn.deterministic = bool(enabled)
    torch.backends.cudnn.benchmark = not enabled and torch.cuda.is_available()
