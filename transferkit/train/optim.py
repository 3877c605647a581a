"""Optimizers and learning-rate schedules.

A schedule multiplies each parameter group's base learning rate (its ``lr`` when the
schedule is made, so per-block learning rates keep their ratios) by a factor that
depends on the optimizer step; ``"plateau"`` also reacts to the validation metric at
the end of each epoch. Every schedule takes an optional linear warmup (``one_cycle``
has its own). A run of several phases (``fine_tune``: the head alone, then the backbone;
see ``Policy.lr_phases``) runs the schedule once per phase, each at its own share of the
base rate. The whole state is four numbers, saved in checkpoints for exact resume.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch

from transferkit.errors import ConfigError, check_choice

from transferkit.schedules import OPTIMIZERS, SCHEDULE_DEFAULTS, SCHEDULES, check_schedule_options  # noqa: F401

DEFAULT_LR = 1e-3  # backbone weights train: fine-tuning rate (AdamW)
DEFAULT_HEAD_LR = 1e-2  # only a new head trains (on standardised features when they are cached)


def default_lr(*, head_only: bool, head_first: bool = False) -> float:
    """The learning rate ``finetune(lr=None)`` uses: the head's rate when the head trains
    alone (``head_only``) or first (``head_first``: a policy with a frozen phase, whose base
    lr is the frozen phase's, the later phase running at a fraction of it), else the
    fine-tuning rate.

    Example:
        >>> default_lr(head_only=True), default_lr(head_only=False), default_lr(head_only=False, head_first=True)
        (0.01, 0.001, 0.01)
    """
    return DEFAULT_HEAD_LR if head_only or head_first else DEFAULT_LR


def phase_steps(phases: Sequence[tuple[int, float]], epoch_steps: Sequence[int]) -> list[tuple[int, float]]:
    """Epoch phases ``[(epochs, lr factor), ...]`` (``Policy.lr_phases``) as optimizer-step
    phases, given the optimizer steps of each epoch.

    Example:
        >>> phase_steps([(1, 1.0), (2, 0.1)], [8, 7, 7])
        [(8, 1.0), (14, 0.1)]
    """
    if sum(n for n, _ in phases) != len(epoch_steps):
        raise ConfigError(f"The phases {list(phases)} do not cover the run's {len(epoch_steps)} epochs.")
    out, first = [], 0
    for n, factor in phases:
        out.append((sum(epoch_steps[first:first + n]), float(factor)))
        first += n
    return out


def make_optimizer(name: str, groups: list[dict[str, Any]], *, lr: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    """``"adamw"`` (default), ``"adam"`` or ``"sgd"`` (Nesterov momentum) over parameter ``groups``.

    Example:
        >>> opt = make_optimizer("sgd", [{"params": [torch.nn.Parameter(torch.zeros(2))]}], lr=0.1)
        >>> type(opt).__name__
        'SGD'
    """
    check_choice("optimizer", name, OPTIMIZERS)
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"lr must be a positive number, got {lr!r}.")
    if not groups:
        raise ConfigError("Nothing to train: the policy froze every parameter, head included.")
    if name == "sgd":
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {momentum!r}.")
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return cls(groups, lr=lr)


class LRSchedule:
    """Sets ``lr = base_lr * factor`` on every group; ``step()`` after each optimizer step,
    ``epoch_end(metric)`` after each epoch (only ``"plateau"`` uses the metric).

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(1))
        >>> opt = torch.optim.SGD([p], lr=1.0)
        >>> s = LRSchedule("cosine", opt, total_steps=10, steps_per_epoch=5)
        >>> for _ in range(5): s.step()
        >>> round(opt.param_groups[0]["lr"], 3)
        0.5
    """

    def __init__(self, name: str, optimizer: torch.optim.Optimizer, *, total_steps: int, steps_per_epoch: int,
                 warmup_steps: int = 0, options: dict[str, float] | None = None,
                 phases: Sequence[tuple[int, float]] | None = None, epoch_steps: Sequence[int] | None = None) -> None:
        opts = check_schedule_options(name, options)
        if warmup_steps < 0:
            raise ConfigError(f"warmup must be >= 0, got {warmup_steps}.")
        self.name, self.optimizer = name, optimizer
        self.opts = opts
        self.warmup_steps = 0 if name == "one_cycle" else int(warmup_steps)
        self.base_lrs = [g.setdefault("initial_lr", g["lr"]) for g in optimizer.param_groups]
        self.step_count, self.scale, self.best, self.bad_epochs = 0, 1.0, None, 0
        self.plateau_phase = 0  # the phase the plateau's bookkeeping (scale, best, bad_epochs) belongs to
        self.replan(total_steps=total_steps, steps_per_epoch=steps_per_epoch, phases=phases, epoch_steps=epoch_steps)

    def replan(self, *, total_steps: int, steps_per_epoch: int = 1, phases: Sequence[tuple[int, float]] | None = None,
               epoch_steps: Sequence[int] | None = None, warmup_steps: int | None = None) -> None:
        """Lay the schedule over these steps: ``phases`` ``[(steps, lr factor), ...]`` (one
        schedule each), ``epoch_steps`` the optimizer steps of each epoch in order, as step and
        exponential schedules count epochs (an epoch on cached features that makes several
        passes counts each pass, as feature extraction's epochs do); default: epochs of
        ``steps_per_epoch``. Called again when the feature pass finds fewer readable samples
        than planned; the current step keeps its place."""
        self.total_steps = max(int(total_steps), 1)
        if warmup_steps is not None and self.name != "one_cycle":
            self.warmup_steps = int(warmup_steps)
        self.phases = [(max(int(n), 1), float(f)) for n, f in phases] if phases else [(self.total_steps, 1.0)]
        if any(not (f > 0 and math.isfinite(f)) for _, f in self.phases):
            raise ConfigError(f"Phase lr factors must be positive numbers, got {[f for _, f in self.phases]}.")
        per = max(int(steps_per_epoch), 1)
        sizes = [max(int(n), 1) for n in epoch_steps] if epoch_steps else [per] * -(-self.total_steps // per)
        self.epoch_ends = list(itertools.accumulate(sizes))  # the first step after each epoch
        self._apply()

    def _epoch(self, step: int) -> int:
        """The epoch (of `replan`'s ``epoch_steps``) that optimizer step ``step`` is in."""
        return bisect.bisect_right(self.epoch_ends, step)

    def phase(self, step: int) -> tuple[int, int]:
        """``(index, first step)`` of the phase optimizer step ``step`` is in (the last phase
        takes any step beyond the plan)."""
        first = 0
        for i, (n, _) in enumerate(self.phases):
            if step < first + n or i == len(self.phases) - 1:
                return i, first
            first += n
        raise AssertionError("unreachable")

    def factor(self, step: int) -> float:
        """The multiplier at optimizer step ``step`` (before the plateau scale): the schedule
        of the phase the step is in, restarted at the phase's first step, times its lr factor."""
        i, first = self.phase(step)
        n, phase_factor = self.phases[i]
        return phase_factor * self._phase_factor(step - first, n, self.warmup_steps if i == 0 else 0, first)

    def _phase_factor(self, step: int, total: int, w: int, first: int = 0) -> float:
        o = self.opts
        if step < w:  # w steps below the rate, each a 1/(w+1) step up: step w is the first at it
            return (step + 1) / (w + 1)
        if self.name == "one_cycle":
            return self._one_cycle(step, total)
        epoch = self._epoch(first + step) - self._epoch(first)  # epochs since the phase began
        if self.name == "step":
            epochs = self._epoch(first + total - 1) - self._epoch(first) + 1
            every = int(o["step_epochs"]) or max(epochs // 3, 1)
            return o["gamma"] ** (epoch // every)
        if self.name == "exponential":
            return o["gamma"] ** epoch
        if self.name == "cosine":
            progress = min((step - w) / max(total - w, 1), 1.0)
            return o["min_factor"] + (1 - o["min_factor"]) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    def _one_cycle(self, step: int, total: int) -> float:
        o = self.opts
        up = max(int(o["pct_start"] * total), 1)
        lo, end = 1.0 / o["div_factor"], 1.0 / (o["div_factor"] * o["final_div_factor"])
        if step < up:
            return lo + (1 - lo) * 0.5 * (1 - math.cos(math.pi * step / up))
        t = min((step - up) / max(total - 1 - up, 1), 1.0)  # the last step reaches the floor
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * t))

    def _apply(self) -> None:
        phase = self.phase(self.step_count)[0]
        if phase != self.plateau_phase:  # a new phase starts its schedule again: the plateau's cuts too
            self.plateau_phase, self.scale, self.best, self.bad_epochs = phase, 1.0, None, 0
        f = self.factor(self.step_count) * self.scale
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * f

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def epoch_end(self, metric: float | None = None) -> None:
        """Reduce-on-plateau bookkeeping: after ``patience`` epochs without improvement of
        ``metric`` (a loss: lower is better), multiply the learning rate by ``factor``. Each
        phase keeps its own: the last epoch of a phase counts for nothing in the next, which
        starts at the phase's rate."""
        if self.name != "plateau" or metric is None or not math.isfinite(metric):
            return
        if self.phase(max(self.step_count - 1, 0))[0] != self.plateau_phase:  # the epoch ended the phase before
            return
        o = self.opts
        value = metric
        if self.best is None or value < self.best - o["threshold"] * abs(self.best):
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs > o["patience"]:
                self.scale *= o["factor"]
                self.bad_epochs = 0
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        """The position, the plateau's bookkeeping and the plan (a `replan` made during the run,
        when the feature pass found unreadable files, is resumed as it was)."""
        return {"step_count": self.step_count, "scale": self.scale, "best": self.best, "bad_epochs": self.bad_epochs,
                "plateau_phase": self.plateau_phase,
                "plan": {"total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                         "phases": [list(p) for p in self.phases], "epoch_ends": list(self.epoch_ends)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count, self.scale = int(state["step_count"]), float(state["scale"])
        self.best, self.bad_epochs = state["best"], int(state["bad_epochs"])
        plan = state.get("plan")  # absent from a checkpoint written before the plan was stored: the one made now
        if plan is not None:
            self.total_steps, self.warmup_steps = int(plan["total_steps"]), int(plan["warmup_steps"])
            self.phases = [(int(n), float(f)) for n, f in plan["phases"]]
            self.epoch_ends = [int(e) for e in plan["epoch_ends"]]
        # absent from a checkpoint of before: its bookkeeping is that of the phase of the last step taken (a
        # checkpoint at a phase's first step leaves the phase before behind, as a run of now does)
        self.plateau_phase = int(state.get("plateau_phase", self.phase(max(self.step_count - 1, 0))[0]))
        self._apply()


def make_scheduler(name: str, optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int = 0,
                   steps_per_epoch: int | None = None, options: dict[str, float] | None = None,
                   phases: Sequence[tuple[int, float]] | None = None,
                   epoch_steps: Sequence[int] | None = None) -> LRSchedule:
    """An `LRSchedule`; ``steps_per_epoch`` defaults to ``total_steps`` (one epoch), or
    ``epoch_steps`` gives each epoch's steps (see `LRSchedule.replan`); ``phases``:
    ``[(steps, lr factor), ...]`` (`phase_steps`), one schedule per phase.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(1))
        >>> opt = torch.optim.AdamW([p], lr=1e-2)
        >>> s = make_scheduler("cosine", opt, total_steps=6, phases=[(2, 1.0), (4, 0.1)])
        >>> lrs = []
        >>> for _ in range(6): lrs.append(round(opt.param_groups[0]["lr"], 5)); s.step()
        >>> lrs  # the head's phase decays, then the backbone's restarts at a tenth
        [0.01, 0.005, 0.001, 0.00085, 0.0005, 0.00015]
    """
    return LRSchedule(name, optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch or total_steps,
                      warmup_steps=warmup_steps, options=options, phases=phases, epoch_steps=epoch_steps)
