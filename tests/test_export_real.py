"""Exports of models trained on real data (hymenoptera images, FSDD audio): loaded in a fresh
process and in the C++ program, they give the trained model's outputs and labels.

Slow (training on real files): run with ``pytest -m slow tests/test_export_real.py``.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

import transferkit
from tests.test_cpp import REPO, _parse, _run, program  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


def _fresh_process_predict(model, files):
    proc = subprocess.run([sys.executable, "-m", "transferkit.cli", "predict", str(model), *map(str, files), "--json",
                           "--top-k", "2"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_hymenoptera_export_agrees_everywhere(shared_data, tmp_path, program):  # noqa: F811
    weights = next((shared_data / "weights" / "cifar-resnet").glob("resnet20-*.th"))
    result = transferkit.finetune("tk:cifar_resnet20", weights=str(weights), data=str(shared_data / "hymenoptera"),
                                  epochs=5, image_size=32, export=tmp_path / "ants.pt", verbose=False, lr=3e-3)
    assert result.export_report.max_abs_diff <= result.export_report.tolerance
    val = sorted((shared_data / "hymenoptera" / "val").rglob("*.jpg"))[::15]
    pred = transferkit.load(tmp_path / "ants.pt")
    x = pred.inputs.batch(val)
    with torch.no_grad():
        want = torch.softmax(result.model.cpu().eval()(x), 1)
    assert torch.allclose(pred.predict_proba(val), want, atol=1e-5)
    got = _fresh_process_predict(tmp_path / "ants.pt", val)
    assert [g["label"] for g in got] == [result.classes[i] for i in want.argmax(1).tolist()]
    assert [g["probability"] for g in got] == pytest.approx(want.max(1).values.tolist(), abs=1e-5)
    ppms = []
    for i, crop in enumerate(x):  # the predictor's own crops, for the C++ program
        ppms.append(tmp_path / f"{i}.ppm")
        Image.fromarray(crop.permute(1, 2, 0).numpy()).save(ppms[-1])
    proc = _run(program, tmp_path / "ants.pt", *ppms)
    assert proc.returncode == 0, proc.stderr
    cpp = _parse(proc.stdout)
    assert [c[1] for c in cpp] == [g["label"] for g in got]
    for (_, _, scores), row in zip(cpp, want):
        assert scores == pytest.approx(dict(zip(result.classes, row.tolist())), abs=1e-5)


def test_fsdd_audio_export_agrees_everywhere(shared_data, tmp_path, program):  # noqa: F811
    clips = sorted((shared_data / "fsdd" / "recordings").glob("*_jackson_*.wav"))
    clips = [c for c in clips if int(c.stem.split("_")[2]) < 12]  # 10 digits x 12 takes of one speaker
    with open(tmp_path / "list.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows([(str(c), c.stem.split("_")[0]) for c in clips])
    result = transferkit.finetune("spec:tk:small_cnn", weights=None, data=str(tmp_path / "list.csv"), epochs=3,
                                  export=tmp_path / "digits.pt", verbose=False)
    report = result.export_report
    assert report.max_abs_diff <= report.tolerance
    test = [c for c in clips if int(c.stem.split("_")[2]) < 2]
    pred = transferkit.load(tmp_path / "digits.pt")
    with torch.no_grad():
        want = torch.softmax(result.model.cpu().eval()(pred.inputs.batch(test)), 1)
    assert torch.allclose(pred.predict_proba(test), want, atol=1e-5)
    got = _fresh_process_predict(tmp_path / "digits.pt", test)
    assert [g["label"] for g in got] == [result.classes[i] for i in want.argmax(1).tolist()]
    f32 = []
    for i, wav in enumerate(pred.inputs.prepare(c) for c in test[:4]):  # waveforms at the model's rate
        f32.append(tmp_path / f"{i}.f32")
        wav.numpy().astype("<f4").tofile(f32[-1])
    proc = _run(program, tmp_path / "digits.pt", *f32)
    assert proc.returncode == 0, proc.stderr
    for (_, label, scores), f in zip(_parse(proc.stdout), test[:4]):
        one = pred.predict_proba(f)[0]
        assert label == pred.labels[int(one.argmax())]
        assert scores == pytest.approx(dict(zip(pred.labels, one.tolist())), abs=1e-4)
