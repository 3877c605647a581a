"""Optimizers and learning-rate schedules."""

from __future__ import annotations

import math
from typing import Any

import torch

from transferkit.errors import ConfigError, check_choice

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "constant")


def make_optimizer(name: str, groups: list[dict[str, Any]], *, lr: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    """``"adamw"`` (default), ``"adam"`` or ``"sgd"`` (Nesterov momentum) over parameter ``groups``."""
    check_choice("optimizer", name, OPTIMIZERS)
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"lr must be a positive number, got {lr!r}.")
    if not groups:
        raise ConfigError("Nothing to train: the policy froze every parameter, head included.")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return cls(groups, lr=lr)


def make_scheduler(name: str, optimizer: torch.optim.Optimizer, *, total_steps: int,
                   warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step schedule: linear warmup, then ``"cosine"`` decay to 0 or ``"constant"``."""
    check_choice("schedule", name, SCHEDULES)
    total_steps = max(int(total_steps), 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if name == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
