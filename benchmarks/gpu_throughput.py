"""GPU throughput in one call: ResNet-50 fine-tuning images/s (fp32 vs bf16 + channels_last,
+ torch.compile), the fraction of the card's peak, and the input pipeline alone, so a
starved GPU shows.

1. Training: ResNet-50 at 224 px through transferkit's training step (``train_one_epoch``
   with a ``SpeedConfig``) on synthetic uint8 batches already on the GPU: the model's speed
   alone. FLOPs per step are counted with ``torch.utils.flop_counter`` on the real model.
2. Input pipeline: a JPEG folder (hymenoptera from ``$TRANSFERKIT_DATA`` when present, else
   a synthetic folder of 500x375 JPEGs written to a temporary directory) decoded to 224 px
   uint8 batches (a) by transferkit's CPU loader (Pillow, draft mode) with 0..N workers,
   (b) by `transferkit.data.gpu_jpeg` (workers read bytes, nvJPEG decodes each batch on
   the GPU, resize and crop there), (c) nvJPEG alone on bytes in memory.

3. The frozen feature pass on each engine (`transferkit.train.engines`): ResNet-50 at
   224 px, batch 256, eager bf16 + channels_last, torch.compile (compile time counted
   apart), ONNX Runtime where it has a CUDA provider; features compared with eager fp32;
   and the engine ``feature_engine="auto"`` picks from that timing.
4. torch.compile for training: the first compiled step (compilation) against the eager step,
   and the run length (images) from which compiling pays (``compile="auto"`` times a run's
   own steps, `transferkit.train.compile_trial`; this checks its compile-time estimate).
5. The input-decode decision (``input_decode="auto"``, `transferkit.data.gpu_jpeg`): the
   JPEG folder's census, the device decoder timed against the CPU workers as a run times
   them (`time_decoders`), and what `decide_input_decode` picks from that, with its reason.

On a machine without CUDA it measures (2a) and (5) with torchvision's CPU decoder standing in
for nvJPEG (the decision then says "no CUDA device"), says so, and exits with status 0.

    python benchmarks/gpu_throughput.py                  # about 3-5 minutes on a GPU; $OUT/gpu_throughput.json
    python benchmarks/gpu_throughput.py --no-compile --batch 64 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from _machine import DATA  # noqa: E402  (the script's folder is on sys.path)
# dense peak TFLOP/s (no sparsity) by card name fragment: (fp32 non-tensor, tf32 tensor, bf16 tensor)
PEAKS = {"H200": (67.0, 494.7, 989.4), "H100 SXM": (67.0, 494.7, 989.4), "H100 PCIe": (51.2, 378.0, 756.0),
         "H100": (67.0, 494.7, 989.4), "A100": (19.5, 156.0, 312.0), "L4": (30.3, 60.0, 121.0),
         "L40S": (91.6, 183.0, 362.0), "A10": (31.2, 62.5, 125.0)}


class _Batches:
    """A loader-like list of the same GPU batch (``train_one_epoch`` only iterates it)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
        self.x, self.y, self.steps = x, y, steps
        self.sampler = range(steps * len(y))

    def __iter__(self):
        return iter([(self.x, self.y)] * self.steps)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _peak(name: str) -> tuple[float, float, float] | None:
    """The dense peaks of the GPU ``name`` names: the longest key it holds ("L40S" before "L4")."""
    return next((PEAKS[k] for k in sorted(PEAKS, key=len, reverse=True) if k in name), None)


def step_flops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return float(fc.get_total_flops())


