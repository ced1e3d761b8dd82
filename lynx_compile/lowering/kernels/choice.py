"""What `experts="auto"` computes the experts with, decided from the CPU this process runs on.

Selection only pays if the expert computation after it is at least as fast as the model's own
dispatch. lynx's CPU kernel (`moe_experts_cpu.cpp`) multiplies in fp32 with FMA, widening bf16
weights as it reads them; the model's own dispatch (transformers' `grouped_mm` / `batched_mm`)
runs ATen GEMMs, i.e. oneDNN, per expert. Which is faster depends on whether the CPU multiplies
bf16 natively. Measured (docs/benchmarks.md, "Expert compute"):

  CPU                               weights  auto uses            evidence (Mixtral-shaped block, bf16)
  AVX512_BF16 or AMX                bf16     the model's dispatch  B=32 clustered: default Inductor 10.2-13.0 ms,
                                                                   lynx fused 12.4-14.9 ms, binning + model's
                                                                   dispatch 5.5 ms (issue 9, AVX512_BF16 machine)
  AVX2, AVX-512 without bf16        bf16     lynx.moe_experts      oneDNN emulates bf16 GEMMs: 1.2-3.5x at B >= 8
                                                                   for the fused op (bench_experts.py, AVX2)
  any                               fp32     lynx.moe_experts      one pass over each expert's weights instead of
                                                                   a GEMM per expert (bench_experts.py)

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


def cpu_has_bf16_dot_products() -> bool:
    """AVX512_BF16 or AMX: oneDNN runs bf16 GEMMs natively on this CPU."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


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
    if hidden.device.type == "cpu" and hidden.dtype == torch.bfloat16 and cpu_has_bf16_dot_products():
        return (f"experts='auto' on a {cpu_features()} CPU: the model's own bf16 GEMMs (oneDNN, native bf16) "
                "were measured faster than lynx.moe_experts here; experts='fused' forces the fused op")
    return None
