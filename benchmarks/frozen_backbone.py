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

transferkit runs three times: with its defaults (features computed once; on a CPU that runs
bf16 natively, bf16 autocast + channels_last for the extraction; the engine of the pass
timed on the run's input, ``feature_engine="auto"``, the timing counted in the wall time),
with the defaults but ``feature_engine="eager"``, and with ``precision="fp32",
channels_last=False, feature_engine="eager"`` (features computed once, exact fp32 path).
Between the first two is the engine; between the eager and the fp32 runs, the CPU fast path;
between the fp32 run and the plain loop, the feature cache. ``--assume-bf16 0`` makes the
bf16 capability check answer no (``TRANSFERKIT_ASSUME_BF16=0``): a CPU without native bf16.

Backbones: the shared ImageNet EfficientNet-Lite0 (``timm:tf_efficientnet_lite0``) and
torchvision ResNet-18 with ``weights=None`` (offline). Goals: transferkit's defaults >= 15x
the tutorial loop, validation accuracy within 1 point of it. Each configuration runs once
per seed (``--seeds``, default 3; seeds 0, 1, 2), the configurations interleaved: wall times
are medians (run-to-run noise on a shared 2-core machine reached 1.3x), accuracies are means
over the seeds (one of the 153 validation images is 0.65 points, and the head's
initialisation and order alone move a single run by two images). Each run is its own
subprocess (clean peak memory) that imports torch, torchvision, timm and transferkit before
its timer starts: the times are the runs', not the imports'. The accuracy over more seeds
(``--accuracy-seeds``, default 20) trains each run's head once per seed on the features of its
own pass: the tutorial loop's own loop, with the same draws of the random generator, on its
trunk's fp32 features (on the timed seeds it gives the real loop's accuracy exactly, which the
table checks). On a quiet 2-core machine the whole command takes about 25 minutes (about 11
with ``--only lite0``).

    python benchmarks/frozen_backbone.py                         # both backbones, 10 epochs
    python benchmarks/frozen_backbone.py --only lite0 --threads 2
    python benchmarks/frozen_backbone.py --epochs 1 --image-size 64 --seeds 1 --accuracy-seeds 1  # a smoke test

The engines of the frozen pass (``--engines``): for Lite0, ResNet-18, a ViT and an audio
trunk, the feature pass on batches of 16 of the run's own input (hymenoptera images through
the eval transform; for the audio trunk 1 s synthetic waveforms) with each engine of
`transferkit.train.engines` (eager in the precision given, ONNX Runtime fp32,
torch.compile): the first batch warms each engine up (export, compilation: "setup s") and
is compared with eager fp32 (the largest difference, absolute and relative to the largest
feature); the next two are timed round-robin in one process (the fastest of 3 rounds counts),
one process per trunk and precision: a bf16 row's "vs eager fp32" divides by the fp32
process's eager speed. ``--assume-bf16 0`` simulates a CPU without native bf16 (the fp32
path that auto takes there).

    python benchmarks/frozen_backbone.py --engines --threads 2            # fp32 and, where native, bf16
    python benchmarks/frozen_backbone.py --engines --engine-models lite0 resnet18 --no-compile
    python benchmarks/frozen_backbone.py --engines --engine-models tv:vit_b_16 timm:convnext_atto --no-compile

Any backbone name is a row (``weights=None``: the features are compared, not learned from).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

from _machine import DATA  # noqa: E402  (the script's folder is on sys.path)
LITE0 = DATA / "weights" / "efficientnet-lite0" / "tf_efficientnet_lite0_in1k.pth"
CONFIGS = {
    "lite0": {"backbone": "timm:tf_efficientnet_lite0", "weights": str(LITE0),
              "label": "timm tf_efficientnet_lite0 (ImageNet weights, shared)"},
    "resnet18": {"backbone": "tv:resnet18", "weights": None, "label": "tv ResNet-18 (weights=None, offline)"},
}
RUNS = ("plain", "transferkit_defaults", "transferkit_eager", "transferkit_fp32")
ENGINE_MODELS = {  # the engine table's default rows; --engine-models also takes any backbone name (weights=None)
    "lite0": ("timm:tf_efficientnet_lite0", str(LITE0)),
    "resnet18": ("tv:resnet18", None),
    "vit": ("timm:vit_tiny_patch16_224", None),
    "audio": ("ta:wav2vec2_tiny", None),
}


