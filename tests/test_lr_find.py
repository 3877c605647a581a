"""The lr finder: a suggestion inside the descent of the loss, before its
minimum, on noisy curves, and a rate that trains."""

import io
import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

import transferkit as tk
from transferkit.errors import ConfigError
from transferkit.train.features import feature_loader
from transferkit.train.lr_find import find_valley, lr_range_test, smooth_losses, suggest_lr, zero_lag_smooth
from transferkit.schedules import LRRange
from transferkit.train.loop import Loop


def _curve(*, x0=-3.0, explode_at=-1.0, noise=0.05, startup=0, seed=0, n=100):
    """A range test's loss per batch on lrs 1e-7..10: flat at 0.7, an S-shaped descent centred
    at 10**x0 down to 0.1, an explosion past 10**explode_at; Gaussian noise, and optionally
    ``startup`` wild first points (the noise the old rule took for a descent)."""
    rng = np.random.default_rng(seed)
    lrs = [10 ** (-7 + 8 * i / (n - 1)) for i in range(n)]
    losses = []
    for i, lr in enumerate(lrs):
        x = math.log10(lr)
        v = 0.1 + 0.6 / (1 + math.exp(4 * (x - x0)))
        if x > explode_at:
            v += 10 ** (2 * (x - explode_at)) - 1
        v += noise * rng.standard_normal()
        if i < startup:
            v += 2 * rng.random() - 1.0 * (i % 2)
        losses.append(v)
    return lrs, losses


@pytest.mark.parametrize("seed", range(5))
def test_flat_then_descent_then_explode(seed):
    lrs, losses = _curve(seed=seed)
    v = find_valley(lrs, losses)
    lo, hi = math.log10(lrs[v.start]), math.log10(lrs[v.end])
    x = math.log10(v.suggestion)
    # the descent found is the true one (90 % .. 10 % of the drop: 10**-3.55 .. 10**-2.45), blurred by noise
    assert -4.3 < lo < -3.3 and -2.7 < hi < -1.9
    assert lo < x < hi and -3.3 < x < -2.5  # inside it, near its steepest part (10**-3)
    assert x < math.log10(v.min_lr) - 0.4  # well before the minimum
    assert v.notes == ()
    assert suggest_lr(lrs, losses) == v.suggestion


@pytest.mark.parametrize("seed", range(3))
def test_noisy_start_is_not_a_descent(seed):
    """The old rule took the steepest slope from the first point: on start-up noise it
    suggested 1e-7-ish rates. Skipping and smoothing keep the suggestion in the descent."""
    lrs, losses = _curve(seed=seed, startup=12, noise=0.12)
    x = math.log10(suggest_lr(lrs, losses))
    assert -3.4 < x < -2.4
    raw_steepest = lrs[int(np.argmin(np.gradient(losses, np.log10(lrs))))]  # the old rule, on this curve
    assert raw_steepest < 1e-5


def test_a_test_that_starts_inside_the_descent_says_so_and_a_flat_start_does_not():
    """The first 10 % of the points are not read (start-up noise); when the loss already falls
    there, the rest is the bottom of the descent and its noise, and the suggestion came from
    that noise with no word."""
    for seed in range(10):
        lrs, losses = _curve(seed=seed, n=200)
        inside = find_valley(lrs[88:], losses[88:])  # from 3.4e-4: the descent (centred at 1e-3) under way
        assert any("already falls at start_lr (3.4e-04)" in n for n in inside.notes), inside.notes
        for kw in (dict(), dict(startup=12, noise=0.12)):
            assert find_valley(*_curve(seed=seed, **kw)).notes == ()


def test_a_curve_that_does_not_fall_or_still_falls_says_so():
    lrs = [10 ** (-7 + 8 * i / 99) for i in range(100)]
    flat = [0.7 + 0.001 * math.sin(i) for i in range(100)]
    v = find_valley(lrs, flat)
    assert "does not fall" in v.notes[0] and lrs[0] <= v.suggestion <= lrs[-1]
    falling = [1.0 - 0.09 * math.log10(lr / 1e-7) for lr in lrs]  # still falling at 10
    v = find_valley(lrs, falling)
    assert "still falls at the largest rate" in v.notes[0] and v.suggestion < lrs[-1] / 10
    flagged = 0
    for seed in range(20):  # noise about a flat level: a suggestion anywhere from 1e-6 to 10, with no word
        v = find_valley(lrs, list(1.0 + 0.05 * np.random.default_rng(seed).standard_normal(100)))
        noted = [n for n in v.notes if "does not fall between 6.4e-07 and 1.0e+01" in n]
        flagged += bool(noted)
        if noted and "beyond its batch-to-batch noise" in noted[0]:  # said, and the suggestion read as always
            assert "the suggestion may be set by noise" in noted[0] and v.start < v.end <= v.minimum
    assert flagged >= 18, flagged  # 99 % of pure noise falls less than the rule's bound (the noise is estimated)
    for seed in range(10):  # a real descent, six times one batch's noise, in a short sweep: not noise
        assert not [n for n in find_valley(*_curve(seed=seed, n=30, noise=0.1)).notes if "does not fall" in n]
    short = find_valley(lrs[:2], [1.0, 9.0])
    assert short.suggestion == lrs[0]
    assert "raise num_steps, or, when the loss exploded, lower start_lr" in short.notes[0]
    with pytest.raises(ConfigError, match="as many learning rates as losses"):
        find_valley(lrs, flat[:3])


