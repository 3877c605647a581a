"""Reporting: TensorBoard scalars and PNG plots of training curves and the confusion matrix.

Both are optional extras: ``pip install transferkit[tensorboard]`` / ``transferkit[plots]``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transferkit._io import atomic_write
from transferkit._signals import raise_if_interrupted
from transferkit.errors import ConfigError, OutputError, warn
from transferkit.outputs import check_plotting, check_png_name


class TensorBoardLogger:
    """Writes every numeric field of each history row as a scalar under ``log_dir``: losses
    under ``loss/``, accuracies under ``accuracy/``, the base learning rate as ``lr/base`` and
    each optimizer group's rate (the row's ``lr_groups``) as ``lr/<group name>``.

    Example:
        >>> tb = TensorBoardLogger("runs/exp1")  # doctest: +SKIP
        >>> tb.log_epoch({"epoch": 1, "train_loss": 0.7, "lr": 1e-3, "lr_groups": {"stem": 1e-5, "head": 1e-3}})  # doctest: +SKIP
    """

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise_if_interrupted(exc)
            raise ConfigError("log_dir= needs TensorBoard: pip install 'transferkit[tensorboard]'.") from exc
        self.log_dir = log_dir
        try:
            self.writer: Any = SummaryWriter(log_dir=str(log_dir))
        except OSError as exc:
            raise OutputError(f"Cannot write TensorBoard logs in {str(log_dir)!r} (log_dir): {exc.strerror or exc}. "
                              "Free some space or choose another log_dir.") from exc

    def _failed(self, exc: OSError) -> None:
        """A log that cannot be written (a full disk) does not stop the run: one warning, no more logging."""
        warn(f"TensorBoard logs can no longer be written in {str(self.log_dir)!r} (log_dir): "
             f"{exc.strerror or exc}; the run goes on without them.")
        self.writer = None

    def log_epoch(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        try:
            self._log_epoch(row)
        except OSError as exc:
            self._failed(exc)

    def _log_epoch(self, row: dict[str, Any]) -> None:
        step = int(row["epoch"])
        for k, v in row.items():
            if k == "lr" and isinstance(v, (int, float)):
                self.writer.add_scalar("lr/base", float(v), step)
            elif k == "lr_groups" and isinstance(v, dict):
                for name, lr in v.items():
                    self.writer.add_scalar(f"lr/{name}", float(lr), step)
            elif k != "epoch" and isinstance(v, (int, float)):
                group = "loss" if "loss" in k else ("accuracy" if "acc" in k else "misc")
                self.writer.add_scalar(f"{group}/{k}", float(v), step)
        self.writer.flush()

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        try:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(f"final/{k}", float(v), step)
            self.writer.flush()
        except OSError as exc:
            self._failed(exc)

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError as exc:
                self._failed(exc)


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (a clear error when matplotlib is missing)."""
    check_plotting()
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


class Picture(type(Path())):  # type: ignore[misc]  # PosixPath or WindowsPath: Path subclasses need the concrete one
    """The path of a PNG that transferkit wrote, which a notebook shows inline: every plot
    method returns one (it is a ``pathlib.Path``; in Jupyter its ``_repr_png_`` draws the
    picture under the cell, elsewhere it prints as the path).

    Example:
        >>> p = Picture("curves.png")
        >>> isinstance(p, Path), str(p)
        (True, 'curves.png')
    """

    def _repr_png_(self) -> bytes | None:
        try:
            return self.read_bytes()
        except OSError:  # moved or deleted since: show the path, not an error
            return None


def save_figure(fig: Any, path: str | Path) -> Picture:
    """Write ``fig`` as a PNG atomically and close it; the path returned shows the picture in a notebook.
    A path not named ``*.png`` is refused (`check_png_name`)."""
    plt = pyplot()
    try:
        check_png_name(path)
    except ConfigError:
        plt.close(fig)
        raise
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"),
                           what="plot")
    plt.close(fig)
    missing: dict[str, str] = {}  # matplotlib warns once per character a font lacks
    for w in seen:
        found = _MISSING_GLYPH.search(str(w.message))
        if found:
            missing.setdefault(chr(int(found.group(1))), found.group(2))
        else:
            warn(str(w.message), w.category)  # matplotlib's others, as they were
    if missing:
        chars = "".join(list(missing)[:5])
        warn(f"{str(out)!r}: {len(missing)} character(s) of its labels (e.g. {chars!r}) are in no installed font "
             f"({next(iter(missing.values()))}) and show as boxes; install a font that has them (e.g. Noto Sans CJK "
             "for Chinese, Japanese or Korean) to draw them.")
    return Picture(out)