def _engine_model(part: str) -> str:
    if part in ENGINE_MODELS or ":" in part:
        return part
    raise argparse.ArgumentTypeError(f"{part!r}: use one of {', '.join(ENGINE_MODELS)} or a backbone name "
                                     "(prefix:name, e.g. tv:convnext_tiny)")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _spec(cfg: dict, image_size: int | None):
    import transferkit as tk
    from transferkit.facts import resolve_input_spec

    bb = tk.get_backbone(cfg["backbone"], weights=cfg["weights"])
    return bb, resolve_input_spec(bb.input_spec, image_size)


def _tutorial_transform(s):
    from torchvision import transforms as T

    interp = T.InterpolationMode(s.interpolation)
    resize = T.Resize(s.resize_size, interp) if s.resize_size else T.Resize((s.image_size, s.image_size), interp)
    return T.Compose([resize, T.CenterCrop(s.image_size), T.ToTensor(), T.Normalize(s.mean, s.std)])


def plain(cfg: dict, args, features: dict | None = None) -> dict:
    """The tutorial's loop: ImageFolder + PIL transforms, the frozen backbone every epoch.

    ``features``: ``{"train": (features, targets), "val": ...}`` of this loop's trunk over
    its (unshuffled) images: the loop runs its head on them in place of trunk(image), with
    the same draws of the random generator: the same accuracy as the real loop at that seed,
    without its backbone passes (the accuracy over many seeds, `plain_accuracy`)."""
    import torch
    from torchvision import datasets

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    bb, s = _spec(cfg, args.image_size)
    if features is None:
        ds = {p: datasets.ImageFolder(str(DATA / "hymenoptera" / p), _tutorial_transform(s)) for p in ("train", "val")}
        trunk = bb.trunk
    else:
        ds = {p: torch.utils.data.TensorDataset(*features[p]) for p in ("train", "val")}
        trunk = torch.nn.Identity()
    loaders = {p: torch.utils.data.DataLoader(ds[p], batch_size=4, shuffle=p == "train", num_workers=args.workers,
                                              persistent_workers=args.workers > 0) for p in ds}
    head = torch.nn.Linear(bb.num_features, 2)
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


def plain_accuracy(cfg: dict, args) -> dict:
    """The tutorial loop's best val accuracy at seeds 0..N-1: its trunk's fp32 features over
    the images once, then `plain` on them per seed."""
    import copy

    import torch
    from torchvision import datasets

    bb, s = _spec(cfg, args.image_size)
    trunk = bb.trunk.eval()
    feats = {}
    with torch.no_grad():
        for p in ("train", "val"):
            ds = datasets.ImageFolder(str(DATA / "hymenoptera" / p), _tutorial_transform(s))
            xs, ys = zip(*((trunk(x), y) for x, y in torch.utils.data.DataLoader(ds, batch_size=16,
                                                                                   num_workers=args.workers)))
            feats[p] = (torch.cat(xs), torch.cat(ys))
    accs = []
    for seed in range(args.accuracy_seeds):
        a = copy.copy(args)
        a.seed = seed
        accs.append(plain(cfg, a, features=feats)["best_val_acc"])
    return {"accs": accs}


def _speed_summary(result) -> str:
    d = getattr(result, "decisions", None)
    if d is None:
        return "(this version of finetune() does not expose its resolved speed settings)"
    return " | ".join(line.strip() for line in d.summary().splitlines()  # the decisions' own lines
                      if line.strip().startswith(("speed:", "engine:")))


def _finetune(cfg: dict, args, seed: int, **extra):
    """transferkit with the tutorial's head, optimizer and schedule (see the docstring)."""
    import transferkit as tk

    return tk.finetune(cfg["backbone"], weights=cfg["weights"], data=DATA / "hymenoptera",
                       policy="feature_extraction", epochs=args.epochs, batch_size=4, lr=1e-3, optimizer="sgd",
                       momentum=0.9, weight_decay=0.0, schedule="step",
                       schedule_options={"step_epochs": 7, "gamma": 0.1}, num_workers=args.workers, device="cpu",
                       verbose=False, restore_best=False, head_norm=False, image_size=args.image_size, seed=seed,
                       **extra)


def _transferkit(cfg: dict, args, **speed) -> dict:
    t0 = time.perf_counter()
    r = _finetune(cfg, args, args.seed, **speed)
    return {"seconds": time.perf_counter() - t0, "best_val_acc": r.best["val_acc"], "peak_rss_mb": _peak_rss_mb(),
            "features_s": r.timings.get("features_s"), "train_s": r.timings.get("train_s"),
            "used_feature_cache": r.used_feature_cache, "speed": _speed_summary(r), "engine": _engine(r)}


