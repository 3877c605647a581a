"""Optimizers, schedules with warmup, reduce-on-plateau, and the LR range test."""

from __future__ import annotations

import math
import types

import pytest
import torch

import transferkit as tk
from transferkit.errors import ConfigError
from transferkit.train.optim import LRSchedule, make_optimizer, make_scheduler


def _lrs(name, steps=20, per_epoch=5, warmup=0, **opts):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 1.0}], lr=1.0)
    s = LRSchedule(name, opt, total_steps=steps, steps_per_epoch=per_epoch, warmup_steps=warmup, options=opts or None)
    out = [opt.param_groups[0]["lr"]]
    for _ in range(steps - 1):
        s.step()
        out.append(opt.param_groups[0]["lr"])
    return out, s, opt


def test_schedule_shapes():
    const, *_ = _lrs("constant")
    assert const == [1.0] * 20
    step, *_ = _lrs("step", step_epochs=2, gamma=0.1)
    assert step[0] == 1.0 and step[9] == 1.0 and math.isclose(step[10], 0.1) and math.isclose(step[19], 0.1)
    exp, *_ = _lrs("exponential", gamma=0.5)
    assert math.isclose(exp[5], 0.5) and math.isclose(exp[15], 0.125)
    cos, *_ = _lrs("cosine")
    assert cos[0] == 1.0 and all(a >= b for a, b in zip(cos, cos[1:])) and cos[-1] < 0.01
    oc, *_ = _lrs("one_cycle", pct_start=0.25)
    peak = oc.index(max(oc))
    assert peak == 5 and math.isclose(oc[0], 1 / 25) and oc[-1] < 1e-3


def test_warmup_is_linear_then_schedule():
    lrs, *_ = _lrs("cosine", warmup=4)
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])  # 4 steps below the rate
    assert lrs[5] < 1.0
    one, *_ = _lrs("constant", warmup=1)  # a warmup of one step lowered nothing: (0 + 1) / 1
    assert one[:2] == pytest.approx([0.5, 1.0])


