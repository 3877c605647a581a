"""CPU layouts and precisions per backbone, side by side: fp32 contiguous vs channels_last vs
channels_last + bf16 autocast, inference (``model.features``) and a training step, and what
``SpeedConfig.make(..., "auto")`` picks for that trunk and why.

The variants are timed round-robin (one call of each per round, median of ``--rounds``), so
load on a shared machine hits them alike. These are the measurements behind the "auto"
rules in ``transferkit/train/speed.py``.

    python benchmarks/cpu_fast_paths.py                                   # 4 backbones, about 1 minute
    python benchmarks/cpu_fast_paths.py --models timm:vit_tiny_patch16_224 timm:maxvit_nano_rw_256@256 --train
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from _machine import DATA  # noqa: E402  (the script's folder is on sys.path)
WEIGHTS = {"timm:tf_efficientnet_lite0": DATA / "weights" / "efficientnet-lite0" / "tf_efficientnet_lite0_in1k.pth",
           "tk:cifar_resnet20": DATA / "weights" / "cifar-resnet" / "resnet20-12fca82f.th"}
VARIANTS = {"fp32": (False, False), "channels_last": (True, False), "channels_last+bf16": (True, True)}


def measure(name: str, size: int, batch: int, rounds: int, train: bool) -> dict:
    import transferkit as tk
    from transferkit.train.speed import SpeedConfig

    w = WEIGHTS.get(name)
    bb = tk.get_backbone(name, weights=w if w is not None and w.is_file() else None)
    model = tk.build_model(bb, 2, spec=bb.input_spec.replace(image_size=size))
    auto = SpeedConfig.make(torch.device("cpu"), trunk=bb.trunk, frozen=not train, image_size=size)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)

    def call(cl: bool, bf16: bool) -> float:
        fmt = torch.channels_last if cl else torch.contiguous_format
        model.to(memory_format=fmt)
        xx = x.contiguous(memory_format=fmt)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
        t0 = time.perf_counter()
        if train:
            model.train()
            with ctx:
                loss = model(xx).float().logsumexp(1).mean()
            loss.backward()
            model.zero_grad(set_to_none=True)
        else:
            model.eval()
            with torch.no_grad(), ctx:
                model.features(xx)
        return time.perf_counter() - t0

    for v in VARIANTS.values():  # warm-up: oneDNN builds its kernels on the first call
        call(*v)
    times = {k: [] for k in VARIANTS}
    for _ in range(rounds):
        for k, v in VARIANTS.items():
            times[k].append(call(*v))
    med = {k: statistics.median(t) for k, t in times.items()}
    return {"model": f"{name} @ {size}", "img_s": {k: batch / t for k, t in med.items()},
            "ratio": {k: med["fp32"] / t for k, t in med.items()}, "auto": auto}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["timm:tf_efficientnet_lite0", "tv:resnet18",
                                                    "tk:cifar_resnet20@32", "timm:vit_tiny_patch16_224"],
                    help="backbone[@image_size] (weights=None unless shared weights exist)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train", action="store_true", help="time a training step instead of inference")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).parent))
    from _machine import machine_line

    what = "training step (forward + backward)" if args.train else "inference (model.features, no grad)"
    print(f"# {what}, batch {args.batch}, median of {args.rounds} rounds\n# {machine_line(args.threads)}\n")
    print("| backbone | fp32 img/s | channels_last | channels_last + bf16 | auto picks |")
    print("|---|---:|---:|---:|---|")
    for spec in args.models:
        name, _, size = spec.partition("@")
        r = measure(name, int(size or 224), args.batch, args.rounds, args.train)
        a = r["auto"]
        prec = a.precision if args.train else a.feature_precision_resolved
        pick = (f"{prec}, {'channels_last' if a.channels_last else 'contiguous'} "
                f"({a.reasons['channels_last']})")
        cells = [f"{r['img_s'][k]:.1f} ({r['ratio'][k]:.2f}x)" for k in ("channels_last", "channels_last+bf16")]
        print(f"| {r['model']} | {r['img_s']['fp32']:.1f} | {cells[0]} | {cells[1]} | {pick} |", flush=True)


if __name__ == "__main__":
    main()
