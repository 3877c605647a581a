"""Heads: the new layers put on top of a backbone's pooled features."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from transferkit.errors import ConfigError, check_choice

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


TASKS = ("multiclass", "multilabel", "regression")
OUTPUT_ACTIVATION = {"multiclass": "softmax", "multilabel": "sigmoid", "regression": "identity"}
# an output whose std is at most this share of its mean is constant to float32 precision (targets are read as float32)
CONSTANT_RTOL = 1e-6
# the least std a FeatureNorm divides a feature by, as a share of the median feature's: a feature
# active in one or two of a small training set's examples has a std far below the others', and
# validation inputs where it is active gave z-scores of hundreds (a validation loss of 329)
STD_FLOOR = 0.01


def centred_only(mean: Any, std: Any, rtol: float = CONSTANT_RTOL) -> Any:
    """Whether an output of these statistics (numbers or tensors) is constant, to float32
    precision: a [`TargetScale`][transferkit.TargetScale] only centres it.

    Example:
        >>> centred_only(1e9, 35.0), centred_only(5e-10, 3e-10), centred_only(0.1, 1e-17)
        (True, False, True)
    """
    return std <= rtol * abs(mean)


def output_activation(task: str, logits: torch.Tensor) -> torch.Tensor:
    """Softmax, sigmoid or identity: what a head's logits mean for ``task``."""
    if task == "multiclass":
        return torch.softmax(logits.float(), dim=1)
    if task == "multilabel":
        return torch.sigmoid(logits.float())
    return logits.float()


def labels_given(probabilities: Any, threshold: float = 0.5) -> Any:
    """Multilabel: which labels a model gives, a probability (float32, as an exported model's
    sigmoid gives it) at or above ``threshold``; a tensor or an array of booleans. Training's
    metrics, the predictor and `evaluate` read labels by it (training's ``logits > 0`` left
    out a logit of 0, or one a little below that rounds to 0.5, which the predictor gives)."""
    return probabilities >= threshold


class _FixedStats(nn.Module):
    """A mean and a standard deviation per channel, as buffers (saved, exported, never
    trained): the identity until ``set_stats`` fills them in."""

    what = "features"

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("std", torch.ones(n))

    @staticmethod
    def constant(mean: torch.Tensor, std: torch.Tensor, eps: float) -> torch.Tensor:
        """Which channels count as constant (their std is replaced by 1: only centred)."""
        return std < eps

    def set_stats(self, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-6) -> None:
        """Copy ``mean`` and ``std`` in (a constant channel, see `constant`, is only centred;
        ``eps``: `CONSTANT_RTOL` for a TargetScale, an absolute floor for a FeatureNorm)."""
        if mean.shape != self.mean.shape or std.shape != self.std.shape:
            raise ConfigError(f"{type(self).__name__} has {self.mean.numel()} {self.what}; got statistics of shapes "
                              f"{tuple(mean.shape)} and {tuple(std.shape)}.")
        with torch.no_grad():
            self.mean.copy_(mean)
            self.std.copy_(torch.where(self.constant(mean, std, eps), torch.ones_like(std), std))

    def extra_repr(self) -> str:
        return str(self.mean.numel())


class FeatureNorm(_FixedStats):
    """``(x - mean) / std`` with fixed statistics (buffers, not trained): the first layer of a
    head trained on cached features, so that it trains on standardised features (every
    feature on the same scale: one learning rate and one weight decay suit them all).
    ``set_stats`` fills in the training features' statistics (a feature with ``std < eps``,
    constant, is centred and divided by 1, or by the floor where that is above 1; another is
    divided by at least the floor, `STD_FLOOR` times the median feature's std); until then it
    is the identity.

    Example:
        >>> norm = FeatureNorm(2)
        >>> norm.set_stats(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0]))
        >>> norm(torch.tensor([[3.0, 2.0]]))
        tensor([[1., 0.]])
    """

    def set_stats(self, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-6) -> None:
        varying = std >= eps
        floor = STD_FLOOR * float(std[varying].median()) if bool(varying.any()) else 0.0
        # a constant feature is divided by 1, or by the floor where that is larger (features on a large
        # scale): so never by less than a near-constant feature is
        super().set_stats(mean, torch.where(varying, std.clamp_min(floor), torch.full_like(std, max(1.0, floor))), eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class TargetScale(_FixedStats):
    """``z * std + mean`` with fixed statistics (buffers, not trained): the last layer of a
    regression head trained on standardised targets. The layers before it learn
    ``(y - mean) / std`` (every output on the scale of its initialisation and of the loss), and
    the model outputs values in the targets' own units: in training, evaluation, checkpoints
    and exports alike. ``set_stats`` fills in the training targets' statistics (an output
    whose std is 0, or at most ``eps`` times its mean, constant to float32 precision, is only
    centred); until then it is the identity.

    Example:
        >>> scale = TargetScale(2)
        >>> scale.set_stats(torch.tensor([100.0, 0.0]), torch.tensor([10.0, 2.0]))
        >>> scale(torch.tensor([[1.0, -1.0]]))
        tensor([[110.,  -2.]])
    """

    what = "outputs"

    @staticmethod
    def constant(mean: torch.Tensor, std: torch.Tensor, eps: float) -> torch.Tensor:
        return centred_only(mean, std, eps)  # 0, or below what float32 resolves at the mean's magnitude

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std + self.mean


def build_head(num_features: int, num_outputs: int, *, hidden: Sequence[int] = (), activation: str = "relu",
               dropout: float = 0.0, norm: bool = False, target_norm: bool = False) -> nn.Sequential:
    """A linear head, or an MLP with ``hidden`` layer widths, ending in ``num_outputs`` logits;
    ``norm=True`` starts it with a [`FeatureNorm`][transferkit.FeatureNorm], ``target_norm=True``
    ends it with a [`TargetScale`][transferkit.TargetScale] (regression on standardised targets).

    Example:
        >>> build_head(512, 2)
        Sequential(
          (0): Linear(in_features=512, out_features=2, bias=True)
        )
    """
    check_choice("activation", activation, ACTIVATIONS)
    if not 0.0 <= float(dropout) < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}.")
    if num_outputs < 1 or num_features < 1:
        raise ConfigError(f"A head needs num_features >= 1 and num_outputs >= 1, got {num_features}, {num_outputs}.")
    layers: list[nn.Module] = [FeatureNorm(num_features)] if norm else []
    width = num_features
    for h in hidden:
        if int(h) < 1:
            raise ConfigError(f"Hidden layer widths must be positive integers, got {list(hidden)}.")
        layers += [nn.Linear(width, int(h)), ACTIVATIONS[activation]()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = int(h)
    if dropout and not hidden:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(width, num_outputs))
    if target_norm:
        layers.append(TargetScale(num_outputs))
    return nn.Sequential(*layers)


