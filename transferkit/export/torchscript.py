"""TorchScript export: one self-contained file, verified against the eager model after
reloading it from disk.

Modes: ``torch.jit.script`` first; when scripting fails, ``torch.jit.trace`` with a warning
(the children that do script, e.g. the preprocessing with its uint8/float branch, stay
scripted inside the trace). ``optimize=True`` tries ``freeze`` with
the weights in channels_last (convolutional trunks: the faster CPU layout), then
``optimize_for_inference``, then ``freeze``, and keeps the first one whose reloaded file
still matches the eager model.
"""

from __future__ import annotations

import contextlib
import copy
import time
import types
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferkit._io import atomic_write
from transferkit.errors import ExportError, check_choice
from transferkit.export.metadata import (
    EXTRA_FILES,
    complete_metadata,
    decode_metadata,
    encode_metadata,
    validate_metadata,
)

MODES = ("auto", "script", "trace")
_JIT_DEPRECATION = r"`torch\.jit\.\w+` is deprecated"


@contextlib.contextmanager
def quiet_jit() -> Iterator[None]:
    """Hide torch's "torch.jit.* is deprecated" notices (TorchScript is the deployment
    format transferkit targets on purpose); other warnings pass."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_JIT_DEPRECATION)
        yield
OPTIMIZATIONS = ("freeze_channels_last", "optimize_for_inference", "freeze")


@dataclass
class ExportReport:
    """What an export did and how close the reloaded file is to the eager model."""

    path: Path
    mode: str
    max_abs_diff: float
    batch_sizes: tuple[int, ...]
    tolerance: float = 0.0
    optimization: str = "none"
    input_dtypes: tuple[str, ...] = ()
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"exported {self.path} ({self.mode}, optimization={self.optimization}): max |exported - eager| = "
                f"{self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g}) at batch sizes "
                f"{list(self.batch_sizes)}, inputs {list(self.input_dtypes)}")


def _script_children(model: nn.Module) -> list[str]:
    """Script each direct child that scripts (in place); return their names."""
    done = []
    for name, child in list(model.named_children()):
        try:
            setattr(model, name, torch.jit.script(child))
            done.append(name)
        except Exception:  # noqa: BLE001 - a child that does not script is traced with the rest
            pass
    return done


def _hide_exported_methods(model: nn.Module) -> None:
    """Shadow ``@torch.jit.export`` methods with plain ones on each (non-script) module, so that
    tracing compiles ``forward`` only (an exported method that calls an unscriptable child
    would make the trace fail too)."""
    from torch._jit_internal import FunctionModifiers, get_torchscript_modifier

    for module in model.modules():
        if isinstance(module, torch.jit.ScriptModule):
            continue
        for name in dir(type(module)):
            fn = getattr(type(module), name, None)
            if callable(fn) and get_torchscript_modifier(fn) is FunctionModifiers.EXPORT:
                object.__setattr__(module, name, types.MethodType(_plain(fn), module))


def _plain(fn: Any) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:  # a new function: no TorchScript export marker
        return fn(*args, **kwargs)

    return call


def _to_script(model: nn.Module, example: torch.Tensor, mode: str) -> tuple[torch.jit.ScriptModule, str]:
    if mode in ("auto", "script"):
        try:
            return torch.jit.script(model), "script"
        except Exception as exc:  # scripting fails on some third-party modules; tracing is the fallback
            if mode == "script":
                raise ExportError(f"torch.jit.script failed: {type(exc).__name__}: {str(exc).splitlines()[0]}. "
                                  "Use mode='auto' or mode='trace' to trace instead.") from exc
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    else:
        reason = "mode='trace' was asked"
    model = copy.deepcopy(model)
    kept = _script_children(model)
    _hide_exported_methods(model)
    if mode == "auto":
        warnings.warn(f"torch.jit.script failed ({reason}); falling back to torch.jit.trace. A traced model "
                      "replays the control flow seen on the example input only (kept scripted: "
                      f"{kept or 'nothing'}); data-dependent branches elsewhere are frozen. The export is still "
                      "checked for parity on the example inputs.", stacklevel=4)
    with torch.no_grad():
        return torch.jit.trace(model, example, check_trace=False), "trace"


def _optimizations(model: nn.Module, example: torch.Tensor) -> tuple[str, ...]:
    """The optimizations to try, in order: ``freeze_channels_last`` first when channels_last
    is the faster CPU layout for the model's trunk (:mod:`transferkit.train.speed`: convolutional
    trunks; 4-d image inputs only)."""
    from transferkit.train.speed import SpeedConfig

    if example.ndim == 4:
        cpu = SpeedConfig.make(torch.device("cpu"), precision="fp32", trunk=getattr(model, "trunk", model),
                               image_size=int(example.shape[-1]))
        if cpu.channels_last:
            return OPTIMIZATIONS
    return tuple(o for o in OPTIMIZATIONS if o != "freeze_channels_last")


def _optimized(scripted: torch.jit.ScriptModule, how: str) -> torch.jit.ScriptModule:
    keep = ["features"] if hasattr(scripted, "features") else []
    source = copy.deepcopy(scripted).eval()
    if how == "freeze_channels_last":  # the weights (frozen into constants) in channels_last: the convolutions
        with warnings.catch_warnings():  # run in that layout on contiguous inputs too
            warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
            source.to(memory_format=torch.channels_last)
    frozen = torch.jit.freeze(source, preserved_attrs=keep)
    return torch.jit.optimize_for_inference(frozen, other_methods=keep) if how == "optimize_for_inference" else frozen


def _check_batches(examples: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, bool]]:
    """Batch 1 and batch N of each example set; uint8 images are also checked as floats in
    [0, 1] (``True``: such a derived batch, dropped for models that take uint8 only)."""
    batches: list[tuple[torch.Tensor, bool]] = []
    for ex in examples:
        variants = [(ex, False)] + ([(ex.float() / 255.0, True)] if ex.dtype == torch.uint8 else [])
        for v, derived in variants:
            batches += [(v[:1], derived), (v, derived)] if v.shape[0] > 1 else [(v, derived)]
    return batches


def reference_outputs(eager: nn.Module, batches: Sequence[tuple[torch.Tensor, bool]]
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The batches the eager model accepts and its outputs on them (computed once, compared
    with every candidate). A derived float batch the model rejects is left out."""
    kept, outputs = [], []
    with torch.no_grad():
        for xb, derived in batches:
            try:
                out = eager(xb)
            except Exception:  # noqa: BLE001 - e.g. a model written for uint8 input only
                if derived:
                    continue
                raise
            kept.append(xb)
            outputs.append(out)
    return kept, outputs


