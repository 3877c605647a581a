"""compile="auto" for a trainable trunk: compiled by trial in the run, kept when faster."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import transferkit as tk
from tests.conftest import make_image_folder
from transferkit.train import compile_trial as ct
from transferkit.train.compile_trial import CompileBudget, CompileTrial


class _Clock:
    """A clock the test advances: each step of the eager module takes ``eager`` s, of the
    compiled one ``compiled`` s, and the compilation ``compile_s`` s."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _trial(total_steps: int, *, eager: float, compiled: float, compile_s: float = 10.0,
           fails: bool = False) -> tuple[CompileTrial, _Clock, nn.Module]:
    clock = _Clock()
    module = nn.Linear(4, 2)
    state = {"first": True}

    def fake_compile(m: nn.Module):
        if fails:
            raise RuntimeError("no C++ compiler")

        def run(x):
            if state["first"]:
                clock.now += compile_s
                state["first"] = False
            clock.now += compiled
            return m.inner(x)  # the compiled module: without the eager step's time
        return run

    class Timed(nn.Module):  # the eager module, advancing the clock by a step
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, x):
            clock.now += eager
            return self.inner(x)

    trial = CompileTrial(Timed(), CompileBudget(total_steps, device_type="cpu"), compile_fn=fake_compile,
                         clock=clock)
    return trial, clock, module


def _run(trial: CompileTrial, steps: int) -> None:
    x = torch.randn(3, 4)
    for _ in range(steps):
        trial(x)


@pytest.fixture(autouse=True)
def _fixed_estimate(monkeypatch):
    monkeypatch.setattr(ct, "compile_estimate", lambda device_type, n_modules: 20.0)  # 40 s for training


def test_a_long_run_compiles_and_keeps_the_faster_compiled_module():
    trial, clock, _ = _trial(100_000, eager=1.0, compiled=0.5)
    _run(trial, 30)
    r = trial.report
    assert r["state"] == "compiled" and r["eager_step_s"] == 1.0 and r["compiled_step_s"] == 0.5
    assert r["compile_s"] == pytest.approx(10.0) and r["reason"].startswith("compiled: 2.00x the eager step")
    assert trial.budget.verdicts and trial.budget.reports[-1]["state"] == "compiled"


def test_a_compiled_module_that_is_not_faster_is_dropped():
    trial, _, _ = _trial(100_000, eager=1.0, compiled=1.0)
    _run(trial, 30)
    assert trial.report["state"] == "eager" and trial.report["reason"].startswith("not compiled: 1.00x")
    assert trial._compiled is None  # the rest of the run is eager


def test_a_short_run_is_not_compiled_and_says_why():
    trial, _, _ = _trial(200, eager=1.0, compiled=0.1)  # 40 s of compilation > 5 % of 193 s
    _run(trial, 20)
    r = trial.report
    assert r["state"] == "eager" and "compiled_step_s" not in r
    assert r["reason"] == "not compiled: its estimated 40 s would be more than 5% of the 192 s left at 1 s per step"
    assert trial.budget.verdicts == {}  # no measured verdict: a rebuilt module weighs its own remaining steps


def test_a_compilation_that_fails_is_reported_and_the_run_goes_on_eagerly():
    trial, _, _ = _trial(100_000, eager=1.0, compiled=0.5, fails=True)
    _run(trial, 20)
    assert trial.report["state"] == "eager"
    assert trial.report["reason"] == "torch.compile failed (RuntimeError: no C++ compiler); running eagerly"


def test_the_verdict_serves_the_module_rebuilt_in_the_same_run():
    trial, _, module = _trial(100_000, eager=1.0, compiled=0.5)
    _run(trial, 30)
    again = CompileTrial(trial.module, trial.budget, compile_fn=lambda m: m)
    assert again.report == {"state": "compiled", "reason": "as measured earlier in this run on the same module"}


def test_finetune_with_compile_auto_reports_its_trial(tmp_path, monkeypatch):
    # a real run: a tiny model on a CPU, where the trial is decided on the run's own steps
    monkeypatch.setattr(ct, "compile_estimate", lambda device_type, n_modules: 1e6)  # never worth it here
    folder = make_image_folder(tmp_path / "images", per_class=6, size=20)
    r = tk.finetune("tk:small_cnn", weights=None, data=folder, policy="full", epochs=4, batch_size=2, image_size=16,
                    device="cpu", num_workers=0, verbose=False)
    assert r.decisions.speed["compile"] == "trial"
    assert [t["state"] for t in r.compile_trial] == ["eager"]
    assert r.compile_trial[0]["reason"].startswith("not compiled: its estimated 2e+06 s would be more than 5%")


def test_a_real_compilation_by_trial_trains_and_reports_what_it_measured(tmp_path, monkeypatch):
    # torch.compile for real (about 25 s for this tiny model on 2 cores): the trial compiles on
    # the run's own steps, times both, and the run trains on whichever it keeps
    monkeypatch.setattr(ct, "compile_estimate", lambda device_type, n_modules: 1e-3)  # always worth a trial here
    folder = make_image_folder(tmp_path / "images", per_class=10, size=20)
    r = tk.finetune("tk:small_cnn", weights=None, data=folder, policy="full", epochs=3, batch_size=2, image_size=16,
                    device="cpu", num_workers=0, verbose=False, lr=3e-3)
    (t,) = r.compile_trial
    assert t["state"] in ("compiled", "eager") and t["compile_s"] > 0 and t["compiled_step_s"] > 0
    assert t["reason"].startswith(("compiled: ", "not compiled: ")) and "x the eager step" in t["reason"]
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in r.history)
    assert r.history[-1]["train_loss"] < r.history[0]["train_loss"]  # the steps after the switch trained too