def test_reduce_on_plateau_and_state_roundtrip():
    _, s, opt = _lrs("plateau", patience=1, factor=0.5)
    for loss in (1.0, 0.9, 0.95, 0.95):  # two epochs without improvement > patience 1
        s.epoch_end(loss)
    assert math.isclose(opt.param_groups[0]["lr"], 0.5)
    p = torch.nn.Parameter(torch.zeros(1))
    opt2 = torch.optim.SGD([p], lr=1.0)
    s2 = LRSchedule("plateau", opt2, total_steps=20, steps_per_epoch=5, options={"patience": 1, "factor": 0.5})
    s2.load_state_dict(s.state_dict())
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_each_phase_keeps_its_own_plateau():
    """fine_tune's second phase starts at its own rate: a cut of the first phase is not carried
    over, and neither is the first phase's best loss (nor its last epoch's, which ends it)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    s = LRSchedule("plateau", opt, total_steps=30, steps_per_epoch=5, phases=[(15, 1.0), (15, 0.1)],
                   options={"patience": 0, "factor": 0.5})
    lrs = []
    for loss in (1.0, 2.0, 3.0, 9.0, 8.0, 8.5):  # epoch 2 cuts phase 1; epoch 6 cuts phase 2
        for _ in range(5):
            s.step()
        s.epoch_end(loss)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([1.0, 0.5, 0.1, 0.1, 0.1, 0.05])
    again = LRSchedule("plateau", torch.optim.SGD([p], lr=1.0), total_steps=30, steps_per_epoch=5,
                       phases=[(15, 1.0), (15, 0.1)], options={"patience": 0, "factor": 0.5})
    again.load_state_dict(s.state_dict())
    assert again.state_dict() == s.state_dict()
    # a checkpoint of before the phases kept their own, written where phase 2 starts: phase 1's cut stays behind
    old = LRSchedule("plateau", torch.optim.SGD([p], lr=1.0), total_steps=30, steps_per_epoch=5,
                     phases=[(15, 1.0), (15, 0.1)], options={"patience": 0, "factor": 0.5})
    state = {"step_count": 15, "scale": 0.5, "best": 1.0, "bad_epochs": 0,
             "plan": {**s.state_dict()["plan"]}}
    old.load_state_dict(state)
    assert old.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    state["step_count"] = 20  # within phase 2: its bookkeeping is phase 2's, as it was
    old.load_state_dict(state)
    assert old.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_warmup_epochs_count_the_steps_of_the_epochs_they_span(tmp_path, monkeypatch):
    """A cached first epoch keeps its short last batch (5 steps of 24 images in batches of 5)
    while epochs on images drop it (4): two epochs of warmup are 9 steps, not twice the first
    (which ran warmup into the third epoch)."""
    from conftest import make_image_folder

    from transferkit.steps import steps_in_epochs

    assert steps_in_epochs(2, [5, 4, 4]) == 9 and steps_in_epochs(0.5, [5, 4]) == 2
    assert steps_in_epochs(1.5, [5, 4, 4]) == 7 and steps_in_epochs(0, [5]) == 0
    data = make_image_folder(tmp_path / "img", per_class=15, size=16)
    lrs = _applied_lrs(monkeypatch)
    tk.finetune("tk:small_cnn", weights=None, data=data, image_size=16, batch_size=5, epochs=3, num_workers=0,
                verbose=False, precision="fp32", schedule="constant", lr=1.0, warmup_epochs=2,
                policy="gradual:every=1")
    assert lrs[0] == pytest.approx([i / 10 for i in range(1, 10)] + [1.0] * 4)  # 5 + 4 steps of warmup, then 4


def test_group_learning_rate_ratios_are_kept():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 1.0}], lr=1.0)
    s = LRSchedule("cosine", opt, total_steps=10, steps_per_epoch=5)
    for _ in range(5):
        s.step()
    assert math.isclose(opt.param_groups[0]["lr"] * 10, opt.param_groups[1]["lr"])


def test_bad_values_raise_readable_errors():
    p = [{"params": [torch.nn.Parameter(torch.zeros(1))]}]
    with pytest.raises(ConfigError, match="Did you mean .*'adamw'"):
        make_optimizer("adamv", p, lr=1e-3)
    with pytest.raises(ConfigError, match="lr must be"):
        make_optimizer("sgd", p, lr=-1)
    with pytest.raises(ConfigError, match="schedule_options"):
        _lrs("cosine", gamma=0.5)
    with pytest.raises(ConfigError, match="Unknown schedule"):
        _lrs("linear")


def test_lr_find_runs_and_plots(image_folder, tmp_path):
    res = tk.lr_find("tk:small_cnn", weights=None, data=image_folder, image_size=16, num_workers=0, device="cpu",
                     batch_size=4, num_steps=25, start_lr=1e-5, end_lr=10, plot=tmp_path / "lr.png")
    assert 1e-5 <= res.suggestion <= 10
    assert len(res.lrs) == len(res.losses) and 2 <= len(res.lrs) <= 25
    assert all(b > a for a, b in zip(res.lrs, res.lrs[1:]))
    assert (tmp_path / "lr.png").read_bytes()[:4] == b"\x89PNG"


def test_range_test_restores_weights_and_optimizer():
    from transferkit.train.features import feature_loader
    from transferkit.schedules import LRRange
    from transferkit.train.lr_find import lr_range_test
    from transferkit.train.loop import Loop

    torch.manual_seed(0)
    x, y = torch.randn(64, 6), torch.randint(0, 2, (64,))
    head = torch.nn.Linear(6, 2)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    res = lr_range_test(head, feature_loader(x, y, batch_size=8, shuffle=True),
                        Loop(optimizer=opt, loss_fn=torch.nn.CrossEntropyLoss(), set_mode=lambda e: head.train()),
                        LRRange(num_steps=30, end_lr=100.0))
    assert len(res.lrs) >= 10  # several epochs of 8 batches
    for k, v in head.state_dict().items():
        assert torch.equal(v, before[k])
    assert opt.state_dict()["state"] == {} and opt.param_groups[0]["lr"] == 1e-3


def _discriminative_run(lr: float, *, schedule: str = "constant", x: torch.Tensor | None = None):
    """A small CNN fine-tuned for 2 epochs with ``discriminative=0.01``: the stem's group runs at lr / 100."""
    from torch.utils.data import DataLoader, TensorDataset

    from transferkit.heads import build_head
    from transferkit.model import TransferModel
    from transferkit.policies import Policy, param_groups
    from transferkit.train.loop import Loop, fit
    from transferkit.train.optim import make_scheduler

    torch.manual_seed(0)
    bb = tk.get_backbone("tk:small_cnn", weights=None, widths=(4, 4, 8))
    model = TransferModel(torch.nn.Identity(), bb.trunk, build_head(bb.num_features, 2))
    policy = Policy.parse("full,discriminative=0.01")
    opt = make_optimizer("adamw", param_groups(model, lr=lr, weight_decay=0.0, backbone=bb, policy=policy), lr=lr)
    assert opt.param_groups[0]["name"] == "stem" and opt.param_groups[0]["lr"] == pytest.approx(lr / 100)
    x = torch.randn(8, 3, 8, 8) if x is None else x
    loader = DataLoader(TensorDataset(x, torch.randint(0, 2, (8,))), batch_size=4)
    sched = make_scheduler(schedule, opt, total_steps=4, steps_per_epoch=2)
    history, _ = fit(model, loader, None, Loop(optimizer=opt, scheduler=sched, loss_fn=torch.nn.CrossEntropyLoss(),
                                               set_mode=lambda e: model.train(), verbose=False), epochs=2)
    return history, opt


