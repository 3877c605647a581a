"""The predictor: every input kind, resize/crop from the metadata, batching, top-k, tasks, folders, audio."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from tests.conftest import needs_onnx
from tests.export_helpers import export_tiny, rewrite_zip
from PIL import Image

import transferkit
from transferkit.data.transforms import eval_transform
from transferkit.errors import ConfigError, DataError, ExportError


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("pred") / "m.pt"
    _, model = export_tiny(path, size=16)
    return path, model


def _pictures(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (20 + 4 * i, 24, 3), dtype=np.uint8) for i in range(n)]


def _expected(model, pictures, size=16):
    """The eager model on the metadata's evaluation transform, softmaxed."""
    spec = transferkit.InputSpec(image_size=size)
    x = torch.stack([eval_transform(spec)(Image.fromarray(p)) for p in pictures])
    with torch.no_grad():
        return torch.softmax(model(x), 1)


def test_every_input_kind_gives_the_eager_models_probabilities(exported, tmp_path):
    path, model = exported
    pred = transferkit.load(path)
    pics = _pictures()
    want = _expected(model, pics)
    files = []
    for i, p in enumerate(pics):
        files.append(tmp_path / f"p{i}.png")
        Image.fromarray(p).save(files[-1])
    kinds = {
        "str paths": [str(f) for f in files],
        "Path objects": files,
        "PIL": [Image.fromarray(p) for p in pics],
        "numpy uint8 HWC": pics,
        "tensor uint8 CHW": [torch.from_numpy(p).permute(2, 0, 1) for p in pics],
    }
    for kind, items in kinds.items():
        got = pred.predict_proba(items)
        assert got.shape == (3, 3) and torch.allclose(got, want, atol=1e-5), kind
    # float inputs in [0, 1]: same pictures, resized in float, so equal up to rounding
    floats = [torch.from_numpy(p).permute(2, 0, 1).float() / 255 for p in pics]
    assert torch.allclose(pred.predict_proba(floats), want, atol=2e-2)
    assert torch.allclose(pred.predict_proba([p.astype(np.float32) / 255 for p in pics]), want, atol=2e-2)
    # one item alone, and a batch tensor [N, C, H, W] as N items
    assert torch.allclose(pred.predict_proba(str(files[0])), want[:1], atol=1e-5)
    batch = torch.stack([torch.from_numpy(p[:20, :24]).permute(2, 0, 1) for p in pics])
    assert pred.predict_proba(batch).shape == (3, 3)
    # grayscale and RGBA inputs become RGB
    assert pred.predict_proba([pics[0][..., 0], np.dstack([pics[0], pics[0][..., :1]])]).shape == (2, 3)


def test_predict_top_k_batching_and_sources(exported, tmp_path):
    path, _ = exported
    pred = transferkit.load(path)
    files = []
    for i, p in enumerate(_pictures(5, seed=1)):
        files.append(str(tmp_path / f"{i}.jpg"))
        Image.fromarray(p).save(files[-1])
    preds = pred.predict(files, top_k=2, batch_size=2)
    assert [p.source for p in preds] == files
    for p in preds:
        assert len(p.top_k) == 2 and p.top_k[0] == (p.label, p.probability)
        assert p.top_k[0][1] >= p.top_k[1][1] and p.label in pred.labels and pred.labels[p.index] == p.label
    assert torch.allclose(pred.predict_proba(files, batch_size=2), pred.predict_proba(files, batch_size=32))
    for array in (np.array(files), np.array(files, dtype=object)):  # df.path.values: was "must be HxW or HxWxC"
        assert [p.to_dict() for p in pred.predict(array, top_k=2, batch_size=2)] == [p.to_dict() for p in preds]
    assert len(pred.predict(files, top_k=10)[0].top_k) == 3  # capped at the number of labels
    d = preds[0].to_dict()
    assert d["source"] == files[0] and d["label"] == preds[0].label and len(d["top_k"]) == 2
    with pytest.raises(ConfigError, match="top_k"):
        pred.predict(files, top_k=0)
    with pytest.raises(ConfigError, match="batch_size"):
        pred.predict(files, batch_size=0)


