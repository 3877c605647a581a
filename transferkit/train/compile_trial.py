"""``compile="auto"`` for a trainable trunk: compile by trial, inside the run.

Whether `torch.compile` pays for training depends on the trunk, not only on the device:
on an H200 (bf16) ResNet-50 trained 1.21x faster compiled while Lite0 and ResNet-18 ran
0.98x and 0.87x; on a 2-core CPU Lite0 gained 1.27x and ResNet-18 lost 5 %
(docs/benchmarks.md, "torch.compile for fine-tuning"). So no rule per device type compiles
every trunk that gains and no trunk that loses. The run measures instead:

1. The first steps run eagerly; ``TRIAL_STEPS`` of them (after ``TRIAL_WARMUP``) are timed.
2. When the steps still to come, at that speed, are long enough that the estimated
   compilation costs at most ``TRIAL_MAX_SHARE`` of them, the module is compiled (sharing
   its parameters: the optimizer, checkpoints and exports are unaffected) and as many
   compiled steps are timed; otherwise it stays eager.
3. The compiled module is kept when it is at least ``MIN_SPEEDUP`` times faster, else the
   run goes on eagerly. A compilation that fails is reported and the run goes on eagerly.

A step is timed as the interval between two consecutive calls of the training module: the
forward, backward and optimizer step of one batch and the loading of the next, what the
compilation can change. The median of the timed steps counts (an epoch boundary, with its
validation pass, is one slow interval among them). The worst case of a trial is its
compilation, at most ``TRIAL_MAX_SHARE`` of the run by the estimate, plus a few slower steps.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from transferkit._text import exception_line
from transferkit.train.engines import MIN_SPEEDUP, compile_estimate, leaf_modules

TRIAL_WARMUP = 2  # steps of each variant that are not timed (first calls, allocator, compiled guards)
TRIAL_STEPS = 5  # timed steps of each variant; their median counts
TRIAL_MAX_SHARE = 0.05  # the estimated compilation may cost at most this share of the remaining eager time
# compiling forward and backward took about twice the frozen pass's estimate (`compile_estimate`):
# Lite0 76 s (estimate 2 x 39 s) on the 2-core CPU, ResNet-50 49 s (2 x 30 s) and Lite0 60 s on an H200
TRAIN_COMPILE_FACTOR = 2.0


class CompileBudget:
    """The training steps of a run and the trials' verdicts, shared by the trials of one run
    (a module rebuilt when its trainable parameters change keeps the verdict measured on it)."""

    def __init__(self, total_steps: int, *, device_type: str, log: Callable[[str], None] | None = None) -> None:
        self.total_steps, self.device_type, self.log = int(total_steps), device_type, log
        self.done = 0
        self.verdicts: dict[int, bool] = {}  # id(module) -> compiled kept (measured)
        self.reports: list[dict[str, Any]] = []

    @property
    def remaining(self) -> int:
        return max(self.total_steps - self.done, 0)


class CompileTrial(nn.Module):
    """``module`` run eagerly, compiled on trial and kept when faster (see the module docstring).

    ``report`` says what happened: ``state`` (``"timing eager"``, ``"timing compiled"``,
    ``"eager"``, ``"compiled"``), ``reason``, and the measured ``eager_step_s``,
    ``compiled_step_s`` and ``compile_s`` when there are.

    Example:
        >>> trial = CompileTrial(model, CompileBudget(1000, device_type="cpu"))  # doctest: +SKIP
        >>> train_one_epoch(trial, loader, loop)  # doctest: +SKIP
    """

    def __init__(self, module: nn.Module, budget: CompileBudget, *,
                 compile_fn: Callable[[nn.Module], Callable] = torch.compile,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        super().__init__()
        self.module = module  # registered: parameters shared, state_dict the module's own
        self.budget, self._compile_fn, self._clock = budget, compile_fn, clock
        self._compiled: Callable | None = None
        self._stamps: list[float] = []
        self._eager_s: float | None = None
        verdict = budget.verdicts.get(id(module))
        self.report: dict[str, Any] = {"state": "timing eager", "reason": ""}
        if verdict is not None:  # measured on this module earlier in the run (before its trainable set changed)
            self.report = {"state": "compiled" if verdict else "eager",
                           "reason": "as measured earlier in this run on the same module"}
            if verdict and not self._compile():
                self._settle(False, self.report["reason"])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.budget.done += 1
        state = self.report["state"]
        if state in ("timing eager", "timing compiled"):
            self._stamps.append(self._clock())
            self._step(state)
        fn = self._compiled if self.report["state"] in ("timing compiled", "compiled") else self.module
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a compilation that fails: report it, go on eagerly
            if fn is self.module:
                raise
            self._settle(False, f"the compiled module failed ({exception_line(exc)}); running eagerly")
            return self.module(*args, **kwargs)

    # ------------------------------------------------------------------ the trial
    def _median_step(self) -> float | None:
        """The median of the last TRIAL_STEPS intervals once the variant has run its warm-up."""
        intervals = [b - a for a, b in zip(self._stamps, self._stamps[1:])]
        if len(intervals) < TRIAL_WARMUP + TRIAL_STEPS:
            return None
        return statistics.median(intervals[TRIAL_WARMUP:TRIAL_WARMUP + TRIAL_STEPS])

    def _step(self, state: str) -> None:
        median = self._median_step()
        if median is None:
            return
        if state == "timing eager":
            self._eager_s = median
            self.report["eager_step_s"] = median
            remaining = self.budget.remaining * median
            estimate = TRAIN_COMPILE_FACTOR * compile_estimate(self.budget.device_type, leaf_modules(self.module))
            self.report["compile_estimate_s"] = estimate
            if estimate > TRIAL_MAX_SHARE * remaining:
                self._settle(None, f"not compiled: its estimated {estimate:.3g} s would be more than "
                                   f"{TRIAL_MAX_SHARE:.0%} of the {remaining:.3g} s left at {median:.3g} s per step")
                return
            self._stamps = [self._stamps[-1]]  # the next interval holds the compilation
            self.report["state"] = "timing compiled"
            if not self._compile():
                return
            return
        # timing compiled: the first interval held the compilation
        intervals = [b - a for a, b in zip(self._stamps, self._stamps[1:])]
        compiled = median
        assert self._eager_s is not None
        self.report.update(compiled_step_s=compiled, compile_s=max(intervals[0] - compiled, 0.0))
        speedup = self._eager_s / max(compiled, 1e-12)
        keep = speedup >= MIN_SPEEDUP
        self._settle(keep, f"{'compiled' if keep else 'not compiled'}: {speedup:.2f}x the eager step "
                           f"({compiled:.3g} s vs {self._eager_s:.3g} s) after {self.report['compile_s']:.3g} s "
                           f"of compilation" + ("" if keep else f" (kept only from {MIN_SPEEDUP:g}x)"))

    def _compile(self) -> bool:
        try:
            self._compiled = self._compile_fn(self.module)
        except Exception as exc:  # noqa: BLE001 - torch.compile unavailable here: report it, go on eagerly
            self._settle(False, f"torch.compile failed ({exception_line(exc)}); running eagerly")
            return False
        return True

    def _settle(self, compiled: bool | None, reason: str) -> None:
        """End the trial: ``compiled`` True/False is a measured verdict (kept for this module);
        None means the trial did not run (too short a run)."""
        self.report.update(state="compiled" if compiled else "eager", reason=reason)
        if not compiled:
            self._compiled = None
        if compiled is not None:
            self.budget.verdicts[id(self.module)] = compiled
        self._stamps = []
        self.budget.reports.append(dict(self.report))
        if self.budget.log is not None and compiled is not None:  # a run too short to try says so in its result only
            self.budget.log(f"compile='auto' (trial): {reason}")
