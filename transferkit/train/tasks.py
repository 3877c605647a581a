"""Tasks: what the head predicts, the loss it trains with, and how its outputs read.

Three tasks, stored as ``metadata["task"]`` in checkpoints and exports so that a
predictor applies the right output function:

- ``"multiclass"``: one label per sample, integer targets; cross-entropy (label smoothing,
  class weights); softmax at inference.
- ``"multilabel"``: any number of labels per sample, multi-hot float targets ``[C]``;
  binary cross-entropy with logits (``pos_weight`` from ``class_weights``); sigmoid.
- ``"regression"``: float targets ``[D]`` (or scalars); mean squared error; identity. With
  ``target_norm`` (the default) the head ends in a [`TargetScale`][transferkit.TargetScale] and
  the loss is the mean squared error of standardised targets (`StandardizedMSELoss`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from transferkit.config import check_task_settings
from transferkit.data.images import TransformedDataset
from transferkit.data.bundle import DataBundle, hashed_order, prepare_data, split_keys
from transferkit.data.checks import DataReport, check_label_names
from transferkit.data.images import dataset_targets
from transferkit.data.late import listing_of
from transferkit.data.target_tables import FLOAT32_MAX, is_csv, open_target_csv
from transferkit.errors import ConfigError, DataError, check_choice
from transferkit.heads import TASKS, centred_only, labels_given, output_activation



def check_task(task: str) -> str:
    """Validate a task name."""
    return check_choice("task", task, TASKS)


class StandardizedMSELoss(nn.Module):
    """The mean squared error of standardised targets, ``mean(((pred - y) / std) ** 2)``, for a
    head ending in a [`TargetScale`][transferkit.TargetScale] of that ``std``: its gradient
    reaches the layers before the scale as that of plain MSE on ``(y - mean) / std``, and every
    output weighs alike whatever its units. Its value is about ``1 - R^2`` (per output, then
    averaged; statistics of the training targets).

    Example:
        >>> StandardizedMSELoss(torch.tensor([10.0]))(torch.tensor([[12.0]]), torch.tensor([[10.0]]))
        tensor(0.0400)
    """

    def __init__(self, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("std", std.detach().clone().float().reshape(-1))

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (((pred.float() - target.float()) / self.std) ** 2).mean()


class ClassWeightedCrossEntropy(nn.CrossEntropyLoss):
    """`torch.nn.CrossEntropyLoss` with class weights some of which are 0: its mean over a batch
    whose targets all weigh 0 is 0 (with a gradient of zeros) where torch's is 0 / 0 = NaN,
    which stopped the run as a diverged loss. A weight of 0 means that such a batch teaches
    nothing.

    Example:
        >>> loss = ClassWeightedCrossEntropy(weight=torch.tensor([1.0, 0.0]))
        >>> float(loss(torch.tensor([[0.0, 3.0]]), torch.tensor([1])))
        0.0
    """

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: A002 - torch's name
        if target.dim() == 1 and not target.is_floating_point() and self.weight is not None \
                and not bool(self.weight[target].any()):
            return input.sum() * 0.0
        return super().forward(input, target)


def make_loss(task: str, *, label_smoothing: float = 0.0, class_weights: Sequence[float] | None = None,
              target_std: torch.Tensor | None = None) -> nn.Module:
    """The training loss of ``task`` (``target_std``: regression on standardised targets, see
    `StandardizedMSELoss`).

    Example:
        >>> make_loss("multiclass", label_smoothing=0.1)
        CrossEntropyLoss()
    """
    check_task(task)
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}.")
    check_task_settings(task, label_smoothing=label_smoothing, class_weights=class_weights)
    weight = None
    if class_weights is not None:
        weight = torch.as_tensor(list(class_weights), dtype=torch.float32)
        if weight.ndim != 1 or not torch.isfinite(weight).all() or (weight < 0).any():
            raise ConfigError(f"class_weights must be a list of non-negative numbers, got {class_weights!r}.")
    if task == "multiclass":
        kind = ClassWeightedCrossEntropy if weight is not None and not bool(weight.all()) else nn.CrossEntropyLoss
        return kind(weight=weight, label_smoothing=float(label_smoothing))
    if task == "multilabel":
        return nn.BCEWithLogitsLoss(pos_weight=weight)
    return nn.MSELoss() if target_std is None else StandardizedMSELoss(target_std)


def balanced_class_weights(targets: Sequence[int], num_classes: int) -> list[float]:
    """``n_samples / (n_classes * count)`` per class (scikit-learn's ``"balanced"``)."""
    counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=num_classes).astype(np.float64)
    return [float(len(targets) / (num_classes * c)) if c else 0.0 for c in counts]


