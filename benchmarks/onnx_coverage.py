"""Which trunks the ONNX Runtime engine of the frozen pass serves, checked against eager fp32.

For each backbone (``weights=None``: the architecture is what matters, and nothing is
downloaded), the feature pass (preprocessing + trunk) is exported to ONNX the way
``feature_engine="onnxruntime"`` exports it (`transferkit.train.engines.engine_forward`),
run on ONNX Runtime on a batch of random input (uint8 images at the backbone's size, or
1 s waveforms) and on a shorter batch (the batch axis is dynamic), and compared with eager
fp32: the largest difference relative to the largest feature, against the engine's tolerance
(``TOLERANCE["fp32"]``). A trunk that cannot be converted is listed with the exporter's
one-line reason: under ``feature_engine="auto"`` such a trunk keeps the eager pass.

    python benchmarks/onnx_coverage.py                      # the default list (a few minutes)
    python benchmarks/onnx_coverage.py tv:resnet50 timm:convnext_tiny
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT = [
    # torchvision
    "tv:resnet18", "tv:mobilenet_v3_small", "tv:efficientnet_b0", "tv:efficientnet_v2_s", "tv:convnext_tiny",
    "tv:regnet_y_400mf", "tv:shufflenet_v2_x0_5", "tv:squeezenet1_0", "tv:densenet121", "tv:swin_t", "tv:vit_b_16",
    "tv:maxvit_t", "tv:inception_v3",
    # timm
    "timm:tf_efficientnet_lite0", "timm:resnet18d", "timm:convnext_atto", "timm:mobilevitv2_050", "timm:levit_128s",
    "timm:deit_tiny_patch16_224", "timm:vit_small_patch16_224", "timm:eva02_tiny_patch14_224", "timm:ghostnet_100",
    "timm:poolformer_s12", "timm:edgenext_xx_small", "timm:fastvit_t8", "timm:efficientformerv2_s0",
    "timm:regnetx_002", "timm:mixnet_s", "timm:coatnet_nano_rw_224", "timm:maxvit_nano_rw_256",
    # audio and built-in
    "ta:wav2vec2_tiny", "ta:wavlm_tiny", "ta:hubert_base", "spec:tv:mobilenet_v3_small", "tk:cifar_resnet20",
]


def check(name: str, batch: int) -> dict:
    import torch

    import transferkit as tk
    from transferkit._text import exception_line
    from transferkit.train import engines as eng

    cpu = torch.device("cpu")
    torch.manual_seed(0)
    bb = tk.get_backbone(name, weights=None)
    model = tk.build_model(bb, 3).eval()
    spec = bb.input_spec
    if spec.kind == "audio":
        x = torch.randn(batch, spec.sample_rate or 16000) * 0.1
    else:
        x = torch.randint(0, 256, (batch, 3, spec.image_size, spec.image_size), dtype=torch.uint8)
    t0 = time.perf_counter()
    try:
        fwd = eng.engine_forward("onnxruntime", model, x, device=cpu, precision="fp32", channels_last=False,
                                 verify=False)
    except Exception as exc:
        return {"name": name, "error": exception_line(exc)}
    setup = time.perf_counter() - t0
    rels = []
    for xb in (x, x[: max(1, batch // 2 + 1)]):
        rels.append(eng.check_against_eager("onnxruntime", fwd, model, xb, device=cpu, precision="fp32",
                                            channels_last=False))
    eng.release_engines()
    return {"name": name, "setup_s": setup, "rel": max(rels), "tolerance": eng.TOLERANCE["fp32"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("backbones", nargs="*", default=DEFAULT)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    import warnings

    import torch

    from _machine import machine_line

    from transferkit._text import exception_line

    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line(args.threads))
    print(f"\nONNX Runtime feature pass vs eager fp32, batch {args.batch} and {args.batch // 2 + 1}, weights=None\n")
    print("| backbone | export + session s | max relative difference | |")
    print("|---|---:|---:|---|")
    failed = 0
    for name in args.backbones:
        try:
            r = check(name, args.batch)
        except Exception as exc:  # the eager comparison itself (a difference beyond tolerance)
            r = {"name": name, "error": exception_line(exc)}
        if "error" in r:
            failed += 1
            print(f"| `{name}` | | | not served: {r['error'][:160]} |", flush=True)
        else:
            print(f"| `{name}` | {r['setup_s']:.1f} | {r['rel']:.1e} | within {r['tolerance']:g} |", flush=True)
    print(f"\n{len(args.backbones) - failed} of {len(args.backbones)} served.")


if __name__ == "__main__":
    main()
