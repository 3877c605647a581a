"""Scoring a model on labelled data it has not trained on: [`evaluate`][transferkit.evaluate].

The data are a folder ``root/<class>/<file>`` or a CSV of ``path,label`` rows (a header
row is optional; relative paths are relative to the CSV's folder), the same layouts
``finetune`` reads. The model is an exported file, a [`Predictor`][transferkit.Predictor], or a
[`FinetuneResult`][transferkit.FinetuneResult]; every file goes through the model's own
preprocessing, exactly as ``transferkit predict`` runs it. Files whose label the model does
not know are left out with a warning; files that cannot be read are listed in ``failed``
and left out of the scores. Single-label classifiers (``task="multiclass"``) only.

Example:
    >>> ev = transferkit.evaluate("model.pt", "hymenoptera/val")  # doctest: +SKIP
    >>> ev.accuracy, ev.worst(3)  # doctest: +SKIP
    >>> ev.plot_confusion_matrix("confusion_matrix.png")  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transferkit._text import plural
from transferkit.data.audio import scan_audio_folder
from transferkit.data.checks import DataReport
from transferkit.data.images import scan_csv, scan_image_folder
from transferkit.errors import ConfigError, DataError
from transferkit.export import Predictor, load
from transferkit.train.metrics import classification_report, confusion_matrix


@dataclass
class Evaluation:
    """What [`evaluate`][transferkit.evaluate] measured: per file, the true class and the
    model's probabilities; from them the accuracy, the per-class report, the confusion
    matrix and the worst files (highest loss, ``-log p(true class)``)."""

    classes: list[str]  # the model's labels, in output order
    files: list[str]  # the files scored, in the order of the rows below
    labels: list[int]  # each file's true class index
    probabilities: np.ndarray  # [files, classes], the model's probabilities
    failed: list[tuple[str, str]] = field(default_factory=list)  # files that could not be predicted, and why
    model: str = ""  # where the model came from
    data: str = ""  # the labelled data

    @property
    def predictions(self) -> np.ndarray:
        """Each file's predicted class index."""
        return self.probabilities.argmax(1) if len(self.files) else np.zeros(0, dtype=np.int64)

    @property
    def accuracy(self) -> float:
        """The fraction of scored files whose prediction is their label."""
        return float((self.predictions == np.asarray(self.labels)).mean()) if self.files else 0.0

    @property
    def confusion_matrix(self) -> np.ndarray:
        """Counts ``[true class, predicted class]``."""
        return confusion_matrix(np.asarray(self.labels, dtype=np.int64), self.predictions.astype(np.int64),
                                len(self.classes))

    @property
    def report(self) -> dict[str, Any]:
        """Per-class precision, recall, F1 and support, accuracy, macro and weighted averages
        (the keys of scikit-learn's ``classification_report(output_dict=True)``)."""
        return classification_report(self.confusion_matrix, self.classes)

    @property
    def losses(self) -> np.ndarray:
        """Each file's cross-entropy ``-log p(true class)``."""
        p = self.probabilities[np.arange(len(self.files)), np.asarray(self.labels, dtype=np.int64)]
        return -np.log(np.clip(p, 1e-12, None))

    def worst(self, k: int = 10) -> list[dict[str, Any]]:
        """The ``k`` files with the highest loss (the surest mistakes first): ``file``, ``true``,
        ``predicted``, ``probability`` (of the prediction), ``p_true`` and ``loss``."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ConfigError(f"k must be an integer >= 0, got {k!r}.")
        losses, pred = self.losses, self.predictions
        order = sorted(range(len(self.files)), key=lambda i: (-float(losses[i]), i))[:k]
        return [{"file": self.files[i], "true": self.classes[self.labels[i]], "predicted": self.classes[pred[i]],
                 "probability": float(self.probabilities[i, pred[i]]),
                 "p_true": float(self.probabilities[i, self.labels[i]]), "loss": float(losses[i])} for i in order]

    def plot_confusion_matrix(self, path: str | Path = "confusion_matrix.png") -> Path:
        """The confusion matrix (rows: true class, columns: predicted) as a PNG; returns its path."""
        from transferkit.train.reporting import plot_confusion_matrix

        return plot_confusion_matrix(self.confusion_matrix.tolist(), self.classes, path)

    def to_dict(self, *, worst: int = 10) -> dict[str, Any]:
        """Plain JSON data: counts, accuracy, per-class report, confusion matrix, worst files, failures."""
        return {"model": self.model, "data": self.data, "files": len(self.files), "accuracy": self.accuracy,
                "per_class": self.report, "classes": self.classes,
                "confusion_matrix": self.confusion_matrix.tolist(), "worst": self.worst(worst),
                "failed": [{"file": f, "error": e} for f, e in self.failed]}

    def summary(self, *, worst: int = 5) -> str:
        """A few lines for people: accuracy, the per-class table, the worst files, failures."""
        rep = self.report
        right = int((self.predictions == np.asarray(self.labels)).sum())
        lines = [f"accuracy {self.accuracy:.4f} ({right} of {plural(len(self.files), 'file')} right) on {self.data}"]
        width = max([len(c) for c in self.classes] + [len("macro avg")])
        lines.append(f"  {'class':<{width}}  precision  recall      f1  support")
        for name in [*self.classes, "macro avg"]:
            r = rep[name]
            lines.append(f"  {name:<{width}}  {r['precision']:9.3f}  {r['recall']:6.3f}  {r['f1-score']:6.3f}  "
                         f"{int(r['support']):7d}")
        rows = self.worst(worst)
        if rows:
            lines.append(f"worst {plural(len(rows), 'file')} (highest loss):")
            lines += [f"  {r['file']}: true {r['true']}, predicted {r['predicted']} ({r['probability']:.2f}), "
                      f"loss {r['loss']:.2f}" for r in rows]
        if self.failed:
            lines.append(f"{plural(len(self.failed), 'file')} could not be predicted (left out of the scores):")
            lines += [f"  {f}: {e}" for f, e in self.failed[:10]]
            lines += [f"  ... and {len(self.failed) - 10} more"] if len(self.failed) > 10 else []
        return "\n".join(lines)


def labelled_files(data: str | Path, classes: list[str], kind: str = "image") -> list[tuple[str, int]]:
    """``(file, class index)`` of a folder ``root/<class>/<file>`` or a ``path,label`` CSV, with the
    class indices of ``classes`` (files of other labels are left out with a warning)."""
    path = Path(data)
    report = DataReport()
    if path.is_dir():
        if kind == "audio":
            samples, _ = scan_audio_folder(path, classes, report=report)
        else:
            samples, _ = scan_image_folder(path, classes, report=report)
    elif path.is_file() and path.suffix.lower() in (".csv", ".txt"):
        samples, _ = scan_csv(path, classes, report=report)
    else:
        raise DataError(f"{str(data)!r} is neither a folder root/<class>/<file> nor a CSV file of path,label rows.")
    if not samples:
        raise DataError(f"{str(data)!r} has no files labelled with the model's classes {classes[:10]}.")
    return samples


def _predictor(model: Any, device: str) -> Any:
    if isinstance(model, Predictor):
        return model
    if isinstance(model, (str, Path)):
        return load(model, device=device)
    to_predictor = getattr(model, "predictor", None)
    if callable(to_predictor):
        return to_predictor()
    raise ConfigError("evaluate() takes an exported file, a Predictor or a FinetuneResult, got "
                      f"{type(model).__name__}.")


def evaluate(model: Any, data: str | Path, *, batch_size: int = 32, device: str = "cpu",
             progress: bool | None = None) -> Evaluation:
    """Score ``model`` (an exported file, a [`Predictor`][transferkit.Predictor] or a
    [`FinetuneResult`][transferkit.FinetuneResult]) on the labelled ``data`` (a folder
    ``root/<class>/<file>`` or a ``path,label`` CSV); returns an [`Evaluation`][transferkit.Evaluation].
    ``progress``: a bar on a terminal (None), always (True) or never (False).

    Example:
        >>> ev = evaluate("model.pt", "hymenoptera/val")  # doctest: +SKIP
        >>> print(ev.summary())  # doctest: +SKIP
    """
    predictor = _predictor(model, device)
    if predictor.task != "multiclass":
        raise ConfigError(f"evaluate() scores single-label classifiers; this model's task is {predictor.task!r}. "
                          "Use Predictor.outputs() and your own metric for it.")
    classes = list(predictor.labels)
    samples = labelled_files(data, classes, predictor.input_spec.kind)
    preds = predictor.predict([f for f, _ in samples], top_k=len(classes), batch_size=batch_size,
                              progress=progress)
    files, labels, rows, failed = [], [], [], []
    index = {c: i for i, c in enumerate(classes)}
    for (f, y), p in zip(samples, preds):
        if not p.ok:
            failed.append((f, p.error or "unknown error"))
            continue
        row = np.zeros(len(classes))
        for label, prob in p.top_k:
            row[index[label]] = prob
        files.append(f)
        labels.append(y)
        rows.append(row)
    if not files:
        raise DataError(f"None of the {len(samples)} files of {str(data)!r} could be predicted; the first failure: "
                        f"{failed[0][0]}: {failed[0][1]}")
    return Evaluation(classes=classes, files=files, labels=labels, probabilities=np.stack(rows), failed=failed,
                      model=str(model) if isinstance(model, (str, Path)) else predictor.source, data=str(data))
