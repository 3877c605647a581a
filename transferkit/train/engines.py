"""The engine of the frozen feature pass: eager PyTorch, ONNX Runtime or torch.compile.

A frozen backbone's features are computed once per run (the feature cache), so the pass is
the floor of a frozen run's time. The same pass runs on three engines:

- ``eager``: ``model.features`` in PyTorch, at the run's feature precision and layout.
- ``onnxruntime``: the preprocessing + trunk exported to ONNX once per trunk fingerprint,
  input shape and versions (kept under ``cache_dir/engines/``, else in a folder of the
  process), run by ONNX Runtime in fp32; before use it is checked against eager fp32 on
  two real batches (`example_batches`).
- ``compile``: ``torch.compile`` (inductor) of the same pass, at the run's precision; the
  last, shorter batch is padded to the compiled batch size (the pass is per-sample in eval
  mode), so one compilation serves the whole pass.

The module has three parts, kept apart so that a plan can hold the decision as plain data:

1. Facts (I/O): `engine_availability` (which optional engines can run here, or why not)
   and `time_engines` (each candidate timed on a few batches of the run's own input,
   and its features compared with eager fp32). `measure_engines` wraps the timing with a
   JSON store under ``cache_dir`` so that later runs read the verdict instead of re-timing
   it under another load (their feature-cache keys stay the same).
2. The decision (pure): `decide_engine` picks the engine from what was asked, what is
   available and what was measured, with its reason; `compile_pays` estimates whether a
   compilation can pay for itself on the amount of data (a trainable trunk's compilation is
   tried on the run's own steps instead: `transferkit.train.compile_trial`).
3. Runtime: `engine_forward` turns the chosen engine into the callable the feature pass
   uses (``forward(x) -> features``).

Example:
    >>> decide_engine("auto", device_type="cpu", available={"eager": None, "onnxruntime": "not installed",
    ...               "compile": None}, measured=None, n_images=40)
    ('eager', 'too little data to time the engines (40 images; timing starts at 256)')
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import hashlib
import math
import os
import re
import shutil
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from transferkit._io import (
    atomic_write,
    create_temp,
    file_digest,
    probe_writable,
    read_json_object,
    read_only_folder,
    remove_stale_temps,
    remove_stale_temps_in,
    store_timing,
)
from transferkit._text import exception_line
from transferkit.data.fingerprint import module_fingerprint
from transferkit.errors import ConfigError, EngineError, ExportError
from transferkit.hardware import out_of_memory
from transferkit.export.onnx import convert_to_onnx, onnx_modules, session_options
from transferkit.export.torchscript import shorter_clips
from transferkit.model import AudioPreprocess, TransferModel, preprocess_for
from transferkit.policies.frozen_bn import eval_fingerprint
from transferkit.train.loaders import make_loader
from transferkit.train.speed import torch_compile

ENGINES = ("auto", "eager", "onnxruntime", "compile")
# features agree with eager fp32 when max|engine - eager fp32| <= TOLERANCE[precision] * max|eager fp32|
# (fp32 engines: ONNX Runtime measured 6e-6 absolute on Lite0; bf16/fp16 autocast: see docs/benchmarks.md)
TOLERANCE = {"fp32": 1e-3, "bf16": 0.1, "fp16": 0.05}
EAGER_MARGIN = 2.0  # an engine in bf16/fp16 may also differ up to this many times eager's own difference at that
#                    precision on the same batch (eager bf16 Lite0: 5 % at 224 px, 12 % at 96 px)
MIN_SPEEDUP = 1.05  # another engine must beat eager by this factor (timing noise on a shared machine)
MIN_IMAGES_TO_TIME = 256  # below this the timing (about 4 eager batch passes + an export) costs more than it saves
TIMED_ROUNDS = 2  # rounds of the timing; each candidate's fastest round counts
CLEAR_LEAD = 1.5  # the timing stops once one engine leads all others by this factor (round-to-round noise
#                   on a shared 2-core machine was up to 1.3x)
FIRST_CALL_LEAD = 2.0  # on a CPU, where eager runs fp32 its reference batch (a first call) stands for its
#                   timing when a prepared engine leads it by this factor; a first call of Lite0 took
#                   1.15x-1.45x as long as the next ones, so a lead of 2x over it is a lead of 1.4x or more
# Compile time of the frozen pass (inductor), estimated as a base plus a share per leaf module
# of the trunk, and the speed-up of the compiled pass over eager, used to decide whether
# compiling can pay (docs/benchmarks.md, "The engine of the frozen pass"): Lite0 (198 leaf
# modules) compiled in 38 s and ran 1.9x eager channels_last on a quiet 2-core AVX2 CPU; a
# one-layer module took 41-71 s on a loaded one. On an H200 (benchmarks/gpu_throughput.py),
# ResNet-50's pass (126 leaf modules, bf16, channels_last, batch 256) compiled in 14 s and ran
# 1.30x eager bf16: the CUDA estimate (30 s for ResNet-50) keeps the CPU's, twice that.
COMPILE_SECONDS_PER_MODULE = {"cpu": 0.12, "cuda": 0.12}
COMPILE_SECONDS_BASE = {"cpu": 15.0, "cuda": 15.0}
# The compilation of a trainable model's step (forward and backward), likewise: the first
# compiled step took 76 s for Lite0 (198 leaf modules) and 51 s for ResNet-18 (52) on the quiet
# 2-core CPU (benchmarks/compile_training.py), 60 s and 20 s on an H200 (ResNet-50: 49 s).
TRAIN_COMPILE_SECONDS_PER_MODULE = {"cpu": 0.18, "cuda": 0.18}
TRAIN_COMPILE_SECONDS_BASE = {"cpu": 40.0, "cuda": 40.0}
COMPILE_SPEEDUP: dict[str, float | None] = {"cpu": 1.9, "cuda": 1.3}
# The ONNX Runtime candidate, likewise: exporting the trunk (a trace on two items and the
# conversion), opening a session and timing three batches cost about 2.8 s for Lite0 (200
# leaf modules) on the quiet 2-core build machine (benchmarks/frozen_backbone.py: the defaults
# against feature_engine="eager"); its pass was at best 3.15x eager fp32 (Lite0, AVX2 CPU)
# and 1.02x eager bf16 (Lite0, AVX512-BF16). Timing it can pay only when the eager pass is
# long enough that the best of those speed-ups would save more than the setup costs. On CUDA
# it is not measured (the GPU machine's onnxruntime had no CUDA provider): auto does not try
# it there, feature_engine="onnxruntime" does.
ONNX_SECONDS_BASE = {"cpu": 0.4, "cuda": 0.4}
ONNX_SECONDS_PER_MODULE = {"cpu": 0.012, "cuda": 0.012}
ONNX_SPEEDUP: dict[str, float | None] = {"cpu": 3.15, "cuda": None}
PREPARED = ("onnxruntime", "compile")  # engines with a preparation cost weighed before they are timed
# the format of cache_dir/engines.json, read only when equal: raised when how the engines are
# prepared changes what a timing would find (2: attention layers convert to ONNX, so a stored
# "onnxruntime failed" of a ViT is timed again; 3: the engines are also compared on items spread
# over the data, so a verdict compared on the first batch only is timed again)
STORE_FORMAT = 3
# prepared engines of this process, reused by the feature pass: (forward, the module it computes
# with: a compiled pass runs the live module it was compiled on; None for an ONNX session)
_RUNTIMES: dict[tuple, tuple[Callable, nn.Module | None]] = {}
_VERIFIED: dict[tuple, float] = {}  # (runtime key, example digest) -> relative difference from eager fp32
_TIMED: dict[tuple, list[tuple[str, torch.Tensor]]] = {}  # runtime key -> (input digest, features) of its timing
_SESSION_DIR: list[str] = []  # the process's export folder when the run has no cache_dir
_SESSION_PREFIX = "transferkit-engines-"


# --------------------------------------------------------------------------- facts
def engine_availability(device_type: str) -> dict[str, str | None]:
    """``{engine: None}`` for the engines that can run on ``device_type`` here, ``{engine:
    why not}`` for the others (a missing optional package, no C++ compiler for inductor).

    Example:
        >>> engine_availability("cpu")["eager"] is None
        True
    """
    out: dict[str, str | None] = {"eager": None}
    found = onnx_modules()
    if isinstance(found, str):
        out["onnxruntime"] = f"onnxruntime/onnx {found}; pip install 'transferkit[onnx]'"
    else:
        ort = found[1]
        provider = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}.get(device_type)
        if provider is None or provider not in ort.get_available_providers():
            gpu = "; on CUDA: pip install onnxruntime-gpu in place of onnxruntime" if device_type == "cuda" else ""
            out["onnxruntime"] = f"onnxruntime {ort.__version__} has no execution provider for {device_type} " \
                                 f"(it has {', '.join(ort.get_available_providers())}{gpu})"
        else:
            out["onnxruntime"] = None
    out["compile"] = compile_unavailable(device_type)
    return out


def compile_unavailable(device_type: str) -> str | None:
    """Why ``torch.compile`` cannot run on ``device_type`` here, or None when it can."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    if device_type == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++", "cl")):
        return "torch.compile (inductor) needs a C++ compiler on the CPU and none was found"
    if device_type not in ("cpu", "cuda"):
        return f"torch.compile is not used on {device_type} devices"
    return None


