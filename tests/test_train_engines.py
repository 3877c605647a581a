"""The engine of the frozen feature pass (transferkit.train.engines): forced engines agree with
eager fp32, the choice is in the plan, its summary and the feature-cache key, a missing
optional engine is skipped under auto and refused when forced, a disagreeing engine is
rejected. No timing is asserted."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import builtins

import numpy as np
import pytest
import torch
from tests.conftest import make_image_folder, needs_onnx
from tests.export_helpers import attention_model, length_as_number_model

import transferkit as tk
from transferkit import steps
from transferkit.backbones.custom import from_module
from transferkit.config import FinetuneConfig
from transferkit.decisions import differences
from transferkit.errors import ConfigError, OutputError
from transferkit.train import engines as eng

needs_onnx()
KW = dict(weights=None, image_size=16, epochs=2, batch_size=4, device="cpu", num_workers=0, verbose=False,
          precision="fp32")
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh_engines():
    eng.release_engines()
    yield
    eng.release_engines()


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "images", per_class=6, size=20)


def _backbone(name="tk:small_cnn"):
    torch.manual_seed(0)
    return tk.get_backbone(name, weights=None)


def _model(name="tk:small_cnn", size=32):
    bb = _backbone(name)
    return tk.build_model(bb, 3, spec=bb.input_spec.replace(image_size=size)).eval()


def _batch(n=8, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def _no_onnxruntime(monkeypatch, error=ImportError("No module named 'onnxruntime'")):
    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name.split(".")[0] == "onnxruntime":
            raise error
        return real(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", fake)


def _time_onnx_on_tiny_data(monkeypatch):
    """Time eager and ONNX Runtime on a tiny folder: the timing runs from one image, the
    export always pays, and torch.compile (minutes) is left out."""
    monkeypatch.setattr(eng, "MIN_IMAGES_TO_TIME", 1)
    monkeypatch.setattr(eng, "ONNX_SECONDS_BASE", {"cpu": 0.0})
    monkeypatch.setattr(eng, "ONNX_SECONDS_PER_MODULE", {"cpu": 0.0})
    monkeypatch.setattr(eng, "engine_availability", lambda device_type: {
        "eager": None, "onnxruntime": None, "compile": "not timed in this test (compiling takes minutes)"})


def _store_onnx_rate(store, images_per_s: float) -> None:
    """Set ONNX Runtime's speed in every timing of the store ``cache_dir/engines.json``."""
    data = json.loads(store.read_text())
    for entry in data.values():
        entry["measured"]["onnxruntime"]["images_per_s"] = images_per_s
    store.write_text(json.dumps(data))


def _stored_onnx_verdict(folder, tmp_path, monkeypatch):
    """A frozen run's timing stored in ``tmp_path/c``, with ONNX Runtime by far the fastest;
    returns (cache_dir, the run's settings, the store)."""
    _time_onnx_on_tiny_data(monkeypatch)
    cache = tmp_path / "c"
    kw = dict(backbone=_backbone(), data=folder, cache_dir=cache, policy="feature_extraction", epochs=1)
    _decide(**kw)
    store = cache / "engines.json"
    _store_onnx_rate(store, 1e9)
    return cache, kw, store


def _decide(**kw):
    """The facts (weights loaded, so the engines can be timed) and the decisions of a run."""
    cfg = FinetuneConfig(**{**KW, **kw})
    facts = tk.look(cfg)[0]
    return facts, tk.decide(cfg, facts)


@pytest.mark.parametrize("name", ["tk:small_cnn", "tk:cifar_resnet20", "attention"])
def test_forced_onnxruntime_gives_the_eager_fp32_features(name):
    # "attention": nn.TransformerEncoderLayer, whose fused fast path (torchvision's ViTs) the exporter cannot convert
    m = attention_model()[0] if name == "attention" else _model(name)
    x = _batch()
    fwd = eng.engine_forward("onnxruntime", m, x, device=CPU, precision="fp32", channels_last=True)
    for xb in (x, _batch(3, seed=1)):  # the exported batch and a shorter one (dynamic batch axis)
        with torch.no_grad():
            ref = m.features(xb)
        got = fwd(xb)
        assert got.shape == ref.shape
        assert (got - ref).abs().max() <= eng.TOLERANCE["fp32"] * ref.abs().max()


def test_onnx_export_is_reused_from_cache_dir_and_checked(tmp_path, monkeypatch):
    m, x = _model(), _batch()
    eng.engine_forward("onnxruntime", m, x, device=CPU, precision="fp32", channels_last=False, cache_dir=tmp_path)
    files = list((tmp_path / "engines" / "onnx").glob("*.onnx"))
    assert len(files) == 1
    eng.release_engines()  # a later run: the file is read back, not exported again

    def no_export(*a, **k):
        raise AssertionError("exported again")
    monkeypatch.setattr(eng, "export_feature_pass", no_export)
    fwd = eng.engine_forward("onnxruntime", m, x, device=CPU, precision="fp32", channels_last=False,
                             cache_dir=tmp_path)
    with torch.no_grad():
        assert torch.allclose(fwd(x), m.features(x), atol=1e-4)
    # other trunk weights: another file
    with torch.no_grad():
        next(m.trunk.parameters()).add_(0.5)
    monkeypatch.undo()
    eng.engine_forward("onnxruntime", m, x, device=CPU, precision="fp32", channels_last=False, cache_dir=tmp_path)
    assert len(list((tmp_path / "engines" / "onnx").glob("*.onnx"))) == 2
    # the same weights in another structure (average pooling instead of max): another file, and another timing key
    key = eng.engines_store_key(m, x.shape[1:], x.dtype, device=CPU, precision="fp32", channels_last=False)
    m.trunk.stage1[1] = torch.nn.AvgPool2d(2)
    assert eng.engines_store_key(m, x.shape[1:], x.dtype, device=CPU, precision="fp32", channels_last=False) != key
    fwd = eng.engine_forward("onnxruntime", m, x, device=CPU, precision="fp32", channels_last=False, cache_dir=tmp_path)
    assert len(list((tmp_path / "engines" / "onnx").glob("*.onnx"))) == 3
    with torch.no_grad():
        assert torch.allclose(fwd(x), m.features(x), atol=1e-4)


def test_an_audio_export_and_timing_are_not_keyed_by_the_first_batchs_padded_length(tmp_path, monkeypatch):
    # audio batches are as long as their longest clip, which follows the data's order (the seed)
    torch.manual_seed(0)
    bb = tk.get_backbone("ta:wav2vec2_tiny", weights=None)
    m = tk.build_model(bb, 2).eval()
    g = torch.Generator().manual_seed(0)
    short, longer = (torch.randn(3, n, generator=g) * 0.1 for n in (8000, 9600))
    longer[1, 7000:] = float("nan")  # padding
    eng.engine_forward("onnxruntime", m, short, device=CPU, precision="fp32", channels_last=False, cache_dir=tmp_path)
    eng.release_engines()
    monkeypatch.setattr(eng, "export_feature_pass", lambda *a, **k: pytest.fail("exported again for a new length"))
    fwd = eng.engine_forward("onnxruntime", m, longer, device=CPU, precision="fp32", channels_last=False,
                             cache_dir=tmp_path)
    with torch.no_grad():
        ref = m.features(longer)
    assert (fwd(longer) - ref).abs().max() <= eng.TOLERANCE["fp32"] * ref.abs().max()  # the time axis is dynamic
    key = lambda n: eng.engines_store_key(m, (n,), torch.float32, device=CPU, precision="fp32",  # noqa: E731
                                          channels_last=False)
    assert key(20800) == key(24000) != key(16000) != key(480000)  # timings: the length's power-of-two bucket
    assert eng.engines_store_key(m, (3, 32, 32), torch.uint8, device=CPU, precision="fp32", channels_last=False) \
        != eng.engines_store_key(m, (3, 32, 33), torch.uint8, device=CPU, precision="fp32", channels_last=False)


def test_an_audio_export_that_fixes_the_clip_length_is_refused_and_auto_keeps_eager():
    m = length_as_number_model()[0]
    x = torch.randn(4, 4000, generator=torch.Generator().manual_seed(0))
    with pytest.raises(tk.EngineError, match=r"does not follow the clip length: on input \(2, 3000\)"):
        eng.engine_forward("onnxruntime", m, x, device=CPU, precision="fp32", channels_last=False)
    out = eng.time_engines(m, [x, x], device=CPU, precision="fp32", channels_last=False, candidates=["onnxruntime"])
    assert "does not follow the clip length" in out["onnxruntime"]["error"]
    assert eng.decide_engine("auto", device_type="cpu", available={"eager": None, "onnxruntime": None},
                             measured=out, n_images=1000)[0] == "eager"


def test_a_stored_export_that_its_trunk_no_longer_computes_is_exported_again(tmp_path, monkeypatch):
    m, x = _model(), _batch()
    eng.engine_forward("onnxruntime", m, x, device=CPU, precision="fp32", channels_last=False, cache_dir=tmp_path)
    eng.release_engines()
    path = next((tmp_path / "engines" / "onnx").glob("*.onnx"))
    other = _model("tk:cifar_resnet20")  # another pass's export, copied in under this pass's name with its digest
    eng.export_feature_pass(other, x, path)
    exports, real_export = [], eng.export_feature_pass
    monkeypatch.setattr(eng, "export_feature_pass", lambda *a, **k: exports.append(1) or real_export(*a, **k))
    fwd = eng.engine_forward("onnxruntime", m, x, device=CPU, precision="fp32", channels_last=False,
                             cache_dir=tmp_path)
    with torch.no_grad():
        ref = m.features(x)
    assert exports == [1] and (fwd(x) - ref).abs().max() <= eng.TOLERANCE["fp32"] * ref.abs().max()


