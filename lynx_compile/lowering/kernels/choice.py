"""What `experts="auto"` computes the experts with, decided from the CPU this process runs on.

Selection only pays if the expert computation after it is at least as fast as the model's own
dispatch. lynx's CPU kernel (`moe_experts_cpu.cpp`) multiplies in fp32 with FMA, widening bf16
weights as it reads them; the model's own dispatch (transformers' `grouped_mm` / `batched_mm`)
runs ATen GEMMs, i.e. oneDNN, per expert. Which is faster depends on whether the CPU multiplies
bf16 natively. Measured (README, "Expert compute"):

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
`experts="fused"` or `"keep"` override it.
"""

from __future__ import annotations

import torch


def cpu_has_bf16_dot_products() -> bool:
    """AVX512_BF16 or AMX: oneDNN runs bf16 GEMMs natively on this CPU."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def cpu_features() -> str:
    """A short description of what the decision reads, e.g. "AVX2" or "AVX512+bf16+amx"."""
    parts = [torch.backends.cpu.get_cpu_capability()]
    if torch.cpu._is_avx512_bf16_supported():
        parts.append("bf16")
    if torch.cpu._is_amx_tile_supported():
        parts.append("amx")
    return "+".join(parts)


def auto_keeps_dispatch(hidden: torch.Tensor) -> str | None:
    """Why `experts="auto"` keeps the model's own dispatch for this hidden state, or None to fuse.

    hidden: (T, H), a fake tensor is enough (only device and dtype are read).
    """
    if hidden.device.type == "cpu" and hidden.dtype == torch.bfloat16 and cpu_has_bf16_dot_products():
        return (f"experts='auto' on a {cpu_features()} CPU: the model's own bf16 GEMMs (oneDNN, native bf16) "
                "were measured faster than lynx.moe_experts here; experts='fused' forces the fused op")
    return None
