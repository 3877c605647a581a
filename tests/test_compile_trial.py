"""compile="auto" on a trainable trunk: the trial on the run's own steps (a simulated clock and
compiler for the rules; one run through finetune with the compilation stood in for)."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch

import transferkit as tk
import transferkit.train.compile_trial as ct
from transferkit.errors import ConfigError
from transferkit.results import result_record, result_summary
from transferkit.train.loop import Loop, train_one_epoch


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _trial(clock, *, eager_s=1.0, compiled_s=0.5, compile_s=100.0, steps_left=10_000, estimate_s=60.0, fail=False):
    """A trial whose eager step takes ``eager_s`` on ``clock`` and whose compiled step takes
    ``compiled_s`` (its first ``compile_s`` more); returns it and the log of what ran."""
    ran: list[str] = []

    def eager(x):
        ran.append("eager")
        clock.now += eager_s
        return x

    def compile_fn(module):
        ran.append("compile")
        first = [True]

        def compiled(x):
            if fail:
                raise RuntimeError("inductor: no kernel for this op")
            ran.append("compiled")
            clock.now += compiled_s + (compile_s if first[0] else 0.0)
            first[0] = False
            return x
        return compiled

    said: list[str] = []
    trial = ct.CompileTrial(steps_left=steps_left, estimate_s=estimate_s, compile_fn=compile_fn, log=said.append,
                            clock=clock)
    return trial, eager, ran, said


def _steps(runner, n):
    for _ in range(n):
        runner(0)


def test_a_compiled_step_that_is_faster_is_kept_for_the_rest_of_the_run():
    clock = _Clock()
    trial, eager, ran, said = _trial(clock)
    runner = trial.wrap(eager)
    _steps(runner, 20)
    n_eager = ct.WARMUP_STEPS + ct.TIMED_STEPS
    assert ran[:n_eager] == ["eager"] * n_eager and ran[n_eager] == "compile"
    assert ran[n_eager + 1:] == ["compiled"] * (20 - n_eager) and ran.count("compile") == 1
    r = trial.record
    assert r["kept"] == "compiled" and r["eager_step_s"] == 1.0 and r["compiled_step_s"] == 0.5
    assert r["speedup"] == 2.0 and r["compile_s"] == pytest.approx(100.0)
    assert said == [f"compile:  compiled ({r['reason']})"] and "2.00x" in r["reason"]
    # a new trainable set (gradual unfreezing) is compiled again, without a new trial: the 9980 steps left save
    # about 4990 s, more than the 100 s the compilation took
    again = trial.wrap(eager)
    _steps(again, 2)
    assert ran[-3:] == ["compile", "compiled", "compiled"] and r["compilations"] == 2 and len(said) == 1


def test_a_new_trainable_set_is_not_compiled_again_where_the_steps_left_do_not_pay_for_it():
    clock = _Clock()
    trial, eager, ran, said = _trial(clock, steps_left=300, estimate_s=1.0)  # 0.5 s saved a step: 200 for 100 s
    runner = trial.wrap(eager)
    _steps(runner, 100)
    assert trial.verdict == "compiled" and ran.count("compile") == 1
    kept = trial.wrap(eager)  # 200 steps left: 100 s saved, the compilation took 100 s
    assert kept is not eager
    _steps(kept, 20)
    assert ran.count("compile") == 2 and trial.record["compilations"] == 2
    last = trial.wrap(eager)  # 180 steps left: 90 s saved < 100 s
    assert last is eager and trial.runs == "eager" and trial.wrap(eager) is eager
    r = trial.record
    assert r["kept"] == "compiled" and r["eager_from_step"] == 120
    assert "the 180 steps left would save about 90 s, less than the 100 s the compilation took" in r["then"]
    assert said[-1] == f"compile:  eager from step 120 ({r['then']})"
    _steps(last, 5)
    assert ran[-5:] == ["eager"] * 5 and ran.count("compile") == 2


def test_a_compiled_step_that_is_not_faster_goes_back_to_eager():
    clock = _Clock()
    trial, eager, ran, said = _trial(clock, compiled_s=0.99)  # 1.01x: within the margin
    runner = trial.wrap(eager)
    _steps(runner, 20)
    trial_steps = ct.WARMUP_STEPS + ct.TIMED_STEPS + 1 + ct.WARMUP_STEPS + ct.TIMED_STEPS
    assert ran.count("compiled") == 1 + ct.WARMUP_STEPS + ct.TIMED_STEPS and ran.count("compile") == 1
    assert ran[-(20 - trial_steps):] == ["eager"] * (20 - trial_steps)
    assert trial.record["kept"] == "eager" and "not kept" in trial.record["reason"] and "< 1.05x" in said[0]
    assert trial.wrap(eager) is eager  # later trainable sets run eager, untried


def test_a_run_too_short_for_the_compilation_never_compiles():
    clock = _Clock()
    # 60 s of compilation against 5 % of about 100 eager steps of 1 s: not tried
    trial, eager, ran, said = _trial(clock, steps_left=100, estimate_s=60.0)
    _steps(trial.wrap(eager), 30)
    assert "compile" not in ran and trial.record["kept"] == "eager"
    assert "not tried: an estimated 60 s to compile > 5% of the 96 eager steps left at 1 s" in trial.record["reason"]
    # the same run, long enough: tried
    trial, eager, ran, _ = _trial(_Clock(), steps_left=1300, estimate_s=60.0)
    _steps(trial.wrap(eager), 10)
    assert "compile" in ran


def test_a_run_that_ends_before_the_trial_decides_says_so():
    trial, eager, ran, _ = _trial(_Clock())
    _steps(trial.wrap(eager), 3)
    assert trial.finish()["kept"] == "undecided" and "ended after 3 steps" in trial.record["reason"]
    assert ran == ["eager"] * 3


def test_steps_across_an_epoch_boundary_are_not_timed():
    clock = _Clock()
    trial, eager, ran, _ = _trial(clock)
    runner = trial.wrap(eager)
    _steps(runner, 2)
    for _ in range(2):  # two epochs of one step, each followed by validation and a checkpoint
        runner.end_epoch()
        clock.now += 1000.0
        _steps(runner, 1)
    _steps(runner, 20)
    assert trial.record["eager_step_s"] == 1.0 and trial.record["kept"] == "compiled"


def test_the_loop_times_each_epoch_up_to_its_last_step_and_not_across_validation():
    # 5 steps an epoch: the trial compiles on an epoch's last step, whose time (the compilation) the loop ends
    clock = _Clock()
    model = torch.nn.Linear(4, 2)
    first = [True]

    def eager(x):
        clock.now += 1.0
        return model(x)

    def compiled(x):
        clock.now += 0.5 + (100.0 if first[0] else 0.0)
        first[0] = False
        return model(x)
    trial = ct.CompileTrial(steps_left=10**6, estimate_s=0.0, clock=clock, compile_fn=lambda m: compiled)
    runner = trial.wrap(eager)
    _train(model, runner, n=40, epochs=4, between=lambda: setattr(clock, "now", clock.now + 1000.0))
    r = trial.record
    assert r["eager_step_s"] == 1.0 and r["compiled_step_s"] == 0.5 and r["compile_s"] == pytest.approx(100.0)
    assert r["kept"] == "compiled"


def test_frozen_steps_are_not_timed_and_a_new_trainable_set_restarts_the_eager_timing():
    clock = _Clock()
    trial, eager, ran, _ = _trial(clock)
    assert trial.wrap(eager, trunk_trains=False) is eager  # a frozen phase: untimed
    first = trial.wrap(eager)
    _steps(first, 3)
    clock.now += 50.0
    second = trial.wrap(lambda x: eager(x))  # one more block trains: its steps are timed afresh
    _steps(second, ct.WARMUP_STEPS + ct.TIMED_STEPS)
    assert "compile" not in ran  # the first set's steps did not count
    _steps(second, 1)
    assert ran[-1] == "compiled" and trial.record["eager_step_s"] == 1.0
    # the set changes again after the compilation, before the compiled steps were timed: eager, said
    assert trial.wrap(eager) is eager
    assert trial.record["kept"] == "eager" and "trainable blocks changed" in trial.record["reason"]


class _BackwardFails(torch.autograd.Function):
    """Stands for compiled code whose backward fails to run (an inductor bug, not a compile error)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("cannot access local variable 'buf5'")


