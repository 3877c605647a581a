"""transferkit._progress: a bar on a terminal, nothing off a terminal or with verbose=False."""

import io
import sys

from transferkit._progress import NullBar, progress, shows_progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_on_a_terminal_and_none_in_a_pipe(monkeypatch):
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    with progress(5, "features", unit="img", leave=True) as bar:
        bar.update(5)
    assert type(bar).__name__ == "tqdm" and "features" in term.getvalue() and "5/5" in term.getvalue()
    quiet = progress(5, "features", verbose=False)
    assert isinstance(quiet, NullBar)

    pipe = io.StringIO()  # not a terminal: nothing is written, the count still advances
    monkeypatch.setattr(sys, "stderr", pipe)
    bar = progress(3, "lr-find", unit="batch")
    bar.update(2)
    bar.set_postfix(loss=0.5)
    bar.close()
    assert isinstance(bar, NullBar) and bar.n == 2 and pipe.getvalue() == ""
    assert not shows_progress() and shows_progress(force=True) and not shows_progress(verbose=False)
    forced = progress(2, "predict", force=True, leave=True)
    forced.update(2)
    forced.close()
    assert "2/2" in pipe.getvalue()
