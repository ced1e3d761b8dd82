"""The machine a measurement ran on, printed and stored with every benchmark and evaluation table."""

from __future__ import annotations

import os
import platform
import time

import torch
import transformers


def measure_read_bandwidth(megabytes: int = 512) -> float:
    """GB/s of a plain streaming read (a sum over a buffer far larger than the caches), best of 5."""
    buffer = torch.ones(megabytes * 2**20 // 4)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best / 1e9


def describe() -> dict:
    """The machine, and which lynx CPU kernel path and experts='auto' choice it gets."""
    from .lowering.kernels.choice import cpu_features, kernel_measured_on_this_cpu
    from .lowering.kernels.moe_experts_cpu import describe_path

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "vector_isa": torch.backends.cpu.get_cpu_capability(), "cpu_features": cpu_features(),
            "lynx_cpu_kernel": describe_path(),
            "experts_auto": "lynx.moe_experts" if kernel_measured_on_this_cpu() else "model's dispatch",
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "read_bandwidth_gbs": round(measure_read_bandwidth(), 1)}