def count_correct(task: str, logits: torch.Tensor, y: torch.Tensor) -> float:
    """Correct predictions in a batch: argmax for multiclass, per-label (threshold 0.5) for
    multilabel (counted as a fraction of labels per sample), 0 for regression."""
    if task == "multiclass":
        return float((logits.argmax(1) == y).sum().item())
    if task == "multilabel":  # soft targets count as their side of 0.5
        given = labels_given(output_activation("multilabel", logits))
        return float((given == (y >= 0.5)).double().mean(1).sum().item())
    return 0.0


def monitor_default(task: str) -> tuple[str, str]:
    """The validation metric that picks the best epoch, and whether higher is better."""
    return ("val_loss", "min") if task == "regression" else ("val_acc", "max")


TARGETS_CHECKED = 1024  # targets read before training (evenly spaced); every target is checked when it is loaded


def check_target(value: Any, *, task: str, width: int | None, where: str) -> torch.Tensor:
    """``value`` as a float target vector ``[width]`` (a scalar is ``[1]``), or a
    [`DataError`][transferkit.DataError] naming ``where``: numbers, one value per output
    (``width``), finite; multilabel values in [0, 1] (0/1 per label, or soft targets).

    Example:
        >>> check_target([1, 0, 1], task="multilabel", width=3, where="item 0")
        tensor([1., 0., 1.])
    """
    per = "label (multi-hot: 1 for each label the sample has, else 0)" if task == "multilabel" else "output"
    if isinstance(value, torch.Tensor) and value.dtype == torch.float32 and value.ndim == 1:
        t = value  # a loaded target (TargetDataset.convert_target): checked without converting it again
        value = _Shown(value)
    elif value is None:
        raise DataError(f"The target of {where} is None: task={task!r} needs one number per {per}; remove the "
                        "sample or give its target.")
    else:
        try:
            with np.errstate(over="ignore"):  # a finite number beyond float32's range: said below, by its value
                arr = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise DataError(f"The target of {where} is {value!r}, not numbers: task={task!r} needs one number per "
                            f"{per}.") from exc
        if arr.ndim > 1:
            raise DataError(f"The target of {where} has shape {arr.shape}; task={task!r} needs a number or a 1-d "
                            f"vector, one number per {per}.")
        t = torch.from_numpy(arr.reshape(-1).copy())
    if width is not None and t.numel() != width:
        raise DataError(f"The target of {where} has {t.numel()} values, the first training target {width}: every "
                        f"target needs one number per {per}.")
    if not torch.isfinite(t).all():
        given = np.asarray(value.t if isinstance(value, _Shown) else value, dtype=np.float64)
        if np.isfinite(given).all():  # finite as given, beyond float32's range as read
            raise DataError(f"The target of {where} ({value!r}) is beyond float32's range (+-{FLOAT32_MAX:.4g}: "
                            "targets are read as float32); rescale the targets, or remove the sample.")
        raise DataError(f"The target of {where} holds NaN or inf ({value!r}); remove the sample or fix its target.")
    if task == "multilabel" and bool(((t < 0) | (t > 1)).any()):
        raise DataError(f"The target of {where} is {value!r}; task='multilabel' needs a value in [0, 1] per label: a "
                        "multi-hot vector (for labels 0 and 2 of 4: [1, 0, 1, 0]), not label indices or counts.")
    return t


