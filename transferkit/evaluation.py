"""Scoring a model on labelled data it has not trained on: [`evaluate`][transferkit.evaluate].

The data are a folder ``root/<class>/<file>`` or a CSV of ``path,label`` rows (a header
row is optional; relative paths are relative to the CSV's folder), or for an image model tar
shards, Parquet files or a saved Hugging Face dataset (labels read by class name), the
layouts ``finetune`` reads. The model is an exported file, a [`Predictor`][transferkit.Predictor], or a
[`FinetuneResult`][transferkit.FinetuneResult]; every file goes through the model's own
preprocessing, exactly as ``transferkit predict`` runs it. Files whose label the model does
not know are left out with a warning; files that cannot be read are listed in ``failed``
and left out of the scores.

Multilabel and regression models are scored on a CSV of their targets (a header ``path``
and one column per output, or ``path,labels``: see `transferkit.data.target_tables`, the
layout ``finetune`` reads), into a [`TargetEvaluation`][transferkit.TargetEvaluation]:
the task's metrics (label accuracy and F1; MSE, MAE and R^2, also per output) and the worst
files.

Example:
    >>> ev = transferkit.evaluate("model.pt", "hymenoptera/val")  # doctest: +SKIP
    >>> ev.accuracy, ev.worst(3)  # doctest: +SKIP
    >>> ev.plot_confusion_matrix("confusion_matrix.png")  # doctest: +SKIP
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferkit._progress import progress as progress_bar
from transferkit._text import expand_home, finite_json, plural
from transferkit.data.audio import scan_audio_folder
from transferkit.data.bundle import labelled_data
from transferkit.data.encoded import SampleRef
from transferkit.data.checks import DataReport
from transferkit.data.folders import scan_csv
from transferkit.data.images import scan_image_folder
from transferkit.data.target_tables import scan_target_csv
from transferkit.errors import ConfigError, DataError
from transferkit.export import Predictor, load
from transferkit.heads import TargetScale, labels_given
from transferkit.train.metrics import classification_report, confusion_matrix, task_metrics


def _floored(p: np.ndarray) -> np.ndarray:
    """Probabilities as float64, 0 raised to float32's smallest positive number (what a float32
    probability below it rounds to 0 from), so that a log of them is finite and keeps the order
    of every probability the outputs hold."""
    return np.maximum(np.asarray(p, dtype=np.float64), float(np.finfo(np.float32).smallest_subnormal))


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
    data_warnings: list[str] = field(default_factory=list)  # what reading the data said (rows left out, ...)

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
        """Each file's cross-entropy ``-log p(true class)``, from the stored float32 probabilities:
        down to the smallest they hold (about 1e-45: a loss of 103.3 where p is 0), so that the
        surest mistakes keep their order."""
        p = self.probabilities[np.arange(len(self.files)), np.asarray(self.labels, dtype=np.int64)]
        return -np.log(_floored(p))

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
                "failed": [{"file": f, "error": e} for f, e in self.failed], "data_warnings": self.data_warnings}

    def summary(self, *, worst: int = 5) -> str:
        """A few lines for people: accuracy, the per-class table, the worst files, failures."""
        rep = self.report
        right = int((self.predictions == np.asarray(self.labels)).sum())
        lines = [f"accuracy {self.accuracy:.4f} ({right} of {plural(len(self.files), 'file')} right) on {self.data}"]
        width = max([len(c) for c in self.classes] + [len("macro avg")])
        lines.append(f"  {'class':<{width}}  precision  recall      f1  support")
        predicted = self.confusion_matrix.sum(axis=0)
        for i, name in enumerate([*self.classes, "macro avg"]):
            r = rep[name]
            scored = name == "macro avg" or r["support"] > 0  # a class without files here has no recall or F1
            precision = f"{r['precision']:9.3f}" if scored or predicted[i] else f"{'n/a':>9}"
            recall, f1 = (f"{r['recall']:6.3f}", f"{r['f1-score']:6.3f}") if scored else (f"{'n/a':>6}",) * 2
            lines.append(f"  {name:<{width}}  {precision}  {recall}  {f1}  {int(r['support']):7d}")
        absent = [c for i, c in enumerate(self.classes) if rep[c]["support"] == 0 and predicted[i]]
        if absent:  # its n/a recall and F1 count as 0 in the macro average, as scikit-learn counts them
            lines.append(f"  (macro avg, as scikit-learn's: over the classes with files or predictions; predicted "
                         f"without files, {', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''} counts 0 in "
                         "recall and f1)")
        rows = self.worst(worst)
        if rows:
            lines.append(f"worst {plural(len(rows), 'file')} (highest loss):")
            lines += [f"  {r['file']}: true {r['true']}, predicted {r['predicted']} ({r['probability']:.2f}), "
                      f"loss {r['loss']:.2f}" for r in rows]
        return "\n".join(lines + _failed_lines(self.failed))


@dataclass
class TargetEvaluation:
    """What [`evaluate`][transferkit.evaluate] measured for a multilabel or regression model:
    per file, the targets and the model's outputs (sigmoid probabilities, or values in the
    targets' units); from them the task's metrics and the worst files."""

    task: str  # "multilabel" or "regression"
    classes: list[str]  # the model's output names, in output order
    files: list[str]  # the files scored, in the order of the rows below
    targets: np.ndarray  # [files, outputs]
    outputs: np.ndarray  # [files, outputs]: probabilities (multilabel) or values (regression)
    failed: list[tuple[str, str]] = field(default_factory=list)  # files that could not be predicted, and why
    model: str = ""
    data: str = ""
    data_warnings: list[str] = field(default_factory=list)  # what reading the data said (rows left out, ...)
    # regression: the std per output the model was trained to standardise by (its TargetScale),
    # which the per-file loss divides by; None: the std of these data
    scale: np.ndarray | None = None

    @property
    def metrics(self) -> dict[str, Any]:
        """Multilabel: subset and label accuracy, micro/macro F1 and the per-label report (a
        label is predicted at a probability of 0.5 or more, as the predictor reads it);
        regression: MSE, MAE and R^2 (averaged over outputs; R^2 over those whose targets vary)
        and ``per_output`` (MAE and R^2 of each; R^2 is NaN for an output whose targets are
        constant here, where it is undefined)."""
        outputs, targets = torch.from_numpy(self.outputs), torch.from_numpy(self.targets)
        if self.task == "multilabel":  # probabilities as logits whose sigmoid falls on the same side of 0.5
            outputs, targets = torch.from_numpy(np.where(labels_given(self.outputs), 1.0, -1.0)), targets.float()
        return task_metrics(self.task, outputs, targets, self.classes)

    @property
    def losses(self) -> np.ndarray:
        """Each file's loss: multilabel, the binary cross-entropy averaged over labels;
        regression, the squared error averaged over outputs, each in units of the std the
        model standardised that output by in training (``scale``, its training loss), else of
        its std in these data (an output constant here, or a single file: its own units)."""
        y, p = self.targets, self.outputs
        if self.task == "multilabel":
            return -(y * np.log(_floored(p)) + (1 - y) * np.log(_floored(1 - p.astype(np.float64)))).mean(1)
        std = self.scale if self.scale is not None else (y.std(0) if len(y) > 1 else np.ones(y.shape[1]))
        return (((p - y) / np.where(std > 0, std, 1.0)) ** 2).mean(1)

    def worst(self, k: int = 10) -> list[dict[str, Any]]:
        """The ``k`` files with the highest loss: ``file``, ``true`` and ``predicted`` (label
        lists for multilabel, ``{output: value}`` for regression) and ``loss``."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ConfigError(f"k must be an integer >= 0, got {k!r}.")
        losses = self.losses
        order = sorted(range(len(self.files)), key=lambda i: (-float(losses[i]), i))[:k]
        return [{"file": self.files[i], "true": self._read(self.targets[i]), "predicted": self._read(self.outputs[i]),
                 "loss": float(losses[i])} for i in order]

    def _read(self, row: np.ndarray) -> Any:
        if self.task == "multilabel":
            return [c for c, given in zip(self.classes, labels_given(row)) if given]
        return {c: float(v) for c, v in zip(self.classes, row)}

    def to_dict(self, *, worst: int = 10) -> dict[str, Any]:
        """Plain JSON data: counts, metrics, worst files, failures (an undefined metric, NaN in
        ``metrics``, is None: JSON's null)."""
        return finite_json({"model": self.model, "data": self.data, "task": self.task, "files": len(self.files),
                            "classes": self.classes, **self.metrics, "worst": self.worst(worst),
                            "failed": [{"file": f, "error": e} for f, e in self.failed],
                            "data_warnings": self.data_warnings})

    def summary(self, *, worst: int = 5) -> str:
        """A few lines for people: the metrics, per label or output, the worst files, failures."""
        m, where = self.metrics, f"on {self.data} ({plural(len(self.files), 'file')})"
        width = max([len(c) for c in self.classes] + [len("macro avg")])
        if self.task == "multilabel":
            def number(v: float, spec: str) -> str:  # NaN: undefined (no label in the data nor the predictions)
                return f"{'n/a':>{spec.split('.')[0] or 0}}" if v != v else f"{v:{spec}}"
            lines = [f"label accuracy {m['label_accuracy']:.4f}, subset accuracy {m['subset_accuracy']:.4f}, "
                     f"micro F1 {number(m['micro_f1'], '.4f')}, macro F1 {number(m['macro_f1'], '.4f')} {where}",
                     f"  {'label':<{width}}  precision  recall      f1  support"]
            predicted = labels_given(self.outputs).sum(0) if len(self.outputs) else np.zeros(len(self.classes))
            for i, name in enumerate(self.classes):  # as for classes: no positive here, no recall or F1
                r, nan = m["per_class"].get(name, {}), float("nan")
                support = int(r.get("support", 0))
                precision = number(r.get("precision", 0) if support or predicted[i] else nan, "9.3f")
                recall, f1 = (number(r.get(k, 0) if support else nan, "6.3f") for k in ("recall", "f1-score"))
                lines.append(f"  {name:<{width}}  {precision}  {recall}  {f1}  {support:7d}")
        else:
            lines = [f"R^2 {m['r2']:.4f}, MSE {m['mse']:.4g}, MAE {m['mae']:.4g} {where}",
                     f"  {'output':<{width}}        MAE      R^2"]
            lines += [f"  {name:<{width}}  {r['mae']:9.4g}  {r['r2']:7.4f}" for name, r in m["per_output"].items()]

        def said(v: Any) -> str:
            return f"[{', '.join(v)}]" if isinstance(v, list) else ", ".join(f"{k}={x:.7g}" for k, x in v.items())
        rows = self.worst(worst)
        if rows:
            lines.append(f"worst {plural(len(rows), 'file')} (highest loss):")
            lines += [f"  {r['file']}: true {said(r['true'])}, predicted {said(r['predicted'])}, loss {r['loss']:.3g}"
                      for r in rows]
        return "\n".join(lines + _failed_lines(self.failed))


