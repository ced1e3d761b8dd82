"""A decode step of a full-size MoE model on this CPU: OLMoE-1B-7B's configuration, random bf16 weights.

    python bench/bench_real_model.py            # B in 1, 4, 16, 64 (~30 min on 2 cores, ~15 GB of memory)
    python bench/bench_real_model.py --quick    # B in 1, 16
    make bench-real

The figure a CPU user asks for: how long one decode step of a real-sized MoE model takes, and how
much of it selection saves. OLMoE-1B-7B's shape (transformers' OlmoeConfig: 16 layers, H=2048,
E=64, k=8, expert intermediate 1024, 16 heads, vocabulary 50304): ~6.9 B parameters, 13.8 GB in
bf16, of which the experts are 12.9 GB, far past any cache, so each step reads its experts from
memory. Nothing is downloaded: the model is built on the meta device and materialized in bf16 in
place (peak memory is the model, not an fp32 copy of it).

Weights are random (normal, std 0.02; routers with trained-like spread and a batch-shared hidden
component, as bench_decode_model.py does), so what selection drops is synthetic; accuracy on
trained checkpoints is `lynx-compile eval`'s job. Each step feeds B sequences one token against a
KV cache of 256 tokens (cropped back after every step). Variants, compiled side by side in this
process and timed in interleaved rounds (one step of each per round; median of 5 rounds):
  inductor             default torch.compile (transformers' grouped_mm experts: oneDNN GEMMs per expert)
  lynx:none            backend="lynx", policy none (nothing selected, so experts="auto" keeps the
                       model's dispatch: default Inductor's graph, checked bit for bit)
  lynx:default         backend="lynx", the default options (moved_mass selection)
Per row: step ms, speedup over inductor, distinct experts read per step (all 16 layers, from
lynx_compile.record), and the bandwidth share of the whole step: (bytes of the non-expert weights
a step reads + the experts read + the KV cache once) / read bandwidth measured in this run / step
time.
Writes bench/results/bench_real_model.<cpu features>.{json,md,png}.
"""

from __future__ import annotations

import gc
import statistics
import time

import torch
import transformers

import lynx_compile
from bench_decode_model import CACHE_TOKENS, decode_step, head_dim, shared_embedding_component, step_inputs
from common import RESULTS, machine_line, per_isa, pyplot, save_results, spread_routers, start, time_call

OLMOE_1B_7B = dict(hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
                   num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16, vocab_size=50304,
                   max_position_embeddings=4096, norm_topk_prob=False)
VARIANTS = {"inductor": None, "lynx:none": {"policy": "none"}, "lynx:default": {}}


def build(shape: dict = OLMOE_1B_7B) -> torch.nn.Module:
    """An OlmoeForCausalLM of `shape` (OLMoE-1B-7B's by default) with random bf16 weights,
    materialized in place: no fp32 copy, no download."""
    config = transformers.OlmoeConfig(**shape)
    config._experts_implementation = "grouped_mm"  # transformers' default, set by from_pretrained
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(std=0.02)
    spread_routers(model, config.hidden_size)
    # Non-persistent buffers (rotary frequencies) are left empty by to_empty: build them again.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    shared_embedding_component(model)
    return model.eval()


def step_bytes(model, experts_read: int, batch: int) -> int:
    """Bytes one decode step must read: every weight but the experts and the embedding table (B
    rows of it), the experts read, and the KV cache once (attention reads each cached key and
    value; DynamicCache's concatenation copies it again, which is not counted)."""
    config = model.config
    expert_bytes = 3 * config.intermediate_size * config.hidden_size * 2  # gate, up, down; bf16
    dense = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                if p.dim() != 3 and "embed_tokens" not in n)
    cache = 2 * config.num_hidden_layers * batch * config.num_key_value_heads * CACHE_TOKENS * head_dim(config) * 2
    return dense + experts_read * expert_bytes + cache