class _Shown:
    """A target tensor as the errors of `check_target` say it: its values, ``[1.0, 7.0]``."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    def __repr__(self) -> str:
        return repr(self.t.tolist())


class TargetDataset(TransformedDataset):
    """A dataset of ``(image, target)`` keeping float targets (multi-hot or regression values),
    each checked as it is loaded (`check_target`) once ``task`` and ``width`` are set.

    Example:
        >>> import torch
        >>> ds = TargetDataset([(torch.zeros(3, 8, 8, dtype=torch.uint8), [1, 0, 1])])
        >>> ds[0][1]
        tensor([1., 0., 1.])
    """

    task: str | None = None
    width: int | None = None
    what: str = ""  # "training" or "validation", for errors

    @staticmethod
    def convert_target(target: Any) -> torch.Tensor:
        if target is None:
            raise TypeError("no target")  # check_target names it
        return torch.as_tensor(np.asarray(target, dtype=np.float32)).reshape(-1)  # scalars become [1]; "3.5" too

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        if self.task is None:
            return super().__getitem__(i)
        where = f"{self.what} item {self.indices[i]}".lstrip()
        try:
            x, target = super().__getitem__(i)
        except (TypeError, ValueError):  # a target that is not numbers: said as check_target says it
            item = self.raw(i)
            if isinstance(item, (tuple, list)) and len(item) >= 2:
                check_target(item[1], task=self.task, width=self.width, where=where)
            raise
        return x, check_target(target, task=self.task, width=self.width, where=where)

    def view(self, indices: Sequence[int] | None = None, transform: Any = None) -> TargetDataset:
        out = super().view(indices, transform)
        out.task, out.width, out.what = self.task, self.width, self.what  # type: ignore[attr-defined]
        return out  # type: ignore[return-value]

    def checked(self, task: str, width: int, what: str) -> dict[int, torch.Tensor]:
        """Check every target of this dataset when it is loaded, and up to `TARGETS_CHECKED`
        of them (evenly spaced) now, so that bad targets fail before training; returns those,
        by their index in the base dataset."""
        self.task, self.width, self.what = task, width, what
        n, k = len(self), min(TARGETS_CHECKED, len(self))
        out = {}
        for i in sorted({round(j * (n - 1) / max(k - 1, 1)) for j in range(k)}):
            item = self.raw(i)
            if isinstance(item, (tuple, list)) and len(item) >= 2:
                out[self.indices[i]] = check_target(item[1], task=task, width=width,
                                                    where=f"{what} item {self.indices[i]}")
        return out

    @property
    def samples(self) -> list[tuple[Any, Any]]:
        """The ``(path, target values)`` listing of the files this dataset takes, when its base is
        one of transferkit's own listings (a CSV of targets): what lets its images be decoded once
        across epochs, loaded by worker processes, decoded on a GPU and named in reports, as
        those of class folders are. Other datasets have none (their targets come with their
        items): ``hasattr(ds, "samples")`` is False."""
        files = listing_of(self)
        if files is None:
            raise AttributeError(f"{type(self.base).__name__} is not a listing of files: its items carry no "
                                 "listing to read")
        return [files.samples[j] for j in self.indices]

    @property
    def collate_fn(self) -> Any:
        """The listing's DataLoader ``collate_fn`` (it carries back the files a worker replaced),
        when there is a listing (see `samples`)."""
        files = listing_of(self)
        if files is None:
            raise AttributeError(f"{type(self.base).__name__} is not a listing of files: default collation")
        return files.collate_fn

    @property
    def min_size(self) -> int | None:
        """The draft-mode decoding size of the listed images (None when not listed or not set)."""
        return getattr(self.base, "min_size", None)

    def listed_targets(self) -> torch.Tensor | None:
        """Every target of this dataset ``[N, D]`` in float64 (as listed: the statistics see what
        float32 would round away, e.g. 1e9 + 1), from its listing (nothing decoded), or None
        when the base dataset is not one of transferkit's own listings (its targets come with
        its items)."""
        files = listing_of(self)
        if files is None or not self.indices:
            return None
        return torch.from_numpy(np.asarray([files.samples[j][1] for j in self.indices], dtype=np.float64)).reshape(
            len(self.indices), -1)

    def raw(self, i: int) -> Any:
        """Item ``i`` of the base dataset as it is, for its target: a listed file's
        ``(path, target)`` (nothing decoded), else the whole item (a Dataset gives its targets
        with its images)."""
        j = self.indices[i]
        # transferkit's own listing (no target_transform between it and the items); any other dataset gives
        # its targets through __getitem__
        files = listing_of(self)
        return files.samples[j] if files is not None else self.base[j]


def target_scale_note(stats: dict[str, Any], names: Sequence[str], *, standardised: bool) -> str | None:
    """What to say of regression targets whose statistics ``stats`` (``mean``, ``std`` and
    ``n``, see `target_summary`) are: an output that is constant in training, and, when the
    targets are not standardised (``target_norm=False``), outputs far from mean 0 and std 1,
    which the head (starting at 0) and the MSE loss in the targets' units learn slowly or
    not at all."""
    mean, std, n = stats["mean"], stats["std"], stats["n"]
    if n < 2:  # (none: no target to read) one target: nothing varies, nothing can be learnt
        return None if n < 1 else ("One training target: a regression run learns nothing from one sample (its "
                                   "outputs are constant, and R2 is undefined). Give it more training samples.")
    constant = [j for j in range(len(mean)) if stats["constant"][j]]
    unresolved = [j for j in range(len(mean)) if not stats["constant"][j] and centred_only(mean[j], std[j])]
    far = [] if standardised else [j for j in range(len(mean)) if j not in constant + unresolved and
                                   (not 1e-2 <= std[j] <= 1e2 or abs(mean[j]) > 10 * std[j])]

    def shown(js: list[int]) -> str:
        return ", ".join(f"{names[j]!r} (mean {mean[j]:.3g}, std {std[j]:.3g})" for j in js[:5]) + \
            (" ..." if len(js) > 5 else "")
    said = []
    if constant:
        said.append(f"Regression outputs constant in the {n} training targets read: {shown(constant)}; nothing can "
                    "be learnt from the images for them.")
    if unresolved:
        said.append(f"Regression outputs that vary by less than float32 resolves at their magnitude: "
                    f"{shown(unresolved)} (targets are read as float32, about 7 significant digits); they are only "
                    "centred, not scaled. Subtract an offset (e.g. their mean) from them before training.")
    if far:
        said.append(f"Regression targets far from mean 0 and std 1: {shown(far)} (from {n} training targets), "
                    "with target_norm=False: the head starts at 0 and the MSE loss works in the targets' units, so "
                    "they train slowly or not at all. Leave target_norm='auto' (standardised in training, outputs in "
                    "the targets' units).")
    return " ".join(said) or None


def target_summary(targets: torch.Tensor) -> dict[str, Any]:
    """The mean and standard deviation (``n - 1``) of each output of ``targets`` ``[N, D]``,
    whether it is constant (every value the same), and ``n``, as plain data."""
    y = targets.double().reshape(len(targets), -1)
    std = y.std(0) if len(y) > 1 else torch.zeros(y.shape[1], dtype=torch.float64)
    return {"mean": tuple(y.mean(0).tolist()), "std": tuple(std.tolist()),
            "constant": tuple((y.amax(0) == y.amin(0)).tolist()), "n": len(y)}


def target_width(ds: TargetDataset, task: str) -> int:
    """Number of outputs implied by the first target (1 for scalar regression targets)."""
    return max(int(check_target(ds.raw(0)[1], task=task, width=None, where=f"item {ds.indices[0]}").numel()), 1)


def prepare_task_data(data: Any, val_data: Any, *, task: str, val_split: float, seed: int,
                      classes: Sequence[str] | None, min_size: int | None,
                      on_bad_file: str = "skip", scan: str = "quick",
                      cache_dir: str | Path | None = None) -> tuple[DataBundle, int]:
    """The training/validation data and the number of outputs. Multiclass data are folders or
    datasets of ``(image, int)``; multilabel and regression data are datasets of
    ``(image, target vector)`` (multi-hot, or values) or CSV files of a path and the targets
    (see `transferkit.data.target_tables`), split at random when no ``val_data``.
    ``cache_dir`` keeps the member indexes of tar shards (see `transferkit.data.shards`)."""
    if task == "multiclass":
        bundle = prepare_data(data, val_data, val_split=val_split, seed=seed, classes=classes, min_size=min_size,
                              on_bad_file=on_bad_file, scan=scan, cache_dir=cache_dir)
        return bundle, len(bundle.classes)
    report = DataReport()
    tables = dict(task=task, min_size=min_size, on_bad_file=on_bad_file, scan=scan, report=report)
    from_csv = is_csv(data)
    if from_csv:
        data = open_target_csv(data, classes=classes, **tables)
        classes = data.classes
    elif is_csv(val_data) and not classes:
        raise ConfigError(f"val_data {str(val_data)!r} names its outputs (its CSV columns) but the training Dataset "
                          "does not: give classes=[...], the CSV's column names in the order of the Dataset's target "
                          "values, so that each validation value meets its output.")
    if is_csv(val_data):
        val_data = open_target_csv(val_data, classes=classes, purpose="validation", **tables)
    for what, part in (("data", data), ("val_data", val_data)):
        if part is not None and (isinstance(part, (str, Path)) or not hasattr(part, "__getitem__")):
            name = str(part).lower() if isinstance(part, (str, Path)) else ""
            kind = ("Parquet files are" if ".parquet" in name else "tar shards are" if ".tar" in name else
                    "folders of class sub-folders are" if name and Path(part).is_dir() else "such data are")
            raise DataError(f"task={task!r} needs a Dataset of (image, target vector) pairs or a CSV file with a "
                            f"header (path, then one column per output), got {what}={part!r}; {kind} read "
                            "single-label (task='multiclass').")
    train = TargetDataset(data)
    if len(train) == 0:
        raise DataError("The training dataset is empty.")
    width = target_width(train, task)
    if classes and not from_csv:  # a CSV's names were checked when it was read
        check_label_names(list(classes), "classes=", case=False, task=task)
    names = list(classes) if classes else [str(i) for i in range(width)]
    if len(names) != width:
        raise DataError(f"classes has {len(names)} names but the targets have {width} values.")
    seen = train.checked(task, width, "training")
    val = TargetDataset(val_data) if val_data is not None else None
    val_seen = val.checked(task, width, "validation") if val is not None else {}
    if val is None and val_split:
        if not 0.0 < val_split < 1.0:
            raise DataError(f"val_split must be between 0 and 1 (exclusive), got {val_split!r}.")
        keys = split_keys(data.samples, getattr(data, "root", None)) if hasattr(data, "samples") else None
        order = hashed_order(keys, seed) if keys is not None and len(keys) == len(train) else \
            np.random.default_rng(seed).permutation(len(train)).tolist()  # files: adding one moves no other
        n_val = max(1, int(round(len(train) * val_split)))
        if n_val >= len(train):
            raise DataError(f"{len(train)} training item(s) cannot be split for validation (val_split={val_split}): "
                            "nothing would be left to train on. Give validation data (val_data=), or val_split=0.")
        train, val = train.view(sorted(order[n_val:])), train.view(sorted(order[:n_val]))
        val_seen = seen
    # the training part's targets (not validation's): a listing's all, else those read
    read = train.listed_targets()
    rows = None  # the items `read` holds, in order, where they are those read (not a listing's all)
    every = read is not None or all(i in seen for i in train.indices)  # every training target was read
    if read is None:
        rows = [i for i in train.indices if i in seen]
        read = torch.stack([seen[i] for i in rows]) if rows else None
    if task == "multilabel" and read is not None and every:
        _warn_constant_labels(read, names, report)
    if task == "regression" and read is not None:
        _warn_far_training_targets(read, lambda k: repr(str(train.samples[k][0])) if rows is None else
                                   f"training item {rows[k]}", names, report)
    if task == "regression" and read is not None and val is not None:
        _warn_far_validation_targets(read, val, val_seen, names, report)
    targets = read if task == "regression" else None
    return DataBundle(train=train, val=val, classes=names, report=report, targets=targets), width


FAR_TARGET_STDS = 1e3  # a validation target this many training stds from the training mean is named


FAR_TARGET_SPREADS = 1e4  # a training target this many robust spreads (1.4826 MAD) from the median is named


def _warn_far_training_targets(read: torch.Tensor, where: Callable[[int], str], names: Sequence[str],
                               report: DataReport) -> None:
    """Warn about training regression targets more than `FAR_TARGET_SPREADS` robust spreads
    (1.4826 times the median absolute deviation: the standard deviation of normal data, which
    one wild value does not move) from the training targets' median: a typo such as 1e9 among
    prices of 100 to 1100 set the mean and standard deviation the targets are standardised
    by, and the model predicted nonsense while its validation loss looked fine (heavy tails
    such as log-normal prices stay below the bound; an output most of whose targets are one
    value has no spread, and is not judged). ``where(k)`` names row ``k`` of ``read``."""
    y = read.double().reshape(len(read), -1)
    if len(y) < 3:
        return
    median = y.median(0).values
    spread = 1.4826 * (y - median).abs().median(0).values
    far = [(i, j) for j in range(y.shape[1]) if spread[j] > 0
           for i in torch.nonzero((y[:, j] - median[j]).abs() > FAR_TARGET_SPREADS * spread[j]).flatten().tolist()]
    if far:
        i, j = far[0]
        more = f" ({len(far) - 1} more such target(s))" if len(far) > 1 else ""
        report.warn(f"The training target {float(y[i, j]):.6g} of {where(i)} (output {names[j]!r}) lies more than "
                    f"{FAR_TARGET_SPREADS:g} times the targets' spread from their median (median "
                    f"{float(median[j]):.6g}, spread {float(spread[j]):.6g}: 1.4826 median absolute deviations)"
                    f"{more}: it dominates their mean and standard deviation (what they are standardised by) and the "
                    "squared error, so the model would learn little of the others. Check the value, or leave the item "
                    "out.")


def _warn_far_validation_targets(read: torch.Tensor, val: TargetDataset, seen: dict[int, torch.Tensor],
                                 names: Sequence[str], report: DataReport) -> None:
    """Warn about validation regression targets more than `FAR_TARGET_STDS` training standard
    deviations from the training mean (those read without decoding an image: a listing's all,
    else those `TargetDataset.checked` read): one such target dominates the validation loss
    (the squared error of standardised targets) and can overflow it to inf."""
    stats = target_summary(read)
    listed = val.listed_targets()
    if listed is not None:
        where, y = [repr(str(path)) for path, _ in val.samples], listed.double()
    else:
        at = [i for i in val.indices if i in seen]
        if not at:
            return
        where, y = [f"validation item {i}" for i in at], torch.stack([seen[i] for i in at]).double()
    far = []
    for j, (mean, std) in enumerate(zip(stats["mean"], stats["std"])):
        if std > 0:  # an output constant in training is only centred: no scale to be far by
            rows = torch.nonzero((y[:, j] - mean).abs() > FAR_TARGET_STDS * std).flatten().tolist()
            far += [(i, j, mean, std) for i in rows]
    if far:
        i, j, mean, std = far[0]
        more = f" ({len(far) - 1} more such target(s))" if len(far) > 1 else ""
        report.warn(f"The validation target {float(y[i, j]):.6g} of {where[i]} (output {names[j]!r}) lies more than "
                    f"{FAR_TARGET_STDS:g} training standard deviations from the training targets' mean (mean "
                    f"{mean:.6g}, std {std:.6g}){more}: it dominates the validation loss and can overflow it to inf. "
                    "Check the value, or leave the item out of the validation data.")


def constant_labels(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which multilabel labels are always, and which never, present in ``targets`` ``[N, C]``
    (on their side of 0.5), as two boolean masks ``[C]``.

    Example:
        >>> [m.tolist() for m in constant_labels(torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))]
        [[True, False, False], [False, True, False]]
    """
    side = targets >= 0.5
    return side.all(0), ~side.any(0)


