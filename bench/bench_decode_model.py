"""Whole-model decode step whose bytes are mostly experts: does step time follow experts read?

    python bench/bench_decode_model.py            # B in 1 4 8 16 32 64, both models (~25 min on 2 cores)
    python bench/bench_decode_model.py --quick    # B in 1 16, both models

Two random-weight bf16 models, 4 layers, hidden 1024, built from transformers' config classes:
  qwen3-moe-shaped   E=64, k=8, expert intermediate 512 (fine-grained)
  mixtral-shaped     E=8,  k=2, expert intermediate 2816 (coarse)
Each decode step feeds B sequences one token against a KV cache of 256 tokens (random keys and
values, as a long prompt would leave them; the cache is cropped back to 256 after every step).
Routers have trained-like spread (bench_moe.spread_routers) plus a hidden-state component shared
by the batch, so top-1s cluster the way Lynx observes inside one batch.

Variants, all in this process, one after another per B:
  inductor            default torch.compile, the faster of transformers' grouped_mm / batched_mm
  lynx:none+fused     policy none + lynx.moe_experts (same routing, lynx's expert kernel)
  lynx:binning+fused  AffinityBinning + lynx.moe_experts (experts="fused", whatever auto would pick)
Distinct experts per step come from lynx_compile.record (summed over the layers). A least-squares
fit of step time against experts read per step, over the lynx rows of each model, gives the cost
per expert and the intercept (everything that does not shrink with experts).
Writes bench/results/bench_decode_model.<cpu features>.{json,md,png} (one table per ISA met).
"""

from __future__ import annotations

import json

import torch
import transformers

import lynx_compile
from common import RESULTS, machine_line, per_isa, pyplot, save_results, spread_routers, start, time_call

CACHE_TOKENS = 256
LAYERS, HIDDEN = 4, 1024
SHARED_COMPONENT = 2.0  # logits the batch-shared hidden component adds to three experts


def build(shape: str, experts_impl: str):
    common = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=16, num_key_value_heads=4,
                  vocab_size=4096, max_position_embeddings=CACHE_TOKENS + 64)
    if shape == "qwen3-moe-shaped":
        config = transformers.Qwen3MoeConfig(moe_intermediate_size=512, num_experts=64, num_experts_per_tok=8,
                                             intermediate_size=2048, head_dim=64, norm_topk_prob=True,
                                             decoder_sparse_step=1, mlp_only_layers=[], **common)
    else:
        config = transformers.MixtralConfig(intermediate_size=2816, num_local_experts=8, num_experts_per_tok=2,
                                            **common)
    config._experts_implementation = experts_impl
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    for name, param in model.named_parameters():
        if param.dim() == 3:  # stacked expert weights
            torch.nn.init.normal_(param, std=0.02)
    spread_routers(model, HIDDEN)
    return model.to(torch.bfloat16).eval()


def shared_embedding_component(model) -> None:
    """Add to every token embedding a direction that raises three experts' logits in layer 0, so a
    batch's top-1s cluster (random embeddings alone make routing uniform)."""
    router = model.model.layers[0].mlp.gate.weight.float()  # (E, H)
    direction = torch.linalg.lstsq(router[:3], torch.full((3,), SHARED_COMPONENT)).solution  # (H,)
    with torch.no_grad():
        model.model.embed_tokens.weight += direction.to(torch.bfloat16)