def test_history_reports_the_base_lr_not_the_stems():
    history, _ = _discriminative_run(1e-3)
    assert [r["lr"] for r in history] == [1e-3, 1e-3]
    assert history[0]["lr_groups"]["stem"] == pytest.approx(1e-5) and history[0]["lr_groups"]["head"] == 1e-3
    cosine, opt = _discriminative_run(1e-3, schedule="cosine")
    step = [1e-3 * 0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(4)]  # cosine over 4 steps, 2 per epoch
    assert [r["lr"] for r in cosine] == pytest.approx([step[1], step[3]])  # the rate of each epoch's last step


def test_a_diverged_loss_quotes_the_base_lr():
    from transferkit.errors import TrainingError

    with pytest.raises(TrainingError, match=r"learning rate \(0\.001\)"):
        _discriminative_run(1e-3, x=torch.full((8, 3, 8, 8), float("nan")))


def test_base_lr_of_groups_without_scales_is_the_largest():
    from transferkit.train.loop import base_lr

    p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    assert base_lr(torch.optim.SGD([{"params": [p], "lr": 1e-4}, {"params": [q], "lr": 1e-2}], lr=1.0)) == 1e-2


def test_tensorboard_gets_every_groups_lr(image_folder, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tk.finetune("tk:small_cnn", weights=None, data=image_folder, policy="full,discriminative=0.01", epochs=1,
                batch_size=8, image_size=16, lr=1e-3, schedule="constant", verbose=False, num_workers=0,
                log_dir=tmp_path / "tb")
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"lr/base", "lr/stem", "lr/stage1", "lr/stage3", "lr/head", "lr/head/no_decay"} <= tags
    assert events.Scalars("lr/base")[0].value == pytest.approx(1e-3)
    assert events.Scalars("lr/stem")[0].value == pytest.approx(1e-5)
    assert {"final/accuracy", "final/val_loss", "final/macro_f1"} <= tags, tags  # the kept model's metrics


def test_a_schedule_restarts_in_each_phase_at_the_phases_share_of_the_lr():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p], "lr": 1e-2, "lr_scale": 1.0}], lr=1e-2)
    sched = make_scheduler("cosine", opt, total_steps=12, steps_per_epoch=4, warmup_steps=2,
                           phases=[(4, 1.0), (8, 0.1)])
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs[:3] == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2])  # warmup in the first phase only
    assert lrs[3] < lrs[2] <= 1e-2  # the head's phase decays ...
    assert lrs[4] == pytest.approx(1e-3) and lrs[5] < 1e-3  # ... then the next restarts at a tenth, no warmup
    assert lrs[-1] < 1e-4
    one = make_scheduler("cosine", torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), total_steps=12)
    plain = [one.factor(i) for i in range(12)]
    assert plain == pytest.approx([make_scheduler("cosine", opt, total_steps=12, phases=[(12, 1.0)]).factor(i)
                                   for i in range(12)])  # one phase: the schedule as before


