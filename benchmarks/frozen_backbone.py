"""Frozen-backbone training and fine-tuning throughput: transferkit vs a plain PyTorch loop.

The plain loop is written the way the PyTorch transfer-learning tutorial writes it
("ConvNet as fixed feature extractor"): torchvision ``ImageFolder`` + PIL transforms, a
``DataLoader`` with workers, and the frozen backbone run on every image of every epoch.
Both sides use the same backbone module, the same eval transform (resize + centre crop,
no augmentation, so accuracies are comparable), the same head, optimizer and schedule
(SGD lr 1e-3, momentum 0.9, batch 4, learning rate x0.1 after 7 epochs, as in the tutorial),
and the same thread count; transferkit's default ``FeatureNorm`` at the head's input is turned
off (``head_norm=False``) so that both sides train the same head and the accuracies must agree. One deliberate difference from the tutorial, in its favour:
its backbone stays in eval mode (the tutorial's ``model.train()`` lets frozen BatchNorm
statistics drift). transferkit decodes JPEGs with Pillow's draft mode (at reduced size)
and computes the features once; that is the point being measured.

Each measurement runs in its own subprocess (clean peak memory, no shared caches).

    .venv/bin/python benchmarks/frozen_backbone.py                 # both parts, 10 epochs
    .venv/bin/python benchmarks/frozen_backbone.py --only a --epochs 10 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TRANSFERKIT_DATA", REPO.parent / "shared" / "data"))
CIFAR_WEIGHTS = DATA / "weights" / "cifar-resnet" / "resnet20-12fca82f.th"
CONFIGS = {
    "a": {"backbone": "tk:cifar_resnet20", "weights": str(CIFAR_WEIGHTS), "label": "CIFAR ResNet-20 @32px (pretrained)"},
    "b": {"backbone": "tv:resnet18", "weights": None, "label": "tv ResNet-18 @224px (weights=None, offline)"},
}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _plain_parts(cfg: dict, workers: int):
    """The tutorial's pieces: ImageFolder datasets with PIL transforms, loaders, model."""
    import torch
    from torchvision import datasets
    from torchvision import transforms as T

    import transferkit as tk

    bb = tk.get_backbone(cfg["backbone"], weights=cfg["weights"])
    s = bb.input_spec
    resize = T.Resize(s.resize_size) if s.resize_size else T.Resize((s.image_size, s.image_size))
    tf = T.Compose([resize, T.CenterCrop(s.image_size), T.ToTensor(), T.Normalize(s.mean, s.std)])
    root = DATA / "hymenoptera"
    ds = {p: datasets.ImageFolder(str(root / p), tf) for p in ("train", "val")}
    loaders = {p: torch.utils.data.DataLoader(ds[p], batch_size=4, shuffle=p == "train", num_workers=workers,
                                              persistent_workers=workers > 0) for p in ds}
    model = torch.nn.Sequential(bb.trunk, torch.nn.Linear(bb.num_features, 2))
    return bb, ds, loaders, model


def plain_frozen(cfg: dict, epochs: int, workers: int) -> dict:
    import torch

    torch.manual_seed(0)
    t0 = time.perf_counter()
    _, ds, loaders, model = _plain_parts(cfg, workers)
    trunk, head = model[0], model[1]
    for p in trunk.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(head.parameters(), lr=1e-3, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.1)
    crit = torch.nn.CrossEntropyLoss()
    best = 0.0
    for _ in range(epochs):
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
    return {"seconds": time.perf_counter() - t0, "best_val_acc": best, "peak_rss_mb": _peak_rss_mb()}


def forward_floor(cfg: dict, epochs: int, workers: int) -> dict:  # noqa: ARG001 (one pass, whatever epochs)
    """One forward pass of the frozen backbone over train + val, decoding included
    (the same transferkit pipeline: draft-mode decoding, uint8 tensors, and on a CPU the
    run's batch size, 4)."""
    import torch

    import transferkit as tk
    from transferkit.data import ImageFolderDataset, eval_transform
    from transferkit.train.loaders import make_loader

    bb = tk.get_backbone(cfg["backbone"], weights=cfg["weights"])
    model = tk.build_model(bb, 2).eval()
    t0 = time.perf_counter()
    n = 0
    with torch.no_grad():
        for part in ("train", "val"):
            ds = ImageFolderDataset(DATA / "hymenoptera" / part, min_size=bb.input_spec.resize_size or bb.input_spec.image_size)
            dl = make_loader(ds.view(transform=eval_transform(bb.input_spec)), batch_size=4, shuffle=False,
                             device=torch.device("cpu"), num_workers=workers)
            for x, _ in dl:
                model.features(x)
                n += len(x)
    return {"seconds": time.perf_counter() - t0, "images": n}