def _train(model, runner, n=64, epochs=1, between=None):
    """``epochs`` of the training loop's steps over ``n`` samples in batches of 8 (a short last one
    where ``n`` is not a multiple of 8), ``runner`` running ``model``; ``between()`` after each epoch."""
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g))
    loop = Loop(optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=torch.nn.functional.cross_entropy,
                set_mode=lambda e: None, verbose=False)
    for _ in range(epochs):
        train_one_epoch(runner, torch.utils.data.DataLoader(data, batch_size=8), loop)
        if between is not None:
            between()


def test_a_compiled_step_whose_backward_fails_to_run_goes_back_to_eager_with_nothing_changed():
    # the training loop's backward fails; the trial puts the buffers back and the step runs again eager
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5),
                                torch.nn.Linear(4, 2))
    reference = copy.deepcopy(model)
    trial = ct.CompileTrial(steps_left=10**6, estimate_s=0.0, compile_fn=lambda m: lambda x: _BackwardFails.apply(m(x)))
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match=r"torch.compile failed on this model \(RuntimeError: cannot access local"):
        _train(model, trial.wrap(model))
    torch.manual_seed(1)
    _train(reference, reference)
    assert trial.record["kept"] == "eager"
    for k, v in reference.state_dict().items():  # parameters and BatchNorm statistics
        assert torch.equal(v, model.state_dict()[k]), k


