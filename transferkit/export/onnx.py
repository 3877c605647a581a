"""ONNX export (optional extra ``pip install transferkit[onnx]``), checked with onnxruntime.

The ONNX file takes the same raw input as the TorchScript export, in the dtype of the
example inputs (uint8 images, or float waveforms), with a dynamic batch axis (and a
dynamic time axis for audio). The metadata, its digest, the labels and the SHA-256 of every
weight (initializer), of the nodes and of the graph's inputs and outputs
(``transferkit.records.json``) are stored as the model's ``metadata_props``.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from transferkit._io import (
    atomic_write,
    check_export_names,
    check_free_space,
    file_lock,
    is_write_failure,
    same_file,
)
from transferkit._signals import raise_if_interrupted
from transferkit._text import exception_line
from transferkit.errors import ConfigError, ExportError, OutputError, warn
from transferkit.outputs import check_output_file
from transferkit._integrity import check_records, records_entry
from transferkit.export.metadata import (
    DIGEST_FILE,
    METADATA_FILE,
    ONNX_FORMAT,
    RECORDS_FILE,
    check_model_file,
    complete_metadata,
    decode_metadata,
    encode_metadata,
    holds_onnx,
)
from transferkit.export.torchscript import (
    ExportReport,
    check_export_path,
    check_tolerances,
    checked_inputs,
    eager_copy,
    example_list,
    export_torchscript,
    module_bytes,
    one_and_many,
    parity,
    parity_examples,
    reference_outputs,
)


def onnx_modules() -> tuple[Any, Any] | str:
    """The modules onnx and onnxruntime, or why they cannot be used: not installed, or installed
    and failing to import (a protobuf of another major version, a broken wheel: a
    ``TypeError`` or a ``RuntimeError``, not an ``ImportError``)."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise_if_interrupted(exc)
        return f"not installed ({exc})"
    except Exception as exc:  # noqa: BLE001 - whatever a broken install raises on import
        return f"installed but failing to import ({exception_line(exc)})"
    return onnx, onnxruntime


def _require_onnx(what: str = "ONNX export") -> tuple[Any, Any]:
    """onnx and onnxruntime; an ExportError naming the extra when they cannot be used. ``what``:
    the work that needs them ("ONNX export", "Reading an ONNX file", ...)."""
    found = onnx_modules()
    if isinstance(found, str):
        raise ExportError(f"{what} needs the optional packages onnx and onnxruntime, {found}. Install them with "
                          "pip install 'transferkit[onnx]'.")
    return found


@contextlib.contextmanager
def _exporter_log_off() -> Any:
    """Keep the TorchScript-based exporter's log off: ``torch.onnx.export`` turns it on for
    every export (it tests the function ``_jit_is_onnx_log_enabled`` instead of calling it)
    and, when a conversion fails, prints the whole graph (hundreds of lines) to stdout; the
    raised error says what failed."""
    setter = getattr(torch._C, "_jit_set_onnx_log_enabled", None)
    if setter is None:
        yield
        return
    torch._C._jit_set_onnx_log_enabled = lambda enabled: None
    try:
        yield
    finally:
        torch._C._jit_set_onnx_log_enabled = setter


_CONVERTING = threading.Lock()  # torch's attention fast-path switch is one flag for the process


@contextlib.contextmanager
def _attention_fastpath_off() -> Any:
    """Trace ``nn.MultiheadAttention`` (and ``nn.TransformerEncoderLayer``) on their standard
    path: without gradients their fused fast path (``aten::_native_multi_head_attention``,
    torchvision's ViTs among others) runs, which the ONNX exporter cannot convert. Both paths
    compute the same attention. The switch is process-wide: conversions in several threads
    take turns (each restores what it found), and meanwhile other threads' attention layers
    compute on the standard path."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    with _CONVERTING:
        was = mha.get_fastpath_enabled()
        mha.set_fastpath_enabled(False)
        try:
            yield
        finally:
            mha.set_fastpath_enabled(was)


def session_options(ort: Any, threads: int | None = None) -> Any:
    """The options of every onnxruntime session transferkit opens: ``threads`` intra-op
    threads (default: torch's thread count), one inter-op thread, no log on stderr (a run
    that fails raises with its message), and no spinning. A spinning session's threads keep
    the cores busy after each run, which slows torch work in the same process: eager, run
    between the runs of a spinning session on 2 cores, took 2.7x as long on a small CNN
    (batch 32, 32 px) and 1.06x on Lite0 (batch 16, 224 px) as between the runs of one that
    does not spin, which biased the engine timing towards ONNX Runtime; without spinning the
    session itself ran 3-8 % slower."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return opts


