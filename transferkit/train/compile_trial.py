"""``compile="auto"`` for a trainable trunk: a trial on the run's own steps.

``torch.compile`` trains some trunks faster and others slower, after about a minute of
compilation (docs/benchmarks.md, "torch.compile for fine-tuning": on a 2-core CPU Lite0
1.27x and ResNet-18 0.95x the eager step; on an H200 ResNet-50 1.21x, Lite0 0.98x and
ResNet-18 0.87x). No rule per device type serves every trunk, so ``auto`` measures, on the
run itself:

1. it times the run's first eager steps (after one warm-up step);
2. where the rest of the run is long enough that a compilation that does not pay costs at
   most ``TRIAL_SHARE`` of it (`compile_estimate` with ``engine="train"`` against the eager
   steps left), it compiles the trained module and times the compiled steps (the first one
   holds the compilation; one more warms up);
3. it keeps the compiled module for the rest of the run when its step is at least
   ``MIN_SPEEDUP`` times faster, else it goes back to eager (the compiled module shares the
   eager one's parameters: nothing is copied or lost either way). A change of the trainable
   set afterwards (gradual unfreezing) compiles again only where the steps left save more
   than the trial's compilation took; else the rest of the run is eager.

A step is timed from one call of the trained module to the next (forward, backward,
optimizer step and the next batch's loading; ``loss.item()`` in each step waits for the
device), an epoch's last step up to the end of the epoch's pass (`_TrialRunner.end_epoch`,
called by the training loop). A short run never compiles and pays only a clock read per
step. The first step of each compiled model, and of each new input shape, keeps the
buffers and the random number generators' states: where its forward or backward fails (to
compile or to run), the trial warns, puts them back and runs the step again eager, and the
rest of the run is eager (`_TrialRunner`, with the training loop's ``recover``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from transferkit._text import exception_line
from transferkit.errors import ConfigError, warn
from transferkit.train.speed import torch_compile

TRIAL_SHARE = 0.05  # a compilation that does not pay may cost at most this share of the eager run left
MIN_SPEEDUP = 1.05  # the compiled step must be this much faster to be kept
WARMUP_STEPS = 1  # steps run but not timed, in each mode (the first compiled one holds the compilation)
TIMED_STEPS = 3  # steps timed in each mode (their median)


def decide_compile(requested: bool | str, *, device_type: str, epochs: int, world_size: int = 1,
                   unavailable: str | None = None, shapes: str | None = None) -> tuple[bool | str, str]:
    """Whether a trainable model is compiled (``compile=True/False/"auto"``), and why (pure):
    ``True``, ``False``, or ``"trial"`` (``auto``: the run's steps decide, see `CompileTrial`).
    ``epochs``: the epochs that train the trunk (after a frozen phase); ``unavailable``: why ``torch.compile``
    cannot run here (`transferkit.train.engines.engine_availability`), None when it can; ``shapes``:
    why the training batches change shape (None: they keep one), each new shape compiled again.

    Example:
        >>> decide_compile(False, device_type="cpu", epochs=10)
        (False, 'compile=False')
        >>> decide_compile("auto", device_type="cpu", epochs=10)[0]
        'trial'
        >>> decide_compile(True, device_type="cpu", epochs=10, unavailable="no C++ compiler was found")
        Traceback (most recent call last):
        ...
        transferkit.errors.ConfigError: compile=True cannot run here: no C++ compiler was found. Use compile='auto' \
(not tried where it cannot run) or compile=False.
    """
    if requested is True and unavailable is not None and epochs > 0:  # it would fail in the first step
        raise ConfigError(f"compile=True cannot run here: {unavailable}. Use compile='auto' (not tried where it "
                          "cannot run) or compile=False.")
    if requested is True:
        return True, "asked" if shapes is None else (f"asked; {shapes}: batches of changing shapes are compiled "
                                                     "again (dynamic shapes), which not every model compiles")
    if requested is False:
        return False, "compile=False"
    if requested != "auto":
        raise ConfigError(f"compile={requested!r}; use True, False or 'auto'.")
    if epochs <= 0:
        return False, "compile='auto': the trunk never trains"
    if unavailable is not None:
        return False, f"compile='auto': not tried, {unavailable}"
    if world_size > 1:
        return False, ("compile='auto': not tried in a job of several processes (each would time its own steps); "
                       "compile=True compiles")
    if shapes is not None:
        return False, f"compile='auto': not tried, {shapes}: batches of changing shapes would be compiled again"
    return "trial", (f"compile='auto': tried where the run is long enough that a compilation that does not pay "
                     f"costs at most {TRIAL_SHARE:.0%} of it; kept where the compiled step is {MIN_SPEEDUP:g}x faster "
                     "(timed on the run's first steps)")


@dataclass
class CompileTrial:
    """The trial of one run (see the module docstring). ``steps_left``: the optimizer steps
    the run has left when it starts; ``estimate_s``: the estimated compilation seconds;
    ``compile_fn``: None for ``torch.compile`` (another callable in tests); ``log``: where the verdict
    is said (None: nowhere). `wrap` gives the module that runs each epoch; ``record`` holds
    what was measured and decided."""

    steps_left: int
    estimate_s: float
    compile_fn: Callable[[nn.Module], Any] | None = None
    log: Callable[[str], None] | None = None
    clock: Callable[[], float] = time.perf_counter
    record: dict[str, Any] = field(default_factory=dict)
    _eager: list[float] = field(default_factory=list, init=False, repr=False)  # step seconds, warm-up first
    _compiled: list[float] = field(default_factory=list, init=False, repr=False)  # the compilation's step first
    _calls: int = field(default=0, init=False, repr=False)
    _tried: bool = field(default=False, init=False, repr=False)  # a compiled step has run

    def __post_init__(self) -> None:
        self.record["steps_left"] = self.steps_left  # the trunk-training steps the run had left at the start

    @property
    def verdict(self) -> str | None:
        """``"compiled"`` or ``"eager"`` once decided, else None."""
        return self.record.get("kept")

    @property
    def runs(self) -> str | None:
        """How the steps run now: the verdict, or ``"eager"`` after the run stopped compiling."""
        return "eager" if "eager_from_step" in self.record else self.verdict

    def wrap(self, module: nn.Module, *, trunk_trains: bool = True) -> Any:
        """What runs ``module``'s training steps: the trial while it lasts; afterwards the
        compiled module when it won (compiled again after the trainable set changed where the
        steps left pay for it, see `_compile_again`), else ``module``. ``trunk_trains=False``
        (a frozen phase of the run): ``module`` as it is, untimed: the trial times steps that
        train the trunk. A new trainable set while the trial lasts restarts its eager timing;
        once it has compiled, the trial ends eager (the compiled steps it timed ran another
        model)."""
        if not trunk_trains or self.runs == "eager":
            return module
        if self.runs == "compiled":
            return self._compile_again(module)
        if self._tried:
            self._say("eager", "not kept: the trainable blocks changed before the compiled steps were timed")
            return module
        self._eager.clear()
        return _TrialRunner(self, module)

    def _compile_again(self, module: nn.Module) -> Any:
        """After the trial kept the compiled module, a new trainable set (gradual unfreezing)
        is compiled again where the steps left save more than the trial's compilation took:
        the runner of ``module`` compiled, else ``module``."""
        r, left = self.record, max(self.steps_left - self._calls, 0)
        saving = left * (r["eager_step_s"] - r["compiled_step_s"])
        if saving < r["compile_s"]:
            self._stop(f"not compiled again after the trainable blocks changed: the {left} steps left would save "
                       f"about {saving:.0f} s, less than the {r['compile_s']:.0f} s the compilation took")
            return module
        r["compilations"] += 1
        return _TrialRunner(self, module)

    def compile(self, module: nn.Module) -> Any:
        """``compile_fn(module)``, by default ``torch.compile`` (sharing ``module``'s parameters)."""
        return (self.compile_fn or torch_compile)(module)

    def finish(self) -> dict[str, Any]:
        """The record, closed for a run that ended before the trial decided (too few steps)."""
        if self.verdict is None:
            self.record.update(kept="undecided", reason=f"compile='auto': the run ended after {self._calls} steps, "
                                                        "before the trial had timed both")
        return self.record

    def _decide_to_try(self) -> bool:
        eager = statistics.median(self._eager[WARMUP_STEPS:])
        left = max(self.steps_left - self._calls, 0)
        budget = TRIAL_SHARE * left * eager
        self.record.update(eager_step_s=eager, estimate_s=self.estimate_s)
        if self.estimate_s <= budget:
            return True
        self._say("eager", f"not tried: an estimated {self.estimate_s:.0f} s to compile > {TRIAL_SHARE:.0%} of the "
                           f"{left} eager steps left at {eager:.3g} s")
        return False

    def _decide(self) -> None:
        eager, compiled = self.record["eager_step_s"], statistics.median(self._compiled[1 + WARMUP_STEPS:])
        first = self._compiled[0]
        speedup = eager / max(compiled, 1e-12)
        self.record.update(compiled_step_s=compiled, compile_s=max(first - compiled, 0.0), speedup=speedup,
                           compilations=1)
        kept = speedup >= MIN_SPEEDUP
        self._say("compiled" if kept else "eager",
                  f"{'kept' if kept else 'not kept'}: the compiled step {compiled:.3g} s against eager {eager:.3g} s "
                  f"({speedup:.2f}x{'' if kept else f' < {MIN_SPEEDUP:g}x'}) after {first:.0f} s for the first "
                  "compiled step (the compilation)")

    def _fail(self, exc: BaseException, when: str = "") -> None:
        inner = getattr(exc, "inner_exception", None) or exc.__cause__  # a backend's own error, under dynamo's
        what = exception_line(exc)
        if inner is not None and exception_line(inner) not in what:
            what += f" {exception_line(inner)}"
        self.record["error"] = what
        warn(f"compile='auto': torch.compile failed on this model{when} ({what}); training goes on eager. "
             "Pass compile=False to skip the trial.")
        if self.verdict == "compiled":
            self._stop(f"torch.compile failed{when} ({what})")
        else:
            self._say("eager", f"torch.compile failed{when} ({what})")

    def _stop(self, why: str) -> None:
        """Eager for the rest of the run, after the trial had kept the compiled module: the
        record keeps what the trial measured and says from which step and why."""
        self.record.update(eager_from_step=self._calls, then=f"compile='auto': {why}")
        if self.log is not None:
            self.log(f"compile:  eager from step {self._calls} ({self.record['then']})")

    def _say(self, kept: str, why: str) -> None:
        self.record.update(kept=kept, reason=f"compile='auto': {why}")
        if self.log is not None:
            self.log(f"compile:  {kept} ({self.record['reason']})")


class _TrialRunner:
    """The trained module during the trial: eager steps, then compiled ones, then the winner.
    The first compiled step of each input signature (shapes and dtypes: a new one is compiled
    again) keeps the buffers and the random number generators' states as they were, so that
    when its forward or its backward fails (`recover`; AOTAutograd compiles the backward at
    the first ``backward()``, outside this module) the step runs again eager from the same
    state."""

    def __init__(self, trial: CompileTrial, module: nn.Module) -> None:
        self.trial, self.module, self.compiled, self.last = trial, module, None, None
        self.mode = trial.runs or "eager"
        self.seen: set[Any] = set()  # the input signatures the compiled module has run
        self.saved: _State | None = None  # before a new signature's first step

    def end_epoch(self) -> None:
        """The epoch's training steps are over: its last step is timed up to now, and the
        validation and checkpoint before the next epoch's first step are not a step."""
        self._lap(self.trial.clock())
        self.last = None

    def _lap(self, now: float) -> None:
        """The time since the last call, as a step of the current mode while the trial times."""
        t = self.trial
        if self.last is not None and t.verdict is None:
            (t._eager if self.mode == "eager" else t._compiled).append(now - self.last)

    def __call__(self, x: Any) -> Any:
        t = self.trial
        now = t.clock()
        self._lap(now)
        self.last = now
        if t.verdict is None:
            if self.mode == "eager" and len(t._eager) >= WARMUP_STEPS + TIMED_STEPS:
                if t._decide_to_try():
                    self.mode, t._tried = "compiled", True
            elif self.mode == "compiled" and len(t._compiled) >= 1 + WARMUP_STEPS + TIMED_STEPS:
                t._decide()
        if t.runs is not None:
            self.mode = t.runs
            if self.mode == "eager":
                self.compiled = None  # its graphs are not needed any more
        t._calls += 1
        self.saved = None
        if self.mode == "eager":
            return self.module(x)
        sig = _signature(x)
        if sig not in self.seen:
            self.seen.add(sig)
            self.saved = _State(self.module)
        try:
            if self.compiled is None:
                self.compiled = t.compile(self.module)
            return self.compiled(x)
        except Exception as exc:  # noqa: BLE001 - compile="auto"'s own failure: said, and eager goes on
            self._back_to_eager(exc)
            return self.module(x)

    def recover(self, exc: BaseException) -> bool:
        """After the step's backward raised ``exc`` (outside this module): True where that
        was the first compiled step of its input signature (the state is put back and the rest
        of the run is eager: the caller runs the step again), False for any other step (the
        caller raises ``exc``)."""
        if self.mode != "compiled" or self.saved is None:
            return False
        self._back_to_eager(exc)
        self.trial._calls -= 1  # the step runs again: one step, not two
        return True

    def _back_to_eager(self, exc: BaseException) -> None:
        if self.saved is not None:
            self.saved.restore(self.module)
        t = self.trial
        when = (" on a new input shape" if len(self.seen) > 1 else
                " after a change of the trainable blocks" if t.verdict == "compiled" else "")
        t._fail(exc, when)
        self.mode, self.compiled, self.saved = "eager", None, None


class _State:
    """What a training step's forward changes besides the gradients: ``module``'s buffers
    (BatchNorm statistics) and the random number generators (dropout), kept to be put back."""

    def __init__(self, module: Any) -> None:
        named = module.named_buffers() if isinstance(module, nn.Module) else ()
        self.buffers = {name: b.detach().clone() for name, b in named}
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self, module: Any) -> None:
        if self.buffers:
            with torch.no_grad():
                for name, b in module.named_buffers():
                    b.copy_(self.buffers[name])
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


def _signature(x: Any) -> Any:
    """What makes ``torch.compile`` compile again for a new input: the shapes and dtypes of
    its tensors, in a nesting of lists, tuples and dicts."""
    if isinstance(x, torch.Tensor):
        return tuple(x.shape), x.dtype, x.device
    if isinstance(x, (list, tuple)):
        return type(x).__name__, tuple(_signature(v) for v in x)
    if isinstance(x, dict):
        return tuple((k, _signature(v)) for k, v in x.items())
    return type(x).__name__
