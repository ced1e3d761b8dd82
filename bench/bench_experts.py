"""Expert compute: lynx.moe_experts vs transformers' experts implementations under Inductor.

    python bench/bench_experts.py            # B in 1, 8, 16, 32, 64; ~20 min on 2 cores (mostly compiling)
    python bench/bench_experts.py --quick    # B in 1, 16

Two MoE blocks, bf16, random weights: Mixtral-shaped (H=1024, I=2816, E=8, k=2) and fine-grained
(H=1024, I=512, E=64, k=8). Routers are skewed the way trained routers look inside one decode
batch: each token's hidden state shares a component that raises three experts' logits, so
top-1s concentrate and the second choices are diverse, weak leftovers (what AffinityBinning remaps).

Per batch size B, every variant runs in this process, one after another:
  inductor:grouped_mm / inductor:batched_mm   default Inductor, transformers' two implementations
  lynx:none+fused        policy none, dispatch replaced by lynx.moe_experts (same routing)
  lynx:binning+keep      AffinityBinning, transformers' grouped_mm dispatch kept
  lynx:binning+fused     AffinityBinning + lynx.moe_experts (experts="fused")
  lynx:binning+auto      AffinityBinning, experts="auto" (the default) decides the dispatch
                         on this CPU (`*_ran_fused_op` records which ran)
  (Mixtral block) eager experts loop under Inductor, with and without AffinityBinning, in a
  sweep of their own after a Dynamo reset (see run_case)
Each fused variant is checked to run lynx.moe_experts (`*_ran_fused_op`). Per row:
  (a) the fused op alone on that batch's routing against the read-bandwidth limit (bytes of the
      experts present / bandwidth measured in this run), beside transformers' grouped_mm experts
      on the same routing (oneDNN GEMMs via ATen: the library the op replaces);
  (b) selection's own effect: time(none+fused) / time(binning+fused) next to the experts ratio.
The whole-model decode step (c) is bench/bench_decode_model.py.
Writes bench/results/bench_experts.<cpu features>.{json,md,png} (one table per ISA met); the machine
(ISA, kernel path) with them.
"""

from __future__ import annotations

import statistics

import torch

import lynx_compile
from common import RESULTS, machine_line, mixtral_block, per_isa, pyplot, save_results, start, time_call
from lynx_compile.lowering.kernels.moe_experts_cpu import moe_experts_cpu
from lynx_compile.lowering.moe_experts_reference import ExpertWeights

SKEW_LOGITS = 2.0  # how far the shared component raises the favoured experts' logits
FAVOURED = (0, 1, 2)


def skew_direction(router_weight: torch.Tensor) -> torch.Tensor:
    """A hidden-state direction that raises the favoured experts' logits by ~SKEW_LOGITS."""
    rows = router_weight.float()[list(FAVOURED)]  # (3, H)
    direction = torch.linalg.lstsq(rows, torch.full((len(FAVOURED),), SKEW_LOGITS)).solution
    return direction.to(router_weight.dtype)  # (H,)


def set_experts_impl(module, impl):
    for sub in module.modules():
        if hasattr(sub, "config") and hasattr(sub.config, "_experts_implementation"):
            sub.config._experts_implementation = impl


VARIANTS = {  # name: (experts implementation, lynx options or None for default Inductor)
    "inductor:grouped_mm": ("grouped_mm", None),
    "inductor:batched_mm": ("batched_mm", None),
    "lynx:none+fused": ("grouped_mm", {"policy": "none", "experts": "fused"}),
    "lynx:binning+keep": ("grouped_mm", {"policy": "affinity_binning", "experts": "keep"}),
    "lynx:binning+fused": ("grouped_mm", {"policy": "affinity_binning", "experts": "fused"}),
    "lynx:binning+auto": ("grouped_mm", {"policy": "affinity_binning"}),
    "inductor:eager-loop": ("eager", None),
    "lynx:binning+eager-loop": ("eager", {"policy": "affinity_binning"}),
}


def compiled(module, options):
    if options is None:
        return torch.compile(module)
    return torch.compile(module, backend="lynx", options=options)


