"""Spectrogram trunks outside training: clips padded to lengths of their own, side by side
with the whole batch padded to its longest clip.

A spectrogram trunk (``spec:<image backbone>``) outside training pads each clip to a length
that depends on that clip alone (`transferkit.backbones.spectrogram.padded_length`) and runs
the clips of one padded length together, so a clip's features do not depend on its batch.
This times that path (``trunk(x)``) against one padded batch (``trunk._batch(x)``, which is
what the trunk computes in training) on the same batch of clips of random lengths,
alternating the two, and prints the clips per second of each (median of ``--rounds``).

    python benchmarks/spectrogram_eval.py                    # 32 clips of 1-4 s at 16 kHz
    python benchmarks/spectrogram_eval.py --threads 2 --clips 64 --longest 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import transferkit as tk  # noqa: E402
from transferkit.data.audio import pad_waveforms  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbones", nargs="+", default=["spec:tk:small_cnn", "spec:tv:resnet18"])
    ap.add_argument("--clips", type=int, default=32)
    ap.add_argument("--shortest", type=float, default=1.0, help="seconds")
    ap.add_argument("--longest", type=float, default=4.0, help="seconds")
    ap.add_argument("--rate", type=int, default=16000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from _machine import machine_line

    print(f"# {machine_line()}")
    print(f"# {args.clips} clips of {args.shortest:g}-{args.longest:g} s at {args.rate} Hz, random weights, eval mode, "
          f"median of {args.rounds} alternating rounds")
    print("| trunk | one padded batch clips/s | own lengths clips/s | own lengths vs one batch |")
    print("|---|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(int(args.shortest * args.rate), int(args.longest * args.rate) + 1, (args.clips,),
                            generator=g)
    x = pad_waveforms([0.1 * torch.randn(int(n), generator=g) for n in lengths])
    for name in args.backbones:
        trunk = tk.get_backbone(name, weights=None, sample_rate=args.rate).trunk.eval()
        times: dict[str, list[float]] = {"padded": [], "own": []}
        with torch.no_grad():
            trunk(x), trunk._batch(x)  # warm-up
            for _ in range(args.rounds):
                for key, run in (("own", trunk), ("padded", trunk._batch)):
                    t = time.perf_counter()
                    run(x)
                    times[key].append(time.perf_counter() - t)
        padded, own = statistics.median(times["padded"]), statistics.median(times["own"])
        print(f"| {name} | {args.clips / padded:.1f} | {args.clips / own:.1f} | {padded / own:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
