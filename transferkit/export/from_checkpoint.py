"""Rebuild a model from a transferkit checkpoint and export it (``transferkit export``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferkit.backbones._base import InputSpec
from transferkit.backbones.weights import load_into
from transferkit.config import portable_decisions
from transferkit.errors import ConfigError, DataError, ExportError, UnknownBackboneError, WeightsError, warn
from transferkit.lora import fold_lora_state
from transferkit.model import build_model
from transferkit.backbones import get_backbone
from transferkit.checkpoints import load_checkpoint, saved_run
from transferkit._io import check_writable, same_file
from transferkit._text import expand_home, file_reason, plural
from transferkit.export.inputs import InputPipeline
from transferkit.export.torchscript import ExportReport, check_export_path, check_tolerances


def model_from_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the trained model of a checkpoint written by ``finetune(checkpoint=...)``
    (or `transferkit.train.save_checkpoint`) from its metadata: the run's stored decisions
    (backbone, head, outputs), input spec and labels; the weights are loaded strictly.

    Example:
        >>> model, meta = model_from_checkpoint("run.pt")  # doctest: +SKIP
    """
    ckpt = load_checkpoint(path)
    meta = ckpt["transferkit"]
    where = f"checkpoint {str(path)!r}"
    decisions = meta.get("decisions") if isinstance(meta, dict) else None
    decisions = decisions if isinstance(decisions, dict) else {}
    training = meta.get("training") if isinstance(meta, dict) else None
    backbone_name = decisions.get("backbone") or (training or {}).get("backbone")
    if not isinstance(backbone_name, str):
        raise ExportError(f"The {where} does not record its backbone (metadata 'decisions.backbone' or "
                          "'training.backbone'); it cannot be rebuilt. Export the model in Python with "
                          "transferkit.export_torchscript(model, ...).")
    for key in ("labels", "input_spec"):
        if key not in meta:
            raise ExportError(f"The {where} lacks metadata {key!r}; it cannot be exported on its own.")
    head = _head_config(meta)
    spec = InputSpec.from_dict(meta["input_spec"])
    num_outputs = int(decisions.get("num_outputs") or meta.get("num_outputs") or len(meta["labels"]))
    options, options_hint = _backbone_options(meta, where)
    try:
        backbone = get_backbone(backbone_name, weights=None, **(options or {}))
    except UnknownBackboneError as exc:
        if ":" in backbone_name:  # a source's name this environment cannot build (another timm, say): its reason
            raise ExportError(f"The {where} was trained with the backbone {backbone_name!r}, which cannot be built "
                              f"here: {exc}") from None
        raise ExportError(f"The {where} was trained with the backbone {backbone_name!r}, which no registered source "
                          "builds (a backbone made with from_module or by hand: the checkpoint holds its weights, "
                          "not its code), so it cannot be rebuilt from the checkpoint. In Python, build that backbone "
                          f"again, then model = transferkit.build_model(backbone, {num_outputs}), load the "
                          "checkpoint's 'model' weights into it, and export it with "
                          "transferkit.export_torchscript(model, ...).") from None
    model = build_model(backbone, num_outputs, spec=spec, head_hidden=head["hidden"],
                        head_activation=head["activation"], head_dropout=head["dropout"], head_norm=head["norm"],
                        target_norm=head["target_norm"])
    hint = "" if head["recorded"] else " (the checkpoint records no head configuration, so a linear head was assumed)"
    try:
        load_into(model, fold_lora_state(ckpt["model"], source=f"The weights of {where}"), strict=True,
                  source=f"The weights of {where}{hint}")  # a LoRA run's unfinished checkpoint holds its factors
    except WeightsError as exc:
        raise WeightsError(f"{exc} {options_hint}") from exc
    if options is None:
        warn(f"{options_hint} Export the trained model in Python with transferkit.export_torchscript("
             "model, ...) unless the run's backbone had its default options.")
    return model.eval(), meta