def train_variant(variant: str, *, batch: int, steps: int, warmup: int, dev: torch.device) -> dict:
    import transferkit as tk
    from transferkit.train.loop import Loop, train_one_epoch
    from transferkit.train.speed import SpeedConfig

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
    loop = Loop(optimizer=opt, loss_fn=torch.nn.CrossEntropyLoss(), set_mode=lambda e: model.train(), speed=speed,
                verbose=False)
    t_warm = time.perf_counter()
    train_one_epoch(runner, _Batches(x, y, 1), loop, verbose=False)  # the first step (with compile: the compilation)
    _sync(dev)
    first = time.perf_counter() - t_warm
    train_one_epoch(runner, _Batches(x, y, max(warmup - 1, 1)), loop, verbose=False)  # warm-up
    _sync(dev)
    t_warm = time.perf_counter() - t_warm
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    train_one_epoch(runner, _Batches(x, y, steps), loop, verbose=False)
    _sync(dev)
    s = time.perf_counter() - t0
    mem = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
    return {"variant": variant, "images_per_s": batch * steps / s, "step_ms": 1000 * s / steps, "warmup_s": t_warm,
            "first_step_s": first, "peak_mem_gb": mem}


def feature_engines(batch: int, dev: torch.device, *, compile: bool = True) -> dict:
    """The frozen pass of ResNet-50 on every engine (``compile=False``: not torch.compile),
    and what feature_engine="auto" picks."""
    import transferkit as tk
    from transferkit.train import engines as eng

    torch.manual_seed(0)
    bb = tk.get_backbone("tv:resnet50", weights=None)
    model = eng.feature_model(bb.trunk, bb.input_spec, dev, channels_last=True)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, generator=g) for _ in range(2)]
    available = eng.engine_availability(dev.type)
    candidates = [e for e, why in available.items() if why is None and e != "eager" and (compile or e != "compile")]
    measured = eng.time_engines(model, batches, device=dev, precision="bf16", channels_last=True,
                                candidates=candidates, n_images=None)
    picks = {}
    for n in (10_000, 1_000_000, 10_000_000):
        # as a run of n images decides: a prepared engine is timed only where its preparation
        # can pay on n images (`compile_pays`, before timing, over the fastest agreeing engine
        # prepared before it); here all were timed, so gate them after
        seen, prior = dict(measured), {"eager": measured["eager"]}
        for e in eng.PREPARED:
            m = seen.get(e, {})
            if "images_per_s" in m:
                pays, why = eng.compile_pays(dev.type, n_images=n, eager_images_per_s=measured["eager"]["images_per_s"],
                                             n_modules=eng.leaf_modules(model), engine=e,
                                             fp32_images_per_s=measured["eager"].get("fp32_images_per_s"),
                                             best=eng.fastest_agreeing(prior, besides=e))
                if not pays:
                    seen[e] = {"skipped": why}
                else:
                    prior[e] = m
        picks[n] = eng.decide_engine("auto", device_type=dev.type, available=available, measured=seen, n_images=n,
                                     precision="bf16")
    return {"available": available, "measured": measured, "picks": picks}


def jpeg_folder(tmp: str, n: int = 512) -> tuple[Path, str]:
    """hymenoptera/train + val when present, else ``n`` synthetic 500x375 JPEGs (smooth
    gradients plus noise, about the size of real photos) in two classes under ``tmp``."""
    real = DATA / "hymenoptera"
    if (real / "train").is_dir():
        return real / "train", f"{real / 'train'} (real JPEGs)"
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500]
    for i in range(n):
        d = Path(tmp, "jpegs", f"c{i % 2}")
        d.mkdir(parents=True, exist_ok=True)
        base = np.stack([(xx * (1 + i % 5) + yy) % 256, (yy * 2 + i) % 256, (xx + yy * 3) % 256], -1)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"{i}.jpg", quality=90)
    return Path(tmp, "jpegs"), f"{n} synthetic 500x375 JPEGs (no {real})"


