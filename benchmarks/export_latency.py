"""CPU latency of the exported TorchScript module, the ONNX export on ONNX Runtime and the eager model, side by side.

For each backbone, the model (preprocessing + trunk + a 10-class head) is exported with
[`transferkit.export_torchscript`][transferkit.export_torchscript]: plain, ``optimize=True`` (for convolutional trunks
``freeze_channels_last``: frozen, weights in channels_last), and ``optimize=True`` without
the channels_last candidate (plain ``freeze``, for comparison). Each file is reloaded from
disk. The model is also exported to ONNX (`transferkit.export.export_onnx`) and loaded the
way ``transferkit.load("model.onnx")`` loads it (an onnxruntime session, CPU provider, as
many threads as torch), when onnxruntime is installed. The median time of a forward pass on
raw uint8 images (audio backbones: float waveforms of ``@N`` seconds) is measured at batch size 1 and 32 for eager and
every export, interleaved round by round so that machine load hits all alike. Goal: exported no slower than eager (ratio eager/exported >= 1.0).

    python benchmarks/export_latency.py                      # tk:small_cnn@32, tv:resnet18@224
    python benchmarks/export_latency.py --models tv:resnet50@224 --repeats 10 --threads 4
    python benchmarks/export_latency.py --models ta:wav2vec2_tiny@1 ta:wav2vec2_tiny@30 --batches 1 --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import transferkit
from transferkit.export import export_torchscript, load_scripted, torchscript


@contextlib.contextmanager
def _without_channels_last(active: bool):
    """Export with optimize=True but without the channels_last candidate (what optimize=True
    gave before it existed), to show the layout's share of the speed-up."""
    if not active:
        yield
        return
    original = torchscript._optimizations
    torchscript._optimizations = lambda model, ex: tuple(o for o in original(model, ex)
                                                         if o != "freeze_channels_last")
    try:
        yield
    finally:
        torchscript._optimizations = original


def _time(fn, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    fn(x)
    return time.perf_counter() - t0


def measure(name: str, size: int, *, batches: tuple[int, ...], repeats: int, warmup: int, folder: Path) -> list[dict]:
    torch.manual_seed(0)
    bb = transferkit.get_backbone(name, weights=None)
    audio = bb.input_spec.kind == "audio"
    spec = bb.input_spec if audio else bb.input_spec.replace(image_size=size)
    model = transferkit.build_model(bb, 10, spec=spec).eval()
    meta = {"labels": [f"c{i}" for i in range(10)], "input_spec": spec.to_dict()}

    def inputs(n: int) -> torch.Tensor:  # uint8 images at ``size`` px, or ``size``-second waveforms
        if audio:
            return torch.randn(n, int(spec.sample_rate) * size) * 0.1
        return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    example = inputs(4) if not audio else torch.randn(2, int(spec.sample_rate)) * 0.1  # traced on 1 s clips
    variants = {"eager": model}
    for tag, optimize, layouts in (("exported", False, True), ("exported+opt", True, False),
                                   ("exported+opt", True, True)):
        path = folder / f"{name.replace(':', '_')}_{tag}_{layouts}.pt"
        with _without_channels_last(not layouts):  # the frozen contiguous file, for comparison
            report = export_torchscript(model, path, metadata=meta, example_inputs=example, optimize=optimize)
        label = tag if not optimize else f"exported+{report.optimization}"
        if label not in variants:
            variants[label] = load_scripted(path)[0]
    try:
        from transferkit.export import export_onnx
        from transferkit.export.onnx import load_onnx

        onnx_path = folder / f"{name.replace(':', '_')}.onnx"
        export_onnx(model, onnx_path, metadata=meta, example_inputs=example)
        variants["onnxruntime"] = load_onnx(onnx_path)[0]
    except Exception as exc:  # onnxruntime not installed, or the trunk does not export: say so, measure the rest
        print(f"# {name}: no ONNX Runtime row ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
    rows = []
    with torch.inference_mode():
        for bs in batches:
            x = inputs(bs)
            for fn in variants.values():  # warm-up: the TorchScript profiling executor specialises here
                for _ in range(warmup):
                    fn(x)
            times: dict[str, list[float]] = {k: [] for k in variants}
            for _ in range(repeats):  # interleaved rounds
                for k, fn in variants.items():
                    times[k].append(_time(fn, x))
            med = {k: statistics.median(v) for k, v in times.items()}
            for k, t in med.items():
                rows.append({"model": f"{name}@{size}", "batch": bs, "variant": k, "ms": t * 1e3,
                             "img_s": bs / t, "speedup": med["eager"] / t})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tk:small_cnn@32", "tv:resnet18@224"],
                   help="backbone@image_size (audio backbones: backbone@clip_seconds), weights=None")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--repeats", type=int, default=15, help="timed rounds per batch size (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).parent))
    from _machine import machine_line

    print(f"# {machine_line()}; median of {args.repeats} rounds")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.models:
            name, _, size = spec.partition("@")
            rows += measure(name, int(size or 224), batches=tuple(args.batches), repeats=args.repeats,
                            warmup=args.warmup, folder=Path(tmp))
    print(f"\n{'model':<22}{'batch':>6}  {'variant':<32}{'ms/batch':>10}{'img/s':>10}{'eager/this':>12}")
    for r in rows:
        print(f"{r['model']:<22}{r['batch']:>6}  {r['variant']:<32}{r['ms']:>10.2f}{r['img_s']:>10.1f}"
              f"{r['speedup']:>11.2f}x")


if __name__ == "__main__":
    main()
