"""Decode-step latency of the MoE routing forms lynx reached last (issue 18): default Inductor,
lynx with policy none, lynx's defaults (selection and the fused expert op), per form, one block.

    python bench/bench_routing_forms.py            # B = 16 and 32, ~6 min on 2 cores
    python bench/bench_routing_forms.py --quick    # B = 32, fewer repeats

Forms (each transformers' own block class where one exists, tiny-model code otherwise):

  deepseek_v2      DeepseekV2Moe, group-limited router whose group mask fills 0.0 (+ shared expert)
  phimoe           PhimoeSparseMoeBlock: the sparse mixer, 2 rounds of max + mask, no top-k
  longcat_zero     LongcatFlashMoE with zero-compute experts (E real + Z that do no work)
  dense_dispatch   gpt-fast-style MoE that runs every expert for every token and weighs them by a
                   (T, E) matrix scattered from the top-k

bf16 weights, random, routers with a trained-like spread (`common.spread_routers` scale), hidden
1024, expert intermediate 1024, 16 routed experts. Every variant runs in this process, in
interleaved rounds (medians); ratios are between variants of the same run. Writes bench/results/bench_routing_forms.<cpu features>.{json,md}.
"""

from __future__ import annotations

import json
import statistics

import torch
import transformers

import lynx_compile
from common import RESULTS, ROUTER_LOGIT_STD, machine_line, per_isa, start, time_call

HIDDEN, INTER, EXPERTS = 1024, 1024, 16


class DenseDispatchMoE(torch.nn.Module):
    """Every expert for every token, weighed by the top-k scattered into a dense (T, E) matrix.

    Legend: T tokens, D hidden, I intermediate, E experts, A activated (k)."""

    def __init__(self, dim=HIDDEN, intermediate=INTER, num_experts=EXPERTS, activated=4):
        super().__init__()
        self.gate = torch.nn.Linear(dim, num_experts, bias=False)
        self.w1 = torch.nn.Parameter(torch.randn(num_experts, intermediate, dim) * 0.02)  # (E, I, D)
        self.w2 = torch.nn.Parameter(torch.randn(num_experts, dim, intermediate) * 0.02)  # (E, D, I)
        self.w3 = torch.nn.Parameter(torch.randn(num_experts, intermediate, dim) * 0.02)  # (E, I, D)
        self.activated = activated

    def forward(self, x):  # (B, S, D)
        batch, seq, dim = x.shape
        flat = x.view(-1, dim)  # (T, D)
        scores = torch.softmax(self.gate(flat), dim=-1)  # (T, E)
        weights, indices = torch.topk(scores, self.activated, dim=-1)  # (T, A)
        dense = torch.zeros_like(scores).scatter(1, indices, weights / weights.sum(-1, keepdim=True))  # (T, E)
        x1 = torch.nn.functional.silu(torch.einsum("td,eid->tei", flat, self.w1))  # (T, E, I)
        x3 = torch.einsum("td,eid->tei", flat, self.w3)  # (T, E, I)
        out = torch.einsum("tei,edi->ted", x1 * x3, self.w2)  # (T, E, D)
        return torch.einsum("ted,te->td", out, dense.to(out.dtype)).view(batch, seq, dim)  # (T, D)


def _transformers_block(make_config, block_class):
    config = make_config()
    config._experts_implementation = "grouped_mm"
    return block_class(config)


