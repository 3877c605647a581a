"""The standard linear-probe protocol: scikit-learn logistic regression (L-BFGS) on frozen
features, with the inverse regularisation strength ``C`` chosen on the validation set.

The fitted classifier is copied into the model's linear head, so a probe exports and
predicts like any other transferkit model (softmax of the head's logits equals
scikit-learn's ``predict_proba``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from transferkit.errors import ConfigError
from transferkit.train.feature_store import ShardedFeatureStore

DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 2, 13))


@dataclass
class ProbeResult:
    """The chosen ``C``, its validation accuracy, the accuracy and the log loss of every ``C``
    tried, the classifier."""

    C: float
    val_acc: float | None
    scores: dict[float, float] = field(default_factory=dict)
    classifier: Any = None
    losses: dict[float, float] = field(default_factory=dict)


def _standardiser(x: np.ndarray, chunk_elements: int = 2**18) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std per feature, accumulated in float64 a chunk of rows (2 MB) at a time (no
    float64 copy of ``x``), returned in ``x``'s dtype."""
    n, total, sq = len(x), np.zeros(x.shape[1]), np.zeros(x.shape[1])
    chunk = max(1, chunk_elements // max(x.shape[1], 1))
    for i in range(0, n, chunk):
        part = np.asarray(x[i:i + chunk], dtype=np.float64)
        total, sq = total + part.sum(0), sq + np.square(part).sum(0)
    mean = total / max(n, 1)
    std = np.sqrt(np.maximum(sq / max(n, 1) - mean**2, 0.0))
    std[std < 1e-6] = 1.0
    return mean.astype(x.dtype), std.astype(x.dtype)


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def fit_logistic_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray | None = None,
                       val_y: np.ndarray | None = None, *, Cs: Sequence[float] = DEFAULT_CS, max_iter: int = 1000,
                       seed: int = 0, class_weight: Any = None,
                       overwrite: bool = False) -> tuple[ProbeResult, np.ndarray, np.ndarray]:
    """Fit ``LogisticRegression(solver="lbfgs")`` on standardised features for each ``C`` and
    keep the best on the validation set: the highest accuracy, a tie going to the lower log
    loss (on separable data every ``C`` reaches the same accuracy, and a small one gives
    probabilities near chance); without a validation set, the largest ``C``. Refit on the
    training data. Returns the result and the equivalent ``(weight [K, F], bias [K])`` of a
    linear layer acting on the *raw* features.

    Memory: float32 features are standardised in float32 (the statistics accumulated in
    float64 a chunk at a time), in one copy of ``train_x``, or in place with ``overwrite``
    (``train_x`` then holds the standardised features); scikit-learn's L-BFGS keeps float32
    input in float32. No float64 copy of the features is made.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x = np.concatenate([rng.normal(-1, 1, (20, 3)), rng.normal(1, 1, (20, 3))]); y = np.repeat([0, 1], 20)
        >>> res, w, b = fit_logistic_probe(x, y, x, y, Cs=[0.1, 1.0])
        >>> w.shape, res.val_acc > 0.8
        ((2, 3), True)
    """
    from sklearn.linear_model import LogisticRegression

    Cs = [float(c) for c in Cs]
    if not Cs or any(not c > 0 for c in Cs):
        raise ConfigError(f"probe Cs must be positive numbers, got {Cs!r}.")
    if train_x.dtype not in (np.float32, np.float64):
        train_x = np.asarray(train_x, dtype=np.float32)
        overwrite = True  # a converted copy already
    mean, std = _standardiser(train_x)
    tx = train_x if overwrite else train_x.copy()
    tx -= mean
    tx /= std

    def make(c: float) -> Any:
        return LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter, random_state=seed,
                                  class_weight=class_weight).fit(tx, train_y)

    scores: dict[float, float] = {}
    losses: dict[float, float] = {}
    best_c, best_clf = max(Cs), None  # without validation data: the weakest regularisation
    if val_x is not None and val_y is not None and len(val_y):
        vx = (val_x - mean) / std
        for c in Cs:
            clf = make(c)
            scores[c] = float((clf.predict(vx) == val_y).mean())
            losses[c] = _log_loss(clf, vx, val_y)
            if best_clf is None or (scores[c], -losses[c]) > (scores[best_c], -losses[best_c]):
                best_c, best_clf = c, clf
    clf = best_clf or make(best_c)
    w, b = _as_linear(clf, mean, std)
    return ProbeResult(C=best_c, val_acc=scores.get(best_c), scores=scores, classifier=clf, losses=losses), w, b


def _log_loss(clf: Any, x: np.ndarray, y: np.ndarray) -> float:
    """The mean negative log probability ``clf`` gives the true class (a class it never saw: 1e-15)."""
    proba = clf.predict_proba(x)
    column = {c: i for i, c in enumerate(clf.classes_.tolist())}
    p = np.array([proba[i, column[t]] if t in column else 0.0 for i, t in enumerate(y.tolist())])
    return float(-np.log(np.clip(p, 1e-15, 1.0)).mean())


