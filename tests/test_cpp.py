"""The C++ consumer in examples/cpp: built against the torch wheel's libtorch, it must agree with Python."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.export_helpers import export_tiny
from PIL import Image

import transferkit
from transferkit.export import update_metadata

REPO = Path(__file__).resolve().parents[1]
# what a finetune() export's metadata holds before "input_spec" (keys are sorted): a run's
# settings and head, under names the program must not take for the input spec's
DECISIONS = {"config": {"image_size": None, "task": "multiclass"}, "head": {"kind": "linear"}, "kind": "image"}
SOURCE = REPO / "examples" / "cpp"
TORCH_DIR = Path(torch.__file__).parent


def _build_dir(request, tmp_path_factory) -> Path:
    """A build folder kept between runs (pytest's cache) and keyed by the sources and torch."""
    key = hashlib.sha256(b"".join((SOURCE / f).read_bytes() for f in ("main.cpp", "CMakeLists.txt"))
                         + torch.__version__.encode() + str(TORCH_DIR).encode()).hexdigest()[:16]
    cache = getattr(request.config, "cache", None)
    base = Path(cache.mkdir("transferkit-cpp")) if cache is not None else tmp_path_factory.mktemp("cpp")
    return base / key


@pytest.fixture(scope="module")
def program(request, tmp_path_factory) -> Path:
    if not (TORCH_DIR / "include" / "torch" / "script.h").exists():
        pytest.skip(f"the torch wheel at {TORCH_DIR} ships no C++ headers (include/torch/script.h)")
    cmake, gxx = shutil.which("cmake"), shutil.which("g++") or shutil.which("c++")
    if gxx is None:
        pytest.skip("no C++ compiler (g++/c++) on PATH: cannot build examples/cpp")
    build = _build_dir(request, tmp_path_factory)
    exe = build / "transferkit_predict"
    if exe.exists():
        return exe
    for stale in build.parent.glob("?" * 16):  # builds of older sources
        shutil.rmtree(stale, ignore_errors=True)
    work = build.parent / f"{build.name}.tmp{os.getpid()}"  # concurrent test runs must not share a build
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if cmake is not None:  # the documented way: examples/cpp/CMakeLists.txt
        steps = [[cmake, "-S", str(SOURCE), "-B", str(work), f"-DPython_EXECUTABLE={sys.executable}"],
                 [cmake, "--build", str(work)]]
    else:  # the same flags by hand
        lib = TORCH_DIR / "lib"
        steps = [[gxx, "-std=c++17", "-O2", str(SOURCE / "main.cpp"), "-o", str(work / exe.name),
                  f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
                  "-isystem", str(TORCH_DIR / "include"),
                  "-isystem", str(TORCH_DIR / "include" / "torch" / "csrc" / "api" / "include"),
                  f"-L{lib}", f"-Wl,-rpath,{lib}", "-ltorch", "-ltorch_cpu", "-lc10"]]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            shutil.rmtree(work, ignore_errors=True)
            pytest.fail(f"building examples/cpp failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    try:
        os.rename(work, build)
    except OSError:  # another run finished first: use its build
        shutil.rmtree(work, ignore_errors=True)
    return exe


def _run(exe: Path, model: Path, *inputs: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(exe), str(model), "--all", *map(str, inputs)], capture_output=True, text=True,
                          timeout=120, env=env)


def _parse(stdout: str) -> list[tuple[str, str, dict[str, float]]]:
    """``[(input, top-1 label, {label: score})]`` from the program's --all output."""
    out: list[tuple[str, str, dict[str, float]]] = []
    for line in stdout.rstrip("\n").splitlines():
        parts = line.split("\t")
        if parts[0]:
            out.append((parts[0], parts[1], {}))
        else:
            out[-1][2][parts[1]] = float(parts[2])
    return out


@pytest.mark.parametrize("task", ["multiclass", "multilabel", "regression"])
def test_cpp_program_agrees_with_python_on_images(program, tmp_path, task):
    path = tmp_path / "m.pt"
    export_tiny(path, task=task, labels=("ant", "bee", "cat"), size=16)
    update_metadata(path, {"decisions": DECISIONS})  # keys named like input_spec's, sorted before it
    predictor = transferkit.load(path)
    rng = np.random.default_rng(0)
    pics = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(4)]
    files = [tmp_path / f"{i}.ppm" for i in range(len(pics))]
    for pic, f in zip(pics, files):
        Image.fromarray(pic).save(f)
    proc = _run(program, path, *files)
    assert proc.returncode == 0, proc.stderr
    got = _parse(proc.stdout)
    want = predictor.predict(pics)
    assert [g[0] for g in got] == [str(f) for f in files]
    if task == "regression":  # no top label (the largest output's name meant nothing): every output's value
        assert [g[1] for g in got] == ["values"] * len(files)
        for (_, _, values), w in zip(got, want):
            assert values == pytest.approx(w.values, abs=1e-5)
        return
    probs = predictor.predict_proba(pics)
    assert [g[1] for g in got] == [w.label for w in want]
    for (_, _, scores), row in zip(got, probs):
        assert scores == pytest.approx(dict(zip(predictor.labels, row.tolist())), abs=1e-5)
    wrong = tmp_path / "big.ppm"
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(wrong)
    proc = _run(program, path, wrong)
    assert proc.returncode == 1 and "takes 16x16" in proc.stderr
    # a bad input is reported and the others are predicted (the first one ended the run, and a
    # header that is not a number said "error: stoi")
    bad = tmp_path / "builtins.ppm"  # a name the one-line message must not be cut at
    bad.write_bytes(b"P6\nabc 16\n255\n" + bytes(768))
    proc = _run(program, path, files[0], bad, wrong, files[1])
    assert proc.returncode == 1 and [g[1] for g in _parse(proc.stdout)] == [w.label for w in want[:2]]
    assert f"error: {bad}: not a binary PPM image (its width is 'abc', not a positive number)\n" in proc.stderr
    assert "takes 16x16" in proc.stderr and proc.stderr.endswith("2 of 4 inputs failed (above)\n")
    # a header of 99999 x 99999 over 768 bytes was std::bad_alloc (or the out-of-memory killer); a folder was "a
    # truncated PPM header"
    huge = tmp_path / "huge.ppm"
    huge.write_bytes(b"P6\n99999 99999\n255\n" + bytes(768))
    proc = _run(program, path, huge, tmp_path)
    assert proc.returncode == 1 and f"error: {huge}: truncated pixels (its header says 99999x99999, " \
        "29999400003 bytes; 768 follow)\n" in proc.stderr and f"error: {tmp_path} is a folder, not a PPM image\n" \
        in proc.stderr, proc.stderr


