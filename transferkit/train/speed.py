"""Speed paths: mixed precision, channels_last, torch.compile, determinism.

`SpeedConfig.make` resolves ``"auto"`` from what the machine and the trunk can do, and
records why in ``reasons`` (`SpeedConfig.describe` prints it):

- ``channels_last="auto"``: on for convolutional trunks (>= 90 % of the Conv2d + Linear
  weights in Conv2d layers: 1.16x to 1.41x faster on a CPU, measured for ResNet-18/20,
  EfficientNet-Lite0 and a small CNN), off for trunks without 2-d convolutions and for
  ViT-style trunks (< 10 % in Conv2d: ViT, Swin, LeViT; 1.00x to 1.01x measured). In
  between (hybrids such as MaxViT, MobileViT) the two layouts are timed once on the device
  and the faster is kept (cached per trunk class, device type and image size).
- ``precision="auto"``: bf16 autocast where the device runs bf16 natively (a CPU with AMX
  or AVX512-BF16 and a oneDNN build of torch, or a CUDA GPU of compute capability >= 8.0),
  fp32 elsewhere: for *frozen feature extraction*, and for training a backbone on image
  inputs (fp32 master weights; on a CPU measured to keep fp32's accuracy: EfficientNet-Lite0
  on hymenoptera, ``fine_tune`` and ``full`` over 3 seeds, equal best-epoch accuracy, 1.6x to
  2.2x faster; see ``docs/policies.md``). Audio training stays fp32 (not measured). The head on
  cached features always trains in fp32. ``precision="fp32"`` is always the exact fp32 path.

Two precisions are kept apart: ``feature_precision`` (the frozen backbone's pass that fills
the feature cache; `SpeedConfig.feature_autocast`) and ``precision`` (the training
loop and evaluation; `SpeedConfig.autocast`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferkit._io import atomic_write
from transferkit.errors import ConfigError, check_choice

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CONV_SHARE_CHANNELS_LAST = 0.9  # >= this share of weights in Conv2d: convolutional trunk
CONV_SHARE_CONTIGUOUS = 0.1  # < this share: ViT-style trunk
CPU_FEATURE_BATCH = 16  # see SpeedConfig.feature_batch_size
MEASURED_MIN_SPEEDUP = 1.05  # a measured layout must beat contiguous by this factor
_LAYOUT_CACHE: dict[str, tuple[bool, str]] = {}


@dataclass(frozen=True)
class SpeedConfig:
    """How tensors run on ``device``, and why (``reasons``).

    ``precision`` is the training loop's (and evaluation's) autocast, ``feature_precision``
    that of the frozen backbone's feature-extraction pass (``None``: the same as
    ``precision``).

    Example:
        >>> SpeedConfig.make(torch.device("cpu")).autocast_dtype is None
        True
        >>> s = SpeedConfig.make(torch.device("cpu"), precision="fp32", channels_last=False)
        >>> s.as_dict()
        {'device': 'cpu', 'precision': 'fp32', 'feature_precision': 'fp32', 'channels_last': False, 'compile': False}
    """

    device: torch.device
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    feature_precision: str | None = None
    reasons: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def make(cls, device: torch.device, *, precision: str = "auto", channels_last: bool | str = "auto",
             compile: bool = False, trunk: nn.Module | None = None, frozen: bool = False, kind: str = "image",
             image_size: int | None = None, layout_cache: str | Path | None = None) -> SpeedConfig:
        """Resolve ``"auto"`` for ``device`` and ``trunk``.

        ``frozen``: no backbone weight trains (features are extracted once), the only case
        where ``precision="auto"`` may pick bf16. ``kind``: ``"image"`` or ``"audio"``
        (audio keeps fp32 and the contiguous layout: bf16 features were not measured for
        accuracy there). ``image_size``: the input size when a hybrid trunk's layout has to
        be timed (default 224); ``layout_cache``: a JSON file keeping that timing's verdict
        across runs (pass one under the feature cache's folder, so that its keys stay stable).

        Example:
            >>> s = SpeedConfig.make(torch.device("cpu"), precision="fp32", trunk=torch.nn.Conv2d(3, 8, 3))
            >>> s.channels_last, s.reasons["channels_last"]
            (True, 'convolutional trunk: 100% of the Conv2d + Linear weights are Conv2d')
        """
        device = torch.device(device)
        check_choice("precision", precision, PRECISIONS)
        check_choice("kind", kind, ("image", "audio"))
        if channels_last not in (True, False, "auto"):
            raise ConfigError(f"channels_last must be True, False or 'auto', got {channels_last!r}.")
        if precision == "fp16" and device.type != "cuda":
            raise ConfigError(f"precision='fp16' needs a CUDA device, got device {device}; use 'bf16' or 'fp32'.")
        if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("precision='bf16' is not supported by this GPU; use 'fp16' or 'fp32'.")
        reasons: dict[str, str] = {}
        if precision == "auto":
            train, reasons["precision"] = _auto_train_precision(device, frozen=frozen, kind=kind,
                                                                known_trunk=trunk is not None)
            feat, why = _auto_feature_precision(device, frozen=frozen, kind=kind)
            reasons["feature_precision"] = why
        else:
            train = feat = precision
            reasons["precision"] = reasons["feature_precision"] = _asked_precision(device, precision)
        if channels_last == "auto":
            cl, reasons["channels_last"] = _auto_layout(device, trunk, kind=kind, image_size=image_size,
                                                       store=layout_cache)
        else:
            cl, reasons["channels_last"] = bool(channels_last), "asked"
        reasons["compile"] = "asked" if compile else "compile=False"
        return cls(device=device, precision=train, channels_last=cl, compile=bool(compile), feature_precision=feat,
                   reasons=reasons)

    @property
    def device_type(self) -> str:
        return self.device.type

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
        ``autocast()`` is the feature-extraction pass's (for code that takes one SpeedConfig
        per pass)."""
        feat = self.feature_precision_resolved
        return dataclasses.replace(self, precision=feat, feature_precision=feat,
                                   reasons={**self.reasons, "precision": self.reasons.get("feature_precision", "")})

    def as_dict(self) -> dict[str, Any]:
        """The resolved choices as plain values (for a run plan, a summary, a cache key)."""
        return {"device": self.device.type, "precision": self.precision,
                "feature_precision": self.feature_precision_resolved, "channels_last": self.channels_last,
                "compile": self.compile}

    def feature_key(self) -> dict[str, Any]:
        """What of this configuration changes cached features (bf16 vs fp32, the layout's
        summation order, the device's kernels): put it in the feature-cache key."""
        return {"device": self.device.type, "feature_precision": self.feature_precision_resolved,
                "channels_last": self.channels_last}

    def describe(self) -> list[str]:
        """One short line per choice, with its reason.

        Example:
            >>> SpeedConfig.make(torch.device("cpu"), precision="fp32", channels_last=False).describe()[0]
            'training precision: fp32 (asked)'
        """
        r = {k: self.reasons.get(k, "set directly") for k in ("precision", "feature_precision", "channels_last",
                                                               "compile")}
        return [f"training precision: {self.precision} ({r['precision']})",
                f"feature precision: {self.feature_precision_resolved} ({r['feature_precision']})",
                f"layout: {'channels_last' if self.channels_last else 'contiguous'} ({r['channels_last']})",
                f"compile: {'on' if self.compile else 'off'} ({r['compile']})"]

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
        """``torch.compile(module)`` when asked (sharing its parameters), else ``module``.
        Checkpoints and exports keep using the uncompiled module."""
        if not self.compile:
            return module
        if not hasattr(torch, "compile"):
            raise ConfigError("compile=True needs torch >= 2.0.")
        return torch.compile(module)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _asked_precision(device: torch.device, precision: str) -> str:
    if precision == "bf16" and device.type == "cpu":
        native, why = cpu_bf16_native()
        if not native:
            return f"asked, but {why}: expect it slower than fp32 here"
    return "asked"


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


def _cuda_bf16(device: torch.device) -> tuple[bool, str]:
    cap = torch.cuda.get_device_capability(device)
    has = cap >= (8, 0)
    return has, f"GPU of compute capability {cap[0]}.{cap[1]} {'has' if has else 'has no'} bf16 tensor cores"


def _auto_train_precision(device: torch.device, *, frozen: bool, kind: str = "image",
                          known_trunk: bool = True) -> tuple[str, str]:
    if frozen:
        return "fp32", "the head trains on cached fp32 features"
    if device.type == "cuda":
        has, why = _cuda_bf16(device)
        return ("bf16", f"autocast: {why}; fp32 master weights") if has else ("fp32", why)
    if device.type == "cpu" and kind == "image" and known_trunk:
        native, why = cpu_bf16_native()
        if native:  # measured: docs/policies.md, Lite0 on hymenoptera, fp32 vs bf16 over 3 seeds
            return "bf16", f"autocast: {why}; fp32 master weights (same accuracy as fp32, measured)"
        return "fp32", why
    return "fp32", f"training {kind} on {device.type} stays fp32 unless precision='bf16' is asked for"


def _auto_feature_precision(device: torch.device, *, frozen: bool, kind: str) -> tuple[str, str]:
    if not frozen:
        return "fp32", "the backbone trains: no separate feature extraction"
    if kind != "image":
        return "fp32", f"{kind} input: bf16 features are measured for images only"
    if device.type == "cpu":
        native, why = cpu_bf16_native()
        if native:
            return "bf16", f"autocast: {why}; frozen feature extraction"
        return "fp32", why
    if device.type == "cuda":
        has, why = _cuda_bf16(device)
        return ("bf16", f"autocast: {why}; frozen feature extraction") if has else ("fp32", why)
    return "fp32", f"no bf16 fast path known for device type {device.type!r}"


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


def _auto_layout(device: torch.device, trunk: nn.Module | None, *, kind: str, image_size: int | None,
                 store: str | Path | None = None) -> tuple[bool, str]:
    if kind != "image":
        return False, f"{kind} input"
    if trunk is None:  # nothing to inspect: the layout of earlier versions
        on = device.type == "cuda"
        return on, f"no trunk given to inspect: the {device.type} default"
    share, n_conv = conv_share(trunk)
    if n_conv == 0:
        return False, "the trunk has no Conv2d layers"
    if share >= CONV_SHARE_CHANNELS_LAST:
        return True, f"convolutional trunk: {share:.0%} of the Conv2d + Linear weights are Conv2d"
    if share < CONV_SHARE_CONTIGUOUS:
        return False, f"ViT-style trunk: {1 - share:.0%} of the Conv2d + Linear weights are Linear"
    return measure_layout(trunk, device, image_size=image_size or 224, share=share, store=store)


def _layout_key(trunk: nn.Module, device: torch.device, image_size: int) -> str:
    cap = torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else torch.cuda.get_device_name(device)
    return f"{type(trunk).__module__}.{type(trunk).__qualname__}|{device.type}|{cap}|{int(image_size)}|" \
           f"torch {torch.__version__}"


def _read_store(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def measure_layout(trunk: nn.Module, device: torch.device, *, image_size: int = 224, share: float | None = None,
                   rounds: int = 5, store: str | Path | None = None) -> tuple[bool, str]:
    """Time ``trunk`` (eval mode, no grad) in both layouts on ``device``; channels_last when it
    is at least ``MEASURED_MIN_SPEEDUP`` times faster (fastest of ``rounds`` rounds each,
    interleaved). The trunk's mode and layout are restored.

    The decision is cached per (trunk class, device, CPU capability or GPU name, image size,
    torch version) for the process, and in the JSON file ``store`` when given, so that later
    runs (and their feature-cache keys) make the same choice instead of re-timing it under
    another load.
    """
    key = _layout_key(trunk, device, image_size)
    if key in _LAYOUT_CACHE:
        return _LAYOUT_CACHE[key]
    saved = _read_store(Path(store)).get(key) if store is not None else None
    if isinstance(saved, dict) and isinstance(saved.get("channels_last"), bool):
        result = (saved["channels_last"], f"{saved.get('reason', 'timed earlier')} (read from {store})")
        _LAYOUT_CACHE[key] = result
        return result
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
        data = _read_store(Path(store))
        data[key] = {"channels_last": on, "reason": result[1]}
        atomic_write(store, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1, sort_keys=True)))
    return result


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels (``torch.use_deterministic_algorithms``), no cuDNN autotuning.

    When off, cuDNN benchmarks convolution algorithms (fast for fixed image sizes)."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(bool(enabled), warn_only=False)
    torch.backends.cudnn.deterministic = bool(enabled)
    torch.backends.cudnn.benchmark = not enabled and torch.cuda.is_available()