def _warn_unfinished(checkpoint: str | Path) -> int | None:
    """Warn when ``checkpoint`` holds an unfinished run: its weights are the last completed
    epoch's, not the best epoch's that the finished run would have restored. Returns that
    epoch, or None for another checkpoint."""
    found = saved_run(checkpoint)
    if found is None or found[0] != "checkpoint" or found[1]["complete"] or not found[1]["resumable"]:
        return None  # a finished run's, or weights saved when a write failed (nothing to finish)
    info = found[1]
    best = info["best"].get("epoch")
    but = f", not the best epoch so far ({best})" if best not in (None, info["epoch"]) else ""
    warn(f"{str(checkpoint)!r} holds an unfinished run (epoch {info['epoch']} of {info['epochs']}): the "
         f"export holds epoch {info['epoch']}'s weights{but}. Finish the run (transferkit.resume("
         f"{str(checkpoint)!r})) to export what it returns.")
    return int(info["epoch"])


def _backbone_options(meta: dict[str, Any], where: str) -> tuple[dict[str, Any] | None, str]:
    """The ``backbone_options`` the checkpoint's run built its backbone with (the stored
    configuration, ``decisions.config``; a Backbone object's, ``decisions.backbone_options``;
    else ``training.backbone_options`` of metadata written by hand; None: not recorded) and a
    sentence on them for a weights mismatch. Options stored only as a type name (a Python
    object such as a function) cannot be rebuilt: an ExportError says so."""
    decisions = meta.get("decisions") if isinstance(meta.get("decisions"), dict) else {}
    config = decisions.get("config") if isinstance(decisions.get("config"), dict) else {}
    training = meta.get("training") if isinstance(meta.get("training"), dict) else {}
    if isinstance(config.get("backbone"), str) and not _is_type_name(config["backbone"]):
        options = config.get("backbone_options")
    elif isinstance(decisions.get("backbone_options"), dict):  # a Backbone object's, as get_backbone built it
        options = decisions["backbone_options"]
    elif "backbone_options" in training:
        options = training["backbone_options"]
    else:  # options that keep the weights' shapes (a spectrogram's hop_length) would be lost without a word
        return None, (f"The {where} records no backbone_options (its run was given a backbone built without "
                      "get_backbone, or by an older transferkit, or its metadata was written by hand), so the "
                      "backbone was rebuilt with its default options, which may compute differently from the "
                      "run's even where the weights fit (the export's check compares the rebuilt model with itself).")
    options = options if isinstance(options, dict) else {}
    objects = _type_names(options)
    if objects:
        raise ExportError(f"The {where} records backbone_options that were Python objects ({', '.join(objects)}), "
                          "kept only as their type names; the backbone cannot be rebuilt from them. Export the "
                          "trained model in Python with transferkit.export_torchscript(model, ...).")
    return options, f"The backbone was rebuilt with the run's recorded backbone_options {options!r}."


def _is_type_name(value: Any) -> bool:
    """Whether ``value`` is how stored metadata writes a Python object: ``"<TypeName>"``."""
    return isinstance(value, str) and len(value) > 2 and value[0] == "<" and value[-1] == ">" and \
        value[1:-1].isidentifier()


def _type_names(value: Any, where: str = "") -> list[str]:
    """The places in ``value`` (nested dicts and lists) that hold a type name, as ``key=<TypeName>``."""
    if isinstance(value, dict):
        return [hit for k, v in value.items() for hit in _type_names(v, f"{where}.{k}" if where else str(k))]
    if isinstance(value, list):
        return [hit for i, v in enumerate(value) for hit in _type_names(v, f"{where}[{i}]")]
    return [f"{where}={value}"] if _is_type_name(value) else []


def _head_config(meta: dict[str, Any]) -> dict[str, Any]:
    """The head a checkpoint's run decided (``decisions.head``: hidden widths, activation,
    dropout, norm, target_norm), else ``training.head`` (metadata written by hand), else a linear head."""
    decisions = meta.get("decisions") if isinstance(meta.get("decisions"), dict) else {}
    head = decisions.get("head")
    if not isinstance(head, dict):
        head = (meta.get("training") or {}).get("head")
    if isinstance(head, dict):
        return {"hidden": tuple(int(h) for h in head.get("hidden", ())), "activation": head.get("activation", "relu"),
                "dropout": float(head.get("dropout", 0.0)), "norm": bool(head.get("norm", False)),
                "target_norm": bool(head.get("target_norm", False)), "recorded": True}
    return {"hidden": (), "activation": "relu", "dropout": 0.0, "norm": False, "target_norm": False, "recorded": False}