def leaf_modules(module: nn.Module) -> int:
    """The number of leaf modules (the size estimate of a compilation)."""
    return sum(1 for m in module.modules() if not any(True for _ in m.children()))


def compile_estimate(device_type: str, n_modules: int, *, load: float | None = None, engine: str = "compile") -> float:
    """Estimated seconds to prepare ``engine`` (``"compile"``: compile the frozen pass;
    ``"onnxruntime"``: export it, open a session and time it; ``"train"``: compile a
    trainable model's step) for a trunk with ``n_modules`` leaf modules: on a quiet machine,
    times the machine's load per CPU when that is above 1 (``load``: default the 1-minute
    load average over the CPU count; the preparation shares the CPUs, as the eager pass it is
    weighed against does)."""
    base, per = {"onnxruntime": (ONNX_SECONDS_BASE, ONNX_SECONDS_PER_MODULE),
                 "train": (TRAIN_COMPILE_SECONDS_BASE, TRAIN_COMPILE_SECONDS_PER_MODULE)}.get(
        engine, (COMPILE_SECONDS_BASE, COMPILE_SECONDS_PER_MODULE))
    quiet = base.get(device_type, base["cpu"]) + per.get(device_type, per["cpu"]) * n_modules
    if load is None:  # the load average counts runnable tasks on all the machine's CPUs, not only this process's
        load = os.getloadavg()[0] / (os.cpu_count() or 1) if hasattr(os, "getloadavg") else 1.0
    return quiet * max(1.0, load)


def compile_pays(device_type: str, *, n_images: int, eager_images_per_s: float, n_modules: int,
                 load: float | None = None, engine: str = "compile",
                 fp32_images_per_s: float | None = None, unit: str = "images",
                 best: tuple[str, float] | None = None) -> tuple[bool, str]:
    """Whether preparing ``engine`` for the frozen pass can pay on ``n_images`` images: the
    time it would save at its expected (``COMPILE_SPEEDUP``) or best measured
    (``ONNX_SPEEDUP``, over eager fp32) speed-up against the estimated preparation
    (`compile_estimate`). ONNX Runtime computes in fp32: against an eager pass in bf16 or
    fp16 its speed-up is scaled by ``fp32_images_per_s / eager_images_per_s`` (the eager
    fp32 speed, from the reference batch). ``best``: ``(engine, images/s)`` of an engine
    already prepared and timed that is faster than eager; the saving is then counted from
    its speed (an engine expected to be no faster than it cannot pay). ``unit``: what the
    pass reads (``"images"`` or ``"clips"``), as the reason names it.

    Example:
        >>> compile_pays("cpu", n_images=400, eager_images_per_s=35.0, n_modules=150, load=1.0)[0]
        False
        >>> compile_pays("cpu", n_images=398, eager_images_per_s=48.7, n_modules=200, load=1.0,
        ...              engine="onnxruntime")[1]  # eager fp32
        'estimated 2.8 s to export and time 200 modules < the 5.6 s it would save on 398 images at 3.15x'
        >>> compile_pays("cpu", n_images=398, eager_images_per_s=96.5, n_modules=200, load=1.0,
        ...              engine="onnxruntime", fp32_images_per_s=48.7)[1]  # eager bf16, twice as fast
        'estimated 2.8 s to export and time 200 modules > the 1.5 s it would save on 398 images at 1.59x'
        >>> compile_pays("cpu", n_images=100_000, eager_images_per_s=35.0, n_modules=198, load=1.0,
        ...              best=("onnxruntime", 86.0))[1]  # compile's 1.9x eager is slower than ONNX Runtime
        'estimated 39 s to compile 198 modules > the 0.0 s it would save on 100000 images at 1.9x (over onnxruntime at 86.0 images/s)'
    """
    onnx = engine == "onnxruntime"
    speedup = (ONNX_SPEEDUP if onnx else COMPILE_SPEEDUP).get(device_type)
    if speedup is None:
        return False, f"no measured speed-up of the {engine} pass on {device_type} (force it with " \
                      f"feature_engine={engine!r})"
    if onnx and fp32_images_per_s is not None:
        speedup = max(1.0, speedup * fp32_images_per_s / max(eager_images_per_s, 1e-9))
    cost = compile_estimate(device_type, n_modules, load=load, engine=engine)
    eager = max(eager_images_per_s, 1e-9)
    base = max(eager, best[1]) if best is not None else eager  # the speed the pass has without it
    saved = max(n_images / base - n_images / (eager * speedup), 0.0)
    pays = saved > cost
    over = f" (over {best[0]} at {best[1]:.1f} {unit}/s)" if best is not None and best[1] > eager else ""
    return pays, (f"estimated {_seconds(cost)} s to {'export and time' if onnx else 'compile'} {n_modules} modules "
                  f"{'<' if pays else '>'} the {_seconds(saved)} s it would save on {n_images} {unit} at "
                  f"{speedup:.3g}x{over}")


def input_unit(model: nn.Module) -> str:
    """``"clips"`` for a model that reads waveforms, else ``"images"``: how timings name the input."""
    return "clips" if isinstance(getattr(model, "preprocess", None), AudioPreprocess) else "images"


def _seconds(x: float) -> str:
    return f"{x:.1f}" if x < 10 else f"{x:.0f}"


def time_engines(model: nn.Module, batches: Sequence[torch.Tensor], *, device: torch.device, precision: str,
                 channels_last: bool, candidates: Sequence[str], cache_dir: str | Path | None = None,
                 n_images: int | None = None, rounds: int = TIMED_ROUNDS,
                 fingerprint: str | None = None, settle: bool = True) -> dict[str, dict[str, Any]]:
    """Time the feature pass of ``model`` on ``batches`` (the run's own input) with each of
    ``candidates`` (``eager`` always first) and compare each engine's features on
    ``batches[0]`` and on the timed batches with eager fp32 (`_compare_timed`).

    Returns ``{engine: {"images_per_s", "max_abs_diff", "rel_diff", "precision",
    "setup_s"}}``, or ``{engine: {"skipped": why}}`` (``onnxruntime`` or ``compile`` when
    `compile_pays` says its preparation cannot pay on ``n_images``) or ``{engine: {"error":
    what failed}}``. The engines are timed
    round-robin (``rounds`` rounds, the fastest round of each counts: the least disturbed by
    other load). ``batches[0]`` warms each engine up and is compared; the others are timed
    (and compared).
    On a CPU where eager runs fp32, eager's first call (the reference) stands for its timing
    (``"first_call": True``) when a prepared engine's first round leads it by ``FIRST_CALL_LEAD``.
    A prepared engine that agrees is timed as soon as it is prepared when another prepared
    candidate follows, which `compile_pays` then weighs against it (``best``).
    ``fingerprint``: the pass's (`pass_fingerprint`) when the caller has hashed it already.
    ``settle=False`` (the benchmarks): eager and every prepared engine are timed all
    ``rounds`` rounds, also where eager's first call or a clear lead would settle the
    choice sooner.
    """
    with _eval(model):
        return _time_engines(model, batches, device=device, precision=precision, channels_last=channels_last,
                             candidates=candidates, cache_dir=cache_dir, n_images=n_images, rounds=rounds,
                             fingerprint=fingerprint, settle=settle)


