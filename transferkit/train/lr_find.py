"""The learning-rate range test (Smith 2015; fastai's ``lr_find``): raise the learning rate
exponentially batch by batch, record the loss, stop when it explodes, and suggest a rate
inside the descent of the loss, before its minimum.

How the suggestion is chosen ([`find_valley`][transferkit.train.lr_find.find_valley], fastai's "valley" rule made explicit):

1. The first 10 % of the points are skipped: start-up noise, not information.
2. The per-batch losses are smoothed without lag: the bias-corrected exponential moving
   average (fastai's) run forwards and backwards over the curve and averaged. A one-way
   average lags the curve by ``1 / smooth`` batches (20 batches, 1.6 decades of lr at the
   defaults), which would push the suggestion towards the explosion. Losses above the
   highest point of the one-way average before its minimum are clipped to it first, so
   that the explosion does not leak backwards into the descent.
3. The minimum of the smoothed curve ends the search. Before it, the descent is where the
   loss falls from 90 % to 10 % of the way between the level before the descent (the 90th
   percentile of the curve before the minimum: a few wild points do not set it) and the
   minimum itself; a noisy flat start is not "descent".
4. The suggestion is the rate two thirds of the way through the descent in log-lr
   (``lr_top ** (1/3) * lr_bottom ** (2/3)``): just past the point where the loss falls
   fastest on an S-shaped curve, still inside the descent, and usually a decade or more
   below the minimum. (fastai's ``valley`` takes the middle of its longest descending run;
   two thirds gave the better of the two rates on the curves we measured, see
   ``docs/training.md``.)

When the loss does not fall at all, falls no more than its batch-to-batch noise alone would
(`NOISE_QUANTILE`: the suggestion is made as usual and the note says it may be set by noise),
or still falls at the largest rate tried, the result's ``notes`` say so and how to change the
range.
"""

from __future__ import annotations

import copy
import functools
import io
import math
import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from torch.utils.data import DataLoader

from transferkit._progress import progress
from transferkit.errors import ConfigError
from transferkit.train.reporting import pyplot, save_figure
from transferkit.schedules import LRRange
from transferkit._text import plural
from transferkit.train.loop import Loop

SKIP_START = 0.1  # fraction of the first points left out of the suggestion
SMOOTH_DECADES = 0.25  # the width of the smoothing the suggestion uses, in decades of lr
DESCENT_TOP, DESCENT_BOTTOM = 0.9, 0.1  # the descent: from 90 % to 10 % of the way down to the minimum
POSITION = 2 / 3  # where in the descent (in log-lr) the suggestion lies
# a fall of the smoothed loss that pure batch-to-batch noise of the curve's own level and length reaches in
# this share of simulated curves is within the noise (the rule reads such a curve as it would any other, and
# says that its descent may be noise)
NOISE_QUANTILE = 0.99


def smooth_losses(losses: Sequence[float], smooth: float = 0.05) -> list[float]:
    """fastai's smoothed loss: the exponential moving average ``avg = smooth * loss + (1 - smooth) * avg``
    divided by ``1 - (1 - smooth) ** (i + 1)`` (bias correction: the first values are not pulled to 0).

    Example:
        >>> [round(v, 3) for v in smooth_losses([1.0, 1.0, 0.0], smooth=0.5)]
        [1.0, 1.0, 0.429]
    """
    out, avg = [], 0.0
    for i, value in enumerate(losses):
        avg = smooth * float(value) + (1 - smooth) * avg
        out.append(avg / (1 - (1 - smooth) ** (i + 1)))
    return out


def zero_lag_smooth(losses: Sequence[float], smooth: float = 0.05) -> list[float]:
    """The mean of `smooth_losses` run forwards and backwards: smoothed like it, without its lag.

    Example:
        >>> [round(v, 2) for v in zero_lag_smooth([0.0, 1.0, 2.0, 3.0, 4.0], smooth=0.5)]
        [0.42, 1.2, 2.0, 2.8, 3.58]
    """
    forward = smooth_losses(losses, smooth)
    backward = smooth_losses(list(losses)[::-1], smooth)[::-1]
    return [(a + b) / 2 for a, b in zip(forward, backward)]


