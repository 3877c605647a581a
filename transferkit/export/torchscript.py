"""TorchScript export: one self-contained file, verified against the eager model."""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferkit._io import atomic_write
from transferkit.errors import ExportError

METADATA_FILE = "transferkit.json"
FORMAT = "transferkit.torchscript/1"


@dataclass
class ExportReport:
    path: Path
    mode: str
    max_abs_diff: float
    batch_sizes: tuple[int, ...]


def _to_script(model: nn.Module, example: torch.Tensor) -> tuple[torch.jit.ScriptModule, str]:
    try:
        return torch.jit.script(model), "script"
    except Exception as exc:  # scripting fails on some third-party modules; tracing is the fallback
        warnings.warn(f"torch.jit.script failed ({type(exc).__name__}: {str(exc).splitlines()[0]}); falling back to "
                      "torch.jit.trace. A traced model replays the control flow seen on the example input only: "
                      "inputs of other shapes may behave differently. The export is still checked for parity.",
                      stacklevel=3)
        with torch.no_grad():
            return torch.jit.trace(model, example, check_trace=False), "trace"


def export_torchscript(model: nn.Module, path: str | Path, *, metadata: dict[str, Any], example_inputs: torch.Tensor,
                       atol: float = 1e-5) -> ExportReport:
    """Script ``model`` (trace as fallback), save it with ``metadata`` as JSON in the file,
    reload it from disk and compare with the eager model on ``example_inputs`` at batch
    size 1 and N. Raises ExportError beyond ``atol``; the file at ``path`` is then untouched.

    Example:
        >>> report = export_torchscript(model, "model.pt", metadata={"labels": ["a", "b"]},
        ...                             example_inputs=images)  # doctest: +SKIP
    """
    if example_inputs.ndim < 2 or example_inputs.shape[0] < 1:
        raise ExportError("example_inputs must be a batch [N, ...] with N >= 1 of real inputs.")
    eager = copy.deepcopy(model).cpu().eval()
    example = example_inputs.cpu()
    meta = {"format": FORMAT, "torch_version": torch.__version__, **metadata}
    try:
        meta_json = json.dumps(meta, indent=1, sort_keys=True)
    except TypeError as exc:
        raise ExportError(f"Export metadata must be JSON-serialisable: {exc}") from exc
    scripted, mode = _to_script(eager, example[:1])
    batches = (example[:1], example) if example.shape[0] > 1 else (example,)
    result: dict[str, float] = {}

    def write(tmp: str) -> None:
        torch.jit.save(scripted, tmp, _extra_files={METADATA_FILE: meta_json})
        reloaded = torch.jit.load(tmp, map_location="cpu")
        diff = 0.0
        with torch.no_grad():
            for xb in batches:
                a, b = eager(xb), reloaded(xb)
                if a.shape != b.shape:
                    raise ExportError(f"Exported model returns shape {tuple(b.shape)}, eager {tuple(a.shape)}.")
                diff = max(diff, (a.float() - b.float()).abs().max().item())
        if not diff <= atol:
            raise ExportError(f"The exported model differs from the eager model by {diff:.3g} (> tolerance {atol:g}) "
                              f"in {mode} mode; the file was not written.")
        result["diff"] = diff

    atomic_write(path, write)
    return ExportReport(Path(path), mode, result["diff"], tuple(int(b.shape[0]) for b in batches))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Read the JSON metadata of an exported file without running it."""
    module, meta = load_scripted(path)
    return meta


def load_scripted(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Load an exported file; raise ExportError when it or its metadata is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"Model file {str(path)!r} does not exist.")
    extra = {METADATA_FILE: ""}
    try:
        module = torch.jit.load(str(path), map_location=map_location, _extra_files=extra)
    except Exception as exc:
        raise ExportError(f"Cannot load {str(path)!r} as TorchScript (truncated, or not a transferkit export): "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    raw = extra[METADATA_FILE]
    if not raw:
        raise ExportError(f"{str(path)!r} is TorchScript but has no transferkit metadata ({METADATA_FILE}); "
                          "export it with transferkit.export_torchscript or finetune(export=...).")
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ExportError(f"The metadata in {str(path)!r} is corrupt (not valid JSON: {exc}).") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("labels"), list) or "input_spec" not in meta:
        raise ExportError(f"The metadata in {str(path)!r} lacks 'labels' or 'input_spec'; it was not written "
                          "by transferkit or was edited by hand.")
    return module, meta
