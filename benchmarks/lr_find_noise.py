"""How often the lr finder's noise note fires: on seeded synthetic range tests.

Each curve has ``n`` steps from 1e-7 to 10: a flat loss, an S-shaped fall of ``k`` times the
per-batch noise centred at 1e-3, an explosion past 0.1, and Gaussian noise (sd 0.1); or pure
noise about a flat level (sd 0.05). For each case it counts the curves on which
`transferkit.train.lr_find.find_valley` notes that the loss does not fall (beyond its noise).
Deterministic (seeded), so the counts are the same on any machine:

    .venv/bin/python benchmarks/lr_find_noise.py
"""

from __future__ import annotations

import numpy as np

from transferkit.train.lr_find import find_valley


def curve(n: int, fall: float, sd: float, seed: int) -> tuple[list[float], list[float]]:
    lrs = np.geomspace(1e-7, 10, n)
    x = np.log10(lrs)
    base = 0.5 + fall / (1 + np.exp((x + 3) / 0.5))
    base = base + np.where(x > -1, (x + 1) ** 2 * 3, 0)  # the explosion
    loss = base + sd * np.random.default_rng(seed).standard_normal(n)
    return list(lrs), list(np.maximum(loss, 1e-3))


def noted(lrs: list[float], losses: list[float]) -> bool:
    return any("does not fall" in note for note in find_valley(lrs, losses).notes)


def main() -> None:
    print("| steps | curve | noted 'does not fall' |")
    print("|---:|---|---:|")
    for n in (20, 30, 100):
        for k in (2, 3, 4, 6):
            hits = sum(noted(*curve(n, k * 0.1, 0.1, seed)) for seed in range(50))
            print(f"| {n} | a fall of {k}x the per-batch noise | {hits}/50 |")
        flat = sum(noted(list(np.geomspace(1e-7, 10, n)),
                         list(1 + 0.05 * np.random.default_rng(seed).standard_normal(n))) for seed in range(100))
        print(f"| {n} | pure noise | {flat}/100 |")
        clean = sum(noted(*curve(n, 0.5, 0.0, seed)) for seed in range(5))
        print(f"| {n} | a fall without noise | {clean}/5 |")


if __name__ == "__main__":
    main()