def test_a_failure_after_a_change_of_the_trainable_blocks_goes_back_to_eager():
    clock = _Clock()
    trial, eager, ran, _ = _trial(clock)
    _steps(trial.wrap(eager), 12)
    assert trial.verdict == "compiled"
    trial.compile_fn = lambda m: lambda x: _BackwardFails.apply(m(x))  # the next one fails on its first step
    model = torch.nn.Linear(4, 2)
    with pytest.warns(UserWarning, match=r"failed on this model after a change of the trainable blocks"):
        _train(model, trial.wrap(model))
    assert trial.runs == "eager" and trial.wrap(model) is model
    assert trial.record["kept"] == "compiled" and "torch.compile failed after a change" in trial.record["then"]


def test_a_backward_that_fails_to_compile_fails_inside_the_trial():
    # AOTAutograd compiles the backward at the first backward(), outside the trained module: the probe calls it
    from torch._dynamo.backends.common import aot_autograd

    def broken(gm, example_inputs):
        raise RuntimeError("no kernel for the backward")
    backend = aot_autograd(fw_compiler=lambda gm, ex: gm, bw_compiler=broken)
    trial = ct.CompileTrial(steps_left=10**6, estimate_s=0.0, compile_fn=lambda m: torch.compile(m, backend=backend))
    model = torch.nn.Linear(4, 2)
    with pytest.warns(UserWarning, match=r"torch.compile failed on this model .*no kernel for the backward"):
        _train(model, trial.wrap(model), n=80)
    assert trial.record["kept"] == "eager"


def test_a_new_input_shape_whose_compiled_backward_fails_goes_back_to_eager_with_nothing_changed():
    # after the trial kept the compiled model, a short last batch is compiled again; its backward fails in the loop
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5),
                                torch.nn.Linear(4, 2))
    reference = copy.deepcopy(model)
    clock, forward = _Clock(), model.forward

    def timed(x):  # the eager step takes 1 s on the simulated clock
        clock.now += 1.0
        return forward(x)

    def compiled(x):  # the compiled one 0.5 s (kept); on a new batch size its backward fails
        clock.now += 0.5
        return forward(x) if x.shape[0] == 8 else _BackwardFails.apply(forward(x))
    model.forward = timed
    trial = ct.CompileTrial(steps_left=10**6, estimate_s=0.0, clock=clock, compile_fn=lambda m: compiled)
    runner = trial.wrap(model)
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match=r"failed on this model on a new input shape \(RuntimeError: cannot access"):
        _train(model, runner, n=8 * 12 + 3)  # 12 full batches, then 3 samples
    del model.forward
    r = trial.record
    assert r["kept"] == "compiled" and r["eager_from_step"] == 13 and "on a new input shape" in r["then"]
    assert trial.runs == "eager" and runner.compiled is None
    torch.manual_seed(1)
    _train(reference, reference, n=8 * 12 + 3)
    for k, v in reference.state_dict().items():  # parameters and BatchNorm statistics
        assert torch.equal(v, model.state_dict()[k]), k
    # a failure on a shape that has run is not the trial's: the loop raises it
    assert runner.recover(RuntimeError("other")) is False