def test_cpp_program_runs_an_audio_export(program, tmp_path):
    audio = pytest.importorskip("transferkit.data.audio")
    bb = transferkit.get_backbone("spec:tk:small_cnn", weights=None)
    torch.manual_seed(0)
    model = transferkit.build_model(bb, 2).eval()
    wave = torch.sin(torch.arange(3200) * 0.07) * 0.3
    transferkit.export_torchscript(model, tmp_path / "a.pt", example_inputs=audio.pad_waveforms([wave, wave[:2000]]),
                                   metadata={"labels": ["x", "y"], "input_spec": bb.input_spec.to_dict()})
    update_metadata(tmp_path / "a.pt", {"decisions": DECISIONS})
    wave.numpy().astype("<f4").tofile(tmp_path / "w.f32")
    proc = _run(program, tmp_path / "a.pt", tmp_path / "w.f32")
    assert proc.returncode == 0, proc.stderr
    [(_, _, scores)] = _parse(proc.stdout)
    want = transferkit.load(tmp_path / "a.pt").predict_proba(wave)[0].tolist()
    assert scores == pytest.approx({"x": want[0], "y": want[1]}, abs=1e-5)
    holed = wave.clone()
    holed[100] = float("nan")
    holed.numpy().astype("<f4").tofile(tmp_path / "nan.f32")
    proc = _run(program, tmp_path / "a.pt", tmp_path / "nan.f32")  # the file's own error, on one line
    assert proc.returncode == 1 and f"error: {tmp_path / 'nan.f32'}: ValueError: An audio clip holds NaN before its " \
        "end; NaN marks only the padding after a clip. Replace NaN samples (e.g. torch.nan_to_num) before the " \
        "model.\n" in proc.stderr, proc.stderr
    # a clip shorter than an audio model takes (25 ms): refused by the file itself, as by the predictor (it scored
    # 10 samples, and a [T, 1] array as T clips of one sample, with confidence)
    wave[:10].numpy().astype("<f4").tofile(tmp_path / "tiny.f32")
    proc = _run(program, tmp_path / "a.pt", tmp_path / "tiny.f32")
    assert proc.returncode == 1 and "ValueError: a clip of 10 samples is shorter than the 400 the model takes (25 ms " \
        "at its sample rate)" in proc.stderr, proc.stderr
    with pytest.raises(torch.jit.Error, match=r"a clip of 1 samples is shorter than the 400 .* is x\.T"):
        torch.jit.load(str(tmp_path / "a.pt"))(wave[:, None])

    # a clip longer than the run's max_seconds: its middle, as the predictor (and training) keep it
    update_metadata(tmp_path / "a.pt", {"decisions": {**DECISIONS, "config": {**DECISIONS["config"],
                                                                              "max_seconds": 0.1}}})
    long = torch.cat([torch.zeros(1000), wave, torch.ones(600)])  # 0.3 s at 16 kHz; its middle 0.1 s is wave's
    long.numpy().astype("<f4").tofile(tmp_path / "long.f32")
    proc = _run(program, tmp_path / "a.pt", tmp_path / "long.f32")
    assert proc.returncode == 0 and "its middle 0.1 s is predicted" in proc.stderr, proc.stderr
    [(_, _, scores)] = _parse(proc.stdout)
    with pytest.warns(UserWarning, match="longer than"):
        want = transferkit.load(tmp_path / "a.pt").predict_proba(long)[0].tolist()
    middle = transferkit.load(tmp_path / "a.pt").predict_proba(long[1600:3200].clone())[0].tolist()  # 1600 samples
    assert scores == pytest.approx({"x": want[0], "y": want[1]}, abs=1e-5)
    assert want == pytest.approx(middle, abs=1e-6)

    # a backbone with clip_seconds: its window, though the run's max_seconds is longer (the
    # program took the longer of the two, and scored another part of the clip than Python)
    clipped = transferkit.get_backbone("spec:tk:small_cnn", weights=None, clip_seconds=0.1)
    model = transferkit.build_model(clipped, 2).eval()
    transferkit.export_torchscript(model, tmp_path / "c.pt", example_inputs=audio.pad_waveforms([wave, wave[:2000]]),
                                   metadata={"labels": ["x", "y"], "input_spec": clipped.input_spec.to_dict()})
    update_metadata(tmp_path / "c.pt", {"decisions": DECISIONS})  # max_seconds: 30 s
    proc = _run(program, tmp_path / "c.pt", tmp_path / "long.f32")
    assert proc.returncode == 0 and "its middle 0.1 s is predicted" in proc.stderr, proc.stderr
    [(_, _, scores)] = _parse(proc.stdout)
    with pytest.warns(UserWarning, match="longer than the model's window of 0.1 s"):
        want = transferkit.load(tmp_path / "c.pt").predict_proba(long)[0].tolist()
    middle = transferkit.load(tmp_path / "c.pt").predict_proba(long[1600:3200].clone())[0].tolist()
    assert scores == pytest.approx({"x": want[0], "y": want[1]}, abs=1e-5)
    assert want == pytest.approx(middle, abs=1e-6)