def test_bad_inputs_raise_clear_errors(exported, tmp_path):
    pred = transferkit.load(exported[0])
    with pytest.raises(DataError, match="values in \\[0, 1\\]"):
        pred.predict(torch.full((3, 8, 8), 255.0))
    with pytest.raises(DataError, match="Cannot predict on a dict"):
        pred.predict([{"x": 1}])
    with pytest.raises(DataError, match="channels last"):
        pred.predict(np.zeros((3, 20, 20), np.uint8))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")  # files: an error per file (tests/test_bad_inputs_predict.py)
    assert "broken.jpg" in pred.predict(str(tmp_path / "broken.jpg"))[0].error
    assert "missing.png" in pred.predict(str(tmp_path / "missing.png"))[0].error
    empty = tmp_path / "empty.jpg"  # said as training says it (was "cannot identify image file")
    empty.write_bytes(b"")
    assert f"{str(empty)!r}: empty file (0 bytes)" in pred.predict(str(empty))[0].error


def test_a_prediction_line_shows_a_small_probability_in_two_figures():
    """Of 30,000 classes the top 3 probabilities all read 0.000 in predict's lines."""
    from transferkit.export.predictor import Prediction

    many = Prediction("a", 0, 3.672e-5, [("a", 3.672e-5), ("b", 2.1e-6), ("c", 0.0)])
    assert str(many) == "a 3.7e-05, b 2.1e-06, c 0.000"
    assert str(Prediction("a", 0, 0.8567, [("a", 0.8567), ("b", 0.0005)])) == "a 0.857, b 0.001"


def test_predict_folder_sorted_with_progress_bar(exported, tmp_path, capsys):
    pred = transferkit.load(exported[0])
    for i, p in enumerate(_pictures(3, seed=2)):
        (tmp_path / f"c{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(p).save(tmp_path / f"c{i % 2}" / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes(b"junk")
    preds = pred.predict_folder(tmp_path, top_k=2, progress=True)
    assert [p.source for p in preds] == sorted(str(f) for f in tmp_path.rglob("[0-9].png"))
    assert "3/3" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="No image files"):
        pred.predict_folder(tmp_path / "empty", progress=False)
    # walked as training walks a folder: linked folders followed, hidden folders and __MACOSX skipped
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    Image.fromarray(_pictures(1, seed=3)[0]).save(outside / "linked.png")
    (tmp_path / "link").symlink_to(outside)
    for litter in (".ipynb_checkpoints", "__MACOSX"):
        (tmp_path / litter).mkdir()
        Image.fromarray(_pictures(1, seed=4)[0]).save(tmp_path / litter / "copy.png")
    names = [p.source.split("/")[-1] for p in pred.predict_folder(tmp_path, progress=False)]
    assert sorted(names) == ["0.png", "1.png", "2.png", "linked.png"]


@pytest.mark.parametrize("task", ["multilabel", "regression"])
def test_task_sets_the_output_function(task, tmp_path, capsys):
    path = tmp_path / f"{task}.pt"
    _, model = export_tiny(path, task=task, labels=("a", "b", "c"), size=16)
    pred = transferkit.load(path)
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        logits = model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        preds = pred.predict(x, top_k=2, threshold=0.5)
    said = "Asked for the top 2 labels of a regression model, which has none"  # --top-k changed nothing, unsaid
    assert any(said in str(w.message) for w in caught) == (task == "regression")
    if task == "multilabel":
        probs = torch.sigmoid(logits)
        assert torch.allclose(pred.predict_proba(x), probs, atol=1e-5)
        for p, row in zip(preds, probs):
            assert p.labels == [lab for lab, q in zip("abc", row) if q >= 0.5]
            assert p.to_dict()["labels"] == p.labels
    else:
        assert torch.allclose(pred.outputs(x), logits, atol=1e-5)
        assert preds[0].values == pytest.approx(dict(zip("abc", logits[0].tolist())), abs=1e-5)
        assert preds[0].label is None and "values" in preds[0].to_dict()
        with pytest.raises(ConfigError, match="regression"):
            pred.predict_proba(x)
    for bad in (1.5, -0.1, float("nan"), "0.5", True):
        with pytest.raises(ConfigError, match=r"threshold=.* is out of range; expected a probability in \[0, 1\]"):
            pred.predict(x, threshold=bad)
    assert len(pred.predict(x, threshold=np.float32(0.5))) == 2  # any real number
    if task == "regression":  # `transferkit predict --csv` writes each value in full
        from transferkit.cli import main

        files = []
        for i in range(2):
            files.append(str(tmp_path / f"{i}.png"))
            Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(files[-1])
        capsys.readouterr()
        assert main(["predict", str(path), *files, "--csv"]) == 0
        values = [float(v) for line in capsys.readouterr().out.splitlines()[1:] for v in line.split(",")[1:4]]
        expected = [p.values[lab] for p in pred.predict(files) for lab in "abc"]
        assert values == expected  # not rounded to 6 digits


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_equal_scores_give_one_answer_the_first_label(task, tmp_path):
    """Of equal probabilities (a saturated sigmoid, bf16 logits) the label came from argmax (the
    first) and top_k from topk (any order on a CPU): one prediction named two top labels, and
    the command line's CSV and JSON disagreed."""
    from tests.export_helpers import images, tiny_model

    model, bb = tiny_model(8)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()  # every output equal
    labels = [f"c{i}" for i in range(8)]
    transferkit.export_torchscript(model, tmp_path / "tie.pt", example_inputs=images(2, 16),
                                   metadata={"labels": labels, "task": task,
                                             "input_spec": bb.input_spec.replace(image_size=16).to_dict()})
    pred = transferkit.load(tmp_path / "tie.pt")
    for k in (1, 3, 8):
        for p in pred.predict(images(3, 16), top_k=k):
            assert p.label == "c0" and [lab for lab, _ in p.top_k] == labels[:k]


