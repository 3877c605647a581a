"""transferkit._progress: a bar on a terminal, plain periodic lines off a terminal, nothing
with verbose=False; the epochs as lines, or as a live HTML table in a notebook."""

import io
import sys

from transferkit._progress import EpochLog, LineBar, NullBar, epoch_log, in_notebook, progress, shows_progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_on_a_terminal_lines_in_a_pipe_and_nothing_when_quiet(monkeypatch):
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    with progress(5, "features", unit="img", leave=True) as bar:
        bar.update(5)
    assert type(bar).__name__ == "tqdm" and "features" in term.getvalue() and "5/5" in term.getvalue()
    quiet = progress(5, "features", verbose=False)
    assert isinstance(quiet, NullBar) and not isinstance(quiet, LineBar)

    pipe = io.StringIO()  # not a terminal: plain lines, none for a step shorter than the interval
    monkeypatch.setattr(sys, "stderr", pipe)
    bar = progress(3, "lr-find", unit="batch")
    bar.update(2)
    bar.set_postfix(loss=0.5)
    bar.close()
    assert isinstance(bar, LineBar) and bar.n == 2 and pipe.getvalue() == ""
    assert not shows_progress() and shows_progress(force=True) and not shows_progress(verbose=False)
    forced = progress(2, "predict", force=True, leave=True)
    forced.update(2)
    forced.close()
    assert "2/2" in pipe.getvalue()


def test_off_a_terminal_a_long_step_prints_a_line_per_interval_and_one_at_the_end():
    now = [0.0]
    out = io.StringIO()
    bar = LineBar(100, "features (train)", unit="img", file=out, interval=10.0, clock=lambda: now[0])
    for _ in range(10):
        now[0] += 4.0  # 4 s per update of 10 images: a line every third update
        bar.update(10)
    bar.set_postfix(loss="0.123")
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "features (train): 30/100 img, 30%, 12 s"
    assert len(lines) == 4 and lines[-1] == "features (train): 100/100 img, 100%, 40 s, loss 0.123"


def test_not_in_a_notebook_here():
    assert not in_notebook()  # pytest is no Jupyter kernel: lines and bars, no widgets


def test_epochs_print_as_lines_off_a_notebook_and_render_as_one_table():
    lines = []
    state = type("State", (), {})()
    log = epoch_log(state, log=lines.append)
    log.add({"epoch": 1, "train_loss": 0.7, "val_acc": 0.8, "lr": 1e-2, "time_s": 2.0}, "epoch 1/2 ...", best=1)
    again = epoch_log(state, log=lines.append)  # the next phase of the same run: the same log
    again.add({"epoch": 2, "train_loss": 0.5, "val_acc": 0.9, "lr": 1e-3, "time_s": 3.0}, "epoch 2/2 ...", best=2)
    assert again is log and lines == ["epoch 1/2 ...", "epoch 2/2 ..."]
    table = log.to_html()
    assert table.count("<tr") == 3 and "<th>val acc</th>" in table and "<td>1.00e-02</td>" in table
    assert '<tr style="font-weight:bold"><td>2</td>' in table  # the best epoch stands out
    assert EpochLog(notebook=False)._repr_html_().startswith("<table")


def test_the_epoch_bar_counts_the_samples_its_batches_hold():
    # training drops a short last batch: the bar's total is what the epoch runs, so it reaches 100%
    import torch
    from transferkit.train.loaders import make_loader
    from transferkit.train.loop import _progress

    data = torch.utils.data.TensorDataset(torch.zeros(18, 2), torch.zeros(18))
    cpu = torch.device("cpu")
    dropped = make_loader(data, batch_size=4, shuffle=True, device=cpu, num_workers=0, drop_last=True)
    kept = make_loader(data, batch_size=4, shuffle=False, device=cpu, num_workers=0)
    assert _progress(dropped, "epoch 1/2", False, "img").total == 16 == sum(len(y) for _, y in dropped)
    assert _progress(kept, "val", False, "img").total == 18


def test_a_notebook_without_ipywidgets_gets_a_text_bar_and_the_extra_to_install(monkeypatch, capsys):
    import transferkit._progress as prog

    monkeypatch.setattr(prog, "in_notebook", lambda: True)
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # as where the [notebook] extra is not installed
    monkeypatch.setattr(prog, "_HINTED", set())
    for _ in range(2):
        with prog.progress(3, "features", unit="img", leave=True) as bar:
            bar.update(3)
        assert type(bar).__name__ == "tqdm" and type(bar).__module__ == "tqdm.std"
    err = capsys.readouterr().err
    assert err.count("pip install 'transferkit[notebook]' (ipywidgets)") == 1 and "3/3" in err
    assert "update jupyter" not in err.lower()


def test_a_notebook_whose_ipywidgets_does_not_import_gets_a_text_bar(monkeypatch, tmp_path, capsys):
    import transferkit._progress as prog

    (tmp_path / "ipywidgets").mkdir()
    (tmp_path / "ipywidgets" / "__init__.py").write_text("raise ImportError('a broken install')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "ipywidgets", raising=False)
    monkeypatch.setattr(prog, "in_notebook", lambda: True)
    with prog.progress(2, "features", unit="img", leave=True) as bar:
        bar.update(2)
    assert type(bar).__module__ == "tqdm.std" and "2/2" in capsys.readouterr().err