def test_phase_steps_need_phases_that_cover_the_run():
    from transferkit.train.optim import phase_steps

    assert phase_steps([(1, 1.0), (2, 0.1)], [8, 7, 7]) == [(8, 1.0), (14, 0.1)]
    with pytest.raises(ConfigError, match="do not cover"):
        phase_steps([(1, 1.0)], [8, 7])


def test_fine_tune_defaults_the_head_phase_to_the_head_lr_and_unfreezes_at_a_tenth(image_folder):
    from transferkit.policies import Policy

    assert Policy.parse("fine_tune").lr_phases(5) == [(1, 1.0), (4, 0.1)]
    assert Policy.parse("fine_tune:frozen=2,unfrozen_lr=0.05").lr_phases(5) == [(2, 1.0), (3, 0.05)]
    assert Policy.parse("fine_tune").lr_phases(1) == [(1, 1.0)]  # all frozen: one phase
    assert Policy.parse("full").lr_phases(5) == [(5, 1.0)] and Policy.parse("gradual:every=2").lr_phases(5) == [(5, 1.0)]
    assert str(Policy.parse("fine_tune:frozen=1,unfrozen_lr=0.05")) == "fine_tune:frozen=1,unfrozen_lr=0.05"
    with pytest.raises(tk.PolicyError, match="has none"):
        Policy.parse("full,unfrozen_lr=0.5")
    d = tk.plan(backbone="tk:small_cnn", weights=None, data=image_folder, policy="fine_tune", epochs=3,
                image_size=16, num_workers=0)
    assert d.lr == 0.01 and d.head_passes == 3  # as many as the run's epochs
    assert ("phases:   1 epoch of the head alone at lr 0.01 (3 passes over the cached features per epoch, the best "
            "kept), then 2 epochs at lr 0.001") in d.summary()
    full = tk.plan(backbone="tk:small_cnn", weights=None, data=image_folder, policy="full", epochs=3, image_size=16,
                   num_workers=0)
    assert full.lr == 0.001 and "phases:" not in full.summary()


@pytest.mark.parametrize("policy, cache, passes", [("fine_tune:passes=3", "auto", 3), ("fine_tune:passes=1", "auto", 1),
                                                   ("fine_tune:passes=3", False, 1), ("fine_tune", "auto", 2)])