def check_opset(opset: Any) -> int:
    """``opset`` when torch's TorchScript-based exporter writes it (7 to 20 with torch 2.11), else ConfigError."""
    from torch.onnx import _constants

    lo, hi = _constants.ONNX_MIN_OPSET, getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 17)
    if isinstance(opset, bool) or not isinstance(opset, int) or not lo <= opset <= hi:
        raise ConfigError(f"opset={opset!r} is not an ONNX opset this exporter writes; use {lo} to {hi} (17 by "
                          "default).")
    return opset


# one ONNX file holds at most 2 GiB (protobuf's limit); a larger model needs external data
# files, which transferkit does not write: weights above this (2 GiB less room for the graph)
# are refused before converting
ONNX_MAX_WEIGHT_BYTES = 2**31 - 2**26


def convert_to_onnx(module: nn.Module, example: torch.Tensor, path: str | Path, *, output_name: str,
                    dynamic_axes: dict[str, dict[int, str]], opset: int = 17, constant_folding: bool = True,
                    what: str = "model",
                    hint: str = " Export it without onnx: the TorchScript file runs it as it is.") -> None:
    """``torch.onnx.export`` of ``module`` traced on ``example`` (input named ``"input"``) to
    ``path`` (attention layers on their standard path: `_attention_fastpath_off`), quietly:
    a conversion that fails raises ExportError whose first line says
    which operation failed (the exporter's own message, without its graph dump), then
    ``hint``; a failure to write ``path`` is raised as it is. A module whose weights do not
    fit in one ONNX file (`ONNX_MAX_WEIGHT_BYTES`) is refused before anything is written:
    the exporter would write them as files named after the parameters beside ``path``."""
    size = module_bytes(module)
    if size > ONNX_MAX_WEIGHT_BYTES:
        raise ExportError(f"The {what} holds {size / 2**30:.2f} GiB of weights; one ONNX file holds at most 2 GiB "
                          "(protobuf's limit), and transferkit does not write the external data files that a larger "
                          f"model needs.{hint}")
    try:
        with warnings.catch_warnings(), torch.no_grad(), _exporter_log_off(), _attention_fastpath_off():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter announces its deprecation
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=[output_name], dynamic_axes=dynamic_axes,
                              do_constant_folding=constant_folding)
    except Exception as exc:
        if is_write_failure(exc):  # a full disk or an unwritable folder: the caller's write reports it
            raise
        first = (str(exc).strip().splitlines() or [""])[0].split("  [Caused by")[0].strip()
        raise ExportError(f"The {what} cannot be converted to ONNX (opset {opset}): {type(exc).__name__}: "
                          f"{first[:300]}.{hint}") from exc


