"""Working with a finished run: result.export / predict / evaluate / plot_confusion_matrix,
transferkit.evaluate, the summary, and the pictures' layout (curves, top-losses grid)."""

from __future__ import annotations

import warnings

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tests.conftest import make_image_folder

import transferkit
from transferkit.export import read_metadata
from transferkit.train.interpret import plot_top_losses
from transferkit.train.reporting import plot_history

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    data = make_image_folder(root / "images", per_class=8, size=20)
    r = transferkit.finetune("tk:small_cnn", weights=None, data=str(data), epochs=3, batch_size=8, image_size=16,
                             policy="fine_tune", lr=1e-2, precision="fp32", num_workers=0, verbose=False,
                             export=root / "run.pt")
    return root, data, r


def test_export_after_the_fact_carries_the_runs_metadata(result, tmp_path):
    root, data, r = result
    reports = r.export(tmp_path / "late.pt", onnx=True)
    assert [rep.path for rep in reports] == [tmp_path / "late.pt", tmp_path / "late.onnx"]
    assert all(rep.max_abs_diff <= rep.tolerance for rep in reports)
    assert r.export_path == tmp_path / "late.pt"
    run, late = read_metadata(root / "run.pt"), read_metadata(tmp_path / "late.pt")
    for key in ("labels", "input_spec", "task", "training", "decisions"):
        assert late[key] == run[key], key
    assert late["training"]["best"] == r.best
    files = sorted(str(p) for p in data.rglob("*.*"))
    a, b = transferkit.load(root / "run.pt").predict(files), transferkit.load(tmp_path / "late.pt").predict(files)
    assert [p.probability for p in a] == pytest.approx([p.probability for p in b], abs=1e-6)
    with pytest.raises(transferkit.ConfigError, match="its own name"):
        r.export(tmp_path / "x.onnx", onnx=tmp_path / "x.onnx")


def test_predict_matches_the_exported_file(result, tmp_path):
    root, data, r = result
    files = sorted(str(p) for p in data.rglob("*.*"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"nope")
    got = r.predict([*files, str(broken)], top_k=2)
    want = transferkit.load(root / "run.pt").predict([*files, str(broken)], top_k=2)
    assert [g.label for g in got] == [w.label for w in want]
    # the export runs on the CPU; a model trained on a GPU predicts there, where cuDNN convolutions run TF32
    tol = 1e-3 if next(r.model.parameters()).is_cuda else 1e-5
    assert [g.probability for g in got[:-1]] == pytest.approx([w.probability for w in want[:-1]], abs=tol)
    assert [lab for g in got[:-1] for lab, _ in g.top_k] == [lab for w in want[:-1] for lab, _ in w.top_k]
    assert not got[-1].ok and got[-1].error == want[-1].error


def test_a_model_cast_to_another_dtype_still_predicts(result):
    """``r.model.double()`` (or bf16) gets its inputs in its own dtype; outputs stay float32."""
    root, data, r = result
    files = sorted(str(p) for p in data.rglob("*.*"))
    want = r.predictor().outputs(files)
    try:
        for dtype, tol in ((torch.float64, 1e-5), (torch.bfloat16, 0.05)):
            r.model.to(dtype)
            got = r.predictor().outputs(files)
            assert got.dtype == torch.float32
            assert got.numpy() == pytest.approx(want.numpy(), abs=tol), dtype
            assert r.evaluate(data).files == files
    finally:
        r.model.float()  # float32 -> float64 -> float32 is exact: the module's other tests see the same model


def test_evaluate_scores_labelled_data(result, tmp_path):
    root, data, r = result
    ev = transferkit.evaluate(root / "run.pt", data)
    files = sorted(str(p) for p in data.rglob("*.*"))
    preds = transferkit.load(root / "run.pt").predict(files)
    truth = [p.split("/")[-2] for p in files]
    assert ev.files == files
    assert ev.accuracy == pytest.approx(np.mean([p.label == t for p, t in zip(preds, truth)]))
    assert ev.confusion_matrix.sum() == len(files) and ev.report["macro avg"]["support"] == len(files)
    worst = ev.worst(3)
    losses = sorted((-np.log(max(p.top_k[0][1] if p.label == t else 1 - p.top_k[0][1], 1e-12))
                     for p, t in zip(preds, truth)), reverse=True)
    assert [w["loss"] for w in worst] == pytest.approx(losses[:3], abs=1e-5)
    assert r.evaluate(data).accuracy == pytest.approx(ev.accuracy, abs=1e-6)  # the model in memory
    assert ev.plot_confusion_matrix(tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"
    assert ev.summary().startswith(f"accuracy {ev.accuracy:.4f}")
    for model in (r, transferkit.load(root / "run.pt")):  # they run where they are: another device is refused
        assert transferkit.evaluate(model, data, device="cpu").accuracy == pytest.approx(ev.accuracy, abs=1e-6)
        with pytest.raises(transferkit.ConfigError, match="runs on cpu; device= applies to an exported file"):
            transferkit.evaluate(model, data, device="cuda")


def test_plot_confusion_matrix_and_summary(result, tmp_path):
    root, _, r = result
    assert r.plot_confusion_matrix(tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"
    text = r.summary()
    assert f"best epoch {r.best['epoch']}" in text and f"export:     {r.export_path} (verified" in text


@pytest.fixture
def drawn(monkeypatch):
    """The figures that get saved, laid out as saved (for geometry checks)."""
    figures = []
    save = Figure.savefig

    def record(fig, *args, **kwargs):
        out = save(fig, *args, **kwargs)
        figures.append(fig)
        return out

    monkeypatch.setattr(Figure, "savefig", record)
    return figures


def test_curves_have_whole_epoch_ticks_and_mark_the_frozen_phase(drawn, tmp_path):
    history = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e, "val_acc": 0.5 + e / 10} for e in (1, 2, 3)]
    plot_history(history, tmp_path / "c.png", frozen_epochs=1)
    for ax in drawn[-1].axes:
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
        assert ticks and all(float(t).is_integer() for t in ticks)
        vertical = [ln for ln in ax.get_lines() if len(set(ln.get_xdata())) == 1]
        assert [ln.get_xdata()[0] for ln in vertical] == [1.5]
    plot_history(history, tmp_path / "d.png")  # no frozen phase: no line
    assert not [ln for ax in drawn[-1].axes for ln in ax.get_lines() if len(set(ln.get_xdata())) == 1]


class _Images(torch.utils.data.Dataset):
    targets = [0, 1, 0, 1, 0, 1]

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return torch.full((3, 64, 64), 40 * i, dtype=torch.uint8), self.targets[i]


def test_top_losses_titles_do_not_cover_the_row_above(drawn, tmp_path):
    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.0]])
    plot_top_losses(logits, _Images(), ["ants", "bees"], tmp_path / "t.png", k=6)
    fig = drawn[-1]
    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # the layout as saved
    renderer = canvas.get_renderer()
    axes = [ax for ax in fig.axes if ax.images]
    assert len(axes) == 6
    for ax in axes:
        title = ax.title.get_window_extent(renderer)
        for other in axes:
            if other is not ax:
                box = other.get_window_extent(renderer)
                assert not title.overlaps(box), "a title covers another image"


