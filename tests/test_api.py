"""finetune() end to end: tasks, metrics and reports, early stopping, determinism, speed options."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

import transferkit as tk
from transferkit.backbones.custom import from_module
from transferkit.errors import ConfigError, DataError, TrainingError

pytestmark = pytest.mark.precision_auto  # the outcome depends on what the CPU's bf16 support decides


COMMON = dict(weights=None, image_size=16, device="cpu", num_workers=0, batch_size=8, verbose=False)


class Colours(Dataset):
    """Images whose mean red/green/blue intensities are the targets (regression) or their
    thresholds (multi-label: 'red', 'green', 'blue' present)."""

    def __init__(self, n: int, task: str, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.levels = rng.uniform(0, 1, (n, 3)).astype(np.float32)
        self.task = task

    def __len__(self) -> int:
        return len(self.levels)

    def __getitem__(self, i: int):
        img = (np.ones((12, 12, 3)) * self.levels[i] * 255).astype(np.uint8)
        target = self.levels[i] if self.task == "regression" else (self.levels[i] > 0.5).astype(np.float32)
        return img, target


def test_multiclass_metrics_and_reports(image_folder, tmp_path):
    r = tk.finetune("tk:small_cnn", data=image_folder, epochs=3, lr=1e-2, log_dir=tmp_path / "tb",
                    plots_dir=tmp_path / "plots", **COMMON)
    m = r.metrics
    assert {"val_acc", "val_loss", "accuracy", "macro_f1", "per_class", "confusion_matrix"} <= set(m)
    assert m["val_acc"] == m["accuracy"]
    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (2, 2) and cm.sum() == sum(m["per_class"][c]["support"] for c in r.classes)
    assert np.trace(cm) / cm.sum() == pytest.approx(m["accuracy"])
    assert [row["epoch"] for row in r.history] == [1, 2, 3]
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr"} <= set(r.history[0])
    for name in ("training_curves.png", "confusion_matrix.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_top_k_reported_with_many_classes(tmp_path):
    from conftest import make_image_folder

    root = make_image_folder(tmp_path / "six", classes=tuple("abcdef"), per_class=5)
    r = tk.finetune("tk:small_cnn", data=root, epochs=1, top_k=3, **COMMON)
    assert 0.0 <= r.metrics["accuracy"] <= r.metrics["top3_accuracy"] <= 1.0
    assert not [n for n in r.decisions.notes if n.startswith("top_k")]
    for task in ("multilabel", "regression"):  # a multiclass metric: said as unused
        notes = tk.plan("tk:small_cnn", data=Colours(8, task), task=task, classes=["red", "green", "blue"], top_k=3,
                        **COMMON).notes
        assert f"top_k=3 is not used: the top-k accuracy is a metric of task='multiclass', and this run's task is " \
               f"{task!r}." in notes, notes


def test_multilabel_task_trains_and_exports_sigmoid_metadata(tmp_path):
    r = tk.finetune("tk:small_cnn", data=Colours(48, "multilabel"), val_data=Colours(16, "multilabel", seed=1),
                    task="multilabel", classes=["red", "green", "blue"], policy="full", epochs=6, lr=3e-2,
                    export=tmp_path / "ml.pt", **COMMON)
    assert r.task == "multilabel" and r.classes == ["red", "green", "blue"]
    assert {"subset_accuracy", "label_accuracy", "micro_f1", "macro_f1"} <= set(r.metrics)
    assert r.metrics["label_accuracy"] > 0.6  # better than always predicting one value
    assert tk.load(r.export_path).metadata["task"] == "multilabel"


def test_regression_task_beats_predicting_the_mean():
    train, val = Colours(64, "regression"), Colours(24, "regression", seed=2)
    r = tk.finetune("tk:small_cnn", data=train, val_data=val, task="regression", policy="full", epochs=8, lr=1e-2,
                    **COMMON)
    assert "train_acc" not in r.history[0] and "val_acc" not in r.metrics
    assert r.best["epoch"] is not None and r.best["val_loss"] == min(h["val_loss"] for h in r.history)
    baseline = float(((val.levels - train.levels.mean(0)) ** 2).mean())
    assert r.metrics["mse"] < baseline


class Targets(Dataset):
    """Grey images with the given targets, to try bad ones."""

    def __init__(self, targets) -> None:
        self.targets_ = list(targets)

    def __len__(self) -> int:
        return len(self.targets_)

    def __getitem__(self, i: int):
        return np.full((12, 12, 3), 40 * (i % 5), np.uint8), self.targets_[i]


@pytest.mark.parametrize("task, targets, said", [
    ("multilabel", [[0, 1]] + [[1, 0, 1]] * 9, "item 1 has 3 values, the first training target 2"),
    ("multilabel", [[1, 0]] * 9 + [[2, 0]], r"item 9 is \[2, 0\]; task='multilabel' needs a value in \[0, 1\]"),
    ("multilabel", [[1, float("nan")]] + [[1, 0]] * 9, "item 0 holds NaN or inf"),
    ("regression", [1.0] * 5 + [float("inf")] + [2.0] * 4, "item 5 holds NaN or inf"),
    ("regression", [1.0] * 5 + ["tall"] + [2.0] * 4, "item 5 is 'tall', not numbers"),
    ("regression", [[1.0, 2.0]] * 3 + [[[1.0]]] + [[1.0, 2.0]] * 6, r"item 3 has shape \(1, 1\)"),
    ("multilabel", ["cat"] + [[1.0]] * 9, "item 0 is 'cat', not numbers: task='multilabel'"),  # the first one too
    ("regression", [1.0] * 4 + [None] + [2.0] * 5, "item 4 is None: task='regression' needs one number"),
])
def test_bad_targets_are_named_before_training(task, targets, said):
    with pytest.raises(DataError, match=said):
        tk.plan("tk:small_cnn", data=Targets(targets), task=task, val_split=0, **COMMON)


def test_numbers_written_as_text_are_targets_as_a_csv_s_are():
    r = tk.finetune("tk:small_cnn", data=Targets(["3.5", "1.25"] * 5), task="regression", epochs=1, val_split=0,
                    **COMMON)
    assert r.decisions.target_norm["mean"] == pytest.approx((2.375,))


def test_one_label_multilabel_and_soft_targets_score_by_their_side_of_one_half(tmp_path):
    # one label: scikit-learn reads a single column as binary; soft targets (0.9 / 0.1) count as 1 / 0
    levels = np.random.default_rng(0).uniform(0, 1, 40)
    data = Targets([[0.9 if v > 0.5 else 0.1] for v in levels])
    r = tk.finetune("tk:small_cnn", data=data, task="multilabel", classes=["bright"], epochs=1, val_split=0.25,
                    export=tmp_path / "one.pt", **COMMON)
    m = r.metrics
    assert set(m["per_class"]) >= {"bright"} and 0.0 <= m["micro_f1"] == m["macro_f1"] <= 1.0
    assert r.export_path.exists()
    with pytest.raises(tk.ConfigError, match=r"classes= names \['a'\] more than once"):
        tk.plan("tk:small_cnn", data=Targets([[1, 0, 1]] * 4), task="multilabel", classes=["a", "a", "b"], **COMMON)


def test_tasks_need_matching_data(image_folder):
    with pytest.raises(DataError, match="multilabel"):
        tk.finetune("tk:small_cnn", data=image_folder, task="multilabel", **COMMON)
    with pytest.raises(ConfigError, match="unknown task"):
        tk.finetune("tk:small_cnn", data=image_folder, task="detection", **COMMON)


def test_label_smoothing_and_balanced_class_weights_run(image_folder):
    r = tk.finetune("tk:small_cnn", data=image_folder, epochs=2, label_smoothing=0.1, class_weights="balanced",
                    **COMMON)
    assert len(r.history) == 2


def test_early_stopping_stops_and_restores_the_best_epoch(image_folder):
    # lr 0: nothing changes, val_acc never improves after epoch 1
    r = tk.finetune("tk:small_cnn", data=image_folder, epochs=20, lr=1e-12, early_stopping=2, **COMMON)
    assert r.stopped_early and len(r.history) == 3 and r.best["epoch"] == 1


def test_seed_gives_identical_runs_and_deterministic_mode(image_folder):
    kw = dict(data=image_folder, epochs=2, policy="full", augment="standard", seed=7, deterministic=True, **COMMON)
    try:
        a, b = tk.finetune("tk:small_cnn", **kw), tk.finetune("tk:small_cnn", **kw)
    finally:
        torch.use_deterministic_algorithms(False)
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k])
    c = tk.finetune("tk:small_cnn", **{**kw, "seed": 8, "deterministic": False})
    assert any(not torch.equal(v, c.model.state_dict()[k]) for k, v in a.model.state_dict().items())


def test_gpu_options_are_checked_on_cpu(image_folder):
    with pytest.raises(ConfigError, match="fp16"):
        tk.finetune("tk:small_cnn", data=image_folder, precision="fp16", **COMMON)
    with pytest.raises(ConfigError, match="precision"):
        tk.finetune("tk:small_cnn", data=image_folder, precision="fp8", **COMMON)


def test_cpu_bf16_autocast_trains(image_folder):
    r = tk.finetune("tk:small_cnn", data=image_folder, epochs=1, policy="full", precision="bf16", **COMMON)
    assert np.isfinite(r.history[0]["train_loss"])


def test_stopping_options_are_checked(image_folder):
    with pytest.raises(ConfigError, match="early_stopping"):
        tk.finetune("tk:small_cnn", data=image_folder, early_stopping=0, **COMMON)
    with pytest.raises(ConfigError, match="monitor"):
        tk.finetune("tk:small_cnn", data=image_folder, monitor="val_f1", **COMMON)


def test_subpackages_are_reachable_after_import_transferkit():
    """``import transferkit`` loads its names lazily; ``transferkit.export.read_metadata`` (as
    the docs write it) works in a fresh interpreter too, and an unknown name is an AttributeError."""
    import subprocess
    import sys

    code = ("import transferkit\n"
            "assert callable(transferkit.export.read_metadata) and callable(transferkit.data.load_image)\n"
            "try:\n    transferkit.no_such_name\nexcept AttributeError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "module 'transferkit' has no attribute 'no_such_name'"


def test_an_image_size_the_trunk_cannot_run_at_is_refused_before_the_data_are_read(tmp_path):
    """A model built for one input size (a ViT's position embeddings) is refused at another
    ``image_size`` with what to do, instead of failing inside the feature pass."""
    with pytest.raises(ConfigError, match=r"timm:vit_tiny_patch16_224 does not run at image_size=32: it was built for "
                                          r"224 px.*Use image_size=224.*backbone_options=\{'img_size': 32\}"):
        tk.plan(tk.FinetuneConfig(backbone="timm:vit_tiny_patch16_224", weights=None, data=str(tmp_path / "none"),
                                  image_size=32))
    bb = tk.get_backbone("timm:vit_tiny_patch16_224", weights=None, img_size=32)  # built at that size: it runs
    assert bb.input_spec.image_size == 32
    former = dict(backbone="timm:efficientformer_l1", weights=None, data=str(tmp_path / "none"), image_size=64)
    with pytest.raises(ConfigError, match=r"Use image_size=224, or choose a backbone that takes 64 px \(its class "
                                          r"takes img_size=, but built with img_size=64 it does not run at 64 px "
                                          r"either\)"):
        tk.plan(tk.FinetuneConfig(**former))  # its attention biases stay at 224 px: the option was advised in vain
    with pytest.raises(ConfigError, match=r"built with backbone_options=\{'img_size': 64\} does not run at 64 px "
                                          r"\(RuntimeError: .*Leave img_size out"):  # (was: a raw traceback)
        tk.plan(tk.FinetuneConfig(**former, backbone_options={"img_size": 64}))
    with pytest.raises(ConfigError, match=r"or build it at that size \(backbone_options=\{'img_size': 64\}\)"):
        tk.plan(tk.FinetuneConfig(**{**former, "backbone": "timm:levit_128s"}))  # (was: "takes no input size")
    tv = dict(backbone="tv:vit_b_32", data=str(tmp_path / "none"), image_size=64)
    with pytest.raises(ConfigError, match=r"Use image_size=224, or build it .*backbone_options=\{'image_size': 64\}"):
        tk.plan(tk.FinetuneConfig(weights=None, **tv))
    with pytest.raises(ConfigError, match=r"Use image_size=224, or weights=None to train it from scratch at 64 px "
                                          r"\(backbone_options=\{'image_size': 64\}\): torchvision's weights"):
        tk.plan(tk.FinetuneConfig(weights="DEFAULT", **tv))  # the builder refuses another size with its weights
    with pytest.raises(ConfigError, match=r"cannot be built with the options .*'image_size': 64"):
        tk.get_backbone("tv:vit_b_32", weights="DEFAULT", image_size=64)  # (what that advice avoids)
    with pytest.raises(ConfigError, match=r"Use image_size=224, or choose a backbone that takes 16 px \(the class "
                                          r"AlexNet takes no input size\)\.$"):
        tk.plan(tk.FinetuneConfig(backbone="tv:alexnet", weights=None, data=str(tmp_path / "none"), image_size=16))
    fixed = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3, stride=2), torch.nn.Flatten(), torch.nn.Linear(2 * 7 * 7, 4))
    own = from_module(fixed, input_spec={"image_size": 16})  # its Linear takes 16 px inputs only
    with pytest.raises(ConfigError, match=r"Use image_size=16, or pass a Backbone built for 32 px\."):
        tk.plan(tk.FinetuneConfig(backbone=own, data=str(tmp_path / "none"), image_size=32))


def test_a_trunk_for_other_than_rgb_images_is_refused_before_the_data_are_read(tmp_path):
    """timm's in_chans=1 was blamed on the image size (advice that led to a raw RuntimeError at
    the first batch): the channels are named, at the trunk's own size too."""
    for size in (32, 224):
        with pytest.raises(ConfigError, match=r"^timm:resnet18 takes 1-channel images \(backbone_options="
                                              r"\{'in_chans': 1\}\): its first convolution 'conv1' has in_channels=1, "
                                              r"and transferkit feeds 3-channel RGB images .* Build it for 3 channels, "
                                              r"leaving in_chans out\.$"):
            tk.plan(tk.FinetuneConfig(backbone="timm:resnet18", weights=None, backbone_options={"in_chans": 1},
                                      data=str(tmp_path / "none"), image_size=size))
    from transferkit.facts import check_channels

    class Aside(torch.nn.Module):  # its first convolution is not where the images go in: it runs, and is not refused
        def __init__(self):
            super().__init__()
            self.mask = torch.nn.Conv2d(1, 1, 1)
            self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

        def forward(self, x):
            return self.body(x)

    own = from_module(Aside(), input_spec={"image_size": 16})
    check_channels(own, own.input_spec)
    fixed = Aside()  # at a size it does not take it fails for the size, and the size is what is said
    fixed.body.append(torch.nn.Linear(16, 2))
    fixed.body[0] = torch.nn.Conv2d(3, 4, 3, stride=7)
    fixed.body[1] = torch.nn.Flatten()
    own = from_module(fixed, input_spec={"image_size": 16})  # 16 px: 2x2x4 = 16 features for the Linear; 32 px: 100
    with pytest.raises(ConfigError, match=r"does not run at image_size=32: it was built for 16 px"):
        tk.plan(tk.FinetuneConfig(backbone=own, data=str(tmp_path / "none"), image_size=32))