def test_a_compilation_that_fails_warns_and_training_goes_on_eager():
    clock = _Clock()
    trial, eager, ran, said = _trial(clock, fail=True)
    runner = trial.wrap(eager)
    with pytest.warns(UserWarning, match=r"torch.compile failed on this model \(RuntimeError: inductor: no kernel "
                                         r"for this op\); training goes on eager"):
        _steps(runner, 10)
    assert ran.count("eager") == 10 and trial.record["kept"] == "eager" and "error" in trial.record


def test_decide_compile_tries_only_where_a_trial_can_run():
    assert ct.decide_compile(True, device_type="cpu", epochs=1) == (True, "asked")
    assert ct.decide_compile(False, device_type="cuda", epochs=90) == (False, "compile=False")
    assert ct.decide_compile("auto", device_type="cuda", epochs=90)[0] == "trial"
    assert ct.decide_compile("auto", device_type="cpu", epochs=0)[0] is False  # features are cached
    off, why = ct.decide_compile("auto", device_type="cpu", epochs=5, unavailable="no C++ compiler")
    assert off is False and "no C++ compiler" in why
    off, why = ct.decide_compile("auto", device_type="cuda", epochs=5, world_size=2)
    assert off is False and "several processes" in why
    with pytest.raises(ConfigError, match="compile='yes'"):
        ct.decide_compile("yes", device_type="cpu", epochs=1)
    # batches that change shape (audio without clip_seconds) compile again for each: not tried; asked, said
    off, why = ct.decide_compile("auto", device_type="cpu", epochs=5, shapes="clips of different lengths")
    assert off is False and "not tried, clips of different lengths" in why
    on, why = ct.decide_compile(True, device_type="cpu", epochs=5, shapes="clips of different lengths")
    assert on is True and why.startswith("asked; clips of different lengths") and "dynamic shapes" in why