def test_the_first_epoch_counts_the_feature_pass(result):
    _, _, r = result
    assert r.timings["features_s"] > 0
    assert r.history[0]["time_s"] >= r.timings["features_s"]
    assert sum(row["time_s"] for row in r.history) <= r.timings["train_s"] + 1e-6


def test_the_summary_shows_errors_of_any_scale():
    """MSE and MAE are in the targets' units: 4 decimals printed 3e-11 as 0.0000 and 1e+76 as a
    77-digit number."""
    from types import SimpleNamespace

    from transferkit.data.checks import DataReport
    from transferkit.results import result_summary

    r = SimpleNamespace(decisions=None, best={"epoch": 2, "val_loss": 4.2e-12}, history=[{}, {}], timings={},
                        stopped_early=False,
                        metrics={"mse": 3.2e-11, "mae": 2.5e76, "r2": 0.99184}, export_report=None,
                        checkpoint_path=None, compile_trial=None, plots={}, data_report=DataReport())
    text = result_summary(r)
    assert "best epoch 2 (val_loss 4.2e-12)" in text and "final:      MSE 3.2e-11, MAE 2.5e+76, R^2 0.9918" in text
    r.metrics = {"subset_accuracy": 0.5, "label_accuracy": 0.75, "micro_f1": 0.6,  # a multilabel run's
                 "probe": {"C": 0.1, "val_acc_by_C": {"0.1": 0.9, "1.0": 0.8}}}  # of a linear probe: no epochs
    text = result_summary(r)
    assert "finished in 0.0s: a logistic probe, C=0.1 the best of 2 tried" in text
    assert "subset accuracy 0.5000, label accuracy 0.7500, micro F1 0.6000" in text


def test_an_evaluation_shows_n_a_for_a_class_without_files_not_zeros():
    """A class with no file in the scored data has no recall or F1 (the macro average leaves it
    out); its row read 0.000 0.000 0.000, as if the model had failed on it."""
    ev = transferkit.Evaluation(classes=["a", "b", "c"], files=["1", "2", "3"], labels=[0, 1, 0],
                                probabilities=np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.1, 0.2, 0.7]]))
    rows = {line.split()[0]: line.split()[1:] for line in ev.summary().splitlines()[2:5]}
    assert rows["c"] == ["0.000", "n/a", "n/a", "0"]  # predicted once (wrongly): its precision is 0
    assert ev.report["macro avg"]["recall"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)  # scikit-learn's average
    assert "predicted without files, c counts 0 in recall and f1)" in ev.summary()  # which the table says
    assert rows["a"] == ["1.000", "0.500", "0.667", "2"] and rows["b"] == ["1.000", "1.000", "1.000", "1"]
    unpredicted = transferkit.Evaluation(classes=["a", "b", "c"], files=["1", "2"], labels=[0, 1],
                                         probabilities=np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0]]))
    assert unpredicted.summary().splitlines()[4].split()[1:] == ["n/a", "n/a", "n/a", "0"]
    assert "counts 0" not in unpredicted.summary()  # neither in the files nor predicted: left out of the average


