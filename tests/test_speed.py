"""SpeedConfig: "auto" precision and layout resolved from the device and the trunk, with reasons."""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import transferkit
from transferkit.errors import ConfigError
from transferkit import hardware
from transferkit.train import speed as speed_mod
from transferkit.train.speed import SpeedConfig, conv_share, cpu_bf16_native, decide_speed, measure_layout

pytestmark = pytest.mark.precision_auto  # the outcome depends on what the CPU's bf16 support decides

CPU = torch.device("cpu")


class _VitLike(nn.Module):
    """A patch-embedding Conv2d and a stack of big Linear layers (the shape of a ViT)."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 8, stride=8)
        self.mlp = nn.Sequential(nn.Linear(16, 256), nn.GELU(), nn.Linear(256, 256), nn.Linear(256, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.patch(x).flatten(2).transpose(1, 2)).mean(1)


class _Hybrid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.lin = nn.Linear(32, 32)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.lin(self.conv(x).mean((2, 3)))


def _native(monkeypatch, value: bool) -> None:
    monkeypatch.setattr(hardware, "cpu_bf16_native", lambda: (value, "CPU has AVX512-BF16" if value else "no bf16"))


def test_make_without_arguments_is_the_fp32_path_of_earlier_versions():
    s = SpeedConfig.make(CPU)
    assert (s.precision, s.feature_precision_resolved, s.channels_last) == ("fp32", "fp32", False)
    assert s.autocast_dtype is None and s.feature_autocast_dtype is None
    plain = SpeedConfig(device=CPU)
    assert (plain.precision, plain.feature_precision_resolved, plain.channels_last, plain.compile) == \
        ("fp32", "fp32", False, False)


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_for_frozen_features_only_where_the_cpu_runs_bf16_natively(monkeypatch, native):
    _native(monkeypatch, native)
    frozen = SpeedConfig.make(CPU, frozen=True)
    assert frozen.feature_precision_resolved == ("bf16" if native else "fp32")
    assert frozen.precision == "fp32"  # the head trains in fp32 on the cached features
    assert ("AVX512-BF16" if native else "no bf16") in frozen.reasons["feature_precision"]
    trains = SpeedConfig.make(CPU, frozen=False, trunk=nn.Conv2d(3, 4, 3))  # bf16 autocast where native (measured)
    assert trains.precision == ("bf16" if native else "fp32")
    assert trains.feature_precision is None and "feature_precision" not in trains.reasons  # no feature pass
    audio = SpeedConfig.make(CPU, frozen=False, kind="audio", trunk=nn.Conv2d(3, 4, 3))
    assert audio.precision == "fp32"  # not measured for audio


def test_audio_keeps_fp32_and_the_contiguous_layout(monkeypatch):
    _native(monkeypatch, True)
    s = SpeedConfig.make(CPU, frozen=True, kind="audio", trunk=nn.Conv2d(3, 4, 3))
    assert (s.feature_precision_resolved, s.channels_last) == ("fp32", False)
    assert "audio" in s.reasons["feature_precision"] and "audio" in s.reasons["channels_last"]


def test_fp32_asked_is_the_exact_fp32_path(monkeypatch):
    _native(monkeypatch, True)
    torch.manual_seed(0)
    bb = transferkit.get_backbone("tk:small_cnn", weights=None)
    model = transferkit.build_model(bb, 3).eval()
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        ref = model.features(x)
        s = SpeedConfig.make(CPU, precision="fp32", channels_last=False, trunk=bb.trunk, frozen=True)
        with s.feature_autocast(), s.autocast():
            out = model.features(s.to_device(x))
        assert torch.equal(out, ref)
        bf = SpeedConfig.make(CPU, trunk=bb.trunk, frozen=True)
        with bf.feature_autocast():
            low = model.features(bf.to_device(x))
    assert (bf.feature_precision_resolved, s.feature_precision_resolved) == ("bf16", "fp32")
    assert low.dtype == torch.bfloat16  # the autocast really ran in bf16
    assert (low.float() - ref).abs().max() <= 0.05 * ref.abs().max()


def test_explicit_precisions_apply_to_both_passes_and_are_checked(monkeypatch):
    _native(monkeypatch, False)
    s = SpeedConfig.make(CPU, precision="bf16")
    assert (s.precision, s.feature_precision_resolved) == ("bf16", "bf16")
    assert "slower than fp32" in s.reasons["precision"]
    with pytest.raises(ConfigError, match="fp16.*CUDA"):
        SpeedConfig.make(CPU, precision="fp16")
    with pytest.raises(ConfigError, match="precision"):
        SpeedConfig.make(CPU, precision="float32")
    with pytest.raises(ConfigError, match="channels_last"):
        SpeedConfig.make(CPU, channels_last="yes")


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 instruction checks")
def test_cpu_bf16_native_needs_amx_or_avx512_bf16_not_just_onednn(monkeypatch):
    monkeypatch.delenv(hardware.ASSUME_BF16_ENV, raising=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    for amx, avx, expect in ((True, False, True), (False, True, True), (False, False, False)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx: v, raising=False)
        native, why = cpu_bf16_native()
        assert native is expect, why
    assert "emulate" in why
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False, raising=False)
    assert cpu_bf16_native()[0] is False


def test_native_bf16_can_be_assumed_present_or_absent(monkeypatch):
    """TRANSFERKIT_ASSUME_BF16 overrides the CPU check: CI runs the capability-dependent tests
    both ways on one machine."""
    monkeypatch.setenv("TRANSFERKIT_ASSUME_BF16", "0")
    assert cpu_bf16_native() == (False, "TRANSFERKIT_ASSUME_BF16=0")
    assert SpeedConfig.make(CPU, frozen=True).feature_precision_resolved == "fp32"
    monkeypatch.setenv("TRANSFERKIT_ASSUME_BF16", "1")
    assert cpu_bf16_native() == (True, "TRANSFERKIT_ASSUME_BF16=1")
    s = SpeedConfig.make(CPU, frozen=True)
    assert s.feature_precision_resolved == "bf16" and "TRANSFERKIT_ASSUME_BF16=1" in s.reasons["feature_precision"]
    monkeypatch.setenv("TRANSFERKIT_ASSUME_BF16", "yes")
    with pytest.raises(ConfigError, match="TRANSFERKIT_ASSUME_BF16 must be 0 or 1, got 'yes'"):
        cpu_bf16_native()


def test_layout_by_the_trunks_modules():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    s = SpeedConfig.make(CPU, precision="fp32", trunk=conv)
    assert s.channels_last and "convolutional" in s.reasons["channels_last"]
    vit = SpeedConfig.make(CPU, precision="fp32", trunk=_VitLike())
    assert not vit.channels_last and "ViT-style" in vit.reasons["channels_last"]
    mlp = SpeedConfig.make(CPU, precision="fp32", trunk=nn.Sequential(nn.Linear(4, 4)))
    assert not mlp.channels_last and "no Conv2d" in mlp.reasons["channels_last"]
    assert conv_share(_VitLike())[0] < 0.1
    assert SpeedConfig.make(CPU, precision="fp32", trunk=conv, channels_last=False).channels_last is False


def test_hybrid_trunks_are_timed_once_and_the_verdict_is_kept(monkeypatch, tmp_path):
    monkeypatch.setattr(speed_mod, "_LAYOUT_CACHE", {})
    trunk = _Hybrid().train()
    assert 0.1 <= conv_share(trunk)[0] < 0.9
    store = tmp_path / "layouts.json"
    s = SpeedConfig.make(CPU, precision="fp32", trunk=trunk, image_size=16, layout_cache=store)
    assert "timed on cpu" in s.reasons["channels_last"]
    assert trunk.calls == 12 and trunk.training  # 1 warm-up + 5 rounds, both layouts; the mode is restored
    assert trunk.conv.weight.is_contiguous()  # the layout is restored too
    SpeedConfig.make(CPU, precision="fp32", trunk=trunk, image_size=16)
    assert trunk.calls == 12  # cached in the process
    monkeypatch.setattr(speed_mod, "_LAYOUT_CACHE", {})  # a new process: read back from the file
    again = SpeedConfig.make(CPU, precision="fp32", trunk=trunk, image_size=16, layout_cache=store)
    assert trunk.calls == 12 and again.channels_last == s.channels_last
    assert str(store) in again.reasons["channels_last"]
    other = _Hybrid()  # the same class, another architecture: timed on its own (it had this one's verdict and
    other.lin = nn.Linear(32, 64)  # its reason, which named this one's share of Conv2d weights)
    share = f"{conv_share(other)[0]:.0%} of the Conv2d + Linear weights Conv2d"
    assert share not in s.reasons["channels_last"]
    theirs = SpeedConfig.make(CPU, precision="fp32", trunk=other, image_size=16, layout_cache=store)
    assert other.calls == 12 and share in theirs.reasons["channels_last"]


def test_measured_verdict_follows_the_timings(monkeypatch):
    monkeypatch.setattr(speed_mod, "_LAYOUT_CACHE", {})
    clock = iter(range(1000))
    # contiguous rounds take 2 ticks (the trunk advances the clock once more), channels_last rounds 1
    trunk = _Hybrid()
    fwd = trunk.forward

    def slow_when_contiguous(x):
        if x.is_contiguous():
            next(clock)
        return fwd(x)

    trunk.forward = slow_when_contiguous
    monkeypatch.setattr(speed_mod.time, "perf_counter", lambda: next(clock))
    on, why = measure_layout(trunk, CPU, image_size=8)
    assert on and "2.00x" in why


def test_a_trunk_not_yet_on_the_device_is_timed_as_a_copy_there(monkeypatch):
    # the layout is timed while the facts are gathered, before the run moves the trunk to its
    # device: timing it in place fed device inputs to host weights (every hybrid trunk on CUDA)
    monkeypatch.setattr(speed_mod, "_LAYOUT_CACHE", {})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "stand-in device")
    trunk = _Hybrid()
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    on, why = measure_layout(trunk, torch.device("meta"), image_size=8)  # meta: a device that is not the CPU
    assert isinstance(on, bool) and "timed on meta" in why
    assert all(p.device.type == "cpu" for p in trunk.parameters())
    assert all(torch.equal(before[k], v) for k, v in trunk.state_dict().items())


def test_every_choice_has_its_reason():
    d = decide_speed(device_type="cpu", bf16=(True, "CPU has AVX512-BF16"), conv=(1.0, 1), cached=True,
                     features=True)
    assert d["reasons"]["feature_precision"] == "autocast: CPU has AVX512-BF16; frozen feature extraction"
    assert d["reasons"]["channels_last"].startswith("convolutional trunk")
    assert set(d["reasons"]) == {"precision", "feature_precision", "channels_last", "compile"}
    uncached = decide_speed(device_type="cpu", bf16=(True, "CPU has AVX512-BF16"), conv=(1.0, 1), cached=False,
                            features=False)  # a frozen trunk run every epoch: no cached-features story
    assert "cached" not in uncached["reasons"]["precision"] and uncached["feature_precision"] is None


def test_feature_batch_size_is_small_on_a_cpu_and_large_on_a_gpu():
    assert SpeedConfig(device=CPU).feature_batch_size(4) == SpeedConfig(device=CPU).feature_batch_size(256) == 16
    assert SpeedConfig(device=torch.device("cuda")).feature_batch_size(32) == 128
    assert SpeedConfig(device=torch.device("cuda")).feature_batch_size(512) == 512


def test_for_features_carries_the_feature_precision_into_autocast(monkeypatch):
    _native(monkeypatch, True)
    s = SpeedConfig.make(CPU, frozen=True, trunk=nn.Conv2d(3, 4, 3))
    f = s.for_features()
    assert (s.autocast_dtype, f.autocast_dtype) == (None, torch.bfloat16)
    assert f.channels_last == s.channels_last and f.device == s.device
    assert "AVX512-BF16" in f.reasons["precision"]


def test_cuda_auto_uses_bf16_tensor_cores_only_from_compute_capability_8(monkeypatch):
    gpu = torch.device("cuda")
    for cap, expect in (((8, 0), "bf16"), ((7, 5), "fp32")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=cap: c)
        trains = SpeedConfig.make(gpu)
        frozen = SpeedConfig.make(gpu, frozen=True)
        assert (trains.precision, frozen.feature_precision_resolved, frozen.precision) == (expect, expect, "fp32")
        assert f"{cap[0]}.{cap[1]}" in trains.reasons["precision"]


def _conv_constants(module) -> list[torch.Tensor]:
    graphs = [module.graph] + ([module.features.graph] if hasattr(module, "features") else [])
    out = []
    for g in graphs:
        for node in g.nodes():
            if node.kind() == "prim::Constant" and node.output().type().kind() == "TensorType":
                t = node.output().toIValue()
                if t.ndim == 4 and t.shape[-1] > 1:
                    out.append(t)
    return out


def test_optimized_export_freezes_conv_weights_in_channels_last_and_keeps_parity(tmp_path):
    from export_helpers import export_tiny

    from transferkit.export import export_torchscript, load_scripted

    # channels_last convolutions sum in another order, and how far that moves the outputs depends on
    # the CPU's kernels: a tolerance of 1e-4 (not the default 1e-5) holds on AVX2 and AVX-512 alike
    report, model = export_tiny(tmp_path / "o.pt", optimize=True, atol=1e-4)
    assert report.optimization == "freeze_channels_last", report.notes
    assert report.max_abs_diff <= report.tolerance
    module, meta = load_scripted(tmp_path / "o.pt")
    consts = _conv_constants(module)
    assert consts and all(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
                          for t in consts)  # the reloaded file keeps the layout
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(module(x), model(x), atol=1e-4, rtol=0)
    vit = transferkit.model.TransferModel(nn.Identity(), _VitLike(), nn.Linear(16, 2)).eval()
    r = export_torchscript(vit, tmp_path / "v.pt", metadata={"labels": ["a", "b"], "input_spec": {}},
                           example_inputs=torch.rand(2, 3, 16, 16), optimize=True)
    assert r.optimization in ("optimize_for_inference", "freeze")  # ViT-style: no channels_last candidate


@pytest.mark.parametrize("value", ["0", "1"])
def test_the_bf16_capability_can_be_assumed_for_tests_of_another_cpu(monkeypatch, value):
    monkeypatch.setenv(hardware.ASSUME_BF16_ENV, value)
    native, why = cpu_bf16_native()
    assert native is (value == "1") and hardware.ASSUME_BF16_ENV in why
    s = SpeedConfig.make(CPU, frozen=True, trunk=nn.Conv2d(3, 4, 3))
    assert s.feature_precision_resolved == ("bf16" if value == "1" else "fp32")


def test_a_layout_timing_that_cannot_be_stored_warns_and_the_run_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(speed_mod, "_LAYOUT_CACHE", {})
    store = tmp_path / "layout.json"
    store.mkdir()  # a folder where the store goes (or a read-only cache_dir)
    with pytest.warns(UserWarning, match=r"The layout timing was not stored \(OutputError: .*later runs .* time again"):
        on, why = measure_layout(_Hybrid(), CPU, image_size=8, store=store)
    assert isinstance(on, bool) and "channels_last runs at" in why


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch logs the note only where no CUDA device is found")
@pytest.mark.parametrize("compiles", [True, False])
def test_a_compile_on_a_machine_without_cuda_logs_no_cuda_runtime_note(compiles, tmp_path):
    """Inductor's first C++ build imports torch's extension builder, which logs "No CUDA runtime is
    found" on stderr where a CUDA toolkit is installed (here: CUDA_HOME) and no device is: a CPU
    compile needs none. Without a compile (the control) torch still logs it."""
    first = "from transferkit.train.speed import torch_compile; torch_compile(torch.nn.Linear(2, 2))" if compiles \
        else "import transferkit.train.speed"
    proc = subprocess.run([sys.executable, "-c", f"import torch; {first}; import torch.utils.cpp_extension"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "CUDA_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert ("No CUDA runtime is found" in proc.stderr) is not compiles, proc.stderr


@pytest.mark.parametrize("where", ["compile=True", "compile trial", "feature engine"])
def test_every_compile_transferkit_makes_drops_the_no_cuda_runtime_note(where, monkeypatch):
    """Each place that compiles (a run's compile=True, the compile trial's default, the
    feature pass's compile engine) goes through `torch_compile`, which keeps torch's
    "No CUDA runtime" line off stderr (the subprocess test above checks the line itself)."""
    from transferkit.train import compile_trial, engines

    logger = logging.getLogger("torch.utils.cpp_extension")
    monkeypatch.setattr(logger, "filters", [])
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled.append(module) or module)
    module = nn.Linear(2, 2)
    if where == "compile=True":
        SpeedConfig(torch.device("cpu"), compile=True).maybe_compile(module)
    elif where == "compile trial":
        compile_trial.CompileTrial(steps_left=10, estimate_s=0.0).compile(module)
    else:
        model = nn.Module()
        model.preprocess, model.trunk = nn.Identity(), module
        engines._compiled_forward(model, torch.zeros(1, 2), device=torch.device("cpu"), precision="fp32",
                                  channels_last=False)
    assert len(compiled) == 1  # compiled once, by torch
    assert any(isinstance(f, speed_mod._NoCudaRuntimeNote) for f in logger.filters)


def test_torch_compile_is_called_in_one_place():
    """A new call site must go through `torch_compile` too: the test above names the ones there are."""
    package = Path(transferkit.__file__).parent
    calling = sorted(str(p.relative_to(package)) for p in package.rglob("*.py") if "torch.compile(" in p.read_text())
    assert calling == ["train/speed.py"]