def run_case(name, module, make_input, batches, repeats, variants, fused_op_inputs=None, bandwidth=None):
    """Every variant at every B. Variants with transformers' `eager` experts loop run in a sweep of
    their own after a Dynamo reset: the loop graph-breaks at the block's call into the experts,
    Dynamo keeps that split for the block's frame (its guards do not read the experts
    implementation), and a later variant with the same backend and options would reuse it and
    never see routing and dispatch in one graph (the unfused 'binning + fused' rows of the
    2026-11-29 run)."""
    by_batch = {batch: {"case": name, "batch": batch} for batch in batches}
    for sweep in split_sweeps(variants):
        torch._dynamo.reset()
        functions = {variant: compiled(module, VARIANTS[variant][1]) for variant in sweep}
        with torch.no_grad():
            for batch in batches:
                inputs = make_input(batch)
                row = by_batch[batch]
                for variant in sweep:
                    set_experts_impl(module, VARIANTS[variant][0])
                    row[f"{variant}_ms"] = time_call(functions[variant], inputs, repeats=repeats)
                    if "fused" in variant or variant.endswith("+auto"):
                        row[f"{variant}_ran_fused_op"] = runs_fused_op(functions[variant], inputs)
                set_experts_impl(module, "grouped_mm")
                if "lynx:binning+fused" in sweep:
                    with lynx_compile.record() as rec:
                        functions["lynx:binning+fused"](inputs)
                    summary = list(rec.summary().values())
                    row["experts_before"] = statistics.mean(s["experts_before"] for s in summary)
                    row["experts_after"] = statistics.mean(s["experts_after"] for s in summary)
    rows = []
    for row in by_batch.values():
        baseline = min(row["inductor:grouped_mm_ms"], row["inductor:batched_mm_ms"])
        row["best_transformers_ms"] = baseline
        for variant in variants:
            row[f"{variant}_speedup"] = baseline / row[f"{variant}_ms"]
        # (b) selection's own effect: time(none + fused) / time(binning + fused) vs the experts ratio
        row["selection_time_ratio"] = row["lynx:none+fused_ms"] / row["lynx:binning+fused_ms"]
        row["selection_experts_ratio"] = row["experts_before"] / max(row["experts_after"], 1e-9)
        if fused_op_inputs is not None:
            with torch.no_grad():
                row.update(fused_op_alone(module, make_input(row["batch"]), fused_op_inputs, bandwidth, repeats))
        rows.append(row)
        print(format_row(row, variants), flush=True)
    return rows


def split_sweeps(variants):
    """The variants in two sweeps: the model's own dispatch in one graph, then the eager loop."""
    loop = [v for v in variants if VARIANTS[v][0] == "eager"]
    return [sweep for sweep in ([v for v in variants if v not in loop], loop) if sweep]


def runs_fused_op(function, inputs) -> bool:
    """Whether one call of `function` executes lynx.moe_experts (so a timing is never mislabelled)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        function(inputs)
    return any(event.name == "lynx::moe_experts" for event in profile.events())


def fused_op_alone(block, inputs, weights, bandwidth, repeats):
    """(a) lynx.moe_experts on this batch's plain top-k routing, against the read-bandwidth limit
    (bytes of the experts present / bandwidth measured in this run), and the library it replaces:
    transformers' grouped_mm experts on the same routing (one oneDNN GEMM per expert, via ATen)."""
    hidden = inputs.view(-1, inputs.shape[-1])
    _, routing_weights, ids = block.gate(hidden)
    present = ids.unique().numel()
    w_gate, w_up, w_down = weights
    bytes_read = present * (w_gate[0].numel() + w_up[0].numel() + w_down[0].numel()) * w_gate.element_size()
    ms = time_call(lambda: moe_experts_cpu(hidden, routing_weights, ids, ExpertWeights(w_gate, w_up, w_down, None, None, None, "silu")), repeats=repeats)
    set_experts_impl(block, "grouped_mm")
    library_ms = time_call(lambda: block.experts(hidden, ids, routing_weights), repeats=repeats)
    limit_ms = bytes_read / (bandwidth * 1e9) * 1e3
    return {"op_ms": ms, "op_experts": present, "bandwidth_limit_ms": limit_ms,
            "op_bandwidth_fraction": limit_ms / ms, "library_grouped_mm_ms": library_ms,
            "library_bandwidth_fraction": limit_ms / library_ms}


def format_row(row, variants):
    cells = [f"{row['case']:<13}", f"{row['batch']:>3}"]
    cells += [f"{row[f'{v}_ms']:>8.2f} ({row[f'{v}_speedup']:.2f}x)" for v in variants]
    cells.append(f"{row['experts_before']:>5.1f} -> {row['experts_after']:<5.1f}")
    cells.append(f"selection {row['selection_time_ratio']:.2f}x time for {row['selection_experts_ratio']:.2f}x experts")
    if "op_ms" in row:
        cells.append(f"op {row['op_ms']:.2f} ms ({row['op_bandwidth_fraction']:.0%} of bandwidth), "
                     f"grouped_mm {row['library_grouped_mm_ms']:.2f} ms, limit {row['bandwidth_limit_ms']:.2f} ms")
    unfused = [v for v in variants if "fused" in v and row.get(f"{v}_ran_fused_op") is False]
    if unfused:
        cells.append(f"WARNING: {', '.join(unfused)} did not run lynx.moe_experts")
    return " ".join(cells)


