"""Real ImageNet transfer: ants vs bees with EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``,
the shared ImageNet-1k weights), every policy over seeds at equal epochs, finetune's defaults otherwise.

Prints one table: validation accuracy (the best epoch, as ``finetune`` returns it, and the
final epoch), its spread over seeds, and the wall time of each run, measured in one process
side by side. The frozen runs share one feature cache (computed once). Reference: the PyTorch
transfer-learning tutorial reaches 0.93-0.95 with an ImageNet ResNet-18.

    .venv/bin/python benchmarks/transfer_lite0.py                       # every policy, 3 seeds
    .venv/bin/python benchmarks/transfer_lite0.py --policies fine_tune:frozen=1 full --epochs 3
    .venv/bin/python benchmarks/transfer_lite0.py --policies feature_extraction full unfreeze:last=2 \
        fine_tune:frozen=1 --epochs 5 --seeds 3 --out lite0.jsonl      # the table in docs/policies.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import transferkit as tk  # noqa: E402

from _machine import DATA, machine_line  # noqa: E402  (the script's folder is on sys.path)
WEIGHTS = DATA / "weights" / "efficientnet-lite0" / "tf_efficientnet_lite0_in1k.pth"
FROZEN = ["feature_extraction", "logistic"]
TRAINED = ["fine_tune:frozen=1", "full", "unfreeze:last=2"]


def run(policy: str, seed: int, epochs: int, cache: Path, threads: int, precision: str,
        image_size: int | None = None) -> dict:
    torch.set_num_threads(threads)
    kw = dict(weights=str(WEIGHTS), data=DATA / "hymenoptera", seed=seed, verbose=False, restore_best=True,
              precision=precision, image_size=image_size)
    if policy == "logistic":
        kw.update(policy="feature_extraction", head="logistic", cache_dir=cache)
    elif policy == "feature_extraction":
        kw.update(policy=policy, cache_dir=cache, epochs=epochs)  # equal epochs, on cached features
    else:
        kw.update(policy=policy, epochs=epochs)
    t0 = time.perf_counter()
    r = tk.finetune("timm:tf_efficientnet_lite0", **kw)
    last = r.history[-1].get("val_acc", r.best.get("val_acc")) if r.history else r.best["val_acc"]
    return {"best": r.best["val_acc"], "last": last, "seconds": time.perf_counter() - t0,
            "epochs": len(r.history) or None, "decisions": r.decisions.to_dict()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", nargs="*", default=FROZEN + TRAINED)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of the policies that train the backbone")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--precision", default="auto", help="finetune's precision (auto: its default)")
    ap.add_argument("--image-size", type=int, default=None, help="crop size (default: the backbone's, 224)")
    ap.add_argument("--out", type=Path, default=None, help="append one JSON line per run to this file")
    args = ap.parse_args()
    print(f"# machine: {machine_line(args.threads)}", flush=True)  # the CPU and its flags, with the numbers
    if not WEIGHTS.is_file():
        sys.exit(f"needs {WEIGHTS} (set TRANSFERKIT_DATA)")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, "
          f"torch {torch.__version__}, transferkit {tk.__version__}, precision={args.precision}")
    cache = Path(tempfile.mkdtemp(prefix="tk-lite0-cache-"))
    rows = []
    for policy in args.policies:
        res = []
        for s in range(args.first_seed, args.first_seed + args.seeds):
            res.append(run(policy, s, args.epochs, cache, args.threads, args.precision, args.image_size))
            if args.out is not None:
                with open(args.out, "a") as f:
                    row = {k: v for k, v in res[-1].items() if k != "decisions"}
                    f.write(json.dumps({"policy": policy, "seed": s, "lr": res[-1]["decisions"]["lr"], **row}) + "\n")
        p = res[0]["decisions"]
        rows.append((policy, res, p))
        best, last = [r["best"] for r in res], [r["last"] for r in res]
        print(f"{policy:<22} best {statistics.mean(best):.3f} [{min(best):.3f}-{max(best):.3f}]  last "
              f"{statistics.mean(last):.3f} [{min(last):.3f}-{max(last):.3f}]  "
              f"{statistics.mean(r['seconds'] for r in res):.0f} s/run  per seed "
              f"{', '.join(f'{b:.3f}' for b in best)}  ({p['feature_precision']} features, "
              f"{p['precision']} training, lr {p['lr']:g})", flush=True)
    print("\n| policy | epochs | val acc (best epoch), mean [min-max] | final epoch | seconds per run |")
    print("|---|---:|---:|---:|---:|")
    for policy, res, p in rows:
        best, last = [r["best"] for r in res], [r["last"] for r in res]
        ep = res[0]["epochs"] or "-"
        print(f"| {policy} | {ep} | {statistics.mean(best):.3f} [{min(best):.3f}-{max(best):.3f}] | "
              f"{statistics.mean(last):.3f} [{min(last):.3f}-{max(last):.3f}] | "
              f"{statistics.mean(r['seconds'] for r in res):.0f} |")


if __name__ == "__main__":
    main()