def cpu_decoding(folder: Path, workers: list[int], batch: int, passes: int) -> list[dict]:
    import transferkit as tk
    from transferkit.data import ImageFolderDataset, eval_transform
    from transferkit.train.loaders import make_loader

    spec = tk.get_backbone("tv:resnet50", weights=None).input_spec
    ds = ImageFolderDataset(folder, transform=eval_transform(spec), min_size=spec.resize_size)
    rows = []
    for w in workers:
        loader = make_loader(ds, batch_size=batch, shuffle=False, device=torch.device("cpu"), num_workers=w)
        next(iter(loader))  # start the workers
        t0, n = time.perf_counter(), 0
        for e in range(passes):
            loader.sampler.set_epoch(e)
            n += sum(len(y) for _, y in loader)
        rows.append({"pipeline": f"CPU loader (Pillow, draft mode), {w} workers",
                     "images_per_s": n / (time.perf_counter() - t0)})
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def _is_jpeg(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(3) == b"\xff\xd8\xff"


def gpu_decoding(folder: Path, workers: list[int], batch: int, passes: int) -> list[dict]:
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    import transferkit as tk
    from transferkit.data import ImageFolderDataset
    from transferkit.data.gpu_jpeg import gpu_jpeg_available, gpu_jpeg_loader

    dev = torch.device("cuda")
    ok, why = gpu_jpeg_available(dev)
    if not ok:
        return [{"pipeline": "GPU JPEG decoding", "error": why}]
    spec = tk.get_backbone("tv:resnet50", weights=None).input_spec
    ds = ImageFolderDataset(folder)
    rows = []
    for w in workers:
        loader = gpu_jpeg_loader(ds, spec, augment="none", batch_size=batch, device=dev, num_workers=w)
        next(iter(loader))
        torch.cuda.synchronize()
        t0, n = time.perf_counter(), 0
        for e in range(passes):
            loader.set_epoch(e)
            n += sum(len(y) for _, y in loader)
        torch.cuda.synchronize()
        rows.append({"pipeline": f"transferkit gpu_jpeg loader (nvJPEG + resize/crop on GPU), {w} workers",
                     "images_per_s": n / (time.perf_counter() - t0)})
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    data = [read_file(p) for p, _ in ds.samples if _is_jpeg(p)]
    decode_jpeg(data[:batch], device=dev, mode=ImageReadMode.RGB)
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 0
    for _ in range(passes):
        for i in range(0, len(data), batch):
            n += len(decode_jpeg(data[i:i + batch], device=dev, mode=ImageReadMode.RGB))
    torch.cuda.synchronize()
    rows.append({"pipeline": "nvJPEG alone (bytes in memory, full size, no resize)",
                 "images_per_s": n / (time.perf_counter() - t0)})
    return rows


def input_decode_choice(folder: Path, *, batch: int, workers: int, device: torch.device) -> dict:
    """What ``input_decode="auto"`` decides on ``folder`` on ``device``: the census, the two
    decoders timed as a run times them (as many batches as the folder holds, up to 8), the pick."""
    import transferkit as tk
    from transferkit.data import ImageFolderDataset
    from transferkit.data.gpu_jpeg import decide_input_decode, gpu_jpeg_available, jpeg_census, time_decoders

    spec = tk.get_backbone("tv:resnet50", weights=None).input_spec
    ds = ImageFolderDataset(folder, min_size=spec.resize_size)
    facts: dict = {"census": jpeg_census(ds), "available": None, "measured": None, "skipped": None}
    if device.type == "cuda":
        facts["available"] = list(gpu_jpeg_available(device))
    if facts["available"] is None or facts["available"][0]:
        try:
            facts["measured"] = time_decoders(ds, spec, device=device, batch_size=batch, num_workers=workers,
                                              batches=max(1, min(8, len(ds) // batch - 1)))
        except Exception as exc:  # report, keep the rest of the table
            facts["skipped"] = f"timing failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    where, why = decide_input_decode("auto", device_type=device.type, facts=facts)
    return {"device": str(device), "facts": facts, "where": where, "reason": why}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="leave torch.compile out (training and the frozen pass)")
    ap.add_argument("--passes", type=int, default=3, help="passes over the JPEG folder per decoding measurement")
    ap.add_argument("--workers", type=int, nargs="+", default=None,
                    help="decoding worker counts (default: 0, 2, and the CPUs up to 16)")
    ap.add_argument("--device", default=None,
                    help="where parts 1, 3 and 4 run (default: cuda when present, else they are skipped); "
                         "'--device cpu' with a small --batch and --feature-batch is a smoke run of them")
    ap.add_argument("--feature-batch", type=int, default=None, help="batch of the frozen pass (default: 2 x batch, "
                                                                    "at least 256)")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from _machine import machine_line

    print(f"# {machine_line()}")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = args.workers or sorted({0, min(2, cpus), min(16, cpus)})
    cuda = torch.cuda.is_available()
    dev = torch.device(args.device) if args.device else torch.device("cuda") if cuda else None
    feature_batch = args.feature_batch or max(args.batch, 128) * 2
    report: dict = {"machine": machine_line(), "torch": torch.__version__, "batch": args.batch}
    rows = []
    if dev is not None:
        torch.backends.cudnn.benchmark = True
        import transferkit as tk

        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{dev.type} (smoke run)"
        variants = ["fp32", "bf16+channels_last"] + ([] if args.no_compile else ["bf16+channels_last+compile"])
        probe = tk.build_model(tk.get_backbone("tv:resnet50", weights=None), 10).to(dev)
        xs = torch.randint(0, 256, (8, 3, 224, 224), dtype=torch.uint8, device=dev)
        flops_per_image = step_flops(probe, xs, torch.zeros(8, dtype=torch.long, device=dev)) / 8
        del probe
        for v in variants:
            try:
                rows.append(train_variant(v, batch=args.batch, steps=args.steps, warmup=args.warmup, dev=dev))
            except Exception as exc:  # report, keep measuring the other variants
                rows.append({"variant": v, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
            print(f"  {rows[-1]}", file=sys.stderr, flush=True)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        peak = _peak(name)
        print(f"\n## ResNet-50 fine-tuning at 224 px, batch {args.batch}, {args.steps} timed steps; card: {name}; "
              f"{flops_per_image / 1e9:.1f} GFLOP per image per training step (counted)\n")
        print("| variant | images/s | step ms | TFLOP/s | fraction of peak | peak mem GB | warm-up s |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        base = None
        for r in rows:
            if "error" in r:
                print(f"| {r['variant']} | failed: {r['error']} |||||")
                continue
            tflops = r["images_per_s"] * flops_per_image / 1e12
            ref = None if peak is None else (peak[1] if r["variant"] == "fp32" else peak[2])
            r.update(tflops=tflops, fraction_of_peak=None if ref is None else tflops / ref)
            frac = "n/a (card not in PEAKS)" if ref is None else f"{tflops / ref:.1%} of {ref:.0f}"
            print(f"| {r['variant']} | {r['images_per_s']:.0f} | {r['step_ms']:.1f} | {tflops:.1f} | {frac} | "
                  f"{r['peak_mem_gb']:.1f} | {r['warmup_s']:.1f} |")
            base = base or r["images_per_s"]
        if base:
            print("\nspeed-up over fp32: " + ", ".join(f"{r['variant']} {r['images_per_s'] / base:.2f}x"
                                                       for r in rows if "error" not in r))
        print("(the fp32 row's peak is the TF32 tensor-core peak: cuDNN convolutions use TF32 by default)")
        report.update(card=name, flops_per_image=flops_per_image, training=rows)
        eager = next((r for r in rows if r["variant"] == "bf16+channels_last" and "error" not in r), None)
        for r in rows:
            if "compile" in r["variant"] and "error" not in r and eager is not None:
                gain = 1 / eager["images_per_s"] - 1 / r["images_per_s"]
                extra = r["first_step_s"] - eager["step_ms"] / 1000
                r["break_even_images"] = extra / gain if gain > 0 else None
                print(f"\ntorch.compile for training: first step {r['first_step_s']:.1f} s (eager step "
                      f"{eager['step_ms'] / 1000:.3f} s), {r['images_per_s'] / eager['images_per_s']:.2f}x after it: "
                      + (f"pays from {extra / gain:,.0f} training images (epochs x images)" if gain > 0 else
                         "never pays (not faster)"))
        try:
            fe = feature_engines(feature_batch, dev, compile=not args.no_compile)
        except Exception as exc:  # report, keep the rest of the table
            fe = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        report["feature_engines"] = fe
        print(f"\n## Frozen feature pass, ResNet-50 at 224 px, batch {feature_batch}, per engine\n")
        if "error" in fe:
            print(f"failed: {fe['error']}")
        else:
            print("| engine | precision | images/s | relative difference to eager fp32 | setup s |\n|---|---|---:|---:|---:|")
            for e, m in fe["measured"].items():
                if "images_per_s" in m:
                    print(f"| {e} | {m['precision']} | {m['images_per_s']:.0f} | {m['rel_diff']:.2g} | "
                          f"{m['setup_s']:.1f} |")
                else:
                    print(f"| {e} | | {m.get('skipped') or m.get('error')} | | |")
            for e, why in fe["available"].items():
                if why is not None:
                    print(f"| {e} | | unavailable: {why} | | |")
            for n, (e, why) in fe["picks"].items():
                print(f"\nfeature_engine='auto' for {n:,} images: {e} ({why})")
    with tempfile.TemporaryDirectory() as tmp:
        folder, what = jpeg_folder(tmp)
        pipe = cpu_decoding(folder, workers, min(args.batch, 64), args.passes)
        if cuda:
            pipe += gpu_decoding(folder, [w for w in workers if w > 0] or [2], args.batch, args.passes)
        choice = input_decode_choice(folder, batch=min(args.batch, 64), workers=max(workers),
                                     device=torch.device("cuda" if cuda else "cpu"))
    print(f"\n## Input pipeline alone: {what} to uint8 224 px batches, {args.passes} passes\n")
    print("| pipeline | images/s |\n|---|---:|")
    for r in pipe:
        print(f"| {r['pipeline']} | {r['images_per_s']:.0f} |" if "error" not in r else
              f"| {r['pipeline']} | unavailable: {r['error']} |")
    report["input_pipeline"] = pipe
    report["input_decode"] = choice
    m = choice["facts"]["measured"]
    census = choice["facts"]["census"]
    print(f"\n## input_decode='auto' on this folder ({census['jpeg']} of {census['files']} files JPEG), "
          f"{choice['device']}\n")
    if m:
        stand_in = "" if cuda else " (torchvision's CPU decoder standing in for nvJPEG: no CUDA here)"
        print(f"| decoder | images/s |\n|---|---:|\n| CPU workers (Pillow), {m['workers']} workers | "
              f"{m['cpu_images_per_s']:.0f} |\n| device decoder{stand_in} | {m['gpu_images_per_s']:.0f} |")
    print(f"\ninput_decode='auto' picks: {choice['where']} ({choice['reason']})")
    trained = [r["images_per_s"] for r in rows if "error" not in r]
    if trained:
        best_cpu = max(r["images_per_s"] for r in pipe if r["pipeline"].startswith("CPU"))
        gpu_rows = [r["images_per_s"] for r in pipe if "error" not in r and "gpu_jpeg" in r["pipeline"]]
        print(f"\nfastest training variant {max(trained):.0f} images/s vs CPU decoding {best_cpu:.0f} images/s: "
              f"{'the GPU is starved by CPU decoding' if best_cpu < max(trained) else 'CPU decoding keeps up'}"
              + (f"; GPU decoding {max(gpu_rows):.0f} images/s" if gpu_rows else ""))
    else:
        print("\nNo CUDA device on this machine: the training and GPU decoding parts were skipped (CPU decoding "
              "above). Run this script on a machine with an NVIDIA GPU for the full table.")
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "gpu_throughput.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
