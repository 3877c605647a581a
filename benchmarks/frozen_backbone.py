"""Frozen-backbone training: transferkit (defaults, and exact fp32) vs the tutorial loop.

The plain loop is written the way the PyTorch transfer-learning tutorial writes it
("ConvNet as fixed feature extractor"): torchvision ``ImageFolder`` + PIL transforms, a
``DataLoader`` with workers, fp32, and the frozen backbone run on every image of every
epoch. All runs use the same backbone, the same eval transform (resize + centre crop at the
backbone's size and interpolation, no augmentation, so accuracies are comparable), the same
head, optimizer and schedule (SGD lr 1e-3, momentum 0.9, batch 4, learning rate x0.1 after 7
epochs, as in the tutorial) and the same thread count; transferkit's ``FeatureNorm`` at the
head's input is turned off (``head_norm=False``) so that every run trains the same head. One
deliberate difference from the tutorial, in its favour: its backbone stays in eval mode.

transferkit runs twice: with its defaults (features computed once; on a CPU that runs bf16
natively, bf16 autocast + channels_last for the extraction) and with ``precision="fp32",
channels_last=False`` (features computed once, exact fp32 path). The difference between the
two is the CPU fast path; between the fp32 run and the plain loop, the feature cache.

Backbones: the shared ImageNet EfficientNet-Lite0 (``timm:tf_efficientnet_lite0``) and
torchvision ResNet-18 with ``weights=None`` (offline). Goals: transferkit's defaults >= 15x
the tutorial loop, validation accuracy within 1 point of it. Each run is its own subprocess
(clean peak memory). On a quiet 2-core machine the whole command takes about 15 minutes.

    python benchmarks/frozen_backbone.py                         # both backbones, 10 epochs
    python benchmarks/frozen_backbone.py --only lite0 --threads 2
    python benchmarks/frozen_backbone.py --epochs 1 --image-size 64   # a smoke test (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TRANSFERKIT_DATA", REPO.parent / "shared" / "data"))
LITE0 = DATA / "weights" / "efficientnet-lite0" / "tf_efficientnet_lite0_in1k.pth"
CONFIGS = {
    "lite0": {"backbone": "timm:tf_efficientnet_lite0", "weights": str(LITE0),
              "label": "timm tf_efficientnet_lite0 (ImageNet weights, shared)"},
    "resnet18": {"backbone": "tv:resnet18", "weights": None, "label": "tv ResNet-18 (weights=None, offline)"},
}
RUNS = ("plain", "transferkit_defaults", "transferkit_fp32")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _spec(cfg: dict, image_size: int | None):
    import transferkit as tk
    from transferkit.facts import resolve_input_spec

    bb = tk.get_backbone(cfg["backbone"], weights=cfg["weights"])
    return bb, resolve_input_spec(bb.input_spec, image_size)


def plain(cfg: dict, args) -> dict:
    """The tutorial's loop: ImageFolder + PIL transforms, the frozen backbone every epoch."""
    import torch
    from torchvision import datasets
    from torchvision import transforms as T

    torch.manual_seed(0)
    t0 = time.perf_counter()
    bb, s = _spec(cfg, args.image_size)
    interp = T.InterpolationMode(s.interpolation)
    resize = T.Resize(s.resize_size, interp) if s.resize_size else T.Resize((s.image_size, s.image_size), interp)
    tf = T.Compose([resize, T.CenterCrop(s.image_size), T.ToTensor(), T.Normalize(s.mean, s.std)])
    ds = {p: datasets.ImageFolder(str(DATA / "hymenoptera" / p), tf) for p in ("train", "val")}
    loaders = {p: torch.utils.data.DataLoader(ds[p], batch_size=4, shuffle=p == "train", num_workers=args.workers,
                                              persistent_workers=args.workers > 0) for p in ds}
    trunk, head = bb.trunk, torch.nn.Linear(bb.num_features, 2)
    model = torch.nn.Sequential(trunk, head)
    for p in trunk.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(head.parameters(), lr=1e-3, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.1)
    crit = torch.nn.CrossEntropyLoss()
    best = 0.0
    for _ in range(args.epochs):
        for phase in ("train", "val"):
            head.train(phase == "train")
            trunk.eval()
            correct = 0
            for x, y in loaders[phase]:
                with torch.set_grad_enabled(phase == "train"):
                    out = model(x)
                    loss = crit(out, y)
                    if phase == "train":
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                correct += (out.argmax(1) == y).sum().item()
            if phase == "train":
                sched.step()
            else:
                best = max(best, correct / len(ds["val"]))
    return {"seconds": time.perf_counter() - t0, "best_val_acc": best, "peak_rss_mb": _peak_rss_mb(),
            "speed": "fp32, contiguous (the tutorial)"}


