"""One progress helper for every slow step (feature extraction, training epochs, the lr
finder, folder prediction), and the live table of a training run.

Where the run is, what it shows:

- a Jupyter kernel: ``tqdm.auto``'s widget (a text bar when ipywidgets is missing), and the
  epochs as an HTML table that grows in place (`EpochLog`);
- a terminal (stderr is a tty): a tqdm bar on stderr, and one line per epoch;
- anything else (a pipe, a log file, CI): plain lines, at most one every
  ``LINE_INTERVAL_S`` seconds and only for steps that last that long (``features (train):
  120/245 img, 49%, 31 s``), and one line per epoch;
- ``verbose=False``: nothing at all.

Example:
    >>> with progress(3, "predict", unit="file", verbose=False) as bar:
    ...     for _ in range(3):
    ...         bar.update(1)
    >>> bar.n
    3
"""

from __future__ import annotations

import contextlib
import html
import importlib.util
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from transferkit._text import number

LINE_INTERVAL_S = 15.0  # off a terminal: the least time between two progress lines


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


class LineBar(NullBar):
    """Progress as plain lines for logs and CI: a line when ``interval`` seconds passed since
    the last one (so a step shorter than that prints nothing), and a closing line after a
    step that printed any.

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> bar = LineBar(4, "features", unit="img", file=out, interval=0.0)
        >>> bar.update(2); bar.close()
        >>> out.getvalue().splitlines()[0].split(",")[:2]
        ['features: 2/4 img', ' 50%']
    """

    def __init__(self, total: int | None, desc: str, *, unit: str = "it", file: Any = None,
                 interval: float = LINE_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(total)
        self.desc, self.unit, self.file, self.interval, self.clock = desc, unit, file, interval, clock
        self.start = self.last = clock()
        self.postfix = ""
        self.lines = 0

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.clock() - self.last >= self.interval:
            self._line()

    def set_postfix(self, *args: Any, refresh: bool = True, **kwargs: Any) -> None:
        items = dict(*args, **kwargs) if args or kwargs else {}
        self.postfix = ", ".join(f"{k} {v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def _line(self) -> None:
        now = self.clock()
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f", {100 * self.n / self.total:.0f}%" if self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        file = self.file if self.file is not None else sys.stderr
        print(f"{self.desc}: {done} {self.unit}{pct}, {now - self.start:.0f} s{extra}", file=file, flush=True)
        self.last = now
        self.lines += 1

    def close(self) -> None:
        if self.lines:  # a long step: say that it ended
            self._line()
            self.lines = 0


_HINTED: set[str] = set()


def _hint_once(text: str) -> None:
    """``text`` on stderr, once per process."""
    if text not in _HINTED:
        _HINTED.add(text)
        print(text, file=sys.stderr, flush=True)


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (IPython's ZMQ shell): the notebook, JupyterLab,
    VS Code's notebooks, nbclient."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:  # noqa: BLE001 - an IPython too broken to ask is not a kernel we can draw in
        return False
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def shows_progress(*, verbose: bool = True, force: bool = False) -> bool:
    """Whether `progress` draws a live bar (a terminal or a notebook, or ``force``); off those,
    ``verbose`` progress is plain periodic lines (`LineBar`)."""
    if force:
        return True
    if not verbose:
        return False
    return in_notebook() or _is_terminal(sys.stderr)


def progress(total: int | None, desc: str, *, verbose: bool = True, unit: str = "it", force: bool = False,
             leave: bool = False) -> Any:
    """A progress display of ``total`` ``unit`` s: a tqdm bar on a terminal (stderr), the
    ``tqdm.auto`` widget in a Jupyter kernel, plain periodic lines elsewhere (`LineBar`), or
    nothing (a `NullBar`) with ``verbose=False``.

    Args:
        total: the number of units to expect (``None`` when unknown).
        desc: the text left of the bar (``"features"``, ``"epoch 1/5"``, ``"lr-find"``).
        verbose: ``False`` never shows anything.
        unit: what one step counts (``"img"``, ``"file"``, ``"batch"``).
        force: a tqdm bar even when stderr is not a terminal (``predict_folder(progress=True)``).
        leave: keep the finished bar on screen (tqdm's ``leave``).

    Example:
        >>> bar = progress(10, "features", unit="img", verbose=False)
        >>> bar.update(4); bar.close()
        >>> type(bar).__name__, bar.n
        ('NullBar', 4)
    """
    if not verbose and not force:
        return NullBar(total)
    notebook = in_notebook()
    if notebook and importlib.util.find_spec("ipywidgets") is not None:
        import tqdm.notebook as tqdm_notebook

        if getattr(tqdm_notebook, "IProgress", None) is not None:  # None: an ipywidgets that does not import
            return tqdm_notebook.tqdm(total=total, desc=desc, unit=unit, leave=leave)
    if notebook:  # without ipywidgets: a text bar, which Jupyter redraws in place (tqdm.auto would warn of "jupyter")
        _hint_once("Progress bars are drawn as text here: pip install 'transferkit[notebook]' (ipywidgets) draws "
                   "them as widgets.")
    if force or notebook or _is_terminal(sys.stderr):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr, dynamic_ncols=True)
    return LineBar(total, desc, unit=unit)


# --- the epochs of a run, as they come ------------------------------------------------------------

_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "time_s")


_SPELLINGS: list[Callable[[str], str]] = []  # how the command running the API writes its settings: `spelled_as`


@contextlib.contextmanager
def spelled_as(spell: Callable[[str], str]) -> Iterator[None]:
    """Within: `spelled` text is passed through ``spell`` (the command line writes ``--set
    cache_features=False`` where Python writes ``cache_features=False``)."""
    _SPELLINGS.append(spell)
    try:
        yield
    finally:
        _SPELLINGS.remove(spell)


def spelled(text: str) -> str:
    """``text`` (a run's plan) as the command running the API spells settings (`spelled_as`)."""
    return _SPELLINGS[-1](text) if _SPELLINGS else text


def to_stderr(line: str) -> None:
    """Print ``line`` on stderr: where a run's plan and progress go, so that stdout holds what
    the caller prints (``python train.py > results.txt`` keeps the results alone)."""
    print(line, file=sys.stderr, flush=True)


class EpochLog:
    """The per-epoch report of a training run: one line per epoch (``log``, by default
    `to_stderr`) on a terminal and in logs, and in a Jupyter kernel an HTML table that grows in
    place (one display, updated through its display handle) with the best epoch in bold.

    A run of two phases (``fine_tune``) keeps one table: `epoch_log` returns the same
    ``EpochLog`` for the same ``owner`` (the run's `TrainState`).

    Example:
        >>> log = EpochLog(log=lambda line: None, notebook=False)
        >>> log.add({"epoch": 1, "train_loss": 0.5, "val_acc": 0.9, "lr": 0.01, "time_s": 1.0}, "epoch 1/2 ...")
        >>> "<td>0.9000</td>" in log.to_html()
        True
    """

    def __init__(self, *, log: Callable[[str], None] = to_stderr, notebook: bool | None = None,
                 title: str = "") -> None:
        self.log, self.title = log, title
        self.notebook = in_notebook() if notebook is None else notebook
        self.rows: list[dict[str, Any]] = []
        self.handle: Any = None
        self.best: int | None = None

    def add(self, row: dict[str, Any], line: str, *, best: int | None = None) -> None:
        """Report one epoch: ``row`` (a history row) in the table, ``line`` as text."""
        self.rows.append(row)
        self.best = best
        if not self.notebook:
            self.log(line)
            return
        from IPython.display import HTML, display

        if self.handle is None:
            self.handle = display(HTML(self.to_html()), display_id=True)
        else:
            self.handle.update(HTML(self.to_html()))

    def to_html(self) -> str:
        cols = [c for c in _COLUMNS if any(c in r for r in self.rows)]
        head = "".join(f"<th>{html.escape(c.replace('_', ' ').replace('time s', 'seconds'))}</th>" for c in cols)
        body = []
        for r in self.rows:
            cells = "".join(f"<td>{html.escape(_cell(c, r.get(c)))}</td>" for c in cols)
            style = ' style="font-weight:bold"' if self.best is not None and r.get("epoch") == self.best else ""
            body.append(f"<tr{style}>{cells}</tr>")
        caption = f"<caption>{html.escape(self.title)}</caption>" if self.title else ""
        return (f'<table class="transferkit-epochs">{caption}<thead><tr>{head}</tr></thead>'
                f"<tbody>{''.join(body)}</tbody></table>")

    def _repr_html_(self) -> str:
        return self.to_html()


def _cell(column: str, value: Any) -> str:
    if value is None:
        return ""
    if column == "epoch":
        return str(value)
    if column == "lr":
        return f"{value:.2e}"
    if column == "time_s":
        return f"{value:.1f}"
    return number(value) if isinstance(value, float) else str(value)


def epoch_log(owner: Any, *, log: Callable[[str], None] = to_stderr, title: str = "") -> EpochLog:
    """The `EpochLog` of ``owner`` (made on first use and kept on it), so that the phases of
    one run report into one table."""
    existing = getattr(owner, "_epoch_log", None)
    if isinstance(existing, EpochLog):
        return existing
    made = EpochLog(log=log, title=title)
    try:
        owner._epoch_log = made
    except AttributeError:  # an owner that takes no attributes: a log per call
        pass
    return made
