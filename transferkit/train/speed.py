"""Speed paths: mixed precision, channels_last, torch.compile, determinism.

`decide_speed` is the one place where ``"auto"`` is resolved, from facts about the device
and the trunk (`transferkit.hardware`), with a reason for every choice; `SpeedConfig` is
the resolved choice at run time (autocast contexts, device copies, layout).

- ``channels_last="auto"``: on for convolutional trunks (>= 90 % of the Conv2d + Linear
  weights in Conv2d layers: 1.16x to 1.41x faster on a CPU, measured for ResNet-18/20,
  EfficientNet-Lite0 and a small CNN), off for trunks without 2-d convolutions and for
  ViT-style trunks (< 10 % in Conv2d: ViT, Swin, LeViT; 1.00x to 1.01x measured). In
  between (hybrids such as MaxViT, MobileViT) the two layouts are timed once on the device
  (`measure_layout`, a fact gathered before deciding) and the faster is kept.
- ``precision="auto"``: bf16 autocast where the device runs bf16 natively (a CPU with AMX
  or AVX512-BF16 and a oneDNN build of torch, or a CUDA GPU of compute capability >= 8.0),
  fp32 elsewhere: for the frozen backbone's feature pass, and for training on image inputs
  (fp32 master weights; on a CPU measured to keep fp32's accuracy: EfficientNet-Lite0 on
  hymenoptera, ``fine_tune`` and ``full`` over 3 seeds, equal best-epoch accuracy, 1.6x to
  2.2x faster; see ``docs/policies.md``). Audio training stays fp32 (not measured). Under
  ``"auto"`` a head trained on cached features trains in fp32. ``precision="fp32"`` is always the exact path.

Two precisions are kept apart: ``feature_precision`` (the frozen backbone's pass that fills
the feature cache; `SpeedConfig.feature_autocast`) and ``precision`` (the training loop and
evaluation; `SpeedConfig.autocast`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferkit._io import read_json_object, store_timing
from transferkit.errors import ConfigError, check_choice
from transferkit.hardware import CONV_SHARE_CHANNELS_LAST, CONV_SHARE_CONTIGUOUS, conv_share, cpu_bf16_native, device_bf16

__all__ = ["PRECISIONS", "SpeedConfig", "conv_share", "cpu_bf16_native", "decide_speed", "layout_fact",
           "measure_layout", "set_deterministic"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CPU_FEATURE_BATCH = 16  # see SpeedConfig.feature_batch_size
MEASURED_MIN_SPEEDUP = 1.05  # a measured layout must beat contiguous by this factor
_LAYOUT_CACHE: dict[str, tuple[bool, str]] = {}


def check_speed_request(device_type: str, precision: str, channels_last: bool | str, *,
                        cuda_bf16: bool = True) -> None:
    """A clear error for a precision or layout this device cannot honour."""
    check_choice("precision", precision, PRECISIONS)
    if channels_last not in (True, False, "auto"):
        raise ConfigError(f"channels_last must be True, False or 'auto', got {channels_last!r}.")
    if precision == "fp16" and device_type != "cuda":
        raise ConfigError(f"precision='fp16' needs a CUDA device, got device {device_type}; use 'bf16' or 'fp32'.")
    if precision == "bf16" and device_type == "cuda" and not cuda_bf16:
        raise ConfigError("precision='bf16' is not supported by this GPU; use 'fp16' or 'fp32'.")


def decide_speed(*, device_type: str, bf16: tuple[bool, str], precision: str = "auto",
                 channels_last: bool | str = "auto", compile: bool | str = False, kind: str = "image",
                 conv: tuple[float, int] | None = None, layout_timed: tuple[bool, str] | None = None,
                 cached: bool = False, features: bool = False) -> dict[str, Any]:
    """Resolve precision, layout and compile from facts; a pure function.

    ``bf16``: whether the device runs bf16 natively, and why (`transferkit.hardware.device_bf16`).
    ``conv``: the trunk's `conv_share` (None: no trunk to inspect). ``layout_timed``: the
    verdict of `measure_layout` for a hybrid trunk. ``cached``: every epoch trains a head on
    cached features (the training loop never runs the trunk). ``features``: some epochs run
    on cached features (a feature pass happens; ``feature_precision`` is None otherwise).

    Returns ``{"precision", "feature_precision", "channels_last", "compile", "reasons"}``.

    Example:
        >>> d = decide_speed(device_type="cpu", bf16=(False, "no bf16"), conv=(1.0, 3), cached=True, features=True)
        >>> d["precision"], d["feature_precision"], d["channels_last"]
        ('fp32', 'fp32', True)
    """
    check_speed_request(device_type, precision, channels_last, cuda_bf16=bf16[0] or device_type != "cuda")
    check_choice("kind", kind, ("image", "audio"))
    native, why = bf16
    reasons: dict[str, str] = {}
    if precision == "auto":
        if cached:
            train, reasons["precision"] = "fp32", "the head trains in fp32 on the cached features"
        elif device_type == "cuda" or (device_type == "cpu" and kind == "image" and conv is not None):
            train, reasons["precision"] = (
                ("bf16", f"autocast: {why}; fp32 master weights"
                 + (" (same accuracy as fp32, measured)" if device_type == "cpu" else "")) if native else ("fp32", why))
        else:
            train, reasons["precision"] = "fp32", (f"training {kind} on {device_type} stays fp32 unless "
                                                   "precision='bf16' is asked for")
        feat: str | None = None
        if features:
            if kind != "image":
                feat, reasons["feature_precision"] = "fp32", f"{kind} input: bf16 features are measured for images only"
            else:
                feat, reasons["feature_precision"] = (("bf16", f"autocast: {why}; frozen feature extraction")
                                                      if native else ("fp32", why))
    else:
        asked = ("asked" if precision != "bf16" or device_type != "cpu" or native
                 else f"asked, but {why}: expect it slower than fp32 here")
        train, feat = precision, (precision if features else None)
        reasons["precision"] = asked
        if features:
            reasons["feature_precision"] = asked
    if channels_last == "auto":
        cl, reasons["channels_last"] = _auto_layout(device_type, conv, kind=kind, timed=layout_timed)
    else:
        cl, reasons["channels_last"] = bool(channels_last), "asked"
    reasons["compile"] = "asked" if compile else "compile=False"
    # a head on cached features before the trunk trains (fine_tune's first phase) trains as feature extraction does
    head = "fp32" if precision == "auto" and features and not cached else train
    return {"precision": train, "feature_precision": feat, "head_precision": head, "channels_last": cl,
            "compile": "trial" if compile == "trial" else bool(compile), "reasons": reasons}


def layout_fact(trunk: nn.Module, device: torch.device, *, kind: str, channels_last: bool | str,
                image_size: int | None, store: str | Path | None = None) -> tuple[bool, str] | None:
    """The timed layout verdict a hybrid trunk needs before deciding (None when no timing is needed)."""
    if channels_last != "auto" or kind != "image":
        return None
    share, n_conv = conv_share(trunk)
    if n_conv == 0 or share >= CONV_SHARE_CHANNELS_LAST or share < CONV_SHARE_CONTIGUOUS:
        return None
    return measure_layout(trunk, device, image_size=image_size or 224, share=share, store=store)


@dataclass(frozen=True)
class SpeedConfig:
    """How tensors run on ``device`` (a resolved choice; see `decide_speed` for the reasons).

    ``precision`` is the training loop's (and evaluation's) autocast, ``feature_precision``
    that of the frozen backbone's feature-extraction pass (``None``: the same as
    ``precision``).

    Example:
        >>> SpeedConfig.make(torch.device("cpu"), precision="fp32").autocast_dtype is None
        True
    """

    device: torch.device
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool | str = False  # True, False or "trial" (compile="auto": see transferkit.train.compile_trial)
    feature_precision: str | None = None
    reasons: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def make(cls, device: torch.device, *, precision: str = "auto", channels_last: bool | str = "auto",
             compile: bool = False, trunk: nn.Module | None = None, frozen: bool = False, kind: str = "image",
             image_size: int | None = None, layout_cache: str | Path | None = None) -> SpeedConfig:
        """Look at ``device`` and ``trunk`` and resolve ``"auto"`` with `decide_speed` (for code
        outside a run: benchmarks, the export's layout check). ``frozen``: features are
        extracted once and a head trains on them.

        Example:
            >>> s = SpeedConfig.make(torch.device("cpu"), precision="fp32", trunk=torch.nn.Conv2d(3, 8, 3))
            >>> s.channels_last, s.reasons["channels_last"]
            (True, 'convolutional trunk: 100% of the Conv2d + Linear weights are Conv2d')
        """
        device = torch.device(device)
        check_speed_request(device.type, precision, channels_last)
        timed = None if trunk is None else layout_fact(trunk, device, kind=kind, channels_last=channels_last,
                                                       image_size=image_size, store=layout_cache)
        d = decide_speed(device_type=device.type, bf16=device_bf16(device), precision=precision,
                         channels_last=channels_last, compile=compile, kind=kind,
                         conv=None if trunk is None else conv_share(trunk), layout_timed=timed,
                         cached=frozen, features=frozen)
        return cls.of(device, d)

    @classmethod
    def of(cls, device: torch.device | str, decided: dict[str, Any]) -> SpeedConfig:
        """The run-time form of a `decide_speed` result."""
        return cls(device=torch.device(device), precision=decided["precision"],
                   channels_last=decided["channels_last"], compile=decided["compile"],
                   feature_precision=decided.get("feature_precision"), reasons=dict(decided.get("reasons", {})))

    @property
    def feature_precision_resolved(self) -> str:
        return self.feature_precision or self.precision

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return _DTYPES.get(self.precision)

    @property
    def feature_autocast_dtype(self) -> torch.dtype | None:
        return _DTYPES.get(self.feature_precision_resolved)

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` of the training precision (bf16/fp16), a no-op context for fp32."""
        return _autocast(self.device, self.autocast_dtype)

    def feature_autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` of the feature-extraction precision, a no-op context for fp32."""
        return _autocast(self.device, self.feature_autocast_dtype)

    def for_features(self) -> SpeedConfig:
        """This configuration with ``precision`` set to the feature precision: its
        ``autocast()`` is the feature-extraction pass's."""
        feat = self.feature_precision_resolved
        return dataclasses.replace(self, precision=feat, feature_precision=feat,
                                   reasons={**self.reasons, "precision": self.reasons.get("feature_precision", "")})

    def feature_batch_size(self, batch_size: int) -> int:
        """The batch size of the feature-extraction pass. On a CPU a small batch keeps the
        activations in the caches: 16 (ResNet-18 and EfficientNet-Lite0 at 224 px, bf16,
        one thread: batches of 4-16 equal, 32 at 0.8x, 64 at 0.5x-0.7x of their speed); on
        a GPU at least 128 (inference holds no activations for a backward pass).

        Example:
            >>> SpeedConfig(device=torch.device("cpu")).feature_batch_size(4)
            16
        """
        if self.device.type == "cpu":
            return CPU_FEATURE_BATCH
        return max(int(batch_size), 128) if self.device.type == "cuda" else int(batch_size)

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
        """``torch.compile(module)`` when asked (sharing its parameters), else ``module``
        (a ``"trial"`` compiles through its `CompileTrial`). Checkpoints and exports keep
        using the uncompiled module."""
        if self.compile is not True:
            return module
        if not hasattr(torch, "compile"):
            raise ConfigError("compile=True needs torch >= 2.0.")
        return torch_compile(module)


class _NoCudaRuntimeNote(logging.Filter):
    """Drops torch's "No CUDA runtime is found, using CUDA_HOME=..." line, which inductor's first
    C++ build logs on a machine with a CUDA toolkit and no CUDA device: a compile for the CPU
    needs no CUDA runtime, and the line read as a failure on stderr."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


def torch_compile(module: nn.Module) -> Callable:
    """``torch.compile(module)`` (sharing its parameters), without torch's CUDA-runtime note on
    a CPU-only machine (`_NoCudaRuntimeNote`); the one way transferkit compiles."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _NoCudaRuntimeNote) for f in logger.filters):
        logger.addFilter(_NoCudaRuntimeNote())
    return torch.compile(module)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _auto_layout(device_type: str, conv: tuple[float, int] | None, *, kind: str,
                 timed: tuple[bool, str] | None) -> tuple[bool, str]:
    if kind != "image":
        return False, f"{kind} input"
    if conv is None:  # nothing to inspect
        return device_type == "cuda", f"no trunk given to inspect: the {device_type} default"
    share, n_conv = conv
    if n_conv == 0:
        return False, "the trunk has no Conv2d layers"
    if share >= CONV_SHARE_CHANNELS_LAST:
        return True, f"convolutional trunk: {share:.0%} of the Conv2d + Linear weights are Conv2d"
    if share < CONV_SHARE_CONTIGUOUS:
        return False, f"ViT-style trunk: {1 - share:.0%} of the Conv2d + Linear weights are Linear"
    if timed is None:
        return False, f"hybrid trunk ({share:.0%} Conv2d) not timed: contiguous"
    return timed


def _layout_key(trunk: nn.Module, device: torch.device, image_size: int) -> str:
    """What a layout timing holds for: the trunk's class and its architecture (a digest of its
    parameters' names and shapes: two trunks of one class, timm's EfficientNet-B0 and -B7, or two
    nn.Sequential, are timed apart; the weights' values do not change the timing), the device
    (CPU capability and threads, or GPU name), the image size and torch's version."""
    cap = torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else torch.cuda.get_device_name(device)
    threads = f" {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    shapes = hashlib.blake2b(";".join(f"{n}:{tuple(p.shape)}" for n, p in trunk.named_parameters()).encode(),
                             digest_size=6).hexdigest()
    return f"{type(trunk).__module__}.{type(trunk).__qualname__}:{shapes}|{device.type}|{cap}{threads}|" \
           f"{int(image_size)}|torch {torch.__version__}"




def measure_layout(trunk: nn.Module, device: torch.device, *, image_size: int = 224, share: float | None = None,
                   rounds: int = 5, store: str | Path | None = None) -> tuple[bool, str]:
    """Time ``trunk`` (eval mode, no grad) in both layouts on ``device``; channels_last when it
    is at least ``MEASURED_MIN_SPEEDUP`` times faster (fastest of ``rounds`` rounds each,
    interleaved). The trunk's mode and layout are restored; a trunk not yet on ``device`` (the
    run moves it there later) is timed as a copy there and left where it is.

    The decision is cached per `_layout_key` (trunk class and architecture, device, CPU
    capability and threads or GPU name, image size, torch version) for the process, and in
    the JSON file ``store`` when given, so that later runs (and their feature-cache keys) make
    the same choice instead of re-timing it under another load.
    """
    key = _layout_key(trunk, device, image_size)
    if key in _LAYOUT_CACHE:
        return _LAYOUT_CACHE[key]
    saved = read_json_object(Path(store)).get(key) if store is not None else None
    if isinstance(saved, dict) and isinstance(saved.get("channels_last"), bool):
        result = (saved["channels_last"], f"{saved.get('reason', 'timed earlier')} (read from {store})")
        _LAYOUT_CACHE[key] = result
        return result
    first = next(trunk.parameters(), None)
    if first is not None and first.device.type == device.type and device.index is None:
        device = first.device  # "cuda" and a trunk on cuda:1: time it where it is
    elif first is not None and first.device != device:  # not there yet (the run moves it later): a copy there
        trunk = copy.deepcopy(trunk).to(device)
    was_training = trunk.training
    four_d = [p for p in trunk.parameters() if p.ndim == 4]
    was_cl = bool(four_d) and four_d[0].is_contiguous(memory_format=torch.channels_last) \
        and not four_d[0].is_contiguous()
    x = torch.randn(2 if device.type == "cpu" else 16, 3, image_size, image_size, device=device)
    times: dict[bool, list[float]] = {False: [], True: []}
    trunk.eval()
    try:
        with torch.no_grad():
            for r in range(rounds + 1):
                for cl in (False, True):
                    fmt = torch.channels_last if cl else torch.contiguous_format
                    trunk.to(memory_format=fmt)
                    xx = x.contiguous(memory_format=fmt)
                    t0 = time.perf_counter()
                    trunk(xx)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    if r:  # round 0 warms up
                        times[cl].append(time.perf_counter() - t0)
    finally:
        trunk.to(memory_format=torch.channels_last if was_cl else torch.contiguous_format)
        trunk.train(was_training)
    ratio = min(times[False]) / min(times[True])  # the fastest round: the least disturbed by other load
    on = ratio >= MEASURED_MIN_SPEEDUP
    what = f", {share:.0%} of the Conv2d + Linear weights Conv2d" if share is not None else ""
    result = (on, f"hybrid trunk{what}; timed on {device.type}: channels_last runs at {ratio:.2f}x the "
                  "contiguous speed")
    _LAYOUT_CACHE[key] = result
    if store is not None:
        store_timing(store, key, {"channels_last": on, "reason": result[1]}, what="layout timing")
    return result


def set_deterministic(enabled: bool) -> None:
    """``enabled``: deterministic kernels (``torch.use_deterministic_algorithms``; the
    caller's warn-only flag kept where it had them on already), no cuDNN autotuning. Off, the
    caller's own choice stands (deterministic kernels it turned on stay on); where it made
    none, cuDNN benchmarks convolution algorithms (fast for fixed image sizes)."""
    caller = torch.are_deterministic_algorithms_enabled()
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        warn_only = caller and torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True, warn_only=warn_only)
        torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = (not enabled and not caller and not torch.backends.cudnn.deterministic
                                      and torch.cuda.is_available())