def _time_engines(model: nn.Module, batches: Sequence[torch.Tensor], *, device: torch.device, precision: str,
                  channels_last: bool, candidates: Sequence[str], cache_dir: str | Path | None, n_images: int | None,
                  rounds: int, fingerprint: str | None, settle: bool) -> dict[str, dict[str, Any]]:
    # batches[0]: the first call of each engine (warm-up, compilation) and the comparison with
    # eager fp32; the others (or batches[0] when alone) are timed
    fp32_ips = None  # eager fp32's speed on the reference batch, for ONNX Runtime's expected speed-up (a first
    # call: a low estimate, which makes ONNX Runtime look less worth preparing where eager runs bf16; a second
    # call would cost an fp32 batch in every such run)
    if precision != "fp32":
        t0 = time.perf_counter()
        ref = _eager_fp32(model, batches[0], device, channels_last)
        fp32_ips = len(batches[0]) / max(time.perf_counter() - t0, 1e-9)
    else:
        ref = None
    out: dict[str, dict[str, Any]] = {}
    runners: dict[str, Callable] = {}
    outputs: dict[str, list[torch.Tensor]] = {}  # each prepared engine's features on the batches, in order
    failed: dict[str, dict[str, Any]] = {}  # engines that failed on a timed batch after their first: skipped
    first_ips, first_call = 0.0, False
    timed_on = batches[1:] or batches[:1]
    order = ["eager", *[c for c in candidates if c != "eager"]]
    for i, name in enumerate(order):
        if name in PREPARED and n_images is not None:
            weigh = dict(n_images=n_images, n_modules=leaf_modules(model), engine=name, fp32_images_per_s=fp32_ips,
                         unit=input_unit(model))
            pays, why = compile_pays(device.type, eager_images_per_s=first_ips, **weigh)
            if pays and first_call and name == "compile":  # a first call (set-up included: at times many times
                # slower than the next) made a compilation of minutes look worth it: time eager, and weigh again
                first_ips, first_call = _fastest({"eager": runners["eager"]}, timed_on, 1, device)["eager"], False
                pays, why = compile_pays(device.type, eager_images_per_s=first_ips, **weigh)
            best = fastest_agreeing(out, besides=name)  # among the engines prepared and timed before this one
            if pays and best is not None:  # worth it over eager: is it over the engine already timed?
                if first_call:  # eager's first call would undervalue this engine's expected speed: time eager
                    first_ips, first_call = _fastest({"eager": runners["eager"]}, timed_on, 1, device)["eager"], False
                pays, why = compile_pays(device.type, eager_images_per_s=first_ips, best=best, **weigh)
            if not pays:
                out[name] = {"skipped": why}
                continue
        if name in PREPARED and fingerprint is None:
            fingerprint = pass_fingerprint(model)  # hashed once for every prepared engine's keys
        t0 = time.perf_counter()
        try:
            fwd = engine_forward(name, model, batches[0], device=device, precision=precision,
                                 channels_last=channels_last, cache_dir=cache_dir, verify=False,
                                 fingerprint=fingerprint)
            with torch.no_grad():
                got = fwd(batches[0]).float().cpu()  # the first call (compiles, warms up)
        except Exception as exc:  # an engine that fails here is reported and skipped
            out[name] = {"error": exception_line(exc)}
            if machine_state(exc):  # not the trunk's: a stored timing tries it again
                out[name]["transient"] = True
            continue
        setup = time.perf_counter() - t0
        if ref is None:  # eager in fp32 is the reference
            ref = got
        out[name] = {"precision": engine_precision(name, precision), "setup_s": setup,
                     "max_abs_diff": float((got - ref).abs().max()) if ref.numel() else 0.0,
                     "rel_diff": _relative(got, ref)}
        _record_verified(name, model, batches[0], out[name]["rel_diff"], out["eager"].get("rel_diff"), device=device,
                         precision=precision, channels_last=channels_last, cache_dir=cache_dir,
                         fingerprint=fingerprint)
        runners[name] = fwd
        if name in PREPARED:
            outputs[name] = [got]
            agrees = out[name]["rel_diff"] <= tolerance(out[name]["precision"], out["eager"].get("rel_diff"))
            if agrees and n_images is not None and any(c in PREPARED for c in order[i + 1:]):
                # timed as soon as prepared, so the next one is weighed against it (the rounds below may raise it)
                speed = _fastest({name: fwd}, timed_on, 1, device, outputs=outputs, failed=failed)
                if name in speed:
                    out[name]["images_per_s"] = speed[name]
        if name == "eager":  # eager's speed alone first (for compile_pays)
            first_call = settle and precision == "fp32" and device.type == "cpu" and \
                any(c in PREPARED for c in candidates)
            if first_call:  # its fp32 reference batch, a first call: a low estimate, confirmed or timed below
                first_ips = len(batches[0]) / max(setup, 1e-9)
            else:  # its first timed round
                first_ips = _fastest(runners, timed_on, 1, device)["eager"]
            if fp32_ips is not None:
                out[name]["fp32_images_per_s"] = fp32_ips
    early = {n: m["images_per_s"] for n, m in out.items() if "images_per_s" in m}  # timed as soon as prepared
    done = {"eager": first_ips, **early}  # engines with a first round timed (or estimated)
    settled = list(runners) == ["eager"]  # eager alone (every other candidate skipped or failed): its estimate serves
    if first_call and not settled:  # the others' first round; a lead of FIRST_CALL_LEAD over eager's first call settles it
        done = {**early, **_fastest({n: f for n, f in runners.items() if n not in ("eager", *early, *failed)},
                                    timed_on, 1, device, outputs=outputs, failed=failed)}
        settled = max(done.values(), default=0.0) >= FIRST_CALL_LEAD * first_ips
        if settled:
            done["eager"] = first_ips
    timed = done if settled else _fastest(runners, timed_on, rounds, device, done=done, outputs=outputs,
                                          stop_early=settle, failed=failed)
    for name, why in failed.items():  # reported as an engine that fails on its first batch is
        out[name] = why
        outputs.pop(name, None)
        timed.pop(name, None)
    if settled and first_call:  # eager's speed is its first call's
        out["eager"]["first_call"] = True
    for name, ips in timed.items():
        out[name]["images_per_s"] = ips
    _compare_timed(out, outputs, model, batches, device=device, precision=precision, channels_last=channels_last,
                   cache_dir=cache_dir, fingerprint=fingerprint)
    for name, feats in outputs.items():  # kept for the feature pass, which starts on these batches
        _keep_timed(_runtime_key(name, model, batches[0], device=device, precision=precision,
                                 channels_last=channels_last, cache_dir=cache_dir, fingerprint=fingerprint),
                    batches, feats)
    return out


def _compare_timed(out: dict[str, dict[str, Any]], outputs: dict[str, list[torch.Tensor]], model: nn.Module,
                   batches: Sequence[torch.Tensor], **where: Any) -> None:
    """Compare each prepared engine's features on the timed batches after the first (items
    spread over the data: `example_batches`) with eager fp32 as on the first: an export
    traced, or a pass compiled, on the first batch may not follow other input (a trunk whose
    code branches on the pixel values; one that turns the batch size into a number). Its
    ``rel_diff`` (and ``max_abs_diff``) become the worst over all of them; in bf16 or fp16,
    so does eager's own difference at that precision (eager's ``rel_diff``), which
    `tolerance` allows for."""
    if len(batches) < 2 or not any(len(feats) > 1 for feats in outputs.values()):
        return
    device, channels_last, precision = where["device"], where["channels_last"], where["precision"]
    refs, own = [], []  # eager fp32's features, and eager's own difference at the run's precision, per batch
    with torch.no_grad():
        for b in batches[1:]:
            refs.append(_eager_fp32(model, b, device, channels_last))
            if precision != "fp32":
                with _autocast(device, precision):
                    own.append(_relative(model.features(_to_device(b, device, channels_last)).float().cpu(),
                                         refs[-1]))
    if own and "rel_diff" in out["eager"]:  # eager's own difference: the largest over the batches compared
        out["eager"]["rel_diff"] = max(out["eager"]["rel_diff"], *own)
    for name, feats in outputs.items():
        for k, (b, got, ref) in enumerate(zip(batches[1:], feats[1:], refs)):
            got = got.float().cpu()
            same = got.shape == ref.shape
            rel = _relative(got, ref) if same else math.inf
            out[name]["rel_diff"] = max(out[name]["rel_diff"], rel)
            out[name]["max_abs_diff"] = max(out[name]["max_abs_diff"],
                                            float((got - ref).abs().max()) if same and ref.numel() else
                                            0.0 if same else math.inf)
            _record_verified(name, model, batches[0], rel, own[k] if own else None, checked=b, **where)


