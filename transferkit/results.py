"""What a finished run can still do, behind [`FinetuneResult`][transferkit.FinetuneResult]'s methods:
a verified export after the fact (with the metadata the run's own export carries),
predictions from the trained model with the semantics of an exported file, and the short
summary people read at the end of a run (the CLI prints it on a terminal).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferkit._io import check_writable
from transferkit._text import number, plural
from transferkit.decisions import Decisions
from transferkit.errors import ConfigError
from transferkit.export import Predictor
from transferkit.export.torchscript import ExportReport
from transferkit.outputs import check_not_data
from transferkit.run import Run
from transferkit.steps import example_inputs, export_metadata, metadata, weights_epoch


def _decided(decisions: Any, run: Any = None, *, need_run: bool = False) -> None:
    if decisions is None or (need_run and run is None):
        raise ConfigError("This FinetuneResult carries no decisions and run (it was not returned by finetune()), so "
                          "its model's labels, input and preprocessing are unknown.")


def export_result(model: nn.Module, decisions: Decisions | None, run: Run | None, best: dict[str, Any],
                  epochs: int, path: str | Path, *, onnx: bool | str | Path = False, optimize: bool = False,
                  mode: str = "auto", atol: float = 1e-5, rtol: float = 1e-5) -> list[ExportReport]:
    """Export the trained ``model`` to a verified TorchScript file at ``path`` (and to ONNX: at
    ``onnx`` when it is a path, beside ``path`` with the suffix ``.onnx`` when True), with
    the metadata ``finetune(export=...)`` writes (labels, input, task, decisions, best epoch, and
    the epoch whose weights ``model`` holds after ``epochs`` epochs), the parity check run on
    real validation inputs. Returns the reports (TorchScript first)."""
    _decided(decisions, run, need_run=True)
    onnx_path = Path(path).with_suffix(".onnx") if onnx is True else (Path(onnx) if onnx else None)
    for key in ("data", "val_data"):  # a path inside the data that names one of its files would replace it
        for flag, target in (("export", Path(path)), ("onnx", onnx_path)):
            if target is not None:
                check_not_data(target, getattr(decisions.config, key), flag=flag, what=key)
    check_writable(path, what="export")  # before any work
    if onnx_path is not None:
        check_writable(onnx_path, what="ONNX export")
    meta, examples = export_metadata(decisions, best, epochs), example_inputs(decisions, run)
    from transferkit.export.onnx import export_files

    return export_files(model, path, onnx=onnx_path, metadata=meta, example_inputs=examples, mode=mode,
                        optimize=optimize, atol=atol, rtol=rtol)


def result_predictor(model: nn.Module, decisions: Decisions | None) -> Predictor:
    """A [`Predictor`][transferkit.Predictor] over the trained ``model`` in memory: the inputs,
    the preprocessing, the outputs and the failure handling of ``transferkit.load(export)``.
    The model is put in eval mode."""
    _decided(decisions)
    device = next(model.parameters(), torch.empty(0)).device
    return Predictor(model, metadata(decisions), device=device, source="the trained model")


def result_record(result: Any) -> dict[str, Any]:
    """The run's outcome as plain JSON data (what ``transferkit finetune`` prints when piped)."""
    rep = result.export_report
    return {"best": result.best,
            "metrics": result.metrics,  # per class or output, and the confusion matrix, as `evaluate --json`
            "export": str(result.export_path) if result.export_path else None,
            "export_check": None if rep is None else {"max_abs_diff": rep.max_abs_diff, "tolerance": rep.tolerance,
                                                      "batch_sizes": list(rep.batch_sizes)},
            "checkpoint": str(result.checkpoint_path) if result.checkpoint_path else None,
            "plots": {k: str(v) for k, v in result.plots.items()},
            "bad_files": len(result.data_report.bad_files), "warnings": list(result.data_report.warnings),
            "features": result.feature_report,
            # the engine of the frozen feature pass, as the plan decided it (None: no cached pass)
            "feature_engine": result.decisions.engine if result.decisions.cached_epochs else None,
            "compile_trial": result.compile_trial, "seconds": round(result.timings.get("total_s", 0), 1)}


def _score(values: dict[str, Any]) -> str:
    return ", ".join(f"{k} {number(v)}" for k, v in values.items() if isinstance(v, float))


def result_summary(result: Any) -> str:
    """A few lines for people: the best epoch and its scores, the final metrics, each file
    written (the export with its parity check), files left out."""
    best = result.best or {}
    n = len(result.history)
    resumed = result.decisions is not None and result.decisions.config.resume
    path_of = _relative if resumed else str  # a resume holds the absolute paths of the first run
    probe = result.metrics.get("probe") if isinstance(result.metrics, dict) else None
    trained = (f"a logistic probe, C={probe['C']:g} the best of {len(probe['val_acc_by_C'])} tried"
               if isinstance(probe, dict) and "C" in probe else plural(n, "epoch"))
    head = f"finished in {result.timings.get('total_s', 0):.1f}s: {trained}"
    if result.stopped_early:
        head += " (stopped early)"
    if best.get("epoch") is not None:
        head += f", best epoch {best['epoch']} ({_score({k: v for k, v in best.items() if k != 'epoch'})})"
        if result.decisions is not None and weights_epoch(result.decisions, best, n) != best["epoch"]:
            head += f"; the model holds epoch {n}'s weights (restore_best=False)"
    lines = [head]
    names = {"accuracy": "accuracy", "macro_f1": "macro F1", "balanced_accuracy": "balanced accuracy",
             "mse": "MSE", "mae": "MAE", "r2": "R^2", "subset_accuracy": "subset accuracy",
             "label_accuracy": "label accuracy", "micro_f1": "micro F1"}
    shown = [f"{label} {number(result.metrics[k])}" for k, label in names.items()
             if isinstance(result.metrics.get(k), float)]
    if shown:
        lines.append("  final:      " + ", ".join(shown))
    rep = result.export_report
    if rep is not None:
        lines.append(f"  export:     {path_of(rep.path)} (verified after reloading: max |exported - eager| "
                     f"{rep.max_abs_diff:.2g} <= {rep.tolerance:.2g} at batch sizes "
                     f"{', '.join(map(str, rep.batch_sizes))})")
    else:
        lines.append("  export:     none written")
    if result.checkpoint_path is not None:
        lines.append(f"  checkpoint: {path_of(result.checkpoint_path)}")
    trial = result.compile_trial or {}
    if "speedup" in trial:  # a compilation was tried: what it gave
        then = f"; eager from step {trial['eager_from_step']}" if "eager_from_step" in trial else ""
        lines.append(f"  compile:    {trial['kept']}, {trial['speedup']:.2f}x the eager step after "
                     f"{trial['compile_s']:.0f} s of compilation{then}")
    if result.plots:
        folders = {path_of(Path(p).parent) for p in result.plots.values()}
        where = f"{folders.pop()}/ " if len(folders) == 1 else ""
        lines.append(f"  plots:      {where}({', '.join(Path(p).name for p in result.plots.values())})")
    bad = len(result.data_report.bad_files)
    if bad:
        lines.append(f"  left out:   {plural(bad, 'bad file')} (named in the warnings above)")
    return "\n".join(lines)


def _relative(path: str | Path) -> str:
    """``path`` relative to the working directory where it lies under it (a resumed run holds
    the absolute paths that the first run may have been given as relative ones)."""
    path = str(path)
    if os.path.isabs(path):
        with contextlib.suppress(ValueError):
            rel = os.path.relpath(path)
            if not rel.startswith(os.pardir):
                return rel
    return path