def test_model_and_metadata_that_do_not_belong_together(exported, tmp_path):
    """A forger with a valid digest still cannot make 2 labels fit a 3-output model."""
    import hashlib
    import json

    path, _ = exported
    meta = transferkit.export.read_metadata(path)
    forged = json.dumps({**meta, "labels": ["x", "y"], "num_outputs": 2}, indent=1, sort_keys=True).encode()
    files = {"extra/transferkit.json": forged, "extra/labels.txt": b"x\ny\n",
             "extra/transferkit.sha256": hashlib.sha256(forged).hexdigest().encode()}
    bad = rewrite_zip(path, tmp_path / "f.pt", lambda n, d: files.get(n, d))
    pred = transferkit.load(bad)
    with pytest.raises(ExportError, match="returns \\(1, 3\\) but its metadata lists 2 labels"):
        pred.predict(np.zeros((16, 16, 3), np.uint8))


def test_audio_model_predicts_from_files_and_waveforms(tmp_path):
    sf = pytest.importorskip("soundfile")
    audio = pytest.importorskip("transferkit.data.audio")
    bb = transferkit.get_backbone("spec:tk:small_cnn", weights=None)
    spec = bb.input_spec.replace(sample_rate=8000)
    torch.manual_seed(0)
    model = transferkit.build_model(bb, 2, spec=spec).eval()
    waves = [torch.sin(torch.arange(n) * f) * 0.3 for n, f in ((4000, 0.05), (2400, 0.2), (3000, 0.1))]
    example = audio.pad_waveforms(waves)
    transferkit.export_torchscript(model, tmp_path / "a.pt", example_inputs=example,
                                   metadata={"labels": ["lo", "hi"], "input_spec": spec.to_dict()})
    pred = transferkit.load(tmp_path / "a.pt")
    assert pred.input_spec.kind == "audio"
    sf.write(tmp_path / "w.wav", waves[1].numpy(), 8000)
    with torch.no_grad():
        want = torch.softmax(model(audio.pad_waveforms(waves)), 1)
    got = pred.predict_proba([waves[0], waves[1].numpy(), waves[2]])
    assert torch.allclose(got, want, atol=1e-5)
    from_file = pred.predict_proba(str(tmp_path / "w.wav"))  # 16-bit PCM on disk: equal up to quantisation
    assert torch.allclose(from_file, want[1:2], atol=1e-2)
    assert pred.predict_folder(tmp_path, progress=False)[0].source == str(tmp_path / "w.wav")