def _warn_constant_labels(targets: torch.Tensor, names: Sequence[str], report: DataReport) -> None:
    """Warn about multilabel labels that are always, or never, present in the training targets
    (all of them): nothing tells the images where they apply."""
    present, absent = constant_labels(targets)
    always = [names[j] for j in range(len(names)) if present[j]]
    never = [names[j] for j in range(len(names)) if absent[j]]
    if always or never:
        said = [f"always present: {always[:10]}"] * bool(always) + [f"never present: {never[:10]}"] * bool(never)
        report.warn(f"Labels constant in the {len(targets)} training targets ({'; '.join(said)}); nothing can be "
                    "learnt from the images for them.")


def resolve_class_weights(class_weights: Any, task: str, bundle: DataBundle) -> list[float] | None:
    """``None``, a list, or ``"balanced"`` (multiclass: inverse class frequency; multilabel:
    negatives / positives per label, as ``pos_weight``; 1 for a label that is always or never
    present in training, where the ratio would switch its loss off or inflate it)."""
    if class_weights is None:
        return None
    n = len(bundle.classes)
    if not isinstance(class_weights, str):
        if len(class_weights) != n:
            raise ConfigError(f"class_weights has {len(class_weights)} values but the data have {n} classes "
                              f"({', '.join(bundle.classes[:10])}{', ...' if n > 10 else ''}); give one weight per "
                              "class, in that order, or class_weights='balanced'.")
        return [float(w) for w in class_weights]
    if class_weights != "balanced":
        raise ConfigError(f"class_weights must be None, a list of numbers or 'balanced', got {class_weights!r}.")
    if task == "multiclass":
        return balanced_class_weights(dataset_targets(bundle.train), len(bundle.classes))
    if task == "multilabel":  # pos_weight = negatives / positives; 1 (no reweighting) for a label constant in training
        y = _targets(bundle.train)  # type: ignore[arg-type]
        present, absent = constant_labels(y)
        ratio = (len(y) - y.sum(0)) / y.sum(0).clamp(min=1)
        return torch.where(present | absent, torch.ones(y.shape[1]), ratio).tolist()
    raise ConfigError("class_weights do not apply to task='regression'.")


def _targets(ds: TargetDataset) -> torch.Tensor:
    listed = ds.listed_targets()
    if listed is not None:
        return listed
    return torch.stack([torch.as_tensor(np.asarray(ds.raw(i)[1], dtype=np.float32)).reshape(-1)
                        for i in range(len(ds))])