def test_the_frozen_phase_makes_its_head_passes_over_cached_features(image_folder, monkeypatch, policy, cache, passes):
    import transferkit.train.loop as loop_module

    batches = []
    real = loop_module.train_one_epoch

    def counting(module, loader, loop, **kw):
        batches.append(sum(1 for _ in loader))
        return real(module, loader, loop, **kw)
    monkeypatch.setattr(loop_module, "train_one_epoch", counting)
    r = tk.finetune("tk:small_cnn", weights=None, data=image_folder, policy=policy, epochs=2, image_size=16,
                    batch_size=4, num_workers=0, precision="fp32", verbose=False, cache_features=cache)
    per_pass = -(-r.decisions.n_train // 4)
    assert r.decisions.head_passes == passes
    assert batches == [per_pass] * passes + [per_pass]  # the frozen epoch's passes, then one of the whole model
    if passes > 1:
        assert r.history[0]["passes"] == passes and 1 <= r.history[0]["best_pass"] <= passes


def test_the_frozen_phase_keeps_its_best_pass_as_feature_extraction_of_that_length_would(image_folder, tmp_path):
    """fine_tune's frozen phase with passes=epochs is the feature-extraction run of the same
    length (from pretrained weights, where both standardise the cached features): the same head
    after it, so fine_tune starts from feature extraction's best."""
    torch.manual_seed(0)
    torch.save(tk.get_backbone("tk:small_cnn", weights=None).trunk.state_dict(), tmp_path / "trunk.pt")
    kw = dict(weights=tmp_path / "trunk.pt", data=image_folder, epochs=3, image_size=16, batch_size=4,
              num_workers=0, precision="fp32", verbose=False, head_dropout=0.0)
    fe = tk.finetune("tk:small_cnn", policy="feature_extraction", **kw)
    ft = tk.finetune("tk:small_cnn", policy="fine_tune:frozen=1,passes=epochs", **{**kw, "epochs": 3})
    first = ft.history[0]
    assert first["best_pass"] == fe.best["epoch"] and first["val_acc"] == fe.best["val_acc"]
    assert first["val_loss"] == pytest.approx(fe.best["val_loss"], rel=1e-6)
    assert ft.best["val_acc"] >= fe.best["val_acc"]


def test_fit_keeps_the_weights_of_the_best_pass():
    from torch.utils.data import DataLoader, TensorDataset

    from transferkit.train.loop import Loop, evaluate, fit

    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long()
    train = DataLoader(TensorDataset(x, y), batch_size=16)
    val = DataLoader(TensorDataset(x, 1 - y), batch_size=64)  # the opposite labels: every pass makes it worse
    head = torch.nn.Linear(4, 2)
    loop = Loop(optimizer=torch.optim.SGD(head.parameters(), lr=0.5), loss_fn=torch.nn.CrossEntropyLoss(),
                set_mode=lambda e: head.train(), monitor="val_loss", restore_best=False, verbose=False)
    history, _ = fit(head, train, val, loop, epochs=1, passes=4)
    row = history[0]
    assert row["passes"] == 4 and row["best_pass"] == 1
    kept = evaluate(head, val, loss_fn=torch.nn.CrossEntropyLoss(), device=torch.device("cpu"), task="multiclass")
    assert kept["loss"] == pytest.approx(row["val_loss"], rel=1e-6)  # the first pass's weights, not the last's


def test_epochs_that_tie_on_accuracy_are_told_apart_by_the_validation_loss():
    from transferkit.train.loop import Loop, TrainState, _end_epoch

    head = torch.nn.Linear(2, 2)
    loop = Loop(optimizer=torch.optim.SGD(head.parameters(), lr=0.1), loss_fn=torch.nn.CrossEntropyLoss(),
                set_mode=lambda e: None, early_stopping=2, verbose=False)
    state = TrainState()
    for epoch, (acc, loss) in enumerate([(1.0, 0.30), (1.0, 0.01), (1.0, 0.05), (0.9, 0.001)], start=1):
        _end_epoch(state, {"epoch": epoch, "train_loss": 0.1, "val_acc": acc, "val_loss": loss}, head, "val_acc",
                   "max", loop)
        if epoch == 2:
            assert state.best["epoch"] == 2 and state.bad_epochs == 0  # the same accuracy, a lower loss
    assert state.best == {"epoch": 2, "val_acc": 1.0, "val_loss": 0.01} and state.stopped_early


def test_a_training_monitor_picks_its_best_epoch_and_stops_early():
    from transferkit.train.loop import Loop, TrainState, _end_epoch

    head = torch.nn.Linear(2, 2)
    loop = Loop(optimizer=torch.optim.SGD(head.parameters(), lr=0.1), loss_fn=torch.nn.CrossEntropyLoss(),
                set_mode=lambda e: None, early_stopping=2, verbose=False)
    state = TrainState()
    for epoch, loss in enumerate([0.53, 376.0, 16.9, 5.0], start=1):
        if not state.stopped_early:
            _end_epoch(state, {"epoch": epoch, "train_loss": loss, "train_acc": 0.5}, head, "train_loss", "min", loop)
    assert state.best == {"epoch": 1, "train_loss": 0.53} and state.stopped_early and len(state.history) == 3


def test_early_stopping_without_validation_data_is_refused_before_training(image_folder):
    import transferkit as tk
    from transferkit.errors import ConfigError

    common = dict(weights=None, data=image_folder, image_size=16, device="cpu", num_workers=0, epochs=2,
                  verbose=False, val_split=0, early_stopping=1)
    with pytest.raises(ConfigError, match=r"early_stopping=1 watches val_acc, but the run has no validation data"):
        tk.plan("tk:small_cnn", **common)
    assert tk.plan("tk:small_cnn", **common, monitor="train_loss").n_val == 0


def _applied_lrs(monkeypatch) -> list[list[float]]:
    """The head's lr at each optimizer step of the runs that follow, one list per run."""
    runs: list[list[float]] = []
    step = LRSchedule.step

    def record(self):
        if self.step_count == 0:
            runs.append([])
        runs[-1].append(next(g["lr"] for g in self.optimizer.param_groups if g.get("name") == "head"))
        step(self)

    monkeypatch.setattr(LRSchedule, "step", record)
    return runs


@pytest.mark.parametrize("schedule, extra", [("step", {}), ("exponential", {}), ("cosine", {"warmup_epochs": 1}),
                                             # threshold 1: no loss improves on its best by all of it, so the rate
                                             # is cut after every epoch but the first, on any CPU's numbers
                                             ("plateau", {"schedule_options": {"patience": 0, "factor": 0.5,
                                                                               "threshold": 1.0}})])
def test_fine_tune_s_frozen_phase_has_the_schedule_of_feature_extraction(tmp_path, monkeypatch, schedule, extra):
    """24 training images in batches of 5: a cached epoch takes 5 steps, an epoch on images 4
    (the last short batch dropped). The step schedule counted epochs of 4 steps in the frozen
    phase, warmup spanned the frozen epoch's 3 passes, and the plateau was told the best
    pass's loss once an epoch, not each pass's."""
    from conftest import make_image_folder

    data = make_image_folder(tmp_path / "img", per_class=15, size=16)
    # weights from a file, as pretrained ones: both heads start with a FeatureNorm and see the same losses
    torch.save(tk.get_backbone("tk:small_cnn", weights=None).trunk.state_dict(), tmp_path / "trunk.pt")
    kw = dict(weights=tmp_path / "trunk.pt", data=data, image_size=16, batch_size=5, epochs=3, num_workers=0,
              verbose=False, precision="fp32", schedule=schedule, **extra)
    lrs = _applied_lrs(monkeypatch)
    fe = tk.finetune("tk:small_cnn", policy="feature_extraction", **kw)
    tk.finetune("tk:small_cnn", policy="fine_tune:frozen=1", **kw)
    assert fe.decisions.n_train == 24 and len(lrs[0]) == 15
    assert lrs[1][:15] == pytest.approx(lrs[0], rel=1e-12)
    assert len(set(lrs[0])) > 1  # the schedule moved within the frozen phase (the plateau cut the rate)


def test_fine_tune_s_head_phase_trains_in_fp32_as_feature_extraction_does(tmp_path, monkeypatch):
    """Under precision="auto" on a device with native bf16, the head on cached features trains
    in fp32; fine_tune's head phase ran under the bf16 autocast of its later epochs, and so
    differed from the feature-extraction run it is documented to start with."""
    from conftest import make_image_folder

    import transferkit.facts as facts

    monkeypatch.setattr(facts, "device_bf16", lambda dev: (True, "native bf16 (this test)"))
    data = make_image_folder(tmp_path / "img", per_class=8, size=16)
    torch.save(tk.get_backbone("tk:small_cnn", weights=None).trunk.state_dict(), tmp_path / "trunk.pt")
    kw = dict(weights=tmp_path / "trunk.pt", data=data, image_size=16, batch_size=4, epochs=2, num_workers=0,
              verbose=False, cache_dir=tmp_path / "cache", restore_best=False)
    seen: list[bool] = []
    real = tk.build_model

    def build(*a, **k):  # record, at each forward of the head, whether autocast was on
        model = real(*a, **k)
        model.head.register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
        return model

    monkeypatch.setattr("transferkit.run.build_model", build)
    fe = tk.finetune("tk:small_cnn", policy="feature_extraction", **kw)
    assert fe.decisions.speed["precision"] == "fp32" and not any(seen)
    seen.clear()
    ft = tk.finetune("tk:small_cnn", policy="fine_tune:frozen=1", **kw)  # 2 passes of the head: the 2 epochs of fe
    assert ft.decisions.speed["precision"] == "bf16" and ft.decisions.speed["head_precision"] == "fp32"
    assert "head phase fp32" in ft.decisions.summary()
    steps = -(-ft.feature_report["splits"]["train"]["samples"] // 4)
    head_phase = 2 * (steps + 1)  # each pass: its steps, then one validation batch
    assert not any(seen[:head_phase]) and all(seen[head_phase:]), seen
    best = fe.history[ft.history[0]["best_pass"] - 1]  # the pass it kept (counted from 1): that epoch of fe
    assert (ft.history[0]["train_loss"], ft.history[0]["val_loss"]) == (best["train_loss"], best["val_loss"])
    seen.clear()  # lr_find's frozen phase tests the head as that phase trains it
    tk.lr_find("tk:small_cnn", policy="fine_tune:frozen=1", phase="frozen", num_steps=3,
               **{k: v for k, v in kw.items() if k != "restore_best"})
    assert seen and not any(seen)
    # no head phase: the record says the training precision (a checkpoint of before it was recorded resumes)
    for other in ({"policy": "full"}, {"policy": "fine_tune:frozen=1", "cache_features": False}):
        assert tk.plan("tk:small_cnn", **kw, **other).speed["head_precision"] == "bf16", other


def test_the_schedule_spans_the_steps_taken_when_files_prove_unreadable(tmp_path, monkeypatch):
    """A damaged file is left out of the stored features: the cosine was sized for its batch too."""
    from conftest import damaged_png, make_image_folder

    data = make_image_folder(tmp_path / "img", per_class=12, size=16)
    damaged_png(data / "dark" / "zz_damaged.png")
    lrs = _applied_lrs(monkeypatch)
    with pytest.warns(UserWarning, match="zz_damaged.png', which failed to load while its features were computed"):
        r = tk.finetune("tk:small_cnn", weights=None, data=data, image_size=16, batch_size=6, epochs=3,
                        num_workers=0, verbose=False, precision="fp32", val_split=0, cache_dir=tmp_path / "cache",
                        lr=1.0)
    assert r.decisions.n_train == 25 and len(lrs[0]) == 12  # 24 readable: 4 batches an epoch
    assert lrs[0][-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 11 / 12)))  # the cosine's last step


