"""Validation metrics per task, from logits and targets (NumPy for multiclass, scikit-learn for the rest)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from transferkit.heads import labels_given, output_activation
from transferkit.train.loop import evaluate
from transferkit.train.speed import SpeedConfig

def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of samples whose label is among the ``k`` highest logits (of equal logits, the
    first class first, as the accuracy's argmax takes it: never below the accuracy).

    Example:
        >>> top_k_accuracy(torch.tensor([[0.1, 0.5, 0.4]]), torch.tensor([2]), 2)
        1.0
    """
    k = min(k, logits.shape[1])
    top = logits.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return float((top == labels.view(-1, 1)).any(1).double().mean().item())


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """``[true, predicted]`` counts (scikit-learn's layout).

    Example:
        >>> confusion_matrix(np.array([0, 1, 1]), np.array([0, 0, 1]), 2).tolist()
        [[1, 0], [1, 1]]
    """
    return np.bincount(labels * num_classes + preds, minlength=num_classes**2).reshape(num_classes, num_classes)


def classification_report(cm: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Per-class precision, recall, F1 and support, plus accuracy and macro/weighted averages,
    from a confusion matrix; the same numbers and keys as scikit-learn's
    ``classification_report(..., output_dict=True, zero_division=0)`` (computed with NumPy: importing
    scikit-learn costs seconds, more than training a head on cached features). As there, the
    macro averages are over the classes that occur in the labels or the predictions: a class
    of the model that the evaluated data lack and that is never predicted has a row of zeros
    but does not count in them."""
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(1).astype(np.float64)
    predicted = cm.sum(0).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    out: dict[str, Any] = {c: {"precision": float(p), "recall": float(r), "f1-score": float(f), "support": float(n)}
                           for c, p, r, f, n in zip(classes, precision, recall, f1, support)}
    total = support.sum()
    out["accuracy"] = float(tp.sum() / total) if total else 0.0
    seen = (support > 0) | (predicted > 0)
    seen = seen if seen.any() else np.ones_like(seen)
    out["macro avg"] = {"precision": float(precision[seen].mean()), "recall": float(recall[seen].mean()),
                        "f1-score": float(f1[seen].mean()), "support": float(total)}
    w = support / total if total else np.zeros_like(support)
    out["weighted avg"] = {"precision": float(precision @ w), "recall": float(recall @ w), "f1-score": float(f1 @ w),
                           "support": float(total)}
    return out


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], *,
                           top_k: int = 5) -> dict[str, Any]:
    """Accuracy, top-k accuracy (when there are more than ``top_k`` classes), macro F1,
    balanced accuracy (mean recall over the classes present), the per-class report and the
    confusion matrix."""
    y, p = labels.numpy().astype(np.int64), logits.argmax(1).numpy().astype(np.int64)
    cm = confusion_matrix(y, p, len(classes))
    report = classification_report(cm, classes)
    present = cm.sum(1) > 0
    recalls = np.diag(cm)[present] / cm.sum(1)[present]
    out: dict[str, Any] = {
        "accuracy": float((p == y).mean()) if len(y) else 0.0,
        "macro_f1": report["macro avg"]["f1-score"],
        "balanced_accuracy": float(recalls.mean()) if len(recalls) else 0.0,
        "per_class": report,
        "confusion_matrix": cm.tolist(),
    }
    if len(classes) > top_k > 1:
        out[f"top{top_k}_accuracy"] = top_k_accuracy(logits, labels, top_k)
    return out


def multilabel_metrics(logits: torch.Tensor, targets: torch.Tensor, classes: Sequence[str]) -> dict[str, Any]:
    """Subset accuracy, per-label accuracy, micro/macro F1 and the per-label report (threshold
    0.5, on the predicted probabilities and on soft targets alike). As for classes (see
    `classification_report`), the macro averages are over the labels that occur in the targets
    or the predictions: a label the evaluated data never hold and the model never predicts has
    a row of zeros but does not count in them (it has no F1 to speak of, and counted as 0 it
    would lower a perfect model's macro F1). Where no label occurs in either, the F1 scores
    are NaN (undefined), as R^2 of a constant target is.

    Example:
        >>> t = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        >>> multilabel_metrics(t * 10 - 5, t, ["a", "b", "never"])["macro_f1"]
        1.0
    """
    from sklearn.metrics import classification_report, f1_score

    y = (targets >= 0.5).numpy().astype(int)
    p = labels_given(output_activation("multilabel", logits)).numpy().astype(int)
    seen = y.any(0) | p.any(0)
    if y.shape[1] == 1:  # one label: scikit-learn reads a column as binary; its positive class is the label
        y1, p1 = y.ravel(), p.ravel()
        f1 = float(f1_score(y1, p1, average="binary", zero_division=0))
        report = classification_report(y1, p1, labels=[1], target_names=list(classes), output_dict=True,
                                       zero_division=0)
        micro = macro = f1
    else:
        micro = float(f1_score(y, p, average="micro", zero_division=0))
        report = classification_report(y, p, target_names=list(classes), output_dict=True, zero_division=0)
        for key in ("precision", "recall", "f1-score"):
            report["macro avg"][key] = float(np.mean([report[c][key] for c, s in zip(classes, seen) if s])) \
                if seen.any() else float("nan")
        macro = report["macro avg"]["f1-score"]
    if not seen.any():  # no label in the data nor in the predictions: no F1 to speak of (0 / 0), not 0
        micro = macro = float("nan")
    return {"subset_accuracy": float((p == y).all(1).mean()), "label_accuracy": float((p == y).mean()),
            "micro_f1": micro, "macro_f1": macro, "per_class": report}


def regression_metrics(outputs: torch.Tensor, targets: torch.Tensor,
                       names: Sequence[str] | None = None) -> dict[str, Any]:
    """MSE, MAE and R^2 (averaged over output dimensions; R^2 over those whose targets vary:
    it is undefined for a constant one, NaN when none varies), and with ``names`` the MAE
    and R^2 of each output (``per_output``; NaN for a constant one)."""
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    y = targets.double().numpy().reshape(len(targets), -1)
    p = outputs.double().numpy().reshape(len(outputs), -1)
    varies = y.max(0) > y.min(0)  # exact: a constant column of 0.1 has a float std of about 1e-17
    r2 = [float(r2_score(y[:, j], p[:, j])) if varies[j] else float("nan") for j in range(y.shape[1])]
    out = {"mse": float(mean_squared_error(y, p)), "mae": float(mean_absolute_error(y, p)),
           "r2": float(np.mean([r for r, v in zip(r2, varies) if v])) if varies.any() else float("nan")}
    if names is not None:
        mae = mean_absolute_error(y, p, multioutput="raw_values")
        out["per_output"] = {c: {"mae": float(m), "r2": r} for c, m, r in zip(names, mae, r2)}
    return out


def task_metrics(task: str, logits: torch.Tensor, targets: torch.Tensor, classes: Sequence[str], *,
                 top_k: int = 5) -> dict[str, Any]:
    """The metrics that fit ``task`` (see the functions above)."""
    if task == "multiclass":
        return classification_metrics(logits, targets, classes, top_k=top_k)
    if task == "multilabel":
        return multilabel_metrics(logits, targets, classes)
    return regression_metrics(logits, targets, classes)


def final_metrics(module: nn.Module, val_loader: DataLoader | None, *, task: str, classes: Sequence[str],
                  loss_fn: Any, speed: SpeedConfig, top_k: int = 5, outputs: dict[str, Any] | None = None,
                  dist: Any = None, left_out: Any = None) -> dict[str, Any]:
    """Validation loss and the task's metrics (accuracy, top-k, macro F1, per-class report,
    confusion matrix; or F1 for multilabel; MSE/MAE/R^2 for regression). ``outputs``, when
    given, receives the raw ``logits`` and ``labels`` (in validation-set order) and ``kept``
    (the rows the metrics count). ``dist``: the process group a validation loader sharded over
    the ranks gathers through. ``left_out``: the items whose file failed to load, which no
    metric counts (see `transferkit.train.loop.evaluate`)."""
    if val_loader is None:
        return {}
    ev = evaluate(module, val_loader, loss_fn=loss_fn, device=speed.device, task=task, speed=speed, dist=dist,
                  left_out=left_out)
    out: dict[str, Any] = {"val_loss": ev["loss"]}
    if task != "regression":
        out["val_acc"] = ev["acc"]
    kept = ev["kept"]
    out.update(task_metrics(task, ev["logits"][kept], ev["labels"][kept], classes, top_k=top_k))
    if outputs is not None:
        outputs.update(logits=ev["logits"], labels=ev["labels"], kept=kept)
    return out