def test_smoothing_is_bias_corrected_and_the_centred_one_has_no_lag():
    assert smooth_losses([2.0, 2.0, 2.0], 0.05) == pytest.approx([2.0, 2.0, 2.0])  # no pull towards 0
    ramp = [float(i) for i in range(60)]
    centred, causal = zero_lag_smooth(ramp, 0.1), smooth_losses(ramp, 0.1)
    assert centred[30] == pytest.approx(30.0, abs=0.1) and causal[30] < 23  # the one-way average lags ~8 steps


def _blobs(seed: int, n: int = 240):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(3, 16, generator=g)[y] + torch.randn(n, 16, generator=g)
    return x, y


def test_the_suggestion_trains_a_tiny_real_problem():
    """A linear head on three Gaussian blobs: the suggested rate learns, a tenth of it hardly
    does, ten times it is not better by much; the finder leaves the head as it was."""
    x, y = _blobs(0)
    xt, yt, xv, yv = x[:180], y[:180], x[180:], y[180:]
    torch.manual_seed(0)
    head = nn.Linear(16, 3)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    res = lr_range_test(head, feature_loader(xt, yt, batch_size=16, shuffle=True),
                        Loop(optimizer=opt, loss_fn=nn.CrossEntropyLoss(), set_mode=lambda e: head.train(),
                             verbose=False), LRRange(start_lr=1e-6, end_lr=10.0, num_steps=100))
    assert all(torch.equal(v, before[k]) for k, v in head.state_dict().items())
    assert res.lrs[res.valley.start] < res.suggestion < res.lrs[res.valley.end] < res.valley.min_lr

    def val_loss(lr: float) -> float:
        torch.manual_seed(1)
        h = nn.Linear(16, 3)
        o = torch.optim.AdamW(h.parameters(), lr=lr)
        for _ in range(3):
            for xb, yb in feature_loader(xt, yt, batch_size=16, shuffle=True):
                loss = nn.functional.cross_entropy(h(xb), yb)
                o.zero_grad()
                loss.backward()
                o.step()
        with torch.no_grad():
            return nn.functional.cross_entropy(h(xv), yv).item()

    at, below, above = val_loss(res.suggestion), val_loss(res.suggestion / 10), val_loss(res.suggestion * 10)
    assert at < 0.5 * below  # the suggestion learns; a tenth of it barely starts
    assert max(at, below, above) != at  # not the worst of the three


def test_the_range_test_stops_when_the_loss_explodes_and_shows_progress(monkeypatch):
    class _Terminal(io.StringIO):
        def isatty(self):
            return True

    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    model = _Squeeze(nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)  # plain SGD on least squares diverges past lr ~ 1
    res = lr_range_test(model, feature_loader(x, y, batch_size=8, shuffle=True),
                        Loop(optimizer=opt, loss_fn=nn.MSELoss(), set_mode=lambda e: model.train(), task="regression"),
                        LRRange(start_lr=1e-5, end_lr=1e3, num_steps=200))
    assert len(res.lrs) < 200 and any("exploded" in n for n in res.notes)
    assert all(math.isfinite(v) for v in res.losses + res.raw_losses)
    assert res.suggestion < 1.0
    assert "lr-find" in term.getvalue()
    quiet = _Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    lr_range_test(model, feature_loader(x, y, batch_size=8, shuffle=False),
                  Loop(optimizer=opt, loss_fn=nn.MSELoss(), set_mode=lambda e: None, task="regression", verbose=False),
                  LRRange(num_steps=5))
    assert quiet.getvalue() == ""


class _Squeeze(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).squeeze(-1)


