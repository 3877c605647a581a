"""The learning-rate range test (Smith 2015; fastai's ``lr_find``): raise the learning rate
exponentially batch by batch, record the smoothed loss, stop when it diverges, and
suggest the rate where the loss falls fastest."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from transferkit.errors import ConfigError
from transferkit.train.speed import SpeedConfig


@dataclass
class LRFindResult:
    """The learning rates tried, the smoothed losses, the suggestion and the plot (if asked)."""

    lrs: list[float]
    losses: list[float]
    suggestion: float
    plot_path: Path | None = None
    notes: list[str] = field(default_factory=list)

    def plot(self, path: str | Path) -> Path:
        """Loss against learning rate (log scale) with the suggestion marked, as a PNG."""
        from transferkit.train.reporting import _pyplot, _save

        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        ax.plot(self.lrs, self.losses)
        ax.axvline(self.suggestion, color="tab:red", linestyle="--", label=f"suggested lr {self.suggestion:.2e}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("smoothed training loss")
        ax.grid(alpha=0.3)
        ax.legend()
        self.plot_path = _save(fig, path)
        return self.plot_path


def suggest_lr(lrs: list[float], losses: list[float]) -> float:
    """The learning rate of the steepest descent of the loss (in log-lr) before its minimum,
    capped at a tenth of the rate with the lowest loss (fastai's two rules of thumb combined:
    on easy data the loss may fall until the largest rate tried, which is never a safe choice).

    Example:
        >>> lrs = [10 ** (-6 + i / 10) for i in range(50)]
        >>> losses = [1.0 / (1 + math.exp(4 * (math.log10(lr) + 3))) for lr in lrs]
        >>> round(math.log10(suggest_lr(lrs, losses)))
        -3
    """
    if len(lrs) < 3:
        return lrs[0] / 10 if lrs else 1e-3
    end = int(np.argmin(losses)) + 1
    cap = lrs[end - 1] / 10
    if end < 3:
        return float(cap)
    x, y = np.log10(np.asarray(lrs[:end])), np.asarray(losses[:end])
    steepest = float(lrs[int(np.argmin(np.gradient(y, x)))])
    return min(steepest, float(cap))


def lr_range_test(module: nn.Module, loader: DataLoader, *, optimizer: torch.optim.Optimizer, loss_fn: Callable,
                  speed: SpeedConfig, set_mode: Callable[[int], None], start_lr: float = 1e-7, end_lr: float = 10.0,
                  num_steps: int = 100, smooth: float = 0.05, diverge: float = 4.0) -> LRFindResult:
    """Run the test on ``module`` and restore its weights and the optimizer's state afterwards.

    Example:
        >>> res = lr_range_test(head, loader, optimizer=opt, loss_fn=nn.CrossEntropyLoss(),
        ...                     speed=SpeedConfig(torch.device("cpu")), set_mode=lambda e: None)  # doctest: +SKIP
    """
    if not (0 < start_lr < end_lr) or num_steps < 2:
        raise ConfigError(f"lr_find needs 0 < start_lr < end_lr and num_steps >= 2, got {start_lr}, {end_lr}, {num_steps}.")
    saved_model, saved_opt = copy.deepcopy(module.state_dict()), copy.deepcopy(optimizer.state_dict())
    ratio = (end_lr / start_lr) ** (1.0 / (num_steps - 1))
    lrs, losses, avg, best, step = [], [], 0.0, math.inf, 0
    notes: list[str] = []
    try:
        set_mode(0)
        epoch = 0
        while step < num_steps:
            if hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(epoch)
            for x, y in loader:
                lr = start_lr * ratio ** step
                for g in optimizer.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)
                x, y = speed.to_device(x), y.to(speed.device)
                with speed.autocast():
                    loss = loss_fn(module(x).float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                value = loss.item()
                avg = smooth * value + (1 - smooth) * avg  # debiased exponential moving average
                smoothed = avg / (1 - (1 - smooth) ** (step + 1))
                lrs.append(lr)
                losses.append(smoothed)
                best = min(best, smoothed)
                step += 1
                if not math.isfinite(smoothed) or smoothed > diverge * best or step >= num_steps:
                    if step < num_steps:
                        notes.append(f"stopped at lr {lr:.2e}: the loss diverged")
                    step = num_steps
                    break
            epoch += 1
    finally:
        module.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_opt)
    finite = [(lr, v) for lr, v in zip(lrs, losses) if math.isfinite(v)]
    lrs, losses = [p[0] for p in finite], [p[1] for p in finite]
    return LRFindResult(lrs=lrs, losses=losses, suggestion=suggest_lr(lrs, losses), notes=notes)

