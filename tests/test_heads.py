"""Heads, tasks and losses."""

from __future__ import annotations

import math
import typing

import numpy as np
import pytest
import torch
from torch import nn

from transferkit.config import FinetuneConfig
from transferkit.errors import ConfigError
from transferkit.heads import ACTIVATIONS, FeatureNorm, TargetScale, build_head, resolve_head
from transferkit.heads import output_activation
from transferkit.train.tasks import balanced_class_weights, make_loss


@pytest.mark.parametrize("activation,cls", [("relu", nn.ReLU), ("gelu", nn.GELU), ("tanh", nn.Tanh),
                                            ("sigmoid", nn.Sigmoid)])
def test_mlp_head_layers(activation, cls):
    head = build_head(10, 3, hidden=(8, 4), activation=activation, dropout=0.2)
    kinds = [type(m) for m in head]
    assert kinds == [nn.Linear, cls, nn.Dropout, nn.Linear, cls, nn.Dropout, nn.Linear]
    assert head(torch.zeros(5, 10)).shape == (5, 3)


def test_the_config_admits_the_activations_the_head_builds():
    assert set(typing.get_args(typing.get_type_hints(FinetuneConfig)["head_activation"])) == set(ACTIVATIONS)
    with pytest.raises(ConfigError, match="unknown head_activation 'Gelu'. Did you mean 'gelu'"):
        FinetuneConfig(data="images", head_activation="Gelu")  # when the config is made, not when the run starts


def test_linear_head_and_resolution():
    assert [type(m) for m in build_head(10, 2)] == [nn.Linear]
    assert resolve_head(None) == ("linear", ())
    assert resolve_head("mlp", (32,)) == ("mlp", (32,))
    with pytest.raises(ConfigError, match="head_hidden"):
        resolve_head("linear", (8,))
    with pytest.raises(ConfigError, match="Did you mean 'mlp'"):
        resolve_head("mlpp")
    with pytest.raises(ConfigError, match="dropout"):
        build_head(4, 2, dropout=1.5)


def test_a_regression_head_on_standardised_targets():
    """The head ends in a TargetScale; the standardised loss's gradient reaches the linear layer
    as plain MSE on (y - mean) / std would; a constant output (std 0, or tiny beside its mean)
    is only centred."""
    torch.manual_seed(0)
    head = build_head(4, 2, target_norm=True)
    assert [type(m) for m in head] == [nn.Linear, TargetScale]
    mean, std = torch.tensor([5000.0, -3.0]), torch.tensor([300.0, 0.5])
    head[-1].set_stats(mean, std)
    x, y = torch.randn(8, 4), torch.randn(8, 2) * std + mean
    make_loss("regression", target_std=head[-1].std)(head(x), y).backward()
    scaled = head[0].weight.grad.clone()
    head.zero_grad()
    nn.functional.mse_loss(head[0](x), (y - mean) / std).backward()
    assert torch.allclose(scaled, head[0].weight.grad, atol=1e-5)
    head[-1].set_stats(torch.tensor([5000.0, 2.0]), torch.tensor([1e-3, 0.0]))
    assert head[-1].std.tolist() == [1.0, 1.0]


def test_losses_per_task():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1])
    plain = make_loss("multiclass")(logits, y)
    smooth = make_loss("multiclass", label_smoothing=0.2)(logits, y)
    assert smooth > plain  # smoothing penalises confident correct predictions
    weighted = make_loss("multiclass", class_weights=[0.0, 1.0])(logits, y)
    assert torch.isclose(weighted, nn.functional.cross_entropy(logits[1:], y[1:]))
    # a batch of classes that all weigh 0: no loss and no gradient (torch's mean is 0 / 0 = NaN)
    for smoothing in (0.0, 0.1):
        zeros = logits.clone().requires_grad_()
        loss = make_loss("multiclass", class_weights=[0.0, 1.0, 0.0], label_smoothing=smoothing)(
            torch.cat([zeros, zeros[:, :1]], 1), torch.tensor([0, 2]))
        loss.backward()
        assert float(loss) == 0.0 and not zeros.grad.any()
    mh = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert torch.isclose(make_loss("multilabel")(logits, mh), nn.functional.binary_cross_entropy_with_logits(logits, mh))
    assert torch.isclose(make_loss("regression")(logits, mh), ((logits - mh) ** 2).mean())
    with pytest.raises(ConfigError, match="label_smoothing"):
        make_loss("regression", label_smoothing=0.1)
    with pytest.raises(ConfigError, match="Unknown task"):
        make_loss("segmentation")