@dataclass(frozen=True)
class Valley:
    """The descent [`find_valley`][transferkit.train.lr_find.find_valley] found: indices into the curve it was given, the suggested
    rate, the rate of the (smoothed) minimum and what to know about the curve."""

    start: int
    end: int
    minimum: int
    index: int
    suggestion: float
    min_lr: float
    notes: tuple[str, ...] = ()
    skip: int = 0
    smoothed: tuple[float, ...] = field(default=(), repr=False)  # the curve the rule read, for lrs[skip:]


def find_valley(lrs: Sequence[float], losses: Sequence[float], *, smooth_decades: float = SMOOTH_DECADES,
                skip_start: float = SKIP_START) -> Valley:
    """Where the loss descends before its minimum, and the rate two thirds of the way down it
    (the module docstring gives the rule). ``losses`` are per-batch losses; already smoothed ones work too.

    Example:
        >>> lrs = [10 ** (-6 + i / 10) for i in range(60)]
        >>> losses = [1 / (1 + math.exp(4 * (math.log10(lr) + 3))) + (10 if lr > 1 else 0) for lr in lrs]
        >>> v = find_valley(lrs, losses)
        >>> round(math.log10(v.suggestion), 1), v.min_lr < 1  # inside the descent, before the minimum
        (-2.7, True)
    """
    if len(lrs) != len(losses):
        raise ConfigError(f"find_valley needs as many learning rates as losses, got {len(lrs)} and {len(losses)}.")
    if len(lrs) < 4:
        if not lrs:
            raise ConfigError("find_valley got no points: the range test recorded no loss.")
        return Valley(0, 0, 0, 0, float(lrs[0]), float(lrs[0]),
                      (f"only {plural(len(lrs), 'point')}: too few to read a descent (raise num_steps, or, when "
                       "the loss exploded, lower start_lr)",))
    skip = int(skip_start * len(losses))
    per_decade = (len(lrs) - 1) / (math.log10(lrs[-1] / lrs[0]) if lrs[-1] > lrs[0] > 0 else 1.0)
    smooth = 1.0 / (1.0 + smooth_decades * per_decade)  # an average whose mean lag is smooth_decades
    raw = np.asarray(losses[skip:], dtype=float)
    causal = np.asarray(smooth_losses(raw, smooth))
    ceiling = float(causal[: int(np.argmin(causal)) + 1].max())
    kept = np.asarray(zero_lag_smooth(np.minimum(raw, ceiling), smooth))
    curve = tuple(float(v) for v in kept)
    m = int(np.argmin(kept))
    top = float(np.percentile(kept[: m + 1], 90))  # the level before the descent; a few wild points do not set it
    drop = top - float(kept[m])
    noise = _noise_fall(raw[: m + 1], smooth, len(kept))
    notes: list[str] = []
    first = float(np.min(losses[: max(1, skip // 2)]))  # the loss at the first rates, left out of the reading
    if skip >= 2 and first > top + max(drop, 1e-3 * max(abs(top), 1e-12)):
        notes.append(f"the loss already falls at start_lr ({lrs[0]:.1e}), before the part of the curve read (from "
                     f"{lrs[skip]:.1e}): lower start_lr so that the test starts where the loss is still flat")
    if m == 0 or drop <= 1e-3 * max(abs(top), 1e-12):
        notes.append(f"the loss does not fall between {lrs[skip]:.1e} and {lrs[-1]:.1e}: "
                     "try a lower start_lr, or check the data and labels")
        i = skip + m
        return Valley(i, i, i, i, float(lrs[i]), float(lrs[i]), tuple(notes), skip, curve)
    if drop <= noise:
        notes.append(f"the loss does not fall between {lrs[skip]:.1e} and {lrs[-1]:.1e} beyond its batch-to-batch "
                     f"noise (a fall of {drop:.2g}; noise alone falls {noise:.2g} in {NOISE_QUANTILE:.0%} of such "
                     "curves), so the suggestion may be set by noise: try a lower start_lr, more steps (num_steps), "
                     "or check the data and labels")
    before = kept[: m + 1]
    above = np.nonzero(before >= kept[m] + DESCENT_TOP * drop)[0]
    start = int(above[-1])  # the last point still near the top
    below = np.nonzero(before[start:] <= kept[m] + DESCENT_BOTTOM * drop)[0]
    end = start + int(below[0])  # the first point near the bottom
    idx = skip + start + round(POSITION * (end - start))
    tail = max(1, round(0.5 * per_decade))  # the last half decade
    if m == len(kept) - 1 and kept[max(0, m - tail)] - kept[m] > 0.05 * drop:
        notes.append(f"the loss still falls at the largest rate tried ({lrs[-1]:.1e}): raise end_lr to see "
                     "where it stops")
    return Valley(skip + start, skip + end, skip + m, idx, float(lrs[idx]), float(lrs[skip + m]), tuple(notes),
                  skip, curve)


def _noise_fall(raw: np.ndarray, smooth: float, n: int) -> float:
    """The fall (level before the minimum to the minimum, read as `find_valley` reads it) that
    batch-to-batch noise alone gives a smoothed curve of ``n`` points in `NOISE_QUANTILE` of
    cases, at the noise of one batch in ``raw`` (the losses before the minimum: robustly, from
    second differences, in which a smooth trend cancels); 0 when too few points tell it."""
    if len(raw) < 8:
        return 0.0
    d2 = np.diff(raw, 2)
    per_batch = float(np.median(np.abs(d2 - np.median(d2)))) * 1.4826 / math.sqrt(6)
    return per_batch * _unit_noise_fall(n, round(smooth, 12))


@functools.lru_cache(maxsize=64)
def _unit_noise_fall(n: int, smooth: float, curves: int = 200) -> float:
    """`_noise_fall` at a per-batch noise of 1: simulated (seeded, so the same every run)."""
    rng = np.random.default_rng(0)
    falls = []
    for _ in range(curves):
        kept = np.asarray(zero_lag_smooth(rng.standard_normal(n), smooth))
        m = int(np.argmin(kept))
        falls.append(float(np.percentile(kept[: m + 1], 90)) - float(kept[m]))
    return float(np.quantile(falls, NOISE_QUANTILE))


def suggest_lr(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """The suggested learning rate of a range test: two thirds of the way down the descent of
    the loss before its minimum ([`find_valley`][transferkit.train.lr_find.find_valley]).

    Example:
        >>> lrs = [10 ** (-6 + i / 10) for i in range(50)]
        >>> losses = [1.0 / (1 + math.exp(4 * (math.log10(lr) + 3))) for lr in lrs]
        >>> round(math.log10(suggest_lr(lrs, losses)))
        -3
    """
    return find_valley(lrs, losses).suggestion


@dataclass
class LRFindResult:
    """The learning rates tried, the losses, the suggestion and the plot (if asked).

    ``losses``: fastai's smoothed loss (the bias-corrected moving average the early stop
    reads); ``raw_losses``: the loss of each batch; ``valley``: the descent the suggestion lies
    in (indices into ``lrs``) and the centred smoothed curve the rule read (``valley.smoothed``,
    for ``lrs[valley.skip:]``), which the plot draws."""

    lrs: list[float]
    losses: list[float]
    suggestion: float
    plot_path: Path | None = None
    notes: list[str] = field(default_factory=list)
    raw_losses: list[float] = field(default_factory=list)
    valley: Valley | None = None
    phase: str = "run"  # what the test trained: "frozen" (the head on cached features), "unfrozen", "run"
    seconds: float | None = None  # the wall time of the range test

    def __repr__(self) -> str:
        """A line to read (the curve's hundreds of numbers are in ``lrs`` and ``losses``)."""
        tried = f"{len(self.lrs)} steps from {self.lrs[0]:.3g} to {self.lrs[-1]:.3g}" if self.lrs else "no step"
        plot = f", plot_path={str(self.plot_path)!r}" if self.plot_path is not None else ""
        return f"LRFindResult(suggestion={self.suggestion:.3g}, {tried}, phase={self.phase!r}{plot})"

    def plot(self, path: str | Path) -> Path:
        """Loss against learning rate (log scale) as a PNG: the raw and smoothed losses, the
        descent shaded, the suggestion marked.

        Example:
            >>> res.plot("lr_find.png")  # doctest: +SKIP
        """
        self.plot_path = save_figure(self._figure(), path)
        return self.plot_path

    def _repr_png_(self) -> bytes | None:
        """In a notebook: the curve (drawn when matplotlib is installed, else the text repr)."""
        try:
            plt = pyplot()
        except ConfigError:
            return None
        fig = self._figure()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        return buf.getvalue()

    def _figure(self) -> Any:

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 3.8))
        v = self.valley
        if self.raw_losses:
            ax.plot(self.lrs, self.raw_losses, color="0.72", linewidth=0.8, label="loss per batch")
        curve_lrs, curve = (self.lrs[v.skip:], list(v.smoothed)) if v is not None and v.smoothed else \
            (self.lrs, self.losses)
        ax.plot(curve_lrs, curve, color="tab:blue", label="smoothed loss")
        if v is not None and v.skip > 0:
            ax.axvspan(self.lrs[0], self.lrs[v.skip], color="0.5", alpha=0.08, label="skipped")
        if v is not None and v.end > v.start:
            ax.axvspan(self.lrs[v.start], self.lrs[v.end], color="tab:green", alpha=0.12, label="descent")
        y = float(np.interp(math.log(self.suggestion), np.log(curve_lrs), curve)) if curve else 0.0
        ax.axvline(self.suggestion, color="tab:red", linestyle="--", linewidth=1)
        ax.plot([self.suggestion], [y], "o", color="tab:red", label=f"suggested lr {self.suggestion:.1e}")
        ax.set_xscale("log")
        if curve:  # an explosion would squash the curve: show it up to a little above its start
            lo, hi = min(curve), max(curve[: max(1, len(curve) // 2)])
            pad = hi - lo if hi > lo else max(abs(hi), 1.0)
            ax.set_ylim(lo - 0.1 * pad, hi + 0.5 * pad)
        ax.set_xlabel("learning rate (finetune's lr=)")
        ax.set_ylabel("training loss")
        ax.set_title("learning-rate range test" + {"frozen": ": the frozen phase (head alone)",
                                                   "unfrozen": ": the phase that trains the backbone"}.get(self.phase, ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return fig


def check_sweep(sweep: LRRange) -> None:
    """A ConfigError unless ``0 < start_lr < end_lr`` (finite numbers) and ``num_steps >= 2`` (an integer).

    Example:
        >>> try:
        ...     check_sweep(LRRange(start_lr=1e-5, end_lr=1e-6))
        ... except ConfigError as exc:
        ...     print(str(exc).split(", got")[0])
        lr_find needs 0 < start_lr < end_lr and num_steps >= 2
    """
    for name in ("start_lr", "end_lr"):
        value = getattr(sweep, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ConfigError(f"lr_find: {name}={value!r} is not a finite number.")
    steps = sweep.num_steps
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise ConfigError(f"lr_find: num_steps={steps!r} is not an integer.")
    if not (0 < sweep.start_lr < sweep.end_lr) or sweep.num_steps < 2:
        raise ConfigError(f"lr_find needs 0 < start_lr < end_lr and num_steps >= 2, got start_lr={sweep.start_lr}, "
                          f"end_lr={sweep.end_lr}, num_steps={sweep.num_steps}.")


def lr_range_test(module: nn.Module, loader: DataLoader, loop: Loop, sweep: LRRange = LRRange(), *,
                  lr_factor: float = 1.0, on_first_steps: Callable[[float], None] | None = None) -> LRFindResult:
    """Run the test on ``module`` with ``loop``'s optimizer, loss, ``speed`` and ``set_mode``,
    and restore its weights and the optimizer's state afterwards.

    The rate grows from ``sweep.start_lr`` to ``sweep.end_lr`` over ``sweep.num_steps``
    batches (looping over ``loader`` as often as needed); the test stops early when the
    smoothed loss exceeds ``sweep.diverge`` times its minimum, or is not finite. Progress
    shows as `transferkit._progress` draws it (``loop.verbose=False``: never). ``lr_factor``:
    the groups train at ``lr * lr_factor * lr_scale`` while ``lrs`` records ``lr`` (a phase
    that runs at a fraction of the run's base lr). ``on_first_steps(seconds_per_step)`` is
    called once after the first timed steps (an estimate of the test's cost).

    Example:
        >>> loop = Loop(optimizer=opt, loss_fn=nn.CrossEntropyLoss(), set_mode=lambda e: None)  # doctest: +SKIP
        >>> lr_range_test(head, loader, loop, LRRange(num_steps=50)).suggestion  # doctest: +SKIP
    """
    start_lr, end_lr, num_steps, smooth, diverge = (sweep.start_lr, sweep.end_lr, sweep.num_steps, sweep.smooth,
                                                    sweep.diverge)
    optimizer, loss_fn, speed, set_mode, verbose = loop.optimizer, loop.loss_fn, loop.speed, loop.set_mode, loop.verbose
    check_sweep(sweep)
    if not 0 < smooth <= 1:
        raise ConfigError(f"smooth must be in (0, 1], got {smooth!r}.")
    saved_model, saved_opt = copy.deepcopy(module.state_dict()), copy.deepcopy(optimizer.state_dict())
    ratio = (end_lr / start_lr) ** (1.0 / (num_steps - 1))
    lrs: list[float] = []
    raw: list[float] = []
    smoothed: list[float] = []
    avg, best, step, epoch = 0.0, math.inf, 0, 0
    notes: list[str] = []
    bar = progress(num_steps, "lr-find", verbose=verbose, unit="batch")
    timer: list[float] = []
    try:
        set_mode(0)
        while step < num_steps:
            if hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(epoch)
            for x, y in loader:
                lr = start_lr * ratio ** step
                for g in optimizer.param_groups:
                    g["lr"] = lr * lr_factor * g.get("lr_scale", 1.0)
                x, y = speed.to_device(x), y.to(speed.device)
                with speed.autocast():
                    loss = loss_fn(module(x).float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                value = loss.item()
                avg = smooth * value + (1 - smooth) * avg
                current = avg / (1 - (1 - smooth) ** (step + 1))  # bias-corrected moving average
                lrs.append(lr)
                raw.append(value)
                smoothed.append(current)
                best = min(best, current)
                step += 1
                timer.append(time.perf_counter())
                if on_first_steps is not None and len(timer) == 3:  # the first step warms up: time the next two
                    on_first_steps((timer[2] - timer[0]) / 2)
                bar.update(1)
                bar.set_postfix(lr=f"{lr:.1e}", loss=f"{current:.3f}", refresh=False)
                if not math.isfinite(current) or current > diverge * best:
                    notes.append(f"stopped at lr {lr:.2e}: the loss exploded (over {diverge:g}x its minimum)")
                    step = num_steps
                if step >= num_steps:
                    break
            epoch += 1
    finally:
        bar.close()
        module.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_opt)
    keep = [i for i in range(len(lrs)) if math.isfinite(raw[i]) and math.isfinite(smoothed[i])]
    lrs, raw, smoothed = [lrs[i] for i in keep], [raw[i] for i in keep], [smoothed[i] for i in keep]
    valley = find_valley(lrs, raw)
    return LRFindResult(lrs=lrs, losses=smoothed, suggestion=valley.suggestion, notes=notes + list(valley.notes),
                        raw_losses=raw, valley=valley)
