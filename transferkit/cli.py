"""The ``transferkit`` command line: ``finetune``, ``lr-find``, ``predict``, ``evaluate``, ``export``,
``inspect``, ``backbones``, ``demo``.

``--help`` answers without importing torch: each command imports what it needs when it runs.

Every failure transferkit can explain exits with status 2 and one line on stderr
(``transferkit: error: ...``), like argparse's own usage errors.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import sys
import textwrap
import traceback
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from transferkit.errors import TransferkitError, warn
from transferkit._text import file_reason, hide_secrets, hide_secrets_in, plural, printable, strict_json
from transferkit.helpformat import (HELP, MAX_PIXELS_HELP, Parser, one_line, one_line_warnings, pixel_limit,
                                   positive_whole_number, set_pixel_limit)
from transferkit.schedules import LRRange
from transferkit.spelling import cli_spelling, drop_python_asides, flag, shell_word




def _cmd_demo(args: argparse.Namespace) -> int:
    from transferkit.demo import readme_parts, run_demo, update_readme

    if args.update_readme:
        readme_parts(args.update_readme)  # a README that cannot be updated is said before the demo runs
    summary = run_demo(out_dir=args.out, quick=args.quick)
    if args.update_readme:
        update_readme(args.update_readme, summary)
        print(f"updated the demo table in {args.update_readme}")
    return 0


def _cmd_backbones(args: argparse.Namespace) -> int:
    from transferkit.backbones import list_backbones

    names = list_backbones(args.pattern)
    for name in names:
        print(name)
    if not names:
        print(f"transferkit: no backbone matches {shell_word(args.pattern)}; `transferkit backbones` lists them all",
              file=sys.stderr)
        return 1
    return 0


def _expand_inputs(predictor, inputs: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Files stay as given; a folder stands for every file of the model's input kind below it;
    a pattern that no file is named (``'imgs/*.png'``, quoted, so the shell did not expand it;
    a shell that does not expand patterns) stands for the files it matches, sorted. Returns the
    files and ``(folder or pattern, why)`` for each that gives none (an error when no input
    gives a file: nothing to predict)."""
    import glob

    from transferkit.errors import DataError

    out: list[str] = []
    empty: list[tuple[str, str]] = []
    items: list[str] = []
    for item in inputs:
        matched = sorted(glob.glob(item, recursive=True)) \
            if not os.path.lexists(item) and glob.has_magic(item) else [item]
        if not matched and len(inputs) == 1:
            raise DataError(f"No file matches the pattern {item!r}.")
        empty += [] if matched else [(item, f"no file matches {item!r}")]
        items += matched
    for item in items:
        if not Path(item).is_dir():
            out.append(item)
            continue
        try:
            out += predictor.inputs.list_files(item)
        except DataError as exc:
            if len(items) == 1:
                raise
            empty.append((item, file_reason(exc)))
    if not out:
        raise DataError(f"No input to predict: {'; '.join(why for _, why in empty)}")
    return out, empty


def _listed(labels: list[str]) -> str:
    """Labels joined by commas, each quoted where one of them holds a comma (else 'a, b' reads as two)."""
    return ", ".join(map(repr, labels) if any("," in lab for lab in labels) else labels)


def _cmd_predict(args: argparse.Namespace) -> int:
    from transferkit.export import load

    predictor = load(args.model, device=args.device)
    files, empty = _expand_inputs(predictor, args.inputs)
    preds: list = []  # every prediction written, for the failures listed at the end

    def written() -> Iterator:  # each batch written as it comes: an interrupted run keeps what it wrote
        for p in predictor.iter_predict(files, top_k=args.top_k, batch_size=args.batch_size, threshold=args.threshold,
                                        progress=None if not args.json else False):
            preds.append(p)
            yield p
    stream = written()
    if args.json:
        print(strict_json([p.to_dict() for p in stream], indent=1))
    elif args.csv:
        _write_csv(stream, predictor.labels, predictor.task, args.top_k)
    else:
        for p in stream:
            print(f"{printable(str(p.source))}\t{p if p.ok else drop_python_asides(str(p))}")  # a line per input
    failed = [(p.source, file_reason(drop_python_asides(p.error))) for p in preds if not getattr(p, "ok", True)] + empty
    on_screen = not args.json and not args.csv and sys.stdout.isatty()  # each prediction's line shows its error
    for source, why in (empty if on_screen else failed):  # the reason alone: training advice does not apply here
        print(f"transferkit: warning: {printable(str(source))}: {why}", file=sys.stderr)
    if failed:
        print(f"transferkit: error: {len(failed)} of {len(preds) + len(empty)} inputs could not be predicted "
              "(listed above)", file=sys.stderr)
        return 1
    return 0