def _failed_lines(failed: list[tuple[str, str]]) -> list[str]:
    """The summary's lines on files that could not be predicted (none: no line)."""
    if not failed:
        return []
    lines = [f"{plural(len(failed), 'file')} could not be predicted (left out of the scores):"]
    lines += [f"  {f}: {e}" for f, e in failed[:10]]
    return lines + ([f"  ... and {len(failed) - 10} more"] if len(failed) > 10 else [])


def labelled_samples(data: str | Path, classes: list[str], kind: str = "image", *,
                     what: str = "scored", report: DataReport | None = None) -> Sequence[tuple[Any, int]]:
    """``(sample, class index)`` of labelled data, with the class indices of ``classes``: the
    files of a folder ``root/<class>/<file>`` or a ``path,label`` CSV, or for an image model the
    samples (`SampleRef`) of tar shards, Parquet files or a Hugging Face dataset, read by class
    name as validation data are (`labelled_data`; made on access, not held). Samples of other
    labels are left out with a warning. ``what`` names the data in messages; ``report`` records
    what the reading found (its ``warnings``; a new one by default)."""
    report = DataReport() if report is None else report
    # encoded data: every sample goes to the model, so one that cannot be decoded is listed in `failed`, as a file is
    encoded = labelled_data(data, classes, what=what, scan="none", report=report) if kind == "image" else None
    if encoded is not None:
        return encoded.samples
    encoded = " tar shards, Parquet files or a saved Hugging Face dataset," if kind == "image" else ""
    if not isinstance(data, (str, os.PathLike)):
        raise DataError(f"Labelled data to score are read from disk: a folder root/<class>/<file>,{encoded} or a CSV "
                        f"file of path,label rows; got {type(data).__name__}. To score inputs held in memory, "
                        "predict them (result.predict or transferkit.load(model).predict) and compare the labels.")
    path = Path(data)
    if path.is_dir():
        if kind == "audio":
            samples, _ = scan_audio_folder(path, classes, report=report)
        else:
            samples, _ = scan_image_folder(path, classes, report=report)
    elif path.is_file() and path.suffix.lower() in (".csv", ".txt"):
        samples, _ = scan_csv(path, classes, report=report, purpose="scoring", kind=kind)
    elif not path.exists():
        raise DataError(f"The data to score {str(data)!r} do not exist (looked for {str(path.absolute())!r}): check "
                        "the path.")
    else:
        raise DataError(f"{str(data)!r} is neither a folder root/<class>/<file>,{encoded} nor a CSV file of "
                        "path,label rows.")
    if not samples:
        raise DataError(f"{str(data)!r} has no files labelled with the model's classes {classes[:10]}.")
    return samples