def blocks() -> dict[str, torch.nn.Module]:
    from transformers.models.deepseek_v2 import modeling_deepseek_v2
    from transformers.models.longcat_flash import modeling_longcat_flash
    from transformers.models.phimoe import modeling_phimoe

    return {
        "deepseek_v2": _transformers_block(lambda: transformers.DeepseekV2Config(
            hidden_size=HIDDEN, moe_intermediate_size=INTER, n_routed_experts=EXPERTS, num_experts_per_tok=4,
            n_group=4, topk_group=2, topk_method="group_limited_greedy", n_shared_experts=1),
            modeling_deepseek_v2.DeepseekV2Moe),
        "phimoe": _transformers_block(lambda: transformers.PhimoeConfig(
            hidden_size=HIDDEN, intermediate_size=INTER, num_local_experts=EXPERTS, num_experts_per_tok=2),
            modeling_phimoe.PhimoeSparseMoeBlock),
        "longcat_zero": _transformers_block(lambda: transformers.LongcatFlashConfig(
            hidden_size=HIDDEN, expert_ffn_hidden_size=INTER, n_routed_experts=EXPERTS, moe_topk=4,
            zero_expert_num=4), modeling_longcat_flash.LongcatFlashMoE),
        "dense_dispatch": DenseDispatchMoE(),
    }


def prepare(block: torch.nn.Module) -> torch.nn.Module:
    """bf16, small expert weights, routers (the 2-D weights of E or E + Z rows) with a trained-like
    logit spread."""
    for param in block.parameters():
        rows = param.shape[0]
        if param.dim() == 2 and rows in (EXPERTS, EXPERTS + 4) and param.shape[1] == HIDDEN:
            torch.nn.init.normal_(param, std=ROUTER_LOGIT_STD / HIDDEN ** 0.5)
        elif param.dim() >= 2:
            torch.nn.init.normal_(param, std=0.02)
    return block.to(torch.bfloat16).eval()


def measure(name: str, block: torch.nn.Module, batches: list[int], rounds: int, repeats: int) -> list[dict]:
    """Per B: each variant's median over `rounds` interleaved rounds of `repeats` calls (the
    variants take turns, so a slow spell of the machine hits all of them alike)."""
    torch._dynamo.reset()
    variants = {"inductor": torch.compile(block),  # one process, three backends side by side
                "lynx_none": torch.compile(block, backend="lynx", options={"policy": "none"}),
                "lynx": torch.compile(block, backend="lynx")}
    rows = []
    for batch in batches:
        hidden = torch.randn(batch, 1, HIDDEN, generator=torch.Generator().manual_seed(batch)).to(torch.bfloat16)
        row = {"form": name, "batch": batch}
        with torch.no_grad():
            samples = {variant: [] for variant in variants}
            for _ in range(rounds):
                for variant, compiled in variants.items():
                    samples[variant].append(time_call(compiled, hidden, repeats=repeats))
            for variant in variants:
                row[f"{variant}_ms"] = round(statistics.median(samples[variant]), 3)
            with lynx_compile.record(block) as recorder:
                variants["lynx"](hidden)
        [summary] = recorder.summary().values()
        row["experts_before"], row["experts_after"] = summary["experts_before"], summary["experts_after"]
        row["speedup"] = round(row["inductor_ms"] / row["lynx_ms"], 3)
        rows.append(row)
        print(f"{name:15s} B={batch:3d}  inductor {row['inductor_ms']:7.2f} ms  lynx none {row['lynx_none_ms']:7.2f}  "
              f"lynx {row['lynx_ms']:7.2f} ({row['speedup']:.2f}x)  experts {row['experts_before']:.0f} -> "
              f"{row['experts_after']:.0f}", flush=True)
    return rows


def markdown(info: dict, rows: list[dict]) -> str:
    lines = [machine_line(info), "",
             "| form | B | default Inductor ms | lynx policy none ms | lynx ms | speedup | experts plain -> lynx |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['form']} | {r['batch']} | {r['inductor_ms']:.2f} | {r['lynx_none_ms']:.2f} | "
                     f"{r['lynx_ms']:.2f} | {r['speedup']:.2f}x | {r['experts_before']:.0f} -> {r['experts_after']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    args, info = start(__doc__)
    batches, rounds = ([32], 3) if args.quick else ([16, 32], 7)
    torch.manual_seed(0)
    rows = [row for name, block in blocks().items() for row in measure(name, prepare(block), batches, rounds, 5)]
    stem = per_isa("bench_routing_forms", info)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(info, rows) + "\n")
    print(f"wrote {RESULTS / stem}.json and .md")


if __name__ == "__main__":
    main()