def transferkit_accuracy(cfg: dict, args, **speed) -> dict:
    """transferkit's best val accuracy at seeds 0..N-1: one feature pass into a temporary
    ``cache_dir``, then the head's training per seed on the stored features."""
    import tempfile

    with tempfile.TemporaryDirectory() as cache:
        runs = [_finetune(cfg, args, seed, cache_dir=cache, **speed) for seed in range(args.accuracy_seeds)]
    return {"accs": [r.best["val_acc"] for r in runs], "engine": _engine(runs[0])}  # the stored features' engine


def _engine(result) -> str:
    """The engine (and precision) that computed a run's features, as its decisions say."""
    from transferkit.train.engines import engine_precision

    d = getattr(result, "decisions", None)
    if d is None or not d.speed.get("feature_precision"):
        return "?"
    return f"{d.engine} {engine_precision(d.engine, d.speed['feature_precision'])}"


SPEEDS = {"transferkit_defaults": {}, "transferkit_eager": {"feature_engine": "eager"},
          "transferkit_fp32": {"precision": "fp32", "channels_last": False, "feature_engine": "eager"}}


def accuracy_child(cfg: dict, args) -> dict:
    name = args.accuracy_child
    return plain_accuracy(cfg, args) if name == "plain" else transferkit_accuracy(cfg, args, **SPEEDS[name])


FUNCS = {"plain": plain, **{name: (lambda cfg, args, _s=speed: _transferkit(cfg, args, **_s))
                             for name, speed in SPEEDS.items()}}


def engines_child(args) -> dict:
    """One backbone, one precision: every engine timed on the same batches (see the docstring)."""
    import torch

    import transferkit as tk
    from transferkit.train import engines as eng
    from transferkit.train.speed import SpeedConfig

    torch.manual_seed(0)
    name, weights = ENGINE_MODELS.get(args.engine_child, (args.engine_child, None))
    bb = tk.get_backbone(name, weights=weights)
    kind = bb.input_spec.kind
    model = tk.build_model(bb, 2).eval()
    cpu = torch.device("cpu")
    layout = SpeedConfig.make(cpu, precision="fp32", trunk=bb.trunk, frozen=True, kind=kind).channels_last
    if layout:
        model.to(memory_format=torch.channels_last)
    if kind == "audio":
        batches = [torch.randn(16, bb.input_spec.sample_rate, generator=torch.Generator().manual_seed(i)) * 0.1
                   for i in range(3)]
    else:
        from transferkit.data import ImageFolderDataset, eval_transform

        ds = ImageFolderDataset(DATA / "hymenoptera" / "train", transform=eval_transform(bb.input_spec))
        batches = eng.example_batches(ds, batch_size=16, count=3)
    candidates = ["onnxruntime"] + ([] if args.no_compile or args.precision != "fp32" else ["compile"])
    out = eng.time_engines(model, batches, device=cpu, precision=args.precision, channels_last=layout,
                           candidates=candidates, n_images=None, rounds=3, settle=False)
    return {"backbone": name, "precision": args.precision, "channels_last": layout,
            "modules": eng.leaf_modules(model.trunk), "engines": out}


