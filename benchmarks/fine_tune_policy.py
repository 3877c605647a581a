"""The ``fine_tune`` policy's wall time vs ``full`` at equal epochs.

``policy="fine_tune:frozen=1"`` trains the head alone on cached features for the first
epoch(s), then every parameter; ``policy="full"`` trains every parameter from the first
epoch. Both run ``--epochs`` epochs of hymenoptera (train 245, val 153) at 224 px with the
shared ImageNet EfficientNet-Lite0, batch 32, transferkit's defaults otherwise; the table
gives wall time (``finetune()`` call, end to end), training time and validation accuracy.
Each run is its own subprocess.

    python benchmarks/fine_tune_policy.py                     # 4 epochs, lite0
    python benchmarks/fine_tune_policy.py --epochs 6 --frozen 2 --backbone tv:resnet18
    python benchmarks/fine_tune_policy.py --epochs 2 --image-size 64 --policy unfreeze:last=1   # smoke test
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from _machine import DATA  # noqa: E402  (the script's folder is on sys.path)
LITE0 = DATA / "weights" / "efficientnet-lite0" / "tf_efficientnet_lite0_in1k.pth"


def check_policy(policy: str) -> None:
    """Exit with a clear message when this transferkit does not know ``policy`` yet."""
    from transferkit.errors import PolicyError
    from transferkit.policies import Policy

    try:
        parsed = Policy.parse(policy)
    except PolicyError as exc:
        raise SystemExit(f"This transferkit does not support policy={policy!r} yet ({exc}). The benchmark needs the "
                         "fine_tune policy with a frozen phase; run it on a version that has it.") from exc
    if str(parsed) == str(Policy.parse("full")):
        raise SystemExit(f"This transferkit reads policy={policy!r} as {str(parsed)!r} (no frozen phase): the "
                         "fine_tune policy with frozen epochs is not there yet; run this on a version that has it.")


def run(args) -> dict:
    import transferkit as tk

    weights = str(LITE0) if "lite0" in args.backbone else None
    t0 = time.perf_counter()
    r = tk.finetune(args.backbone, weights=weights, data=DATA / "hymenoptera", policy=args.child_policy,
                    epochs=args.epochs, batch_size=args.batch, num_workers=args.workers, device="cpu", verbose=False,
                    image_size=args.image_size, restore_best=False)
    return {"seconds": time.perf_counter() - t0, "train_s": r.timings.get("train_s"),
            "features_s": r.timings.get("features_s"), "val_acc": r.metrics.get("val_acc"),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "epochs_s": [round(h.get("time_s", h.get("seconds", 0.0)), 2) for h in r.history]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="timm:tf_efficientnet_lite0")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--frozen", type=int, default=1, help="frozen epochs of the fine_tune policy")
    ap.add_argument("--policy", default=None, help="compare another policy with full instead "
                                                   "(default: fine_tune:frozen=<--frozen>)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--child-policy")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.child_policy:
        print(json.dumps(run(args)))
        return
    if not (DATA / "hymenoptera").is_dir() or not LITE0.is_file():
        raise SystemExit(f"{DATA / 'hymenoptera'} or {LITE0} not found (set TRANSFERKIT_DATA)")
    fine_tune = args.policy or f"fine_tune:frozen={args.frozen}"
    if args.policy is None:
        check_policy(fine_tune)
    sys.path.insert(0, str(Path(__file__).parent))
    from _machine import machine_line, run_child

    print(f"# {args.backbone}, {args.epochs} epochs, hymenoptera at {args.image_size or 224} px, batch {args.batch}"
          f"\n# {machine_line(args.threads)}\n")
    rows = {}
    for policy in ("full", fine_tune):
        argv = ["--child-policy", policy, "--backbone", args.backbone, "--epochs", str(args.epochs), "--batch",
                str(args.batch), "--workers", str(args.workers), "--threads", str(args.threads)] + \
            (["--image-size", str(args.image_size)] if args.image_size else [])
        rows[policy] = run_child(__file__, argv, f"policy={policy!r}")
    full = rows["full"]
    print("| policy | wall s | vs full | train s | val acc | peak RSS MB |\n|---|---:|---:|---:|---:|---:|")
    for policy, r in rows.items():
        print(f"| {policy} | {r['seconds']:.1f} | {full['seconds'] / r['seconds']:.2f}x | {r['train_s']:.1f} | "
              f"{r['val_acc']:.3f} | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
