"""Validation metrics per task, computed with scikit-learn from logits and targets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of samples whose label is among the ``k`` highest logits.

    Example:
        >>> top_k_accuracy(torch.tensor([[0.1, 0.5, 0.4]]), torch.tensor([2]), 2)
        1.0
    """
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return float((top == labels.view(-1, 1)).any(1).float().mean().item())


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], *,
                           top_k: int = 5) -> dict[str, Any]:
    """Accuracy, top-k accuracy (when there are more than ``top_k`` classes), macro F1,
    balanced accuracy, the per-class report and the confusion matrix."""
    from sklearn.metrics import balanced_accuracy_score, classification_report, confusion_matrix, f1_score

    y, p = labels.numpy(), logits.argmax(1).numpy()
    idx = list(range(len(classes)))
    out: dict[str, Any] = {
        "accuracy": float((p == y).mean()),
        "macro_f1": float(f1_score(y, p, labels=idx, average="macro", zero_division=0)),
        "balanced_accuracy": float(balanced_accuracy_score(y, p)),
        "per_class": classification_report(y, p, labels=idx, target_names=list(classes), output_dict=True,
                                           zero_division=0),
        "confusion_matrix": confusion_matrix(y, p, labels=idx).tolist(),
    }
    if len(classes) > top_k > 1:
        out[f"top{top_k}_accuracy"] = top_k_accuracy(logits, labels, top_k)
    return out


def multilabel_metrics(logits: torch.Tensor, targets: torch.Tensor, classes: Sequence[str]) -> dict[str, Any]:
    """Subset accuracy, per-label accuracy, micro/macro F1 and the per-label report (threshold 0.5)."""
    from sklearn.metrics import classification_report, f1_score

    y, p = targets.numpy().astype(int), (logits > 0).numpy().astype(int)
    return {
        "subset_accuracy": float((p == y).all(1).mean()),
        "label_accuracy": float((p == y).mean()),
        "micro_f1": float(f1_score(y, p, average="micro", zero_division=0)),
        "macro_f1": float(f1_score(y, p, average="macro", zero_division=0)),
        "per_class": classification_report(y, p, target_names=list(classes), output_dict=True, zero_division=0),
    }


def regression_metrics(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    """MSE, MAE and R^2 (averaged over output dimensions)."""
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    y, p = targets.numpy().reshape(len(targets), -1), outputs.float().numpy().reshape(len(outputs), -1)
    r2 = float(r2_score(y, p)) if len(y) > 1 else float("nan")
    return {"mse": float(mean_squared_error(y, p)), "mae": float(mean_absolute_error(y, p)), "r2": r2}


def task_metrics(task: str, logits: torch.Tensor, targets: torch.Tensor, classes: Sequence[str], *,
                 top_k: int = 5) -> dict[str, Any]:
    """The metrics that fit ``task`` (see the functions above)."""
    if task == "multiclass":
        return classification_metrics(logits, targets, classes, top_k=top_k)
    if task == "multilabel":
        return multilabel_metrics(logits, targets, classes)
    return regression_metrics(logits, targets)


def summary_line(metrics: dict[str, Any]) -> str:
    """The scalar metrics as ``name value`` pairs, for logs."""
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (float, int, np.floating)))
