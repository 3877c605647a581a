"""Does bf16 autocast fine-tuning on a CPU keep accuracy? fp32 vs ``precision="bf16"``, side by side.

Full fine-tuning (``policy="full"``) on hymenoptera (train 245, val 153) with finetune's
defaults otherwise, for each seed, in fp32 and in bf16 autocast (fp32 master weights);
final-epoch validation accuracy (``restore_best=False``) and training time. The evidence
``precision="auto"`` would need before it trains in bf16 on a CPU (it does not today).

    python benchmarks/bf16_training.py                           # CIFAR ResNet-20 @ 32 px, 10 epochs, 3 seeds
    python benchmarks/bf16_training.py --case lite0 --epochs 5 --seeds 2   # lite0 @ 224 px: long on a CPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

import torch

from _machine import DATA  # noqa: E402  (the script's folder is on sys.path)
CASES = {
    "resnet20": ("tk:cifar_resnet20", DATA / "weights" / "cifar-resnet" / "resnet20-12fca82f.th", 32),
    "lite0": ("timm:tf_efficientnet_lite0", DATA / "weights" / "efficientnet-lite0" / "tf_efficientnet_lite0_in1k.pth",
              None),
}


def main() -> None:
    import transferkit as tk

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=sorted(CASES), default="resnet20")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(Path(__file__).parent))
    from _machine import machine_line

    backbone, weights, size = CASES[args.case]
    if not (DATA / "hymenoptera").is_dir() or not weights.is_file():
        raise SystemExit(f"{DATA / 'hymenoptera'} or {weights} not found (set TRANSFERKIT_DATA)")
    print(f"# {backbone} @ {size or 224} px, policy='full', {args.epochs} epochs, seeds 0-{args.seeds - 1}\n"
          f"# {machine_line(args.threads)}\n")
    res: dict[str, list[tuple[float, float]]] = {"fp32": [], "bf16": []}
    for seed in range(args.seeds):
        for precision in res:
            r = tk.finetune(backbone, weights=weights, data=DATA / "hymenoptera", policy="full", epochs=args.epochs,
                            image_size=size, precision=precision, seed=seed, device="cpu", verbose=False,
                            restore_best=False)
            res[precision].append((r.metrics["val_acc"], r.timings["train_s"]))
            print(f"  seed {seed} {precision}: {res[precision][-1]}", file=sys.stderr, flush=True)
    print("| precision | " + " | ".join(f"seed {s}" for s in range(args.seeds)) + " | mean acc | train s (mean) |")
    print("|---|" + "---:|" * (args.seeds + 2))
    for precision, rows in res.items():
        print(f"| {precision} | " + " | ".join(f"{a:.3f}" for a, _ in rows) +
              f" | {statistics.mean(a for a, _ in rows):.3f} | {statistics.mean(t for _, t in rows):.1f} |")
    d = [100 * (b[0] - a[0]) for a, b in zip(res["fp32"], res["bf16"])]
    speed = statistics.mean(t for _, t in res["fp32"]) / statistics.mean(t for _, t in res["bf16"])
    print(f"\nbf16 - fp32: {statistics.mean(d):+.1f} points on average (per seed {', '.join(f'{x:+.1f}' for x in d)}); "
          f"bf16 trains {speed:.2f}x as fast")


if __name__ == "__main__":
    main()