def _batches(examples: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [b for ex in examples for b in one_and_many(ex)]


def onnx_digests(proto: Any) -> dict[str, str]:
    """SHA-256 of each initializer (weight), of the nodes in order, and of the graph's
    inputs, outputs and value infos, of a loaded ``onnx.ModelProto``."""
    graph = proto.graph
    out = {f"initializer/{init.name}": hashlib.sha256(init.SerializeToString()).hexdigest()
           for init in graph.initializer}
    for key, items in (("nodes", graph.node), ("io", [*graph.input, *graph.output, *graph.value_info])):
        h = hashlib.sha256()
        for item in items:
            raw = item.SerializeToString()
            h.update(len(raw).to_bytes(8, "little") + raw)
        out[key] = h.hexdigest()
    return out


def _check_finite(who: str, values: np.ndarray, xb: torch.Tensor) -> None:
    if not np.isfinite(values).all():
        raise ExportError(f"The {who} model returns NaN/inf ({int((~np.isfinite(values)).sum())} of {values.size} "
                          f"outputs) for input {tuple(xb.shape)} {xb.dtype}; the ONNX export is refused (nothing was "
                          "written).")


def check_onnx_path(path: str | Path, *, reads: list[tuple[str, Any]] = ()) -> None:
    """ConfigError when ``path`` is an existing file that is not ONNX by its content, which
    writing the ONNX export would destroy, or a file the caller ``reads`` (see `check_export_path`),
    or a TorchScript name (`check_export_names`)."""
    check_export_names(None, path)
    check_output_file(path, flag="The ONNX file path", writes="ONNX file", reads=list(reads), replaceable=holds_onnx)


def export_onnx(model: nn.Module, path: str | Path, *, metadata: dict[str, Any],
                example_inputs: torch.Tensor | Sequence[torch.Tensor], opset: int = 17, atol: float = 1e-4,
                rtol: float = 1e-4) -> ExportReport:
    """Export ``model`` to ONNX with ``metadata``, run the file with onnxruntime and compare it
    with the eager model at batch size 1 and N (tolerance ``atol + rtol * max|eager|``).

    Example:
        >>> import torch, transferkit
        >>> bb = transferkit.get_backbone("tk:small_cnn", weights=None)
        >>> images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
        >>> r = export_onnx(transferkit.build_model(bb, 2), "model.onnx", example_inputs=images,
        ...                 metadata={"labels": ["a", "b"], "input_spec": bb.input_spec.to_dict()})
        >>> r.max_abs_diff <= r.tolerance
        True
    """
    check_tolerances(atol, rtol)
    check_opset(opset)
    check_onnx_path(path)
    onnx, ort = _require_onnx()
    t0 = time.perf_counter()
    examples = parity_examples(example_inputs, metadata)
    if len({x.dtype for x in examples}) > 1:
        raise ExportError(f"An ONNX file takes one input dtype; the example inputs have "
                          f"{sorted({str(x.dtype) for x in examples})}. Pass examples of one dtype (the predictor "
                          "converts uint8 and float images to the file's).")
    eager = eager_copy(model)  # LoRA merged: its float64 scales are gone
    other = next(((n, t.dtype) for n, t in [*eager.named_parameters(), *eager.named_buffers()]
                  if t.is_floating_point() and t.dtype != torch.float32), None)
    if other is not None:  # ONNX Runtime's CPU kernels (Conv among them) are float32: its error names a temp file
        raise ExportError(f"An ONNX export takes a float32 model; this one holds {str(other[1]).replace('torch.', '')} "
                          f"tensors (e.g. {other[0]!r}). Export a float32 copy (copy.deepcopy(model).float()); "
                          "training in bf16 autocast keeps float32 weights already.")
    batches, reference = reference_outputs(eager, [(b, False) for b in _batches(examples)])
    width = int(reference[0].shape[1])
    meta = complete_metadata(metadata, num_outputs=width, fmt=ONNX_FORMAT)
    check_onnx_examples(meta, examples)
    dynamic = {0: "batch"} if examples[0].ndim != 2 else {0: "batch", 1: "time"}
    report = ExportReport(Path(path), "onnx", 0.0, checked_inputs(batches)[0],
                          input_dtypes=(str(examples[0].dtype).replace("torch.", ""),))

    def write(tmp: str) -> None:
        convert_to_onnx(eager, examples[0], tmp, output_name="output", opset=opset,
                        dynamic_axes={"input": dynamic, "output": {0: "batch"}})
        proto = onnx.load(tmp)
        # the graph is checked first, so that the metadata can record its difference (as a
        # TorchScript export's does); the metadata leaves the graph, and so the check, as it is
        session = ort.InferenceSession(tmp, sess_options=session_options(ort), providers=["CPUExecutionProvider"])
        diff, scale = np.zeros(width), np.zeros(width)  # per output
        for xb, out in zip(batches, reference):
            ref = out.double().numpy()
            got = np.asarray(session.run(None, {"input": xb.numpy()})[0], dtype=np.float64)
            if got.shape != ref.shape:
                raise ExportError(f"The ONNX model returns {got.shape} for {tuple(xb.shape)}, eager {ref.shape}.")
            _check_finite("ONNX", got, xb)
            if ref.size:
                diff = np.maximum(diff, np.abs(got - ref).max(axis=0))
                scale = np.maximum(scale, np.abs(ref).max(axis=0))
        if meta.get("task") == "regression":  # outputs in their own units: each checked at its own scale
            diff, tol, j = parity(torch.from_numpy(diff), torch.from_numpy(scale), atol, rtol)
            where = f" in output {j}, checked at its own scale"
        else:
            diff, tol, where = float(diff.max(initial=0.0)), atol + rtol * float(scale.max(initial=0.0)), ""
        if not diff <= tol:
            raise ExportError(f"The ONNX model differs from the eager model by {diff:.3g}{where} under onnxruntime "
                              f"(> tolerance {tol:.3g}); the file was not written.")
        report.max_abs_diff, report.tolerance = diff, tol
        meta["export"] = {"mode": "onnx", "opset": opset, "max_abs_diff": diff, "atol": atol,
                          "rtol": rtol, "batch_sizes": list(report.batch_sizes),
                          "input_dtypes": list(report.input_dtypes), "runtime": f"onnxruntime {ort.__version__}"}
        meta["integrity"], records = records_entry(onnx_digests(proto))
        for key, value in encode_metadata(meta, records).items():
            proto.metadata_props.add(key=key, value=value)
        onnx.save(proto, tmp)
        read_onnx_metadata(tmp, _source=repr(str(path)))  # the written file passes its own checks

    check_free_space(path, 2 * module_bytes(eager), what="ONNX export")  # the file, then its re-save
    with file_lock(path, what="ONNX export"):
        atomic_write(path, write, what="ONNX export")
    report.seconds = time.perf_counter() - t0
    return report


def read_onnx_metadata(path: str | Path, *, _source: str | None = None) -> dict[str, Any]:
    """The validated transferkit metadata of an ONNX export; the digests of its weights,
    nodes and inputs/outputs are checked too (a damaged file raises CorruptExportError)."""
    source = _source or repr(str(path))
    check_model_file(path, source=source, kind="ONNX")  # a missing file is said before a missing package
    onnx, _ = _require_onnx("Reading an ONNX file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ExportError(f"Cannot read {source} as ONNX (truncated, corrupt or not ONNX): {type(exc).__name__}: "
                          f"{exc}") from exc
    props = {p.key: p.value for p in proto.metadata_props}
    if METADATA_FILE not in props and DIGEST_FILE not in props:
        raise ExportError(f"{source} is ONNX but has no transferkit metadata.")
    meta = decode_metadata(props, source=source, fmt=ONNX_FORMAT)
    if "integrity" in meta:
        check_records(props.get(RECORDS_FILE, ""), meta["integrity"], onnx_digests(proto), source=source,
                      error=ExportError)
    else:
        warn(f"{source} has no content digest (an export from an older transferkit): its weights cannot "
             "be checked for damage. Re-export it to add one.")
    return meta


_ONNX_DTYPES = {"tensor(uint8)": torch.uint8, "tensor(float)": torch.float32, "tensor(float16)": torch.float16,
                "tensor(double)": torch.float64}


class OnnxRunner:
    """An ONNX export run by onnxruntime, called like the TorchScript module it stands in for
    (``runner(x) -> torch.Tensor``), so a [`Predictor`][transferkit.Predictor] serves either."""

    def __init__(self, session: Any, device: torch.device, source: str) -> None:
        self.session, self.device, self.source = session, device, source
        first = session.get_inputs()[0]
        self.input_name, self.input_shape = first.name, list(first.shape)
        self.input_dtype = _ONNX_DTYPES.get(first.type)
        self.providers = session.get_providers()

    def eval(self) -> OnnxRunner:
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = self._as_input(x.detach().cpu())
        return torch.from_numpy(np.asarray(self.session.run(None, {self.input_name: x.contiguous().numpy()})[0]))

    def _as_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the dtype the file takes (a TorchScript export takes uint8 or float images;
        an ONNX graph only the dtype it was exported with): float images in [0, 1] become uint8
        (rounded: at most half a grey level from the float values), uint8 images become float
        in [0, 1]."""
        want = self.input_dtype
        if want is None or x.dtype == want:
            return x
        if want == torch.uint8 and x.is_floating_point():
            return (x.float() * 255.0).round_().clamp_(0, 255).to(torch.uint8)
        if want.is_floating_point and x.dtype == torch.uint8:
            return x.to(want) / 255.0
        if want.is_floating_point and x.is_floating_point():
            return x.to(want)
        raise ExportError(f"{self.source} takes {want} input, got {x.dtype}.")


def load_onnx(path: str | Path, *, device: torch.device | str = "cpu",
              threads: int | None = None) -> tuple[OnnxRunner, dict[str, Any]]:
    """An ONNX export (its metadata and digests checked, see `read_onnx_metadata`) as an
    onnxruntime session on ``device`` (the CPU provider, or CUDA where onnxruntime has it),
    with ``threads`` intra-op threads (default: torch's thread count)."""
    device = torch.device(device)
    check_model_file(path, source=repr(str(path)), kind="ONNX")  # a missing file is said before a missing package
    _, ort = _require_onnx("Running an ONNX file")
    meta = read_onnx_metadata(path)
    provider = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}.get(device.type)
    if provider not in ort.get_available_providers():
        raise ExportError(f"onnxruntime {ort.__version__} cannot run {str(path)!r} on {device}: it has the providers "
                          f"{', '.join(ort.get_available_providers())}; load it with device='cpu' (or install "
                          "onnxruntime-gpu).")
    try:
        session = ort.InferenceSession(str(path), sess_options=session_options(ort, threads), providers=[provider])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a graph it cannot run
        raise ExportError(f"onnxruntime {ort.__version__} cannot open {str(path)!r}: {exception_line(exc)}. The file "
                          "was changed where its digests do not reach (e.g. its opset), or needs another onnxruntime; "
                          "export it again.") from exc
    runner = OnnxRunner(session, device, repr(str(path)))
    mismatch = _size_mismatch(meta["input_spec"], runner.input_shape)
    if mismatch:
        raise ExportError(f"{str(path)!r} takes {mismatch} but its metadata says image_size "
                          f"{meta['input_spec'].get('image_size')}: the model and its metadata do not belong "
                          "together. Re-export the model.")
    return runner, meta


def check_onnx_examples(metadata: dict[str, Any], examples: torch.Tensor | Sequence[torch.Tensor]) -> None:
    """Raise ExportError unless every image example is ``image_size`` square, as the ONNX graph
    needs: it keeps the traced height and width, and the predictor resizes to ``image_size``
    (a TorchScript export takes any size)."""
    spec = metadata.get("input_spec") if isinstance(metadata, dict) else None
    if not isinstance(spec, dict):  # missing or malformed: the metadata's validation says so
        return
    for x in example_list(examples):
        mismatch = _size_mismatch(spec, list(x.shape))
        if mismatch:
            size = int(spec.get("image_size", 224))
            default = "" if "image_size" in spec else " (the default)"
            raise ExportError(f"An ONNX file takes images of one size; the examples include {mismatch} but the "
                              f"metadata's input_spec.image_size is {size}{default}. Pass examples of {size}x{size} "
                              "(or metadata with the examples' size).")


def _size_mismatch(spec: dict[str, Any], shape: Sequence[Any]) -> str | None:
    """``"HxW images"`` when an ONNX graph's fixed image input ``shape`` is not the square of
    the input spec's ``image_size`` (the size the predictor resizes to), else None."""
    if spec.get("kind", "image") != "image" or len(shape) != 4 or not isinstance(shape[2], int):
        return None
    size = int(spec.get("image_size", 224))
    return None if list(shape[2:]) == [size, size] else f"{shape[2]}x{shape[3]} images"


def export_files(model: nn.Module, path: str | Path, *, onnx: str | Path | None, metadata: dict[str, Any],
                 example_inputs: torch.Tensor | Sequence[torch.Tensor], **export_kwargs: Any) -> list[ExportReport]:
    """The verified TorchScript export of ``model`` at ``path`` and, when ``onnx`` is a path,
    the ONNX export there, checked with the same ``atol`` and ``rtol`` (``export_kwargs`` go
    to [`export_torchscript`][transferkit.export_torchscript]). Returns the reports,
    TorchScript first. When one of the two files cannot be written, the other is still
    written, and the error says which file is on disk and checked."""
    if onnx is not None and same_file(onnx, path):
        raise ConfigError(f"The ONNX export {str(onnx)!r} and the TorchScript export {str(path)!r} are one file; "
                          "give the ONNX file its own name.")
    check_export_names(path, onnx)
    if onnx is None:
        return [export_torchscript(model, path, metadata=metadata, example_inputs=example_inputs, **export_kwargs)]
    check_onnx_examples(metadata, example_inputs)  # before either file is written
    check_export_path(path)
    check_onnx_path(onnx)
    tol = {k: export_kwargs[k] for k in ("atol", "rtol") if k in export_kwargs}
    try:
        script = export_torchscript(model, path, metadata=metadata, example_inputs=example_inputs, **export_kwargs)
    except (ExportError, OutputError) as exc:  # a model TorchScript cannot hold may still convert to ONNX
        try:
            export_onnx(model, onnx, metadata=metadata, example_inputs=example_inputs, **tol)
        except (ExportError, OutputError) as onnx_exc:
            raise type(exc)(f"Neither export was written. TorchScript {str(path)!r}: {exc} ONNX {str(onnx)!r}: "
                            f"{onnx_exc}") from exc
        raise _one_written(exc, ("ONNX", onnx), ("TorchScript", path)) from exc
    try:
        return [script, export_onnx(model, onnx, metadata=metadata, example_inputs=example_inputs, **tol)]
    except (ExportError, OutputError) as exc:
        raise _one_written(exc, ("TorchScript", path), ("ONNX", onnx)) from exc


def _one_written(exc: Exception, written: tuple[str, Any], failed: tuple[str, Any]) -> Exception:
    """``exc``'s kind of error, saying which of the two export files is on disk."""
    return type(exc)(f"The {written[0]} export {str(written[1])!r} is written and checked; the {failed[0]} export "
                     f"{str(failed[1])!r} is not: {exc}")