def test_cpp_program_rejects_a_file_without_metadata(program, tmp_path):
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "plain.pt"))
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "x.ppm")
    proc = _run(program, tmp_path / "plain.pt", tmp_path / "x.ppm")
    assert proc.returncode == 1 and "no transferkit metadata" in proc.stderr
    (tmp_path / "cut.pt").write_bytes((tmp_path / "plain.pt").read_bytes()[:100])
    proc = _run(program, tmp_path / "cut.pt", tmp_path / "x.ppm")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "zip archive" in proc.stderr
    torch.save({"transferkit": {}, "model": {"w": torch.zeros(2)}}, tmp_path / "run.ckpt")  # a checkpoint: a zip too
    proc = _run(program, tmp_path / "run.ckpt", tmp_path / "x.ppm")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "run.ckpt is a file of torch.save (a checkpoint or weights), not a TorchScript export; make one with " \
        "`transferkit export" in proc.stderr, proc.stderr
    for name in ("m.onnx", "m.bin"):  # by its name, and by how an ONNX file starts (ir_version, producer)
        (tmp_path / name).write_bytes(b"\x08\x08\x12\x07pytorch")
        proc = _run(program, tmp_path / name, tmp_path / "x.ppm")
        assert proc.returncode == 1 and "is an ONNX file; this program runs TorchScript exports" in proc.stderr