def _fastest(runners: dict[str, Callable], batches: Sequence[torch.Tensor], rounds: int,
             device: torch.device, done: dict[str, float] | None = None,
             outputs: dict[str, list[torch.Tensor]] | None = None, stop_early: bool = True,
             failed: dict[str, dict[str, Any]] | None = None) -> dict[str, float]:
    """Images/s of each runner on ``batches``, the fastest of ``rounds`` round-robin rounds;
    ``done``: runners with a first round already timed (their speed), run one round less;
    ``outputs``: the runners named there get their first round's outputs appended.
    The rounds stop early (``stop_early``) once the fastest runner is ``CLEAR_LEAD`` times
    faster than every other: a lead that large has not been reversed by one more round here.
    ``failed``: a runner other than eager that raises is named there with its error (as
    `_time_engines` records one: ``transient`` for the machine's state), and is neither run
    again nor given a speed (without it, the error is raised)."""
    best: dict[str, float] = dict(done or {})
    failed_here = failed if failed is not None else {}
    with torch.no_grad():
        for r in range(rounds):
            live = [name for name in runners if name not in failed_here]
            if stop_early and r and len(best) == len(live) > 1 and _clear_lead(best):
                break
            for name in live:
                if r == 0 and name in (done or {}):
                    continue
                keep = outputs.get(name) if outputs is not None and name not in best else None
                n, t0 = 0, time.perf_counter()
                try:
                    for xb in batches:
                        got = runners[name](xb)
                        n += len(xb)
                        if keep is not None:
                            keep.append(got)
                except Exception as exc:  # an engine that fails on a later batch is skipped, as on its first
                    if failed is None or name == "eager":
                        raise
                    failed[name] = {"error": f"{exception_line(exc)} (on a timed batch after its first)",
                                    **({"transient": True} if machine_state(exc) else {})}
                    best.pop(name, None)
                    continue
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                best[name] = max(best.get(name, 0.0), n / (time.perf_counter() - t0))
    return best


def _clear_lead(speeds: dict[str, float]) -> bool:
    """Whether the fastest of ``speeds`` leads the second by ``CLEAR_LEAD`` or more."""
    top = sorted(speeds.values(), reverse=True)
    return len(top) < 2 or top[0] >= CLEAR_LEAD * top[1]


def _keep_timed(key: tuple, batches: Sequence[torch.Tensor], feats: Sequence[torch.Tensor]) -> None:
    """Keep a prepared engine's features on the timing ``batches`` (by input digest, in order)
    for the feature pass that runs on that engine (`lazy_engine_forward`)."""
    while len(_TIMED) >= 4:
        _TIMED.pop(next(iter(_TIMED)))
    _TIMED[key] = [(_digest(b), f.detach()) for b, f in zip([batches[0], *(batches[1:] or batches[:1])], feats)]


def engines_store_key(model: nn.Module, shape: Sequence[int], dtype: torch.dtype, *, device: torch.device,
                      precision: str, channels_last: bool, fingerprint: str | None = None) -> str:
    """What a stored timing verdict depends on: the trunk, the input, the machine and the
    versions (``fingerprint``: the pass's, `pass_fingerprint`, when already hashed)."""
    where = torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else torch.cuda.get_device_name(device)
    return "|".join([type(model.trunk).__name__, fingerprint or pass_fingerprint(model),
                     _shape_key(shape, bucket=True), str(dtype), device.type,
                     where, f"{torch.get_num_threads()} threads", precision, f"cl={channels_last}", _versions()])


def _shape_key(shape: Sequence[int], *, bucket: bool) -> str:
    """An input shape ``[*shape]`` (without the batch) as a key. Audio ``[T]`` batches are as
    long as their longest clip, which depends on the data's order: its length is keyed as
    the power of two at or above it (``bucket``: timings, which follow the length), or not at
    all (an ONNX export, whose time axis is dynamic). Image shapes are kept as they are."""
    if len(shape) != 1:
        return str(tuple(int(d) for d in shape))
    return f"(time<={1 << max(int(shape[0]) - 1, 0).bit_length()},)" if bucket else "(time,)"


def measure_engines(model: nn.Module, batches: Sequence[torch.Tensor], *, device: torch.device, precision: str,
                    channels_last: bool, candidates: Sequence[str], n_images: int,
                    cache_dir: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """`time_engines`, read from (and written to) ``cache_dir/engines.json`` when a
    ``cache_dir`` is given: a later run on the same trunk, input shape, machine and versions
    (and store format, ``STORE_FORMAT``) reuses the verdict (and so the same feature-cache key)
    instead of timing again. A candidate missing from the stored verdict, skipped there
    for a smaller run (one where it could pay now, weighed as the timing weighs it), or
    failed there for a reason of the machine's state (``"transient"``: a full disk, a file
    in the export's way), is timed and added. A stored ONNX Runtime timing whose export is
    gone and cannot be written again says why under ``"unprepared"`` (the decision then
    takes the next engine). Runs that store timings at once keep each other's (the store's
    lock, `update_json_object`)."""
    store = Path(cache_dir) / "engines.json" if cache_dir is not None else None
    fingerprint = pass_fingerprint(model)  # hashed once: the trunk's weights may be a gigabyte
    key = engines_store_key(model, batches[0].shape[1:], batches[0].dtype, device=device, precision=precision,
                            channels_last=channels_last, fingerprint=fingerprint)
    data = read_json_object(store) if store is not None else {}
    entry = data.get(key)
    saved = entry.get("measured") if isinstance(entry, dict) and entry.get("format") == STORE_FORMAT else None
    if _well_formed(saved):
        missing = [c for c in candidates if c not in saved or saved[c].get("transient") or (
                   "skipped" in saved[c] and c in PREPARED and
                   compile_pays(device.type, n_images=n_images, n_modules=leaf_modules(model),
                                eager_images_per_s=saved["eager"].get("images_per_s", 1.0), engine=c,
                                fp32_images_per_s=saved["eager"].get("fp32_images_per_s"), unit=input_unit(model),
                                best=fastest_agreeing(saved, besides=c))[0])]
        if not missing:
            stored = {c: {**saved[c], "stored": True} for c in ["eager", *candidates] if c in saved}
            if "images_per_s" in stored.get("onnxruntime", {}):  # its export is needed again if it wins
                why = _export_unwritable(model, batches[0], cache_dir, fingerprint)
                if why is not None:  # the timing stands, but this run could not prepare that engine
                    stored["onnxruntime"]["unprepared"] = why
            return stored
    measured = time_engines(model, batches, device=device, precision=precision, channels_last=channels_last,
                            candidates=candidates, cache_dir=cache_dir, n_images=n_images, fingerprint=fingerprint)
    if store is not None:  # when it cannot be stored, the verdict stands for this run; later runs time again
        store_timing(store, key, {"format": STORE_FORMAT, "measured": measured}, what="engine timing")
    return measured


def fastest_agreeing(measured: dict[str, dict[str, Any]], *, besides: str) -> tuple[str, float] | None:
    """The fastest prepared engine of a timing (`time_engines`) other than ``besides`` whose
    features agreed with eager fp32, and its speed: what `compile_pays` weighs a further
    engine against, in the timing, for a stored timing and in the benchmarks."""
    eager_rel = measured["eager"].get("rel_diff")
    agreeing = [(name, m["images_per_s"]) for name, m in measured.items()
                if name in PREPARED and name != besides and "images_per_s" in m
                and m["rel_diff"] <= tolerance(m["precision"], eager_rel)]
    return max(agreeing, key=lambda e: e[1], default=None)


def _export_unwritable(model: nn.Module, example: torch.Tensor, cache_dir: str | Path | None,
                       fingerprint: str) -> str | None:
    """Why the ONNX feature pass of a stored timing could not be prepared by this run (its
    export is gone or damaged, and its folder cannot be written), else None: checked before
    deciding, so that ``auto`` takes the next engine instead of stopping when the pass starts.
    A folder that can be written needs no more (the pass exports again what it lacks); only
    in one that cannot are the export's bytes read against its digest."""
    path = onnx_path(model, example.shape[1:], example.dtype, cache_dir, fingerprint=fingerprint)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe_writable(path.parent)
    except OSError as exc:
        if path.is_file() and _intact(path):
            return None
        return (f"its stored timing names an export that is gone or damaged, and {str(path.parent)!r} cannot be "
                f"written ({exception_line(exc)}): make that folder writable, or remove what is in its way")
    return None


def _well_formed(saved: Any) -> bool:
    """Whether a stored timing has the shape `time_engines` writes (a hand-edited or damaged
    store is timed again, not trusted)."""
    if not isinstance(saved, dict) or not isinstance(saved.get("eager"), dict):
        return False
    for name, m in saved.items():
        if name not in ENGINES or not isinstance(m, dict):
            return False
        if "skipped" in m or "error" in m:
            continue
        numbers = [m.get("images_per_s"), m.get("rel_diff")]
        if m.get("precision") not in TOLERANCE or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                          and math.isfinite(v) and v >= 0 for v in numbers):
            return False
        if not m["images_per_s"] > 0:
            return False
    return True


