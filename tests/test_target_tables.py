"""Multilabel and regression data from CSV files: path, then one column per output."""

from __future__ import annotations

import csv as csv_module
import io
import json
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import transferkit as tk
from tests.conftest import damaged_png
from transferkit.backbones._base import InputSpec
from transferkit.data.gpu_jpeg import DeviceDecodedLoader
from transferkit.data.checks import DataReport
from transferkit.data.sampling import default_num_workers
from transferkit.data.target_tables import scan_target_csv
from transferkit.train.tasks import prepare_task_data
from transferkit.errors import DataError

pytestmark = pytest.mark.precision_auto  # trained scores depend on what the CPU's bf16 support decides

COMMON = dict(weights=None, image_size=16, device="cpu", num_workers=0, batch_size=8, verbose=False)
COLOURS = ("red", "green", "blue")


@pytest.fixture
def table(tmp_path):
    """40 flat-colour images and their levels; ``write(name, header, row)`` writes a CSV of them."""
    levels = np.random.default_rng(0).uniform(0, 1, (40, 3))
    for i, lv in enumerate(levels):
        Image.fromarray((np.ones((12, 12, 3)) * lv * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")

    def write(name, header, row, n=len(levels)):
        lines = [header] + [f"{i}.png,{row(levels[i])}" for i in range(n)]
        (tmp_path / name).write_text("\n".join(lines) + "\n")
        return tmp_path / name

    write.levels, write.root = levels, tmp_path
    return write


def test_regression_from_a_csv_trains_on_its_columns(table):
    csv = table("r.csv", "path,red,green", lambda lv: f"{lv[0] * 100 + 50:.5f},{lv[1] * 100:.5f}")
    r = tk.finetune("tk:small_cnn", data=csv, task="regression", policy="full", epochs=6, lr=1e-2, **COMMON)
    assert r.classes == ["red", "green"] and r.metrics["r2"] > 0.3
    # classes= picks and orders the columns
    d = tk.plan("tk:small_cnn", data=csv, task="regression", classes=["green"], val_split=0, **COMMON)
    assert d.classes == ("green",) and d.num_outputs == 1
    assert d.target_norm["mean"][0] == pytest.approx(table.levels[:, 1].mean() * 100, rel=1e-4)


def test_multilabel_from_columns_or_from_label_lists_reads_the_same_targets(table):
    columns = table("m.csv", "path,red,green,blue", lambda lv: ",".join(str(int(x > 0.5)) for x in lv))
    lists = table("l.csv", "path,labels", lambda lv: ";".join(c for c, x in zip(COLOURS, lv) if x > 0.5))
    a, names_a = scan_target_csv(columns, task="multilabel")
    b, names_b = scan_target_csv(lists, task="multilabel", classes=list(COLOURS))
    assert names_a == names_b == list(COLOURS) and a == b
    assert a[0][1] == tuple(float(x > 0.5) for x in table.levels[0])
    assert scan_target_csv(lists, task="multilabel")[1] == sorted(COLOURS)  # names the rows use, sorted
    r = tk.finetune("tk:small_cnn", data=lists, task="multilabel", classes=list(COLOURS), policy="full", epochs=6,
                    lr=3e-2, export=table.root / "ml.pt", **COMMON)
    assert r.classes == list(COLOURS) and r.metrics["label_accuracy"] > 0.6
    # scored on either layout of the same targets, as the predictor reads the files
    ev = tk.evaluate(r.export_path, columns, progress=False)
    assert isinstance(ev, tk.TargetEvaluation) and ev.task == "multilabel" and len(ev.files) == 40
    probabilities = tk.load(r.export_path).outputs(ev.files).numpy()
    assert np.allclose(ev.outputs, probabilities, atol=1e-6)
    assert ev.metrics["label_accuracy"] == pytest.approx(((probabilities >= 0.5) == (ev.targets >= 0.5)).mean())
    assert tk.evaluate(r.export_path, lists, progress=False).metrics == ev.metrics
    first = ev.worst(1)[0]
    assert first["loss"] == pytest.approx(ev.losses.max()) and set(first["true"]) <= set(COLOURS)
    # a label absent from the data: no recall or F1 (n/a, as for classes); none anywhere: no F1 at all
    quiet = tk.TargetEvaluation("multilabel", ["red", "green"], ["a.png", "b.png"], np.array([[1.0, 0], [0, 0]]),
                                np.array([[0.9, 0.1], [0.2, 0.3]]))
    lines = quiet.summary(worst=0).splitlines()
    assert lines[0].startswith("label accuracy 1.0000, subset accuracy 1.0000, micro F1 1.0000, macro F1 1.0000")
    assert lines[3].split() == ["green", "n/a", "n/a", "n/a", "0"]
    none = tk.TargetEvaluation("multilabel", ["defect"], ["a.png"], np.zeros((1, 1)), np.full((1, 1), 0.01))
    assert "micro F1 n/a, macro F1 n/a" in none.summary() and none.metrics["macro_f1"] != none.metrics["macro_f1"]
    assert none.to_dict()["macro_f1"] is None and json.dumps(none.to_dict(), allow_nan=False)  # plain JSON: null


def test_label_lists_of_validation_data_use_the_training_labels(table):
    train = table("train.csv", "path,labels", lambda lv: ";".join(c for c, x in zip(COLOURS, lv) if x > 0.5))
    val = table("val.csv", "path,labels", lambda lv: "red;purple" if lv[0] > 0.5 else "", n=10)
    with pytest.warns(UserWarning, match=r"names labels \['purple'\] that are not among the classes"):
        d = tk.plan("tk:small_cnn", data=train, val_data=val, task="multilabel", **COMMON)
    assert d.classes == tuple(sorted(COLOURS)) and d.n_val == 10
    import unicodedata

    decomposed = unicodedata.normalize("NFD", "café")  # as macOS writes it; classes= composed
    mixed = table("nfd.csv", "path,labels", lambda lv: decomposed if lv[0] > 0.5 else "dog", n=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not among the classes ['café', ...]" for café itself
        targets, names = scan_target_csv(mixed, task="multilabel", classes=["café", "dog"])
    assert names == ["café", "dog"] and [t for _, t in targets] == [(1.0, 0.0) if lv[0] > 0.5 else (0.0, 1.0)
                                                                    for lv in table.levels[:10]]
    columns = table("rg.csv", "path,red,green", lambda lv: f"{lv[0]:.3f},{lv[1]:.3f}")
    fewer = table("r.csv", "path,red", lambda lv: f"{lv[0]:.3f}", n=10)
    with pytest.raises(DataError, match=r"has no column 'green' \(the training data's outputs are \['red', 'green'\]: "
                                        r"the validation CSV needs a column for each\)"):
        tk.plan("tk:small_cnn", data=columns, val_data=fewer, task="regression", **COMMON)


@pytest.mark.parametrize("header, row, said", [
    ("image,age", lambda lv: "3", "needs a header row for task='regression': 'path' and then one column per output"),
    ("path,age", lambda lv: "tall" if lv[0] > 0.9 else "3", r"row \d+, column 'age': 'tall' is not a finite number"),
    ("path,age", lambda lv: "nan", r"row 2, column 'age': 'nan' is not a finite number"),
    ("path,age,age", lambda lv: "1,2", r"need a name each, each name once"),
    ("path,age", lambda lv: "1,2", r"rows \[2, 3, 4, 5, 6\] do not have the header's 2 columns"),
])
def test_bad_regression_tables_are_named(table, header, row, said):
    with pytest.raises(DataError, match=said):
        tk.plan("tk:small_cnn", data=table("bad.csv", header, row), task="regression", **COMMON)


def test_bad_multilabel_values_missing_columns_files_and_contradictions_are_named(table):
    csv = table("m.csv", "path,red,green", lambda lv: "2,0" if lv[0] > 0.9 else "1,0")
    with pytest.raises(DataError, match=r"column 'red': '2' is not 1 or 0 \(or a soft target in \[0, 1\]\)"):
        tk.plan("tk:small_cnn", data=csv, task="multilabel", **COMMON)
    ok = table("ok.csv", "path,red,green", lambda lv: "1,0")
    with pytest.raises(DataError, match=r"has no column 'blue' \(classes= names the columns to read\); its columns "
                                         r"are \['red', 'green'\]"):
        tk.plan("tk:small_cnn", data=ok, task="multilabel", classes=["red", "blue"], **COMMON)
    for other in ("0.png", "sub/../0.png", str(table.root / "0.png")):  # one file however spelled
        (table.root / "twice.csv").write_text(f"path,age\n0.png,1\n1.png,2\n{other},3\n")
        with pytest.raises(DataError, match=r"lists '.*0.png' twice \(however spelled\) with different targets "
                                             r"\(\(1.0,\) and \(3.0,\), row 4"):
            tk.plan("tk:small_cnn", data=table.root / "twice.csv", task="regression", **COMMON)
    (table.root / "gone.csv").write_text("path,age\n0.png,1\nnone.png,2\n")
    with pytest.raises(DataError, match="lists 1 missing file"):
        tk.plan("tk:small_cnn", data=table.root / "gone.csv", task="regression", **COMMON)


def test_a_bad_image_in_a_table_is_left_out_and_reported(table):
    csv = table("r.csv", "path,age", lambda lv: f"{lv[0]:.4f}")
    (table.root / "7.png").write_bytes(b"not an image")
    r = tk.finetune("tk:small_cnn", data=csv, task="regression", epochs=1, val_split=0, **COMMON)
    assert [str(p).rsplit("/", 1)[-1] for p, _ in r.data_report.bad_files] == ["7.png"]
    assert r.decisions.n_train == 39


@pytest.mark.parametrize("policy", ["feature_extraction", "full"])
def test_a_validation_file_that_fails_to_load_is_scored_with_the_target_of_the_file_in_its_place(table, policy):
    """A validation image that passes the scan and fails to decode is replaced by the next
    readable file with its label. The final regression metrics scored that file's prediction
    against the broken file's listed target (100.0 here): MSE about 760 for a model whose
    validation loss said R^2 0.9."""
    train = table("train.csv", "path,y", lambda lv: f"{lv[0]:.4f}", n=30)
    rows = [f"{i}.png,{table.levels[i][0]:.4f}" for i in range(30, 40)]
    damaged_png(table.root / "broken.png")
    (table.root / "val.csv").write_text("path,y\n" + "\n".join(rows[:5] + ["broken.png,100.0"] + rows[5:]) + "\n")
    with pytest.warns(UserWarning):
        r = tk.finetune("tk:small_cnn", data=train, val_data=table.root / "val.csv", task="regression", policy=policy,
                        epochs=2, **COMMON)
    assert [p.rsplit("/", 1)[-1] for p, _ in r.data_report.bad_files] == ["broken.png"]
    assert r.metrics["mse"] < 1.0, r.metrics  # targets in [0, 1]: no prediction is scored against 100.0


def test_targets_and_identity_of_a_table_are_read_without_decoding_its_images(table, tmp_path):
    """The target pre-check and the data's fingerprint read a listed file's target from the
    listing: a plan with scan='none' over files that are not images succeeds (nothing is
    decoded before training)."""
    csv = table("r.csv", "path,age", lambda lv: f"{lv[0]:.4f}")
    for i in range(40):
        (table.root / f"{i}.png").write_bytes(b"not an image")
    d = tk.plan("tk:small_cnn", data=csv, task="regression", scan="none", **COMMON)
    assert d.n_train == 32 and d.target_norm["n"] == 32
    cached = tk.plan("tk:small_cnn", data=csv, task="regression", scan="none", cache_dir=tmp_path / "c", **COMMON)
    assert set(cached.data_fingerprints) == {"train", "val"}


def test_the_feature_cache_key_of_a_table_follows_its_targets(table, tmp_path):
    csv = table("r.csv", "path,age", lambda lv: f"{lv[0]:.4f}")
    first = tk.plan("tk:small_cnn", data=csv, task="regression", cache_dir=tmp_path / "c", **COMMON)
    again = tk.plan("tk:small_cnn", data=csv, task="regression", cache_dir=tmp_path / "c", **COMMON)
    assert first.data_fingerprints == again.data_fingerprints
    text = csv.read_text().replace("0.png,", "0.png,9", 1)
    csv.write_text(text)
    changed = tk.plan("tk:small_cnn", data=csv, task="regression", cache_dir=tmp_path / "c", **COMMON)
    assert changed.data_fingerprints["train"] != first.data_fingerprints["train"]


def test_the_cli_trains_regression_from_a_csv(table, capsys):
    from transferkit.cli import main

    csv = table("r.csv", "path,age", lambda lv: f"{lv[0] * 1000:.3f}")
    main(["finetune", "--data", str(csv), "--task", "regression", "--backbone", "tk:small_cnn", "--weights", "None",
          "--image-size", "16", "--epochs", "1", "--dry-run", "--set", "num_workers=0"])
    decided = json.loads(capsys.readouterr().out)["decisions"]  # piped: JSON
    assert decided["task"] == "regression" and decided["classes"] == ["age"] and decided["head"]["target_norm"]


def test_a_regression_model_is_evaluated_on_a_csv_of_its_targets(table, capsys):
    from transferkit.cli import main

    csv = table("r.csv", "path,red,green", lambda lv: f"{lv[0] * 100 + 50:.5f},{lv[1] * 100:.5f}")
    r = tk.finetune("tk:small_cnn", data=csv, task="regression", policy="full", epochs=2, lr=1e-2,
                    export=table.root / "reg.pt", **COMMON)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Asked for the top 2 labels of a regression model" was said, unasked
        ev = tk.evaluate(r.export_path, csv, progress=False)
    values = tk.load(r.export_path).outputs(ev.files).numpy()
    y = np.stack([table.levels[:, 0] * 100 + 50, table.levels[:, 1] * 100], 1)
    assert np.allclose(ev.outputs, values, rtol=1e-5) and np.allclose(ev.targets, y, atol=1e-4)
    assert ev.metrics["per_output"]["green"]["mae"] == pytest.approx(np.abs(values[:, 1] - y[:, 1]).mean(), rel=1e-4)
    assert ev.metrics["mae"] == pytest.approx(np.abs(values - y).mean(), rel=1e-4)
    assert "R^2" in ev.summary() and "green" in ev.summary()
    main(["evaluate", str(r.export_path), str(csv), "--worst", "2"])
    record = json.loads(capsys.readouterr().out)  # piped: JSON
    assert record["task"] == "regression" and len(record["worst"]) == 2 and "confusion_matrix_png" not in record
    assert main(["inspect", str(r.export_path)]) == 0
    mean = r.decisions.target_norm["mean"][0]
    assert f"trained standardised (red mean {mean:.6g} std" in capsys.readouterr().out
    with pytest.raises(DataError, match="A regression model is scored on a CSV of its targets"):
        tk.evaluate(r.export_path, table.root, progress=False)
    # refused before any file is read: the data path is not even looked at
    assert main(["evaluate", str(r.export_path), "nowhere.csv", "--confusion-matrix", str(table.root / "cm.png")]) == 2
    assert "--confusion-matrix applies to single-label classifiers" in capsys.readouterr().err
    # outputs named like the CSV's own columns get value_ columns: a reader by name gets the values
    import shutil

    from transferkit.export import update_metadata

    shutil.copy(r.export_path, table.root / "named.pt")
    update_metadata(table.root / "named.pt", {"labels": ["error", "path"]})
    assert main(["predict", str(table.root / "named.pt"), str(ev.files[0]), "--csv"]) == 0
    row = next(csv_module.DictReader(io.StringIO(capsys.readouterr().out)))
    assert list(row) == ["path", "value_error", "value_path", "error"] and row["error"] == ""
    assert [float(row["value_error"]), float(row["value_path"])] == pytest.approx(values[0].tolist(), rel=1e-5)
    # the per-file loss is the training loss: each output in units of the std the model standardised it by
    scale = r.model.head[-1].std.double().numpy()
    assert np.allclose(ev.scale, scale) and np.allclose(ev.losses, (((values - y) / scale) ** 2).mean(1), rtol=1e-4)
    # an output constant in these data has no R^2 (NaN in Python, null in JSON); one file has none at all
    flat = table("flat.csv", "path,red,green", lambda lv: f"{lv[0] * 100 + 50:.5f},40")
    m = tk.evaluate(r.export_path, flat, progress=False).metrics
    assert np.isnan(m["per_output"]["green"]["r2"]) and m["r2"] == pytest.approx(m["per_output"]["red"]["r2"])
    one = table("one.csv", "path,red,green", lambda lv: "100,50", n=1)
    main(["evaluate", str(r.export_path), str(one)])
    strict = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert strict["r2"] is None and strict["per_output"]["red"]["r2"] is None
    missing = table("red_only.csv", "path,red", lambda lv: "100")
    with pytest.raises(DataError, match=r"has no column 'green' \(the model's outputs are \['red', 'green'\]: the "
                                         r"CSV needs a column for each\)"):
        tk.evaluate(r.export_path, missing, progress=False)


def test_a_dataset_listing_samples_of_its_own_gives_its_targets_through_getitem(tmp_path):
    """A torchvision ImageFolder has `samples` of class indices; its target_transform makes the
    targets: they are read through __getitem__, for the statistics and for the data's identity."""
    from torchvision.datasets import ImageFolder

    from conftest import make_image_folder

    root = make_image_folder(tmp_path / "images", per_class=6)
    scaled = ImageFolder(str(root), target_transform=lambda c: 1000.0 * c + 5000.0)
    d = tk.plan("tk:small_cnn", data=scaled, task="regression", val_split=0, cache_dir=tmp_path / "c", **COMMON)
    assert d.target_norm["mean"][0] == pytest.approx(5500.0) and d.target_norm["std"][0] > 400
    flipped = ImageFolder(str(root), target_transform=lambda c: 6000.0 - 1000.0 * c)
    other = tk.plan("tk:small_cnn", data=flipped, task="regression", val_split=0, cache_dir=tmp_path / "c", **COMMON)
    assert other.data_fingerprints["train"] != d.data_fingerprints["train"]  # other targets: other cached data


def test_tiny_targets_are_scaled_and_huge_ones_below_float32_resolution_are_named(table):
    tiny = table("tiny.csv", "path,y", lambda lv: f"{lv[0] * 1e-9:.6e}")
    d = tk.plan("tk:small_cnn", data=tiny, task="regression", val_split=0, **COMMON)
    assert d.notes == () and 1e-10 < d.target_norm["std"][0] < 1e-9
    r = tk.finetune("tk:small_cnn", data=tiny, task="regression", val_split=0, epochs=1, **COMMON)
    assert float(r.model.head[-1].std) == pytest.approx(d.target_norm["std"][0], rel=1e-5)
    huge = table("huge.csv", "path,y", lambda lv: f"{1e9 + lv[0] * 100:.3f}")
    d = tk.plan("tk:small_cnn", data=huge, task="regression", val_split=0, **COMMON)
    assert any("vary by less than float32 resolves at their magnitude" in n and "Subtract an offset" in n
               for n in d.notes)
    units = table("units.csv", "path,y", lambda lv: f"{1e9 + lv[0] % 4:.0f}")  # 1e9 + a few units: float32 rounds
    d = tk.plan("tk:small_cnn", data=units, task="regression", val_split=0, **COMMON)  # them all to 1e9
    assert d.target_norm["constant"] == (False,) and d.target_norm["std"][0] > 0.3
    assert any("vary by less than float32 resolves" in n for n in d.notes) and not any("constant" in n for n in d.notes)
    # scored as listed, as transferkit.evaluate scores them (against the float32-rounded 1e9 the MSE was 0)
    with pytest.warns(UserWarning, match="float32 resolves"):
        r = tk.finetune("tk:small_cnn", data=units, val_data=units, task="regression", epochs=1,
                        export=table.root / "units.pt", **COMMON)
    scored = tk.evaluate(table.root / "units.pt", units)
    assert r.metrics["mse"] > 0.1 and r.metrics["mse"] == pytest.approx(scored.metrics["mse"], rel=1e-4)


def test_a_split_that_leaves_nothing_to_train_on_is_refused(table):
    one = table("one.csv", "path,y", lambda lv: "1.0", n=1)
    with pytest.raises(DataError, match=r"1 training item\(s\) cannot be split for validation"):
        tk.plan("tk:small_cnn", data=one, task="regression", **COMMON)
    assert tk.plan("tk:small_cnn", data=one, task="regression", val_split=0, **COMMON).n_train == 1


def test_a_csv_of_validation_targets_needs_the_names_of_a_dataset_s_outputs(table):
    from test_api import Scaled

    val = table("val.csv", "path,green,red", lambda lv: f"{lv[1]:.3f},{lv[0]:.3f}")
    with pytest.raises(tk.ConfigError, match=r"give classes=\[\.\.\.\], the CSV's column names in the order of the "
                                             "Dataset's target values"):
        tk.plan("tk:small_cnn", data=Scaled(20, outputs=2), val_data=val, task="regression", **COMMON)
    d = tk.plan("tk:small_cnn", data=Scaled(20, outputs=2), val_data=val, task="regression", classes=["red", "green"],
                **COMMON)
    assert d.classes == ("red", "green") and d.n_val == 40


def test_a_table_of_values_read_for_classes_says_which_task_reads_it(table):
    values = table("values.csv", "path,age", lambda lv: f"{lv[0] * 80:.2f}")
    with pytest.raises(DataError, match="has the header 'path,age'.*task='regression' or task='multilabel'"):
        tk.plan("tk:small_cnn", data=values, **COMMON)
    no_header = table.root / "nohead.csv"
    no_header.write_text("".join(f"{i}.png,{table.levels[i, 0] * 80:.2f}\n" for i in range(12)))
    with pytest.warns(UserWarning, match="labels that look like measured values.*task='regression'"):
        tk.plan("tk:small_cnn", data=no_header, val_split=0, **COMMON)


def test_numbers_with_underscores_are_not_read_as_numbers(table):
    csv = table("u.csv", "path,y", lambda lv: "1_000" if lv[0] > 0.9 else "3")
    with pytest.raises(DataError, match="'1_000' is not a finite number"):
        tk.plan("tk:small_cnn", data=csv, task="regression", **COMMON)


def test_a_multilabel_evaluation_reads_a_probability_of_one_half_as_the_predictor_does():
    ev = tk.TargetEvaluation(task="multilabel", classes=["a", "b"], files=["f"], targets=np.array([[1.0, 0.0]]),
                             outputs=np.array([[0.5, 0.2]]))
    assert ev.worst(1)[0]["predicted"] == ["a"] and ev.metrics["subset_accuracy"] == 1.0


def test_inspect_says_which_outputs_a_regression_export_only_centres(table, capsys):
    from transferkit.cli import main

    csv = table("c.csv", "path,red,k", lambda lv: f"{lv[0] * 100:.4f},5")
    r = tk.finetune("tk:small_cnn", data=csv, task="regression", epochs=1, val_split=0,
                    export=table.root / "c.pt", **COMMON)
    assert r.model.head[-1].std.tolist()[1] == 1.0
    assert main(["inspect", str(r.export_path)]) == 0
    assert "k mean 5 (constant in training: only centred)" in capsys.readouterr().out


def test_a_classifier_is_not_scored_on_a_csv_of_targets(table, image_folder):
    r = tk.finetune("tk:small_cnn", data=image_folder, epochs=1, export=table.root / "cls.pt", **COMMON)
    csv = table("targets.csv", "path,age", lambda lv: "3")
    with pytest.raises(DataError, match="one column per output is the targets of a multilabel or regression model; "
                                        "this model is a single-label classifier"):
        tk.evaluate(r.export_path, csv, progress=False)


def test_a_csv_s_statistics_come_from_all_its_training_targets(table, monkeypatch):
    """A Dataset's targets are read with its images (up to TARGETS_CHECKED); a CSV's listing
    holds them all, so its statistics are exact."""
    import transferkit.train.tasks as tasks

    monkeypatch.setattr(tasks, "TARGETS_CHECKED", 4)
    csv = table("r.csv", "path,y", lambda lv: f"{lv[0] * 100:.5f}")
    d = tk.plan("tk:small_cnn", data=csv, task="regression", val_split=0, **COMMON)
    assert d.target_norm["n"] == 40
    assert d.target_norm["mean"][0] == pytest.approx(float(np.round(table.levels[:, 0] * 100, 5).mean()), rel=1e-6)


def test_images_of_a_table_are_decoded_once_with_their_targets(table, tmp_path):
    """The images a CSV of targets lists are decoded once across epochs as class folders' are,
    in memory or in cache_dir (written, then read back), and loaded by worker processes: the
    same items, so the same training as decoding every epoch."""
    csv = table("r.csv", "path,red,green", lambda lv: f"{lv[0] * 10:.4f},{lv[1]:.4f}")
    kw = dict(data=csv, task="regression", policy="full", epochs=2, augment="flip", compile=False, **COMMON)
    every = tk.finetune("tk:small_cnn", decode_once=False, **kw)
    assert every.decisions.decode == {}
    for where in ({}, {"cache_dir": tmp_path / "c"}, {"cache_dir": tmp_path / "c"}):  # memory, written, read back
        once = tk.finetune("tk:small_cnn", **where, **kw)
        assert {p["mode"] for p in once.decisions.decode.values()} == {"disk" if where else "memory"}
        assert [h["train_loss"] for h in once.history] == [h["train_loss"] for h in every.history]
        assert once.metrics["r2"] == every.metrics["r2"]
    assert default_num_workers(once.run.bundle.train) >= 1  # 0 was: every image loaded in the main process


def test_a_table_s_targets_come_through_the_gpu_decoder_as_the_cpu_loader_gives_them(table):
    """Device decoding (run here with the CPU as the device) reads a listing's files and gives its
    targets as the dataset's own items do: float32 vectors, not the listed tuples."""
    csv = table("r.csv", "path,red,green", lambda lv: f"{lv[0] * 10:.4f},{lv[1]:.4f}")
    bundle, _ = prepare_task_data(csv, None, task="regression", val_split=0, seed=0, classes=None, min_size=None)
    loader = DeviceDecodedLoader(bundle.train, InputSpec(image_size=16), augment="none", batch_size=16,
                                 device=torch.device("cpu"), num_workers=0)
    y = torch.cat([batch[1] for batch in loader])
    assert y.dtype == torch.float32 and torch.equal(y, torch.stack([bundle.train[i][1] for i in range(40)]))


def test_a_listed_file_that_fails_during_extraction_is_masked_in_the_feature_store(table, tmp_path):
    """As for class folders: the store masks the row of a file of a CSV of targets that fails
    while its features are computed (it used to be replaced by another file, its row computed
    from that file's pixels)."""
    csv = table("r.csv", "path,age", lambda lv: f"{lv[0]:.4f}")
    damaged = damaged_png(table.root / "5.png")
    with pytest.warns(UserWarning, match="5.png"):
        r = tk.finetune("tk:small_cnn", data=csv, task="regression", val_split=0, epochs=2, cache_dir=tmp_path / "c",
                        **COMMON)
    assert r.data_report.bad_at_load == [str(damaged)] and r.feature_report["masked_samples"] == 1


def test_a_listed_file_that_fails_while_the_backbone_trains_is_replaced(table):
    """Its place is taken by another file with that file's targets (each file has its own);
    nothing is said of classes, which targets do not have."""
    csv = table("r.csv", "path,age", lambda lv: f"{lv[0]:.4f}")
    damaged = damaged_png(table.root / "5.png")
    with pytest.warns(UserWarning, match="5.png.*failed to load during the run"):
        r = tk.finetune("tk:small_cnn", data=csv, task="regression", val_split=0, epochs=1, policy="full", **COMMON)
    assert r.data_report.bad_at_load == [str(damaged)] and r.data_report.lost_classes == []


def test_a_target_beyond_float32_is_named_by_its_row_and_column(table):
    """1e39 is finite, but float32 (what targets are read as) makes it inf: the error named
    "training item 5" and NaN or inf instead of the cell."""
    big = table("big.csv", "path,y", lambda lv: "1e39" if lv[0] == table.levels[5][0] else f"{lv[0]:.3f}")
    with pytest.raises(DataError, match=r"row 7, column 'y': '1e39' is not a finite number within float32's range"):
        tk.plan("tk:small_cnn", data=big, task="regression", val_split=0, **COMMON)


def test_a_multilabel_column_named_with_the_label_separator_is_refused(table):
    """predict's CSV joins labels with ';': a label 'a;b' read back as two unknown labels."""
    bad = table("sep.csv", "path,red;ish,blue", lambda lv: f"{int(lv[0] > 0.5)},{int(lv[2] > 0.5)}")
    with pytest.raises(DataError, match=r"the label name 'red;ish' holds ';', which separates the labels"):
        scan_target_csv(bad, task="multilabel")
    assert scan_target_csv(bad, task="regression")[1] == ["red;ish", "blue"]  # output names of values: no lists


@pytest.mark.parametrize("policy", ["full", "feature_extraction"])
def test_a_validation_file_of_a_target_csv_that_fails_to_load_counts_in_no_metric(tmp_path, policy):
    """The failed rows were looked up in the whole CSV, not in the validation rows: the run
    stopped with an IndexError, or left out another row."""
    import warnings

    from tests.conftest import make_image_folder
    from transferkit.data.late import failed_items

    files = sorted(make_image_folder(tmp_path / "img", per_class=6, size=20).glob("*/*"))
    listing = tmp_path / "values.csv"
    listing.write_text("path,value\n" + "".join(f"{p},{i * 0.5}\n" for i, p in enumerate(files)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle, _ = prepare_task_data(listing, None, task="regression", val_split=0.25, seed=0, classes=None,
                                      min_size=None)
        row = 1
        damaged_png(tmp_path / "img" / bundle.val.base.samples[bundle.val.indices[row]][0])
        for i in range(len(bundle.val)):
            bundle.val[i]  # as the validation pass loads it: replaced, and recorded
    assert failed_items(bundle.val) == [row] and failed_items(bundle.train) == []
    with pytest.warns(UserWarning, match="failed to load"):
        r = tk.finetune("tk:small_cnn", data=listing, task="regression", weights=None, image_size=16, epochs=1,
                        batch_size=4, num_workers=0, verbose=False, policy=policy, precision="fp32", val_split=0.25)
    assert np.isfinite(r.metrics["val_loss"]) and len(r.val_logits) == len(bundle.val)


def test_a_row_added_to_a_target_csv_moves_no_other_row_across_the_split(tmp_path):
    """The split of a CSV of targets was a seeded permutation of its rows: one row added moved
    many rows between training and validation."""
    import warnings

    from tests.conftest import make_image_folder

    files = sorted(make_image_folder(tmp_path / "img", per_class=20, size=16).glob("*/*"))
    listing = tmp_path / "values.csv"

    def held_out(n):
        listing.write_text("path,value\n" + "".join(f"img/{p.parent.name}/{p.name},{i}\n"
                                                     for i, p in enumerate(files[:n])))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bundle, _ = prepare_task_data(listing, None, task="regression", val_split=0.25, seed=0, classes=None,
                                          min_size=None)
        return {bundle.val.base.samples[i][0] for i in bundle.val.indices}

    before, after = held_out(39), held_out(40)
    assert len((before ^ after) - {str(files[39])}) <= 1


def test_labels_joined_with_another_separator_than_the_label_separator_are_said(table):
    """'dark|x' or "dark, x" beside 'dark' trained as labels of their own without a word. They
    are a warning, not an error: 'animal/cat' beside 'animal' may be a label of its own."""
    joined = (("dark|x", "|", "dark;x"), ('"red;dark, x"', ",", "red;dark;x"), ("dark/x", "/", "dark;x"),
              ('"dark;dark/x"', "/", "dark;x"))
    for cell, sep, fixed in joined:
        csv = table("joined.csv", "path,labels", lambda lv: cell if lv[0] > 0.9 else "dark" if lv[1] > 0.5 else "x")
        report = DataReport()
        names = scan_target_csv(csv, task="multilabel", report=report)[1]
        assert f"dark{sep}x".replace(",", ", ") in names  # a label of its own, as written
        assert len(report.warnings) == 1 and re.search(
            rf"row \d+: the label .* reads as the labels \['dark', 'x'\] joined with '\{sep}', but labels are "
            rf"separated by ';', so it is a label of its own\. If they are separate labels, write the row's labels as "
            rf"'{fixed}'\.$", report.warnings[0]), report.warnings
    own = table("own.csv", "path,labels", lambda lv: '"black/white;blue, green"' if lv[0] > 0.5 else "sky blue")
    report = DataReport()  # no part of these is a label of the file: labels of their own, nothing said
    assert scan_target_csv(own, task="multilabel", report=report)[1] == ["black/white", "blue, green", "sky blue"]
    assert report.warnings == []


def test_multilabel_labels_differing_only_in_case_are_refused(table):
    lists = table("case.csv", "path,labels", lambda lv: "Cat" if lv[0] > 0.5 else "cat;dog")
    with pytest.raises(DataError, match=r"case.csv' \(its labels\): the class names 'Cat' and 'cat' differ only in "
                                        "case"):
        scan_target_csv(lists, task="multilabel")
    columns = table("cols.csv", "path,Cat,cat", lambda lv: f"{int(lv[0] > 0.5)},{int(lv[1] > 0.5)}")
    with pytest.raises(DataError, match=r"cols.csv' \(its label columns\): the class names 'Cat' and 'cat' differ"):
        scan_target_csv(columns, task="multilabel")
    assert scan_target_csv(columns, task="regression")[1] == ["Cat", "cat"]  # output names of values may


def test_a_multilabel_column_of_label_names_is_told_its_name(table):
    """'path,label' with names under task='multilabel' said only that 'cat' is not 1 or 0."""
    names = table("names.csv", "path,label", lambda lv: "cat" if lv[0] > 0.5 else "dog")
    with pytest.raises(DataError, match=r"'(cat|dog)' is not 1 or 0 .* A column of label names is named 'labels' \(the "
                                        r"names separated by ';'\)\.$"):
        scan_target_csv(names, task="multilabel")


def test_output_names_holding_a_line_break_or_tab_are_refused_before_training(table):
    """A regression header 'y\\nz' trained to the end and then failed to export (the weights were
    lost); a multilabel label 'dog\\tx' broke predict's tab-separated output."""
    header = table("header.csv", 'path,"y\nz"', lambda lv: f"{lv[0]:.3f}")
    with pytest.raises(DataError, match=r"\(its output names\): the class name 'y\\nz' holds a line break or control"):
        tk.plan("tk:small_cnn", data=header, task="regression", **COMMON)
    tab = table("tab.csv", "path,labels", lambda lv: "dog\tx" if lv[0] > 0.5 else "cat")
    with pytest.raises(DataError, match=r"\(its labels\): the class name 'dog\\tx' holds a line break"):
        tk.plan("tk:small_cnn", data=tab, task="multilabel", **COMMON)
    from test_api import Scaled

    with pytest.raises(DataError, match=r"classes=: the class name 'a\\nb' holds a line break or control character"):
        tk.plan("tk:small_cnn", data=Scaled(20, outputs=2), task="regression", classes=["a\nb", "c"], **COMMON)


class _Values(torch.utils.data.Dataset):
    """Grey images with the given regression targets."""

    def __init__(self, values):
        self.values = values

    def __len__(self):
        return len(self.values)

    def __getitem__(self, i):
        return torch.full((3, 16, 16), 100, dtype=torch.uint8), [self.values[i]]


def test_a_validation_target_far_from_the_training_targets_is_named_before_training(table):
    """A validation target of 1e20 (training targets in [0, 1]) overflowed the standardised
    validation loss to inf: the run stopped blaming the learning rate alone."""
    train = table("train.csv", "path,y", lambda lv: f"{lv[0]:.4f}", n=30)
    rows = [f"{i}.png,{table.levels[i][0]:.4f}" for i in range(30, 39)] + ["39.png,1e20"]
    (table.root / "val.csv").write_text("path,y\n" + "\n".join(rows) + "\n")
    far = r"The validation target 1e\+20 of '.*39.png' \(output 'y'\) lies more than 1000 training standard deviations"
    with pytest.warns(UserWarning, match=far + r".*it dominates the validation loss and can overflow it to inf"):
        with pytest.raises(tk.TrainingError, match=r"The validation loss became inf at epoch 1: the model diverged .* "
                                                   "a validation item far outside the training data"):
            tk.finetune("tk:small_cnn", data=train, val_data=table.root / "val.csv", task="regression", epochs=1,
                        **COMMON)
    near = [float(v) for v in table.levels[:, 0]]
    with pytest.warns(UserWarning, match=r"The validation target -3e\+38 of validation item 2 \(output '0'\)"):
        tk.plan("tk:small_cnn", data=_Values(near), val_data=_Values([0.5, 0.2, -3e38]), task="regression", **COMMON)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # targets within the training range: nothing said
        tk.plan("tk:small_cnn", data=_Values(near), val_data=_Values([0.5, 0.2, 3.0]), task="regression", **COMMON)


def test_a_training_target_far_from_the_others_is_named_before_training(monkeypatch):
    """One typo among regression targets (1e9 among prices of 100 to 1100) set the mean and
    standard deviation they are standardised by: the model predicted nonsense, its validation
    loss looked fine, and nothing was said. A target that far not read before training, which
    made the loss inf, was blamed on the learning rate."""
    import warnings

    from transferkit.train import tasks

    prices = [100.0 + 40 * (i % 25) for i in range(30)]
    typo = [1e9 if i == 3 else p for i, p in enumerate(prices)]
    with pytest.warns(UserWarning, match=r"The training target 1e\+09 of training item 3 \(output '0'\) lies more "
                                         r"than 10000 times the targets' spread from their median \(median 500"):
        tk.plan("tk:small_cnn", data=_Values(typo), task="regression", val_split=0, **COMMON)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a skewed but plausible spread: nothing said
        tk.plan("tk:small_cnn", data=_Values([p * (10 if i % 7 == 0 else 1) for i, p in enumerate(prices)]),
                task="regression", val_split=0, **COMMON)
    from transferkit.train.loop import _far_target

    counts = torch.tensor([0.0, 0, 0, 0, 3, 0, 7, 0, 12, 0])  # mostly 0: a blown-up rate is not blamed on them
    assert _far_target(counts) is None and _far_target(torch.tensor([[0.3, 1e6]] * 4)) is None  # outputs apart
    top, typical = _far_target(torch.tensor([1.0, 2.0, 3.0, 1e30]))
    assert top == pytest.approx(1e30, rel=1e-6) and typical == 2.0
    monkeypatch.setattr(tasks, "TARGETS_CHECKED", 2)  # the far target is not read before training
    unseen = [1e30 if i == 5 else p for i, p in enumerate(prices)]
    with pytest.raises(tk.TrainingError, match=r"a target of this batch reaches 1e\+30, where the median size of its "
                                               r"output's targets is 500\. .* whatever the learning rate: check it"):
        tk.finetune("tk:small_cnn", data=_Values(unseen), task="regression", val_split=0, epochs=1,
                    **{**COMMON, "batch_size": 30})


@pytest.mark.parametrize("name, said", [("data.parquet", "Parquet files are"), ("train-{0..3}.tar", "tar shards are"),
                                        ("", "folders of class sub-folders are")])
def test_targets_given_as_data_read_single_label_say_which_data(tmp_path, name, said):
    """A Parquet file given to a regression run was refused with a sentence about folders."""
    data = tmp_path / name if name else tmp_path
    with pytest.raises(DataError, match=rf"task='regression' needs a Dataset .* {said} read single-label"):
        tk.plan("tk:small_cnn", data=str(data), task="regression", **COMMON)