def _as_linear(clf: Any, mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fold the standardisation into the weights; a binary classifier becomes two logits
    ``[0, w.x + b]`` whose softmax is the sigmoid scikit-learn uses."""
    coef, intercept = clf.coef_ / std, clf.intercept_ - (clf.coef_ / std) @ mean
    if coef.shape[0] == 1:
        coef = np.concatenate([np.zeros_like(coef), coef])
        intercept = np.concatenate([np.zeros(1), intercept])
    classes = list(clf.classes_)
    k = max(int(max(classes)) + 1, coef.shape[0])
    w, b = np.zeros((k, coef.shape[1])), np.full(k, -1e4)  # classes absent from training: never predicted
    for row, c in enumerate(classes if len(classes) == coef.shape[0] else range(coef.shape[0])):
        w[int(c)], b[int(c)] = coef[row], intercept[row]
    return w.astype(np.float32), b.astype(np.float32)


def set_linear_head(head: nn.Module, weight: np.ndarray, bias: np.ndarray) -> None:
    """Copy ``weight``/``bias`` into the last ``nn.Linear`` of ``head`` (in place)."""
    linear = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if len(linear) != 1 or linear[0].weight.shape[1] != weight.shape[1]:
        raise ConfigError("head='logistic' needs a single linear layer on the features; "
                          "drop head_hidden.")
    lin = linear[0]
    if lin.weight.shape[0] < weight.shape[0]:
        raise ConfigError(f"The probe has {weight.shape[0]} classes but the head {lin.weight.shape[0]} outputs.")
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.fill_(-1e4)
        lin.weight[: weight.shape[0]] = torch.from_numpy(weight)
        lin.bias[: bias.shape[0]] = torch.from_numpy(bias)


def check_probe_memory(store: ShardedFeatureStore, available: int | None = None) -> int:
    """Bytes the probe needs for ``store`` (its features as float32, all views, in memory);
    a ConfigError saying how much when that exceeds the available memory."""
    need = store.views * store.num_samples * store.dim * 4
    available = available_memory() if available is None else available
    if available is not None and need > available:
        raise ConfigError(f"head='logistic' holds the training features in memory as float32: "
                          f"{need / 2**30:.1f} GiB for {store.num_samples} samples x {store.views} views x "
                          f"{store.dim} features, but {available / 2**30:.1f} GiB are available. Use head='linear' "
                          "(trained from the feature store in blocks), fewer cache_views, or a machine with more "
                          "memory.")
    return need


def run_probe(stores: Mapping[str, Any], head: nn.Module, *, task: str, Cs: Sequence[float] | None, seed: int,
              class_weights: Any = None, val_failed: Sequence[int] = ()) -> tuple[list[dict[str, Any]],
                                                                                  dict[str, Any], Any]:
    """``head="logistic"``: fit the scikit-learn probe on the cached features (``stores``:
    ``"train"`` and optionally ``"val"``, each a `FeatureStore` or `ShardedFeatureStore`; every
    view of every training image), choose ``C`` on the validation features, copy it into
    ``head``. ``class_weights``: None, ``"balanced"`` or one weight per class (scikit-learn's
    ``class_weight``). ``val_failed``: rows of an in-memory validation store whose file failed
    to load (left out)."""
    if task != "multiclass" or "train" not in stores:
        raise ConfigError("head='logistic' needs task='multiclass' and a frozen backbone (cached features); "
                          "use policy='feature_extraction'.")
    tr, va = stores["train"], stores.get("val")
    if isinstance(tr, ShardedFeatureStore):  # on disk: one float32 copy in memory, standardised in place
        check_probe_memory(tr)
        x, y = tr.arrays()
        vx, vy = va.arrays(all_views=False) if va is not None else (None, None)
        overwrite = True
    else:
        x = np.asarray(tr.features).reshape(-1, tr.features.shape[-1])
        y = np.tile(np.asarray(tr.targets), tr.num_views)
        vx = np.delete(np.asarray(va.features[0]), list(val_failed), 0) if va is not None else None
        vy = np.delete(np.asarray(va.targets), list(val_failed), 0) if va is not None else None  # files that loaded
        overwrite = False
    weights = class_weights if class_weights in (None, "balanced") else dict(enumerate(map(float, class_weights)))
    res, w, b = fit_logistic_probe(x, y, vx, vy, Cs=DEFAULT_CS if Cs is None else Cs, seed=seed,
                                   class_weight=weights, overwrite=overwrite)
    set_linear_head(head, w, b)
    best = {"epoch": None, "C": res.C, "val_acc": res.val_acc}
    if res.losses:
        best["val_loss"] = res.losses[res.C]
    return [], best, res
