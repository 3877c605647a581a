"""The ``transferkit`` command line: ``finetune``, ``lr-find``, ``predict``, ``export``, ``inspect``,
``backbones``, ``demo``.

Every failure transferkit can explain exits with status 2 and one line on stderr
(``transferkit: error: ...``), like argparse's own usage errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from transferkit.errors import TransferkitError

HELP = argparse.ArgumentDefaultsHelpFormatter


def _cmd_demo(args: argparse.Namespace) -> int:
    from transferkit.demo import run_demo

    run_demo(out_dir=args.out, quick=args.quick)
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


# finetune() arguments that get their own flag; every other one is reachable with --set key=value
_COMMON = ("backbone", "weights", "policy", "epochs", "batch_size", "lr", "image_size", "optimizer", "schedule",
           "augment", "device", "seed", "export", "checkpoint")


def _finetune_args(p: argparse.ArgumentParser, *, outputs: bool = True) -> None:
    import inspect

    from transferkit.api import finetune
    from transferkit.config import allowed_types
    from transferkit.train.optim import DEFAULT_HEAD_LR, DEFAULT_LR

    helps = {"lr": f"default: {DEFAULT_HEAD_LR:g} when only the head trains, else {DEFAULT_LR:g}"}
    params = inspect.signature(finetune).parameters
    p.add_argument("--config", default=None, help="YAML file of finetune() arguments")
    p.add_argument("--data", default=None, help="training data: a folder root/<class>/<image> (or with train/ and "
                   "val/), or a CSV of path,label; default: the config's data_dir")
    p.add_argument("--val-data", default=None, help="validation data (default: a stratified split)")
    for key in _COMMON:
        if not outputs and key in ("export", "checkpoint"):
            continue
        default = params[key].default
        allowed = allowed_types(params[key].annotation) or ()
        kind = float if float in allowed else int if int in allowed and bool not in allowed else str
        p.add_argument("--" + key.replace("_", "-"), dest=key, type=kind, default=None,
                       help=helps.get(key, f"default: {default!r}"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other finetune() argument, the value parsed as YAML (e.g. --set head_hidden=[256])")


def _finetune_kwargs(args: argparse.Namespace) -> dict:
    from transferkit.config import RECIPE_KEYS, load_config, parse_overrides, validate_config
    from transferkit.recipes import expand_vars

    cfg = load_config(args.config) if args.config else {}
    cfg.update({k: getattr(args, k) for k in _COMMON if getattr(args, k, None) is not None})
    if isinstance(cfg.get("weights"), str) and cfg["weights"].lower() == "none":
        cfg["weights"] = None
    cfg.update(parse_overrides(args.set))
    cfg = {k: expand_vars(v) for k, v in validate_config(cfg, source="finetune options").items()}
    data = args.data or cfg.get("data_dir")
    if not data:
        raise TransferkitError("No training data: pass --data DIR (or data_dir in the config).")
    kwargs = {k: v for k, v in cfg.items() if k not in RECIPE_KEYS}
    return {**kwargs, "data": data, "val_data": args.val_data}


def _cmd_finetune(args: argparse.Namespace) -> int:
    from transferkit.api import finetune

    result = finetune(**_finetune_kwargs(args))
    summary = {"best": result.best, "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
               "export": str(result.export_path) if result.export_path else None,
               "checkpoint": str(result.checkpoint_path) if result.checkpoint_path else None,
               "bad_files": len(result.data_report.bad_files), "seconds": round(result.timings.get("total_s", 0), 1)}
    print(json.dumps(summary, default=str))
    return 0


def _cmd_lr_find(args: argparse.Namespace) -> int:
    from transferkit.api import lr_find

    import inspect

    from transferkit import api

    kwargs = _finetune_kwargs(args)
    used = set(inspect.signature(api._prepare).parameters) | set(inspect.signature(api.lr_find).parameters)
    ignored = sorted(k for k in kwargs if k not in used)
    if ignored:  # a config written for finetune() also holds training-loop settings
        print(f"transferkit: lr-find ignores {', '.join(ignored)}", file=sys.stderr)
    kwargs = {k: v for k, v in kwargs.items() if k in used}
    backbone = kwargs.pop("backbone", "tv:resnet18")
    res = lr_find(backbone, num_steps=args.num_steps, plot=args.plot, **kwargs)
    print(json.dumps({"suggested_lr": res.suggestion, "plot": args.plot}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transferkit", description="Transfer learning with verified exports.",
                                formatter_class=HELP)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="offline transfer demo on scikit-learn's digits", formatter_class=HELP)
    d.add_argument("--out", default="demo-output", help="folder for the checkpoint, export and report")
    d.add_argument("--quick", action="store_true", help="fewer epochs (for tests)")
    d.set_defaults(fn=_cmd_demo)
    b = sub.add_parser("backbones", help="list registered backbones", formatter_class=HELP)
    b.add_argument("pattern", nargs="?", default=None, help="glob pattern, e.g. 'tv:resnet*'")
    b.set_defaults(fn=_cmd_backbones)

    pr = sub.add_parser("predict", help="predict with an exported model", formatter_class=HELP,
                        description="Predict labels for image (or audio) files and folders with an exported model.")
    pr.add_argument("model", help="exported TorchScript file (.pt)")
    pr.add_argument("inputs", nargs="+", help="files, or folders (every readable file below them)")
    pr.add_argument("--top-k", type=int, default=1, help="labels to show per input")
    pr.add_argument("--json", action="store_true", help="print a JSON list instead of one line per input")
    pr.add_argument("--batch-size", type=int, default=32, help="inputs per forward pass")
    pr.add_argument("--threshold", type=float, default=0.5, help="probability threshold of multi-label models")
    pr.add_argument("--device", default="cpu", help="torch device to run on, e.g. cpu or cuda")
    pr.set_defaults(fn=_cmd_predict)

    ex = sub.add_parser("export", help="export a checkpoint to a verified TorchScript file", formatter_class=HELP,
                        description="Rebuild the model of a transferkit checkpoint, export it to TorchScript, "
                                    "reload the file and check it against the model at batch size 1 and N.")
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

    ft = sub.add_parser("finetune", help="fine-tune a backbone on a folder of data and export it",
                        description="transferkit.finetune() from the command line: --config file.yaml (keys are "
                                    "finetune()'s argument names) plus flags and --set overrides.")
    _finetune_args(ft)
    ft.set_defaults(fn=_cmd_finetune)
    lf = sub.add_parser("lr-find", help="learning-rate range test; suggests an lr")
    _finetune_args(lf, outputs=False)
    lf.add_argument("--num-steps", type=int, default=100, help="steps of the range test (default: 100)")
    lf.add_argument("--plot", default=None, help="write the loss-vs-lr curve to this PNG (default: no plot)")
    lf.set_defaults(fn=_cmd_lr_find)
    i = sub.add_parser("inspect", help="print an exported model's metadata", formatter_class=HELP)
    i.add_argument("model", help="exported TorchScript file (.pt)")
    i.add_argument("--json", action="store_true", help="print the full metadata as JSON")
    i.set_defaults(fn=_cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 on errors, with one line on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (TransferkitError, OSError) as exc:
        msg = " ".join(str(exc).split()) or type(exc).__name__
        print(f"transferkit: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
