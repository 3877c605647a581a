"""The feature-extraction pipeline and its floors: decoding alone, the backbone alone, both.

On hymenoptera (train + val, 398 JPEGs) at the backbone's size:

- decoding alone: transferkit's loader (Pillow draft-mode decoding, resize, centre crop,
  uint8 tensors) with 0, 1, ... ``--workers`` worker processes, no model;
- backbone alone: the same images already decoded in memory, through ``model.features``
  in fp32 (contiguous) and with transferkit's CPU fast path (``SpeedConfig.make(...,
  frozen=True)``: bf16 autocast + channels_last where the CPU runs bf16 natively), at
  transferkit's extraction batch size for the device;
- pipeline: `transferkit.train.features.compute_features` (decoding in workers,
  overlapped with the backbone in the main process) with the fast path.

The pipeline cannot beat the slower of its two stages; with decoding in workers it should
come close to it (on a 2-core machine the workers and the backbone share the cores).

    python benchmarks/feature_pipeline.py                       # lite0 and tv:resnet18, 1 thread, 2 workers
    python benchmarks/feature_pipeline.py --models tv:resnet18 --threads 2 --workers 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from _machine import DATA  # noqa: E402  (the script's folder is on sys.path)
LITE0 = DATA / "weights" / "efficientnet-lite0" / "tf_efficientnet_lite0_in1k.pth"


def datasets(spec):
    from transferkit.data import ImageFolderDataset, eval_transform

    tf = eval_transform(spec)
    return [ImageFolderDataset(DATA / "hymenoptera" / p, transform=tf, min_size=spec.resize_size or spec.image_size)
            for p in ("train", "val")]


def decode_alone(spec, workers: int, batch: int) -> float:
    from transferkit.train.loaders import make_loader

    t0, n = time.perf_counter(), 0
    for ds in datasets(spec):
        for _, y in make_loader(ds, batch_size=batch, shuffle=False, device=torch.device("cpu"), num_workers=workers):
            n += len(y)
    return n / (time.perf_counter() - t0)


def backbone_alone(model, images: torch.Tensor, speed, batch: int) -> float:
    model.eval()
    speed.prepare(model)
    with torch.no_grad(), speed.feature_autocast():
        model.features(speed.to_device(images[:batch]))  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(images), batch):
            model.features(speed.to_device(images[i:i + batch]))
    s = time.perf_counter() - t0
    model.to(memory_format=torch.contiguous_format)
    return len(images) / s


def pipeline(model, spec, speed, workers: int, batch: int) -> float:
    from transferkit.train.features import compute_features

    speed.prepare(model)

    def forward(x):
        with speed.feature_autocast():
            return model.features(speed.to_device(x))

    t0, n = time.perf_counter(), 0
    for ds in datasets(spec):
        store = compute_features(model, ds, key="bench", views=1, batch_size=batch, device=speed.device,
                                 num_workers=workers, seed=0, forward=forward)
        n += len(store)
    s = time.perf_counter() - t0
    model.to(memory_format=torch.contiguous_format)
    return n / s


def main() -> None:
    import transferkit as tk
    from transferkit.train.speed import SpeedConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["timm:tf_efficientnet_lite0", "tv:resnet18"])
    ap.add_argument("--workers", type=int, default=2, help="decoding workers of the pipeline (and the largest "
                                                           "count timed for decoding alone)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit", type=int, default=None, help="images for the backbone-alone runs (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not (DATA / "hymenoptera").is_dir():
        raise SystemExit(f"{DATA / 'hymenoptera'} not found (set TRANSFERKIT_DATA)")
    sys.path.insert(0, str(Path(__file__).parent))
    from _machine import machine_line

    print(f"# feature-extraction pipeline: {machine_line(args.threads)}\n")
    cpu = torch.device("cpu")
    print("| backbone | stage | setting | images/s |\n|---|---|---|---:|")
    autos = []
    for name in args.models:
        torch.manual_seed(0)
        bb = tk.get_backbone(name, weights=LITE0 if "lite0" in name else None)
        model = tk.build_model(bb, 2)
        spec = bb.input_spec
        fast = SpeedConfig.make(cpu, trunk=bb.trunk, frozen=True)
        fp32 = SpeedConfig.make(cpu, precision="fp32", channels_last=False, trunk=bb.trunk, frozen=True)
        batch = fast.feature_batch_size(32)
        label = f"{name} @ {spec.image_size}"
        for w in sorted({0, 1, args.workers}):
            print(f"| {label} | decoding alone | {w} workers | {decode_alone(spec, w, batch):.0f} |", flush=True)
        images = torch.stack([ds[i][0] for ds in datasets(spec) for i in range(len(ds))])[:args.limit]
        for tag, sp in (("fp32, contiguous", fp32), (f"{fast.feature_precision_resolved}, "
                        f"{'channels_last' if fast.channels_last else 'contiguous'} (auto)", fast)):
            ips = backbone_alone(model, images, sp, batch)
            print(f"| {label} | backbone alone | {tag}, batch {batch} | {ips:.1f} |", flush=True)
        print(f"| {label} | pipeline (compute_features) | auto, {args.workers} workers, batch {batch} | "
              f"{pipeline(model, spec, fast, args.workers, batch):.1f} |", flush=True)
        autos.append(f"{name}: " + "; ".join(f"{k} ({fast.reasons[k]})" for k in ("feature_precision", "channels_last")
                                            if k in fast.reasons))
    print("\nauto: " + "\nauto: ".join(autos))


if __name__ == "__main__":
    main()