def test_output_activation_and_balanced_weights():
    z = torch.tensor([[0.0, 0.0]])
    assert torch.allclose(output_activation("multiclass", z), torch.tensor([[0.5, 0.5]]))
    assert torch.allclose(output_activation("multilabel", z), torch.tensor([[0.5, 0.5]]))
    assert torch.equal(output_activation("regression", z), z)
    assert balanced_class_weights([0, 0, 0, 1], 2) == [4 / 6, 2.0]


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_classification_metrics_match_scikit_learn():
    from sklearn import metrics as skm

    from transferkit.train.metrics import classification_metrics

    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(60, 4)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, 3, 60))  # class 3 never occurs: zero support
    m = classification_metrics(logits, labels, ["a", "b", "c", "d"], top_k=2)
    y, p = labels.numpy(), logits.argmax(1).numpy()
    ref = skm.classification_report(y, p, labels=[0, 1, 2, 3], target_names=list("abcd"), output_dict=True,
                                    zero_division=0)
    for k in "abcd":
        for field in ("precision", "recall", "f1-score", "support"):
            assert m["per_class"][k][field] == pytest.approx(ref[k][field])
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, p, labels=[0, 1, 2, 3], average="macro", zero_division=0))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, p))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, p, labels=[0, 1, 2, 3]).tolist()
    assert m["top2_accuracy"] == pytest.approx(skm.top_k_accuracy_score(y, logits.numpy(), k=2, labels=[0, 1, 2, 3]))
    # a class the data lack and that is never predicted keeps its row of zeros but is left out of the macro
    # averages, as scikit-learn leaves out labels absent from both
    logits[:, 3] = -100.0
    m = classification_metrics(logits, labels, ["a", "b", "c", "d"])
    y, p = labels.numpy(), logits.argmax(1).numpy()
    assert m["per_class"]["d"]["support"] == 0 and m["per_class"]["d"]["f1-score"] == 0
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, p, average="macro", zero_division=0))
    assert m["per_class"]["macro avg"]["recall"] == pytest.approx(skm.recall_score(y, p, average="macro"))


def test_top_k_accuracy_takes_equal_logits_in_class_order_as_the_accuracy_does():
    """With equal logits the accuracy (argmax: the first class) was 1.0 and the top-2 accuracy
    (topk: any order) 0.0; it is never below the accuracy now, and averaged in float64."""
    from transferkit.train.metrics import classification_metrics, top_k_accuracy

    m = classification_metrics(torch.tensor([[1.0, 1, 1, 0]] * 4), torch.zeros(4, dtype=torch.long), list("abcd"),
                               top_k=2)
    assert m["accuracy"] == m["top2_accuracy"] == 1.0
    assert top_k_accuracy(torch.eye(7)[[0, 1, 2, 3, 4, 5, 0]] * 9, torch.arange(7), 1) == 6 / 7  # exactly


def test_multilabel_macro_averages_leave_out_a_label_absent_from_targets_and_predictions():
    """As for classes: a label never positive in the data and never predicted has no F1; counted
    as 0 it gave a perfect model a macro F1 of 0.667."""
    import sklearn.metrics as skm

    from transferkit.train.metrics import multilabel_metrics

    t = torch.tensor([[1.0, 0, 0], [0, 1, 0], [1, 1, 0], [0, 1, 0]])
    m = multilabel_metrics(t * 10 - 5, t, ["a", "b", "never"])
    assert m["macro_f1"] == m["per_class"]["macro avg"]["f1-score"] == 1.0 and m["per_class"]["never"]["f1-score"] == 0
    wrong = t * 10 - 5
    wrong[0, 2] = 5.0  # "never" predicted once: it counts, with F1 0
    y, p = t.numpy().astype(int), (wrong > 0).numpy().astype(int)
    m = multilabel_metrics(wrong, t, ["a", "b", "never"])
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, p, average="macro", zero_division=0)) == pytest.approx(2 / 3)
    for width in (1, 3):  # no label in the data nor in the predictions: no F1 (it was 0 for a perfect model)
        none = multilabel_metrics(torch.full((6, width), -5.0), torch.zeros(6, width), ["a", "b", "c"][:width])
        assert math.isnan(none["micro_f1"]) and math.isnan(none["macro_f1"]) and none["label_accuracy"] == 1.0


def test_multilabel_metrics_read_soft_targets_by_their_side_of_one_half():
    from transferkit.train.metrics import multilabel_metrics
    from transferkit.train.tasks import count_correct

    targets = torch.tensor([[0.9, 0.1], [0.1, 0.8], [0.9, 0.9]])
    logits = torch.tensor([[2.0, -1.0], [-3.0, 1.0], [1.0, 0.5]])  # right about every label
    m = multilabel_metrics(logits, targets, ["a", "b"])
    assert m["subset_accuracy"] == m["label_accuracy"] == m["micro_f1"] == m["macro_f1"] == 1.0
    assert count_correct("multilabel", logits, targets) == 3.0
    n = 100_000  # summed in float64: a float32 sum of n thirds is 0.0065 off
    thirds = count_correct("multilabel", torch.tensor([[1.0, -1.0, -1.0]]).repeat(n, 1), torch.ones(n, 3))
    assert thirds == pytest.approx(n / 3, rel=1e-12)
    one = multilabel_metrics(logits[:, :1], targets[:, :1], ["a"])  # one label: its positives, not a binary pair
    assert one["micro_f1"] == one["macro_f1"] == 1.0 and set(one["per_class"]) >= {"a"}


