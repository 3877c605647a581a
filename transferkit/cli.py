"""The ``transferkit`` command line: ``demo``, ``backbones``, ``predict``, ``inspect``."""

from __future__ import annotations

import argparse
import json
import sys

from transferkit.errors import TransferkitError


def _cmd_demo(args: argparse.Namespace) -> int:
    from transferkit.demo import run_demo

    run_demo(out_dir=args.out, quick=args.quick)
    return 0


def _cmd_backbones(args: argparse.Namespace) -> int:
    from transferkit.backbones import list_backbones

    for name in list_backbones(args.pattern):
        print(name)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from transferkit.export import load

    predictor = load(args.model)
    preds = predictor.predict(args.inputs, top_k=args.top_k)
    if args.json:
        print(json.dumps([p.to_dict() for p in preds], indent=1))
    else:
        for p in preds:
            alts = ", ".join(f"{lab} {prob:.3f}" for lab, prob in p.top_k)
            print(f"{p.source}\t{alts}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from transferkit.export import read_metadata

    print(json.dumps(read_metadata(args.model), indent=1, sort_keys=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transferkit", description="Transfer learning with verified exports.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="offline transfer demo on scikit-learn's digits",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--out", default="demo-output", help="folder for the checkpoint, export and report")
    d.add_argument("--quick", action="store_true", help="fewer epochs (for tests)")
    d.set_defaults(fn=_cmd_demo)
    b = sub.add_parser("backbones", help="list registered backbones")
    b.add_argument("pattern", nargs="?", default=None, help="glob pattern, e.g. 'tv:resnet*'")
    b.set_defaults(fn=_cmd_backbones)
    pr = sub.add_parser("predict", help="predict labels with an exported model",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pr.add_argument("model")
    pr.add_argument("inputs", nargs="+")
    pr.add_argument("--top-k", type=int, default=1)
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(fn=_cmd_predict)
    i = sub.add_parser("inspect", help="print an exported model's metadata")
    i.add_argument("model")
    i.set_defaults(fn=_cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except TransferkitError as exc:
        print(f"transferkit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