def test_an_image_size_too_large_for_the_memory_is_said_as_such(tmp_path):
    """image_size=100000 on a ResNet failed the size check with "can't allocate memory", and the
    error blamed the architecture ("choose a backbone that takes 100000 px")."""
    from transferkit.backbones.custom import from_module

    class Hungry(torch.nn.Module):  # what torch's CPU allocator says of an image too large for the machine
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
                                            torch.nn.Flatten())

        def forward(self, x):
            if x.shape[-1] > 64:
                raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                                   "allocate memory: you tried to allocate 120000000000 bytes.")
            return self.body(x)

    own = from_module(Hungry(), input_spec={"image_size": 16})
    with pytest.raises(ConfigError, match=r"image_size=100000 is too large to run .* here: one image of 100000 x "
                                          r"100000 px does not fit in memory .*e\.g\. image_size=16, the size it "
                                          r"was built for"):
        tk.plan(tk.FinetuneConfig(backbone=own, data=str(tmp_path / "none"), image_size=100000))


def test_a_bad_target_past_the_ones_read_before_training_is_named_when_loaded(monkeypatch):
    import transferkit.train.tasks as tasks

    monkeypatch.setattr(tasks, "TARGETS_CHECKED", 2)  # items 0 and 9 are read before training; item 4 is not
    data = Targets([[1.0, 0.0]] * 4 + [[1.0, 7.0]] + [[0.0, 1.0]] * 5)
    tk.plan("tk:small_cnn", data=data, task="multilabel", val_split=0, **COMMON)
    with pytest.raises(DataError, match=r"The target of training item 4 is \[1.0, 7.0\]"):
        tk.finetune("tk:small_cnn", data=data, task="multilabel", val_split=0, epochs=1, policy="full", **COMMON)