def test_a_resume_after_the_schedule_was_replanned_continues_it(tmp_path, monkeypatch):
    """The replanned schedule is in the checkpoint: resumed after the frozen phase, the run
    went on with the plan made before the feature pass found the damaged file."""
    import warnings

    from conftest import damaged_png, make_image_folder

    data = make_image_folder(tmp_path / "img", per_class=12, size=16)
    damaged_png(data / "dark" / "zz_damaged.png")
    kw = dict(weights=None, data=data, image_size=16, batch_size=6, epochs=4, num_workers=0, verbose=False,
              precision="fp32", val_split=0, cache_dir=tmp_path / "cache", policy="fine_tune:frozen=1,passes=1")

    def stop(row):
        if row["epoch"] == 2:
            raise RuntimeError("stop")

    lrs = _applied_lrs(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the damaged file, said each run
        straight = tk.finetune("tk:small_cnn", checkpoint=tmp_path / "a.pt", **kw)
        with pytest.raises(RuntimeError, match="stop"):
            tk.finetune("tk:small_cnn", checkpoint=tmp_path / "b.pt", callbacks=[stop], **kw)
        resumed = tk.finetune("tk:small_cnn", checkpoint=tmp_path / "b.pt", resume=True, **kw)
    assert len(lrs) == 2 and len(lrs[0]) == 4 + 3 * 4  # 4 cached batches of the 24 readable images, 3 epochs of 4
    assert lrs[1] == pytest.approx(lrs[0], rel=1e-12)  # the interrupted run's steps, then the resumed run's
    assert [r["lr"] for r in resumed.history] == [r["lr"] for r in straight.history]


def test_the_plateau_schedule_reads_a_loss_and_its_old_mode_max_is_dropped_or_refused():
    """mode_max=1 cut the rate while the loss it was given fell; mode_max=0 (the old default,
    in configs and checkpoints) changes nothing and is read as before."""
    from transferkit.schedules import check_schedule_options

    assert check_schedule_options("plateau", {"mode_max": 0, "patience": 1}) == \
        check_schedule_options("plateau", {"patience": 1})
    with pytest.raises(ConfigError, match="mode_max=1 is no longer taken"):
        check_schedule_options("plateau", {"mode_max": 1})


def test_early_stopping_waits_for_the_backbone_and_a_run_that_ran_whole_did_not_stop_early(monkeypatch):
    """``fine_tune``'s head-only phase could end the run (early_stopping=1 after a worse head
    epoch): the backbone never trained, without a word. And a run whose last planned epoch was
    the one without improvement said "stopped early". The epochs' validation losses are given."""
    from transferkit.train import loop as loop_mod

    def run(losses, head_only):
        it = iter(losses)
        monkeypatch.setattr(loop_mod, "_train_and_validate", lambda *a, **k: {
            "epoch": a[5] + 1, "train_loss": 0.1, "val_loss": next(it), "lr": 0.1, "lr_groups": {}})
        head = torch.nn.Linear(2, 2)
        loop = loop_mod.Loop(optimizer=torch.optim.SGD(head.parameters(), lr=0.1), loss_fn=torch.nn.CrossEntropyLoss(),
                             set_mode=lambda e: None, monitor="val_loss", early_stopping=1, verbose=False,
                             head_only_epochs=head_only)
        state = loop_mod.TrainState()
        loop_mod.fit(head, types.SimpleNamespace(sampler=None), None, loop, epochs=len(losses), state=state)
        return [h["epoch"] for h in state.history], state.stopped_early

    assert run([0.5, 0.6, 0.7, 0.4, 0.45, 0.3], head_only=3) == ([1, 2, 3, 4, 5], True)  # in the backbone's epochs
    assert run([0.5, 0.6, 0.7, 0.4, 0.45, 0.3], head_only=0) == ([1, 2], True)
    assert run([0.5, 0.4, 0.3, 0.35], head_only=0) == ([1, 2, 3, 4], False)  # the last epoch: nothing cut short


def test_lr_find_refuses_a_rate_and_takes_the_run_s_other_settings(image_folder):
    """lr_find(..., lr=0.1) ran and ignored the rate; the run's other settings (outputs, schedule)
    are taken, so that lr_find(**kw) and finetune(**kw) share their arguments."""
    kw = dict(weights=None, data=image_folder, image_size=16, num_workers=0, verbose=False, num_steps=3)
    with pytest.raises(ConfigError, match="lr_find: lr=0.1 is not used: the range test sweeps its own rates"):
        tk.lr_find("tk:small_cnn", lr=0.1, **kw)
    assert tk.lr_find("tk:small_cnn", warmup_epochs=1, export="m.pt", schedule="step", **kw).lrs


def test_a_fine_tune_run_stops_early_only_in_the_epochs_that_train_the_backbone(image_folder, monkeypatch):
    """The run's wiring of the rule above: fine_tune:frozen=2 with early_stopping=1 goes past a
    worse second (head-only) epoch and stops at the first worse epoch of the backbone's."""
    from transferkit.train import loop as loop_mod

    losses = {1: 0.5, 2: 0.6, 3: 0.4, 4: 0.45, 5: 0.3}
    monkeypatch.setattr(loop_mod, "_train_and_validate", lambda *a, **k: {
        "epoch": a[5] + 1, "train_loss": 0.1, "val_loss": losses[a[5] + 1], "lr": 0.1, "lr_groups": {}})
    r = tk.finetune("tk:small_cnn", weights=None, data=image_folder, image_size=16, num_workers=0, verbose=False,
                    policy="fine_tune:frozen=2,passes=1", epochs=5, early_stopping=1, monitor="val_loss")
    assert [h["epoch"] for h in r.history] == [1, 2, 3, 4] and r.stopped_early and r.best["epoch"] == 3


def test_the_plan_says_the_rates_gamma_beta_train_at_in_fine_tunes_first_phase(image_folder):
    """Under fine_tune,bn=affine the first epoch trains every block's BatchNorm gamma/beta at ten
    times the rates the plan's groups line shows (those of the phase that trains the blocks)."""
    kw = dict(backbone="tk:small_cnn", weights=None, data=image_folder, policy="fine_tune,bn=affine", epochs=2,
              image_size=16, num_workers=0, schedule="constant", batch_size=8)
    said = tk.plan(**kw).summary()
    assert "every block's BatchNorm gamma/beta at its block's rate of this phase (10 x its group's rate below)" in said
    result = tk.finetune(**kw, verbose=False)
    first, second = (row["lr_groups"] for row in result.history)
    assert {g: first[g] / second[g] for g in first} == pytest.approx({g: 10.0 for g in first})
    assert second["stem"] == pytest.approx(next(g["lr"] for g in result.decisions.groups if g["name"] == "stem"))
