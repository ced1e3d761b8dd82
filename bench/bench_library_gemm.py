"""The expert GEMMs through maintained libraries vs lynx.moe_experts, on this CPU, in one run.

    python bench/bench_library_gemm.py      (~10 min, mostly Inductor's max-autotune)

For one expert's work at decode sizes (n tokens routed to it; Mixtral-shaped H=1024, I=2816,
bf16 weights), times
  lynx.moe_experts                 the fused op (gate/up, activation, down) for that expert
  ATen / oneDNN                    the three GEMMs as torch.mm on bf16 (what transformers' grouped_mm runs)
  Inductor max-autotune            the same three GEMMs as a frozen module (freezing=True: weights are
                                   constants, which Inductor's CPU GEMM template needs) compiled with
                                   mode="max-autotune": the C++ GEMM template with its generated
                                   micro-kernel (codegen/cpp_micro_gemm.py: FP32 vec on AVX2/AVX-512,
                                   AVX512-bf16 and AMX where the CPU has them) against ATen; the
                                   kernel it kept is recorded. Without freezing it keeps ATen's mm.
and prints ms per expert and GB/s of weights read. Writes bench/results/bench_library_gemm.json
and .md.
"""

from __future__ import annotations

import json
import pathlib
import sys

import torch
from torch._inductor.utils import run_and_get_code

from lynx_compile import machine
from lynx_compile.lowering.kernels.moe_experts_cpu import moe_experts_cpu
from lynx_compile.lowering.moe_experts_reference import ExpertWeights

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import RESULTS, time_call  # noqa: E402

HIDDEN, INTER = 1024, 2816


class Expert(torch.nn.Module):
    """One SwiGLU expert as a module, so that Inductor's freezing can treat its weights as constants."""

    def __init__(self, w_gate, w_up, w_down):
        super().__init__()
        self.w_gate, self.w_up, self.w_down = (torch.nn.Parameter(w, requires_grad=False)
                                               for w in (w_gate, w_up, w_down))

    def forward(self, x):
        return three_gemms(x, self.w_gate, self.w_up, self.w_down)


def three_gemms(x, w_gate, w_up, w_down):  # x (n, H); w_gate/w_up (I, H); w_down (H, I)
    gate, up = x @ w_gate.t(), x @ w_up.t()  # (n, I)
    return (torch.nn.functional.silu(gate) * up) @ w_down.t()  # (n, H)


def main():
    info = machine.describe()
    print(f"machine: {info}")
    torch.manual_seed(0)
    w_gate = (torch.randn(INTER, HIDDEN) * HIDDEN ** -0.5).bfloat16()
    w_up = (torch.randn(INTER, HIDDEN) * HIDDEN ** -0.5).bfloat16()
    w_down = (torch.randn(HIDDEN, INTER) * INTER ** -0.5).bfloat16()
    weight_bytes = 3 * HIDDEN * INTER * 2
    rows = []
    with torch.no_grad():
        for n in (1, 4, 16):
            x = torch.randn(n, HIDDEN).bfloat16()
            ids, weights = torch.zeros(n, 1, dtype=torch.int64), torch.ones(n, 1)
            lynx_ms = time_call(lambda: moe_experts_cpu(x, weights, ids, ExpertWeights(w_gate[None], w_up[None], w_down[None], None, None, None, "silu")), repeats=20)
            aten_ms = time_call(lambda: three_gemms(x, w_gate, w_up, w_down), repeats=20)
            torch._dynamo.reset()
            with torch._inductor.config.patch(freezing=True):
                tuned = torch.compile(Expert(w_gate, w_up, w_down), mode="max-autotune", dynamic=False)
                _, [code] = run_and_get_code(tuned, x)
            inductor_ms = time_call(lambda: tuned(x), repeats=20)
            row = {"tokens": n, "lynx_ms": lynx_ms, "aten_onednn_ms": aten_ms, "inductor_max_autotune_ms": inductor_ms,
                   "inductor_kernel": "cpp_gemm_template" if "micro_gemm" in code else "aten"}
            row.update({f"{key[:-3]}_gbs": weight_bytes / (value * 1e-3) / 1e9 for key, value in list(row.items())
                        if key.endswith("_ms")})
            row.update({f"lynx_vs_{key[:-3]}": value / lynx_ms for key, value in list(row.items())
                        if key.endswith("_ms") and key != "lynx_ms"})
            rows.append(row)
            print({key: round(value, 2) if isinstance(value, float) else value for key, value in row.items()},
                  flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_library_gemm.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    (RESULTS / "bench_library_gemm.md").write_text(markdown(info, rows))


def markdown(info: dict, rows: list[dict]) -> str:
    lines = [f"One Mixtral-shaped expert (H={HIDDEN}, I={INTER}, bf16 weights, {3 * HIDDEN * INTER * 2 / 1e6:.1f} MB); "
             f"{info['vector_isa']}, {info['cores']} cores, {info['threads']} threads, "
             f"read bandwidth {info['read_bandwidth_gbs']} GB/s.", "",
             "| tokens | lynx.moe_experts ms (GB/s) | ATen/oneDNN ms (GB/s) | Inductor max-autotune ms (GB/s), kernel "
             "| lynx speedup vs ATen / Inductor |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['lynx_ms']:.2f} ({r['lynx_gbs']:.1f}) | {r['aten_onednn_ms']:.2f} "
                     f"({r['aten_onednn_gbs']:.1f}) | {r['inductor_max_autotune_ms']:.2f} "
                     f"({r['inductor_max_autotune_gbs']:.1f}), {r['inductor_kernel']} | "
                     f"{r['lynx_vs_aten_onednn']:.2f}x / {r['lynx_vs_inductor_max_autotune']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
