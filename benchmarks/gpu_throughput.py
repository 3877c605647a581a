"""GPU fine-tuning throughput of ResNet-50 through transferkit's training step:
fp32 vs bf16 autocast + channels_last (+ torch.compile), images/s and fraction of the card's peak.

Synthetic uint8 batches already on the GPU, so the number is the model's training speed
(decoding is measured by benchmarks/frozen_backbone.py). FLOPs per step are counted with
torch.utils.flop_counter on the real model, not assumed. One call, about 3-5 minutes:

    python benchmarks/gpu_throughput.py                  # writes $OUT/gpu_throughput.json when $OUT is set
    python benchmarks/gpu_throughput.py --no-compile --batch 64 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import transferkit as tk
from transferkit.train.loop import train_one_epoch
from transferkit.train.speed import SpeedConfig

# dense peak TFLOP/s (no sparsity) by card name fragment: (fp32 non-tensor, tf32 tensor, bf16 tensor)
PEAKS = {"H200": (67.0, 494.7, 989.4), "H100 SXM": (67.0, 494.7, 989.4), "H100 PCIe": (51.2, 378.0, 756.0),
         "H100": (67.0, 494.7, 989.4), "A100": (19.5, 156.0, 312.0), "L4": (30.3, 120.0, 242.0)}


class _Batches:
    """A loader-like list of the same GPU batch (``train_one_epoch`` only iterates it)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
        self.x, self.y, self.steps = x, y, steps
        self.sampler = range(steps * len(y))

    def __iter__(self):
        return iter([(self.x, self.y)] * self.steps)


def _peak(name: str) -> tuple[float, float, float] | None:
    return next((v for k, v in PEAKS.items() if k in name), None)


def step_flops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return float(fc.get_total_flops())


def run(variant: str, *, batch: int, steps: int, warmup: int) -> dict:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    bb = tk.get_backbone("tv:resnet50", weights=None)
    model = tk.build_model(bb, 10).to(dev)
    precision = "fp32" if variant == "fp32" else "bf16"
    speed = SpeedConfig.make(dev, precision=precision, channels_last=variant != "fp32", compile="compile" in variant)
    speed.prepare(model)
    runner = speed.maybe_compile(model)
    x = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss = torch.nn.CrossEntropyLoss()
    kw = dict(optimizer=opt, scheduler=None, loss_fn=loss, device=dev, speed=speed, scaler=speed.grad_scaler(),
              verbose=False)
    t_compile = time.perf_counter()
    train_one_epoch(runner, _Batches(x, y, warmup), **kw)  # warm-up (and compilation)
    torch.cuda.synchronize()
    t_compile = time.perf_counter() - t_compile
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    train_one_epoch(runner, _Batches(x, y, steps), **kw)
    torch.cuda.synchronize()
    s = time.perf_counter() - t0
    return {"variant": variant, "images_per_s": batch * steps / s, "step_ms": 1000 * s / steps,
            "warmup_s": t_compile, "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("No CUDA device: this benchmark needs a GPU.")
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name()
    variants = ["fp32", "bf16+channels_last"] + ([] if args.no_compile else ["bf16+channels_last+compile"])
    bb = tk.get_backbone("tv:resnet50", weights=None)
    probe = tk.build_model(bb, 10).cuda()
    xs = torch.randint(0, 256, (8, 3, 224, 224), dtype=torch.uint8, device="cuda")
    flops_per_image = step_flops(probe, xs, torch.zeros(8, dtype=torch.long, device="cuda")) / 8
    del probe
    rows = []
    for v in variants:
        try:
            rows.append(run(v, batch=args.batch, steps=args.steps, warmup=args.warmup))
        except Exception as exc:  # report, keep measuring the other variants
            rows.append({"variant": v, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
        torch.cuda.empty_cache()
    peak = _peak(name)
    print(f"# ResNet-50 fine-tuning at 224 px, batch {args.batch}, {args.steps} timed steps; card: {name}; "
          f"torch {torch.__version__}; {flops_per_image / 1e9:.1f} GFLOP per image per training step (counted)")
    print("| variant | images/s | step ms | TFLOP/s | fraction of peak | peak mem GB | warm-up s |")
    print("|---|---|---|---|---|---|---|")
    base = None
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | failed: {r['error']} |||||")
            continue
        tflops = r["images_per_s"] * flops_per_image / 1e12
        ref = None if peak is None else (peak[1] if r["variant"] == "fp32" else peak[2])
        r.update(tflops=tflops, fraction_of_peak=None if ref is None else tflops / ref)
        frac = "n/a" if ref is None else f"{tflops / ref:.1%} of {ref:.0f}"
        print(f"| {r['variant']} | {r['images_per_s']:.0f} | {r['step_ms']:.1f} | {tflops:.1f} | {frac} | "
              f"{r['peak_mem_gb']:.1f} | {r['warmup_s']:.1f} |")
        base = base or r["images_per_s"]
    if base:
        print("\nspeed-up over fp32: " + ", ".join(f"{r['variant']} {r['images_per_s'] / base:.2f}x"
                                                   for r in rows if "error" not in r))
    print("(fp32 peak shown is the TF32 tensor-core peak, since cuDNN convolutions use TF32 by default)")
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_throughput.json").write_text(json.dumps({"card": name, "torch": torch.__version__,
                                                                "batch": args.batch, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
