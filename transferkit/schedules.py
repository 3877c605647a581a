"""The optimizers and learning-rate schedules a configuration may name, the valid range of
every schedule option (checked when a configuration is made, before anything is built), and
the sweep of the learning-rate range test."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from transferkit.errors import ConfigError, check_choice

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "constant", "step", "exponential", "one_cycle", "plateau")
SCHEDULE_DEFAULTS: dict[str, dict[str, float]] = {
    "cosine": {"min_factor": 0.0},
    "constant": {},
    "step": {"step_epochs": 0, "gamma": 0.1},  # step_epochs 0: a third of the run
    "exponential": {"gamma": 0.9},
    "one_cycle": {"pct_start": 0.3, "div_factor": 25.0, "final_div_factor": 1e4},
    "plateau": {"factor": 0.1, "patience": 2, "threshold": 1e-4},
}


# the valid range of every schedule option: (check, what it must be)
_OPTION_RANGES: dict[str, tuple[Any, str]] = {
    "min_factor": (lambda v: 0 <= v <= 1, "a fraction of the base lr in [0, 1]"),
    "step_epochs": (lambda v: v >= 0 and float(v).is_integer(), "a whole number of epochs >= 0 (0: a third of the run)"),
    "gamma": (lambda v: 0 < v <= 1, "a factor in (0, 1]: the lr must not grow or change sign"),
    "pct_start": (lambda v: 0 < v < 1, "a fraction of the run in (0, 1)"),
    "div_factor": (lambda v: v >= 1, "a number >= 1 (the start lr is base lr / div_factor)"),
    "final_div_factor": (lambda v: v >= 1, "a number >= 1"),
    "factor": (lambda v: 0 < v < 1, "a factor in (0, 1)"),
    "patience": (lambda v: v >= 0 and float(v).is_integer(), "a whole number of epochs >= 0"),
    "threshold": (lambda v: v >= 0, "a number >= 0"),
}


def check_schedule_options(name: str, options: dict[str, Any] | None) -> dict[str, float]:
    """``options`` of schedule ``name``, checked: known keys, numbers, valid ranges.

    Example:
        >>> check_schedule_options("step", {"gamma": 0.5})
        {'step_epochs': 0, 'gamma': 0.5}
    """
    check_choice("schedule", name, SCHEDULES)
    if name == "plateau" and options and "mode_max" in options:  # an option of earlier versions
        if options["mode_max"] not in (0, False):
            raise ConfigError("schedule_options mode_max=1 is no longer taken: the plateau schedule reads the "
                              "validation loss (lower is better), and mode_max=1 cut the rate while it fell. Leave "
                              "it out.")
        options = {k: v for k, v in options.items() if k != "mode_max"}  # 0 was the default: nothing changes
    unknown = set(options or {}) - set(SCHEDULE_DEFAULTS[name])
    if unknown:
        raise ConfigError(f"Unknown schedule_options {sorted(unknown)} for schedule {name!r}; "
                          f"valid: {sorted(SCHEDULE_DEFAULTS[name]) or 'none'}.")
    for key, value in (options or {}).items():
        ok, what = _OPTION_RANGES[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"schedule_options {key}={value!r} for schedule {name!r} has type "
                              f"{type(value).__name__}; expected a number: {what}.")
        if not math.isfinite(value) or not ok(value):
            raise ConfigError(f"schedule_options {key}={value!r} for schedule {name!r} is out of range; expected {what}.")
    return {**SCHEDULE_DEFAULTS[name], **(options or {})}


@dataclass(frozen=True)
class LRRange:
    """The rates a range test sweeps (``start_lr`` to ``end_lr``, geometrically, over
    ``num_steps`` batches), the smoothing of its loss curve, and when it stops (the smoothed
    loss above ``diverge`` times its minimum). The one place these defaults are written:
    ``transferkit.lr_find`` and ``transferkit lr-find`` take theirs from here."""

    start_lr: float = 1e-7
    end_lr: float = 10.0
    num_steps: int = 100
    smooth: float = 0.05
    diverge: float = 4.0