def test_the_plot_marks_the_suggestion(monkeypatch, tmp_path):
    from transferkit.train import reporting
    from transferkit.train import lr_find as lr_find_module
    from transferkit.train.lr_find import LRFindResult

    lrs, losses = _curve(seed=1)
    v = find_valley(lrs, losses)
    res = LRFindResult(lrs=lrs, losses=smooth_losses(losses), suggestion=v.suggestion, raw_losses=losses, valley=v)
    seen = {}
    real_save = reporting.save_figure

    def spy(fig, path):
        ax = fig.axes[0]
        seen["legend"] = [t.get_text() for t in ax.get_legend().get_texts()]
        seen["vlines"] = [ln.get_xdata()[0] for ln in ax.get_lines() if ln.get_linestyle() == "--"]
        return real_save(fig, path)

    monkeypatch.setattr(lr_find_module, "save_figure", spy)
    out = res.plot(tmp_path / "lr.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert f"suggested lr {v.suggestion:.1e}" in seen["legend"] and "descent" in seen["legend"]
    assert seen["vlines"] == [pytest.approx(v.suggestion)]
    # printed, one line (it dumped every rate and loss tried)
    assert repr(res) == (f"LRFindResult(suggestion={v.suggestion:.3g}, {len(lrs)} steps from {lrs[0]:.3g} to "
                         f"{lrs[-1]:.3g}, phase='run', plot_path={str(out)!r})")


# --- which phase the range test trains (fine_tune, gradual) -------------------------------------

def _counting_backbone():
    """tk:small_cnn whose trunk counts its forward calls (the plan's deep copy keeps the hook)."""
    bb = tk.get_backbone("tk:small_cnn", weights=None)
    calls = []
    bb.trunk.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    return bb, calls


LF = dict(image_size=16, num_workers=0, device="cpu", batch_size=4, start_lr=1e-5, end_lr=10.0, epochs=3,
          precision="fp32")


@pytest.mark.parametrize("policy", ["fine_tune:frozen=1", "gradual:every=1"])
def test_lr_find_on_a_policy_with_a_frozen_phase_tests_the_head_on_cached_features_by_default(
        image_folder, capsys, policy):
    bb, calls = _counting_backbone()
    res = tk.lr_find(bb, data=image_folder, policy=policy, num_steps=30, **LF)
    assert res.phase == "frozen" and 2 <= len(res.lrs) <= 30
    n_items = sum(calls)  # the trunk ran once over the data (features), not once per step
    assert n_items < 30 * 4 and len(calls) < 30
    err = capsys.readouterr().err
    assert "frozen phase" in err and "head alone" in err and "per step" in err
    assert "plan:" not in err and "base lr" not in err  # what the test does, not a training plan
    # gradual has one rate: the blocks it unfreezes later train at the rate the test suggests for the head
    assert ("unfreezes later at this same lr" in err) == policy.startswith("gradual")
    # and the result says it too, which verbose=False and the command's JSON keep
    assert any("head's rate" in n and "phase='unfrozen'" in n for n in res.notes) == policy.startswith("gradual")


def test_lr_find_unfrozen_phase_trains_end_to_end_at_the_phases_rate(image_folder, capsys):
    bb, calls = _counting_backbone()
    res = tk.lr_find(bb, data=image_folder, policy="fine_tune:frozen=1", num_steps=12, phase="unfrozen", **LF)
    assert res.phase == "unfrozen"
    assert len([c for c in calls if c == 4]) >= len(res.lrs)  # one trunk forward per step, in training batches
    err = capsys.readouterr().err
    assert "trains the backbone" in err and "x 0.1" in err


def test_lr_find_cost_never_says_zero_seconds():
    """"about 0.0015 s per step: up to 0 s for 100 steps" said nothing."""
    from transferkit.api import _lr_find_cost

    said = _lr_find_cost(0.0015, 100, 10, "unfrozen", 2)
    assert said == "lr-find: about 0.0015 s per step: up to 1 s for 100 steps (training 2 epochs like this: about 1 s)"
    assert "up to 2.5 min for 100 steps" in _lr_find_cost(1.5, 100, 10, "head", 2)


def test_lr_find_unfrozen_phase_starts_from_the_head_the_first_phase_trains(image_folder, tmp_path, monkeypatch):
    """The backbone's epochs of fine_tune start from a trained head whose FeatureNorm holds the
    cached features' statistics; the range test of those epochs swept an untrained head behind
    a FeatureNorm that did nothing (mean 0, std 1)."""
    import transferkit.api as api

    bb = tk.get_backbone("tk:small_cnn", weights=None)
    torch.save(bb.trunk.state_dict(), tmp_path / "trunk.pt")  # trained weights, as far as the run knows
    seen = {}

    def first_phase(d, run, **kwargs):
        seen["initial"] = run.model.head[-1].weight.detach().clone()
        return train(d, run, **kwargs)

    def spy(module, *args, **kwargs):
        seen.update(std=module.head[0].std.clone(), swept=module.head[-1].weight.detach().clone())
        return sweep(module, *args, **kwargs)
    train, sweep = api.train, api.lr_range_test
    monkeypatch.setattr(api, "train", first_phase)
    monkeypatch.setattr(api, "lr_range_test", spy)
    tk.lr_find("tk:small_cnn", data=image_folder, policy="fine_tune:frozen=1", num_steps=6,
               weights=tmp_path / "trunk.pt", phase="unfrozen", **LF)
    assert not torch.equal(seen["std"], torch.ones_like(seen["std"]))  # fitted to the cached features
    assert not torch.equal(seen["swept"], seen["initial"])  # the head trained before the sweep


def test_lr_range_test_trains_at_lr_factor_times_the_recorded_rate():
    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randint(0, 2, (32,))
    head = torch.nn.Linear(6, 2)
    opt = torch.optim.SGD([{"params": head.parameters(), "lr": 1.0, "lr_scale": 0.5}], lr=1.0)
    seen = []

    def loss_fn(logits, target):
        seen.append(opt.param_groups[0]["lr"])
        return torch.nn.functional.cross_entropy(logits, target)

    res = lr_range_test(head, feature_loader(x, y, batch_size=8, shuffle=False),
                        Loop(optimizer=opt, loss_fn=loss_fn, set_mode=lambda e: head.train(), verbose=False),
                        LRRange(start_lr=1e-4, end_lr=1e-2, num_steps=5), lr_factor=0.1)
    assert seen == pytest.approx([lr * 0.1 * 0.5 for lr in res.lrs])


def test_lr_find_phase_errors_say_what_exists(image_folder):
    with pytest.raises(ConfigError, match="Did you mean 'frozen'"):
        tk.lr_find("tk:small_cnn", weights=None, data=image_folder, policy="fine_tune", phase="frozn", **LF)
    with pytest.raises(ConfigError, match="no frozen phase"):
        tk.lr_find("tk:small_cnn", weights=None, data=image_folder, policy="full", phase="frozen", **LF)
    with pytest.raises(ConfigError, match="no phase that trains it"):
        tk.lr_find("tk:small_cnn", weights=None, data=image_folder, policy="feature_extraction", phase="unfrozen",
                   **LF)


@pytest.mark.parametrize("sweep", [dict(num_steps=1), dict(start_lr=1.0, end_lr=0.1), dict(start_lr=-1.0)])
def test_a_bad_sweep_is_refused_before_the_data_are_read(sweep):
    with pytest.raises(ConfigError, match="lr_find needs 0 < start_lr < end_lr and num_steps >= 2"):
        tk.lr_find("tk:small_cnn", weights=None, data="no/such/folder", **sweep)


@pytest.mark.parametrize("sweep, said", [
    (dict(end_lr=float("inf")), "end_lr=inf is not a finite number"),
    (dict(start_lr="1e-5"), "start_lr='1e-5' is not a finite number"),
    (dict(num_steps=10.5), "num_steps=10.5 is not an integer"),
])
def test_a_sweep_of_the_wrong_type_is_refused_before_the_data_are_read(sweep, said):
    with pytest.raises(ConfigError, match=said):
        tk.lr_find("tk:small_cnn", weights=None, data="no/such/folder", **sweep)


def test_a_logistic_head_and_an_unwritable_plot_are_refused_before_the_test_runs(image_folder, tmp_path, monkeypatch):
    import transferkit.api

    monkeypatch.setattr(transferkit.api, "lr_range_test", lambda *a, **k: pytest.fail("the test ran"))
    with pytest.raises(ConfigError, match="head='logistic' fits a logistic-regression probe, which has no learning"):
        tk.lr_find("tk:small_cnn", weights=None, data=image_folder, head="logistic", **LF)
    with pytest.raises(tk.OutputError, match="plot"):
        tk.lr_find("tk:small_cnn", weights=None, data=image_folder, plot=tmp_path, **LF)


def test_lr_find_says_it_writes_none_of_finetune_s_outputs(image_folder, tmp_path):
    """export= and checkpoint= were taken without a word and nothing was written."""
    with pytest.warns(UserWarning, match=r"lr_find writes no export='.*m.pt', checkpoint='.*m.ckpt': the range test"):
        tk.lr_find("tk:small_cnn", weights=None, data=image_folder, num_steps=4, export=tmp_path / "m.pt",
                   checkpoint=tmp_path / "m.ckpt", **{k: v for k, v in LF.items() if k != "num_steps"})
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / "m.ckpt").exists()


def test_lr_find_in_a_job_of_several_processes_is_refused(monkeypatch, tmp_path):
    """Under torchrun each rank swept its own share of the data and printed its own suggestion
    (0.062 and 0.033 from the two ranks of one job), and lr_find(**kw) then finetune(lr=...) was
    refused as ranks started with other settings."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(tk.ConfigError, match=r"lr_find runs in one process, and this is one of 2 processes of a job "
                                             r"\(torchrun\).*Run lr_find without torchrun"):
        tk.lr_find("tk:small_cnn", weights=None, data=tmp_path)