def head_dim(config) -> int:
    """The attention head size: the config's own, or hidden size / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def step_inputs(model, batch: int) -> dict:
    config = model.config
    cache = transformers.DynamicCache(config=config)
    generator = torch.Generator().manual_seed(batch)
    for layer in range(config.num_hidden_layers):
        kv = [torch.randn(batch, config.num_key_value_heads, CACHE_TOKENS, head_dim(config), generator=generator)
              .to(torch.bfloat16) for _ in range(2)]
        cache.update(*kv, layer)
    ids = torch.randint(0, config.vocab_size, (batch, 1), generator=generator)
    position = torch.full((batch, 1), CACHE_TOKENS)
    return {"input_ids": ids, "past_key_values": cache, "position_ids": position, "use_cache": True}


def decode_step(function, inputs):
    out = function(**inputs)
    inputs["past_key_values"].crop(-1)  # drop the token just cached: the next call sees the same 256
    return out


VARIANTS = {"inductor": None, "lynx:none+fused": {"policy": "none", "experts": "fused"},
            "lynx:binning+fused": {"policy": "affinity_binning", "experts": "fused"}}


def run_model(shape: str, batches, repeats) -> list[dict]:
    rows = {batch: {"case": shape, "batch": batch} for batch in batches}
    for variant, options in VARIANTS.items():
        impls = ("grouped_mm", "batched_mm") if options is None else ("grouped_mm",)
        for impl in impls:
            torch._dynamo.reset()
            model = build(shape, impl)
            shared_embedding_component(model)
            function = torch.compile(model) if options is None else \
                torch.compile(model, backend="lynx", options=options)
            with torch.no_grad():
                for batch in batches:
                    inputs = step_inputs(model, batch)
                    ms = time_call(lambda: decode_step(function, inputs), repeats=repeats)
                    key = f"{variant}:{impl}_ms" if options is None else f"{variant}_ms"
                    rows[batch][key] = ms
                    if options is not None:
                        with lynx_compile.record(model) as rec:
                            decode_step(function, inputs)
                        summary = rec.summary(decode_only=True).values()
                        rows[batch][f"{variant}_experts"] = sum(s["experts_after"] for s in summary)
                        rows[batch]["plain_experts"] = sum(s["experts_before"] for s in summary)
                    print(f"{shape} B={batch} {key} {ms:.2f} ms", flush=True)
            del model, function
    for row in rows.values():
        row["inductor_ms"] = min(row["inductor:grouped_mm_ms"], row["inductor:batched_mm_ms"])
        for variant in ("lynx:none+fused", "lynx:binning+fused"):
            row[f"{variant}_speedup"] = row["inductor_ms"] / row[f"{variant}_ms"]
    return list(rows.values())


def fit(rows) -> dict:
    """Least squares over the lynx rows of one model:
      experts only:        step ms = ms_per_expert * experts read per step + intercept
      experts and tokens:  step ms = ms_per_expert * experts + ms_per_token * B + intercept
    The second separates bytes (experts read) from work that grows with the batch (attention,
    projections, and every token's k experts' FLOPs)."""
    points = [(row[f"{v}_experts"], row["batch"], row[f"{v}_ms"]) for row in rows
              for v in ("lynx:none+fused", "lynx:binning+fused")]
    experts, tokens, ms = (torch.tensor(column, dtype=torch.float64) for column in zip(*points))
    result = {"points": len(points)}
    for name, columns in (("experts", [experts]), ("experts_tokens", [experts, tokens])):
        design = torch.stack([*columns, torch.ones_like(ms)], dim=1)
        coefficients = torch.linalg.lstsq(design, ms).solution
        residual = ms - design @ coefficients
        r2 = 1 - float((residual ** 2).sum() / ((ms - ms.mean()) ** 2).sum().clamp_min(1e-12))
        result[name] = {"ms_per_expert": float(coefficients[0]), "intercept_ms": float(coefficients[-1]), "r2": r2}
        if name == "experts_tokens":
            result[name]["ms_per_token"] = float(coefficients[1])
    return result


def markdown(rows, info, fits) -> str:
    lines = [machine_line(info)]
    header = ["B", "Inductor grouped_mm", "Inductor batched_mm", "lynx none+fused", "lynx binning+fused",
              "experts/step top-k -> binning"]
    for case, line in fits.items():
        lines += ["", f"**{case}** (ms per decode step; speedup vs the faster default-Inductor row)", "",
                  "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for r in (r for r in rows if r["case"] == case):
            lines.append(f"| {r['batch']} | {r['inductor:grouped_mm_ms']:.1f} | {r['inductor:batched_mm_ms']:.1f} | "
                         f"{r['lynx:none+fused_ms']:.1f} ({r['lynx:none+fused_speedup']:.2f}x) | "
                         f"{r['lynx:binning+fused_ms']:.1f} ({r['lynx:binning+fused_speedup']:.2f}x) | "
                         f"{r['plain_experts']:.0f} -> {r['lynx:binning+fused_experts']:.0f} |")
        only, both = line["experts"], line["experts_tokens"]
        lines += ["", f"Least-squares fits over the {line['points']} lynx rows: step = {only['ms_per_expert']:.2f} ms per "
                      f"expert read + {only['intercept_ms']:.1f} ms (R² {only['r2']:.2f}); step = "
                      f"{both['ms_per_expert']:.2f} ms per expert + {both['ms_per_token']:.2f} ms per token "
                      f"+ {both['intercept_ms']:.1f} ms (R² {both['r2']:.2f})."]
    return "\n".join(lines) + "\n"


def plot(rows, path):
    plt = pyplot()
    cases = list(dict.fromkeys(r["case"] for r in rows))
    fig, axes = plt.subplots(2, len(cases), figsize=(6 * len(cases), 8), squeeze=False)
    for column, case in enumerate(cases):
        case_rows = [r for r in rows if r["case"] == case]
        batches = [r["batch"] for r in case_rows]
        axis = axes[0][column]
        for key, label in (("inductor_ms", "default Inductor (best experts impl)"),
                           ("lynx:none+fused_ms", "lynx none + fused"), ("lynx:binning+fused_ms", "lynx binning + fused")):
            axis.plot(batches, [r[key] for r in case_rows], marker="o", label=label)
        axis.set(title=f"{case}: decode step", xlabel="decode batch size B", ylabel="ms per step", xscale="log")
        axis.legend(fontsize=7)
        axis = axes[1][column]
        for variant in ("lynx:none+fused", "lynx:binning+fused"):
            axis.scatter([r[f"{variant}_experts"] for r in case_rows], [r[f"{variant}_ms"] for r in case_rows],
                         label=variant)
        line = fit(case_rows)["experts"]
        xs = torch.linspace(0, max(r["plain_experts"] for r in case_rows), 20)
        axis.plot(xs, line["ms_per_expert"] * xs + line["intercept_ms"], "k--",
                  label=f"fit: {line['ms_per_expert']:.2f} ms/expert + {line['intercept_ms']:.1f} ms (R² {line['r2']:.2f})")
        axis.set(title=f"{case}: step time vs experts read", xlabel="distinct experts per step (all layers)",
                 ylabel="ms per step")
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_results(info, rows) -> None:
    """Fit each model's rows, then write bench_decode_model.json (machine + fits, rows), .png and .md."""
    fits = {case: fit([r for r in rows if r["case"] == case]) for case in dict.fromkeys(r["case"] for r in rows)}
    for case, line in fits.items():
        print(case, line)
    stem = per_isa("bench_decode_model", info)
    save_results(stem, {**info, "fits": fits}, rows, plot)
    (RESULTS / f"{stem}.md").write_text(markdown(rows, info, fits))


def arguments(parser):
    parser.add_argument("--models", nargs="+", default=["qwen3-moe-shaped", "mixtral-shaped"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--from-json", action="store_true", help="redraw the table and plot from the last run")


def main():
    args, info = start(__doc__, arguments)
    if args.from_json:
        saved = json.loads((RESULTS / f"{per_isa('bench_decode_model', info)}.json").read_text())
        write_results(saved["machine"], saved["rows"])
        return
    batches = args.batch_sizes or ((1, 16) if args.quick else (1, 4, 8, 16, 32, 64))
    rows = []
    for shape in args.models:
        rows += run_model(shape, batches, repeats=5)
    write_results(info, rows)


if __name__ == "__main__":
    main()