def markdown(rows, info) -> str:
    """The tables of docs/benchmarks.md: per block, every variant (ms and speedup) plus (a) and (b)."""
    lines = [machine_line(info)]
    for case in dict.fromkeys(r["case"] for r in rows):
        case_rows = [r for r in rows if r["case"] == case]
        variants = [v for v in VARIANTS if f"{v}_ms" in case_rows[0]]
        header = ["B", *variants, "experts top-k -> binning", "(b) time ratio none/binning", "(a) op ms",
                  "(a) op % of bandwidth", "grouped_mm alone ms", "bandwidth limit ms"]
        lines += ["", f"**{case}**", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for r in case_rows:
            cells = [str(r["batch"])]
            for v in variants:
                mark = "" if r.get(f"{v}_ran_fused_op", True) or "fused" not in v else " (not fused!)"
                if v.endswith("+auto") and f"{v}_ran_fused_op" in r:
                    mark = " fused" if r[f"{v}_ran_fused_op"] else " kept"
                cells.append(f"{r[f'{v}_ms']:.1f} ({r[f'{v}_speedup']:.2f}x){mark}")
            cells.append(f"{r['experts_before']:.1f} -> {r['experts_after']:.1f}")
            cells.append(f"{r['selection_time_ratio']:.2f}x for {r['selection_experts_ratio']:.2f}x")
            if "op_ms" in r:
                cells += [f"{r['op_ms']:.2f}", f"{r['op_bandwidth_fraction']:.0%}", f"{r['library_grouped_mm_ms']:.2f}",
                          f"{r['bandwidth_limit_ms']:.2f}"]
            else:
                cells += ["-"] * 4
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    plt = pyplot()
    cases = list(dict.fromkeys(r["case"] for r in rows))
    fig, axes = plt.subplots(1, len(cases), figsize=(6 * len(cases), 4.5), squeeze=False)
    for axis, case in zip(axes[0], cases):
        case_rows = [r for r in rows if r["case"] == case]
        batches = [r["batch"] for r in case_rows]
        for variant in VARIANTS:
            if f"{variant}_ms" in case_rows[0]:
                axis.plot(batches, [r[f"{variant}_ms"] for r in case_rows], marker="o", label=variant)
        if "bandwidth_limit_ms" in case_rows[0]:
            axis.plot(batches, [r["bandwidth_limit_ms"] for r in case_rows], "k--", label="read-bandwidth limit")
        axis.set(title=case, xlabel="decode batch size B", ylabel="ms per call", xscale="log", yscale="log")
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    args, info = start(__doc__)
    batches = (1, 16) if args.quick else (1, 8, 16, 32, 64)
    repeats = 5
    bandwidth = info["read_bandwidth_gbs"]
    block_variants = list(VARIANTS)
    fine_variants = [v for v in VARIANTS if "eager-loop" not in v]  # a 64-expert Python loop: slow to compile
    rows = []
    for name, shape, variants in (("mixtral-block", (1024, 2816, 8, 2), block_variants),
                                  ("fine-block", (1024, 512, 64, 8), fine_variants)):
        torch.manual_seed(0)
        block = mixtral_block(*shape)
        skew = skew_direction(block.gate.weight)
        experts = block.experts
        inter = shape[1]
        weights = (experts.gate_up_proj[:, :inter], experts.gate_up_proj[:, inter:], experts.down_proj)
        print(f"\n{name} (H, I, E, k) = {shape}; ms per call (speedup vs the best default-Inductor implementation)")
        print("variants:", ", ".join(variants))
        make_input = (lambda b, s=skew, h=shape[0]: torch.randn(b, 1, h, dtype=torch.bfloat16) + s)
        rows += run_case(name, block, make_input, batches, repeats, variants, weights, bandwidth)
        torch._dynamo.reset()

    stem = per_isa("bench_experts", info)
    save_results(stem, info, rows, plot)
    (RESULTS / f"{stem}.md").write_text(markdown(rows, info))


if __name__ == "__main__":
    main()