def run(model, batches, repeats, bandwidth) -> list[dict]:
    """Every variant compiled side by side, then per B timed in interleaved rounds (one step of
    each variant per round, median over rounds): a variant's place in the order does not bias it
    (timed one after another, the first variant measured up to 1.4x slower with the same graph)."""
    functions = {variant: torch.compile(model) if options is None else
                 torch.compile(model, backend="lynx", options=options) for variant, options in VARIANTS.items()}
    rows = []
    with torch.no_grad():
        for batch in batches:
            row = {"case": "olmoe-1b-7b-shaped", "batch": batch}
            inputs = step_inputs(model, batch)  # shared: every step crops the cache back to where it was
            logits = {}
            for variant, function in functions.items():  # compile (or recompile for this B) and warm up
                for _ in range(2):
                    logits[variant] = decode_step(function, inputs).logits  # (B, 1, vocab)
            samples = {variant: [] for variant in VARIANTS}
            for _ in range(repeats):
                for variant, function in functions.items():
                    begin = time.perf_counter()
                    decode_step(function, inputs)
                    samples[variant].append((time.perf_counter() - begin) * 1e3)
            for variant, options in VARIANTS.items():
                row[f"{variant}_ms"] = statistics.median(samples[variant])
                if options is not None:
                    with lynx_compile.record(model) as recorded:
                        decode_step(functions[variant], inputs)
                    summary = recorded.summary(decode_only=True).values()
                    row[f"{variant}_experts"] = sum(s["experts_after"] for s in summary)
                    row["plain_experts"] = sum(s["experts_before"] for s in summary)
                print(f"B={batch} {variant} {row[f'{variant}_ms']:.1f} ms", flush=True)
            row["inductor_experts"] = row["plain_experts"]
            # policy none under experts="auto" keeps the model's dispatch: default Inductor's graph
            row["lynx:none_equals_inductor"] = bool(torch.equal(logits["lynx:none"], logits["inductor"]))
            # random weights: 50k nearly tied logits, so the argmax flips easily (not an accuracy figure)
            row["lynx:default_top1_agreement"] = float(
                (logits["lynx:default"].argmax(-1) == logits["inductor"].argmax(-1)).float().mean())
            for variant in VARIANTS:
                row[f"{variant}_speedup"] = row["inductor_ms"] / row[f"{variant}_ms"]
                read = step_bytes(model, row[f"{variant}_experts"], batch)
                row[f"{variant}_bandwidth_share"] = read / (bandwidth * 1e9) / (row[f"{variant}_ms"] / 1e3)
            rows.append(row)
            del inputs, logits
            gc.collect()
    return rows


def markdown(rows, info) -> str:
    lines = [machine_line(info), "",
             "| B | " + " | ".join(f"{v} ms (speedup)" for v in VARIANTS) + " | experts/step plain -> default | "
             + " | ".join(f"{v} bandwidth share" for v in VARIANTS) + " |",
             "| --- | " + " | ".join("---" for _ in VARIANTS) + " | --- | " + " | ".join("---" for _ in VARIANTS) + " |"]
    for r in rows:
        lines.append(f"| {r['batch']} | " + " | ".join(f"{r[f'{v}_ms']:.0f} ({r[f'{v}_speedup']:.2f}x)" for v in VARIANTS)
                     + f" | {r['plain_experts']} -> {r['lynx:default_experts']} | "
                     + " | ".join(f"{r[f'{v}_bandwidth_share']:.0%}" for v in VARIANTS) + " |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    for variant in VARIANTS:
        axis.plot([r["batch"] for r in rows], [r[f"{variant}_ms"] for r in rows], marker="o", label=variant)
    axis.set(title="OLMoE-1B-7B-shaped decode step (random bf16 weights)", xlabel="batch size B",
             ylabel="ms per step", xscale="log")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main():
    args, info = start(__doc__)
    batches = (1, 16) if args.quick else (1, 4, 16, 64)
    model = build()
    rows = run(model, batches, repeats=5, bandwidth=info["read_bandwidth_gbs"])
    stem = per_isa("bench_real_model", info)
    save_results(stem, info, rows, plot)
    (RESULTS / f"{stem}.md").write_text(markdown(rows, info))
    print(markdown(rows, info))


if __name__ == "__main__":
    main()