# --------------------------------------------------------------------------- the decision (pure)
def machine_state(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure of this machine's state rather than of an engine on its
    trunk, so that a stored timing tries the engine again: an ``OSError`` (a full disk, a file
    in the way) or running out of memory (``MemoryError``, torch's ``OutOfMemoryError``, or an
    ONNX Runtime allocation failure, which is a plain runtime error).

    Example:
        >>> machine_state(RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory"))
        True
    """
    return isinstance(exc, OSError) or out_of_memory(exc)


def engine_precision(engine: str, precision: str) -> str:
    """The precision an engine computes the features in: ONNX Runtime fp32, the others the run's."""
    return "fp32" if engine == "onnxruntime" else precision


def check_engine(requested: Any) -> str:
    """``requested`` when it names an engine, else a ConfigError saying what is valid."""
    if requested not in ENGINES:
        raise ConfigError(f"feature_engine={requested!r} is not an engine; use one of "
                          f"{', '.join(repr(e) for e in ENGINES)}.")
    return requested


def decide_engine(requested: str, *, device_type: str, available: dict[str, str | None],
                  measured: dict[str, dict[str, Any]] | None, n_images: int, world_size: int = 1,
                  precision: str = "fp32", unit: str = "images") -> tuple[str, str]:
    """The engine of the frozen feature pass, and why (pure: no I/O).

    ``requested``: ``"auto"`` or an engine (forced: a ConfigError when it cannot run here).
    ``available``: `engine_availability`. ``measured``: `time_engines` (None: not timed).
    ``n_images``: images the pass will see. Under ``auto`` the fastest engine whose features
    agree with eager fp32 within ``TOLERANCE`` of its precision and that beats eager by
    ``MIN_SPEEDUP`` is kept; eager (at the run's precision) is the fallback. ``unit``: what
    the pass reads (``"images"`` or ``"clips"``), as the reason names it.

    Example:
        >>> m = {"eager": {"images_per_s": 30.0, "rel_diff": 0.0, "precision": "fp32"},
        ...      "onnxruntime": {"images_per_s": 75.0, "rel_diff": 1e-6, "precision": "fp32"}}
        >>> decide_engine("auto", device_type="cpu", available={"eager": None, "onnxruntime": None,
        ...               "compile": "no compiler"}, measured=m, n_images=1000)[0]
        'onnxruntime'
    """
    check_engine(requested)
    if requested != "auto":
        why = available.get(requested, f"unknown engine {requested!r}")
        if why is not None:
            raise ConfigError(f"feature_engine={requested!r} cannot run here: {why}. Use feature_engine='auto' "
                              "(or 'eager').")
        return requested, "asked"
    missing = "; ".join(f"{e} skipped: {why}" for e, why in available.items() if why is not None)
    if world_size > 1:
        return "eager", ("distributed run: the engines are not timed per process (force one with "
                         "feature_engine=...)")
    if n_images < MIN_IMAGES_TO_TIME:
        return "eager", f"too little data to time the engines ({n_images} {unit}; timing starts at " \
                        f"{MIN_IMAGES_TO_TIME})"
    if not measured or "images_per_s" not in measured.get("eager", {}):
        alone = all(why is not None for e, why in available.items() if e != "eager")
        return "eager", ("no other engine can run here" if alone else "no engine was timed") + \
            (f" ({missing})" if missing else "")
    base = measured["eager"]["images_per_s"]
    rate = "img/s" if unit == "images" else f"{unit}/s"
    notes, best, best_ips = [], "eager", base
    for name, m in measured.items():
        if name == "eager":
            continue
        if "skipped" in m or "error" in m:
            notes.append(f"{name} {'skipped' if 'skipped' in m else 'failed'}: {m.get('skipped') or m.get('error')}")
            continue
        eager = measured["eager"]
        tol = tolerance(m["precision"], eager.get("rel_diff") if eager.get("precision") == m["precision"] else None)
        if not m["rel_diff"] <= tol:
            notes.append(f"{name} rejected: features differ from eager fp32 by {m['rel_diff']:.2g} of their "
                         f"largest value (tolerance {tol:.3g})")
            continue
        over = " eager's first call" if measured["eager"].get("first_call") else ""  # slower than its later calls
        notes.append(f"{name} {m['images_per_s']:.1f} {rate} ({m['images_per_s'] / base:.2f}x{over}, within "
                     f"{m['rel_diff']:.1g} of eager fp32 on the batches checked)")
        if m["images_per_s"] >= MIN_SPEEDUP * base and m["images_per_s"] > best_ips:
            best, best_ips = name, m["images_per_s"]
    notes += [f"{e} skipped: {why}" for e, why in available.items() if why is not None and e not in measured]
    first = " (its first call)" if measured["eager"].get("first_call") else ""
    source = ("read from an earlier timing of this trunk on input of this size (cache_dir/engines.json; its "
              "differences from eager are that timing's: the engine kept is checked on this run's own batches before "
              "use)") if measured["eager"].get("stored") else "timed on the run's input"
    timed = f"{source}: eager {precision} {base:.1f} {rate}{first}" + "".join(f"; {n}" for n in notes)
    tried = any("images_per_s" in m for name, m in measured.items() if name != "eager")
    verdict = "fastest, " if best != "eager" else f"none beats eager by {MIN_SPEEDUP:g}x; " if tried else \
        "no other engine was worth preparing or could run; "
    return best, verdict + timed


# --------------------------------------------------------------------------- runtime
class _FeaturePass(nn.Module):
    """``preprocess`` then ``trunk``: the feature pass of a TransferModel as one module."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.preprocess, self.trunk = model.preprocess, model.trunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.preprocess(x))


@contextlib.contextmanager
def _eval(model: nn.Module) -> Any:
    """``model`` in eval mode (BatchNorm statistics untouched, no dropout), its mode restored."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x


def _eager_fp32(model: nn.Module, x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    with torch.no_grad():
        return model.features(_to_device(x, device, channels_last)).float().cpu()


def _versions() -> str:
    found = onnx_modules()
    return f"torch {torch.__version__}, {'no ort' if isinstance(found, str) else f'ort {found[1].__version__}'}"


def engine_forward(engine: str, model: nn.Module, example: torch.Tensor, *, device: torch.device, precision: str,
                   channels_last: bool, cache_dir: str | Path | None = None, verify: bool = True,
                   fingerprint: str | None = None, also: Sequence[torch.Tensor] = ()) -> Callable:
    """The feature pass of ``model`` on ``engine``: ``forward(x) -> features``.

    ``example``: a real batch of the run's input (its shape fixes the exported or compiled
    input; ``verify``: the engine's features on it, and on the batches ``also`` (other items:
    `example_batches`), are compared with eager fp32 and an engine outside `tolerance` raises
    EngineError; ``fingerprint``: the pass's fingerprint when
    the caller has hashed it already). Prepared engines are kept for the
    process (a compilation or an ONNX session is made once per preprocessing and trunk
    weights, input shape and precision: the engine timed before deciding is the one the
    feature pass uses).

    Example:
        >>> import transferkit
        >>> m = transferkit.build_model(transferkit.get_backbone("tk:small_cnn", weights=None), 2).eval()
        >>> x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
        >>> fwd = engine_forward("eager", m, x, device=torch.device("cpu"), precision="fp32", channels_last=False)
        >>> fwd(x).shape == m.features(x).shape
        True
    """
    check_engine(engine)
    if engine == "auto":
        raise ConfigError("engine_forward() needs a decided engine, not 'auto' (see decide_engine).")
    if engine == "eager":
        def eager(x: torch.Tensor) -> torch.Tensor:
            with _autocast(device, precision):
                return model.features(_to_device(x, device, channels_last))
        return eager
    key = _runtime_key(engine, model, example, device=device, precision=precision, channels_last=channels_last,
                       cache_dir=cache_dir, fingerprint=fingerprint)
    fwd, bound = _RUNTIMES.get(key, (None, None))
    if bound is not None and bound is not model and pass_fingerprint(bound) != key[1]:
        # compiled on another module with these weights, which has trained since: not this pass any more
        fwd = None
        _forget(key)
    if fwd is None:
        if engine == "onnxruntime":
            fwd, bound = _onnx_forward(model, example, device=device, cache_dir=cache_dir, fingerprint=key[1]), None
        else:
            fwd, bound = _compiled_forward(model, example, device=device, precision=precision,
                                           channels_last=channels_last), model
        _forget(key)  # prepared anew: checked anew
        while len(_RUNTIMES) >= 4:
            _forget(next(iter(_RUNTIMES)))
        _RUNTIMES[key] = (fwd, bound)
    for i, batch in enumerate([example, *also] if verify else []):
        if (key, _digest(batch)) in _VERIFIED:  # compared once per prepared engine and batch
            continue
        try:
            rel = check_against_eager(engine, fwd, model, batch, device=device,
                                      precision=engine_precision(engine, precision), channels_last=channels_last)
        except (EngineError, OSError, MemoryError, torch.OutOfMemoryError):
            _forget(key)
            raise
        except Exception as exc:  # the first call compiles (inductor) or runs the session: a failure names the engine
            _forget(key)
            fix = " (inductor needs a working C++ compiler and the Python headers, e.g. python3-dev)" \
                if engine == "compile" and re.search(_COMPILER_TROUBLE, str(exc), re.I) else ""
            which = "its first batch" if i == 0 else f"a batch of other items ({tuple(batch.shape)})"
            raise EngineError(f"The {engine} feature pass failed on {which}{fix}: {exception_line(exc)}. "
                              "Use feature_engine='eager', or 'auto', which skips an engine that fails.") from exc
        _VERIFIED[(key, _digest(batch))] = rel
    return fwd


# what an inductor error says where the C++ compiler or the Python headers are at fault (dynamo's
# own text holds "compile" in most of its errors: the word alone says nothing of the compiler)
_COMPILER_TROUBLE = r"InvalidCxxCompiler|CppCompileError|C\+\+ compiler|\bcxx\b|Python\.h|\bg\+\+|\bgcc\b|\bclang"


def _forget(key: tuple) -> None:
    """Drop the engine prepared under runtime key ``key`` and the checks it passed (an engine
    prepared again under the key is checked again)."""
    _RUNTIMES.pop(key, None)
    for k in [k for k in _VERIFIED if k[0] == key]:
        del _VERIFIED[k]


def _runtime_key(engine: str, model: nn.Module, example: torch.Tensor, *, device: torch.device, precision: str,
                 channels_last: bool, cache_dir: str | Path | None, fingerprint: str | None = None) -> tuple:
    return (engine, fingerprint or pass_fingerprint(model),
            tuple(example.shape[1:]), example.dtype, str(device), precision, channels_last,
            str(cache_dir) if cache_dir is not None else None,
            torch.get_num_threads(),  # an ONNX Runtime session takes the thread count it was opened with
            # the trunk object itself: a fingerprint cannot see what forward reads outside the module (a global, a
            # helper function), so an engine is prepared, and checked against eager, for each run's own trunk (the
            # timing and the feature pass of one run share it); a weak reference: equal while the trunk lives, and
            # never equal to one of a later trunk at the same address
            weakref.ref(_run_trunk(model)))


def _run_trunk(model: nn.Module) -> nn.Module:
    """The trunk whose run ``model``'s pass serves: a timing's feature model stands for the
    trunk it is a copy of (`feature_model`), while that trunk lives."""
    origin = getattr(model, "copy_of", None)
    trunk = origin() if isinstance(origin, weakref.ref) else None
    return trunk if trunk is not None else getattr(model, "trunk", model)


def pass_fingerprint(model: nn.Module) -> str:
    """What identifies ``model``'s feature pass: its preprocessing and trunk as they compute in
    eval mode (`eval_fingerprint`: the trunk timed before the policy froze its BatchNorm
    statistics and the run's frozen trunk are one pass, with one export and one timing). Two
    digests of 32 hex digits, the preprocessing's then the trunk's; hashing reads every weight,
    so callers that key several things hash once and pass it on (``fingerprint=``)."""
    return module_fingerprint(model.preprocess) + eval_fingerprint(model.trunk)


def _digest(x: torch.Tensor) -> str:
    return hashlib.blake2b(x.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).hexdigest()


def _record_verified(engine: str, model: nn.Module, example: torch.Tensor, rel: float, eager_rel: float | None, *,
                     checked: torch.Tensor | None = None, **where: Any) -> None:
    """Note that the prepared ``engine`` (prepared on ``example``) agreed with eager fp32 on
    ``checked`` (default: ``example``; timing compares each engine on the batches the feature
    pass later checks it on: once is enough); ``eager_rel``: eager's own difference at the
    run's precision."""
    if engine != "eager" and rel <= tolerance(engine_precision(engine, where["precision"]), eager_rel):
        _VERIFIED[(_runtime_key(engine, model, example, **where), _digest(example if checked is None else checked))] \
            = rel


def tolerance(precision: str, eager_rel: float | None = None) -> float:
    """How far (relative to the largest feature) an engine computing in ``precision`` may
    differ from eager fp32: ``TOLERANCE[precision]``; in bf16 or fp16 also up to
    ``EAGER_MARGIN`` times eager's own difference at that precision on the same batch
    (``eager_rel``), since eager at that precision is what the run would use instead.

    Example:
        >>> tolerance("bf16"), tolerance("bf16", eager_rel=0.12), tolerance("fp32", eager_rel=0.12)
        (0.1, 0.24, 0.001)
    """
    tol = TOLERANCE[precision]
    return max(tol, EAGER_MARGIN * eager_rel) if precision != "fp32" and eager_rel is not None else tol


def _relative(got: torch.Tensor, ref: torch.Tensor) -> float:
    if not ref.numel():
        return 0.0
    diff, scale = float((got - ref).abs().max()), float(ref.abs().max())
    return diff / scale if scale else diff


def check_against_eager(engine: str, fwd: Callable, model: nn.Module, example: torch.Tensor, *,
                        device: torch.device, precision: str, channels_last: bool) -> float:
    """The largest difference of ``fwd``'s features from eager fp32 on ``example``, relative
    to their largest value; EngineError when it exceeds `tolerance` (in bf16 or fp16, eager's
    own difference at that precision is measured on ``example`` too)."""
    eager_rel = None
    with _eval(model), torch.no_grad():
        ref = _eager_fp32(model, example, device, channels_last)
        got = fwd(example).float().cpu()
        if precision != "fp32":
            with _autocast(device, precision):
                eager_rel = _relative(model.features(_to_device(example, device, channels_last)).float().cpu(), ref)
    if got.shape != ref.shape:
        raise EngineError(f"The {engine} feature pass returns {tuple(got.shape)} for input {tuple(example.shape)}, "
                          f"eager {tuple(ref.shape)}; it is not used. Use feature_engine='eager'.")
    rel, tol = _relative(got, ref), tolerance(precision, eager_rel)
    if not rel <= tol:
        own = f", eager {precision} {eager_rel:.3g}" if eager_rel is not None else ""
        raise EngineError(f"The {engine} feature pass differs from eager fp32 by {rel:.3g} of the largest feature "
                          f"on a real batch (tolerance {tol:.3g} for {precision}{own}); it is not used. "
                          "Use feature_engine='eager'.")
    return rel


def onnx_path(model: nn.Module, shape: Sequence[int], dtype: torch.dtype, cache_dir: str | Path | None, *,
              fingerprint: str | None = None) -> Path:
    """Where the ONNX export of ``model``'s feature pass for inputs ``[N, *shape]`` lives:
    ``cache_dir/engines/onnx/<digest>.onnx`` (the digest covers the preprocessing and trunk
    weights, the trunk's class, the input shape (for audio, not its length: the export's time
    axis is dynamic) and dtype, and the torch and onnxruntime versions), else a folder of
    this process (also where a read-only ``cache_dir`` lacks it: see
    `transferkit._io.read_only_folder`). ``fingerprint``: the pass's (`pass_fingerprint`) when
    already hashed."""
    fingerprint = fingerprint or pass_fingerprint(model)
    ident = "|".join([type(model.trunk).__module__, type(model.trunk).__qualname__,
                      fingerprint[:32], fingerprint[32:],  # the preprocessing's and the trunk's digests
                      _shape_key(shape, bucket=False),
                      str(dtype), _versions()])
    name = hashlib.blake2b(ident.encode(), digest_size=16).hexdigest() + ".onnx"
    if cache_dir is not None:
        kept = Path(cache_dir) / "engines" / "onnx" / name
        if kept.exists() or read_only_folder(cache_dir) is None:
            return kept
    if not _SESSION_DIR:  # removed when the process exits (or by release_engines)
        # named for this process, so that the folders of killed processes (SIGKILL, a crash:
        # no atexit) are found and removed by the next run
        remove_stale_engine_files(None)
        _SESSION_DIR.append(str(create_temp(_session_anchor(), directory=True, prefix=_SESSION_PREFIX)))
        atexit.register(_remove_session_dir)
    return Path(_SESSION_DIR[0]) / name


def _onnx_forward(model: nn.Module, example: torch.Tensor, *, device: torch.device,
                  cache_dir: str | Path | None, fingerprint: str, retried: bool = False) -> Callable:
    import onnxruntime as ort

    path = onnx_path(model, example.shape[1:], example.dtype, cache_dir, fingerprint=fingerprint)
    exported = not _intact(path)  # (its digest is read once: the file may be tens of MB)
    if exported:  # missing, or damaged since it was written: export it (again)
        export_feature_pass(model, example, path)
    provider = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
    try:
        session = ort.InferenceSession(str(path), sess_options=session_options(ort), providers=[provider])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a file it cannot read
        if exported or retried:
            raise EngineError(f"onnxruntime cannot open the feature pass it was just given ({str(path)!r}): "
                              f"{exception_line(exc)}. Use feature_engine='eager'.") from exc
        export_feature_pass(model, example, path)  # a stored file that its digest passed but ONNX Runtime refuses
        return _onnx_forward(model, example, device=device, cache_dir=cache_dir, fingerprint=fingerprint, retried=True)

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = torch.from_numpy(session.run(None, {"input": x.detach().cpu().contiguous().numpy()})[0])
        if out.shape[0] != x.shape[0]:
            raise EngineError(f"The ONNX export of the feature pass returned {out.shape[0]} rows of features for "
                              f"{x.shape[0]} inputs: its trace fixed the batch size (the trunk's code turns it into "
                              "a number, e.g. len(x)). Use feature_engine='eager' or 'compile'.")
        return out
    why = _export_mismatch(forward, model, example, device=device, exported=exported)
    if why is not None:
        if exported or retried:
            raise EngineError(f"The ONNX export of the feature pass {why}; it is not used. Use feature_engine='eager'.")
        export_feature_pass(model, example, path)  # a stored file that this trunk's code no longer computes
        return _onnx_forward(model, example, device=device, cache_dir=cache_dir, fingerprint=fingerprint, retried=True)
    return forward


def _export_mismatch(forward: Callable, model: nn.Module, example: torch.Tensor, *, device: torch.device,
                     exported: bool) -> str | None:
    """What the opened ONNX pass gets wrong against eager fp32, checked where the export's own
    trace could not show it, else None. Audio (``[N, T]``, a dynamic time axis): on the first
    two clips cut to 3/4 of their length, a length the trace did not see (a trunk whose code
    turns the length into a number, e.g. ``float(x.shape[-1])``, is traced with it fixed). A
    stored export (``exported=False``): on the first two items, as the trace was (a file copied
    in, or a trunk whose code changed without changing its fingerprint)."""
    audio = input_unit(model) == "clips"
    if audio:
        probe = shorter_clips(example[:2])
    elif not exported:
        probe = example[:2]
    else:
        return None
    try:
        with _eval(model):
            ref = _eager_fp32(model, probe, device, False)
    except Exception:  # noqa: BLE001 - a clip too short for the trunk: nothing to compare with
        return None
    got = forward(probe).float()
    rel = _relative(got, ref) if got.shape == ref.shape else math.inf
    if rel <= TOLERANCE["fp32"]:
        return None
    what = "does not follow the clip length" if audio else "does not compute this trunk's pass"
    return (f"{what}: on input {tuple(probe.shape)} it differs from eager fp32 by {rel:.3g} of the largest "
            f"feature (tolerance {TOLERANCE['fp32']:g})")


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".digest")


def _intact(path: Path) -> bool:
    """Whether the exported ``path`` holds the bytes it was written with (its digest beside it)."""
    try:
        return _digest_path(path).read_text().strip() == file_digest(path)
    except OSError:
        return False


def export_feature_pass(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Export ``model``'s feature pass (preprocessing + trunk, fp32, on the CPU) to ONNX at
    ``path`` (atomically), with a dynamic batch axis (and time axis for 2-d audio input),
    traced on the first two items of ``example`` (a graph that baked in the batch size
    would fail the comparison with eager on a whole batch, and not be used). The file's
    digest is written beside it (``<name>.digest``): a later run that finds the bytes
    changed (a damaged disk, a partial copy) exports again instead of using them."""
    module = _FeaturePass(copy.deepcopy(model).cpu().float().eval())
    module.to(memory_format=torch.contiguous_format)
    dynamic = {0: "batch"} if example.ndim != 2 else {0: "batch", 1: "time"}

    trace = example[:2].cpu().contiguous()  # the trace runs the pass once: two items cost a fraction of a batch

    def write(tmp: str) -> None:
        # constants are folded by ONNX Runtime when it opens the session (folding them here
        # too cost 0.1-0.2 s of a 0.7 s Lite0 export, at the same speed of the pass)
        convert_to_onnx(module, trace, tmp, output_name="features", constant_folding=False, what="feature pass",
                        hint="", dynamic_axes={"input": dynamic, "features": {0: "batch"}})

    path = atomic_write(path, write, what="ONNX feature pass")
    digest = file_digest(path)
    atomic_write(_digest_path(path), lambda tmp: Path(tmp).write_text(digest + "\n"), what="ONNX feature pass digest")
    return path


def _compiled_forward(model: nn.Module, example: torch.Tensor, *, device: torch.device, precision: str,
                      channels_last: bool) -> Callable:
    compiled = torch_compile(_FeaturePass(model))
    size = int(example.shape[0])

    def forward(x: torch.Tensor) -> torch.Tensor:
        n = int(x.shape[0])
        if n < size:  # pad with copies of the last item: the pass is per sample, one compilation serves all
            x = torch.cat([x, x[-1:].expand(size - n, *x.shape[1:])])
        with _autocast(device, precision):
            out = compiled(_to_device(x, device, channels_last))
        return out[:n]
    return forward


def lazy_engine_forward(engine: str, model: nn.Module, dataset: Any, *, batch_size: int, **kwargs: Any) -> Callable:
    """`engine_forward` prepared (exported or compiled, and checked against eager fp32 on
    `example_batches` of ``dataset``) when the feature pass first runs: a run whose features
    are all read back from the cache prepares nothing. A pass that starts on the batch this
    engine was timed on first (`time_engines`) takes its features from the timing instead of
    computing them again (the same engine, the same input: the same features); the first
    batch that differs ends the lookup."""
    ready: list[Callable] = []
    example_of: list[tuple[torch.Size, torch.dtype]] = []  # the example batch's item shape and dtype
    prepared: list[tuple] = []  # the prepared engine's key in _RUNTIMES
    timed: list[tuple[str, torch.Tensor]] = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not ready:
            example, *others = example_batches(dataset, batch_size=batch_size)
            example_of.append((example.shape[1:], example.dtype))
            fingerprint = pass_fingerprint(model)  # hashed once for both keys
            try:
                ready.append(engine_forward(engine, model, example, fingerprint=fingerprint, also=others, **kwargs))
            except ExportError as exc:  # ONNX cannot express the pass (an operator at this input size, say)
                raise EngineError(f"{exc} Use feature_engine='eager', or 'auto', which skips an engine that "
                                  "fails.") from exc
            prepared.append(_runtime_key(engine, model, example, fingerprint=fingerprint, **kwargs))
            timed.extend(_TIMED.pop(prepared[0], []))
        if timed:
            digest, feats = timed.pop(0)
            if digest == _digest(x):
                return feats
            timed.clear()
        try:
            return ready[0](x)
        except (EngineError, OSError, MemoryError, torch.OutOfMemoryError):  # the machine's state: as it is
            raise
        except Exception as exc:  # prepared and checked, yet failing on a later batch: named, never a traceback
            _forget(prepared[0])  # not kept prepared for a later run in this process
            if machine_state(exc):  # ONNX Runtime's allocation failure: not recorded against the engine
                raise EngineError(f"The {engine} feature pass ran out of memory on a batch of the pass "
                                  f"({tuple(x.shape)}): {exception_line(exc)}. Free memory (other processes, a "
                                  "smaller model) and run again, or use feature_engine='eager'; the failure is not "
                                  "recorded against the engine.") from exc
            why = f"{exception_line(exc)} (on a batch of the feature pass)"
            kept = _record_failure(engine, why, model, *example_of[0], **kwargs)
            raise EngineError(f"The {engine} feature pass failed on a batch of the pass ({tuple(x.shape)}): "
                              f"{exception_line(exc)}. Use feature_engine='eager'"
                              f"{'; auto skips it in the next run on this cache_dir' if kept else ''}.") from exc
    return forward


def _record_failure(engine: str, why: str, model: nn.Module, shape: Sequence[int], dtype: torch.dtype, *,
                    device: torch.device, precision: str, channels_last: bool, cache_dir: str | Path | None) -> bool:
    """Record in ``cache_dir/engines.json`` that ``engine`` failed on the pass of ``model``, so
    that a stored timing verdict no longer picks it; returns whether a verdict holds it now."""
    if cache_dir is None or read_only_folder(cache_dir) is not None:
        return False
    key = engines_store_key(model, shape, dtype, device=device, precision=precision, channels_last=channels_last)
    recorded: list[bool] = []

    def failed(entry: Any) -> Any:  # under the store's lock: another run's update of the key is kept
        stored = entry.get("measured") if isinstance(entry, dict) and entry.get("format") == STORE_FORMAT else None
        if not _well_formed(stored):
            return None  # no verdict picks it (the engine was asked for by name)
        entry["measured"][engine] = {"error": why}
        recorded.append(True)
        return entry
    return store_timing(Path(cache_dir) / "engines.json", key, failed, what="engine timing") and bool(recorded)


def _session_anchor() -> Path:
    return Path(tempfile.gettempdir()) / "transferkit-engines"


def remove_stale_engine_files(cache_dir: str | Path | None) -> list[Path]:
    """Remove what killed runs left behind (SIGKILL, a crash): the temporaries of exports and
    timing stores in ``cache_dir`` and its ``engines/onnx`` whose writer is dead (a write cut
    short; the next write of the same file would remove them, but a run that takes another
    engine never writes it), and the export folders of dead processes that ran without a
    ``cache_dir``. A live writer's files are left alone. Returns what was removed."""
    removed = []
    if cache_dir is not None:
        for folder in (Path(cache_dir), Path(cache_dir) / "engines" / "onnx"):
            removed += remove_stale_temps_in(folder)
    with contextlib.suppress(OSError):  # another user's folder that this one may not remove
        removed += remove_stale_temps(_session_anchor(), prefix=_SESSION_PREFIX)
    return removed


def release_engines() -> None:
    """Forget the prepared engines of this process (compiled modules, ONNX sessions) and
    remove its exports made without a ``cache_dir``."""
    _RUNTIMES.clear()
    _VERIFIED.clear()
    _TIMED.clear()
    _remove_session_dir()


def _remove_session_dir() -> None:
    while _SESSION_DIR:
        shutil.rmtree(_SESSION_DIR.pop(), ignore_errors=True)


class _Items(Dataset):
    """The items ``indices`` of ``dataset``, in that order (batched as ``dataset`` batches them)."""

    def __init__(self, dataset: Any, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)
        self.collate_fn = getattr(dataset, "collate_fn", None)  # audio: clips of different lengths padded

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[self.indices[i]]


def example_indices(dataset: Any, *, batch_size: int, count: int = 2) -> list[int]:
    """Which items of ``dataset`` `example_batches` reads: the first batch, then ``count - 1``
    batches of items spread evenly over the rest (over the rest of the first sample's remote
    shard where the data are remote shards: `fetch_groups`; reading items of other shards
    would fetch each of them whole, one after another, before the pass).

    Example:
        >>> example_indices(list(range(100)), batch_size=4, count=2)
        [0, 1, 2, 3, 4, 36, 67, 99]
    """
    n = len(dataset)
    first = min(batch_size, n)
    groups = getattr(dataset, "fetch_groups", None)
    groups = groups() if callable(groups) else None
    rest: Sequence[int] = range(first, n) if groups is None else \
        (np.flatnonzero(np.asarray(groups[first:]) == groups[0]) + first).tolist()
    k = min(len(rest), (count - 1) * batch_size)
    return list(range(first)) + [rest[round(j * (len(rest) - 1) / max(k - 1, 1))] for j in range(k)]


def example_batches(dataset: Any, *, batch_size: int, count: int = 2) -> list[torch.Tensor]:
    """Up to ``count`` batches of ``dataset`` (already seen through its transform), read in this
    process: the inputs the engines are timed and checked on. The first is the first batch
    of the feature pass (whose features the timing computes, kept for it: `_keep_timed`); the
    others hold items spread over the data (`example_indices`), so that an engine is also
    checked on other items than those it was traced or compiled on (a folder lists its files
    class by class: a first batch may hold one class)."""
    items = _Items(dataset, example_indices(dataset, batch_size=batch_size, count=count))
    loader = make_loader(items, batch_size=batch_size, shuffle=False, device=torch.device("cpu"), num_workers=0)
    return [x for x, _ in loader]


def feature_model(trunk: nn.Module, spec: Any, device: torch.device, *, channels_last: bool) -> TransferModel:
    """A copy of ``trunk`` behind the preprocessing of ``spec``, on ``device`` in the layout
    and in eval mode: what the engines are timed on (the run's own trunk is left as it is; the
    engines prepared on the copy serve the pass of ``trunk``, and no other trunk's)."""
    pre = preprocess_for(spec)
    model = TransferModel(pre, copy.deepcopy(trunk), nn.Identity()).to(device).eval()
    model.copy_of = weakref.ref(trunk)  # its engines serve the run of ``trunk`` (`_run_trunk`)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def onnx_blocker(trunk: nn.Module) -> str | None:
    """Why the ONNX exporter cannot convert ``trunk``, where its structure alone says so (a
    module whose conversion is known to fail), else None. ``tests/test_train_engines.py``
    converts each such module and expects the failure, so an exporter that learns it fails
    the test.

    Example:
        >>> import transferkit
        >>> onnx_blocker(transferkit.get_backbone("tk:small_cnn", weights=None).trunk) is None
        True
    """
    scripted = next((name for name, m in trunk.named_modules() if isinstance(m, torch.jit.ScriptModule)), None)
    if scripted is not None:
        return (f"the trunk is TorchScript ({scripted or 'the trunk itself'}): the ONNX exporter traces the feature "
                "pass, and a compiled module inside it cannot be traced through")
    transforms = sys.modules.get("torchaudio.transforms")  # not imported: no trunk holds its modules
    if transforms is None:
        return None
    for name, m in trunk.named_modules():
        if isinstance(m, transforms.Spectrogram):
            return (f"the trunk computes an STFT ({name or 'the trunk itself'}: torchaudio {type(m).__name__}), "
                    "whose complex values the ONNX exporter cannot convert")
    return None


def engine_facts(requested: str, *, trunk: nn.Module | None, spec: Any, dataset: Any, device: torch.device,
                 precision: str, channels_last: bool, n_images: int, world_size: int, batch_size: int,
                 cache_dir: str | Path | None, structure: nn.Module | None = None,
                 measure: bool = True) -> dict[str, Any]:
    """What the engine decision reads, gathered before deciding: the engines available here
    (ONNX Runtime not for a trunk it cannot convert: `onnx_blocker` on ``structure``, the
    trunk's modules, its weights loaded or not), the number of images the pass will see, and
    (``requested="auto"`` on one process with enough data, ``trunk`` loaded) the timing of
    the candidates on `example_batches` of ``dataset`` (`time_candidates`, stored under
    ``cache_dir``). ``measure=False`` leaves a due timing to the caller: ``"due"`` lists the
    candidates to time (``[]`` where none can run: the caller may still read features an engine
    stored, `transferkit.decisions.cached_engine`)."""
    available = engine_availability(device.type)
    blocked = onnx_blocker(structure) if structure is not None else None
    if blocked is not None and available.get("onnxruntime") is None:
        available["onnxruntime"] = blocked
    if requested == "auto" and spec.kind == "audio" and not getattr(spec, "clip_seconds", None) \
            and available.get("compile") is None:  # batches as long as their longest clip
        available["compile"] = ("clips of different lengths: each new batch length would compile again "
                                "(force it with feature_engine='compile', or give the backbone clip_seconds=...)")
    out: dict[str, Any] = {"available": available, "n_images": n_images, "measured": None}
    candidates = [e for e, why in available.items() if why is None and e != "eager"]
    if requested != "auto" or world_size > 1 or n_images < MIN_IMAGES_TO_TIME:
        return out
    if trunk is None:  # a dry run: the weights are not loaded
        if candidates or cache_dir is not None:  # (neither: nothing to time eager against, no stored features)
            out["pending"] = ("provisional: a dry run loads no weights, so it neither times the engines nor reads a "
                              "stored timing or looks for stored features (keyed by the weights); the run does, and "
                              "may choose another")
        return out
    if not measure:  # [] where no other engine can run: nothing to time, stored features are still looked for
        out["due"] = candidates
        return out
    if not candidates:
        return out
    out["measured"] = time_candidates(candidates, trunk=trunk, spec=spec, dataset=dataset, device=device,
                                      precision=precision, channels_last=channels_last, n_images=n_images,
                                      batch_size=batch_size, cache_dir=cache_dir)
    return out


def time_candidates(candidates: Sequence[str], *, trunk: nn.Module, spec: Any, dataset: Any, device: torch.device,
                    precision: str, channels_last: bool, n_images: int, batch_size: int,
                    cache_dir: str | Path | None) -> dict[str, dict[str, Any]]:
    """`measure_engines` of eager and ``candidates`` on `example_batches` of ``dataset`` through
    ``trunk``'s feature model (the global random state left as it was)."""
    batches = example_batches(dataset, batch_size=batch_size)
    model = feature_model(trunk, spec, device, channels_last=channels_last)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return measure_engines(model, batches, device=device, precision=precision, channels_last=channels_last,
                               candidates=list(candidates), n_images=n_images, cache_dir=cache_dir)