def test_an_audio_pair_takes_its_rate_as_any_whole_number(tmp_path):
    """``(waveform, sample_rate)`` with the rate as pandas gives it (np.int64) or as a whole
    float is one clip at that rate; a rate that is not a whole positive number is named."""
    audio = pytest.importorskip("transferkit.data.audio")
    bb = transferkit.get_backbone("spec:tk:small_cnn", weights=None, sample_rate=8000, n_mels=16,
                                  image_options={"widths": [8, 8, 8]})
    torch.manual_seed(0)
    model = transferkit.build_model(bb, 2, spec=bb.input_spec).eval()
    wave = torch.sin(torch.arange(4800) * 0.3) * 0.3  # 0.3 s at 16 kHz
    transferkit.export_torchscript(model, tmp_path / "a.pt", example_inputs=audio.pad_waveforms([wave, wave[:3000]]),
                                   metadata={"labels": ["lo", "hi"], "input_spec": bb.input_spec.to_dict()})
    pred = transferkit.load(tmp_path / "a.pt")
    want = pred.predict_proba((wave, 16000))
    for rate in (np.int64(16000), np.int32(16000), 16000.0, np.float64(16000), np.array(16000), torch.tensor(16000)):
        assert torch.equal(pred.predict_proba((wave, rate)), want), rate  # 0-d arrays too: were read as a waveform
        assert torch.equal(pred.predict_proba([(wave.numpy(), rate)]), want), rate
    clips = np.empty(2, dtype=object)  # df["audio"].values: a TypeError from torch
    clips[:] = [wave.numpy(), wave[:3000].numpy()]
    assert torch.equal(pred.predict_proba(clips), pred.predict_proba([wave, wave[:3000]]))
    sf = pytest.importorskip("soundfile")
    sf.write(tmp_path / "a.wav", wave.numpy(), 16000)
    with pytest.raises(DataError, match=r"A \(path, sample_rate\) pair \('.*a.wav', 16000\): a file's rate is read "
                                        r"from the file; pass the path alone"):
        pred.predict((str(tmp_path / "a.wav"), 16000))
    for rate in (16000.5, 0, -8000, float("nan")):
        with pytest.raises(DataError, match=r"sample rate of the \(waveform, sample_rate\) pair is .*, not a whole "
                                            r"positive number of Hz"):
            pred.predict((wave, rate))
    with pytest.raises(DataError, match=r"sample rate of the \(waveform, sample_rate\) pair is 3 Hz, below 1000 Hz"):
        pred.predict((wave, 3))  # a label in the rate's place: each clip would last hours
    with pytest.warns(UserWarning, match=r"1 waveform of float samples reaches far outside \[-1, 1\] \(up to 9830.1, "
                                         r"e.g. one of shape \(4800,\)\)"):
        pred.predict([wave, (wave * 32767).numpy()])  # int16 values cast to float, once per call
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pred.predict([wave, (wave * 32767).to(torch.int16)])  # PCM integers are scaled
        pred.predict([wave.bfloat16(), (wave.bfloat16(), 16000)])  # bf16 samples (numpy has no such type)
    with pytest.raises(DataError, match="ms long"):  # a call that fails: what it met is not told by the next
        pred.predict([wave * 32767, wave[:10]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pred.predict(wave)
    with pytest.warns(UserWarning, match=r"reaches far outside \[-1, 1\] \(up to 98"):  # bf16 rounds 9830 to 9856
        pred.predict((wave * 32767).bfloat16())


def test_audio_clips_run_in_batches_of_similar_length(tmp_path):
    """One long clip padded every clip of its batch to its length (a 10-minute file beside 31
    short ones ran many times slower than one at a time, and onnxruntime failed to allocate
    memory for the whole call); a memory failure said nothing of batch_size."""
    audio = pytest.importorskip("transferkit.data.audio")
    bb = transferkit.get_backbone("spec:tk:small_cnn", weights=None, sample_rate=8000, n_mels=16,
                                  image_options={"widths": [8, 8, 8]})
    torch.manual_seed(0)
    model = transferkit.build_model(bb, 2, spec=bb.input_spec).eval()
    waves = [torch.sin(torch.arange(n) * 0.3) * 0.3 for n in (800, 8000, 900, 1500, 8000 * 6, 1000)]
    transferkit.export_torchscript(model, tmp_path / "a.pt", example_inputs=audio.pad_waveforms(waves[:2]),
                                   metadata={"labels": ["lo", "hi"], "input_spec": bb.input_spec.to_dict()})
    pred = transferkit.load(tmp_path / "a.pt")
    alone = torch.cat([pred.predict_proba([w]) for w in waves])
    shapes, run = [], pred._run

    def recorded(xb):
        shapes.append(tuple(xb.shape))
        return run(xb)

    pred._run = recorded
    assert torch.allclose(pred.predict_proba(waves, batch_size=32), alone, atol=1e-6)
    assert sorted(shapes) == [(1, 8000), (1, 48000), (4, 1500)]  # 800..1500 together, each long clip alone
    shapes.clear()
    assert [p.label for p in pred.predict(waves)] == [pred.labels[int(k)] for k in alone.argmax(1)]
    assert len(shapes) == 3

    def no_memory(xb):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Failed to allocate memory for requested buffer of size "
                           "36857856256")

    pred.module = no_memory
    with pytest.raises(transferkit.ExportError, match=r"ran out of memory on an input of shape \(8000,\) "
                                                      r".*pass a smaller batch_size"):
        pred.predict_proba([waves[1]])


def test_input_pipeline_and_parity_examples_for_each_kind(tmp_path):
    from transferkit.export import InputPipeline, example_batch

    spec = transferkit.InputSpec(image_size=16, resize_size=20)
    pipe = InputPipeline(spec)
    x = pipe.batch([np.zeros((30, 50, 3), np.uint8), torch.zeros(3, 10, 10), Image.new("L", (40, 40))])
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.float32  # mixed uint8/float inputs -> float
    batch, origin = example_batch(spec, n=4)
    assert batch.shape == (4, 3, 16, 16) and batch.dtype == torch.uint8 and "random" in origin
    pytest.importorskip("transferkit.data.audio")
    audio_spec = transferkit.InputSpec(kind="audio", sample_rate=8000)
    waves, origin = example_batch(audio_spec, n=4)
    assert waves.shape == (4, 8000) and torch.isnan(waves[1]).sum() == 4000  # shorter clips NaN-padded
    clipped = InputPipeline(audio_spec.replace(clip_seconds=0.5)).batch([torch.zeros(400), np.zeros(9000, np.float32)])
    assert clipped.shape == (2, 4000)


def test_an_onnx_export_loads_and_predicts_on_onnxruntime(tmp_path, monkeypatch):
    needs_onnx()
    from tests.export_helpers import images, tiny_model

    from transferkit.export import export_onnx
    from transferkit.export.onnx import OnnxRunner

    model, bb = tiny_model(3)
    meta = {"labels": ["ant", "bee", "cat"], "input_spec": bb.input_spec.replace(image_size=16).to_dict()}
    export_onnx(model, tmp_path / "m.onnx", metadata=meta, example_inputs=images(3, 16))
    pred = transferkit.load(tmp_path / "m.onnx")
    assert isinstance(pred.module, OnnxRunner) and "CPUExecutionProvider" in pred.module.providers
    options = pred.module.session.get_session_options()  # its threads do not spin between runs: torch work in
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"  # the process keeps its cores
    assert options.intra_op_num_threads == torch.get_num_threads()
    pics = _pictures()
    assert torch.allclose(pred.predict_proba(pics), _expected(model.eval(), pics), atol=1e-5)
    assert [p.label for p in pred.predict(pics)] == [["ant", "bee", "cat"][int(i)]
                                                    for i in _expected(model, pics).argmax(1)]
    import builtins

    real = builtins.__import__

    def no_ort(name, *args, **kwargs):
        if name.split(".")[0] == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_ort)
    with pytest.raises(ExportError, match="needs the optional packages onnx and onnxruntime.*transferkit\\[onnx\\]"):
        transferkit.load(tmp_path / "m.onnx")


