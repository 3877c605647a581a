"""Shared by the benchmarks: the machine line each prints first (CPU, torch, threads, bf16
capability, load), and running one measurement in its own process (clean peak memory)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

from transferkit.recipes import default_data_root

DATA = default_data_root()
"""The real data: ``$TRANSFERKIT_DATA`` (empty: unset), else ``shared/data`` beside the checkout."""


# Environment variables that cap the instruction sets torch uses (oneDNN, ATen's vector
# kernels and inductor's generated code, MKL): set to AVX2 they make an AVX-512 CPU run
# torch's AVX2 code paths, the closest a CPU with AVX-512 gets to one without it.
ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")


def machine_line(threads: int | None = None) -> str:
    import torch

    from transferkit.train.speed import cpu_bf16_native

    try:
        model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                     platform.processor())
    except OSError:
        model = platform.processor() or platform.machine()
    try:
        flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    except OSError:
        flags = []
    shown = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    native, why = cpu_bf16_native()
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    caps = [f"{k}={os.environ[k]}" for k in ISA_CAPS if os.environ.get(k)]
    capped = f"; instruction sets capped: {' '.join(caps)} (ONNX Runtime is not capped)" if caps else ""
    return (f"{model} ({platform.machine()}, {os.cpu_count()} CPUs, capability "
            f"{torch.backends.cpu.get_cpu_capability()}, flags {' '.join(shown) or 'none of avx2/avx512/amx'}, "
            f"native bf16: {'yes' if native else 'no'}, {why}){gpu}{capped}; "
            f"torch {torch.__version__}; {threads or torch.get_num_threads()} torch threads; "
            f"load average {os.getloadavg()[0]:.1f}")


def run_child(script: str, argv: list[str], label: str) -> dict:
    """Run ``python script *argv`` in a fresh process and return the JSON object its last
    stdout line holds (echoed to stderr as it arrives); a failure stops the benchmark."""
    out = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{label} failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {label}: {json.dumps(res)}", file=sys.stderr, flush=True)
    return res
