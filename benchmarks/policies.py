"""Fine-tuning policies, measured side by side.

1. ``steps``: CPU time of one training step of torchvision ResNet-18 at 224 px under each policy
   (feature extraction with and without the feature cache, ``unfreeze:last=1``, ``last=2``,
   ``full``), as a ratio to full fine-tuning. The policies are timed round-robin (one step of
   each per round) so that load on a shared machine hits them alike; the median is reported.
2. ``accuracy``: ants vs bees (``../shared/data/hymenoptera``, train 245 / val 153) from the CIFAR
   ResNet-20 weights at 32 px: feature extraction vs selective unfreezing vs full fine-tuning vs
   the same network from scratch, mean and spread over seeds, final-epoch validation accuracy
   (``restore_best=False``: the validation set is not used to pick an epoch).

Run from the repository root:

    .venv/bin/python benchmarks/policies.py                      # both parts
    .venv/bin/python benchmarks/policies.py --part steps --batch-size 16 --rounds 5
    .venv/bin/python benchmarks/policies.py --part accuracy --seeds 3 --epochs 15
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transferkit import finetune, get_backbone  # noqa: E402
from transferkit.heads import build_head  # noqa: E402
from transferkit.model import ImagePreprocess, TransferModel  # noqa: E402
from transferkit.policies import Policy, apply_policy, param_groups, set_train_mode  # noqa: E402

from _machine import DATA, machine_line  # noqa: E402  (the script's folder is on sys.path)
STEP_POLICIES = ["feature_extraction (cached)", "feature_extraction", "unfreeze:last=1", "unfreeze:last=2", "full"]


def _step_fn(name: str, batch_size: int, image_size: int):
    """A closure running one optimizer step of ResNet-18 under policy ``name``."""
    torch.manual_seed(0)
    bb = get_backbone("tv:resnet18", weights=None)
    model = TransferModel(ImagePreprocess(bb.input_spec.mean, bb.input_spec.std), bb.trunk,
                          build_head(bb.num_features, 2))
    policy = Policy.parse(name.split(" ")[0])
    apply_policy(model, bb, policy)
    set_train_mode(model, bb, policy)
    x = torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8)
    y = torch.randint(0, 2, (batch_size,))
    cached = name.endswith("(cached)")
    module = model.head if cached else model
    if cached:  # what the feature cache stores: the frozen trunk's pooled features, computed once
        model.eval()
        with torch.no_grad():
            x = model.features(x)
    groups = param_groups(module, lr=1e-3, weight_decay=1e-4) if cached else \
        param_groups(model, lr=1e-3, weight_decay=1e-4, backbone=bb, policy=policy)
    opt = torch.optim.AdamW(groups)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(module(x), y).backward()
        opt.step()

    return step


def bench_steps(batch_size: int, image_size: int, rounds: int) -> None:
    steps = {name: _step_fn(name, batch_size, image_size) for name in STEP_POLICIES}
    for fn in steps.values():  # warm-up (allocator, oneDNN primitives)
        fn()
    times: dict[str, list[float]] = {n: [] for n in STEP_POLICIES}
    for _ in range(rounds):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    full = statistics.median(times["full"])
    print(f"\n### Step time, tv ResNet-18, {image_size} px, batch {batch_size}, CPU, {torch.get_num_threads()} threads, "
          f"median of {rounds} rounds\n")
    print("| policy | step (s) | min-max (s) | vs full |")
    print("| --- | ---: | ---: | ---: |")
    for name in STEP_POLICIES:
        t = times[name]
        print(f"| {name} | {statistics.median(t):.3f} | {min(t):.3f}-{max(t):.3f} | {statistics.median(t) / full:.3f} |")


ACC_RUNS = [  # (label, policy, pretrained, lr)
    ("feature extraction", "feature_extraction", True, 1e-2),  # 1e-2: finetune's default when only the head trains
    ("feature extraction, random init", "feature_extraction", False, 1e-2),
    ("selective (unfreeze:last=1)", "unfreeze:last=1", True, 1e-3),
    ("full", "full", True, 1e-3),
    ("full, discriminative=0.1", "full,discriminative=0.1", True, 1e-3),
    ("gradual (every=3)", "gradual:every=3", True, 1e-3),
    ("scratch (full, random init)", "full", False, 1e-3),
]


def bench_accuracy(seeds: int, epochs: int, image_size: int, batch_size: int, only: list[str] | None,
                   first_seed: int = 0) -> None:
    hym = DATA / "hymenoptera"
    weights = DATA / "weights" / "cifar-resnet" / "resnet20-12fca82f.th"
    if not hym.is_dir() or not weights.is_file():
        print(f"\n(accuracy part skipped: {hym} or {weights} not found; set TRANSFERKIT_DATA)")
        return
    runs = [r for r in ACC_RUNS if not only or r[1] in only or r[0] in only]
    accs: dict[str, list[float]] = {r[0]: [] for r in runs}
    secs: dict[str, list[float]] = {r[0]: [] for r in runs}
    for seed in range(first_seed, first_seed + seeds):  # seed-major: a cut-short run still covers every policy
        for label, spec, pretrained, lr in runs:
            t0 = time.perf_counter()
            r = finetune("tk:cifar_resnet20", weights=str(weights) if pretrained else None, data=hym / "train",
                         val_data=hym / "val", policy=spec, epochs=epochs, batch_size=batch_size, lr=lr,
                         image_size=image_size, seed=seed, restore_best=False, verbose=False)
            secs[label].append(time.perf_counter() - t0)
            accs[label].append(r.history[-1]["val_acc"])
            print(f"  {label} seed {seed}: val_acc {accs[label][-1]:.3f} ({secs[label][-1]:.0f} s)", file=sys.stderr,
                  flush=True)
    rows = [(label, spec, pretrained, lr, accs[label], statistics.median(secs[label]))
            for label, spec, pretrained, lr in runs]
    print(f"\n### hymenoptera val accuracy, tk:cifar_resnet20, {image_size} px, {epochs} epochs, batch {batch_size}, "
          f"AdamW + cosine, {seeds} seeds (final epoch)\n")
    print("| run | policy | weights | lr | mean acc | std | min-max | time/run (s) |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for label, spec, pretrained, lr, accs, sec in rows:
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"| {label} | `{spec}` | {'CIFAR-10' if pretrained else 'random'} | {lr:g} | {statistics.mean(accs):.3f} "
              f"| {std:.3f} | {min(accs):.3f}-{max(accs):.3f} | {sec:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["steps", "accuracy", "all"], default="all")
    ap.add_argument("--batch-size", type=int, default=16, help="batch size of the step-time part")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed+seeds-1")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--image-size", type=int, default=32, help="image size of the accuracy part")
    ap.add_argument("--only", nargs="*", help="accuracy part: only these policies or labels")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    print(f"# machine: {machine_line(args.threads)}", flush=True)  # the CPU and its flags, with the numbers
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    if args.part in ("steps", "all"):
        bench_steps(args.batch_size, 224, args.rounds)
    if args.part in ("accuracy", "all"):
        bench_accuracy(args.seeds, args.epochs, args.image_size, 32, args.only, args.first_seed)


if __name__ == "__main__":
    main()
