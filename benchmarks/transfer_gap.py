"""Feature extraction from the CIFAR-10 ResNet-20 weights vs the same run with random weights.

``finetune("tk:cifar_resnet20", weights=..., data=hymenoptera, image_size=32,
policy="feature_extraction", precision="fp32", feature_engine="eager", seed=s)`` with every
other argument at its default, for the pretrained checkpoint and for ``weights=None`` (one
random network per seed), over several seeds; then a scikit-learn logistic-regression probe
on the pretrained features (C=1, raw features: the data README's protocol) for reference.
The features are eager fp32 so that the figures do not depend on the CPU (bf16 where it is
native) or on the engine the timing picks on a busy machine.

    .venv/bin/python benchmarks/transfer_gap.py --seeds 10
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from pathlib import Path

import numpy as np

from _machine import DATA, machine_line  # noqa: E402  (the script's folder is on sys.path)


def main() -> None:
    import transferkit as tk

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=10)
    args = ap.parse_args()
    print(f"# machine: {machine_line()}", flush=True)  # the CPU and its flags, with the numbers
    data = DATA / "hymenoptera"
    weights = DATA / "weights" / "cifar-resnet" / "resnet20-12fca82f.th"
    if not data.is_dir() or not weights.is_file():
        raise SystemExit(f"{data} or {weights} not found; set TRANSFERKIT_DATA")
    warnings.filterwarnings("ignore")
    acc: dict[str, list[float]] = {"pretrained": [], "weights=None": []}
    for seed in range(args.seeds):
        for label, w in (("pretrained", weights), ("weights=None", None)):
            r = tk.finetune("tk:cifar_resnet20", weights=w, data=data, image_size=32, policy="feature_extraction",
                            precision="fp32", feature_engine="eager", seed=seed, verbose=False)
            acc[label].append(r.metrics["val_acc"])
    gap = [100 * (a - b) for a, b in zip(acc["pretrained"], acc["weights=None"])]
    print(f"hymenoptera val accuracy, tk:cifar_resnet20 @ 32 px, feature extraction, eager fp32 features, "
          f"seeds 0-{args.seeds - 1}\n")
    print("| run | " + " | ".join(f"seed {s}" for s in range(args.seeds)) + " | mean |")
    print("|---|" + "---:|" * (args.seeds + 1))
    for label, values in acc.items():
        print(f"| {label} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {statistics.mean(values):.3f} |")
    print("| gap (points) | " + " | ".join(f"{g:+.1f}" for g in gap) + f" | {statistics.mean(gap):+.1f} |")
    print(f"\nlogistic-regression probe on the pretrained features (C=1, raw): {probe(weights, data):.3f}")


def probe(weights: Path, data: Path) -> float:
    import torch
    from sklearn.linear_model import LogisticRegression

    import transferkit as tk
    from transferkit.data import ImageFolderDataset, eval_transform

    bb = tk.get_backbone("tk:cifar_resnet20", weights=weights)
    model = tk.build_model(bb, 2).eval()
    feats = {}
    for part in ("train", "val"):
        ds = ImageFolderDataset(data / part, transform=eval_transform(bb.input_spec), min_size=32)
        with torch.no_grad():
            x = model.features(torch.stack([ds[i][0] for i in range(len(ds))]))
        feats[part] = (x.numpy(), np.array([label for _, label in ds.samples]))
    clf = LogisticRegression(C=1.0, max_iter=5000).fit(*feats["train"])
    return float(clf.score(*feats["val"]))


if __name__ == "__main__":
    main()