def engines_table(args) -> None:
    from _machine import machine_line, run_child

    print(f"# engines of the frozen pass, batch 16, {args.threads} torch threads\n# {machine_line(args.threads)}")
    rows = []
    for part in args.engine_models:
        for precision in args.precisions:
            argv = ["--engine-child", part, "--threads", str(args.threads), "--precision", precision] + \
                (["--no-compile"] if args.no_compile else [])
            try:
                rows.append(run_child(__file__, argv, f"[{part}] engines {precision}"))
            except SystemExit as exc:  # one backbone failing does not lose the others
                print(f"# {part} {precision}: {str(exc)[:300]}")
    print("\n| backbone | engine | precision | images/s | vs eager fp32 | max abs diff to eager fp32 | "
          "relative to largest feature | setup s |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    base = {}
    for r in rows:
        e = r["engines"]["eager"]
        if r["precision"] == "fp32":
            base[r["backbone"]] = e["images_per_s"]
    for r in rows:
        ref = base.get(r["backbone"])
        for engine, m in r["engines"].items():
            if r["precision"] != "fp32" and engine == "onnxruntime":
                continue  # the same fp32 engine as in the fp32 row
            if "images_per_s" not in m:
                print(f"| {r['backbone']} | {engine} | | {m.get('skipped') or m.get('error')} ||||")
                continue
            prec = m["precision"] + (", channels_last" if r["channels_last"] and engine != "onnxruntime" else "")
            ratio = f"{m['images_per_s'] / ref:.2f}x" if ref else "-"
            print(f"| {r['backbone']} | {engine} | {prec} | {m['images_per_s']:.1f} | {ratio} | "
                  f"{m['max_abs_diff']:.2g} | {m['rel_diff']:.2g} | {m['setup_s']:.1f} |")
    print("\nleaf modules per trunk (compile-time estimate): "
          + ", ".join(f"{r['backbone']} {r['modules']}" for r in rows if r["precision"] == "fp32"))
    sys.stdout.flush()


def _child(name: str, part: str, args, seed: int) -> dict:
    from _machine import run_child

    argv = ["--child", name, "--only", part, "--epochs", str(args.epochs), "--workers", str(args.workers),
            "--threads", str(args.threads), "--seed", str(seed)] + \
        (["--image-size", str(args.image_size)] if args.image_size else [])
    return run_child(__file__, argv, f"[{part}] {name} seed {seed}")


def _median(values: list[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def _summary(runs: list[dict]) -> dict:
    """One configuration over the seeds: median wall time (and its range), mean accuracy."""
    secs = [r["seconds"] for r in runs]
    feats = [r["features_s"] for r in runs if r.get("features_s") is not None]
    return {"seconds": _median(secs), "min_s": min(secs), "max_s": max(secs),
            "acc": sum(r["best_val_acc"] for r in runs) / len(runs), "accs": [r["best_val_acc"] for r in runs],
            "rss": max(r["peak_rss_mb"] for r in runs), "features_s": _median(feats) if feats else None,
            "speed": runs[0].get("speed")}


def _accuracy_table(part: str, args, raw: dict[str, list[dict]]) -> None:
    """Mean best val accuracy over seeds 0..N-1 of each run's head on its own features (the
    tutorial loop replayed on its trunk's features, transferkit with a feature cache), and
    whether the seeds that also ran for real gave the same accuracy."""
    from _machine import run_child

    argv = ["--only", part, "--epochs", str(args.epochs), "--workers", str(args.workers), "--threads",
            str(args.threads), "--accuracy-seeds", str(args.accuracy_seeds)] + \
        (["--image-size", str(args.image_size)] if args.image_size else [])
    children = {name: run_child(__file__, ["--accuracy-child", name, *argv], f"[{part}] {name} accuracy")
                for name in RUNS}
    accs = {name: c["accs"] for name, c in children.items()}
    n = args.accuracy_seeds
    print(f"\naccuracy over seeds 0-{n - 1} (the head of each run trained on its features once per seed):\n")
    print("| run | features by | mean best val acc | min-max | same as the timed runs' seeds |")
    print("|---|---|---:|---:|---|")
    for name in RUNS:
        a, engine = accs[name], children[name].get("engine", "the tutorial loop")
        timed = [r["best_val_acc"] for r in raw[name]][:n]
        engines = sorted({r["engine"] for r in raw[name] if r.get("engine")} - {engine})
        same = "yes" if all(abs(x - y) < 1e-9 for x, y in zip(a, timed)) else \
            f"no: {', '.join(f'{x:.3f}' for x in a[:len(timed)])} vs {', '.join(f'{y:.3f}' for y in timed)}" + \
            (f" (the timed runs' features by {', '.join(engines)}: auto chose by its timings)" if engines else "")
        print(f"| {name} | {engine} | {sum(a) / n:.3f} | {min(a):.3f}-{max(a):.3f} | {same} |")
    d, p = sum(accs["transferkit_defaults"]) / n, sum(accs["plain"]) / n
    print(f"\ndefaults vs tutorial loop over {n} seeds: accuracy {100 * (d - p):+.2f} points (goal within 1)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=sorted(CONFIGS), action="append")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--image-size", type=int, default=None, help="crop size (default: the backbone's, 224)")
    ap.add_argument("--seeds", type=int, default=3,
                    help="runs per configuration, seeds 0..N-1 (times: medians; accuracy: means)")
    ap.add_argument("--accuracy-seeds", type=int, default=20,
                    help="seeds 0..N-1 of the accuracy comparison (each run's head on its features; 0: none)")
    ap.add_argument("--accuracy-child", choices=RUNS, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=sorted(FUNCS))
    ap.add_argument("--engines", action="store_true", help="the engines x backbones table instead")
    ap.add_argument("--engine-models", nargs="+", default=list(ENGINE_MODELS), type=_engine_model,
                    help=f"rows of the engine table: {', '.join(ENGINE_MODELS)}, or backbone names (weights=None), "
                         "e.g. tv:convnext_tiny ta:hubert_base")
    ap.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=None,
                    help="eager precisions (default: fp32, and bf16 where the CPU runs it natively)")
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--no-compile", action="store_true", help="leave torch.compile out (minutes per trunk)")
    ap.add_argument("--assume-bf16", choices=("0", "1"), default=None,
                    help="answer of the bf16 capability check (0: simulate a CPU without native bf16)")
    ap.add_argument("--engine-child", type=_engine_model, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.assume_bf16 is not None:
        os.environ["TRANSFERKIT_ASSUME_BF16"] = args.assume_bf16  # children inherit it
    if args.engine_child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(engines_child(args)))
        return
    if args.engines:
        sys.path.insert(0, str(Path(__file__).parent))
        if args.precisions is None:
            from transferkit.train.speed import cpu_bf16_native

            args.precisions = ["fp32", "bf16"] if cpu_bf16_native()[0] else ["fp32"]
        engines_table(args)
        return
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        import timm  # noqa: F401  every library both sides use is imported before either timer starts
        import torchvision  # noqa: F401

        import transferkit.api  # noqa: F401
        print(json.dumps(FUNCS[args.child](CONFIGS[args.only[0]], args)))
        return
    if args.accuracy_child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(accuracy_child(CONFIGS[args.only[0]], args)))
        return
    if not (DATA / "hymenoptera").is_dir() or not LITE0.is_file():
        raise SystemExit(f"{DATA / 'hymenoptera'} or {LITE0} not found (set TRANSFERKIT_DATA)")
    sys.path.insert(0, str(Path(__file__).parent))
    from _machine import machine_line

    print(f"# frozen backbone, {args.epochs} epochs, hymenoptera (245 train + 153 val) at "
          f"{args.image_size or 224} px, batch 4, {args.workers} decoding workers\n# {machine_line(args.threads)}")
    for part in args.only or ("lite0", "resnet18"):
        cfg = CONFIGS[part]
        raw: dict[str, list[dict]] = {name: [] for name in RUNS}
        for seed in range(args.seeds):  # every configuration once per seed, interleaved: load hits all alike
            for name in RUNS:
                raw[name].append(_child(name, part, args, seed))
        run = {name: _summary(rs) for name, rs in raw.items()}
        p = run["plain"]
        print(f"\n## {cfg['label']}, seeds 0-{args.seeds - 1}\n")
        print("| run | wall s (median, range) | vs tutorial loop | mean best val acc (per seed) | peak RSS MB | "
              "features s |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, label in (("plain", "tutorial loop (backbone every epoch, fp32)"),
                            ("transferkit_defaults", "transferkit, defaults (engine auto)"),
                            ("transferkit_eager", "transferkit, defaults but feature_engine='eager'"),
                            ("transferkit_fp32", "transferkit, precision='fp32', channels_last=False, eager")):
            r = run[name]
            feats = "-" if r.get("features_s") is None else f"{r['features_s']:.1f}"
            spread = f" ({r['min_s']:.1f}-{r['max_s']:.1f})" if args.seeds > 1 else ""
            accs = ", ".join(f"{a:.3f}" for a in r["accs"])
            print(f"| {label} | {r['seconds']:.1f}{spread} | {p['seconds'] / r['seconds']:.1f}x | {r['acc']:.3f} "
                  f"({accs}) | {r['rss']:.0f} | {feats} |")
        d, f = run["transferkit_defaults"], run["transferkit_fp32"]
        print(f"\ndefaults vs tutorial loop (medians): **{p['seconds'] / d['seconds']:.1f}x** (goal >= 15x), mean "
              f"accuracy {100 * (d['acc'] - p['acc']):+.1f} points over {args.seeds} seed(s) (goal within 1); "
              f"defaults vs fp32: {f['seconds'] / d['seconds']:.2f}x, accuracy {100 * (d['acc'] - f['acc']):+.1f} points")
        if args.accuracy_seeds:
            _accuracy_table(part, args, raw)
        print(f"\ntransferkit defaults resolved to: {d['speed']}")
        e = run["transferkit_eager"]
        print(f"defaults vs feature_engine='eager': {e['seconds'] / d['seconds']:.2f}x, accuracy "
              f"{100 * (d['acc'] - e['acc']):+.1f} points")
        sys.stdout.flush()

if __name__ == "__main__":
    main()