def _write_csv(preds: Iterable, labels: list[str], task: str, top_k: int) -> None:
    """One row per input: ``path``, then ``label,probability`` (and ``label_2,probability_2``
    .. up to ``top_k``; multilabel adds ``labels``, ``;``-separated) or, for regression, one
    column per output (each ``value_<name>`` when an output is named ``path`` or ``error``);
    ``error`` is empty unless the input could not be predicted."""
    import csv

    if task == "regression":
        clash = any(lab.lower() in ("path", "error") for lab in labels)
        header = ["path", *(f"value_{lab}" if clash else lab for lab in labels)]
    else:
        header = ["path", "label", "probability"]
        header += [f"{name}_{i}" for i in range(2, min(top_k, len(labels)) + 1) for name in ("label", "probability")]
        header += ["labels"] if task == "multilabel" else []
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow([*header, "error"])
    for p in preds:
        if not p.ok:
            row: list = [p.source, *[""] * (len(header) - 1), one_line(drop_python_asides(p.error))]
        elif task == "regression":
            row = [p.source, *[repr(float((p.values or {}).get(lab, float("nan")))) for lab in labels], ""]  # exact
        else:
            row = [p.source]
            for lab, prob in p.top_k:
                row += [lab, f"{prob:.6f}"]
            row += [";".join(p.labels or [])] if task == "multilabel" else []
            row.append("")
        writer.writerow(row)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from transferkit.errors import ConfigError, OutputError
    from transferkit.evaluation import evaluate
    from transferkit.export import load

    if args.worst < 0:
        raise ConfigError(f"--worst must be 0 or more, got {args.worst}.")
    predictor = load(args.model, device=args.device)  # the checks on the model before any file is predicted
    classifier = predictor.task == "multiclass"  # multilabel and regression models have no confusion matrix
    if not classifier and args.confusion_matrix:
        raise ConfigError(f"--confusion-matrix applies to single-label classifiers; this model's task is "
                          f"{predictor.task!r}.")
    from transferkit.outputs import check_output_file, check_plotting, check_png_name, is_png

    picture_path = args.confusion_matrix or "confusion_matrix.png"

    def check_picture(scored: list[str]) -> None:  # nothing the command reads, no file but a PNG, is replaced
        check_output_file(picture_path, flag="--confusion-matrix", writes="confusion-matrix picture",
                          reads=[("model", args.model), ("data", args.data)] + [("scored file", f) for f in scored],
                          replaceable=is_png, inside_is_data=True)
        check_png_name(picture_path, flag="--confusion-matrix")

    if args.confusion_matrix:  # asked for: a missing matplotlib or a path it must not take is said before the data
        check_plotting("--confusion-matrix")  # are predicted
        check_picture([])
    ev = evaluate(predictor, args.data, batch_size=args.batch_size, progress=None if not args.json else False)
    ev.model = args.model
    picture, not_drawn = None, "needs matplotlib: pip install 'transferkit[plots]'"
    try:
        if classifier:
            check_picture(ev.files if Path(picture_path).is_file() else [])  # a listed PNG of a CSV's data
            picture = ev.plot_confusion_matrix(picture_path)
    except (ConfigError, OutputError) as exc:  # no matplotlib, an unwritable folder, a path inside the data: the
        if args.confusion_matrix:  # default path is not worth the scores; an explicit path asked for the picture
            raise
        if isinstance(exc, OutputError) or "--confusion-matrix" in str(exc):
            not_drawn = one_line(exc).rstrip(".") + (". Give --confusion-matrix a writable path"
                                                    if isinstance(exc, OutputError) else "")
            print(f"transferkit: warning: the confusion matrix was not drawn: {not_drawn}.", file=sys.stderr)
    if args.json or not sys.stdout.isatty():
        matrix = {"confusion_matrix_png": str(picture) if picture else None} if classifier else {}
        print(strict_json(hide_secrets_in({**ev.to_dict(worst=args.worst), **matrix}), indent=1))  # a log: data
    else:  # named by a signed URL show no signature
        print(hide_secrets(ev.summary(worst=args.worst)))
        if classifier:
            print(f"confusion matrix: {picture}" if picture else f"confusion matrix: not drawn ({not_drawn})")
    for f, err in ev.failed:
        print(hide_secrets(f"transferkit: warning: {f}: {file_reason(err)}"), file=sys.stderr)
    if ev.failed:
        print(f"transferkit: error: {len(ev.failed)} of {len(ev.failed) + len(ev.files)} files could not be "
              "predicted (listed above); the scores leave them out", file=sys.stderr)
        return 1
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from transferkit.export import export_checkpoint

    reports, origin = export_checkpoint(args.checkpoint, args.out, examples=args.examples, onnx=args.onnx,
                                        num_examples=args.num_examples, optimize=args.optimize, mode=args.mode,
                                        atol=args.atol, rtol=args.rtol)
    for r in reports:
        print(r.summary())
        for note in r.notes:
            print(f"  note: {note}")
    print(f"parity checked after reloading from disk, on {origin.replace('pass examples=', 'pass --examples')}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from transferkit.export import read_metadata

    meta = read_metadata(args.model)
    if args.json:
        print(strict_json(meta, indent=1, sort_keys=True))
        return 0
    from transferkit.backbones._base import AUDIO_FIELDS
    from transferkit.export.metadata import ONNX_FORMAT, audio_max_seconds, run_config

    spec, train, exp = meta["input_spec"], meta.get("training", {}), meta.get("export", {})
    size, audio = spec.get("image_size", 224), spec.get("kind") == "audio"
    shape = (f"waveform [N, T] at {spec.get('sample_rate')} Hz" if audio
             else f"image [N, {spec.get('channels', 3)}, {size}, {size}]")
    if audio:  # what the predictor does before the file runs (a C++ caller does it itself)
        clip, most = spec.get("clip_seconds"), audio_max_seconds(meta)
        shape += ", mono, NaN-padded at the end"
        if clip:
            shape += f"; clips of {clip:g} s (the middle of a longer one, a shorter one padded)"
        elif most:
            shape += f"; the middle {most:g} s of a longer clip (its run's max_seconds)"
        spec = {k: v for k, v in spec.items() if k in AUDIO_FIELDS}  # files written before the spec was trimmed
    if meta.get("format") == ONNX_FORMAT:  # an ONNX graph takes the one dtype it was exported with
        dtypes = exp.get("input_dtypes") or ["the examples' dtype"]
        shape += f", {dtypes[0]} only (transferkit.load converts other inputs)"
    elif not audio:
        shape += " uint8 or float in [0, 1]"
    lines = [f"file:        {args.model}", f"task:        {meta['task']} ({plural(meta['num_outputs'], 'output')})",
             f"labels:      {_listed(meta['labels'][:20])}{' ...' if len(meta['labels']) > 20 else ''}",
             f"input:       {shape}", f"input_spec:  {json.dumps(spec, sort_keys=True)}",
             f"written by:  transferkit {meta['transferkit_version']}, torch {meta['torch_version']}"]
    if exp:
        how = (f"opset {exp.get('opset')}, checked on {exp.get('runtime')}" if exp.get("mode") == "onnx"
               else f"optimization={exp.get('optimization')}")
        sizes = list(dict.fromkeys(exp.get("batch_sizes") or []))  # (older files list them once per input dtype)
        dtypes = f" ({', '.join(exp['input_dtypes'])} inputs)" if exp.get("input_dtypes") else ""
        lines.append(f"export:      {exp.get('mode')}, {how}, max_abs_diff={exp.get('max_abs_diff')} at batch "
                     f"sizes {sizes}{dtypes}")
    targets = meta["decisions"].get("targets") if isinstance(meta.get("decisions"), dict) else None
    if meta["task"] == "regression" and isinstance(targets, dict):  # what the head's TargetScale undoes
        from transferkit.heads import centred_only

        per = ", ".join(f"{name} mean {m:.6g} " + ("(constant in training: only centred)" if centred_only(m, sd)
                                                   else f"std {sd:.6g}")
                        for name, m, sd in zip(meta["labels"][:5], targets.get("mean", ()), targets.get("std", ())))
        lines.append(f"targets:     outputs in the targets' units; trained standardised ({per}"
                     f"{', ...' if len(meta['labels']) > 5 else ''}; from {targets.get('n')} training targets)")
    if train:
        lines.append(f"training:    {strict_json(train, sort_keys=True)}")
        held, best = train.get("weights_epoch"), (train.get("best") or {}).get("epoch")
        if held is not None and best is not None and held != best:
            why = "the last: restore_best=False" if run_config(meta).get("restore_best") is False else \
                "the last completed epoch of an unfinished run"
            lines.append(f"weights:     epoch {held}'s ({why}), not the best epoch {best}'s")
    print("\n".join(lines))
    return 0


POLICY_KINDS = ("feature_extraction", "full", "fine_tune[:frozen=K]", "unfreeze:last=N|blocks=a+b|from=BLOCK",
                "gradual:every=K|milestones=E1+E2", "lora:r=R")


# settings the learning-rate range test does not use, and why (`transferkit lr-find` refuses them on the command line)
LR_FIND_IGNORES = {**dict.fromkeys(("export", "checkpoint", "resume", "plots_dir", "log_dir", "portable_metadata"),
                                   "the range test writes no outputs"),
                   **dict.fromkeys(("lr", "schedule", "schedule_options", "warmup_epochs"),
                                   "the range test ramps its own lr, from --start-lr to --end-lr"),
                   **dict.fromkeys(("early_stopping", "monitor", "restore_best", "top_k"),
                                   "the range test trains no epochs to score or keep")}


def command_keys(command: str) -> list[str]:
    """The settings ``transferkit COMMAND`` takes in a config file and in --set: FinetuneConfig's
    (but Python objects) and ``data_dir``; lr-find's leave out those the range test ignores."""
    from transferkit.config import config_fields

    keys = [k for k, f in config_fields().items() if f.metadata["serial"]] + ["data_dir"]
    return [k for k in keys if not (command == "lr-find" and k in LR_FIND_IGNORES)]


def _finetune_args(p: argparse.ArgumentParser, *, outputs: bool = True) -> None:
    """Flags for FinetuneConfig's common settings (each with its documented default), plus
    --config and --set for every other one: the same keys, checks and errors as the Python API."""
    from transferkit.config import config_fields, number_argument

    p.add_argument("--config", default=None, help="YAML file of finetune settings (keys as in FinetuneConfig)")
    p.add_argument("--data", default=None, help="training data: a folder root/<class>/<file> (or with train/ and "
                   "val/ or test/), or a CSV of path,label (with --task multilabel or regression: a CSV of path "
                   "and one column per output), or tar shards (a pattern such as 'train-{000..127}.tar', a glob, a "
                   "folder of them, a URL or pipe: command), Parquet files, or a saved Hugging Face dataset folder "
                   "(default: the config's data_dir)")
    p.add_argument("--val-data", default=None, help="validation data (default: a stratified split)")
    for key, f in config_fields().items():
        m = f.metadata
        if not m["flag"] or key == "data" or (not outputs and (m["group"] == "outputs" or key in ("schedule", "lr"))):
            continue  # lr-find has no outputs and runs its own lr ramp, not the run's lr or schedule
        types = m["types"]
        kind: Any = str
        if int in types or float in types:  # --image-size none: None, as in a file
            kind = number_argument(float if float in types else int, none=type(None) in types)
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = m["help"].split(" or a ")[0] if key in ("backbone", "policy") else m["help"]
        help_text += f"; kinds: {', '.join(POLICY_KINDS)}" if key == "policy" else ""
        if key == "epochs" and not outputs:
            help_text = "epochs of the run the test prepares (they set its phases and the cost estimate)"
        if "default" not in help_text and default is not None:
            help_text += f" (default: {default})"
        names = (flag(key), "--plots") if key == "plots_dir" else (flag(key),)
        if types == (bool,):  # a switch: --resume
            p.add_argument(*names, dest=key, action="store_true", default=None,
                           help=m["help"].replace("`checkpoint`", "--checkpoint"))
            continue
        p.add_argument(*names, dest=key, type=kind, default=None, help=help_text,
                       metavar=key.upper() if not m["choices"] else None,
                       choices=[c for c in m["choices"] if isinstance(c, str)] if m["choices"] and kind is str
                       and all(isinstance(c, str) or c is None for c in m["choices"]) else None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other setting, the value parsed as YAML (e.g. --set head_hidden=[256]; "
                        "repeatable; no default)")
    # what --set takes that has no flag here: a flag given for one is said as its --set (a flag's own spelling
    # with underscores, or a setting lr-find ignores, gets the nearest flag)
    p.settings = frozenset(k for k in command_keys("finetune" if outputs else "lr-find")  # type: ignore[attr-defined]
                           if flag(k) not in p._option_string_actions)


def _finetune_kwargs(args: argparse.Namespace) -> dict:
    """The config file, then the flags, then --set, merged and checked by one function. lr-find
    refuses on the command line the settings it ignores (`LR_FIND_IGNORES`) and leaves them out of
    a config file (the file of the run it prepares)."""
    from transferkit.config import RECIPE_KEYS, config_fields, load_config, merge_config, parse_overrides
    from transferkit.recipes import expand_vars

    keys = command_keys(args.command)
    flags = {k: getattr(args, k) for k in config_fields() if getattr(args, k, None) is not None}
    listed = list(dict.fromkeys([*keys, *LR_FIND_IGNORES, "runs"]))  # each once
    file_cfg = load_config(args.config, keys=listed) if args.config else {}
    overrides = parse_overrides(args.set, keys=keys)
    skip = set(LR_FIND_IGNORES) if args.command == "lr-find" else set()
    for key in [k for k in file_cfg if k not in flags and k not in overrides and k not in skip]:  # an unset ${VAR}
        expand_vars(file_cfg[key], key, source=args.config)  # the file gives: said as the file's, not as a flag
    unused = RECIPE_KEYS.keys() - {"data_dir", "runs"}  # what recipes read; `finetune` has no use for them
    for where, layer in ((f"--config {args.config}", file_cfg), ("--set", overrides)):
        for key in sorted(set(layer) & (unused | ({"runs"} if where == "--set" else set()))):
            raise TransferkitError(f"{where}: {key} is read by the recipes (python recipes/NAME.py), not by "
                                   f"`transferkit {args.command}`, which would ignore it; remove it.")
    for key in sorted(set(overrides) & skip):
        raise TransferkitError(f"--set: {key} is not used by `transferkit lr-find` ({LR_FIND_IGNORES[key]}), which "
                               "would ignore it; remove it.")
    if "runs" in file_cfg:
        warn(f"{args.config}: the `runs` of this recipe file are not used by `transferkit {args.command}`, "
             "which trains once with the top-level keys; run the recipe to train each of its runs.")
    cfg = merge_config(file_cfg, flags, overrides, source="finetune options")
    cfg = {k: expand_vars(v, k) for k, v in cfg.items() if k not in skip}
    _CONFIG_SETTINGS.clear()  # what the file set, said as the file's in messages (`spell`)
    _CONFIG_SETTINGS.update({k: (args.config, cfg[k]) for k in file_cfg if k in cfg and k not in flags
                             and k not in overrides})
    data = None  # the last of the config file, the flags and --set that names the training data (data or data_dir)
    for layer in (file_cfg, flags, overrides):
        named = [layer[k] for k in ("data", "data_dir") if layer.get(k)]
        data = expand_vars(named[0], "data") if named else None if "data" in layer else data  # data=null: none
    if not data:
        raise TransferkitError("No training data: pass --data DIR (or data_dir in the config).")
    kwargs = {k: v for k, v in cfg.items() if k not in RECIPE_KEYS}
    return {**kwargs, "data": data}


def _finetune_options(args: argparse.Namespace) -> tuple[str | None, dict]:
    """What ``transferkit finetune`` runs: ``(None, finetune()'s options)``, or, with ``--resume``
    and an existing ``--checkpoint`` (and no --config), ``(checkpoint, changes)``: the run continues
    with the settings stored in the checkpoint, the flags and --set replacing some of them
    (``transferkit.resume``)."""
    from transferkit.config import config_fields, merge_config, parse_overrides

    if args.resume and not (args.checkpoint or args.config):
        raise TransferkitError("--resume continues the run saved in --checkpoint PATH; pass the checkpoint.")
    if not (args.resume and args.checkpoint and not args.config and Path(args.checkpoint).exists()):
        try:
            kwargs = _finetune_kwargs(args)
        except TransferkitError as exc:
            if args.resume and args.checkpoint and str(exc).startswith("No training data"):  # nothing to resume
                raise TransferkitError(f"--resume: {shell_word(str(args.checkpoint))} does not exist, so there is "
                                       "nothing to resume, and a new run needs --data DIR. Check the checkpoint's "
                                       "path, or pass --data to start (and save it there).") from exc
            raise
        if kwargs.get("resume") and kwargs.get("checkpoint") and not Path(kwargs["checkpoint"]).exists():
            # one command for every start of a job that may be preempted: the first start has nothing to resume
            print(f"transferkit: --resume: {shell_word(str(kwargs['checkpoint']))} does not exist yet; a new run "
                  "starts and saves it there.", file=sys.stderr, flush=True)
            kwargs["resume"] = False
        return None, kwargs
    flags = {k: getattr(args, k) for k in config_fields() if getattr(args, k, None) is not None}
    flags.update({k: v for k, v in (("data", args.data), ("val_data", args.val_data)) if v is not None})
    changes = merge_config(flags, parse_overrides(args.set, keys=command_keys(args.command)),
                           source="finetune options")
    changes.setdefault("verbose", True)  # the command's own default, not that of a run started from Python
    return args.checkpoint, {k: v for k, v in changes.items() if k not in ("resume", "checkpoint")}


def _run_finetune(checkpoint: str | None, options: dict) -> Any:
    """``finetune`` (or ``resume``) with the merged options (`_finetune_options`)."""
    from transferkit.api import finetune, resume

    return finetune(**options) if checkpoint is None else resume(checkpoint, **options)


def _plan_finetune(checkpoint: str | None, options: dict) -> Any:
    """The decisions of the run ``transferkit finetune`` would start or resume (`_finetune_options`)."""
    from transferkit.api import resume_config
    from transferkit.decisions import plan

    if checkpoint is None:
        return plan(**{**options, "verbose": False})
    return plan(resume_config(checkpoint, **options), verbose=False)


def _resumed(checkpoint: str | None, options: dict) -> Any:
    """The checkpoint a run of these options continues (`_finetune_options`), or None."""
    return checkpoint if checkpoint is not None else options.get("checkpoint") if options.get("resume") else None


def _resume_note(checkpoint: str | None, options: dict) -> str | None:
    """What a dry run of ``--resume`` says of the checkpoint: the epoch the run continues after
    (its weights are the checkpoint's, whatever the plan's backbone line says), or that the run
    is complete."""
    from transferkit.checkpoints import run_in

    path = _resumed(checkpoint, options)
    info = run_in(path)
    if info is None:
        return None
    if info["complete"]:
        return f"{shell_word(str(path))} holds a complete run ({info['epoch']} epochs): a run would have nothing " \
            "to resume"
    return f"resumes {shell_word(str(path))} after its epoch {info['epoch']}, with its weights and training state"


def _complete_run(args: argparse.Namespace, checkpoint: str | None, options: dict) -> int | None:
    """With ``--resume`` and a checkpoint that holds a complete run: say so (a job started again
    after it ended has nothing to resume; one line, and piped or with --json one JSON object)
    and return the exit status: 0, or 1 when the export the run was given is missing (a run
    stopped while exporting; the hint makes it), or when another ``--export`` is asked for
    (nothing writes it). Settings given that differ from the run's own are refused (exit 2),
    as a resume refuses them: none of them would be used. Else None (the run, or the
    resume's error)."""
    from transferkit.checkpoints import run_in
    from transferkit.decisions import settings_changed

    path = _resumed(checkpoint, options)
    info = run_in(path)
    if info is None or not info["complete"]:
        return None
    shown, epochs = shell_word(str(path)), info["epoch"]
    stored = info["decisions"].get("config") or {}
    changed = settings_changed(info["decisions"], options)
    if changed:
        said = ", ".join(changed[:6])
        raise TransferkitError(f"{shown} holds a complete run, of other settings than those given ({said}): none of "
                               f"them would be used. Drop them (--resume of a complete run only says it is complete), "
                               "or start a new run with another --checkpoint.")
    if os.environ.get("RANK", "0") != "0":  # under torchrun: said once
        return 0
    export = stored.get("export")
    missing = isinstance(export, str) and not Path(export).exists()
    asked = options.get("export")
    asked = os.path.abspath(os.path.expanduser(str(asked))) if asked is not None else None  # as a run stores it
    other = asked is not None and asked != export
    print(f"transferkit: {shown} holds a complete run ({epochs} epoch{'' if epochs == 1 else 's'}): nothing to "
          f"resume. A new run can start from its trained backbone (--weights {shown}; the head starts anew).",
          file=sys.stderr)
    if missing and not other:
        print(f"transferkit: error: its export {shell_word(export)} is missing (the run stopped while exporting); "
              f"make it with `transferkit export {shown} --out {shell_word(export)}`.", file=sys.stderr)
    if other:
        its = f"its export is {shell_word(export)}" if isinstance(export, str) else "it was given no export"
        print(f"transferkit: error: --export {shell_word(asked)} is not written (the run is complete; {its}); make "
              f"it with `transferkit export {shown} --out {shell_word(asked)}`.", file=sys.stderr)
    if args.json or not sys.stdout.isatty():
        print(json.dumps({"complete": True, "checkpoint": str(path), "epochs": epochs, "export": export,
                          "export_missing": missing, **({"export_not_written": asked} if other else {})}))
    return 1 if missing or other else 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from transferkit.results import result_record, result_summary

    if args.dry_run:
        caught: list = []
        try:
            with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                checkpoint, options = _finetune_options(args)
                decided = _plan_finetune(checkpoint, options)
                resuming = _resume_note(checkpoint, options)
        finally:
            for w in caught:  # shown as a run shows them (also before an error), and kept for the record
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        if decided.rank != 0:  # under torchrun: the plan of the job, printed once
            return 0
        notes = [spell(n) for n in [*filter(None, [resuming]), *decided.notes]]  # as the run's warnings are said
        if args.json or not sys.stdout.isatty():  # one JSON object, as a run prints
            print(json.dumps(hide_secrets_in({"dry_run": True, "decisions": decided.to_dict(), "notes": notes,  # a log
                                              "warnings": [spell(one_line(w.message)) for w in caught],
                                              "summary": spell(decided.summary())}), default=str))
            return 0
        from transferkit._text import wrap_lines

        print(wrap_lines("\n".join([spell(decided.summary()), *(f"  note:     {n}" for n in notes)]), width=100))
        return 0
    checkpoint, options = _finetune_options(args)  # flags and settings checked first
    if (done := _complete_run(args, checkpoint, options)) is not None:
        return done
    with contextlib.redirect_stdout(sys.stderr):  # logs on stderr: stdout holds the result alone
        result = _run_finetune(checkpoint, options)
    if result.decisions is not None and result.decisions.rank != 0:  # under torchrun: one result, rank 0's
        return 0
    if args.json or not sys.stdout.isatty():
        print(strict_json(hide_secrets_in(result_record(result)), default=str))
        return 0
    print(spell(result_summary(result)))
    if result.export_path is not None:
        scored_on = "LABELLED_FOLDER_OR_CSV" if result.task == "multiclass" else "TARGETS_CSV"
        path = shell_word(str(result.export_path))
        print(f"  next:       transferkit predict {path} FILES_OR_FOLDERS\n"
              f"              transferkit evaluate {path} {scored_on}")
    return 0


def _cmd_lr_find(args: argparse.Namespace) -> int:
    from transferkit.api import lr_find

    with contextlib.redirect_stdout(sys.stderr):
        res = lr_find(start_lr=args.start_lr, end_lr=args.end_lr, num_steps=args.num_steps, plot=args.plot,
                      phase=args.phase, **_finetune_kwargs(args))
    print(json.dumps({"suggested_lr": res.suggestion, "phase": res.phase, "plot": args.plot, "notes": res.notes,
                      "seconds": round(res.seconds or 0.0, 1)}))
    return 0



def _sub(sub: Any, name: str, help: str, description: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=textwrap.fill(description, width=100), formatter_class=HELP)


def build_parser() -> argparse.ArgumentParser:
    from transferkit._version import __version__

    p = Parser(prog="transferkit", formatter_class=HELP,
               description="Transfer learning on torchvision, timm and torchaudio backbones, with verified "
                           "TorchScript exports.\n`transferkit COMMAND --help` for each.")
    p.add_argument("--version", action="version", version=f"transferkit {__version__}")
    p.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    p.add_argument("--max-image-pixels", type=pixel_limit, default=None, metavar="N",
                   help=MAX_PIXELS_HELP)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    d = _sub(sub, "demo", "offline transfer demo on scikit-learn's digits",
             "Train a small CNN on digits 0-4, transfer it to digits 5-9 with ten labels per class (feature "
             "extraction and fine-tuning, beside training from scratch), export, reload, predict, print a table.")
    d.add_argument("--out", default="demo-output", help="folder for the checkpoint, export and report")
    d.add_argument("--quick", action="store_true",
                   help="3 epochs per task instead of 12 and 10: a check that the pipeline runs (for tests; "
                        "its accuracies do not tell the story of the full demo)")
    d.add_argument("--update-readme", default=None, metavar="README",
                   help="write the printed table into this file's demo-table block (make readme)")
    d.set_defaults(fn=_cmd_demo)
    b = _sub(sub, "backbones", "list registered backbones",
             "List the registered backbone names (tv: torchvision, timm:, ta: torchaudio, spec: spectrogram "
             "wrappers, tk: transferkit's own), optionally filtered by a glob pattern.")
    b.add_argument("pattern", nargs="?", default=None,
                   help="glob pattern, e.g. 'tv:resnet*', or words a name holds, e.g. 'cifar'")
    b.set_defaults(fn=_cmd_backbones)

    pr = _sub(sub, "predict", "predict with an exported model",
              "Predict labels for image (or audio) files and folders with an exported model.")
    pr.add_argument("model", help="exported file: TorchScript (.pt) or ONNX (.onnx)")
    pr.add_argument("inputs", nargs="+", help="files, or folders (every readable file below them)")
    pr.add_argument("--top-k", type=positive_whole_number, default=1, help="labels to show per input")
    fmt = pr.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print a JSON list instead of one line per input")
    fmt.add_argument("--csv", action="store_true",
                     help="print CSV: path, label, probability (label_2, probability_2 .. with --top-k), error")
    pr.add_argument("--batch-size", type=positive_whole_number, default=32, help="inputs per forward pass")
    pr.add_argument("--threshold", type=float, default=0.5, help="probability threshold of multi-label models")
    pr.add_argument("--device", default="cpu", help="torch device to run on, e.g. cpu or cuda")
    pr.set_defaults(fn=_cmd_predict)

    ev = _sub(sub, "evaluate", "score an exported model on labelled data",
              "Predict every file of a labelled folder root/<class>/<file> (or a CSV of path,label rows) with an "
              "exported model and report the accuracy, per-class precision/recall/F1, the files with the highest "
              "loss, and draw the confusion matrix. A multilabel or regression model is scored on a CSV of its "
              "targets (path, then one column per output) with its task's metrics. On a terminal it prints a "
              "summary; piped or with --json, one JSON object.")
    ev.add_argument("model", help="exported file: TorchScript (.pt) or ONNX (.onnx)")
    ev.add_argument("data", help="labelled data: a folder root/<class>/<file>, a CSV of path,label, or tar shards "
                    "or Parquet files (multilabel and regression: a CSV of path and the targets)")
    ev.add_argument("--worst", type=int, default=10, help="how many of the highest-loss files to list")
    ev.add_argument("--confusion-matrix", default=None, metavar="PNG",
                    help="where to draw the confusion matrix (default: confusion_matrix.png)")
    ev.add_argument("--json", action="store_true", help="print JSON even on a terminal")
    ev.add_argument("--batch-size", type=positive_whole_number, default=32, help="inputs per forward pass")
    ev.add_argument("--device", default="cpu", help="torch device to run on, e.g. cpu or cuda")
    ev.set_defaults(fn=_cmd_evaluate)

    ex = _sub(sub, "export", "export a checkpoint to a verified TorchScript file",
              "Rebuild the model of a transferkit checkpoint, export it to TorchScript, reload the file and check "
              "it against the model at batch size 1 and N.")
    ex.add_argument("checkpoint", help="checkpoint written by finetune(checkpoint=...)")
    ex.add_argument("--out", required=True, help="path of the exported TorchScript file")
    ex.add_argument("--examples", default=None,
                    help="folder of real inputs for the parity check (default: seeded random inputs)")
    ex.add_argument("--num-examples", type=int, default=8, help="inputs used in the parity check")
    ex.add_argument("--mode", choices=("auto", "script", "trace"), default="auto",
                    help="auto: script, trace when scripting fails")
    ex.add_argument("--optimize", action="store_true",
                    help="freeze / optimize_for_inference, kept only when the reloaded file keeps parity")
    ex.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance of the parity check")
    ex.add_argument("--rtol", type=float, default=1e-5, help="tolerance relative to max |output|")
    ex.add_argument("--onnx", default=None, help="also write an ONNX file here, checked with onnxruntime")
    ex.set_defaults(fn=_cmd_export)

    ft = _sub(sub, "finetune", "fine-tune a backbone on a folder of data and export it",
              "transferkit.finetune() from the command line: --config file.yaml (keys as in FinetuneConfig), then "
              "the flags below, then --set key=value overrides. The decisions and the epoch log go to stderr. At "
              "the end, on a terminal, a short summary (best epoch, scores, files written, the export's check); "
              "piped or with --json, one JSON object. --checkpoint PATH --resume alone continues an interrupted "
              "run with the settings stored in it.")
    _finetune_args(ft)
    ft.add_argument("--json", action="store_true", help="print the result as JSON even on a terminal")
    ft.add_argument("--dry-run", action="store_true",
                    help="print the run's decisions with their reasons and notes and exit (piped or with --json, "
                         "one JSON object): no weights loaded, no features computed, nothing trained")
    ft.set_defaults(fn=_cmd_finetune)
    lf = _sub(sub, "lr-find", "learning-rate range test; suggests an lr",
              "The learning-rate range test on the run `transferkit finetune` would do with the same options "
              "(model, policy, data, feature cache, optimizer): the lr grows from --start-lr to --end-lr over "
              "--num-steps batches and the suggestion is read from the loss curve. For a policy with a frozen phase "
              "(fine_tune, gradual) it tests that phase (the head on features computed once: seconds) unless "
              "--phase unfrozen. What the test trains and its estimated cost go to stderr; stdout holds a JSON "
              "object with the suggested lr.")
    _finetune_args(lf, outputs=False)
    sweep = LRRange()
    lf.add_argument("--num-steps", type=int, default=sweep.num_steps, help="steps of the range test")
    lf.add_argument("--start-lr", type=float, default=sweep.start_lr, help="first learning rate tried")
    lf.add_argument("--end-lr", type=float, default=sweep.end_lr, help="last learning rate tried")
    lf.add_argument("--plot", default=None, help="write the loss-vs-lr curve to this PNG")
    lf.add_argument("--phase", default=None, choices=("frozen", "unfrozen"),
                    help="for fine_tune/gradual: test the frozen phase (the head on cached features; the default) "
                         "or the unfrozen one (end to end: as slow as training)")
    lf.set_defaults(fn=_cmd_lr_find)
    i = _sub(sub, "inspect", "print an exported model's metadata",
             "Print what an exported file holds: task, labels, input, the export's parity check, how it was trained.")
    i.add_argument("model", help="exported file: TorchScript (.pt) or ONNX (.onnx)")
    i.add_argument("--json", action="store_true", help="print the full metadata as JSON")
    i.set_defaults(fn=_cmd_inspect)
    for cmd in sub.choices.values():  # --debug and --max-image-pixels after the command work too
        cmd.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="print the full traceback of an error")
        cmd.add_argument("--max-image-pixels", type=pixel_limit, default=argparse.SUPPRESS, metavar="N",
                         help=MAX_PIXELS_HELP)
    return p


_CONFIG_SETTINGS: dict[str, tuple[str, Any]] = {}  # the settings a --config file gave: key -> (file, value)


def spell(message: str) -> str:
    """`cli_spelling` of ``message``, the settings a ``--config`` file gave written as the file's."""
    return cli_spelling(message, _CONFIG_SETTINGS)


def console_main() -> None:
    """The ``transferkit`` command and ``python -m transferkit``: `main`, then the process
    ends with its status. Under torchrun, a process that joined the job ends through
    `exit_cleanly` (with torch 2.11 a gloo worker aborts at interpreter exit in about 1 run in 4)."""
    from transferkit._signals import deaf_once_said, end_with_the_launcher

    end_with_the_launcher()  # under torchrun: as early as can be (a run asks again as it joins its job)
    code = deaf_once_said(main())
    dist = sys.modules.get("torch.distributed")  # imported by a command that trained; --help never imports torch
    if dist is not None and dist.is_available() and dist.is_initialized():
        from transferkit.train.distributed import exit_cleanly

        exit_cleanly(code)
    sys.exit(code)


def _import_torch() -> None:
    """Import torch (and numpy) with Ctrl-C and SIGTERM held until the import is whole, then
    acted on: an interrupt inside it left half-imported modules behind ("module 'numpy' has no
    attribute 'matrix'", a traceback) or was swallowed by an import's own ``except`` (the run
    went on). Every command but ``--help`` (answered before) needs torch."""
    from transferkit._signals import held_signals

    with held_signals():
        importlib.import_module("torch")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 on errors, with one line on stderr)."""
    args = build_parser().parse_args(argv)
    set_pixel_limit(getattr(args, "max_image_pixels", None))

    _CONFIG_SETTINGS.clear()
    with one_line_warnings("transferkit", spell):
        try:
            from transferkit._signals import first_interruption_holds, terminate_as_interrupt

            # SIGTERM is said and ends with 143 in every command, as Ctrl-C with 130; a second one is held
            with terminate_as_interrupt(), first_interruption_holds():
                _import_torch()
                code = args.fn(args)
            sys.stdout.flush()  # a closed pipe is met here, not in the interpreter's exit
            return code
        except BrokenPipeError:  # `transferkit ... | head`: the reader has gone; stop quietly, as `cat` does
            with contextlib.suppress(OSError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())  # so that the exit's flush of stdout does not fail again
            return 141
        except (TransferkitError, OSError) as exc:
            if getattr(args, "debug", False):
                traceback.print_exc()
            msg = hide_secrets(one_line(exc) or type(exc).__name__)  # an OSError's too
            print(f"transferkit: error: {spell(msg)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as exc:
            from transferkit._signals import interrupt_exit

            if getattr(args, "debug", False):
                traceback.print_exc()
            line, code = interrupt_exit(exc, one_line(exc))
            print(f"transferkit: {spell(line)}", file=sys.stderr)
            return code


if __name__ == "__main__":
    console_main()