def max_abs_diff(reference: Sequence[torch.Tensor], exported: torch.jit.ScriptModule,
                 batches: Sequence[torch.Tensor]) -> tuple[float, float]:
    """Largest ``|exported(x) - eager(x)|`` over ``batches`` and the largest ``|eager(x)|``."""
    diff, scale = 0.0, 0.0
    with torch.no_grad():
        for a, xb in zip(reference, batches):
            b = exported(xb)
            if not isinstance(b, torch.Tensor) or a.shape != b.shape:
                shape = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
                raise ExportError(f"The exported model returns {shape} for input {tuple(xb.shape)} {xb.dtype}, "
                                  f"the eager model {tuple(a.shape)}.")
            diff = max(diff, (a.float() - b.float()).abs().max().item())
            scale = max(scale, a.float().abs().max().item())
    return diff, scale


def _examples(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    items = [example_inputs] if isinstance(example_inputs, torch.Tensor) else list(example_inputs)
    if not items or not all(isinstance(x, torch.Tensor) and x.ndim >= 2 and x.shape[0] >= 1 for x in items):
        raise ExportError("example_inputs must be a batch [N, ...] (or a list of batches) with N >= 1 of real "
                          "inputs, e.g. a few validation images as a uint8 tensor [N, 3, H, W].")
    return [x.detach().cpu() for x in items]


def export_torchscript(model: nn.Module, path: str | Path, *, metadata: dict[str, Any],
                       example_inputs: torch.Tensor | Sequence[torch.Tensor], mode: str = "auto",
                       optimize: bool = False, atol: float = 1e-5, rtol: float = 1e-5) -> ExportReport:
    """Convert ``model`` to TorchScript, save it with ``metadata`` inside, reload the file
    and compare it with the eager model on ``example_inputs`` at batch size 1 and N.

    The tolerance is ``atol + rtol * max|eager output|``; beyond it ExportError is raised and
    ``path`` is left untouched. ``example_inputs`` is a batch (or a list of batches, e.g.
    waveforms of several lengths). See :mod:`transferkit.export.metadata` for the fields.

    Example:
        >>> import torch, transferkit
        >>> bb = transferkit.get_backbone("tk:small_cnn", weights=None)
        >>> model = transferkit.build_model(bb, 2)
        >>> images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
        >>> report = export_torchscript(model, "/tmp/tk-doctest.pt", example_inputs=images,
        ...     metadata={"labels": ["a", "b"], "input_spec": bb.input_spec.to_dict()})
        >>> report.mode, report.max_abs_diff <= report.tolerance
        ('script', True)
    """
    t0 = time.perf_counter()
    check_choice("export mode", mode, MODES)
    examples = _examples(example_inputs)
    eager = copy.deepcopy(model).cpu().eval()
    batches, reference = reference_outputs(eager, _check_batches(examples))
    out = reference[0]
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise ExportError(f"The model must return a [N, num_outputs] tensor; it returns "
                          f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}.")
    meta = complete_metadata(metadata, num_outputs=int(out.shape[1]))
    with quiet_jit():
        scripted, kind = _to_script(eager, examples[0][:1], mode)
    candidates = [(how, scripted) for how in (_optimizations(eager, examples[0]) if optimize else ())] + \
        [("none", scripted)]
    report = ExportReport(Path(path), kind, 0.0, tuple(int(b.shape[0]) for b in batches),
                          input_dtypes=tuple(dict.fromkeys(str(b.dtype).replace("torch.", "") for b in batches)))

    def write(tmp: str) -> None:
        for how, module in candidates:
            try:
                module = _optimized(module, how) if how != "none" else module
                diff, tol = _save_and_check(module, tmp, meta, reference, batches, kind, how, atol, rtol)
            except Exception as exc:  # noqa: BLE001 - an optimization that fails is dropped, plain is final
                if how == "none":
                    raise
                report.notes.append(f"{how} rejected: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                continue
            report.optimization, report.max_abs_diff, report.tolerance = how, diff, tol
            return

    with quiet_jit():
        atomic_write(path, write)
    if optimize and report.optimization == "none":
        warnings.warn("optimize=True: no optimization kept parity or reloaded, so the plain TorchScript was "
                      f"exported. {'; '.join(report.notes)}", stacklevel=2)
    report.seconds = time.perf_counter() - t0
    return report


def _save_and_check(module: torch.jit.ScriptModule, tmp: str, meta: dict[str, Any], reference: list[torch.Tensor],
                    batches: list[torch.Tensor], kind: str, how: str, atol: float, rtol: float) -> tuple[float, float]:
    """Save ``module`` with its metadata, reload it from disk, compare; re-save once so that the
    metadata records the reloaded file's own difference."""
    with torch.jit.optimized_execution(False):  # a cheap first estimate, recorded in the metadata
        recorded, _ = max_abs_diff(reference, module, batches)
    for _ in range(2):
        meta["export"] = {"mode": kind, "optimization": how, "max_abs_diff": recorded, "atol": atol, "rtol": rtol,
                          "batch_sizes": [int(b.shape[0]) for b in batches],
                          "input_dtypes": sorted({str(b.dtype).replace("torch.", "") for b in batches})}
        torch.jit.save(module, tmp, _extra_files=encode_metadata(meta))
        reloaded, _ = load_scripted(tmp)
        diff, scale = max_abs_diff(reference, reloaded, batches)
        tol = atol + rtol * scale
        if not diff <= tol:  # also catches NaN
            raise ExportError(f"The exported model ({kind}, optimization={how}) differs from the eager model by "
                              f"{diff:.3g} (> tolerance {tol:.3g} = atol {atol:g} + rtol {rtol:g} * {scale:.3g}); "
                              "the file was not written.")
        if recorded == diff:
            break
        recorded = diff
    return diff, tol


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The validated metadata of an exported file (the file is loaded and checked too).

    Example:
        >>> read_metadata("/tmp/tk-doctest.pt")["labels"]
        ['a', 'b']
    """
    return load_scripted(path)[1]


def load_scripted(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Load an exported file; raise ExportError when it or its metadata is missing, corrupt or altered."""
    path = Path(path)
    source = repr(str(path))
    if not path.is_file():
        raise ExportError(f"Model file {source} does not exist{' (it is a folder)' if path.is_dir() else ''}.")
    extra = {name: "" for name in EXTRA_FILES}
    try:
        with quiet_jit():
            module = torch.jit.load(str(path), map_location=map_location, _extra_files=extra)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ExportError(f"Cannot load {source} as TorchScript (truncated, corrupt, or not a transferkit export): "
                          f"{type(exc).__name__}: {msg}") from exc
    return module, decode_metadata(extra, source=source)


def update_metadata(path: str | Path, changes: dict[str, Any]) -> dict[str, Any]:
    """Change metadata fields of an export on purpose (e.g. rename labels), keeping the
    digest valid; the weights and code are not touched. Returns the new metadata.

    Example:
        >>> update_metadata("/tmp/tk-doctest.pt", {"labels": ["ant", "bee"]})["labels"]
        ['ant', 'bee']
    """
    module, meta = load_scripted(path)
    protected = {"format", "num_outputs", "torch_version", "transferkit_version", "export"} & set(changes)
    if protected:
        raise ExportError(f"update_metadata cannot change {sorted(protected)}: the exporter writes them. "
                          "Re-export the model instead.")
    new = {**meta, **changes}
    validate_metadata(new, source="the updated metadata")
    with quiet_jit():
        atomic_write(path, lambda tmp: torch.jit.save(module, tmp, _extra_files=encode_metadata(new)))
    return new
