"""The machine line every benchmark prints first (CPU, torch, threads, bf16 capability, load)."""

from __future__ import annotations

import os
import platform


def machine_line(threads: int | None = None) -> str:
    import torch

    from transferkit.train.speed import cpu_bf16_native

    try:
        model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                     platform.processor())
    except OSError:
        model = platform.processor() or platform.machine()
    native, why = cpu_bf16_native()
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{model} ({platform.machine()}, {os.cpu_count()} CPUs, capability "
            f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {'yes' if native else 'no'}, {why}){gpu}; "
            f"torch {torch.__version__}; {threads or torch.get_num_threads()} torch threads; "
            f"load average {os.getloadavg()[0]:.1f}")
