"""The accuracy cost of bf16 features: frozen-backbone features in fp32 vs the CPU's
``precision="auto"`` path (bf16 autocast + channels_last), side by side.

Cases: the shared ImageNet EfficientNet-Lite0 on hymenoptera at 224 px, and the CIFAR-10
ResNet-20 weights on hymenoptera at 32 px. The images are decoded once (transferkit's eval
transform, Pillow draft mode); each variant extracts the features of train (245) and val (153)
and a logistic-regression probe (transferkit's, C chosen on val; and C=1 on raw features,
the data README's protocol) is fitted on them. Goal: the auto path within 0.5 points of fp32
(one validation image is 0.65 points, so the table also counts the predictions that differ).

    python benchmarks/bf16_features.py                  # both cases, 1 thread, about 1 minute
    python benchmarks/bf16_features.py --threads 2 --only lite0
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from _machine import DATA  # noqa: E402  (the script's folder is on sys.path)
CASES = {
    "lite0": ("timm:tf_efficientnet_lite0", DATA / "weights" / "efficientnet-lite0" / "tf_efficientnet_lite0_in1k.pth",
              None),
    "resnet20": ("tk:cifar_resnet20", DATA / "weights" / "cifar-resnet" / "resnet20-12fca82f.th", 32),
}


def decoded(bb, image_size: int | None) -> dict[str, tuple[torch.Tensor, np.ndarray]]:
    from transferkit.facts import resolve_input_spec
    from transferkit.data import ImageFolderDataset, eval_transform

    spec = resolve_input_spec(bb.input_spec, image_size)
    out = {}
    for part in ("train", "val"):
        ds = ImageFolderDataset(DATA / "hymenoptera" / part, transform=eval_transform(spec),
                                min_size=spec.resize_size or spec.image_size)
        out[part] = (torch.stack([ds[i][0] for i in range(len(ds))]), np.array(ds.targets))
    return out


def features(model, x: torch.Tensor, speed, batch: int = 32) -> tuple[np.ndarray, float]:
    model.eval()
    speed.prepare(model)
    with torch.no_grad(), speed.feature_autocast():  # warm-up: oneDNN creates its kernels on the first call
        model.features(speed.to_device(x[:batch]))
    t0 = time.perf_counter()
    with torch.no_grad():
        parts = []
        for i in range(0, len(x), batch):
            with speed.feature_autocast():
                parts.append(model.features(speed.to_device(x[i:i + batch])).float())
    s = time.perf_counter() - t0
    model.to(memory_format=torch.contiguous_format)
    return torch.cat(parts).numpy(), s


def probe_scores(tr: tuple[np.ndarray, np.ndarray], va: tuple[np.ndarray, np.ndarray]
                 ) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Accuracy and predictions on val of the probe (C chosen on val) and of C=1 on raw features."""
    from sklearn.linear_model import LogisticRegression

    from transferkit.train.probe import fit_logistic_probe

    res, w, b = fit_logistic_probe(tr[0], tr[1], va[0], va[1])
    c1 = LogisticRegression(C=1.0, max_iter=5000).fit(*tr)
    return float(res.val_acc), float(c1.score(*va)), (va[0] @ w.T + b).argmax(1), c1.predict(va[0])


def run_case(name: str) -> list[dict]:
    import transferkit as tk
    from transferkit.train.speed import SpeedConfig

    backbone, weights, size = CASES[name]
    torch.manual_seed(0)
    bb = tk.get_backbone(backbone, weights=weights)
    model = tk.build_model(bb, 2)
    data = decoded(bb, size)
    cpu = torch.device("cpu")
    variants = {"fp32 (precision='fp32', channels_last=False)":
                SpeedConfig.make(cpu, precision="fp32", channels_last=False, trunk=bb.trunk, frozen=True),
                "auto (transferkit default)": SpeedConfig.make(cpu, trunk=bb.trunk, frozen=True)}
    rows, ref = [], None
    for label, speed in variants.items():
        tr, t_tr = features(model, data["train"][0], speed)
        va, t_va = features(model, data["val"][0], speed)
        acc, acc_c1, pred, pred_c1 = probe_scores((tr, data["train"][1]), (va, data["val"][1]))
        n = len(tr) + len(va)
        allf = np.concatenate([tr, va])
        rel = None if ref is None else float(np.linalg.norm(allf - ref) / np.linalg.norm(ref))
        ref = allf if ref is None else ref
        rows.append({"case": f"{backbone} @ {size or bb.input_spec.image_size} px", "variant": label,
                     "speed": {"feature_precision": speed.feature_precision_resolved,
                               "channels_last": speed.channels_last},
                     "why": [f"{k}: {speed.reasons[k]}" for k in ("feature_precision", "channels_last")
                             if k in speed.reasons],
                     "img_s": n / (t_tr + t_va),
                     "acc": acc, "acc_c1": acc_c1, "rel_err": rel, "pred": pred, "pred_c1": pred_c1})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=sorted(CASES), action="append")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if not (DATA / "hymenoptera").is_dir():
        raise SystemExit(f"{DATA / 'hymenoptera'} not found (set TRANSFERKIT_DATA)")
    sys.path.insert(0, str(Path(__file__).parent))
    from _machine import machine_line

    print(f"# bf16 features vs fp32: {machine_line(args.threads)}\n")
    print("| case | variant | precision / layout | features img/s | probe val acc (C on val) | probe val acc (C=1) "
          "| rel. error vs fp32 |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name in args.only or sorted(CASES):
        rows = run_case(name)
        for r in rows:
            s = r["speed"]
            print(f"| {r['case']} | {r['variant']} | {s['feature_precision']}, "
                  f"{'channels_last' if s['channels_last'] else 'contiguous'} | {r['img_s']:.1f} | {r['acc']:.3f} | "
                  f"{r['acc_c1']:.3f} | {'-' if r['rel_err'] is None else format(r['rel_err'], '.1e')} |", flush=True)
        d = 100 * (rows[1]["acc"] - rows[0]["acc"])
        d1 = 100 * (rows[1]["acc_c1"] - rows[0]["acc_c1"])
        flips = [int((rows[1][k] != rows[0][k]).sum()) for k in ("pred", "pred_c1")]
        print(f"| {rows[0]['case']} | **auto - fp32** | | **{rows[1]['img_s'] / rows[0]['img_s']:.2f}x** | "
              f"**{d:+.1f} points** ({flips[0]} of {len(rows[0]['pred'])} predictions differ) | "
              f"**{d1:+.1f} points** ({flips[1]} differ) | (goal: within 0.5 points) |", flush=True)
    print("\nwhy (auto): " + "; ".join(rows[1]["why"]))


if __name__ == "__main__":
    main()
