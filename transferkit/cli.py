"""The ``transferkit`` command line: ``finetune``, ``lr-find``, ``predict``, ``export``, ``inspect``,
``backbones``, ``demo``.

Every failure transferkit can explain exits with status 2 and one line on stderr
(``transferkit: error: ...``), like argparse's own usage errors.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

from transferkit.errors import TransferkitError
from transferkit.helpformat import HELP
from transferkit.schedules import LRRange




def _cmd_demo(args: argparse.Namespace) -> int:
    from transferkit.demo import run_demo

    summary = run_demo(out_dir=args.out, quick=args.quick)
    if args.update_readme:
        from transferkit.demo import update_readme

        update_readme(args.update_readme, summary)
        print(f"updated the demo table in {args.update_readme}")
    return 0


def _cmd_backbones(args: argparse.Namespace) -> int:
    from transferkit.backbones import list_backbones

    for name in list_backbones(args.pattern):
        print(name)
    return 0


def _expand_inputs(predictor, inputs: list[str]) -> list[str]:
    """Files stay as given; a folder stands for every file of the model's input kind below it."""
    out: list[str] = []
    for item in inputs:
        out += predictor.inputs.list_files(item) if Path(item).is_dir() else [item]
    return out


def _cmd_predict(args: argparse.Namespace) -> int:
    from transferkit.export import load

    predictor = load(args.model, device=args.device)
    files = _expand_inputs(predictor, args.inputs)
    preds = predictor.predict(files, top_k=args.top_k, batch_size=args.batch_size, threshold=args.threshold,
                              progress=None if not args.json else False)
    if args.json:
        print(json.dumps([p.to_dict() for p in preds], indent=1))
    else:
        for p in preds:
            print(f"{p.source}\t{p}")
    failed = [p for p in preds if not getattr(p, "ok", True)]
    for p in failed:  # the reason alone: advice about training options does not apply to predict
        reason = _one_line(p.error).split(" Remove the file")[0]
        print(f"transferkit: warning: {p.source}: {reason}", file=sys.stderr)
    if failed:
        print(f"transferkit: error: {len(failed)} of {len(preds)} inputs could not be predicted (listed above)",
              file=sys.stderr)
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
    print(f"parity checked after reloading from disk, on {origin}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from transferkit.export import read_metadata

    meta = read_metadata(args.model)
    if args.json:
        print(json.dumps(meta, indent=1, sort_keys=True))
        return 0
    spec, train, exp = meta["input_spec"], meta.get("training", {}), meta.get("export", {})
    shape = (f"waveform [N, T] at {spec.get('sample_rate')} Hz" if spec.get("kind") == "audio"
             else f"image [N, 3, {spec.get('image_size')}, {spec.get('image_size')}] uint8 or float in [0, 1]")
    lines = [f"file:        {args.model}", f"task:        {meta['task']} ({meta['num_outputs']} outputs)",
             f"labels:      {', '.join(meta['labels'][:20])}{' ...' if len(meta['labels']) > 20 else ''}",
             f"input:       {shape}", f"input_spec:  {json.dumps(spec, sort_keys=True)}",
             f"written by:  transferkit {meta['transferkit_version']}, torch {meta['torch_version']}"]
    if exp:
        lines.append(f"export:      {exp.get('mode')}, optimization={exp.get('optimization')}, max_abs_diff="
                     f"{exp.get('max_abs_diff')} at batch sizes {exp.get('batch_sizes')}")
    if train:
        lines.append(f"training:    {json.dumps(train, sort_keys=True)}")
    print("\n".join(lines))
    return 0


POLICY_KINDS = ("feature_extraction", "full", "fine_tune[:frozen=K]", "unfreeze:last=N|blocks=a+b|from=BLOCK",
                "gradual:every=K|milestones=E1+E2", "lora:r=R")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _finetune_args(p: argparse.ArgumentParser, *, outputs: bool = True) -> None:
    """Flags for FinetuneConfig's common settings (each with its documented default), plus
    --config and --set for every other one: the same keys, checks and errors as the Python API."""
    from transferkit.config import config_fields

    p.add_argument("--config", default=None, help="YAML file of finetune settings (keys as in FinetuneConfig)")
    p.add_argument("--data", default=None, help="training data: a folder root/<class>/<file> (or with train/ and "
                   "val/ or test/), or a CSV of path,label (default: the config's data_dir)")
    p.add_argument("--val-data", default=None, help="validation data (default: a stratified split)")
    for key, f in config_fields().items():
        m = f.metadata
        if not m["flag"] or key == "data" or (not outputs and (m["group"] == "outputs" or key == "schedule")):
            continue  # lr-find has no outputs and runs its own lr ramp, not a schedule
        types = m["types"]
        kind = int if types == (int,) else float if float in types else str
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = m["help"].split(" or a ")[0] if key in ("backbone", "policy") else m["help"]
        help_text += f"; kinds: {', '.join(POLICY_KINDS)}" if key == "policy" else ""
        if "default" not in help_text and default is not None:
            help_text += f" (default: {default})"
        names = (_flag(key), "--plots") if key == "plots_dir" else (_flag(key),)
        p.add_argument(*names, dest=key, type=kind, default=None, help=help_text,
                       metavar=key.upper() if not m["choices"] else None,
                       choices=[c for c in m["choices"] if isinstance(c, str)] if m["choices"] and kind is str
                       and all(isinstance(c, str) or c is None for c in m["choices"]) else None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other setting, the value parsed as YAML (e.g. --set head_hidden=[256]; "
                        "repeatable; no default)")


def _finetune_kwargs(args: argparse.Namespace, *, skip: tuple[str, ...] = ()) -> dict:
    """The config file, then the flags, then --set, merged and checked by one function."""
    from transferkit.config import RECIPE_KEYS, config_fields, load_config, merge_config, parse_overrides
    from transferkit.recipes import expand_vars

    flags = {k: getattr(args, k) for k in config_fields() if getattr(args, k, None) is not None}
    if isinstance(flags.get("weights"), str) and flags["weights"].lower() == "none":
        flags["weights"] = None
    file_cfg = load_config(args.config) if args.config else {}
    cfg = merge_config(file_cfg, flags, parse_overrides(args.set), source="finetune options")
    cfg = {k: expand_vars(v) for k, v in cfg.items() if k not in skip}
    data = args.data or cfg.get("data") or cfg.get("data_dir")
    if not data:
        raise TransferkitError("No training data: pass --data DIR (or data_dir in the config).")
    kwargs = {k: v for k, v in cfg.items() if k not in RECIPE_KEYS}
    return {**kwargs, "data": data, "val_data": args.val_data or kwargs.get("val_data")}


def _cmd_finetune(args: argparse.Namespace) -> int:
    from transferkit.api import finetune

    if args.dry_run:
        from transferkit.decisions import plan

        with contextlib.redirect_stdout(sys.stderr):
            decided = plan(**{**_finetune_kwargs(args), "verbose": False})
        print(decided.summary())
        return 0
    with contextlib.redirect_stdout(sys.stderr):  # logs on stderr: stdout holds the JSON result alone
        result = finetune(**_finetune_kwargs(args))
    summary = {"best": result.best, "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
               "export": str(result.export_path) if result.export_path else None,
               "checkpoint": str(result.checkpoint_path) if result.checkpoint_path else None,
               "plots": {k: str(v) for k, v in result.plots.items()},
               "bad_files": len(result.data_report.bad_files), "features": result.feature_report,
               "seconds": round(result.timings.get("total_s", 0), 1)}
    print(json.dumps(summary, default=str))
    return 0


def _cmd_lr_find(args: argparse.Namespace) -> int:
    from transferkit.api import lr_find

    with contextlib.redirect_stdout(sys.stderr):
        res = lr_find(start_lr=args.start_lr, end_lr=args.end_lr, num_steps=args.num_steps, plot=args.plot,
                      **_finetune_kwargs(args, skip=("export", "checkpoint", "plots_dir", "log_dir", "resume")))
    print(json.dumps({"suggested_lr": res.suggestion, "plot": args.plot, "notes": res.notes}))
    return 0


def _sub(sub: Any, name: str, help: str, description: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description, formatter_class=HELP)


def build_parser() -> argparse.ArgumentParser:
    from transferkit._version import __version__

    p = argparse.ArgumentParser(prog="transferkit", formatter_class=HELP,
                                description="Transfer learning on torchvision, timm and torchaudio backbones, with "
                                            "verified TorchScript exports. `transferkit COMMAND --help` for each.")
    p.add_argument("--version", action="version", version=f"transferkit {__version__}")
    p.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    d = _sub(sub, "demo", "offline transfer demo on scikit-learn's digits",
             "Train a small CNN on digits 0-4, transfer it to digits 5-9 with ten labels per class (feature "
             "extraction and fine-tuning, beside training from scratch), export, reload, predict, print a table.")
    d.add_argument("--out", default="demo-output", help="folder for the checkpoint, export and report")
    d.add_argument("--quick", action="store_true", help="fewer epochs (for tests)")
    d.add_argument("--update-readme", default=None, metavar="README",
                   help="write the printed table into this file's demo-table block (make readme)")
    d.set_defaults(fn=_cmd_demo)
    b = _sub(sub, "backbones", "list registered backbones",
             "List the registered backbone names (tv: torchvision, timm:, ta: torchaudio, spec: spectrogram "
             "wrappers, tk: transferkit's own), optionally filtered by a glob pattern.")
    b.add_argument("pattern", nargs="?", default=None, help="glob pattern, e.g. 'tv:resnet*'")
    b.set_defaults(fn=_cmd_backbones)

    pr = _sub(sub, "predict", "predict with an exported model",
              "Predict labels for image (or audio) files and folders with an exported model.")
    pr.add_argument("model", help="exported TorchScript file (.pt)")
    pr.add_argument("inputs", nargs="+", help="files, or folders (every readable file below them)")
    pr.add_argument("--top-k", type=int, default=1, help="labels to show per input")
    pr.add_argument("--json", action="store_true", help="print a JSON list instead of one line per input")
    pr.add_argument("--batch-size", type=int, default=32, help="inputs per forward pass")
    pr.add_argument("--threshold", type=float, default=0.5, help="probability threshold of multi-label models")
    pr.add_argument("--device", default="cpu", help="torch device to run on, e.g. cpu or cuda")
    pr.set_defaults(fn=_cmd_predict)

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
              "the flags below, then --set key=value overrides. The decisions and the epoch log go to stderr; "
              "stdout holds one JSON object with the result.")
    _finetune_args(ft)
    ft.add_argument("--dry-run", action="store_true",
                    help="print the run's decisions with their reasons and exit: no weights loaded, no features "
                         "computed, nothing trained")
    ft.set_defaults(fn=_cmd_finetune)
    lf = _sub(sub, "lr-find", "learning-rate range test; suggests an lr",
              "The learning-rate range test on the run `transferkit finetune` would do with the same options "
              "(model, policy, data, feature cache, optimizer). Prints a JSON object with the suggested lr.")
    _finetune_args(lf, outputs=False)
    sweep = LRRange()
    lf.add_argument("--num-steps", type=int, default=sweep.num_steps, help="steps of the range test")
    lf.add_argument("--start-lr", type=float, default=sweep.start_lr, help="first learning rate tried")
    lf.add_argument("--end-lr", type=float, default=sweep.end_lr, help="last learning rate tried")
    lf.add_argument("--plot", default=None, help="write the loss-vs-lr curve to this PNG")
    lf.set_defaults(fn=_cmd_lr_find)
    i = _sub(sub, "inspect", "print an exported model's metadata",
             "Print what an exported file holds: task, labels, input, the export's parity check, how it was trained.")
    i.add_argument("model", help="exported TorchScript file (.pt)")
    i.add_argument("--json", action="store_true", help="print the full metadata as JSON")
    i.set_defaults(fn=_cmd_inspect)
    for cmd in sub.choices.values():  # --debug after the command works too
        cmd.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="print the full traceback of an error")
    return p


