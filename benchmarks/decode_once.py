"""Decode once vs decoding every epoch: the input pipeline's epoch time, side by side.

hymenoptera ``train`` (245 JPEGs) at 224 px with the standard augmentation (random-resized
crop + flip). "every epoch": transferkit's training loader over the image files (Pillow
draft-mode decoding, resize, crop, flip in ``--workers`` processes). "decode once": the
same images decoded and resized to 256 px once (`transferkit.data.decoded.decoded_dataset`),
then only the crop and flip per epoch (in the main process). Only the loader is timed (no
model), so the difference is what each training epoch saves.

    python benchmarks/decode_once.py                   # 5 epochs, 2 workers
    python benchmarks/decode_once.py --epochs 2 --workers 0
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from _machine import DATA  # noqa: E402  (the script's folder is on sys.path)


def epoch_seconds(loader, epochs: int) -> list[float]:
    out = []
    for e in range(epochs):
        loader.sampler.set_epoch(e)
        t0 = time.perf_counter()
        n = sum(len(y) for _, y in loader)
        out.append(time.perf_counter() - t0)
    assert n > 0
    return out


def main() -> None:
    import transferkit as tk
    from transferkit.data import ImageFolderDataset, train_transform
    from transferkit.data.decoded import decoded_dataset
    from transferkit.train.loaders import make_loader

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = DATA / "hymenoptera" / "train"
    if not root.is_dir():
        raise SystemExit(f"{root} not found (set TRANSFERKIT_DATA)")
    spec = tk.get_backbone("tv:resnet18", weights=None).input_spec
    ds = ImageFolderDataset(root, min_size=spec.resize_size)
    cpu = torch.device("cpu")
    sys.path.insert(0, str(Path(__file__).parent))
    from _machine import machine_line

    print(f"# decode once vs every epoch: {len(ds)} images at {spec.image_size} px (stored at {spec.resize_size}), "
          f"{args.workers} workers, batch {args.batch}\n# {machine_line(args.threads)}\n")
    every = make_loader(ds.view(transform=train_transform(spec, "standard")), batch_size=args.batch, shuffle=True,
                        device=cpu, num_workers=args.workers)
    t_every = epoch_seconds(every, args.epochs)
    rows = [("decode every epoch", None, t_every)]
    with tempfile.TemporaryDirectory() as tmp:
        for where, cache_dir in (("decode once, in memory", None), ("decode once, memory-mapped", tmp)):
            t0 = time.perf_counter()
            dec, plan = decoded_dataset(ds, spec, augment="standard", cache_dir=cache_dir, num_workers=args.workers)
            once = time.perf_counter() - t0
            loader = make_loader(dec, batch_size=args.batch, shuffle=True, device=cpu)
            rows.append((f"{where} ({plan.estimate_bytes / 2**20:.0f} MB)", once, epoch_seconds(loader, args.epochs)))
    print("| pipeline | one-off decode s | epoch s (median) | images/s | epoch speed-up |")
    print("|---|---:|---:|---:|---:|")
    base = sorted(t_every)[len(t_every) // 2]
    for label, once, ts in rows:
        med = sorted(ts)[len(ts) // 2]
        print(f"| {label} | {'-' if once is None else f'{once:.2f}'} | {med:.3f} | {len(ds) / med:.0f} | "
              f"{base / med:.1f}x |")


if __name__ == "__main__":
    main()