def transferkit_frozen(cfg: dict, epochs: int, workers: int) -> dict:
    import transferkit as tk

    t0 = time.perf_counter()
    r = tk.finetune(cfg["backbone"], weights=cfg["weights"], data=DATA / "hymenoptera", policy="feature_extraction",
                    epochs=epochs, batch_size=4, lr=1e-3, optimizer="sgd", momentum=0.9, weight_decay=0.0,
                    schedule="step", schedule_options={"step_epochs": 7, "gamma": 0.1}, num_workers=workers,
                    device="cpu", verbose=False, restore_best=False, head_norm=False)
    return {"seconds": time.perf_counter() - t0, "best_val_acc": r.best["val_acc"], "peak_rss_mb": _peak_rss_mb(),
            "features_s": r.timings.get("features_s"), "train_s": r.timings.get("train_s")}


def plain_finetune(cfg: dict, epochs: int, workers: int) -> dict:
    """Full fine-tuning, tutorial style (every parameter trains), throughput in images/s."""
    import torch

    torch.manual_seed(0)
    _, ds, loaders, model = _plain_parts(cfg, workers)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    crit = torch.nn.CrossEntropyLoss()
    model.train()
    t0, n = time.perf_counter(), 0
    for _ in range(epochs):
        for x, y in loaders["train"]:
            loss = crit(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += len(y)
    s = time.perf_counter() - t0
    return {"seconds": s, "images_per_s": n / s, "peak_rss_mb": _peak_rss_mb()}


def transferkit_finetune(cfg: dict, epochs: int, workers: int) -> dict:
    import transferkit as tk

    r = tk.finetune(cfg["backbone"], weights=cfg["weights"], data=DATA / "hymenoptera" / "train", val_split=0,
                    policy="full", epochs=epochs, batch_size=4, lr=1e-3, optimizer="sgd", momentum=0.9,
                    weight_decay=0.0, schedule="constant", augment="none", num_workers=workers, device="cpu",
                    verbose=False, restore_best=False)
    from transferkit.data import ImageFolderDataset

    s = r.timings["train_s"]
    n = len(ImageFolderDataset(DATA / "hymenoptera" / "train")) // 4 * 4 * epochs  # drop_last: full batches only
    return {"seconds": s, "images_per_s": n / s, "peak_rss_mb": _peak_rss_mb()}


FUNCS = {f.__name__: f for f in (plain_frozen, forward_floor, transferkit_frozen, plain_finetune, transferkit_finetune)}


def _child(name: str, part: str, epochs: int, workers: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--only", part, "--epochs", str(epochs), "--workers",
           str(workers), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  [{part}] {name}: {json.dumps(res)}", file=sys.stderr, flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=sorted(CONFIGS), action="append")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--ft-epochs", type=int, default=1, help="epochs of the fine-tuning throughput runs")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per process (1: robust on a shared, loaded machine)")
    ap.add_argument("--child", choices=sorted(FUNCS))
    args = ap.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        res = FUNCS[args.child](CONFIGS[args.only[0]], args.epochs, args.workers)
        print(json.dumps(res))
        return
    if not (DATA / "hymenoptera").is_dir():
        raise SystemExit(f"{DATA / 'hymenoptera'} not found (set TRANSFERKIT_DATA)")
    print(f"# frozen backbone, {args.epochs} epochs, hymenoptera (245 train + 153 val), threads={args.threads}, "
          f"workers={args.workers}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for part in args.only or sorted(CONFIGS):
        cfg = CONFIGS[part]
        run = {name: _child(name, part, args.epochs, args.workers, args.threads)
               for name in ("plain_frozen", "transferkit_frozen", "forward_floor")}
        p, t, f = run["plain_frozen"], run["transferkit_frozen"], run["forward_floor"]
        print(f"\n## ({part}) {cfg['label']}")
        print("| run | wall s | best val acc | peak RSS MB |\n|---|---|---|---|")
        print(f"| plain loop (backbone every epoch) | {p['seconds']:.1f} | {p['best_val_acc']:.3f} | {p['peak_rss_mb']:.0f} |")
        print(f"| transferkit (cached features) | {t['seconds']:.1f} | {t['best_val_acc']:.3f} | {t['peak_rss_mb']:.0f} |")
        print(f"| one forward pass over the data (floor) | {f['seconds']:.1f} | - | - |")
        print(f"\nspeed-up plain/transferkit: **{p['seconds'] / t['seconds']:.1f}x** (goal >= 5x, 8x);  "
              f"transferkit / forward floor: **{t['seconds'] / f['seconds']:.2f}** (goal <= 1.5);  "
              f"accuracy difference: {100 * (t['best_val_acc'] - p['best_val_acc']):+.1f} points (goal within 2)")
        pf = _child("plain_finetune", part, args.ft_epochs, args.workers, args.threads)
        tf = _child("transferkit_finetune", part, args.ft_epochs, args.workers, args.threads)
        print(f"\nfull fine-tuning, {args.ft_epochs} epoch(s), batch 4:")
        print("| run | images/s | peak RSS MB |\n|---|---|---|")
        print(f"| plain loop | {pf['images_per_s']:.1f} | {pf['peak_rss_mb']:.0f} |")
        print(f"| transferkit | {tf['images_per_s']:.1f} | {tf['peak_rss_mb']:.0f} |")
        print(f"\nthroughput ratio transferkit/plain: **{tf['images_per_s'] / pf['images_per_s']:.2f}x** (goal >= 1.0)")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