def test_an_image_passed_as_an_object_is_read_as_its_file(tmp_path):
    """16-bit, transparent and EXIF-rotated images give the same pixels from a PIL image, an
    RGBA tensor or their file path (16-bit scaled, transparency on white, orientation applied)."""
    from transferkit.data.images import load_image
    from transferkit.data.transforms import ToRGB

    g = np.random.default_rng(0)
    deep = Image.fromarray(g.integers(0, 65536, (12, 16), dtype=np.uint16))  # mode I;16
    rgba = Image.fromarray(g.integers(0, 256, (12, 16, 4), dtype=np.uint8), "RGBA")
    rotated = Image.fromarray(g.integers(0, 256, (12, 16, 3), dtype=np.uint8), "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees
    files = {"deep.png": (deep, {}), "rgba.png": (rgba, {}), "rotated.png": (rotated, {"exif": exif.tobytes()})}
    for name, (img, kw) in files.items():
        img.save(tmp_path / name, **kw)
        want = np.asarray(load_image(tmp_path / name))
        with Image.open(tmp_path / name) as opened:
            assert np.array_equal(np.asarray(ToRGB()(opened)), want), name
    assert np.asarray(load_image(tmp_path / "rotated.png")).shape == (16, 12, 3)  # the orientation was applied
    tensor = torch.from_numpy(np.array(rgba)).permute(2, 0, 1)
    composited = np.asarray(ToRGB()(tensor))  # the PIL image its file is read as
    assert np.array_equal(composited, np.asarray(load_image(tmp_path / "rgba.png")))


def test_a_pil_image_opened_from_a_jpeg_file_gets_the_pixels_of_its_path(tmp_path):
    """``Image.open(path)`` of a JPEG much larger than the input is read from its file, at the
    reduced scale (draft mode) training and a path get, and the object is left as it was; a
    decoded PIL image is taken at the size it was decoded at."""
    export_tiny(tmp_path / "m.pt", size=16)
    predictor = transferkit.load(tmp_path / "m.pt")
    g = np.random.default_rng(0)
    yy, xx = np.mgrid[0:240, 0:320]
    pixels = np.stack([xx * 0.8, yy, (xx + yy) * 0.45], -1) + g.normal(0, 40, (240, 320, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(tmp_path / "big.jpg", quality=90)
    want = predictor.predict_proba(tmp_path / "big.jpg")
    with Image.open(tmp_path / "big.jpg") as opened:
        assert torch.equal(predictor.predict_proba(opened), want)
        assert opened.size == (320, 240) and opened.tile  # still the user's undecoded image, at full size
        decoded = opened.convert("RGB")
    assert not torch.equal(predictor.predict_proba(decoded), want)  # full size, then resized: other pixels
    # the file it holds open is read, not whatever its name leads to now (here: another image)
    with Image.open(tmp_path / "big.jpg") as opened:
        (tmp_path / "big.jpg").rename(tmp_path / "moved.jpg")
        Image.fromarray(np.zeros((240, 320, 3), np.uint8)).save(tmp_path / "big.jpg")
        assert torch.equal(predictor.predict_proba(opened), want)


def test_an_in_memory_input_that_cannot_be_predicted_is_named_by_its_place(tmp_path):
    """A list of arrays fails as a whole on a bad one (files fail alone), and the error says
    which: a list of a thousand clips or images is no place to search by eye."""
    export_tiny(tmp_path / "m.pt", size=16)
    predictor = transferkit.load(tmp_path / "m.pt")
    good = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(DataError, match=r"Input 2 of the 3 \(counting from 0\): Cannot predict on an empty image"):
        predictor.predict([good, good, np.zeros((0, 20, 3), np.uint8)])
    with pytest.raises(DataError, match=r"^Cannot predict on an empty image"):  # one input: nothing to count
        predictor.predict(np.zeros((0, 20, 3), np.uint8))


def test_a_top_k_above_the_number_of_classes_is_said_once(tmp_path, recwarn):
    """`predict --top-k 10` on a model of 3 classes listed 3 without a word."""
    from tests.export_helpers import images, tiny_model

    model, bb = tiny_model(3)
    transferkit.export_torchscript(model, tmp_path / "m.pt", example_inputs=images(2, 16),
                                   metadata={"labels": ["a", "b", "c"],
                                             "input_spec": bb.input_spec.replace(image_size=16).to_dict()})
    pred = transferkit.load(tmp_path / "m.pt")
    with pytest.warns(UserWarning, match=r"Asked for the top 10 labels of a model of 3 classes: each prediction "
                                         r"lists 3"):
        assert [len(p.top_k) for p in pred.predict(images(2, 16), top_k=10)] == [3, 3]
    recwarn.clear()
    pred.predict(images(1, 16), top_k=3)
    assert not [w for w in recwarn if "top_k" in str(w.message)]


class _MixedPixels(torch.utils.data.Dataset):
    """The same pictures, half as uint8 pixels and half as float in [0, 1] (a ConcatDataset of
    PIL images and ``ToTensor()`` output batches them side by side)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        y = i % 2
        x = torch.full((3, 16, 16), 60 + 120 * y, dtype=torch.uint8)
        x[:, :4] = 30 + 20 * (i % 3)
        return (x if i % 4 < 2 else x.float() / 255), y


@pytest.mark.parametrize("workers,store", [(0, False), (1, True)])
def test_a_dataset_of_uint8_and_float_images_trains_on_the_pixels_predict_reads(tmp_path, workers, store):
    """Batches of uint8 beside float images were stacked as they were (uint8 at 0..255 read as
    floats), so training, its validation scores and the cached features saw other pixels than
    predict; with DataLoader workers the batch failed in torch.cat; the export then refused them."""
    r = transferkit.finetune("tk:small_cnn", weights=None, data=_MixedPixels(24), val_data=_MixedPixels(12),
                             classes=["a", "b"], epochs=1, image_size=16, device="cpu", batch_size=8,
                             num_workers=workers, precision="fp32", export=tmp_path / "m.pt",
                             cache_dir=tmp_path / "cache" if store else None, verbose=False)
    val = _MixedPixels(12)
    want = torch.softmax(r.val_logits.float(), 1)
    assert torch.allclose(r.predictor().predict_proba([val[i][0] for i in range(12)]), want, atol=1e-5)
    assert torch.allclose(transferkit.load(tmp_path / "m.pt").predict_proba([val[i][0] for i in range(12)]), want,
                          atol=1e-5)


def test_a_closed_pil_image_and_a_url_are_said_to_be_what_they_are(tmp_path):
    """A PIL image closed before its pixels were read failed with Pillow's bare AssertionError
    or ValueError; a URL was looked for as a local path ('.../https:/example.com/a.jpg')."""
    export_tiny(tmp_path / "m.pt")
    pred = transferkit.load(tmp_path / "m.pt")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "z.png")
    with Image.open(tmp_path / "z.png") as closed:
        pass
    with pytest.raises(DataError, match=r"Cannot predict on a PIL image that was closed .* call image.load\(\) "):
        pred.predict_proba(closed)
    with Image.open(tmp_path / "z.png") as still_open:
        assert pred.predict_proba(still_open).shape == (1, 3)
    got = pred.predict("https://user:secret@example.com/a.jpg")[0]
    assert got.error.startswith("Cannot read 'https://…@example.com/a.jpg': predict reads local files, not URLs."), \
        got.error


def test_mixed_pixels_are_batched_only_where_they_are_uint8_beside_float():
    """A named tuple stays one, and integer images of two widths are default_collate's to take."""
    import collections

    from transferkit.data.sampling import collate_items

    Item = collections.namedtuple("Item", "x y")
    batch = collate_items([Item(torch.full((3, 2, 2), 255, dtype=torch.uint8), 0), Item(torch.ones(3, 2, 2), 1)])
    assert isinstance(batch, Item) and batch.x.dtype == torch.float32 and batch.x.max() == 1.0
    ints = collate_items([(torch.zeros(3, 2, 2, dtype=torch.int64), 0), (torch.zeros(3, 2, 2, dtype=torch.int32), 1)])
    assert ints[0].dtype == torch.int64  # not made float pixels


def test_float_images_in_0_1_predict_through_a_bicubic_resize_that_overshoots(tmp_path):
    """A bicubic resize (timm's backbones) of float pixels in [0, 1] reaches [-0.445, 1.445] in
    2-D; the exported file refused what went past 0.25 outside [0, 1], so `predict` of a sharp
    float image raised a TorchScript error (and `finetune` on such images failed at its export)."""
    spec = transferkit.InputSpec(image_size=16, resize_size=20, interpolation="bicubic")
    _, model = export_tiny(tmp_path / "m.pt", size=16)
    row = torch.tensor([0.0, 1.0, 1.0, 0.0] * 3)  # +--+ in both axes: each output pixel meets its kernel's signs
    sharp = torch.maximum(row[:, None] * row[None, :], (1 - row)[:, None] * (1 - row)[None, :]).expand(3, -1, -1)
    resized = eval_transform(spec)(sharp.contiguous())
    assert float(resized.max()) > 1.25 and float(resized.min()) < -0.25  # past the old slack
    scripted = torch.jit.load(str(tmp_path / "m.pt"))
    with torch.no_grad():
        assert torch.allclose(scripted(resized.unsqueeze(0)), model.eval()(resized.unsqueeze(0)), atol=1e-5)


class FloatOnly(torch.nn.Module):
    """A module exported as it is, without transferkit's ImagePreprocess: it takes float pixels
    only (a conv on uint8 fails)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))


class Picky(torch.nn.Module):
    """Takes uint8 pixels, and refuses a bright image by a check of its own (a ValueError)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.float().mean(dim=(1, 2, 3)) / 255.0
        if bool((m > 0.9).any()):
            raise ValueError("this model takes no bright images")
        return torch.stack([m, 1.0 - m], 1)


def test_a_model_that_fails_on_what_predict_gives_it_is_said_in_one_error(tmp_path, capsys):
    """A module without ImagePreprocess exported with float examples passed the parity check;
    predict on an image file then raised a TorchScript traceback (the CLI printed about 60
    lines, exit 1). The export warns; predict raises one error that says what it gave the model;
    the model's own ValueError is a DataError, said for the one file it refuses, as for a file
    that cannot be read (a batch holding it stopped the whole command)."""
    from transferkit.cli import main

    spec = transferkit.InputSpec(image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    meta = {"labels": ["a", "b"], "input_spec": spec.to_dict()}
    with pytest.warns(transferkit.TransferkitWarning, match="The model fails on uint8 pixels .* predict\\(\\) and "
                                                           "`transferkit predict` will fail on them"):
        transferkit.export_torchscript(FloatOnly(), tmp_path / "float.pt", example_inputs=torch.rand(2, 3, 16, 16) / 2,
                                       metadata=meta)
    dark, bright = tmp_path / "dark.png", tmp_path / "bright.png"
    Image.new("RGB", (16, 16), (20, 30, 40)).save(dark)
    Image.new("RGB", (16, 16), (250, 250, 250)).save(bright)
    with pytest.raises(ExportError, match=r"float.pt' failed on an input of shape \(3, 16, 16\) \(the "
                                          r"predictor gave it uint8 pixels \[N, C, H, W\]\): RuntimeError: Input type "
                                          r"\(unsigned char\).* put transferkit's ImagePreprocess"):
        transferkit.load(tmp_path / "float.pt").predict(dark)
    assert main(["predict", str(tmp_path / "float.pt"), str(dark)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("transferkit: error: ") and err.count("\n") == 1, err

    transferkit.export_torchscript(Picky(), tmp_path / "picky.pt", metadata=meta,
                                   example_inputs=torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    picky = transferkit.load(tmp_path / "picky.pt")
    with pytest.warns(transferkit.TransferkitWarning, match="1 of the 3 inputs gave no prediction"):
        got = picky.predict([dark, bright, dark])
    assert [p.ok for p in got] == [True, False, True] and got[0].probability == got[2].probability
    assert got[1].error.endswith("refuses an input of shape (3, 16, 16): this model takes no bright images")
    white = torch.full((3, 16, 16), 255, dtype=torch.uint8)
    with pytest.raises(DataError, match=r"^Input 1 of the 2 \(counting from 0\): .*picky.pt' refuses an input"):
        picky.predict([torch.zeros(3, 16, 16, dtype=torch.uint8), white])  # an object refused raises, as unread
    with pytest.raises(DataError, match=r"picky.pt' refuses a batch of 2 inputs .*: this model takes no bright "
                                        r"images$"):
        picky.outputs([dark, bright])  # no "(predict() reports such files one by one)": it raises them too
    assert main(["predict", str(tmp_path / "picky.pt"), str(dark), str(bright)]) == 1
    out = capsys.readouterr().out
    assert out.count("\n") == 2 and "this model takes no bright images" in out, out
    # a model that refuses every input: one error for the batch, as before (not one per file, each run alone)
    with pytest.raises(DataError, match=r"refuses a batch of 2 inputs of shape"):
        picky.predict([bright, bright])
    with pytest.raises(DataError, match=r"^Input 1 of the 2 \(counting from 0\)"):  # whatever the batch size
        picky.predict([torch.zeros(3, 16, 16, dtype=torch.uint8), white], batch_size=1)


def test_paths_of_any_kind_are_predicted_as_their_files(tmp_path):
    """An os.DirEntry (from os.scandir) or a PurePosixPath was refused: "Cannot predict on a
    DirEntry", and in a list "pass file paths, PIL images, ..."."""
    import os
    from pathlib import PurePosixPath

    export_tiny(tmp_path / "m.pt", size=16)
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (20, 16), (200, 30, 40)).save(photos / "a.png")
    predictor = transferkit.load(tmp_path / "m.pt")
    entry = next(os.scandir(photos))
    one, = predictor.predict(entry)
    listed = predictor.predict([entry, PurePosixPath(entry.path), entry.path])
    assert one.source == str(photos / "a.png") and [p.source for p in listed] == [one.source] * 3
    assert len({(p.label, p.probability) for p in [one, *listed]}) == 1
