"""Which expert compute `experts="auto"` should pick, per CPU ISA: lynx.moe_experts alone against
transformers' `grouped_mm` experts (one oneDNN GEMM per expert via ATen) on the same routing.

    python bench/bench_expert_kernels.py            # B in 1, 4, 16, 32, 64; ~3 min on 2 cores
    python bench/bench_expert_kernels.py --quick    # B in 1, 16

The ISAs a session's machine lacks cannot be run, but the ones below it can be imitated: each ISA
level runs in a process of its own with oneDNN capped by ONEDNN_MAX_CPU_ISA (what the library
would dispatch to on such a CPU) and lynx's kernel on that ISA's path (LYNX_CPU_KERNEL):

  level              oneDNN cap          lynx kernel path
  AMX                (none)              auto (brgemm through ATen: AMX tiles), and bf16dot beside it
  AVX512_BF16        AVX512_CORE_BF16    bf16dot (vdpbf16ps)
  AVX-512            AVX512_CORE         lanes16 (fp32 FMA, bf16 widened)
  AVX2               AVX2                lanes8 (AVX2 intrinsics)

Levels above the machine's own are skipped. The imitation keeps this machine's cores, caches and
memory, and the kernel's build flags are still this CPU's (only its path changes): it answers
"which implementation is faster on that instruction set", not "how fast is such a machine".

Blocks: bf16, random weights, skewed routers (bench_experts.py's blocks): Mixtral-shaped (H=1024,
I=2816, E=8, k=2) and fine-grained (H=1024, I=512, E=64, k=8). The bandwidth share = bytes of the
experts present / read bandwidth measured in the run / op time; repeated calls on the same weights
can hit a large last-level cache, so shares above 100% appear at small B (a real model's layers do
not fit: bench_real_model.py measures that).
Writes bench/results/bench_expert_kernels.<cpu features>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from common import RESULTS, mixtral_block, per_isa, pyplot, time_call

LEVELS = {  # level: (ONEDNN_MAX_CPU_ISA or None, lynx kernel paths, what the CPU must have)
    "AMX": (None, ("auto", "bf16dot"), "amx"),
    "AVX512_BF16": ("AVX512_CORE_BF16", ("bf16dot",), "bf16"),
    "AVX-512": ("AVX512_CORE", ("lanes16",), "AVX512"),
    "AVX2": ("AVX2", ("lanes8",), "AVX2"),
}
BLOCKS = {"mixtral-block": (1024, 2816, 8, 2), "fine-block": (1024, 512, 64, 8)}


def cpu_has(feature: str) -> bool:
    from lynx_compile.lowering.kernels.choice import cpu_features

    features = cpu_features()
    return feature in features.split("+") or (feature == "AVX2" and features.startswith(("AVX2", "AVX512")))


def measure_level(level: str, batches, repeats: int, blocks: dict = BLOCKS) -> list[dict]:
    """In this process (started with the level's ONEDNN_MAX_CPU_ISA): every block and B.
    blocks: name -> (H, I, E, k)."""
    from bench_experts import set_experts_impl, skew_direction
    from lynx_compile.lowering.kernels import moe_experts_cpu as kernel
    from lynx_compile.lowering.moe_experts_reference import ExpertWeights
    from lynx_compile.machine import measure_read_bandwidth

    bandwidth = measure_read_bandwidth()
    rows = []
    for name, (hidden_size, inter, num_experts, top_k) in blocks.items():
        torch.manual_seed(0)
        block = mixtral_block(hidden_size, inter, num_experts, top_k)
        skew = skew_direction(block.gate.weight)
        experts = block.experts
        weights = ExpertWeights(experts.gate_up_proj[:, :inter], experts.gate_up_proj[:, inter:], experts.down_proj,
                                None, None, None, "silu")
        set_experts_impl(block, "grouped_mm")
        for batch in batches:
            hidden = torch.randn(batch, hidden_size, dtype=torch.bfloat16) + skew  # (B, H)
            with torch.no_grad():
                _, routing_weights, ids = block.gate(hidden)
                present = ids.unique().numel()
                limit_ms = present * 3 * inter * hidden_size * 2 / (bandwidth * 1e9) * 1e3
                row = {"level": level, "block": name, "batch": batch, "experts_present": present,
                       "bandwidth_gbs": round(bandwidth, 1), "bandwidth_limit_ms": limit_ms,
                       "grouped_mm_ms": time_call(lambda: experts(hidden, ids, routing_weights), repeats=repeats)}
                library = experts(hidden, ids, routing_weights).float()  # (B, H): what lynx must equal
                for path in LEVELS[level][1]:
                    os.environ["LYNX_CPU_KERNEL"] = path
                    got = kernel.moe_experts_cpu(hidden, routing_weights, ids, weights).float()
                    row[f"lynx:{path}_relative_error"] = float((got - library).abs().max() / library.abs().max())
                    row[f"lynx:{path}_ms"] = time_call(
                        lambda: kernel.moe_experts_cpu(hidden, routing_weights, ids, weights), repeats=repeats)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def markdown(rows, info) -> str:
    lines = [f"Machine: {info['cpu_features']}, {info['cores']} cores, torch {info['torch']}; each level "
             "imitated with ONEDNN_MAX_CPU_ISA (see the script's docstring). Times in ms, median of the run; "
             "ratio = lynx / grouped_mm (below 1: lynx faster); share = bandwidth limit / lynx time.", ""]
    for level in dict.fromkeys(r["level"] for r in rows):
        paths = LEVELS[level][1]
        lines += [f"**{level}** (oneDNN cap: {LEVELS[level][0] or 'none, native'})", "",
                  "| block | B | experts | grouped_mm | " + " | ".join(f"lynx {p} (ratio, share)" for p in paths) + " |",
                  "| --- | --- | --- | --- | " + " | ".join("---" for _ in paths) + " |"]
        for r in (r for r in rows if r["level"] == level):
            cells = [f"{r[f'lynx:{p}_ms']:.2f} ({r[f'lynx:{p}_ms'] / r['grouped_mm_ms']:.2f}x, "
                     f"{r['bandwidth_limit_ms'] / r[f'lynx:{p}_ms']:.0%})" for p in paths]
            lines.append(f"| {r['block']} | {r['batch']} | {r['experts_present']} | {r['grouped_mm_ms']:.2f} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(rows, path):
    plt = pyplot()
    figure, axes = plt.subplots(1, len(BLOCKS), figsize=(6 * len(BLOCKS), 4))
    for axis, block in zip(axes, BLOCKS):
        for level in dict.fromkeys(r["level"] for r in rows):
            chosen = [r for r in rows if r["level"] == level and r["block"] == block]
            path_name = LEVELS[level][1][0]
            axis.plot([r["batch"] for r in chosen], [r[f"lynx:{path_name}_ms"] / r["grouped_mm_ms"] for r in chosen],
                      marker="o", label=f"{level}: lynx {path_name}")
        axis.axhline(1.0, color="k", linestyle="--", label="grouped_mm (oneDNN)")
        axis.set(title=block, xlabel="batch size B", ylabel="time / grouped_mm time", xscale="log")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer batch sizes and repeats")
    parser.add_argument("--level", choices=list(LEVELS), help="(internal) measure one level in this process")
    args = parser.parse_args()
    batches, repeats = ((1, 16), 3) if args.quick else ((1, 4, 16, 32, 64), 7)
    if args.level:
        print(json.dumps(measure_level(args.level, batches, repeats)))
        return
    from lynx_compile import machine

    info = machine.describe()
    print(f"machine: {info}", flush=True)
    rows = []
    for level, (cap, _, needs) in LEVELS.items():
        if not cpu_has(needs):
            print(f"{level}: skipped (this CPU lacks it)")
            continue
        env = dict(os.environ)
        env.pop("ONEDNN_MAX_CPU_ISA", None)
        if cap:
            env["ONEDNN_MAX_CPU_ISA"] = cap
        command = [sys.executable, __file__, "--level", level] + (["--quick"] if args.quick else [])
        done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=True)
        rows += json.loads(done.stdout.strip().splitlines()[-1])
    RESULTS.mkdir(exist_ok=True)
    stem = per_isa("bench_expert_kernels", info)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    (RESULTS / f"{stem}.md").write_text(markdown(rows, info))
    plot(rows, RESULTS / f"{stem}.png")
    print(markdown(rows, info))


if __name__ == "__main__":
    main()
