"""What the machine and a trunk can do, looked at rather than assumed: the facts that speed
decisions are taken from (see `transferkit.train.speed.decide_speed`).

- `cpu_bf16_native`: whether this CPU and torch build run bf16 matrix kernels natively.
- `device_bf16`: the same question for any device (CUDA: compute capability >= 8.0).
- `conv_share`: how convolutional a trunk is (the share of its Conv2d + Linear weights in Conv2d).
- `resolve_device`: ``"auto"`` and device names checked against what this machine has.

``TRANSFERKIT_ASSUME_BF16=0`` or ``=1`` overrides the CPU answer (to test the code paths of
another kind of CPU on this one); it is reported in the reason.
"""

from __future__ import annotations

import os
import platform

import torch
from torch import nn

from transferkit._text import exception_line, plural
from transferkit.errors import ConfigError

ASSUME_BF16_ENV = "TRANSFERKIT_ASSUME_BF16"
CONV_SHARE_CHANNELS_LAST = 0.9  # >= this share of weights in Conv2d: a convolutional trunk
CONV_SHARE_CONTIGUOUS = 0.1  # < this share: a ViT-style trunk


def cpu_bf16_native() -> tuple[bool, str]:
    """Whether this CPU and torch build run bf16 matrix kernels natively, and why.

    x86: oneDNN with bf16 support and AMX or AVX512-BF16 instructions (oneDNN also "supports"
    bf16 on plain AVX512 by emulation, which is slower than fp32). Arm: oneDNN's own check
    (the BF16 instructions). The instruction sets are queried through torch's CPU
    capability functions, not the CPU's name.

    Example:
        >>> native, why = cpu_bf16_native()
        >>> isinstance(native, bool) and isinstance(why, str)
        True
    """
    assumed = os.environ.get(ASSUME_BF16_ENV, "").strip()
    if assumed in ("0", "1"):
        return assumed == "1", f"{ASSUME_BF16_ENV}={assumed}"
    if assumed:
        raise ConfigError(f"{ASSUME_BF16_ENV} must be 0 or 1, got {assumed!r}; unset it to detect the CPU.")
    if not torch.backends.mkldnn.is_available():
        return False, "this torch build has no oneDNN (MKL-DNN)"
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if check is None or not check():
        return False, "oneDNN reports no bf16 support on this CPU"
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        avx = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        if amx:
            return True, "CPU has AMX"
        if avx:
            return True, "CPU has AVX512-BF16"
        return False, "CPU has neither AMX nor AVX512-BF16 (oneDNN would emulate bf16)"
    return True, f"oneDNN runs bf16 natively on this {platform.machine()} CPU"


def device_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` runs bf16 natively, and why (CPU: `cpu_bf16_native`; CUDA: tensor cores)."""
    if device.type == "cpu":
        return cpu_bf16_native()
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        has = cap >= (8, 0)
        return has, f"GPU of compute capability {cap[0]}.{cap[1]} {'has' if has else 'has no'} bf16 tensor cores"
    return False, f"no bf16 fast path known for device type {device.type!r}"


def cpu_capability() -> str:
    """torch's name for the CPU's vector instruction set (``"AVX512"``, ``"AVX2"``, ...)."""
    return str(torch.backends.cpu.get_cpu_capability())


def conv_share(trunk: nn.Module) -> tuple[float, int]:
    """The share of the trunk's Conv2d + Linear weights that are Conv2d weights, and the number of Conv2d layers.

    Example:
        >>> conv_share(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Flatten(), torch.nn.Linear(12, 1)))
        (0.5, 1)
    """
    conv = lin = n_conv = 0
    for m in trunk.modules():
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        if isinstance(m, nn.Conv2d):
            conv, n_conv = conv + w.numel(), n_conv + 1
        elif isinstance(m, nn.Linear):
            lin += w.numel()
    return (conv / (conv + lin) if conv + lin else 0.0), n_conv


def is_convolutional(trunk: nn.Module) -> bool:
    """At least ``CONV_SHARE_CHANNELS_LAST`` of the trunk's Conv2d + Linear weights are Conv2d
    (channels_last is the faster layout for it on CPUs and GPUs, measured)."""
    share, n_conv = conv_share(trunk)
    return n_conv > 0 and share >= CONV_SHARE_CHANNELS_LAST


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA, then Apple MPS, then the CPU; other values are checked."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"Unknown device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.") from exc
    if dev.type not in ("cpu", "cuda", "mps"):  # meta, xpu, ...: not devices transferkit runs on
        raise ConfigError(f"device={device!r} is not a device transferkit runs on; use 'auto', 'cpu', 'cuda', "
                          "'cuda:N' or 'mps'.")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available here; use device='auto' or 'cpu'.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device={device!r} but this machine has {plural(torch.cuda.device_count(), 'CUDA device')}; "
                          f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}.")
    mps = getattr(torch.backends, "mps", None)
    if dev.type == "mps" and not (mps is not None and mps.is_available()):
        raise ConfigError(f"device={device!r} but Apple MPS is not available here; use device='auto' or 'cpu'.")
    return dev


_OUT_OF_MEMORY = ("failed to allocate memory", "bad_alloc", "bad allocation", "out of memory",
                  "can't allocate memory", "cannot allocate memory", "not enough memory", "alloc_failed")
# ONNX Runtime, C++, CUDA, torch's CPU allocator (Linux, Windows), cuBLAS and cuDNN


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is running out of memory: ``MemoryError``, torch's ``OutOfMemoryError``,
    or an error whose own line or last line says so (an ONNX Runtime allocation failure is a
    plain runtime error; TorchScript reports CUDA's in its interpreter's traceback, NCCL and a
    DataLoader worker on the last line). Not its whole text: a traceback names source files,
    ``bad_alloc/model.py`` among them.

    Example:
        >>> out_of_memory(RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory"))
        True
        >>> out_of_memory(RuntimeError("The following operation failed in the TorchScript interpreter.\\n  File "
        ...                            "/srv/bad_alloc/model.py, line 3\\nRuntimeError: Input type (unsigned char)"))
        False
    """
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    said = [exception_line(exc, 1000), *lines[-1:]]  # and its last line: NCCL's and a DataLoader worker's say it there
    return any(s in line.lower() for line in said for s in _OUT_OF_MEMORY)