def test_finetune_runs_the_trial_and_reports_it(image_folder, monkeypatch, capsys):
    # the compilation stood in for by a module that runs the model: the trial's plumbing, not inductor
    compiled = []

    def fake_compile(module):
        compiled.append((module, any(p.requires_grad for p in module.trunk.parameters())))
        return lambda x: module(x)
    monkeypatch.setattr(ct, "TRIAL_SHARE", 1e9)  # any run is long enough to try
    monkeypatch.setattr(torch, "compile", fake_compile)
    common = dict(weights=None, data=image_folder, image_size=16, device="cpu", num_workers=0, seed=0, batch_size=2,
                  epochs=3, lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = tk.finetune("tk:small_cnn", verbose=True, policy="full", **common)
    out = capsys.readouterr().err  # with the epochs and the plan
    assert "speed:    compile trial (compile='auto': tried where the run is long enough" in r.decisions.summary()
    assert r.compile_trial is not None and r.compile_trial["kept"] in ("compiled", "eager")
    assert compiled and compiled[0] == (r.model, True)
    assert f"compile:  {r.compile_trial['kept']} (compile='auto':" in out
    assert result_record(r)["compile_trial"] == r.compile_trial and "speedup" in r.compile_trial
    assert f"  compile:    {r.compile_trial['kept']}, " in result_summary(r)
    stopped = dataclasses.replace(r, compile_trial={**r.compile_trial, "kept": "compiled", "eager_from_step": 7})
    assert result_summary(stopped).endswith("s of compilation; eager from step 7")
    # compile=False: no trial, and the same training
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = tk.finetune("tk:small_cnn", verbose=False, compile=False, policy="full", **common)
        # a frozen first epoch run without the cache: the trial counts and times the two epochs that train the trunk
        late = tk.finetune("tk:small_cnn", verbose=False, policy="fine_tune:frozen=1", cache_features=False, **common)
    assert plain.compile_trial is None
    for k, v in plain.model.state_dict().items():  # the stand-in computes what eager does
        assert torch.equal(v, r.model.state_dict()[k]), k
    per_epoch = r.compile_trial["steps_left"] // 3
    assert per_epoch >= 2 * (ct.WARMUP_STEPS + ct.TIMED_STEPS) and late.compile_trial["steps_left"] == 2 * per_epoch
    assert len(compiled) == 2 and compiled[1][1]  # compiled when the trunk trained, not in the frozen epoch


@pytest.mark.parametrize("clip_seconds", [None, 0.5])
def test_audio_of_different_lengths_is_not_tried_and_clip_seconds_gives_one_shape(tmp_path, clip_seconds):
    from test_audio_data import make_audio_folder

    root = make_audio_folder(tmp_path / "clips", per_class=4)
    options = {"sample_rate": 8000, "n_mels": 16, "clip_seconds": clip_seconds}
    summary = tk.plan(backbone="spec:tk:small_cnn", weights=None, data=str(root), backbone_options=options,
                      policy="full", epochs=3, device="cpu").summary()
    if clip_seconds is None:
        assert "eager, not compiled (compile='auto': not tried, audio clips of different lengths (no clip_seconds" \
            in summary
        assert "input 8000 Hz audio, augment" in summary
    else:
        assert "compile trial (compile='auto': tried where" in summary
        assert "input 8000 Hz audio in clips of 0.5 s (longer ones cropped, shorter padded), augment" in summary


def test_compile_true_compiles_the_model_that_trains_end_to_end_not_the_head_on_cached_features(image_folder,
                                                                                              monkeypatch):
    compiled = []

    def fake_compile(module):
        compiled.append(module)
        return module
    monkeypatch.setattr(torch, "compile", fake_compile)
    common = dict(weights=None, data=image_folder, image_size=16, device="cpu", num_workers=0, seed=0, batch_size=4,
                  epochs=2, verbose=False, compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        staged = tk.finetune("tk:small_cnn", policy="fine_tune:frozen=1", **common)
    assert staged.decisions.cached_epochs == 1 and compiled == [staged.model]
    assert staged.decisions.speed["compile"] is True
    # the plan and the record said "compile (asked)" where nothing is compiled: a note says it is not used
    for policy in ("feature_extraction", "fine_tune:frozen=2"):
        compiled.clear()
        with pytest.warns(UserWarning, match="compile=True is not used: every epoch trains a head on cached"):
            frozen = tk.finetune("tk:small_cnn", policy=policy, **common)
        assert frozen.decisions.cache and compiled == [] and frozen.decisions.speed["compile"] is False
        assert "compile (asked)" not in frozen.decisions.summary()
    # a frozen trunk that runs in every epoch (no cache) is compiled, as asked
    compiled.clear()
    uncached = tk.finetune("tk:small_cnn", policy="feature_extraction", cache_features=False, **common)
    assert uncached.decisions.speed["compile"] is True and compiled == [uncached.model]


def test_a_failure_of_the_loss_on_a_new_shape_is_not_taken_for_a_compile_failure():
    # the first compiled step of the short last batch: its labels are out of range; the loss raises, not compile
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    clock = _Clock()

    def compiled(x):
        clock.now += 0.5
        return model.forward(x)

    def eager(x):
        clock.now += 1.0
        return model.forward(x)
    trial = ct.CompileTrial(steps_left=10**6, estimate_s=0.0, clock=clock, compile_fn=lambda m: compiled)
    runner = trial.wrap(eager)
    x, y = torch.randn(8 * 12 + 3, 4), torch.zeros(8 * 12 + 3, dtype=torch.long)
    y[-1] = 5  # no such class
    loop = Loop(optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=torch.nn.functional.cross_entropy,
                set_mode=lambda e: None, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "torch.compile failed" warning
        with pytest.raises(IndexError, match="out of bounds"):
            train_one_epoch(runner, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8),
                            loop)
    assert trial.runs == "compiled" and "eager_from_step" not in trial.record
