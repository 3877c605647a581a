"""The cost of the copy checks of tar shards, on a synthetic member index.

No image is read: the shards are empty files, so the candidates are reported as not read.

When shards are opened, `transferkit.data.shards` looks for samples copied across shards
(key, image byte size and dimensions) and for validation samples that the training data
hold. This times those checks alone on ``--n`` samples in ``--shards`` shards, as the index
gives them (JPEG-like byte sizes, 1 % of the samples copied into a second shard): the
signatures and the training check, then the validation check that reuses them.

    python benchmarks/shard_copies.py              # 1,000,000 samples in 100 shards
    python benchmarks/shard_copies.py --n 100000
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from transferkit.data.checks import DataReport
from transferkit.data.shards import ShardIndex, ShardSource, _warn_repeated_samples


def synthetic_source(root: Path, n: int, shards: int, seed: int = 0) -> ShardSource:
    """``n`` samples in ``shards`` empty files, with an index of JPEG-like sizes; 1 % of the
    samples of the last shard are copies of the first shard's."""
    rng = np.random.default_rng(seed)
    per = n // shards
    paths, indexes = [], []
    for s in range(shards):
        path = root / f"train-{s:06d}.tar"
        path.write_bytes(b"")
        keys = [f"{s:06d}{i:07d}" for i in range(per)]
        sizes = rng.integers(8_000, 120_000, per).tolist()
        dims = rng.integers(200, 500, (per, 2)).tolist()
        paths.append(str(path))
        indexes.append(ShardIndex(keys=keys, offsets=[0] * per, sizes=sizes, labels=[0] * per, bad=[""] * per,
                                  dims=dims, nbytes=sum(sizes)))
    copies = per // 100
    last, first = indexes[-1], indexes[0]
    last.keys[:copies], last.sizes[:copies], last.dims[:copies] = \
        first.keys[:copies], first.sizes[:copies], first.dims[:copies]
    return ShardSource(paths, indexes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=100)
    args = ap.parse_args()
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from _machine import machine_line

    print(machine_line(1))
    with tempfile.TemporaryDirectory() as tmp:
        source = synthetic_source(Path(tmp), args.n, args.shards)
        report = DataReport()
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the warning is counted below
            _warn_repeated_samples(source, "training", report)
        t1 = time.perf_counter()
        sig = source.signatures()  # the validation check's turn: computed once, reused
        np.isin(sig[: len(sig) // 10], sig)
        t2 = time.perf_counter()
    print("| samples | shards | training copy check | validation check (signatures reused) | copies found |")
    print("|---:|---:|---:|---:|---|")
    found = next((w.split(" in the shards")[0] for w in report.warnings), "none")
    print(f"| {len(source):,} | {args.shards} | {t1 - t0:.2f} s | {t2 - t1:.2f} s | {found} |")


if __name__ == "__main__":
    main()