def _predictor(model: Any, device: str | None) -> Any:
    """The predictor of ``model``; ``device`` loads an exported file there, and must be where a
    Predictor or a FinetuneResult already runs (None: wherever that is)."""
    if isinstance(model, (str, Path)):
        return load(model, device=device or "cpu")
    to_predictor = getattr(model, "predictor", None)
    if isinstance(model, Predictor):
        predictor = model
    elif callable(to_predictor):
        predictor = to_predictor()
    else:
        raise ConfigError("evaluate() takes an exported file, a Predictor or a FinetuneResult, got "
                          f"{type(model).__name__}.")
    if device is not None and str(device) != str(predictor.device) and not (
            str(device) == "cuda" and predictor.device.type == "cuda"):
        raise ConfigError(f"evaluate(device={str(device)!r}): this {type(model).__name__} runs on "
                          f"{predictor.device}; device= applies to an exported file, loaded there. Drop device=, or "
                          "evaluate the exported file (transferkit.evaluate('model.pt', data, device=...)).")
    return predictor


def evaluate(model: Any, data: str | Path, *, batch_size: int = 32, device: str | None = None,
             progress: bool | None = None) -> Evaluation | TargetEvaluation:
    """Score ``model`` (an exported file, a [`Predictor`][transferkit.Predictor] or a
    [`FinetuneResult`][transferkit.FinetuneResult]) on the labelled ``data`` (a folder
    ``root/<class>/<file>``, a ``path,label`` CSV, or for an image model tar shards, Parquet
    files or a saved Hugging Face dataset); returns an [`Evaluation`][transferkit.Evaluation].
    A multilabel or regression model is scored on a CSV of its targets into a
    [`TargetEvaluation`][transferkit.TargetEvaluation].
    ``progress``: a bar on a terminal (None), always (True) or never (False). ``device``: where
    an exported file runs (default the CPU); a Predictor or a FinetuneResult runs where it is.

    Example:
        >>> ev = evaluate("model.pt", "hymenoptera/val")  # doctest: +SKIP
        >>> print(ev.summary())  # doctest: +SKIP
    """
    predictor, data = _predictor(model, device), expand_home(data)  # as the model's path
    origin = str(model) if isinstance(model, (str, Path)) else predictor.source
    if predictor.task != "multiclass":
        return _evaluate_targets(predictor, origin, data, batch_size=batch_size, progress=progress)
    report = DataReport()  # what reading the data says (rows left out, ...): warned, and kept in the results
    samples = labelled_samples(data, list(predictor.labels), predictor.input_spec.kind, report=report)
    result = score(predictor, samples, data=data, model=origin, batch_size=batch_size, progress=progress)
    result.data_warnings = list(report.warnings)
    return result


