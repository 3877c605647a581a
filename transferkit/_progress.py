"""One progress-bar helper for every slow step (feature extraction, training epochs, the
lr finder, folder prediction): a tqdm bar on stderr when stderr is a terminal, nothing
at all otherwise (a pipe, a log file, CI) or when the caller passes ``verbose=False``.

Example:
    >>> with progress(3, "predict", unit="file", verbose=False) as bar:
    ...     for _ in range(3):
    ...         bar.update(1)
    >>> bar.n
    3
"""

from __future__ import annotations

import sys
from typing import Any


class NullBar:
    """What `progress` returns when no bar is shown: the part of tqdm's interface
    transferkit uses (``update``, ``set_postfix``, ``close``, a context manager), counting
    but drawing nothing."""

    def __init__(self, total: int | None = None) -> None:
        self.total, self.n = total, 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> NullBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def shows_progress(*, verbose: bool = True, force: bool = False) -> bool:
    """Whether `progress` would draw a bar: ``force``, or ``verbose`` and a terminal on stderr."""
    if force:
        return True
    if not verbose:
        return False
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def progress(total: int | None, desc: str, *, verbose: bool = True, unit: str = "it", force: bool = False,
             leave: bool = False) -> Any:
    """A tqdm bar of ``total`` ``unit`` s on stderr, or a `NullBar`.

    Args:
        total: the number of units to expect (``None`` when unknown).
        desc: the text left of the bar (``"features"``, ``"epoch 1/5"``, ``"lr-find"``).
        verbose: ``False`` never draws; ``True`` draws when stderr is a terminal.
        unit: what one step counts (``"img"``, ``"file"``, ``"batch"``).
        force: draw even when stderr is not a terminal (``predict_folder(progress=True)``).
        leave: keep the finished bar on screen (tqdm's ``leave``).

    Example:
        >>> bar = progress(10, "features", unit="img", verbose=False)
        >>> bar.update(4); bar.close()
        >>> type(bar).__name__, bar.n
        ('NullBar', 4)
    """
    if not shows_progress(verbose=verbose, force=force):
        return NullBar(total)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr, dynamic_ncols=True)