HEADS = ("linear", "mlp", "logistic")
DEFAULT_MLP_HIDDEN = (256,)


def resolve_head(head: str | None, hidden: Sequence[int] = ()) -> tuple[str, tuple[int, ...]]:
    """The head kind and its hidden widths from ``finetune``'s ``head`` and ``head_hidden``.

    ``None``: ``"mlp"`` when ``hidden`` is given, else ``"linear"``. ``"mlp"`` without widths
    gets one hidden layer of 256. ``"logistic"``: a linear head fitted by scikit-learn's
    logistic regression on cached features (see `transferkit.train.probe`).

    Example:
        >>> resolve_head(None, (128,))
        ('mlp', (128,))
        >>> resolve_head("mlp")
        ('mlp', (256,))
    """
    hidden = tuple(int(h) for h in hidden)
    if head is None:
        return ("mlp" if hidden else "linear"), hidden
    check_choice("head", head, HEADS)
    if head != "mlp" and hidden:
        raise ConfigError(f"head={head!r} takes no head_hidden (got {list(hidden)}); use head='mlp'.")
    return head, (hidden or DEFAULT_MLP_HIDDEN) if head == "mlp" else ()


def resolve_head_norm(head_norm: bool | str, *, cached: bool, head_kind: str, cached_first: bool = False,
                      pretrained: bool = True) -> bool:
    """``head_norm="auto"``: a FeatureNorm when the head trains by gradient on cached features
    (their statistics are then exact and free): ``cached`` for the whole run, or
    ``cached_first`` (a first phase, then the backbone trains: ``fine_tune``) from
    ``pretrained`` weights, whose features move little against their spread once the trunk
    trains. A trunk of random weights changes the scale of its features by orders of magnitude
    when it trains, and features standardised by their first statistics then blow up.
    ``True`` asks for it and needs cached features.

    Example:
        >>> resolve_head_norm("auto", cached=False, cached_first=True, pretrained=False, head_kind="linear")
        False
    """
    if head_norm not in (True, False, "auto"):
        raise ConfigError(f"head_norm must be True, False or 'auto', got {head_norm!r}.")
    fixed = cached or cached_first
    if head_norm is True and (not fixed or head_kind == "logistic"):
        why = "head='logistic' standardises the features itself" if head_kind == "logistic" else \
            "its statistics come from cached features, which this run does not compute: they need a frozen " \
            "backbone (policy='feature_extraction', or 'fine_tune' for its frozen phase) and cache_features not False"
        raise ConfigError(f"head_norm=True cannot be used here: {why}.")
    if head_kind == "logistic" or head_norm is False:
        return False
    return head_norm is True or cached or (cached_first and pretrained)


def resolve_target_norm(target_norm: bool | str, *, task: str) -> bool:
    """``target_norm="auto"``: regression trains on standardised targets (a
    [`TargetScale`][transferkit.TargetScale] ends the head); ``True`` asks for it and needs
    ``task="regression"``; ``False``: the head and the loss work in the targets' units."""
    if target_norm not in (True, False, "auto"):
        raise ConfigError(f"target_norm must be True, False or 'auto', got {target_norm!r}.")
    if target_norm is True and task != "regression":
        raise ConfigError(f"target_norm=True applies to task='regression' only (its targets are values); "
                          f"task={task!r} has labels.")
    return task == "regression" and target_norm in (True, "auto")