def example_batch(spec: InputSpec, *, examples: str | Path | None = None, n: int = 8,
                  seed: int = 0) -> tuple[torch.Tensor, str]:
    """Inputs for the parity check: up to ``n`` files from the folder ``examples``
    (preprocessed as the predictor does), or seeded random ones; returns the batch and a
    description of where it came from."""
    pipe = InputPipeline(spec)
    if examples is not None:
        files, skipped = [], []
        for f in pipe.list_files(examples):
            if len(files) == n:
                break
            try:
                pipe.batch([f])
                files.append(f)
            except DataError as exc:  # an unreadable example is skipped: the check needs readable ones
                skipped.append(f"{f} ({file_reason(exc)})")
        if not files:
            raise DataError(f"None of the {spec.kind} files under {str(examples)!r} could be read, e.g. "
                            f"{skipped[0]}.")
        left = f" ({plural(len(skipped), 'unreadable file')} skipped, e.g. {skipped[0]})" if skipped else ""
        return pipe.batch(files), f"{len(files)} {spec.kind} files from {str(examples)!r}{left}"
    g = torch.Generator().manual_seed(seed)
    if spec.kind == "audio":
        length = int(round((spec.clip_seconds or 1.0) * int(spec.sample_rate or 16000)))
        waves = [torch.rand(length if i % 2 == 0 else length // 2, generator=g) * 0.2 - 0.1 for i in range(n)]
        return pipe.batch(waves), f"{n} random waveforms (pass examples= for real inputs)"
    size = spec.image_size
    batch = torch.randint(0, 256, (n, spec.channels, size, size), dtype=torch.uint8, generator=g)
    return batch, f"{n} random uint8 images (pass examples= for real inputs)"


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, examples: str | Path | None = None,
                      num_examples: int = 8, onnx: str | Path | None = None,
                      **export_kwargs: Any) -> tuple[list[ExportReport], str]:
    """Export a checkpoint to a verified TorchScript file (and an ONNX file when ``onnx`` is
    a path); returns the reports and a line saying which inputs the parity checks used.
    ``export_kwargs`` go to [`export_torchscript`][transferkit.export_torchscript] (``optimize``, ``mode``,
    ``atol``, ``rtol``).

    Example:
        >>> reports, origin = export_checkpoint("run.pt", "model.pt", examples="images/val")  # doctest: +SKIP
    """
    from transferkit.export.onnx import check_onnx_path, export_files

    checkpoint, examples = expand_home(checkpoint), expand_home(examples)  # as resume and load read them
    check_writable(out, what="export")  # before any work: a folder or a read-only place says so at once
    if onnx is not None:
        check_writable(onnx, what="ONNX export")
    for name, path, check in (("TorchScript export", out, check_export_path), ("ONNX file", onnx, check_onnx_path)):
        if path is not None and same_file(path, checkpoint):
            raise ConfigError(f"The {name} path {str(path)!r} is the checkpoint being exported: writing it would "
                              "replace the checkpoint. Give another output path.")
        if path is not None:  # nor an image of the examples, nor any file that is not an earlier export
            check(path, reads=[("examples", examples)])
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise ConfigError(f"num_examples={num_examples!r} is out of range; expected a positive integer (inputs of "
                          "the parity check).")
    check_tolerances(export_kwargs.get("atol", 1e-5), export_kwargs.get("rtol", 1e-5))
    model, meta = model_from_checkpoint(checkpoint)
    held = _warn_unfinished(checkpoint)
    batch, origin = example_batch(InputSpec.from_dict(meta["input_spec"]), examples=examples, n=num_examples)
    keep = {k: v for k, v in meta.items() if k not in ("format", "num_outputs", "torch_version", "export")}
    decisions = keep.get("decisions")
    if isinstance(decisions, dict) and (decisions.get("config") or {}).get("portable_metadata", True):
        keep["decisions"] = portable_decisions(decisions)  # as finetune(export=) records them: no machine paths
    if held is not None:  # an unfinished run's: its last completed epoch
        keep["training"] = {**(keep.get("training") or {}), "weights_epoch": held}
    return export_files(model, out, onnx=onnx, metadata=keep, example_inputs=batch, **export_kwargs), origin