def test_a_target_beyond_float32_is_said_to_be_so_not_nan_or_inf():
    """1e39 in a Dataset was "holds NaN or inf (1e+39)", after numpy's raw overflow warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(DataError, match=r"The target of training item 1 \(1e\+39\) is beyond float32's range "
                                            r"\(\+-3.403e\+38: targets are read as float32\); rescale the targets"):
            tk.plan("tk:small_cnn", data=Targets([1.0, 1e39] + [2.0] * 8), task="regression", val_split=0, **COMMON)
        with pytest.raises(DataError, match=r"holds NaN or inf \(inf\)"):
            tk.plan("tk:small_cnn", data=Targets([1.0, float("inf")] + [2.0] * 8), task="regression", val_split=0,
                    **COMMON)


def test_regression_targets_far_from_unit_scale_are_noted_only_when_not_standardised():
    levels = np.random.default_rng(0).uniform(0, 1, 20)
    for targets in (levels.tolist(), (levels * 1000 + 5000).tolist()):  # in [0, 1], or standardised: nothing
        assert tk.plan("tk:small_cnn", data=Targets(targets), task="regression", **COMMON).notes == ()
    for targets, said in (((levels + 1000).tolist(), r"'0' \(mean 1e\+03, std 0.3"),
                          ((levels * 1000).tolist(), r"'0' \(mean 523, std 340\)")):
        d = tk.plan("tk:small_cnn", data=Targets(targets), task="regression", target_norm=False, **COMMON)
        assert re.search(rf"far from mean 0 and std 1: .*{said}.*target_norm=False.*Leave target_norm='auto'",
                         " ".join(d.notes))
    one = tk.plan("tk:small_cnn", data=Targets([5.0]), val_data=Targets([5.0]), task="regression", **COMMON)
    assert any(n.startswith("One training target: a regression run learns nothing") for n in one.notes), one.notes
    for target_norm in ("auto", False):  # a constant output is said either way
        d = tk.plan("tk:small_cnn", data=Targets([5.0] * 20), task="regression", target_norm=target_norm, **COMMON)
        assert re.search(r"outputs constant in the 16 training targets read: '0' \(mean 5, std 0\)", " ".join(d.notes))
    with pytest.warns(UserWarning, match="far from mean 0 and std 1"):  # finetune says its notes as warnings
        tk.finetune("tk:small_cnn", data=Targets((levels * 1000).tolist()), task="regression", target_norm=False,
                    epochs=1, **COMMON)
    # targets whose squared error float32 cannot hold: no learning rate helps (the error blamed the rate, at 1e-9)
    overflow = r"the targets reach 1.*e\+30, and their squared error is beyond float32's range .*target_norm='auto'"
    with pytest.warns(UserWarning), pytest.raises(TrainingError, match=overflow):
        tk.finetune("tk:small_cnn", data=Targets((levels * 1e30 + 1e30).tolist()), task="regression",
                    target_norm=False, epochs=1, lr=1e-9, policy="full", **COMMON)
    with pytest.raises(TrainingError) as info:  # standardised: the same targets overflow nothing; the rate does
        tk.finetune("tk:small_cnn", data=Targets((levels * 1e30 + 1e30).tolist()), task="regression",
                    epochs=1, lr=1e30, policy="full", **COMMON)
    assert "learning rate" in str(info.value) and "the targets reach" not in str(info.value)


class Scaled(Colours):
    """`Colours` regression targets in other units: ``level * scale + offset``."""

    def __init__(self, n: int, seed: int = 0, scale: float = 1000.0, offset: float = 5000.0, outputs: int = 3) -> None:
        super().__init__(n, "regression", seed)
        self.scale, self.offset, self.outputs = scale, offset, outputs

    def __getitem__(self, i: int):
        img, target = super().__getitem__(i)
        return img, target[:self.outputs] * self.scale + self.offset


def test_regression_trains_on_standardised_targets_and_predicts_in_their_units(tmp_path):
    """Targets of mean ~5500 and std ~300: with target_norm='auto' the head learns
    (y - mean) / std and a TargetScale gives the values back, in the model, its checkpoint and
    its export; with target_norm=False the same run does not learn them."""
    from transferkit.export.from_checkpoint import model_from_checkpoint

    train, val = Scaled(64), Scaled(24, seed=2)
    kw = dict(data=train, val_data=val, task="regression", policy="full", epochs=8, lr=1e-2, **COMMON)
    r = tk.finetune("tk:small_cnn", checkpoint=tmp_path / "c.pt", export=tmp_path / "m.pt", **kw)
    y = np.stack([train[i][1] for i in range(len(train))])
    scale = r.model.head[-1]
    assert isinstance(scale, tk.TargetScale)
    assert np.allclose(scale.mean.numpy(), y.mean(0)) and np.allclose(scale.std.numpy(), y.std(0, ddof=1))
    assert r.decisions.to_dict()["head"]["target_norm"] is True
    assert r.metrics["r2"] > 0.5
    x = torch.from_numpy(np.stack([val[i][0] for i in range(8)])).permute(0, 3, 1, 2)
    x = torch.nn.functional.interpolate(x.float(), size=16).round().to(torch.uint8)  # the model's 16 px input
    r.model.eval()
    with torch.no_grad():
        eager = r.model(x)
        rebuilt, _ = model_from_checkpoint(tmp_path / "c.pt")
        assert torch.allclose(rebuilt(x), eager)
        assert torch.allclose(torch.jit.load(str(r.export_path))(x), eager, rtol=1e-5)
    assert float(eager.mean()) > 4000  # values in the targets' units, not standardised ones
    predicted = tk.load(r.export_path).predict([val[i][0] for i in range(8)])
    assert all(4000 < v < 7000 for p in predicted for v in p.values.values())

    with pytest.warns(UserWarning, match="far from mean 0 and std 1"):
        plain = tk.finetune("tk:small_cnn", target_norm=False, **kw)
    assert not any(isinstance(m, tk.TargetScale) for m in plain.model.modules())
    assert plain.metrics["r2"] < 0


def test_the_regression_loss_is_the_mean_squared_error_of_standardised_targets():
    """val_loss (what picks the best epoch) is MSE / std^2 of the training targets: about 1 - R^2."""
    one = Scaled(40, outputs=1)
    r = tk.finetune("tk:small_cnn", data=one, val_data=Scaled(16, seed=3, outputs=1), task="regression",
                    policy="full", epochs=2, **COMMON)
    std = float(r.model.head[-1].std)
    assert std > 100 and r.metrics["val_loss"] == pytest.approx(r.metrics["mse"] / std ** 2, rel=1e-3)


def test_target_statistics_come_from_the_training_targets_alone():
    train, val = Scaled(40), Scaled(20, seed=1, scale=10.0, offset=-900.0)
    d = tk.plan("tk:small_cnn", data=train, val_data=val, task="regression", **COMMON)
    y = np.stack([train[i][1] for i in range(len(train))])
    assert np.allclose(d.target_norm["mean"], y.mean(0)) and d.target_norm["n"] == 40
    split = tk.plan("tk:small_cnn", data=train, val_split=0.25, task="regression", **COMMON)
    assert split.target_norm["n"] == 30 and "from 30 training targets" in split.summary()
    assert "standardised in training" in split.summary()


def test_target_norm_applies_to_regression_only(image_folder):
    with pytest.raises(ConfigError, match="target_norm=True applies to task='regression' only"):
        tk.plan("tk:small_cnn", data=image_folder, target_norm=True, **COMMON)
    d = tk.plan("tk:small_cnn", data=image_folder, **COMMON)
    assert d.target_norm is None and "targets:" not in d.summary()
    off = tk.plan("tk:small_cnn", data=Scaled(20), task="regression", target_norm=False, **COMMON)
    assert off.target_norm is None and "in their own units (target_norm=False)" in off.summary()




def test_balanced_multilabel_weights_leave_a_constant_label_alone_and_it_is_named():
    """pos_weight = negatives / positives, except for a label always (ratio 0: its loss switched
    off) or never (ratio N: an inflated loss) present in training, which keeps 1."""
    targets = [[1, int(i < 3), 0] for i in range(10)]
    with pytest.warns(UserWarning, match=r"always present: \['a'\]; never present: \['c'\]"):
        d = tk.plan("tk:small_cnn", data=Targets(targets), task="multilabel", classes=["a", "b", "c"],
                    class_weights="balanced", val_split=0, **COMMON)
    assert d.class_weights == (1.0, float(np.float32(7) / np.float32(3)), 1.0)  # float32, as records hold them
    rare = [[int(i == 2)] for i in range(1500)]  # more than the targets read before training: no warning from some
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tk.plan("tk:small_cnn", data=Targets(rare), task="multilabel", val_split=0, **COMMON)