def _speed_summary(result) -> str:
    plan = getattr(result, "plan", None)
    if plan is None:
        return "(this version of finetune() does not expose its resolved speed settings)"
    return plan.summary().splitlines()[-1].split(":", 1)[1].strip()  # the plan's own "speed:" line


def _transferkit(cfg: dict, args, **speed) -> dict:
    import transferkit as tk

    t0 = time.perf_counter()
    r = tk.finetune(cfg["backbone"], weights=cfg["weights"], data=DATA / "hymenoptera", policy="feature_extraction",
                    epochs=args.epochs, batch_size=4, lr=1e-3, optimizer="sgd", momentum=0.9, weight_decay=0.0,
                    schedule="step", schedule_options={"step_epochs": 7, "gamma": 0.1}, num_workers=args.workers,
                    device="cpu", verbose=False, restore_best=False, head_norm=False, image_size=args.image_size,
                    **speed)
    return {"seconds": time.perf_counter() - t0, "best_val_acc": r.best["val_acc"], "peak_rss_mb": _peak_rss_mb(),
            "features_s": r.timings.get("features_s"), "train_s": r.timings.get("train_s"),
            "used_feature_cache": r.used_feature_cache, "speed": _speed_summary(r)}


def transferkit_defaults(cfg: dict, args) -> dict:
    return _transferkit(cfg, args)


def transferkit_fp32(cfg: dict, args) -> dict:
    return _transferkit(cfg, args, precision="fp32", channels_last=False)


FUNCS = {"plain": plain, "transferkit_defaults": transferkit_defaults, "transferkit_fp32": transferkit_fp32}


def _child(name: str, part: str, args) -> dict:
    from _machine import run_child

    argv = ["--child", name, "--only", part, "--epochs", str(args.epochs), "--workers", str(args.workers),
            "--threads", str(args.threads)] + (["--image-size", str(args.image_size)] if args.image_size else [])
    return run_child(__file__, argv, f"[{part}] {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=sorted(CONFIGS), action="append")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--image-size", type=int, default=None, help="crop size (default: the backbone's, 224)")
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

    print(f"# frozen backbone, {args.epochs} epochs, hymenoptera (245 train + 153 val) at "
          f"{args.image_size or 224} px, batch 4, {args.workers} decoding workers\n# {machine_line(args.threads)}")
    for part in args.only or ("lite0", "resnet18"):
        cfg = CONFIGS[part]
        run = {name: _child(name, part, args) for name in RUNS}
        p = run["plain"]
        print(f"\n## {cfg['label']}\n")
        print("| run | wall s | vs tutorial loop | best val acc | peak RSS MB | features s |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, label in (("plain", "tutorial loop (backbone every epoch, fp32)"),
                            ("transferkit_defaults", "transferkit, defaults"),
                            ("transferkit_fp32", "transferkit, precision='fp32', channels_last=False")):
            r = run[name]
            feats = "-" if r.get("features_s") is None else f"{r['features_s']:.1f}"
            print(f"| {label} | {r['seconds']:.1f} | {p['seconds'] / r['seconds']:.1f}x | {r['best_val_acc']:.3f} | "
                  f"{r['peak_rss_mb']:.0f} | {feats} |")
        d, f = run["transferkit_defaults"], run["transferkit_fp32"]
        print(f"\ndefaults vs tutorial loop: **{p['seconds'] / d['seconds']:.1f}x** (goal >= 15x), accuracy "
              f"{100 * (d['best_val_acc'] - p['best_val_acc']):+.1f} points (goal within 1); defaults vs fp32: "
              f"{f['seconds'] / d['seconds']:.2f}x, accuracy "
              f"{100 * (d['best_val_acc'] - f['best_val_acc']):+.1f} points")
        print(f"\ntransferkit defaults resolved to: {d['speed']}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