def score(predictor: Predictor, samples: Sequence[tuple[Any, int]], *, data: Any = "", model: str = "",
          batch_size: int = 32, progress: bool | None = False, chunk: int = 1024) -> Evaluation:
    """The [`Evaluation`][transferkit.Evaluation] of a classifier on ``samples``: ``(input, class
    index)`` pairs (a file path, an encoded sample, or any input ``predict`` takes), the indices
    of ``predictor.labels``; predicted ``chunk`` at a time (see `labelled_samples` for data on
    disk). ``data`` and ``model`` name them in the results."""
    classes = list(predictor.labels)
    files, labels, rows, failed = _predicted(predictor, samples, data, batch_size=batch_size, progress=progress,
                                             chunk=chunk)
    return Evaluation(classes=classes, files=files, labels=[int(y) for y in labels], probabilities=rows,
                      failed=failed, model=model, data=str(data))


def _evaluate_targets(predictor: Predictor, origin: str, data: str | Path, *, batch_size: int,
                      progress: bool | None) -> TargetEvaluation:
    classes = list(predictor.labels)
    path = Path(data)
    if not (path.is_file() and path.suffix.lower() == ".csv"):
        raise DataError(f"A {predictor.task} model is scored on a CSV of its targets: a header 'path' and then one "
                        f"column per output ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})"
                        + (", or 'path,labels' with ';'-separated label names" if predictor.task == "multilabel"
                           else "") + f"; got {str(data)!r}.")
    report = DataReport()  # what reading the data says (rows left out, ...): warned, and kept in the results
    samples, _ = scan_target_csv(path, task=predictor.task, classes=classes, report=report, purpose="scoring")
    files, targets, outputs, failed = _predicted(predictor, samples, data, batch_size=batch_size, progress=progress)
    return TargetEvaluation(task=predictor.task, classes=classes, files=files, targets=np.asarray(targets),
                            outputs=outputs, failed=failed, model=origin, data=str(data),
                            scale=_trained_scale(predictor), data_warnings=list(report.warnings))


