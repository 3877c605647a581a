"""Full fine-tuning throughput: transferkit vs a plain PyTorch loop, images/s and peak memory.

Both train every parameter of the backbone (``policy="full"``) on hymenoptera ``train``
(245 images) at 224 px with batch 32, the standard augmentation (random-resized crop +
flip), SGD (lr 1e-3, momentum 0.9), no validation, for ``--epochs`` epochs; images/s counts
the images trained on (full batches: 7 per epoch) over the training time. The plain loop is
the PyTorch tutorial's: torchvision ``ImageFolder`` + PIL transforms, ``DataLoader`` with
workers, fp32, contiguous tensors, every JPEG decoded every epoch. transferkit runs with its
defaults (on a CPU: channels_last for convolutional trunks, decoding once when the run
decodes every image each epoch, and bf16 autocast training where the CPU runs bf16 natively)
and, for reference, with ``precision="bf16"`` (the defaults themselves on such a CPU; bf16
emulated, and slower, on one without). Goal: transferkit's defaults >= 1.8x the plain loop. Peak memory is the
child process's peak RSS. Each run is its own subprocess.

    python benchmarks/finetune_throughput.py                    # lite0 and ResNet-18, 2 epochs
    python benchmarks/finetune_throughput.py --only resnet18 --epochs 3 --threads 2
    python benchmarks/finetune_throughput.py --epochs 1 --image-size 64 --batch 8   # smoke test
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
CONFIGS = {
    "lite0": {"backbone": "timm:tf_efficientnet_lite0", "weights": str(LITE0), "label": "timm tf_efficientnet_lite0"},
    "resnet18": {"backbone": "tv:resnet18", "weights": None, "label": "tv ResNet-18 (weights=None)"},
}
RUNS = ("plain", "transferkit_defaults", "transferkit_bf16")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plain(cfg: dict, args) -> dict:
    import torch
    from torchvision import datasets
    from torchvision import transforms as T

    import transferkit as tk
    from transferkit.facts import resolve_input_spec

    torch.manual_seed(0)
    bb = tk.get_backbone(cfg["backbone"], weights=cfg["weights"])
    s = resolve_input_spec(bb.input_spec, args.image_size)
    tf = T.Compose([T.RandomResizedCrop(s.image_size, interpolation=T.InterpolationMode(s.interpolation)),
                    T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(s.mean, s.std)])
    ds = datasets.ImageFolder(str(DATA / "hymenoptera" / "train"), tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                                         persistent_workers=args.workers > 0, drop_last=True)
    model = torch.nn.Sequential(bb.trunk, torch.nn.Linear(bb.num_features, 2))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    crit = torch.nn.CrossEntropyLoss()
    model.train()
    t0, n = time.perf_counter(), 0
    for _ in range(args.epochs):
        for x, y in loader:
            loss = crit(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += len(y)
    sec = time.perf_counter() - t0
    return {"seconds": sec, "images": n, "images_per_s": n / sec, "peak_rss_mb": _peak_rss_mb(),
            "speed": "fp32, contiguous, decoding every epoch"}


def _transferkit(cfg: dict, args, **extra) -> dict:
    import transferkit as tk

    r = tk.finetune(cfg["backbone"], weights=cfg["weights"], data=DATA / "hymenoptera" / "train", val_split=0,
                    policy="full", epochs=args.epochs, batch_size=args.batch, lr=1e-3, optimizer="sgd",
                    momentum=0.9, weight_decay=0.0, schedule="constant", augment="standard",
                    num_workers=args.workers, device="cpu", verbose=False, restore_best=False,
                    image_size=args.image_size, **extra)
    n = 245 // args.batch * args.batch * args.epochs  # drop_last: full batches only
    sec = r.timings["train_s"]
    lines = r.decisions.summary().splitlines()
    desc = "; ".join(line.split(":", 1)[1].strip() for line in lines if line.strip().startswith("speed:"))
    decode = next((line.split(":", 1)[1].strip() for line in lines if line.strip().startswith("images:")),
                  "decoded every epoch")
    return {"seconds": sec, "images": n, "images_per_s": n / sec, "peak_rss_mb": _peak_rss_mb(), "speed": desc,
            "decode": decode,
            "setup_s": r.timings.get("setup_s"), "total_s": r.timings.get("total_s")}


def transferkit_defaults(cfg: dict, args) -> dict:
    return _transferkit(cfg, args)


def transferkit_bf16(cfg: dict, args) -> dict:
    return _transferkit(cfg, args, precision="bf16")


FUNCS = {"plain": plain, "transferkit_defaults": transferkit_defaults, "transferkit_bf16": transferkit_bf16}


def _child(name: str, part: str, args) -> dict:
    from _machine import run_child

    argv = ["--child", name, "--only", part, "--epochs", str(args.epochs), "--workers", str(args.workers),
            "--threads", str(args.threads), "--batch", str(args.batch)] + (["--image-size", str(args.image_size)] if args.image_size else [])
    return run_child(__file__, argv, f"[{part}] {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=sorted(CONFIGS), action="append")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--child", choices=sorted(FUNCS))
    args = ap.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(FUNCS[args.child](CONFIGS[args.only[0]], args)))
        return
    if not (DATA / "hymenoptera").is_dir() or not LITE0.is_file():
        raise SystemExit(f"{DATA / 'hymenoptera'} or {LITE0} not found (set TRANSFERKIT_DATA)")
    sys.path.insert(0, str(Path(__file__).parent))
    from _machine import machine_line

    print(f"# full fine-tuning, {args.epochs} epochs of hymenoptera train (245) at {args.image_size or 224} px, "
          f"batch {args.batch}, {args.workers} decoding workers\n# {machine_line(args.threads)}")
    for part in args.only or ("lite0", "resnet18"):
        run = {name: _child(name, part, args) for name in RUNS}
        p = run["plain"]
        print(f"\n## {CONFIGS[part]['label']}\n")
        print("| run | images/s | vs plain loop | train s | peak RSS MB |\n|---|---:|---:|---:|---:|")
        for name, label in (("plain", "plain PyTorch loop"), ("transferkit_defaults", "transferkit, defaults"),
                            ("transferkit_bf16", "transferkit, precision='bf16' (reference)")):
            r = run[name]
            print(f"| {label} | {r['images_per_s']:.1f} | {r['images_per_s'] / p['images_per_s']:.2f}x | "
                  f"{r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |")
        d = run["transferkit_defaults"]
        print(f"\ntransferkit defaults / plain: **{d['images_per_s'] / p['images_per_s']:.2f}x** (goal >= 1.8x); "
              f"resolved to: {d['speed']}; decoding: {d['decode']}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
