"""What `experts="auto"` computes the experts with, decided from the CPU this process runs on.

Selection only pays if the expert computation after it is at least as fast as the model's own
dispatch (transformers' `grouped_mm` / `batched_mm`: ATen GEMMs, i.e. oneDNN, per expert). lynx's
CPU kernel (`moe_experts_cpu.cpp`) reads each present expert's weights once; on AMX it hands the
products to oneDNN's brgemm, on AVX512_BF16 it uses bf16 dot products, elsewhere fp32 FMA.
Measured, the fused op alone against transformers' `grouped_mm` on the same routing
(`bench/bench_expert_kernels.py`, docs/benchmarks.md "Which expert compute auto picks"; one AMX
machine, oneDNN capped to each lower ISA with ONEDNN_MAX_CPU_ISA, the kernel on that ISA's path):

  CPU                      auto uses         lynx's time / grouped_mm's (bf16, both blocks, 2026-12-02)
  AMX                      lynx.moe_experts  0.25-0.41x at B <= 4, 0.49-0.83x at B 16-64 (brgemm)
  AVX512_BF16 (no AMX)     lynx.moe_experts  0.29-0.41x at B <= 4, 0.51-1.00x at B 16-64 (bf16dot)
  AVX-512 without bf16     lynx.moe_experts  0.40-0.67x (16 fp32 lanes)
  AVX2                     lynx.moe_experts  0.33-0.44x (8 fp32 lanes)
  any other ISA            the model's own   not measured: a native library may win there
  (ARM, no vector ISA)     dispatch

The decision is made when a graph is compiled, in the process that runs it, and the CPU's
features are part of the pass's cache key, so a cached graph never carries another CPU's choice.
`experts="fused"` or `"keep"` override it for one compile; the environment variable
`LYNX_EXPERTS_AUTO=fused|keep` forces what `"auto"` decides for the whole process (tests use it to
check both outcomes on any CPU; it is part of the cache key too).
"""

from __future__ import annotations

import os

import torch

AUTO_ENV = "LYNX_EXPERTS_AUTO"
AUTO_OUTCOMES = ("fused", "keep")  # what LYNX_EXPERTS_AUTO may force; unset: decided from the CPU


def forced_auto() -> str | None:
    """The outcome LYNX_EXPERTS_AUTO forces ("fused" or "keep"), or None (decide from the CPU).

    Raises ValueError naming the variable for any other value."""
    value = os.environ.get(AUTO_ENV, "")
    if value and value not in AUTO_OUTCOMES:
        raise ValueError(f"{AUTO_ENV}={value!r}; expected one of {', '.join(AUTO_OUTCOMES)} (or unset)")
    return value or None


def kernel_measured_on_this_cpu() -> bool:
    """An x86 CPU with AVX2 or AVX-512: the ISAs the table above measured lynx.moe_experts on."""
    return torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512"))


def cpu_features() -> str:
    """A short description of the CPU the decision reads, e.g. "AVX2" or "AVX512+bf16+amx"."""
    parts = [torch.backends.cpu.get_cpu_capability()]
    if torch.cpu._is_avx512_bf16_supported():
        parts.append("bf16")
    if torch.cpu._is_amx_tile_supported():
        parts.append("amx")
    return "+".join(parts)


def decision_key() -> str:
    """Everything `experts="auto"` decides from, for the pass's cache key: the CPU and any forcing."""
    return f"{cpu_features()}|auto={forced_auto() or 'cpu'}"


def auto_keeps_dispatch(hidden: torch.Tensor) -> str | None:
    """Why `experts="auto"` keeps the model's own dispatch for this hidden state, or None to fuse.

    hidden: (T, H), a fake tensor is enough (only device and dtype are read).
    """
    forced = forced_auto()
    if forced == "fused":
        return None
    if forced == "keep":
        return f"experts='auto' forced to keep the model's dispatch ({AUTO_ENV}=keep)"
    if hidden.device.type == "cpu" and not kernel_measured_on_this_cpu():
        return (f"experts='auto' on a {cpu_features()} CPU: lynx.moe_experts was not measured against the "
                "model's own dispatch on this ISA; experts='fused' forces the fused op")
    return None
