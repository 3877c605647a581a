"""What the content digests cost: load with and without the check, and hashing at save time.

A ResNet-18 (``tv:resnet18``, 10 outputs, ``weights=None``) is saved as a checkpoint with its
AdamW state and exported to TorchScript; then the median time of ``torch.load`` vs
`transferkit.train.load_checkpoint`, and ``torch.jit.load`` vs
`transferkit.export.load_scripted` (the reader behind ``transferkit.load``), both
from the page cache, and of hashing the checkpoint's content while saving.

    python benchmarks/integrity_cost.py
    python benchmarks/integrity_cost.py --backbone tk:small_cnn --repeats 15
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

import transferkit
from transferkit._integrity import seal
from transferkit.export.torchscript import load_scripted
from transferkit.checkpoints import load_checkpoint, save_checkpoint

from _machine import machine_line  # noqa: E402  (the script's folder is on sys.path)


def median_ms(fn, repeats: int) -> float:
    fn()  # warm the page cache and the allocator
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="tv:resnet18")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    print(f"# machine: {machine_line(args.threads)}", flush=True)  # the CPU and its flags, with the numbers
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    bb = transferkit.get_backbone(args.backbone, weights=None)
    model = transferkit.build_model(bb, 10)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.rand(2, 3, 64, 64)).sum().backward()
    opt.step()
    model.eval()
    labels = [str(i) for i in range(10)]
    with tempfile.TemporaryDirectory() as d:
        ckpt = save_checkpoint(Path(d) / "run.ckpt", model=model, meta={"labels": labels}, optimizer=opt)
        export = Path(d) / "model.pt"
        images = torch.randint(0, 256, (2, 3, args.image_size, args.image_size), dtype=torch.uint8)
        transferkit.export_torchscript(model, export, example_inputs=images,
                                       metadata={"labels": labels, "input_spec": bb.input_spec.to_dict()})
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        rows = [("checkpoint (with AdamW state)", os.path.getsize(ckpt),
                 median_ms(lambda: torch.load(ckpt, map_location="cpu", weights_only=True), args.repeats),
                 median_ms(lambda: load_checkpoint(ckpt), args.repeats)),
                ("TorchScript export", os.path.getsize(export),
                 median_ms(lambda: torch.jit.load(str(export), map_location="cpu"), args.repeats),
                 median_ms(lambda: load_scripted(export), args.repeats))]
        hashing = median_ms(lambda: seal(state), args.repeats)
    print(f"{args.backbone}, {args.threads} thread(s), median of {args.repeats}")
    print("| file | size | load without the check | load with the check | added |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, size, plain, checked in rows:
        print(f"| {name} | {size / 1e6:.0f} MB | {plain:.0f} ms | {checked:.0f} ms | +{checked - plain:.0f} ms |")
    print(f"hashing the checkpoint's content while saving: {hashing:.0f} ms")


if __name__ == "__main__":
    main()