def test_an_onnx_session_is_opened_again_for_another_thread_count():
    m, x = _model(), _batch()
    first = eng.engine_forward("onnxruntime", m, x, device=CPU, precision="fp32", channels_last=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert eng.engine_forward("onnxruntime", m, x, device=CPU, precision="fp32", channels_last=False) is not first
    finally:
        torch.set_num_threads(threads)
    assert eng.engine_forward("onnxruntime", m, x, device=CPU, precision="fp32", channels_last=False) is first


def test_onnxruntime_that_cannot_open_any_file_is_one_error_after_one_export_again(tmp_path, monkeypatch):
    import onnxruntime as ort

    m, x = _model(), _batch()
    eng.engine_forward("onnxruntime", m, x, device=CPU, precision="fp32", channels_last=False, cache_dir=tmp_path)
    eng.release_engines()
    exports = []
    real_export = eng.export_feature_pass
    monkeypatch.setattr(eng, "export_feature_pass", lambda *a, **k: exports.append(1) or real_export(*a, **k))

    def refuses(*a, **k):
        raise RuntimeError("CUDA provider could not be loaded")  # a failure that no new file mends
    monkeypatch.setattr(ort, "InferenceSession", refuses)
    with pytest.raises(tk.EngineError, match="onnxruntime cannot open .*CUDA provider could not be loaded"):
        eng.engine_forward("onnxruntime", m, x, device=CPU, precision="fp32", channels_last=False, cache_dir=tmp_path)
    assert exports == [1]


@pytest.mark.parametrize("damage", ["overwrite", "truncate", "digest_rewritten"])
def test_a_damaged_onnx_export_in_cache_dir_is_exported_again(tmp_path, damage):
    m, x = _model(), _batch()
    eng.engine_forward("onnxruntime", m, x, device=CPU, precision="fp32", channels_last=False, cache_dir=tmp_path)
    path = next((tmp_path / "engines" / "onnx").glob("*.onnx"))
    good = path.read_bytes()
    eng.release_engines()
    if damage == "overwrite":  # the same length, still a readable model, with other weights
        with open(path, "r+b") as f:
            f.seek(len(good) // 2)
            f.write(b"\x7f" * (len(good) // 4))
    else:
        path.write_bytes(good[: len(good) // 2])
    if damage == "digest_rewritten":  # a file its digest vouches for, that onnxruntime cannot open
        path.with_name(path.name + ".digest").write_text(eng.file_digest(path) + "\n")
    fwd = eng.engine_forward("onnxruntime", m, x, device=CPU, precision="fp32", channels_last=False,
                             cache_dir=tmp_path)  # checked against eager fp32: raises if the damage were used
    with torch.no_grad():
        assert torch.allclose(fwd(x), m.features(x), atol=1e-4)
    assert path.read_bytes() == good


def test_a_reduced_precision_engine_may_differ_as_much_as_eager_at_that_precision(monkeypatch):
    m, x = _model(), _batch()
    eager_bf16 = eng.engine_forward("eager", m, x, device=CPU, precision="bf16", channels_last=False)
    with torch.no_grad():
        ref = m.features(x)
        own = float((eager_bf16(x).float() - ref).abs().max() / ref.abs().max())
    assert own > 0
    monkeypatch.setitem(eng.TOLERANCE, "bf16", own / 10)  # the fixed tolerance alone would refuse eager bf16 itself
    kw = dict(device=CPU, precision="bf16", channels_last=False)
    assert eng.check_against_eager("compile", eager_bf16, m, x, **kw) == pytest.approx(own)
    scale = float(ref.abs().max())
    off = lambda xb: eager_bf16(xb).float() + 3 * own * scale  # noqa: E731  (three times eager's own difference)
    with pytest.raises(tk.EngineError, match=r"tolerance .* for bf16, eager bf16 "):
        eng.check_against_eager("compile", off, m, x, **kw)
    measured = {"eager": {"images_per_s": 10.0, "rel_diff": own, "precision": "bf16"},
                "compile": {"images_per_s": 50.0, "rel_diff": 1.5 * own, "precision": "bf16"},
                "onnxruntime": {"images_per_s": 40.0, "rel_diff": 1.5 * own, "precision": "fp32"}}
    engine, why = eng.decide_engine("auto", device_type="cpu", measured=measured, n_images=10_000,
                                    available={"eager": None, "onnxruntime": None, "compile": None}, precision="bf16")
    assert engine == "compile" and "onnxruntime rejected" in why  # an fp32 engine keeps the fp32 tolerance


def test_a_disagreeing_engine_is_refused_when_forced_and_rejected_under_auto(monkeypatch):
    m, x = _model(), _batch()
    real = eng._onnx_forward

    def wrong(*a, **k):
        fwd = real(*a, **k)
        return lambda xb: fwd(xb) + 1.0
    monkeypatch.setattr(eng, "_onnx_forward", wrong)
    with pytest.raises(tk.EngineError, match="differs from eager fp32"):
        eng.engine_forward("onnxruntime", m, x, device=CPU, precision="fp32", channels_last=False)
    eng.release_engines()
    measured = eng.time_engines(m, [x], device=CPU, precision="fp32", channels_last=False,
                                candidates=["onnxruntime"], rounds=1)
    assert measured["onnxruntime"]["rel_diff"] > eng.TOLERANCE["fp32"]
    measured["onnxruntime"]["images_per_s"] = 100 * measured["eager"]["images_per_s"]  # even when much faster
    engine, why = eng.decide_engine("auto", device_type="cpu", available={"eager": None, "onnxruntime": None},
                                    measured=measured, n_images=10_000)
    assert engine == "eager"
    assert "onnxruntime rejected: features differ from eager fp32" in why


def test_a_forced_engine_that_fails_on_its_first_batch_is_one_engine_error(monkeypatch):
    """A compiler present but broken (inductor's InvalidCxxCompiler, missing Python headers)
    fails at the first call: named as the engine's failure, not a traceback from inductor."""
    def compiled_failing_with(exc):
        def compiled(*a, **k):
            def fwd(x):
                raise exc
            return fwd
        monkeypatch.setattr(eng, "_compiled_forward", compiled)

    def forced():
        try:
            eng.engine_forward("compile", _model(), _batch(), device=CPU, precision="fp32", channels_last=False)
        finally:
            eng.release_engines()

    compiled_failing_with(RuntimeError("InvalidCxxCompiler: No working C++ compiler found in "
                                       "torch._inductor.config.cpp.cxx"))
    with pytest.raises(tk.EngineError, match=r"The compile feature pass failed on its first batch \(inductor needs a "
                                             r"working C\+\+ compiler .*\): RuntimeError: InvalidCxxCompiler"):
        forced()
    # dynamo's own text holds "compile": no compiler hint for a failure of the model's
    compiled_failing_with(RuntimeError("TorchRuntimeError: RuntimeError when making fake tensor call, while "
                                       "torch.compile traced the model. Set torch._dynamo.config.suppress_errors"))
    with pytest.raises(tk.EngineError, match=r"The compile feature pass failed on its first batch: RuntimeError: "
                                             r"TorchRuntimeError"):
        forced()
    compiled_failing_with(torch.OutOfMemoryError("CUDA out of memory"))  # the device's memory: raised as it is
    with pytest.raises(torch.OutOfMemoryError):
        forced()


def test_an_engine_compared_while_timed_is_not_compared_again_on_that_batch(monkeypatch):
    m, x = _model(), _batch()
    measured = eng.time_engines(m, [x, _batch(seed=2)], device=CPU, precision="fp32", channels_last=False,
                                candidates=["onnxruntime"], rounds=1)
    assert measured["onnxruntime"]["rel_diff"] <= eng.TOLERANCE["fp32"]
    compared = []
    real = eng._eager_fp32
    monkeypatch.setattr(eng, "_eager_fp32", lambda *a, **k: compared.append(1) or real(*a, **k))
    eng.engine_forward("onnxruntime", m, x, device=CPU, precision="fp32", channels_last=False)
    assert compared == []  # the timing compared it on this very batch
    eng.engine_forward("onnxruntime", m, _batch(seed=3), device=CPU, precision="fp32", channels_last=False)
    assert compared == [1]  # another batch is compared


def test_a_compiled_pass_whose_module_trained_since_is_not_reused_for_its_former_weights(monkeypatch):
    """A compiled pass runs the live module it was compiled on. When that module has trained
    since (a policy that unfreezes after the cached phase), a later pass on a module with its
    former weights gets a pass of its own, checked against eager again, not the trained one."""
    monkeypatch.setattr(torch, "compile", lambda module, **kw: module)  # the module itself: no compile time
    where = dict(device=CPU, precision="fp32", channels_last=False)
    x = _batch()
    first = _model()
    eng.engine_forward("compile", first, x, **where)
    with torch.no_grad():
        for p in first.trunk.parameters():
            p.add_(0.5)  # trained in place since
    again = _model()  # the weights `first` had when its pass was compiled
    got = eng.engine_forward("compile", again, x, **where)(x)
    with torch.no_grad():
        ref = again.features(x)
    assert (got - ref).abs().max() <= eng.TOLERANCE["fp32"] * ref.abs().max()


class _Options:  # an object of its own kind: no fingerprint reads it
    def __init__(self, mode: str) -> None:
        self.mode = mode


class _OptionsTrunk(torch.nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.options = _Options(mode)

    def forward(self, x):
        x = self.conv(x)
        return x.mean((2, 3)) if self.options.mode == "avg" else x.amax((2, 3))


@pytest.mark.parametrize("engine", ["onnxruntime", "compile"])
def test_a_later_trunk_of_the_same_fingerprint_gets_an_engine_of_its_own(engine, monkeypatch):
    """Two trunks with one fingerprint that compute otherwise (forward reads an object no
    fingerprint sees): in one process the second was given the first's ONNX session or
    compiled module, and its check against eager was skipped as done, so a sweep trained on
    the first trunk's features."""
    monkeypatch.setattr(torch, "compile", lambda module, **kw: module)  # the module itself: no compile time
    where = dict(device=CPU, precision="fp32", channels_last=False)
    x = _batch(size=16)

    def model(mode):
        torch.manual_seed(0)
        bb = from_module(_OptionsTrunk(mode), input_spec={"image_size": 16}, name="options")
        return tk.build_model(bb, 2).eval()
    first, second = model("avg"), model("max")
    assert eng.pass_fingerprint(second) == eng.pass_fingerprint(first)  # the blind spot itself
    eng.engine_forward(engine, first, x, **where)
    got = eng.engine_forward(engine, second, x, **where)(x)
    with torch.no_grad():
        ref = second.features(x)
    assert (got - ref).abs().max() <= eng.TOLERANCE["fp32"] * ref.abs().max()


def test_the_feature_pass_takes_the_timed_batches_features_from_the_timing(monkeypatch):
    """The pass starts on the first batch its engine was timed on: its features come from the
    timing (the same engine on the same input), the rest are computed, and the features are
    those of a pass that computes every batch. A pass that starts elsewhere computes all. (The
    timing's second batch holds items spread over the data: `example_batches`.)"""
    from transferkit.train.features import compute_features

    real, calls = eng._onnx_forward, []

    def counted(*a, **k):
        fwd = real(*a, **k)
        return lambda xb: calls.append(len(xb)) or fwd(xb)
    monkeypatch.setattr(eng, "_onnx_forward", counted)
    m = _model()
    ds = torch.utils.data.TensorDataset(_batch(20), torch.arange(20))
    where = dict(device=CPU, precision="fp32", channels_last=False, cache_dir=None)

    def features(dataset):
        fwd = eng.lazy_engine_forward("onnxruntime", m, dataset, batch_size=8, **where)
        return compute_features(m, dataset, key="k", views=1, batch_size=8, device=CPU, num_workers=0, seed=0,
                                forward=fwd).features
    batches = eng.example_batches(ds, batch_size=8)
    eng.time_engines(m, batches, candidates=["onnxruntime"], rounds=1, device=CPU, precision="fp32",
                     channels_last=False)
    assert calls == [8, 8]  # warm-up and comparison on batch 0, the spread batch timed
    reused = features(ds)
    assert calls == [8, 8, 8, 4]  # batch 0 from the timing, batches 1 and 2 computed
    computed = features(ds)  # nothing left from the timing: all computed
    assert calls == [8, 8, 8, 4, 8, 8, 4]
    assert torch.equal(torch.from_numpy(reused), torch.from_numpy(computed))
    eng.time_engines(m, batches, candidates=["onnxruntime"], rounds=1, device=CPU, precision="fp32",
                     channels_last=False)
    del calls[:]
    other = torch.utils.data.TensorDataset(torch.flip(_batch(20), [0]), torch.arange(20))
    features(other)  # its batches are not the timed ones: checked against eager on two, all computed
    assert calls == [8, 8, 8, 8, 4]


def test_a_run_prepares_its_timed_engine_once_when_the_policy_freezes_batchnorm(folder, monkeypatch):
    """The engines are timed on the trunk as loaded; the pass runs on the run's trunk, whose
    BatchNorm layers the policy has frozen since (another class, the same eval-mode pass). The
    pass uses the export, session and comparison of the timing and takes the timed batches'
    features from it: one export in the whole run, and the features of an eager pass."""
    monkeypatch.setattr(eng, "MIN_IMAGES_TO_TIME", 1)
    monkeypatch.setattr(eng, "engine_availability", lambda device_type: {
        "eager": None, "onnxruntime": None, "compile": "not timed in this test (compiling takes minutes)"})
    monkeypatch.setattr(eng, "compile_pays", lambda *a, **k: (True, "timed in this test"))
    real_fastest = eng._fastest

    def onnx_fastest(runners, *a, **k):  # the timing runs; its verdict is ONNX Runtime's, whatever the clock said
        return {n: 1e9 if n == "onnxruntime" else 1.0 for n in real_fastest(runners, *a, **k)}
    monkeypatch.setattr(eng, "_fastest", onnx_fastest)
    exports, real_export = [], eng.export_feature_pass
    monkeypatch.setattr(eng, "export_feature_pass", lambda *a, **k: exports.append(1) or real_export(*a, **k))
    checks, real_check = [], eng.check_against_eager
    monkeypatch.setattr(eng, "check_against_eager", lambda *a, **k: checks.append(1) or real_check(*a, **k))
    passed, real_lazy = [], eng.lazy_engine_forward

    def recorded(*a, **k):  # the run's pass: its inputs and features
        fwd = real_lazy(*a, **k)
        return lambda x: passed.append((x, fwd(x))) or passed[-1][1]
    monkeypatch.setattr(steps, "lazy_engine_forward", recorded)
    r = tk.finetune(**{**KW, "backbone": "tk:cifar_resnet20", "data": folder, "policy": "feature_extraction",
                       "epochs": 1, "batch_size": 2})
    assert r.decisions.engine == "onnxruntime" and "FrozenBatchNorm2d" in repr(r.model.trunk)
    assert exports == [1] and checks == []  # the timing's export and comparison serve the pass
    assert sum(len(x) for x, _ in passed) == 12  # every image of the folder went through the pass
    with torch.no_grad():
        for x, got in passed:
            ref = r.model.eval().features(x)
            assert (got - ref).abs().max() <= eng.TOLERANCE["fp32"] * ref.abs().max()


@pytest.mark.parametrize("onnx_factor", [1000.0, 0.001])
def test_an_engine_that_cannot_beat_the_fastest_prepared_one_is_not_prepared(tmp_path, monkeypatch, onnx_factor):
    """ONNX Runtime is timed as soon as it is prepared; torch.compile, at its expected speed-up
    over eager, is then weighed against it: far behind it (ONNX Runtime 1000x its clock), the
    compilation cannot pay and is skipped, saying over what; ahead of it (ONNX Runtime slowed
    1000x), it is prepared (here a compilation that fails). A stored timing is weighed the
    same way, so the skip is not timed again by a later run."""
    real_fastest = eng._fastest
    monkeypatch.setattr(eng, "_fastest", lambda runners, *a, **k: {
        n: v * onnx_factor if n == "onnxruntime" else v for n, v in real_fastest(runners, *a, **k).items()})

    def no_compiler(*a, **k):
        raise RuntimeError("compiled in this test")
    monkeypatch.setattr(eng, "_compiled_forward", no_compiler)
    m = _model()
    batches = [_batch(seed=s) for s in range(3)]
    kw = dict(device=CPU, precision="fp32", channels_last=False, candidates=["onnxruntime", "compile"],
              n_images=10**9, cache_dir=tmp_path)
    out = eng.measure_engines(m, batches, **kw)
    if onnx_factor > 1:
        assert "over onnxruntime at" in out["compile"]["skipped"] and "images_per_s" in out["onnxruntime"]
        monkeypatch.setattr(eng, "time_engines", lambda *a, **k: pytest.fail("timed again"))
        assert "stored" in eng.measure_engines(m, batches, **kw)["compile"]
    else:
        assert out["compile"] == {"error": "RuntimeError: compiled in this test"}


def test_auto_keeps_the_fastest_agreeing_engine_and_says_why():
    ok = {"precision": "fp32", "rel_diff": 1e-6}
    measured = {"eager": {**ok, "images_per_s": 30.0, "rel_diff": 0.0}, "onnxruntime": {**ok, "images_per_s": 80.0},
                "compile": {**ok, "images_per_s": 60.0}}
    avail = {"eager": None, "onnxruntime": None, "compile": None}
    engine, why = eng.decide_engine("auto", device_type="cpu", available=avail, measured=measured, n_images=5000)
    assert engine == "onnxruntime" and "2.67x" in why
    measured["onnxruntime"]["images_per_s"] = 31.0  # within the noise margin: eager stays
    assert eng.decide_engine("auto", device_type="cpu", available=avail, measured=measured, n_images=5000)[0] \
        == "compile"
    measured["compile"] = {"skipped": "estimated 60 s to compile > the 3 s it would save"}
    engine, why = eng.decide_engine("auto", device_type="cpu", available=avail, measured=measured, n_images=5000)
    assert engine == "eager" and "compile skipped: estimated 60 s" in why
    assert eng.decide_engine("auto", device_type="cpu", available=avail, measured=measured, n_images=10)[0] == "eager"
    assert "distributed" in eng.decide_engine("auto", device_type="cpu", available=avail, measured=measured,
                                              n_images=5000, world_size=2)[1]
    with pytest.raises(ConfigError, match="feature_engine='tensorrt' is not an engine"):
        eng.decide_engine("tensorrt", device_type="cpu", available=avail, measured=None, n_images=5000)


def test_missing_onnxruntime_is_skipped_under_auto_and_refused_when_forced(folder, monkeypatch):
    _no_onnxruntime(monkeypatch)
    avail = eng.engine_availability("cpu")
    assert "onnxruntime/onnx not installed" in avail["onnxruntime"]
    monkeypatch.setattr(eng, "MIN_IMAGES_TO_TIME", 1)  # time the engines even on this tiny folder
    monkeypatch.setattr(eng, "engine_availability",
                        lambda device_type: {**avail, "compile": "not timed in this test (compiling takes minutes)"})
    _, d = _decide(backbone=_backbone(), data=folder)
    assert d.engine == "eager"
    assert "onnxruntime skipped: onnxruntime/onnx not installed" in d.engine_reason
    assert f"engine:   eager ({d.engine_reason})" in d.summary()
    with pytest.raises(ConfigError, match="feature_engine='onnxruntime' cannot run here: onnxruntime/onnx not "
                                          "installed.*pip install 'transferkit\\[onnx\\]'"):
        _decide(backbone=_backbone(), data=folder, feature_engine="onnxruntime")


def test_a_broken_onnx_install_is_an_engine_skipped_not_a_crash_of_every_frozen_run(folder, monkeypatch):
    """A protobuf of another major version makes ``import onnx`` raise a TypeError: every frozen
    run crashed in engine_availability, feature_engine="eager" too."""
    _no_onnxruntime(monkeypatch, TypeError("Descriptors cannot be created directly."))
    avail = eng.engine_availability("cpu")
    assert "onnxruntime/onnx installed but failing to import (TypeError: Descriptors cannot be created" \
        in avail["onnxruntime"]
    for engine in ("eager", "auto"):
        assert tk.plan(backbone=_backbone(), data=folder, **{**KW, "feature_engine": engine}).engine == "eager"
    with pytest.raises(ConfigError, match="feature_engine='onnxruntime' cannot run here: onnxruntime/onnx installed "
                                          "but failing to import"):
        _decide(backbone=_backbone(), data=folder, feature_engine="onnxruntime")
    with pytest.raises(tk.ExportError, match=r"^Running an ONNX file needs the optional packages onnx and "
                                             r"onnxruntime, installed but failing to import \(TypeError"):
        (folder.parent / "m.onnx").write_bytes(b"\x08\x07")
        tk.load(folder.parent / "m.onnx")


def test_onnxruntime_without_a_cuda_provider_names_onnxruntime_gpu():
    import onnxruntime

    why = eng.engine_availability("cuda")["onnxruntime"]
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        assert why is None
    else:
        assert why.endswith("; on CUDA: pip install onnxruntime-gpu in place of onnxruntime)")
    assert "onnxruntime-gpu" not in str(eng.engine_availability("cpu")["onnxruntime"])


def test_engine_is_in_the_plan_the_summary_and_the_cache_key(folder, tmp_path):
    ds = {e: _decide(backbone=_backbone(), data=folder, feature_engine=e, cache_dir=tmp_path / "c")[1]
          for e in ("eager", "onnxruntime")}
    for e, d in ds.items():
        assert d.engine == e and d.to_dict()["feature_engine"] == e
        assert f"engine:   {e} (asked)" in d.summary()
    # the layout the run decided is eager's: ONNX Runtime runs the only pass of a frozen trunk in its own
    assert ds["onnxruntime"].cache and "memory layout: ONNX Runtime's own in the feature pass" in \
        ds["onnxruntime"].summary()
    assert "ONNX Runtime's own" not in ds["eager"].summary()
    assert ds["eager"].feature_key("train") != ds["onnxruntime"].feature_key("train")
    assert ds["eager"].feature_key("val") != ds["onnxruntime"].feature_key("val")
    # a resume may run another engine: it is not a difference that refuses the resume
    assert differences(ds["eager"].to_dict(), ds["onnxruntime"].to_dict()) == {}


def test_onnxruntime_features_are_stored_in_fp32_once_whatever_the_run_precision_and_layout(folder, tmp_path):
    kw = dict(backbone=_backbone(), data=folder, feature_engine="onnxruntime", cache_dir=tmp_path / "c",
              policy="feature_extraction", epochs=1)
    results = [tk.finetune(**{**KW, **kw, "precision": p, "channels_last": cl})
               for p, cl in (("fp32", False), ("bf16", True), ("bf16", False), ("fp32", True))]
    reports = [r.feature_report for r in results]
    assert [r["dtype"] for r in reports] == ["float32"] * 4  # ONNX Runtime computes in fp32
    from transferkit.results import result_record

    assert result_record(results[0])["feature_engine"] == "onnxruntime"  # what `transferkit finetune --json` says
    decided = _decide(**{**kw, "precision": "bf16"})[1]
    assert "speed:    features fp32 (the onnxruntime engine computes in it; eager would run bf16" in decided.summary()
    record = decided.to_dict()  # the record says what the summary says, under a key a resume may see change
    assert record["feature_engine_precision"] == "fp32" and record["feature_precision"] == "bf16"
    eager = dataclasses.replace(decided, engine="eager").to_dict()
    assert eager["feature_engine_precision"] == "bf16" and differences(record, eager) == {}
    assert reports[0]["computed"] >= 1 and [r["computed"] for r in reports[1:]] == [0, 0, 0]


def _stored(cache: Path, key: str) -> np.ndarray:
    """The features a run left in its feature store, reopened with the store's own parameters."""
    from transferkit.train.feature_store import ShardedFeatureStore

    meta = json.loads((cache / key / "store.json").read_text())
    store = ShardedFeatureStore.open(cache, key, **{k: meta[k] for k in ("num_samples", "part_size", "dim", "dtype",
                                                                          "views")})
    return store.arrays()[0]


def test_finetune_on_onnxruntime_features_matches_eager(folder, tmp_path):
    runs = {e: tk.finetune(_backbone(), data=folder, feature_engine=e, cache_dir=tmp_path / "c", **KW)
            for e in ("eager", "onnxruntime")}
    stores = {e: _stored(tmp_path / "c", r.decisions.feature_key("train")) for e, r in runs.items()}
    assert not np.array_equal(stores["eager"], np.zeros_like(stores["eager"]))
    scale = np.abs(stores["eager"]).max()
    assert np.abs(stores["onnxruntime"] - stores["eager"]).max() <= eng.TOLERANCE["fp32"] * scale
    assert runs["onnxruntime"].decisions.engine == "onnxruntime"
    assert len(list((tmp_path / "c" / "engines" / "onnx").glob("*.onnx"))) == 1  # the pass ran on the export


def test_the_stored_timing_is_reused_by_a_later_run(folder, tmp_path, monkeypatch):
    _time_onnx_on_tiny_data(monkeypatch)
    facts, first = _decide(backbone=_backbone(), data=folder, cache_dir=tmp_path / "c")
    assert (tmp_path / "c" / "engines.json").is_file() and "images_per_s" in facts.engines["measured"]["onnxruntime"]

    def no_timing(*a, **k):
        raise AssertionError("timed again")
    monkeypatch.setattr(eng, "time_engines", no_timing)
    facts, second = _decide(backbone=_backbone(), data=folder, cache_dir=tmp_path / "c")
    assert second.engine == first.engine and facts.engines["measured"]["onnxruntime"]["stored"] is True
    assert second.feature_key("train") == first.feature_key("train")
    assert "timed on the run's input" in first.engine_reason
    assert "read from an earlier timing of this trunk on input of this size (cache_dir/engines.json; its " \
        "differences from eager are that timing's" in second.engine_reason


@pytest.mark.parametrize("engine", ["eager", "onnxruntime"])
def test_auto_reads_features_an_engine_cached_whole_without_timing_the_engines(folder, tmp_path, monkeypatch, engine):
    """Features of the input that one engine cached whole are read under auto: the engines are
    not timed (no engines.json: removed, or another number of threads), so no other engine's
    timing can make the run compute every feature again under its key. A store that lacks a
    part is no such store: the engines are timed."""
    _time_onnx_on_tiny_data(monkeypatch)
    cache = tmp_path / "c"
    kw = {**KW, "backbone": _backbone(), "data": folder, "cache_dir": cache, "policy": "feature_extraction",
          "epochs": 1}
    first = tk.finetune(**kw, feature_engine=engine)
    assert first.feature_report["computed"] >= 1 and not (cache / "engines.json").exists()

    def no_timing(*a, **k):
        raise AssertionError("the engines were timed")
    with monkeypatch.context() as m:
        m.setattr(eng, "measure_engines", no_timing)
        again = tk.finetune(**kw)  # feature_engine="auto"
    assert again.decisions.engine == engine
    assert again.decisions.engine_reason.startswith("this input's features are in cache_dir already")
    assert again.feature_report["computed"] == 0 and again.feature_report["reused"] == first.feature_report["computed"]
    if engine == "onnxruntime":  # ONNX Runtime gone since (another environment): its stored features need none,
        for compile_ in (None, "no C compiler"):  # whether another engine can run here or none can
            with monkeypatch.context() as m:
                m.setattr(eng, "measure_engines", no_timing)
                m.setattr(eng, "engine_availability", lambda device_type: {
                    "eager": None, "onnxruntime": "onnxruntime/onnx not installed", "compile": compile_})
                gone = tk.finetune(**kw)
                planned = tk.plan(**kw)  # a dry run loads no weights: it cannot know the stored features' key
            assert gone.decisions.engine == "onnxruntime" and gone.feature_report["computed"] == 0, compile_
            assert "provisional" in planned.engine_reason and "stored features" in planned.engine_reason, compile_
    # one part missing: the engines are timed, as for a store never made
    parts = sorted((cache / first.decisions.feature_key("val")).glob("part-*"))
    shutil.rmtree(parts[-1])
    third = tk.finetune(**kw)
    assert "timed on the run's input" in third.decisions.engine_reason and (cache / "engines.json").is_file()


def test_a_stored_onnx_verdict_whose_export_cannot_be_written_again_falls_back_before_deciding(folder, tmp_path,
                                                                                            monkeypatch):
    cache, kw, store = _stored_onnx_verdict(folder, tmp_path, monkeypatch)
    assert _decide(**kw)[1].engine == "onnxruntime"
    shutil.rmtree(cache / "engines" / "onnx")
    (cache / "engines" / "onnx").write_text("in the way")  # the export cannot be written again (root too)
    _store_onnx_rate(store, 1e-3)  # a verdict that keeps eager anyway: nothing to say about the export
    facts, d = _decide(**kw)
    assert d.engine == "eager" and "error" not in facts.engines["measured"]["onnxruntime"] and not d.notes
    _store_onnx_rate(store, 1e9)
    facts, d = _decide(**kw)
    assert d.engine == "eager" and facts.engines["measured"]["onnxruntime"]["stored"] is True
    assert "onnxruntime failed: its stored timing names an export that is gone or damaged, and" in d.engine_reason
    assert "cannot be written (FileExistsError" in d.engine_reason
    assert any(n.startswith("feature_engine='auto' runs the feature pass on eager, not on onnxruntime as the stored "
                            "timing says: its stored timing names an export that is gone or damaged") for n in d.notes)
    with pytest.warns(UserWarning, match="not on onnxruntime as the stored timing says"):
        r = tk.finetune(**{**KW, **kw})  # the run goes on, on eager, where it used to stop when the pass started
    assert r.decisions.engine == "eager" and r.feature_report["computed"] >= 1
    # forced, the engine is not replaced: a run without its session (a new process) says why it cannot prepare it
    eng.release_engines()
    with pytest.raises(OutputError, match="ONNX feature pass .* cannot be created"):
        tk.finetune(**{**KW, **kw, "feature_engine": "onnxruntime"})


def test_a_timing_stored_in_another_format_is_timed_again(folder, tmp_path, monkeypatch):
    _time_onnx_on_tiny_data(monkeypatch)
    _decide(backbone=_backbone(), data=folder, cache_dir=tmp_path / "c")
    store = tmp_path / "c" / "engines.json"
    data = json.loads(store.read_text())
    for entry in data.values():  # a failure that an earlier format's export had (e.g. a ViT's attention)
        assert entry["format"] == eng.STORE_FORMAT
        entry["format"] = eng.STORE_FORMAT - 1
        entry["measured"]["onnxruntime"] = {"error": "ExportError: the exporter of an earlier format failed"}
    store.write_text(json.dumps(data))
    facts, d = _decide(backbone=_backbone(), data=folder, cache_dir=tmp_path / "c")
    assert "stored" not in facts.engines["measured"]["eager"] and "timed on the run's input" in d.engine_reason
    assert "images_per_s" in facts.engines["measured"]["onnxruntime"] and "earlier format" not in d.engine_reason
    assert all(e["format"] == eng.STORE_FORMAT for e in json.loads(store.read_text()).values())


def test_an_engine_that_failed_for_the_machines_state_is_timed_again_once_it_is_mended(folder, tmp_path,
                                                                                      monkeypatch):
    _time_onnx_on_tiny_data(monkeypatch)
    cache = tmp_path / "c"
    cache.mkdir()
    (cache / "engines").write_text("a file where the exports' folder goes")  # (or a full disk)
    facts, first = _decide(backbone=_backbone(), data=folder, cache_dir=cache)
    failed = facts.engines["measured"]["onnxruntime"]
    assert "OutputError" in failed["error"] and failed["transient"] is True and first.engine == "eager"
    facts, again = _decide(backbone=_backbone(), data=folder, cache_dir=cache)
    assert "stored" not in facts.engines["measured"]["eager"]  # not read back from the store: timed again
    (cache / "engines").unlink()
    facts, mended = _decide(backbone=_backbone(), data=folder, cache_dir=cache)
    assert "images_per_s" in facts.engines["measured"]["onnxruntime"] and "failed" not in mended.engine_reason


def test_an_engine_that_fails_after_its_first_batch_is_skipped_while_timed_and_named_in_the_pass(folder, tmp_path,
                                                                                                 monkeypatch):
    """auto skipped an engine that failed on its first call only: one failing on a later timed
    batch, or in the pass after it was chosen, ended the run with onnxruntime's traceback."""
    real = eng._onnx_forward
    state = {"verifying": False, "calls": 0, "error": RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : "
                                                                   "simulated")}

    def failing_later(*a, **k):  # an ONNX Runtime session that runs its first batch and checks, then fails
        fwd = real(*a, **k)

        def forward(x):
            state["calls"] += 1
            if state["calls"] > 1 and not state["verifying"]:
                raise state["error"]
            return fwd(x)
        return forward
    monkeypatch.setattr(eng, "_onnx_forward", failing_later)
    _time_onnx_on_tiny_data(monkeypatch)
    facts, d = _decide(backbone=_backbone(), data=folder)  # timed: fails on the batch timed after the first
    assert d.engine == "eager" and "onnxruntime failed: RuntimeError: [ONNXRuntimeError]" in d.engine_reason
    failed = facts.engines["measured"]["onnxruntime"]
    assert failed["error"].endswith("simulated (on a timed batch after its first)") and "transient" not in failed
    eng.release_engines()
    for error in (OSError(28, "No space left on device"),  # the machine's state: timed again later
                  RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested "
                               "buffer of size 1048576")):
        eng.release_engines()
        state.update(calls=0, error=error)
        facts, d = _decide(backbone=_backbone(), data=folder)
        assert d.engine == "eager" and facts.engines["measured"]["onnxruntime"]["transient"] is True

    monkeypatch.setattr(eng, "_onnx_forward", real)
    eng.release_engines()
    cache, kw, store = _stored_onnx_verdict(folder, tmp_path, monkeypatch)  # chosen from a stored verdict
    check = eng.check_against_eager

    def checking(*a, **k):
        state["verifying"] = True
        try:
            return check(*a, **k)
        finally:
            state["verifying"] = False
    monkeypatch.setattr(eng, "check_against_eager", checking)
    monkeypatch.setattr(eng, "_onnx_forward", failing_later)
    eng.release_engines()
    state.update(calls=0, error=RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : bad allocation"))
    with pytest.raises(tk.EngineError, match=r"The onnxruntime feature pass ran out of memory on a batch of the pass "
                                             r"\(.*\): RuntimeError: .*bad allocation\. Free memory .* the failure is "
                                             r"not recorded against the engine\.$"):
        tk.finetune(**{**KW, **kw})
    assert _decide(**kw)[1].engine == "onnxruntime"  # the stored verdict is unchanged
    eng.release_engines()
    state.update(calls=0, error=RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : simulated"))
    with pytest.raises(tk.EngineError, match=r"The onnxruntime feature pass failed on a batch of the pass \(.*\): "
                                             r"RuntimeError: .*simulated\. Use feature_engine='eager'; auto skips it "
                                             r"in the next run on this cache_dir\.$"):
        tk.finetune(**{**KW, **kw})
    assert not [k for k in eng._RUNTIMES if k[0] == "onnxruntime"]  # the failing session is not kept prepared,
    assert not [k for k in eng._VERIFIED if k[0][0] == "onnxruntime"]  # nor its checks (one made again is checked)
    facts, d = _decide(**kw)  # the stored verdict holds the failure: auto keeps eager
    assert d.engine == "eager"
    assert facts.engines["measured"]["onnxruntime"]["error"].endswith("(on a batch of the feature pass)")


def test_a_stored_onnx_verdict_in_a_read_only_cache_uses_its_intact_export_and_not_a_damaged_one(folder, tmp_path,
                                                                                               monkeypatch):
    cache, kw, store = _stored_onnx_verdict(folder, tmp_path, monkeypatch)

    def read_only(folder):
        raise PermissionError(13, "Read-only file system", str(folder))
    monkeypatch.setattr(eng, "probe_writable", read_only)  # a cache on a read-only mount (root writes anywhere)
    assert _decide(**kw)[1].engine == "onnxruntime"  # its export is intact: read, not written
    export = next((cache / "engines" / "onnx").glob("*.onnx"))
    export.write_bytes(export.read_bytes()[:100])  # damaged, its digest kept
    facts, d = _decide(**kw)
    assert d.engine == "eager" and "export that is gone or damaged" in d.engine_reason
    assert "Read-only file system" in d.engine_reason and d.notes


def test_a_damaged_timing_store_is_timed_again_and_one_that_cannot_be_written_warns(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(eng, "MIN_IMAGES_TO_TIME", 1)
    monkeypatch.setattr(eng, "engine_availability", lambda device_type: {
        "eager": None, "onnxruntime": None, "compile": "not timed in this test (compiling takes minutes)"})
    _decide(backbone=_backbone(), data=folder, cache_dir=tmp_path / "c")
    store = tmp_path / "c" / "engines.json"
    data = json.loads(store.read_text())
    for damage in ({"images_per_s": "fast"}, {"rel_diff": None}, {"precision": "fp8"}):
        for entry in data.values():
            entry["measured"]["eager"].update(damage)
        store.write_text(json.dumps(data))
        facts, d = _decide(backbone=_backbone(), data=folder, cache_dir=tmp_path / "c")
        assert "stored" not in facts.engines["measured"]["eager"] and "timed on the run's input" in d.engine_reason
        data = json.loads(store.read_text())
    store.unlink()
    store.mkdir()  # engines.json is a folder: the run goes on with its own timing
    with pytest.warns(UserWarning, match="The engine timing was not stored .*time again") as seen:
        facts, d = _decide(backbone=_backbone(), data=folder, cache_dir=tmp_path / "c")
    assert "is a folder, where a file goes" in str(seen[0].message) and "model.pt" not in str(seen[0].message)
    assert "images_per_s" in facts.engines["measured"]["eager"]


def test_compile_pays_only_for_enough_data():
    assert not eng.compile_pays("cpu", n_images=400, eager_images_per_s=35.0, n_modules=150, load=1.0)[0]
    assert eng.compile_pays("cpu", n_images=500_000, eager_images_per_s=35.0, n_modules=150, load=1.0)[0]
    # a loaded machine compiles slower: the same run length no longer pays
    assert not eng.compile_pays("cpu", n_images=5_000, eager_images_per_s=35.0, n_modules=150, load=6.0)[0]
    assert eng.compile_pays("cpu", n_images=5_000, eager_images_per_s=35.0, n_modules=150, load=1.0)[0]
    # CUDA: the compile speed-up is measured (an H200), ONNX Runtime's is not: auto never prepares it there
    assert eng.compile_pays("cuda", n_images=10**7, eager_images_per_s=1000.0, n_modules=150)[0]
    assert not eng.compile_pays("cuda", n_images=10**4, eager_images_per_s=1000.0, n_modules=150)[0]
    pays, why = eng.compile_pays("cuda", n_images=10**7, eager_images_per_s=1000.0, n_modules=150, engine="onnxruntime")
    assert not pays and why.startswith("no measured speed-up of the onnxruntime pass on cuda")
    # an audio pass is counted in clips
    assert "it would save on 400 clips at" in eng.compile_pays("cpu", n_images=400, eager_images_per_s=35.0,
                                                               n_modules=150, load=1.0, unit="clips")[1]
    audio = tk.build_model(tk.get_backbone("ta:wav2vec2_tiny", weights=None), 2)
    assert eng.input_unit(audio) == "clips" and eng.input_unit(_model()) == "images"
    measured = {"eager": {"images_per_s": 30.0, "rel_diff": 0.0, "precision": "fp32"},
                "onnxruntime": {"images_per_s": 60.0, "rel_diff": 1e-7, "precision": "fp32"}}
    why = eng.decide_engine("auto", device_type="cpu", available={"eager": None, "onnxruntime": None},
                            measured=measured, n_images=5000, unit="clips")[1]
    assert "eager fp32 30.0 clips/s" in why and "onnxruntime 60.0 clips/s" in why and "img/s" not in why


def test_onnxruntime_is_timed_only_where_its_export_can_pay(monkeypatch):
    pays = lambda **kw: eng.compile_pays("cpu", n_modules=200, load=1.0, engine="onnxruntime", **kw)[0]  # noqa: E731
    assert pays(n_images=398, eager_images_per_s=48.7)  # an fp32 pass of 8 s: a 3x engine saves more than 3 s
    assert not pays(n_images=398, eager_images_per_s=96.5, fp32_images_per_s=48.7)  # bf16 eager, 2x fp32
    assert pays(n_images=5_000, eager_images_per_s=96.5, fp32_images_per_s=48.7)  # ... on enough images
    assert pays(n_images=398, eager_images_per_s=40.0, fp32_images_per_s=60.0)  # bf16 slower than fp32
    m, x = _model(), _batch()
    monkeypatch.setattr(eng, "ONNX_SECONDS_BASE", {"cpu": 1e6})  # an export that cannot pay
    measured = eng.time_engines(m, [x, _batch(seed=2)], device=CPU, precision="fp32", channels_last=False,
                                candidates=["onnxruntime"], n_images=10_000, rounds=1)
    assert "export and time" in measured["onnxruntime"]["skipped"]
    engine, why = eng.decide_engine("auto", device_type="cpu", available={"eager": None, "onnxruntime": None},
                                    measured=measured, n_images=10_000)
    assert engine == "eager" and "onnxruntime skipped: estimated" in why


def test_timing_rounds_stop_once_the_fastest_leads_clearly(monkeypatch):
    """Rounds after the first are run only while the ranking could still change: not for a
    lone engine, not once one engine leads the others by ``CLEAR_LEAD``. The runners advance
    a simulated clock (no wall-clock time, so no load or CPU changes the outcome)."""
    import types

    calls = {"slow": 0, "fast": 0, "close": 0}
    clock = [0.0]
    monkeypatch.setattr(eng, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def runner(name, seconds):
        def fwd(x):
            calls[name] += 1
            clock[0] += seconds
            return x
        return fwd

    batches = [torch.zeros(2, 1)]
    eng._fastest({"slow": runner("slow", 0.02), "fast": runner("fast", 0.002)}, batches, 3, CPU)
    assert calls["slow"] == calls["fast"] == 1  # a 10x lead after one round: the other rounds cannot reverse it
    calls.update(slow=0, close=0)
    eng._fastest({"slow": runner("slow", 0.01), "close": runner("close", 0.009)}, batches, 3, CPU)
    assert calls["slow"] == calls["close"] == 3  # close: every round is run
    calls.update(slow=0, fast=0)
    eng._fastest({"slow": runner("slow", 0.02), "fast": runner("fast", 0.002)}, batches, 3, CPU,
                 done={"slow": 100.0})
    assert calls["slow"] == 0 and calls["fast"] == 1  # done already timed: its first round is not repeated
    calls.update(fast=0)
    monkeypatch.undo()  # a real engine timing below
    m, x = _model(), _batch()
    seen = []
    real = eng._fastest
    eng_calls = lambda *a, **k: seen.append(list(a[0])) or real(*a, **k)  # noqa: E731
    import unittest.mock
    with unittest.mock.patch.object(eng, "_fastest", eng_calls):
        out = eng.time_engines(m, [x, _batch(seed=2)], device=CPU, precision="fp32", channels_last=False,
                               candidates=[], rounds=3)
    assert seen == [["eager"]] and out["eager"]["images_per_s"] > 0  # eager alone: its first round only


def test_eager_first_call_stands_for_its_timing_only_against_a_clear_lead(monkeypatch):
    """On a CPU where eager runs fp32, its reference batch (a first call) is its timing when a
    prepared engine leads it by ``FIRST_CALL_LEAD``; a smaller lead gets eager timed as usual.
    Each engine call advances a simulated clock (no wall-clock time)."""
    import types

    clock, calls, cost = [0.0], [], {}
    monkeypatch.setattr(eng, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    real = eng.engine_forward

    def on_clock(name, *args, **kwargs):
        fwd = real(name, *args, **kwargs)

        def run(x):
            calls.append(name)
            clock[0] += cost[name]
            return fwd(x)
        return run
    monkeypatch.setattr(eng, "engine_forward", on_clock)
    m, batches = _model(), [_batch(), _batch(seed=2)]
    for onnx_cost, lead in [(0.1, True), (0.6, False)]:  # leads of 10x and 1.7x over eager's first call
        cost.update(eager=1.0, onnxruntime=onnx_cost)
        calls.clear()
        eng.release_engines()
        out = eng.time_engines(m, batches, device=CPU, precision="fp32", channels_last=False,
                               candidates=["onnxruntime"], n_images=10_000)
        assert (calls.count("eager") == 1) is lead  # the first call only, or timed on the next batch too
        assert out["eager"].get("first_call", False) is lead
        engine, why = eng.decide_engine("auto", device_type="cpu", available={"eager": None, "onnxruntime": None},
                                        measured=out, n_images=10_000)
        assert engine == "onnxruntime" and ("eager fp32 8.0 img/s (its first call)" in why) is lead
        assert ("(10.00x eager's first call, within" in why) is lead, why  # the ratio says what it is over
    calls.clear()
    out = eng.time_engines(m, batches, device=CPU, precision="bf16", channels_last=False,
                           candidates=["onnxruntime"], n_images=10_000)
    assert calls.count("eager") >= 2 and "first_call" not in out["eager"]  # bf16 eager is not its fp32 reference
    cost.update(eager=1.0, onnxruntime=0.1)  # a 10x lead, but a benchmark times every engine its rounds
    calls.clear()
    out = eng.time_engines(m, batches, device=CPU, precision="fp32", channels_last=False,
                           candidates=["onnxruntime"], n_images=None, rounds=3, settle=False)
    assert "first_call" not in out["eager"] and calls.count("eager") == calls.count("onnxruntime") == 4


def test_a_first_call_s_set_up_never_stands_for_a_speed_that_weighs_a_compilation(monkeypatch):
    """A first call took up to 20x as long as the next ones (wav2vec2: 29.7 clips/s against
    300-800): weighed against it, a compilation of minutes looked worth it. Each call advances
    a simulated clock: a first call 10 units, the next ones 1."""
    import types

    clock, seen, weighed = [0.0], {}, []
    monkeypatch.setattr(eng, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def costly(name, fn):
        def run(*args, **kwargs):
            clock[0] += 10.0 if not seen.get(name) else 1.0
            seen[name] = True
            return fn(*args, **kwargs)
        return run
    real_forward, real_fp32 = eng.engine_forward, eng._eager_fp32
    monkeypatch.setattr(eng, "engine_forward", lambda name, *a, **k: costly(name, real_forward(name, *a, **k)))
    monkeypatch.setattr(eng, "_eager_fp32", costly("fp32", real_fp32))
    # a compilation pays against eager's first call only (0.8 images a unit), not against its speed (8)
    monkeypatch.setattr(eng, "compile_pays", lambda device_type, **kw: weighed.append(kw) or (
        kw["engine"] == "compile" and kw["eager_images_per_s"] < 1.0, "weighed"))
    m, batches = _model(), [_batch(), _batch(seed=2)]
    out = eng.time_engines(m, batches, device=CPU, precision="fp32", channels_last=False, candidates=["compile"],
                           n_images=10_000)
    assert [w["eager_images_per_s"] for w in weighed] == [0.8, 8.0]  # weighed again against a timed batch
    assert out["compile"] == {"skipped": "weighed"}
    monkeypatch.setattr(eng, "compile_pays", lambda device_type, **kw: weighed.append(kw) or (False, "weighed"))
    seen.clear()
    weighed.clear()
    eng.time_engines(m, batches, device=CPU, precision="fp32", channels_last=False, candidates=["compile"],
                     n_images=10_000)
    assert [w["eager_images_per_s"] for w in weighed] == [0.8]  # no pay even at the first call's speed: not timed


@pytest.mark.slow  # torch.compile (inductor) takes minutes on a 2-core CPU
def test_forced_compile_gives_the_eager_fp32_features():
    m, x = _model(), _batch()
    fwd = eng.engine_forward("compile", m, x, device=CPU, precision="fp32", channels_last=True)
    for xb in (x, _batch(3, seed=1)):  # the compiled batch size and a shorter, padded batch
        with torch.no_grad():
            ref = m.features(xb)
            got = fwd(xb)
        assert got.shape == ref.shape
        assert (got - ref).abs().max() <= eng.TOLERANCE["fp32"] * ref.abs().max()


def test_compile_auto_is_a_trial_where_torch_compile_can_run(folder):
    _, d = _decide(backbone=_backbone(), data=folder, policy="full")
    unavailable = eng.compile_unavailable("cpu")  # a C++ compiler on PATH, or not
    assert d.config.compile == "auto" and d.speed["compile"] == ("trial" if unavailable is None else False)
    assert d.speed["reasons"]["compile"].startswith("compile='auto': tried where the run is long enough"
                                                    if unavailable is None else "compile='auto': not tried")
    for cache in ("auto", False):  # a frozen trunk, with or without the cache, has no step to try
        _, d = _decide(backbone=_backbone(), data=folder, policy="feature_extraction", cache_features=cache)
        assert d.speed["compile"] is False and "never trains" in d.speed["reasons"]["compile"]
    if unavailable is None:
        _, d = _decide(backbone=_backbone(), data=folder, policy="full", compile=True)
        assert d.speed["compile"] is True and d.speed["reasons"]["compile"] == "asked"


def test_compile_true_where_torch_compile_cannot_run_is_refused_when_the_run_decides(folder, monkeypatch):
    """compile=True without a C++ compiler was planned as "asked" and failed in the first training
    step with a traceback of 112 lines (the feature pass's compile was refused up front)."""
    import transferkit.facts as facts

    monkeypatch.setattr(facts, "compile_unavailable", lambda device_type: "no C++ compiler was found")
    with pytest.raises(tk.ConfigError, match=r"compile=True cannot run here: no C\+\+ compiler was found\. Use "
                                             r"compile='auto' \(not tried where it cannot run\) or compile=False"):
        _decide(backbone=_backbone(), data=folder, policy="full", compile=True)
    _, d = _decide(backbone=_backbone(), data=folder, policy="feature_extraction", compile=True)  # never compiled
    assert d.speed["compile"] is False


def test_a_trunk_onnx_cannot_convert_is_timed_on_eager_with_a_one_line_reason(capfd):
    bb = _backbone("spec:tk:cifar_resnet20")  # its STFT has no ONNX conversion
    m = tk.build_model(bb, 3).eval()
    batches = [torch.randn(4, 8000, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    got = eng.time_engines(m, batches, device=CPU, precision="fp32", channels_last=False, candidates=["onnxruntime"])
    assert got["eager"]["images_per_s"] > 0
    assert got["onnxruntime"]["error"].startswith("ExportError: The feature pass cannot be converted to ONNX")
    assert "STFT" in got["onnxruntime"]["error"] and "\n" not in got["onnxruntime"]["error"]
    assert "graph" not in capfd.readouterr().out  # the exporter's dump of the whole graph stays off
    engine, why = eng.decide_engine("auto", device_type="cpu", available={"eager": None, "onnxruntime": None},
                                    measured=got, n_images=5000)
    assert engine == "eager" and "onnxruntime failed: ExportError" in why


def test_a_forced_onnxruntime_pass_that_cannot_convert_is_an_engine_error_with_the_way_out(folder):
    torch.manual_seed(0)  # a 3x3 adaptive pool of 16 px maps: ONNX has no conversion (16 is not a multiple of 3)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(3), torch.nn.Flatten())
    bb = from_module(net, input_spec={"image_size": 16})
    with pytest.raises(tk.EngineError, match=r"cannot be converted to ONNX .*adaptive_avg_pool2d.* Use "
                                             r"feature_engine='eager', or 'auto', which skips an engine that fails"):
        tk.finetune(bb, data=folder, policy="feature_extraction", feature_engine="onnxruntime", epochs=1,
                    precision="fp32", num_workers=0, verbose=False)


def test_a_trunk_known_not_to_convert_is_not_offered_to_onnxruntime_and_a_dry_run_refuses_forcing_it(tmp_path):
    import soundfile as sf

    assert eng.onnx_blocker(_backbone("tk:cifar_resnet20").trunk) is None
    why = eng.onnx_blocker(_backbone("spec:tk:cifar_resnet20").trunk)
    assert why.startswith("the trunk computes an STFT (melspec.spectrogram: torchaudio Spectrogram)")
    import torchaudio

    assert eng.onnx_blocker(torchaudio.transforms.Spectrogram()).startswith(
        "the trunk computes an STFT (the trunk itself: torchaudio Spectrogram)")
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "clips" / label).mkdir(parents=True)
        for i in range(4):
            sf.write(tmp_path / "clips" / label / f"{i}.wav", 0.1 * rng.standard_normal(1600), 8000)
    kw = dict(backbone="spec:tk:cifar_resnet20", weights=None, data=tmp_path / "clips", policy="feature_extraction",
              device="cpu", verbose=False)
    with pytest.raises(ConfigError, match="feature_engine='onnxruntime' cannot run here: the trunk computes an STFT"):
        tk.plan(**kw, feature_engine="onnxruntime")  # a dry run: no weights loaded, the structure says it
    facts = tk.look(FinetuneConfig(**kw))[0]
    assert facts.engines["available"]["onnxruntime"] == why  # under auto: skipped with its reason, never exported


def test_the_modules_onnx_blocker_names_still_fail_to_convert(tmp_path):
    # onnx_blocker names them from their structure alone: an exporter that learns them fails this test
    import torchaudio

    from transferkit.errors import ExportError
    from transferkit.export.onnx import convert_to_onnx

    with pytest.raises(ExportError, match="STFT"):
        convert_to_onnx(torchaudio.transforms.Spectrogram(n_fft=64).eval(), torch.randn(1, 800),
                        tmp_path / "s.onnx", output_name="out", dynamic_axes={})
    scripted = torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten()))
    with pytest.raises(ExportError, match="not part of the active trace"):  # inside the traced feature pass
        convert_to_onnx(torch.nn.Sequential(torch.nn.Identity(), scripted).eval(), torch.randn(1, 3, 8, 8),
                        tmp_path / "t.onnx", output_name="out", dynamic_axes={})
    assert eng.onnx_blocker(torch.nn.Sequential(torch.nn.Identity(), scripted)).startswith(
        "the trunk is TorchScript (1): the ONNX exporter traces the feature pass")
    from transferkit.backbones.custom import from_torchscript

    bb = from_torchscript(torch.jit.script(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())),
                          input_spec={"image_size": 16}, num_features=3)
    assert "the trunk is TorchScript" in eng.onnx_blocker(bb.trunk)


def test_without_another_engine_to_run_eager_is_not_timed_and_the_reason_says_so(folder, monkeypatch):
    """Every other engine unavailable (ONNX Runtime blocked by the trunk, compile by the input):
    eager was timed on extra batches and the plan said "none beats eager"."""
    monkeypatch.setattr(eng, "MIN_IMAGES_TO_TIME", 1)
    monkeypatch.setattr(eng, "engine_availability", lambda device_type: {
        "eager": None, "onnxruntime": "not in this test", "compile": "not in this test either"})
    monkeypatch.setattr(eng, "measure_engines", lambda *a, **k: pytest.fail("timed with nothing to compare"))
    _, d = _decide(backbone=_backbone(), data=folder)
    assert d.engine == "eager" and d.engine_reason.startswith("no other engine can run here (onnxruntime skipped")
    dry = tk.plan(backbone="tk:small_cnn", data=folder, **{k: v for k, v in KW.items() if k != "backbone"})
    assert dry.engine_reason == d.engine_reason  # a dry run knows it too: not "provisional ... may choose another"
    measured = {"eager": {"images_per_s": 30.0, "rel_diff": 0.0, "precision": "fp32"},
                "onnxruntime": {"skipped": "estimated 9 s to export"}}
    assert eng.decide_engine("auto", device_type="cpu", available={"eager": None, "onnxruntime": None},
                             measured=measured, n_images=1000)[1].startswith(
        "no other engine was worth preparing or could run; timed")


def test_exports_made_without_cache_dir_are_removed_when_the_process_exits(tmp_path):
    import os
    import subprocess
    import sys

    code = ("import torch, transferkit as tk; from transferkit.train import engines as eng; torch.manual_seed(0); "
            "bb = tk.get_backbone('tk:small_cnn', weights=None); m = tk.build_model(bb, 2).eval(); "
            "x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8); "
            "eng.engine_forward('onnxruntime', m, x, device=torch.device('cpu'), precision='fp32', "
            "channels_last=False); print(eng._SESSION_DIR[0])")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    folder = out.stdout.strip().splitlines()[-1]
    assert folder.startswith(str(tmp_path)) and not os.path.exists(folder)
    # a process killed without its exit handlers leaves its folder; the next process removes it
    killed = subprocess.run([sys.executable, "-c", code.replace("print(eng._SESSION_DIR[0])",
                                                                  "print(eng._SESSION_DIR[0], flush=True); os._exit(9)")
                             .replace("import torch,", "import os, torch,")],
                            capture_output=True, text=True, env=env)
    left = killed.stdout.strip().splitlines()[-1]
    assert killed.returncode == 9 and os.path.isdir(left) and any(Path(left).glob("*.onnx"))
    again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert not os.path.exists(left) and not os.path.exists(again.stdout.strip().splitlines()[-1])
    assert not list(tmp_path.glob("transferkit-*"))  # (torch and onnxruntime leave their own files there)


def test_a_stale_folder_this_user_cannot_remove_does_not_stop_the_engine(monkeypatch, tmp_path):
    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", "another user's folder")
    monkeypatch.setattr(eng, "remove_stale_temps", denied)
    monkeypatch.setattr(eng.tempfile, "gettempdir", lambda: str(tmp_path))
    m, x = _model(), _batch()
    fwd = eng.engine_forward("onnxruntime", m, x, device=CPU, precision="fp32", channels_last=False)
    with torch.no_grad():
        assert torch.allclose(fwd(x), m.features(x), atol=1e-4)


def test_a_dry_run_says_its_engine_is_provisional_and_an_unused_forced_engine_is_noted(folder, monkeypatch):
    monkeypatch.setattr(eng, "MIN_IMAGES_TO_TIME", 1)
    d = tk.plan(**{**KW, "backbone": _backbone(), "data": folder, "policy": "feature_extraction"})
    assert d.engine == "eager" and "provisional: a dry run loads no weights, so it neither times the engines nor " \
        "reads a stored timing" in d.summary()
    d = tk.plan(**{**KW, "backbone": _backbone(), "data": folder, "policy": "feature_extraction", "precision": "bf16"})
    assert "features bf16 (" in d.summary() and "provisional, as the engine: another engine may compute in fp32" \
        in d.summary()  # its features' precision is the engine's (onnxruntime computes fp32)
    d = tk.plan(**{**KW, "backbone": _backbone(), "data": folder, "policy": "full", "feature_engine": "onnxruntime"})
    assert "no cached feature pass; feature_engine='onnxruntime' is not used" in d.engine_reason
    assert any("feature_engine='onnxruntime' is not used" in n for n in d.notes)


def test_auto_does_not_compile_a_pass_over_clips_of_different_lengths():
    from transferkit.backbones import InputSpec

    def facts(spec):
        return eng.engine_facts("auto", trunk=None, spec=spec, dataset=None, device=CPU, precision="fp32",
                                channels_last=False, n_images=10, world_size=1, batch_size=4, cache_dir=None)
    if eng.engine_availability("cpu")["compile"] is not None:
        pytest.skip("torch.compile cannot run here")
    varying = facts(InputSpec(kind="audio", sample_rate=8000))["available"]["compile"]
    assert varying.startswith("clips of different lengths")
    assert facts(InputSpec(kind="audio", sample_rate=8000, clip_seconds=1.0))["available"]["compile"] is None
    assert facts(InputSpec(kind="image", image_size=32))["available"]["compile"] is None


def test_an_interrupted_import_is_an_interruption_not_a_missing_engine(monkeypatch):
    """Ctrl-C while onnxruntime's C extension loads surfaces as ImportError('initialization
    failed') caused by the interrupt: the run stops as interrupted; onnxruntime is not called
    missing (under auto the run would go on on eager, and a forced engine would be refused)."""
    real = builtins.__import__

    def interrupted(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("initialization failed") from KeyboardInterrupt()
        return real(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", interrupted)
    caught: BaseException | None = None
    try:
        eng.engine_availability("cpu")
    except BaseException as exc:  # noqa: BLE001 - a KeyboardInterrupt, caught to be looked at
        caught = exc
    assert isinstance(caught, KeyboardInterrupt), caught


class _Branchy(torch.nn.Module):
    """A trunk whose code branches on the pixel values: a traced export keeps one branch."""

    def __init__(self):
        super().__init__()
        self.conv, self.pool = torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        f = self.pool(torch.relu(self.conv(x))).flatten(1)
        return f * 2.0 if x.mean() > 0 else f - 1.0


def test_an_engine_that_follows_only_the_first_batch_is_rejected():
    """The ONNX export keeps the branch its trace took, and it was compared with eager on the
    first batch only (a folder lists its files class by class): dark first images, light
    later ones gave features off by 1.4 of their largest value, and auto could pick it. The
    engines are now also compared on items spread over the data."""
    torch.manual_seed(0)
    bb = from_module(_Branchy(), input_spec={"image_size": 16})
    m = tk.build_model(bb, 2, spec=bb.input_spec).eval()
    dark, light = torch.randint(0, 60, (16, 3, 16, 16)), torch.randint(200, 256, (16, 3, 16, 16))
    ds = torch.utils.data.TensorDataset(torch.cat([dark, light]).to(torch.uint8), torch.arange(32))
    where = dict(device=CPU, precision="fp32", channels_last=False)
    batches = eng.example_batches(ds, batch_size=8)
    assert [b.float().mean() > 127 for b in batches] == [False, True]  # the second batch reaches the light images
    measured = eng.time_engines(m, batches, candidates=["onnxruntime"], rounds=1, **where)
    assert measured["onnxruntime"]["rel_diff"] > 0.5
    engine, why = eng.decide_engine("auto", device_type="cpu", n_images=1000, measured=measured,
                                    available={"eager": None, "onnxruntime": None, "compile": "not here"})
    assert engine == "eager" and "onnxruntime rejected: features differ from eager fp32" in why
    eng.release_engines()
    forced = eng.lazy_engine_forward("onnxruntime", m, ds, batch_size=8, cache_dir=None, **where)
    with pytest.raises(tk.EngineError, match=r"differs from eager fp32 by .* on a real batch"):
        forced(batches[0])


class _BatchAsNumber(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bias = torch.nn.Conv2d(3, 8, 3), torch.nn.Parameter(torch.ones(1, 8))

    def forward(self, x):
        return self.conv(x).mean((2, 3)) + self.bias.expand(len(x), 8)


def test_an_onnx_pass_that_fixed_the_batch_size_says_so():
    """A trunk that turns the batch size into a number (len(x)) is traced with it fixed; checked
    on a batch of the two items it was traced on, it passed, and a batch of 1 then got 2 rows
    of features without an error."""
    torch.manual_seed(0)
    bb = from_module(_BatchAsNumber(), input_spec={"image_size": 16})
    m = tk.build_model(bb, 2, spec=bb.input_spec).eval()
    x = _batch(2, size=16)
    fwd = eng.engine_forward("onnxruntime", m, x, device=CPU, precision="fp32", channels_last=False)
    assert fwd(x).shape == (2, 8)
    with pytest.raises(tk.EngineError, match=r"returned 2 rows of features for 1 inputs: its trace fixed the batch "
                                             r"size .* Use feature_engine='eager' or 'compile'"):
        fwd(x[:1])
