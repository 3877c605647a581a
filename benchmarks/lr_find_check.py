"""Is the lr finder's suggestion a good rate? Trains at the suggestion and at a tenth and ten times it.

``lr_find`` on EfficientNet-Lite0 (the shared ImageNet weights) for hymenoptera, then
``finetune`` with every other argument at its default, at the suggested rate, at 10x below
and at 10x above it, over a few seeds: the suggestion must not be the worst of the three.
Features are computed once (``cache_dir``) and shared by every run.

    TRANSFERKIT_DATA=../shared/data OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lr_find_check.py \\
        --policy feature_extraction --image-size 224 --seeds 3 --plot lr_find.png
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

from _machine import DATA, machine_line  # noqa: E402  (the script's folder is on sys.path)


def main() -> None:
    import torch

    import transferkit as tk

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="feature_extraction")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--num-steps", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (0: in the main process)")
    ap.add_argument("--plot", default=None, help="where to write the lr-finder plot (PNG)")
    args = ap.parse_args()
    print(f"# machine: {machine_line(args.threads)}", flush=True)  # the CPU and its flags, with the numbers
    torch.set_num_threads(args.threads)
    data = DATA / "hymenoptera"
    weights = DATA / "weights" / "efficientnet-lite0" / "tf_efficientnet_lite0_in1k.pth"
    if not data.is_dir() or not weights.is_file():
        raise SystemExit(f"{data} or {weights} not found; set TRANSFERKIT_DATA")
    warnings.filterwarnings("ignore")
    common = dict(weights=weights, data=data / "train", val_data=data / "val", policy=args.policy,
                  image_size=args.image_size, device=args.device, num_workers=args.num_workers)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        res = tk.lr_find("timm:tf_efficientnet_lite0", num_steps=args.num_steps, plot=args.plot, cache_dir=cache,
                         **common)
        v = res.valley
        print(f"suggested lr {res.suggestion:.2e} (descent {res.lrs[v.start]:.1e} .. {res.lrs[v.end]:.1e}, "
              f"minimum at {v.min_lr:.1e}; {len(res.lrs)} points){'; ' + '; '.join(res.notes) if res.notes else ''}")
        rows = []
        for label, lr in (("suggestion / 10", res.suggestion / 10), ("suggestion", res.suggestion),
                          ("suggestion x 10", res.suggestion * 10)):
            accs, losses = [], []
            for seed in range(args.seeds):
                r = tk.finetune("timm:tf_efficientnet_lite0", lr=lr, epochs=args.epochs, seed=seed, cache_dir=cache,
                                verbose=False, **common)
                accs.append(r.metrics["val_acc"])
                losses.append(r.metrics["val_loss"])
            rows.append((label, lr, accs, losses))
    print(f"\n{args.policy}, {args.image_size} px, {args.epochs} epochs, seeds 0..{args.seeds - 1}")
    print("| lr | rate | val acc (mean, min-max) | val loss (mean) |\n| --- | --- | --- | --- |")
    for label, lr, accs, losses in rows:
        print(f"| {label} | {lr:.2e} | {statistics.mean(accs):.3f} ({min(accs):.3f}-{max(accs):.3f}) | "
              f"{statistics.mean(losses):.3f} |")
    worst = min(rows, key=lambda r: (statistics.mean(r[2]), -statistics.mean(r[3])))
    print(f"\nworst: {worst[0]}; the suggestion is {'NOT ' if worst[0] != 'suggestion' else ''}the worst"
          f" ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
