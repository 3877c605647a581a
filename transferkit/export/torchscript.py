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
import math
import time
import types
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferkit._integrity import check_records, file_digests, open_zip, record_name, records_entry, zip_records
from transferkit._io import atomic_write, check_export_names, check_free_space, file_lock, file_stat, python_writer
from transferkit.hardware import is_convolutional, resolve_device
from transferkit.lora import merge_lora
from transferkit.backbones import InputSpec
from transferkit.model import ImagePreprocess, eval_geometry
from transferkit.errors import ConfigError, ExportError, check_choice, warn
from transferkit.outputs import check_output_file, is_export
from transferkit._text import exception_line, plural
from transferkit.export.metadata import (
    RECORDS_FILE,
    UPDATED,
    as_json,
    check_model_file,
    complete_metadata,
    decode_metadata,
    encode_metadata,
    is_onnx_file,
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


def _python_calls(scripted: torch.jit.ScriptModule) -> list[str]:
    """The Python functions that ``scripted`` calls (``@torch.jit.ignore``: they run in this
    process, but `torch.jit.save` cannot write them, and tracing through them fails)."""
    found: set[str] = set()
    for module in scripted.modules():
        for name in module._c._method_names():
            graph = module._c._get_method(name).graph
            found.update(node.pyname() for node in graph.findAllNodes("prim::PythonOp", True))
    return sorted(found)


def _script(module: nn.Module) -> torch.jit.ScriptModule:
    """``torch.jit.script(module)``; ExportError when the result calls Python functions
    (`_python_calls`), since such a module cannot be saved."""
    scripted = torch.jit.script(module)
    calls = _python_calls(scripted)
    if calls:
        raise ExportError(f"it calls Python functions that a TorchScript file cannot hold ({', '.join(calls)}: "
                          "@torch.jit.ignore)")
    return scripted


def _script_children(model: nn.Module) -> list[str]:
    """Script each direct child that scripts (in place); return their names."""
    done = []
    for name, child in list(model.named_children()):
        try:
            setattr(model, name, _script(child))
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
            return _script(model), "script"
        except Exception as exc:  # scripting fails on some third-party modules; tracing is the fallback
            if mode == "script":
                raise ExportError(f"torch.jit.script failed: {exception_line(exc)}. "
                                  "Use mode='auto' or mode='trace' to trace instead.") from exc
            reason = exception_line(exc)
    else:
        reason = "mode='trace' was asked"
    model = copy.deepcopy(model)
    kept = _script_children(model)
    _hide_exported_methods(model)
    if mode == "auto":
        warn(f"torch.jit.script failed ({reason}); falling back to torch.jit.trace. A traced model "
             "replays the control flow seen on the example input only (kept scripted: "
             f"{kept or 'nothing'}); data-dependent branches elsewhere are frozen. The export is still "
             "checked for parity on the example inputs.")
    scripting = f"scripting failed ({reason}), and " if mode == "auto" else ""
    try:
        with torch.no_grad():
            traced = torch.jit.trace(model, example, check_trace=False)
    except Exception as exc:
        raise ExportError(f"The model cannot be converted to TorchScript: {scripting}torch.jit.trace failed "
                          f"({exception_line(exc)}). Its ONNX export may still work "
                          "(transferkit.export.export_onnx).") from exc
    calls = _python_calls(traced)
    if calls:  # a torch.autograd.Function, or a Python function that the trace recorded as a call
        raise ExportError(f"The model cannot be converted to TorchScript: {scripting}its trace calls Python "
                          f"functions that a TorchScript file cannot hold ({', '.join(calls)}: e.g. a "
                          "torch.autograd.Function). Its ONNX export may still work (transferkit.export.export_onnx).")
    return traced, "trace"


def _optimizations(model: nn.Module, example: torch.Tensor) -> tuple[str, ...]:
    """The optimizations to try, in order: ``freeze_channels_last`` first when channels_last
    is the faster CPU layout for the model's trunk (`transferkit.train.speed`: convolutional
    trunks; 4-d image inputs only)."""
    if example.ndim == 4 and is_convolutional(getattr(model, "trunk", model)):
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


def checked_inputs(batches: Sequence[torch.Tensor]) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The batch sizes (each once, ascending) and input dtypes (in the order checked) of ``batches``."""
    return (tuple(sorted({int(b.shape[0]) for b in batches})),
            tuple(dict.fromkeys(str(b.dtype).replace("torch.", "") for b in batches)))


def _check_batches(examples: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, bool]]:
    """`one_and_many` of each example set; uint8 images are also checked as floats in [0, 1]
    (``True``: such a derived batch, dropped for models that take uint8 only)."""
    batches: list[tuple[torch.Tensor, bool]] = []
    for ex in examples:
        variants = [(ex, False)] + ([(ex.float() / 255.0, True)] if ex.dtype == torch.uint8 else [])
        for v, derived in variants:
            batches += [(b, derived) for b in one_and_many(v)]
    return batches


def one_and_many(batch: torch.Tensor) -> list[torch.Tensor]:
    """The batches an export is checked on for the example ``batch``: its first input alone,
    and the batch (a batch of one repeated as a batch of 2: a file that runs one input at a
    time, a trace that fixed the batch size, is refused too)."""
    return [batch[:1], batch if batch.shape[0] > 1 else torch.cat([batch, batch])]


def _check_float_pixels(eager: nn.Module, examples: Sequence[torch.Tensor]) -> None:
    """ExportError for float example images that the exported model refuses (outside [0, 1]
    by more than its slack, or not finite): its check runs in the file, not in eager code."""
    pre = getattr(eager, "preprocess", None)
    if not isinstance(pre, ImagePreprocess):
        return
    for ex in examples:
        if ex.is_floating_point():
            try:
                pre.check_float_pixels(ex)  # the file's own rule
            except ValueError:
                lo, hi = (float(v) for v in torch.aminmax(ex.detach().float()))
                raise ExportError(f"The example inputs are float pixels in [{lo:g}, {hi:g}], which the exported "
                                  "model refuses: it takes uint8 pixels or float pixels in [0, 1]. Pass uint8 "
                                  "images, or divide by 255; nothing was written.") from None


def _warn_if_uint8_refused(eager: nn.Module, examples: Sequence[torch.Tensor], input_spec: dict[str, Any]) -> None:
    """Warn where an image model refuses the uint8 pixels of its float example images: the
    predictor gives an image model uint8 pixels for image files, so predict() would fail on
    them (the file is still written; the parity check is the examples' own)."""
    if input_spec.get("kind", "image") != "image":
        return
    for ex in examples:
        if ex.is_floating_point() and ex.ndim == 4:
            pixels = (ex[:1].detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8)
            try:
                with torch.no_grad():
                    eager(pixels)
            except Exception as exc:  # noqa: BLE001 - the model's own error, whatever it is
                warn(f"The model fails on uint8 pixels (the example images rounded to uint8): "
                     f"{exception_line(exc).rstrip('.')}. The file is written, but transferkit's predictor gives an "
                     "image model uint8 pixels for image files, so predict() and `transferkit predict` will fail on "
                     "them. An image model to deploy takes raw pixels, uint8 in [0, 255] or float in [0, 1]: put "
                     "transferkit's ImagePreprocess(mean, std) in front of the module (transferkit.build_model does).")
            return


def reference_outputs(eager: nn.Module, batches: Sequence[tuple[torch.Tensor, bool]]
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The batches the eager model accepts and its outputs on them (computed once, compared
    with every candidate). A derived float batch the model rejects is left out."""
    kept, outputs = [], []
    with torch.no_grad():
        for xb, derived in batches:
            try:
                out = eager(xb)
            except Exception as exc:  # noqa: BLE001 - e.g. a model written for uint8 input only
                if derived:
                    continue
                said = exception_line(exc).rstrip(".")
                raise ExportError(f"The model fails on the example inputs (a batch {tuple(xb.shape)} {xb.dtype}): "
                                  f"{said}; nothing was written. Give example inputs the model takes (images: uint8 "
                                  "pixels or floats in [0, 1]; audio: float waveforms).") from exc
            if not isinstance(out, torch.Tensor) or out.ndim != 2:
                raise ExportError(f"The model must return a [N, num_outputs] tensor; it returns "
                                  f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}.")
            if out.shape[0] != xb.shape[0]:
                raise ExportError(f"The model returns {tuple(out.shape)} for the example batch {tuple(xb.shape)}: "
                                  "not one row per input, so the examples are not a batch (images [N, C, H, W], "
                                  "audio [N, T]) or the model mixes the inputs of a batch (a reshape(1, -1), a mean "
                                  "over the batch); nothing was written.")
            if out.is_floating_point() and not torch.isfinite(out).all():
                raise ExportError(f"The model returns NaN/inf on the example inputs ({_count_bad(out)} of "
                                  f"{out.numel()} outputs for a batch {tuple(xb.shape)} {xb.dtype}), so the export "
                                  "cannot be checked against it; nothing was written. Check the model's weights "
                                  "(training diverged?) and the example inputs.")
            kept.append(xb)
            outputs.append(out)
    return kept, outputs


def _count_bad(t: torch.Tensor) -> int:
    return int((~torch.isfinite(t)).sum())


def max_abs_diff(reference: Sequence[torch.Tensor], exported: torch.jit.ScriptModule,
                 batches: Sequence[torch.Tensor], *, per_output: bool = False) -> tuple[Any, Any]:
    """Largest ``|exported(x) - eager(x)|`` over ``batches`` and the largest ``|eager(x)|``,
    reduced with torch in float64 (``per_output``: one of each per output column, as
    tensors, for `parity`). Any NaN/inf output, eager or exported, raises ExportError (a
    NaN compares false with everything, so a Python ``max`` would hide it)."""
    width = int(reference[0].shape[-1]) if per_output and len(reference) else 0
    diff = torch.zeros(width, dtype=torch.float64) if per_output else torch.zeros((), dtype=torch.float64)
    scale = torch.zeros_like(diff)
    with torch.no_grad():
        for a, xb in zip(reference, batches):
            b = exported(xb)
            if not isinstance(b, torch.Tensor) or a.shape != b.shape:
                shape = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
                raise ExportError(f"The exported model returns {shape} for input {tuple(xb.shape)} {xb.dtype}, "
                                  f"the eager model {tuple(a.shape)}.")
            a64, b64 = a.detach().double(), b.detach().double()
            for who, t in (("eager", a64), ("exported", b64)):
                if not torch.isfinite(t).all():
                    raise ExportError(f"The {who} model returns NaN/inf ({_count_bad(t)} of {t.numel()} outputs) for "
                                      f"input {tuple(xb.shape)} {xb.dtype}; the export is refused (nothing was "
                                      "written).")
            if a64.numel():
                dims = tuple(range(a64.ndim - 1)) if per_output else None
                diff = torch.maximum(diff, (a64 - b64).abs().amax(dim=dims))
                scale = torch.maximum(scale, a64.abs().amax(dim=dims))
    if not torch.isfinite(diff).all():
        raise ExportError(f"The exported model differs from the eager model by {float(diff.max())}; the export is "
                          "refused.")
    return (diff, scale) if per_output else (float(diff), float(scale))


def parity(diff: Any, scale: Any, atol: float, rtol: float) -> tuple[float, float, int]:
    """``(difference, tolerance, output)`` of the output (column) nearest to or furthest
    beyond its tolerance ``atol + rtol * max|eager output|``, from `max_abs_diff`'s per-output
    ``diff`` and ``scale``. Each output has its own tolerance, so an output far smaller than
    the others (a regression target in other units) is checked at its own scale.

    Example:
        >>> parity(torch.tensor([0.1, 0.3]), torch.tensor([5e4, 3.0]), 1e-5, 1e-5)[2]  # 0.3 on a scale of 3
        1
    """
    diff, scale = torch.as_tensor(diff, dtype=torch.float64), torch.as_tensor(scale, dtype=torch.float64)
    tol = atol + rtol * scale
    j = int(torch.argmax(diff - tol)) if diff.numel() else 0
    return (float(diff[j]), float(tol[j]), j) if diff.numel() else (0.0, atol, 0)


def example_list(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    items = [example_inputs] if isinstance(example_inputs, torch.Tensor) else list(example_inputs)
    if not items or not all(isinstance(x, torch.Tensor) and x.ndim >= 2 and x.shape[0] >= 1 for x in items):
        raise ExportError("example_inputs must be a batch [N, ...] (or a list of batches) with N >= 1 of real "
                          "inputs, e.g. a few validation images as a uint8 tensor [N, 3, H, W].")
    return [x.detach().cpu() for x in items]


def parity_examples(example_inputs: torch.Tensor | Sequence[torch.Tensor], metadata: Any) -> list[torch.Tensor]:
    """`example_list`, and for audio (``metadata["input_spec"]["kind"] == "audio"``: ``[N, T]``
    waveforms, a dynamic time axis) each batch again cut to 3/4 of its length when that is at
    least 0.1 s: a file traced at one length that keeps it (code that turns the length into a
    number, ``float(x.shape[-1])``) then fails the parity check instead of being written."""
    examples = example_list(example_inputs)
    spec = metadata.get("input_spec") if isinstance(metadata, dict) else None
    if isinstance(spec, dict) and spec.get("kind") == "audio":
        shortest = (spec.get("sample_rate") or 16000) // 10
        examples += [shorter_clips(x) for x in examples if x.ndim == 2 and shorter_clips(x).shape[1] >= shortest]
    return examples


def shorter_clips(x: torch.Tensor) -> torch.Tensor:
    """A batch of waveforms ``[N, T]`` cut to 3/4 of its length: clips of a length that a
    trace on ``x`` did not see (the export checks and the ONNX feature pass compare on them)."""
    return x[:, :max(1, x.shape[1] * 3 // 4)]


def check_export_path(path: str | Path, *, reads: list[tuple[str, Any]] = ()) -> None:
    """ConfigError when ``path`` is an existing file that is not a TorchScript export (notes, a
    ``torch.save`` of the user's own), which writing the export would destroy, or a file the
    caller ``reads`` (`check_output_file`), or a name ending in ``.onnx`` (`check_export_names`); an
    earlier export and an empty file are replaced."""
    check_export_names(path)
    check_output_file(path, flag="The TorchScript export path", writes="TorchScript export", reads=list(reads),
                      replaceable=is_export)


def eager_copy(model: nn.Module) -> nn.Module:
    """The copy of ``model`` an export converts and compares with: on the CPU, in eval mode,
    with any LoRA factors folded into their weights (`merge_lora`: the same function with
    plain modules, which TorchScript scripts and which `result.model` keeps unmerged)."""
    merged = merge_lora(model)
    return (copy.deepcopy(model) if merged is model else merged).cpu().eval()


def takes_size(model: nn.Module, input_spec: dict[str, Any], examples: Sequence[torch.Tensor] = ()) -> None:
    """Make the image preprocessing of ``model`` (an export's copy) refuse, once scripted,
    images of another size than ``input_spec``'s ``image_size`` (where it names one: transferkit's
    own exports do), saying how the predictor resizes them (`transferkit.model.eval_geometry`):
    the file then needs no transferkit to be used right. ExportError for ``examples`` of
    another size (the file would refuse them)."""
    spec = InputSpec.from_dict(input_spec)
    found = [m for m in model.modules() if isinstance(m, ImagePreprocess)]
    if spec.kind != "image" or not found or not input_spec.get("image_size"):  # nothing to check against
        return
    size = int(spec.image_size)
    other = next((tuple(x.shape) for x in examples if x.dim() == 4 and tuple(x.shape[2:]) != (size, size)), None)
    if other is not None:
        raise ExportError(f"An example batch of shape {other} is not of the {size} x {size} images the model takes "
                          f"(its input_spec's image_size; the predictor resizes every image to it, and the exported "
                          f"file refuses other sizes): give examples of {size} x {size} pixels; nothing was written.")
    for module in found:
        module.size, module.geometry = size, eval_geometry(spec)


def export_torchscript(model: nn.Module, path: str | Path, *, metadata: dict[str, Any],
                       example_inputs: torch.Tensor | Sequence[torch.Tensor], mode: str = "auto",
                       optimize: bool = False, atol: float = 1e-5, rtol: float = 1e-5) -> ExportReport:
    """Convert ``model`` to TorchScript, save it with ``metadata`` inside, reload the file
    and compare it with the eager model on ``example_inputs`` at batch size 1 and N. A model
    with LoRA factors is exported with them folded into its weights (`eager_copy`).

    The tolerance is ``atol + rtol * max|eager output|`` (``metadata["task"] == "regression"``:
    per output, see `parity`); beyond it ExportError is raised and ``path`` is left untouched.
    ``example_inputs`` is a batch (or a list of batches, e.g. waveforms of several lengths).
    See `transferkit.export.metadata` for the fields.

    Example:
        >>> import torch, transferkit
        >>> bb = transferkit.get_backbone("tk:small_cnn", weights=None)
        >>> model = transferkit.build_model(bb, 2)
        >>> images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
        >>> report = export_torchscript(model, "model.pt", example_inputs=images,
        ...     metadata={"labels": ["a", "b"], "input_spec": bb.input_spec.to_dict()})
        >>> report.mode, report.max_abs_diff <= report.tolerance
        ('script', True)
    """
    t0 = time.perf_counter()
    check_choice("export mode", mode, MODES)
    check_tolerances(atol, rtol)
    check_export_path(path)
    examples = parity_examples(example_inputs, metadata)
    eager = eager_copy(model)
    _check_float_pixels(eager, examples)
    batches, reference = reference_outputs(eager, _check_batches(examples))
    meta = complete_metadata(metadata, num_outputs=int(reference[0].shape[1]))
    _warn_if_uint8_refused(eager, examples, meta["input_spec"])
    takes_size(eager, meta["input_spec"], examples)
    with quiet_jit():
        scripted, kind = _to_script(eager, examples[0][:1], mode)
    candidates = [(how, scripted) for how in (_optimizations(eager, examples[0]) if optimize else ())] + \
        [("none", scripted)]
    sizes, dtypes = checked_inputs(batches)
    report = ExportReport(Path(path), kind, 0.0, sizes, input_dtypes=dtypes)

    def write(tmp: str) -> None:
        for how, module in candidates:
            try:
                module = _optimized(module, how) if how != "none" else module
                diff, tol = _save_and_check(module, tmp, meta, reference, batches, kind, how, atol, rtol, path)
            except Exception as exc:  # noqa: BLE001 - an optimization that fails is dropped, plain is final
                if how == "none":
                    raise
                report.notes.append(f"{how} rejected: {_why_rejected(exc)}")
                continue
            report.optimization, report.max_abs_diff, report.tolerance = how, diff, tol
            return

    check_free_space(path, module_bytes(eager), what="export")
    with quiet_jit(), file_lock(path, what="export"):  # the run holds it already: re-entrant
        atomic_write(path, write, what="export")
    if optimize and report.optimization == "none":
        warn("optimize=True: no optimization kept parity or reloaded, so the plain TorchScript was "
             f"exported. {'; '.join(report.notes)}")
    report.seconds = time.perf_counter() - t0
    return report


def check_tolerances(atol: Any, rtol: Any) -> None:
    """ConfigError unless ``atol`` and ``rtol`` are finite numbers >= 0 (a NaN or infinite
    tolerance would switch the parity check off; a negative one fails every export)."""
    for name, v in (("atol", atol), ("rtol", rtol)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"{name}={v!r} is out of range; expected a finite number >= 0 (the parity check's "
                              f"tolerance, default 1e-5).")


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers: about the size of its saved file."""
    seen, total = set(), 0
    for t in (*module.parameters(), *module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _save_and_check(module: torch.jit.ScriptModule, tmp: str, meta: dict[str, Any], reference: list[torch.Tensor],
                    batches: list[torch.Tensor], kind: str, how: str, atol: float, rtol: float,
                    target: str | Path | None = None) -> tuple[float, float]:
    """Save ``module`` with its metadata, reload it from disk, compare; re-save once so that the
    metadata records the reloaded file's own difference."""
    def measure(exported: torch.jit.ScriptModule) -> tuple[float, float, str]:
        """The difference, its tolerance, and where (regression: the output nearest its own tolerance)."""
        if meta.get("task") == "regression":  # outputs in their own units: each checked at its own scale
            diff, tol, j = parity(*max_abs_diff(reference, exported, batches, per_output=True), atol, rtol)
            return diff, tol, f" in output {j} ({_output_name(meta, j)}), checked at its own scale"
        diff, scale = max_abs_diff(reference, exported, batches)
        return diff, atol + rtol * scale, ""

    with torch.jit.optimized_execution(False):  # a cheap first estimate, recorded in the metadata
        recorded, _, _ = measure(module)
    sizes, dtypes = checked_inputs(batches)
    for _ in range(2):
        meta["export"] = {"mode": kind, "optimization": how, "max_abs_diff": recorded, "atol": atol, "rtol": rtol,
                          "batch_sizes": list(sizes), "input_dtypes": list(dtypes)}
        save_with_digests(module, tmp, meta)
        reloaded, _ = _load(tmp, "cpu", source=repr(str(target if target is not None else tmp)))
        diff, tol, where = measure(reloaded)
        if not diff <= tol:
            raise ExportError(f"The exported model ({kind}, optimization={how}) differs from the eager model by "
                              f"{diff:.3g}{where} (> tolerance {tol:.3g} = atol {atol:g} + rtol {rtol:g} * max|eager "
                              "output|); the file was not written.")
        if recorded == diff:
            break
        recorded = diff
    return diff, tol


def _output_name(meta: dict[str, Any], j: int) -> str:
    labels = meta.get("labels") or []
    return repr(labels[j]) if j < len(labels) else str(j)


def save_with_digests(module: torch.jit.ScriptModule, path: str | Path, meta: dict[str, Any]) -> None:
    """``torch.jit.save`` with the metadata and the SHA-256 of every record: saved once to
    hash the records (they do not depend on the metadata files), then again with the list
    (``meta["integrity"]`` is set). The second file is checked when it is reloaded."""
    with python_writer(path) as f:  # a full disk: OSError, not a C++ abort of the process
        torch.jit.save(module, f, _extra_files=encode_metadata(meta))
    digests = file_digests(path, source=repr(str(path)), error=ExportError)
    meta["integrity"], records = records_entry(digests)
    with python_writer(path) as f:
        torch.jit.save(module, f, _extra_files=encode_metadata(meta, records))


def read_scripted_metadata(path: str | Path) -> dict[str, Any]:
    """The validated metadata of a TorchScript export. The whole file is checked: its record
    digests, its metadata, and that the model's output has one value per label (one
    forward pass on a blank input of the metadata's input spec). `transferkit.export.read_metadata`
    reads ONNX exports too.

    Example:
        >>> import torch, transferkit
        >>> bb = transferkit.get_backbone("tk:small_cnn", weights=None)
        >>> images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
        >>> _ = export_torchscript(transferkit.build_model(bb, 2), "model.pt", example_inputs=images,
        ...                        metadata={"labels": ["a", "b"], "input_spec": bb.input_spec.to_dict()})
        >>> read_scripted_metadata("model.pt")["labels"]
        ['a', 'b']
    """
    module, meta = load_scripted(path)
    check_output_width(module, meta, source=repr(str(path)))
    return meta


def blank_input(meta: dict[str, Any]) -> torch.Tensor:
    """A batch of one blank input as the export takes it: zeros of the input spec's shape, in
    the first dtype the export was checked with (uint8 images by default)."""
    spec = meta["input_spec"]
    dtypes = (meta.get("export") or {}).get("input_dtypes") or []
    if spec.get("kind", "image") == "audio":
        length = int(round(float(spec.get("clip_seconds") or 1.0) * int(spec["sample_rate"])))
        dtype = getattr(torch, dtypes[0], torch.float32) if dtypes else torch.float32
        return torch.zeros(1, max(length, 1), dtype=dtype)
    size = int(spec.get("image_size", 224))
    dtype = torch.uint8 if not dtypes or "uint8" in dtypes else getattr(torch, dtypes[0], torch.float32)
    return torch.zeros(1, int(spec.get("channels", 3)), size, size, dtype=dtype)


def check_output_width(module: torch.jit.ScriptModule, meta: dict[str, Any], *, source: str) -> None:
    """Raise ExportError unless ``module`` returns ``[N, len(labels)]`` on a blank input."""
    x = blank_input(meta)
    try:
        with torch.no_grad(), quiet_jit():
            out = module(x.to(_module_device(module)))
    except Exception as exc:  # noqa: BLE001 - a model that cannot run is reported, not crashed on
        raise ExportError(f"{source} does not run on a blank input of its input spec {tuple(x.shape)} {x.dtype}: "
                          f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}. "
                          "The model and its metadata do not belong together; re-export the model.") from exc
    n = len(meta["labels"])
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] != n:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ExportError(f"{source} returns {shape} but its metadata lists {n} labels: the model and its metadata "
                          "do not belong together. Re-export the model.")


def _module_device(module: torch.jit.ScriptModule) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def load_scripted(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Load an exported file; raise ExportError when it or its metadata is missing, corrupt
    or altered (a damaged tensor record gives `CorruptExportError`)."""
    return _load(path, map_location, source=repr(str(path)))


def _load(path: str | Path, map_location: str | torch.device, *,
          source: str) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    path = Path(path)
    check_model_file(path, source=source, kind="Model")
    device = check_device(map_location)
    # the file checked must be the file loaded: one replaced meanwhile (an atomic re-export)
    # would pair its labels with another file's weights. torch.jit.load reads a path without a
    # copy of it in memory (a file object is read whole, about 4x its size at the peak), so the
    # path is loaded and the file's identity compared before and after; a change loads again.
    for _ in range(3):
        try:
            f = open(path, "rb")
        except OSError as exc:
            raise ExportError(f"{_UNREADABLE.format(source=source)}: {type(exc).__name__}: {exc}") from exc
        with f:
            checked = file_stat(f.fileno())
            meta = _checked_metadata(f, source)
        module = _jit_load(path, device, source)
        try:
            if file_stat(path) == checked:
                return module, meta
        except OSError:
            pass
    raise ExportError(f"{source} was replaced three times while it was loaded; load it again once it is written.")


_UNREADABLE = "Cannot load {source} as TorchScript (truncated, corrupt, or not a transferkit export)"


def _why_rejected(exc: BaseException) -> str:
    """Why an optimized export was dropped, in one line: where torch could not load the file it
    had just written (a known limit of frozen modules), that, not the load error's "corrupt"."""
    cause = exc.__cause__
    if isinstance(exc, ExportError) and str(exc).startswith("Cannot load ") and cause is not None:
        return f"torch could not load the optimized file back ({type(cause).__name__}: " \
               f"{str(cause).splitlines()[0][:200] if str(cause) else ''})"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def _checked_metadata(f: Any, source: str) -> dict[str, Any]:
    """The metadata of the open export ``f``, its records checked against their digests."""
    try:
        zf = open_zip(f, source=source, error=ExportError)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        if _legacy_torch_save(f):
            raise ExportError(f"{source} is a file saved with torch.save in its format before torch 1.6 (a state dict "
                              "or checkpoint), not an exported model. Use it as weights (weights=path), or export "
                              "a model with transferkit.export_torchscript.") from exc
        raise ExportError(f"{_UNREADABLE.format(source=source)}: {type(exc).__name__}: {exc}") from exc
    with zf:
        names = [record_name(n) for n in zf.namelist()]
        if not any(n.startswith("code/") for n in names):
            raise ExportError(_not_torchscript(zf, names, source))
        digests, extra = zip_records(zf, source=source, error=ExportError)
    meta = decode_metadata(extra, source=source)
    if "integrity" in meta:
        check_records(extra.get(RECORDS_FILE, b""), meta["integrity"], digests, source=source, error=ExportError)
    else:
        warn(f"{source} has no content digest (an export from an older transferkit): its weights cannot "
             "be checked for damage. Re-export it to add one.")
    return meta


# how torch.save began a file before torch 1.6 (pickle protocol 2, then its magic number as a long)
_LEGACY_SAVE = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def _legacy_torch_save(f: Any) -> bool:
    """Whether the open file ``f`` starts as torch.save wrote files before torch 1.6 (not a
    zip: CIFAR ResNet ``.th`` files, older checkpoints)."""
    try:
        f.seek(0)
        return f.read(len(_LEGACY_SAVE)) == _LEGACY_SAVE
    except (OSError, ValueError, AttributeError):
        return False


def _jit_load(path: Path, device: torch.device, source: str) -> torch.jit.ScriptModule:
    try:
        with quiet_jit():
            return torch.jit.load(str(path), map_location=device)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ExportError(f"{_UNREADABLE.format(source=source)}: {type(exc).__name__}: {msg}") from exc


def check_device(device: str | torch.device) -> torch.device:
    """The device to load an export on, checked: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``
    (N below the number of GPUs) or ``"mps"``, each only where it is available; ConfigError
    otherwise (before the file is read, so the error is about the device, not the file)."""
    dev = resolve_device(str(device) if isinstance(device, torch.device) else device)
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device={str(device)!r} but this machine has "
                          f"{plural(torch.cuda.device_count(), 'CUDA device')} "
                          f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1}); use 'cuda' or 'cpu'.")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                  and torch.backends.mps.is_available()):
        raise ConfigError(f"device={str(device)!r} but Apple MPS is not available here; use 'auto' or 'cpu'.")
    return dev


def _not_torchscript(zf: zipfile.ZipFile, names: list[str], source: str) -> str:
    """Why a zip that holds no TorchScript code is not an export, and what to do with it."""
    if "data.pkl" in names:
        pkl = next(i for i in zf.infolist() if record_name(i.filename) == "data.pkl")
        if b"transferkit" in zf.read(pkl):
            return (f"{source} is a transferkit checkpoint (finetune(checkpoint=...)), not an exported model. Export "
                    f"it first: `transferkit export {source} --out model.pt` (in Python: "
                    f"transferkit.export.export_checkpoint({source}, 'model.pt')), then load model.pt.")
        return (f"{source} is a file saved with torch.save (a state dict or checkpoint), not an exported model. "
                "Use it as weights (weights=path), or export a trained model: `transferkit export CHECKPOINT --out "
                "model.pt` (in Python: transferkit.export_torchscript(model, 'model.pt', ...)).")
    return f"{source} is a zip file but not a TorchScript export (it holds no TorchScript code)."


def update_metadata(path: str | Path, changes: dict[str, Any]) -> dict[str, Any]:
    """Change metadata fields of an export on purpose (e.g. rename labels), keeping the
    digests valid; the weights and code are not touched. Returns the new metadata.

    Example:
        >>> import torch, transferkit
        >>> bb = transferkit.get_backbone("tk:small_cnn", weights=None)
        >>> images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
        >>> _ = export_torchscript(transferkit.build_model(bb, 2), "model.pt", example_inputs=images,
        ...                        metadata={"labels": ["a", "b"], "input_spec": bb.input_spec.to_dict()})
        >>> update_metadata("model.pt", {"labels": ["ant", "bee"]})["labels"]
        ['ant', 'bee']
    """
    check_model_file(path, source=repr(str(path)), kind="Model")
    if is_onnx_file(path):
        raise ExportError(f"update_metadata changes TorchScript exports; {str(path)!r} is an ONNX export, whose "
                          "metadata is written by exporting it again (result.export(path, onnx=True), export_onnx, or "
                          "`transferkit export CKPT --out model.pt --onnx model.onnx`).")
    module, meta = load_scripted(path)
    protected = {"format", "num_outputs", "torch_version", "transferkit_version", "export", "integrity"} & set(changes)
    if protected:
        raise ExportError(f"update_metadata cannot change {sorted(protected)}: the exporter writes them. "
                          "Re-export the model instead.")
    trained = sorted(k for k in ("task", "input_spec") if k in changes and changes[k] != meta.get(k))
    if trained:  # the head was trained for the task, the normalisation is inside the model, the check used the spec
        raise ExportError(f"update_metadata cannot change {trained}: the model was trained and checked with them "
                          f"(task {meta.get('task')!r}, input {meta.get('input_spec')}), and predictions read under "
                          "others would be wrong. Train (or export) the model for them instead.")
    new = as_json({**meta, **changes})
    validate_metadata(new, source=UPDATED, new_labels="labels" in changes)

    def write(tmp: str) -> None:
        save_with_digests(module, tmp, new)
        _load(tmp, "cpu", source=repr(str(path)))

    check_free_space(path, Path(path).stat().st_size, what="export")
    with quiet_jit(), file_lock(path, what="export"):
        atomic_write(path, write, what="export")
    return new