def cli_spelling(message: str) -> str:
    """Rewrite Python spellings in an error for a CLI user: ``weights='x'`` -> ``--weights x``
    (``--set key=value`` for settings without a flag), ``transferkit.list_backbones(..)`` ->
    ``transferkit backbones``."""
    from transferkit.config import config_fields

    fields = config_fields()

    def flag(m: re.Match) -> str:
        key, value = m.group(1), m.group(2).strip("'\"")
        f = fields.get(key)
        if f is None or not f.metadata["serial"]:
            return m.group(0)
        return f"{_flag(key)} {value}" if f.metadata["flag"] else f"--set {key}={value}"

    message = re.sub(r"(?<![\w.-])([a-z_]+)=('[^']*'|\"[^\"]*\"|[^\s,;)]+?)(?=[\s,;)]|\.(?:\s|$)|$)", flag, message)
    message = re.sub(r"transferkit\.list_backbones\(([^)]*)\)",
                     lambda m: "`transferkit backbones" + (f" {m.group(1).strip(chr(39))}`" if m.group(1) else "`"),
                     message)
    return message


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 on errors, with one line on stderr)."""
    args = build_parser().parse_args(argv)

    def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"transferkit: warning: {cli_spelling(_one_line(message))}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show_warning
        try:
            return args.fn(args)
        except (TransferkitError, OSError) as exc:
            if getattr(args, "debug", False):
                traceback.print_exc()
            msg = _one_line(exc) or type(exc).__name__
            print(f"transferkit: error: {cli_spelling(msg)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as exc:
            if getattr(args, "debug", False):
                traceback.print_exc()
            print(f"transferkit: interrupted: {cli_spelling(_one_line(exc))}", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