def _predicted(predictor: Predictor, samples: Sequence[tuple[Any, Any]], data: Any, *, batch_size: int,
               progress: bool | None, chunk: int = 1024
               ) -> tuple[list[str], list[Any], np.ndarray, list[tuple[str, str]]]:
    """Predict the samples of ``samples`` (``(file or SampleRef, truth)``), ``chunk`` at a time
    (a shard's sample is given to the model as its bytes, the decoding a file gets): the names
    predicted, their truths, the model's outputs ``[files, outputs]`` (probabilities of each
    class, float32 as the model gives them; of each label, or values, float64 for the metrics)
    and the files that failed with why; a `DataError` when none could be predicted. Memory holds
    one chunk's predictions, and one row per sample."""
    classes = list(predictor.labels)
    files, truths, rows, failed = [], [], [], []
    index = {c: i for i, c in enumerate(classes)}
    with progress_bar(len(samples), "predict", unit="file", verbose=progress is not False, force=progress is True,
                      leave=True) as bar:
        for start in range(0, len(samples), chunk):
            part = samples[start:start + chunk]
            preds = predictor.iter_predict([_readable(x) for x, _ in part], batch_size=batch_size,  # every score
                                           top_k=1 if predictor.task == "regression" else len(classes))
            for (x, y), p in zip(part, preds):
                if not p.ok:
                    failed.append((str(x), p.error or "unknown error"))
                    continue
                row = np.zeros(len(classes), dtype=np.float32 if predictor.task == "multiclass" else np.float64)
                if predictor.task == "regression":
                    row[:] = [p.values[c] for c in classes]
                else:
                    for label, prob in p.top_k:
                        row[index[label]] = prob
                files.append(str(x))
                truths.append(y)
                rows.append(row)
            bar.update(len(part))
    if not files:
        raise DataError(f"None of the {len(samples)} files of {str(data)!r} could be predicted; the first failure: "
                        f"{failed[0][0]}: {failed[0][1]}")
    return files, truths, np.stack(rows), failed


def _readable(item: Any) -> Any:
    """What a predictor reads for one sample: an encoded sample (`SampleRef`) as an open file of
    its bytes, named after it; a file path as it is."""
    if not isinstance(item, SampleRef):
        return item
    f = io.BytesIO(item.source.read(item.index))
    f.name = str(item)
    return f


def _trained_scale(predictor: Predictor) -> np.ndarray | None:
    """The std per output a regression model's TargetScale divides by (a constant output's is
    1), from its metadata; None when it was trained on targets as they are."""
    decisions = predictor.metadata.get("decisions")
    stats = decisions.get("targets") if isinstance(decisions, dict) else None
    if predictor.task != "regression" or not isinstance(stats, dict) or len(stats.get("std", ())) != \
            len(predictor.labels):
        return None
    scale = TargetScale(len(predictor.labels))  # the model's own rule: a constant output is only centred
    scale.set_stats(torch.tensor(stats["mean"]), torch.tensor(stats["std"]))
    return scale.std.double().numpy()