def test_training_s_multilabel_metrics_give_a_label_where_the_predictor_does():
    """A logit of 0, or one a little below that float32's sigmoid rounds to 0.5, is given by the
    predictor (probability >= 0.5) and was not by training's metrics (logits > 0): subset
    accuracy 0.0 in training, 1.0 from evaluate on the same outputs."""
    from transferkit.evaluation import TargetEvaluation
    from transferkit.train.metrics import multilabel_metrics
    from transferkit.train.tasks import count_correct

    logits = torch.tensor([[0.0, -2e-8, -5.0], [0.0, -1e-3, 3.0]])
    targets = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    probabilities = torch.sigmoid(logits)  # what an exported model gives the predictor
    assert probabilities[0, 1] == 0.5 and probabilities[1, 1] < 0.5
    m = multilabel_metrics(logits, targets, ["a", "b", "c"])
    assert m["subset_accuracy"] == m["label_accuracy"] == m["micro_f1"] == 1.0
    assert count_correct("multilabel", logits, targets) == 2.0
    scored = TargetEvaluation(task="multilabel", classes=["a", "b", "c"], files=["x", "y"],
                              targets=targets.numpy(), outputs=probabilities.numpy())
    assert scored.metrics["subset_accuracy"] == m["subset_accuracy"]


def test_r2_averages_the_outputs_whose_targets_vary():
    from transferkit.train.metrics import regression_metrics

    y = torch.tensor([[1.0, 7.0], [2.0, 7.0], [3.0, 7.0]])
    p = torch.tensor([[1.0, 6.0], [2.0, 6.5], [3.0, 7.2]])
    assert regression_metrics(p, y)["r2"] == pytest.approx(1.0)  # the constant output's R^2 is undefined
    assert np.isnan(regression_metrics(p[:, 1:], y[:, 1:])["r2"])
    tenth = torch.tensor([[1.0, 0.1], [2.0, 0.1], [3.0, 0.1], [4.0, 0.1], [5.0, 0.1], [6.0, 0.1], [7.0, 0.1]])
    m = regression_metrics(tenth + torch.tensor([0.0, 0.01]), tenth, ["y", "c"])  # 0.1: no exact float std of 0
    assert m["r2"] == 1.0 and np.isnan(m["per_output"]["c"]["r2"])
    assert m["per_output"]["c"]["mae"] == pytest.approx(0.01)


def test_a_constant_target_is_told_from_one_below_float32_resolution():
    from transferkit.train.tasks import target_scale_note, target_summary

    y = torch.stack([torch.full((20,), 0.1), 1e9 + torch.arange(20.0) * 16], 1)
    note = target_scale_note(target_summary(y), ["c", "big"], standardised=True)
    assert "outputs constant in the 20 training targets read: 'c'" in note
    assert "vary by less than float32 resolves at their magnitude: 'big'" in note and "'c' (mean 0.1" not in \
        note.split("float32 resolves")[1]


def test_a_feature_norm_divides_a_rare_feature_by_a_floor_not_its_own_tiny_std():
    """A feature active in one of a few training examples has a std far below the others';
    divided by it, a validation input where it is active gave z-scores of hundreds (the
    hymenoptera recipe on 5 images per class: a validation loss of 329)."""
    torch.manual_seed(0)
    train = torch.rand(10, 6)
    train[:, 4] = 0.0
    train[3, 4] = 1e-4  # active once, faintly
    train[:, 5] = 0.25  # constant: only centred
    norm = FeatureNorm(6)
    norm.set_stats(train.mean(0), train.std(0, unbiased=False))
    median = train[:, :4].std(0, unbiased=False).median()
    torch.testing.assert_close(norm.std[:4], train[:, :4].std(0, unbiased=False))  # the others as they are
    torch.testing.assert_close(norm.std[4], 0.01 * median)
    assert norm.std[5] == 1.0
    active = torch.cat([torch.rand(1, 4), torch.tensor([[0.05, 0.25]])], 1)  # active at validation
    assert norm(active)[0].abs().max() < 40  # was 1,500 for the rare feature
    norm.set_stats(1000 * train.mean(0), 1000 * train.std(0, unbiased=False))  # features on a large scale
    assert norm.std[5] == norm.std[4] == 10 * median  # constant: by the floor where it is above 1, as the rare one