# matplotlib's warning for a character no font it tried has
_MISSING_GLYPH = re.compile(r"Glyph (\d+) .*missing from (?:current )?font\(s\) (.+?)\.?$")


def plot_history(history: Sequence[dict[str, Any]], path: str | Path, *, frozen_epochs: int = 0) -> Path:
    """Loss (and accuracy, when present) per epoch for training and validation, as a PNG,
    with whole-epoch ticks. ``frozen_epochs=k`` (a run whose backbone stays frozen for its
    first k epochs, as ``fine_tune:frozen=k``) draws a dashed line where the backbone starts
    training, between epochs k and k + 1.

    Example:
        >>> plot_history([{"epoch": 1, "train_loss": 0.9}, {"epoch": 2, "train_loss": 0.5}], "curves.png")  # doctest: +SKIP
    """
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    panels = [p for p in ("loss", "acc") if any(f"train_{p}" in r or f"val_{p}" in r for r in history)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, p in zip(axes[0], panels):
        for split in ("train", "val"):
            ys = [r.get(f"{split}_{p}") for r in history]
            if any(y is not None for y in ys):
                ax.plot(epochs, ys, marker="o", label=split)
        if 0 < frozen_epochs < max(epochs, default=0):
            ax.axvline(frozen_epochs + 0.5, color="0.4", linestyle="--", linewidth=1,
                       label=f"backbone trains from epoch {frozen_epochs + 1}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy" if p == "acc" else "loss")
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)


CM_COUNTS_MAX = 30  # classes up to which each cell shows its count (beyond, a colour bar reads them)
CM_NAMES_MAX = 60  # classes up to which every class is named on the axes (beyond, every k-th)
CM_INCHES_MAX = 24.0  # the side of the largest picture: 0.6 in a class up to it (2,640 px at 110 dpi)


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], classes: Sequence[str], path: str | Path) -> Path:
    """The confusion matrix (rows: true class, columns: predicted) as a PNG: with the count in
    each cell up to `CM_COUNTS_MAX` classes, a colour bar beyond; every class named up to
    `CM_NAMES_MAX`, every k-th beyond; at most `CM_INCHES_MAX` inches a side, so that time,
    memory and pixels stay bounded for thousands of classes."""
    plt = pyplot()
    n = len(classes)
    side = min(0.6 * n, CM_INCHES_MAX)
    fig, ax = plt.subplots(figsize=(1.2 + side, 1.0 + side))
    shown = ax.imshow(matrix, cmap="Blues", interpolation="nearest")
    ticks = range(0, n, max(1, -(-n // CM_NAMES_MAX)))
    ax.set_xticks(ticks, [classes[i] for i in ticks], rotation=45 if n <= CM_NAMES_MAX else 90,
                  ha="right" if n <= CM_NAMES_MAX else "center")
    ax.set_yticks(ticks, [classes[i] for i in ticks])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n > CM_COUNTS_MAX:
        fig.colorbar(shown, ax=ax, fraction=0.04, label="count")
        return save_figure(fig, path)
    top = max((max(r) for r in matrix), default=0)
    for i in range(n):
        for j in range(n):
            v = matrix[i][j]
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    return save_figure(fig, path)


def write_reports(plots_dir: str | Path | None, history: list[dict[str, Any]], metrics: dict[str, Any],
                  classes: Sequence[str], *, frozen_epochs: int = 0) -> dict[str, Path]:
    """PNG training curves (``frozen_epochs``: see `plot_history`) and confusion matrix into
    ``plots_dir`` (needs matplotlib)."""
    if plots_dir is None:
        return {}
    from transferkit.train.reporting import plot_confusion_matrix, plot_history

    out = {}
    if history:
        out["curves"] = plot_history(history, Path(plots_dir) / "training_curves.png", frozen_epochs=frozen_epochs)
    if "confusion_matrix" in metrics:
        out["confusion_matrix"] = plot_confusion_matrix(metrics["confusion_matrix"], classes,
                                                        Path(plots_dir) / "confusion_matrix.png")
    return out