def test_the_worst_files_keep_their_order_below_1e_12():
    """p(true class) of 1e-41 and 1e-38 both read as a loss of 27.63 (a clip at 1e-12), and the
    surest mistakes came in file order; the loss of logits is exact."""
    from transferkit.train.interpret import top_losses

    p_true = np.array([1e-20, 9.3e-41, 1.7e-38, 0.0], dtype=np.float32)
    probs = np.stack([p_true, 1 - p_true], 1).astype(np.float32)
    ev = transferkit.Evaluation(classes=["a", "b"], files=["f0", "f1", "f2", "f3"], labels=[0] * 4, probabilities=probs)
    assert [r["file"] for r in ev.worst(4)] == ["f3", "f1", "f2", "f0"]
    assert ev.losses[1] == pytest.approx(-np.log(9.3e-41), rel=1e-3) and np.isfinite(ev.losses).all()
    rows = top_losses(torch.tensor([[0.0, 90.0], [0.0, 95.0], [0.0, 30.0]]), [0, 0, 0], ["a", "b"], k=3)
    assert [(i, round(loss, 3)) for i, loss, *_ in rows] == [(1, 95.0), (0, 90.0), (2, 30.0)]



def test_labels_no_installed_font_draws_are_said_once_with_the_fix(tmp_path):
    """matplotlib's 'Glyph 35987 (\\N{CJK ...}) missing from font(s) DejaVu Sans.' came through, once
    per character, and the picture showed boxes without a word on what to do."""
    pytest.importorskip("matplotlib")
    from transferkit.train.reporting import plot_confusion_matrix

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        path = plot_confusion_matrix([[3, 1, 0], [0, 4, 0], [0, 0, 1]], ["貓", "犬", "dog"], tmp_path / "cm.png")
    said = [str(w.message) for w in seen]
    assert path.is_file() and len(said) == 1, said
    assert said[0].startswith(f"{str(path)!r}: 2 character(s) of its labels (e.g. '貓犬') are in no installed font")
    assert "install a font that has them" in said[0]


def test_a_confusion_matrix_of_many_classes_stays_a_bounded_picture(tmp_path):
    """The picture grew 0.6 in a class with a number in every cell: 150 classes took 30 s,
    3 GB and 7836 px a side, and some thousand classes pass matplotlib's pixel limit."""
    pytest.importorskip("matplotlib")
    from PIL import Image

    from transferkit.train.reporting import plot_confusion_matrix

    n = 200
    matrix = [[(5 if i == j else (i * j) % 3) for j in range(n)] for i in range(n)]
    big = Image.open(plot_confusion_matrix(matrix, [f"class {i}" for i in range(n)], tmp_path / "big.png"))
    small = Image.open(plot_confusion_matrix([r[:3] for r in matrix[:3]], ["a", "b", "c"], tmp_path / "small.png"))
    assert max(big.size) <= 3000 and max(small.size) < 600, (big.size, small.size)


def test_a_resumed_runs_summary_shows_the_paths_as_they_were_given(tmp_path, monkeypatch):
    """A resume reads the absolute paths its checkpoint holds; its summary showed them so
    (/home/.../out/plots/) where the first run's showed out/plots/."""
    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "images", per_class=4, size=16)

    def stop(row):
        if row["epoch"] >= 1:
            raise KeyboardInterrupt

    kw = dict(checkpoint="out/run.ckpt", plots_dir="out/plots", export="out/model.pt")
    with pytest.raises(KeyboardInterrupt):
        transferkit.finetune("tk:small_cnn", weights=None, data="images", epochs=2, image_size=16, precision="fp32",
                             num_workers=0, verbose=False, callbacks=[stop], **kw)
    text = transferkit.resume("out/run.ckpt").summary()
    for line in ("  export:     out/model.pt (", "  checkpoint: out/run.ckpt", "  plots:      out/plots/ ("):
        assert line in text, text
    assert str(tmp_path) not in text


def test_export_on_a_rank_other_than_0_writes_nothing_and_says_so(result, tmp_path):
    """Both ranks of a torchrun job calling result.export(path) raced for the file: one of them,
    rank 0 as often as not, failed on the other's lock."""
    import copy
    import dataclasses

    from transferkit.train.distributed import DistInfo

    _, _, r = result
    other = copy.copy(r)
    other.run = dataclasses.replace(r.run, dist=DistInfo(rank=1, world_size=2))
    with pytest.warns(UserWarning, match=r"on rank 1 of 2: rank 0 writes the export .* nothing was written here"):
        assert other.export(tmp_path / "m.pt") == []
    assert not (tmp_path / "m.pt").exists() and r.export(tmp_path / "m.pt")[0].path == tmp_path / "m.pt"
    for draw in ("show_results", "plot_top_losses", "plot_confusion_matrix"):  # every rank wrote the same file
        picture = tmp_path / f"{draw}.png"
        assert getattr(other, draw)(path=picture) == picture and not picture.exists()
        assert getattr(r, draw)(path=picture) == picture and picture.read_bytes()[:4] == b"\x89PNG"
