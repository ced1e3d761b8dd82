"""What selection costs per routing site, and what share of a decode step it takes.

    python bench/bench_selection.py            # the full grid, ~10 min on 2 cores (mostly compiling)
    python bench/bench_selection.py --quick    # T in 4, 64; E in 8, 64; k = 2

(a) per site: one routing site compiled alone (a router linear over E experts, softmax, top-k, in
    a module that holds E stacked experts), T tokens, k per token: the compiled plain top-k
    (lynx policy none, which is default Inductor's graph) against each selecting policy, in one
    process, interleaved; ratio = selection / plain. T in 1, 4, 16, 64, 256; E in 8, 64, 128,
    256; k in 2, 8 (k < E). Random router logits with a batch-shared component, so there is
    something to select. The selecting policies run the C++ selection kernel; for comparison,
    "affinity_binning:body" is the traced torch body Inductor compiles (LYNX_SELECTION=body).
(b) calls per site in Inductor's generated code, counted like tests/passes/test_lower_selection.py
    (generated kernels, extern kernels, torch ops), for the selection kernel and the traced body.
(c) selection's share of a whole-model decode step: the shipped checkpoints at B = 1, 16, 64,
    lynx's default options; the profiler's time in lynx::select_experts_cpu over the step's.

Writes bench/results/bench_selection.json, .png and .md (the machine first).
"""

from __future__ import annotations

import json
import os

import torch
import transformers
from torch._inductor.utils import run_and_get_code

from common import RESULTS, calls_in, machine_line, pyplot, save_results, start, time_call
from lynx_compile.eval.checkpoints import resolve_checkpoint

POLICIES = {"affinity_binning": {}, "gate_mass_budget": {"expert_budget": 0.5}, "opportunistic": {}}
HIDDEN = 256


class RouterSite(torch.nn.Module):
    """One routing site: router linear, softmax, top-k; the module holds E stacked experts (so
    the top-k is proven routing) but the bench times the routing only."""

    def __init__(self, num_experts: int, top_k: int):
        super().__init__()
        self.gate = torch.nn.Linear(HIDDEN, num_experts, bias=False)
        self.experts = torch.nn.Module()
        self.experts.w = torch.nn.Parameter(torch.zeros(num_experts, 1, 1))
        self.top_k = top_k
        torch.nn.init.normal_(self.gate.weight, std=1.5 / HIDDEN ** 0.5)

    def forward(self, hidden):  # (B, 1, H)
        scores = torch.softmax(self.gate(hidden.view(-1, HIDDEN)), dim=-1)  # (T, E)
        return torch.topk(scores, self.top_k, dim=-1)


def site_inputs(num_tokens: int, module: RouterSite) -> torch.Tensor:
    generator = torch.Generator().manual_seed(num_tokens)
    shared = module.gate.weight[:3].sum(0).detach() * 0.5  # raises three experts for every token
    return (torch.randn(num_tokens, 1, HIDDEN, generator=generator) + shared).detach()


def per_site(shapes, repeats: int) -> list[dict]:
    rows = []
    for num_tokens, num_experts, top_k in shapes:
        torch.manual_seed(0)
        module = RouterSite(num_experts, top_k).eval()
        hidden = site_inputs(num_tokens, module)
        row = {"T": num_tokens, "E": num_experts, "k": top_k}
        with torch.no_grad():
            functions = {"plain": torch.compile(module, backend="lynx", options={"policy": "none"})}
            for policy, params in POLICIES.items():
                functions[policy] = torch.compile(module, backend="lynx", options={"policy": policy, **params})
            functions["affinity_binning:body"] = torch.compile(module, backend="lynx")
            for name, fn in functions.items():
                os.environ["LYNX_SELECTION"] = "body" if name.endswith(":body") else "auto"
                fn(hidden)  # compile (the selection path is chosen when the graph is lowered)
            os.environ.pop("LYNX_SELECTION")
            for name, fn in functions.items():  # interleaved: every variant once per round
                row[f"{name}_us"] = time_call(fn, hidden, repeats=repeats) * 1e3
        for policy in (*POLICIES, "affinity_binning:body"):
            row[f"{policy}_ratio"] = row[f"{policy}_us"] / row["plain_us"]
        rows.append(row)
        print(f"T={num_tokens:>3} E={num_experts:>3} k={top_k}: plain {row['plain_us']:7.1f} us  " +
              "  ".join(f"{p} {row[f'{p}_us']:7.1f} us ({row[f'{p}_ratio']:.2f}x)" for p in POLICIES), flush=True)
        torch._dynamo.reset()
    return rows


def calls_per_site() -> list[dict]:
    rows = []
    module = RouterSite(8, 2).eval()
    hidden = site_inputs(16, module)
    for path in ("kernel", "body"):
        os.environ["LYNX_SELECTION"] = path
        counts = {}
        for policy, params in {"none": {}, **POLICIES}.items():
            torch._dynamo.reset()
            with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
                _, [code] = run_and_get_code(torch.compile(module, backend="lynx",
                                                           options={"policy": policy, **params}), hidden)
            counts[policy] = calls_in(code)
        rows += [{"path": path, "policy": p, "calls": n, "beyond_none": n - counts["none"]} for p, n in counts.items()]
        print(f"calls per site ({path}):", counts, flush=True)
    os.environ.pop("LYNX_SELECTION", None)
    return rows


@torch.no_grad()
def decode_share(checkpoint: str, batches, steps: int = 8) -> list[dict]:
    path = resolve_checkpoint(checkpoint)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.compile(backend="lynx", options={"pad_token_id": model.config.pad_token_id})
    rows = []
    for batch in batches:
        generator = torch.Generator().manual_seed(batch)
        prompt = torch.randint(3, model.config.vocab_size, (batch, 16), generator=generator)
        cache = transformers.DynamicCache(config=model.config)
        model(input_ids=prompt, past_key_values=cache, use_cache=True)
        token = prompt[:, -1:]
        for _ in range(3):  # compile and warm up
            token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            for _ in range(steps):
                begin = torch.profiler.record_function("step")
                begin.__enter__()
                token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
                begin.__exit__(None, None, None)
        events = profile.key_averages()
        select_us = sum(e.cpu_time_total for e in events if e.key == "lynx::select_experts_cpu")
        step_us = sum(e.cpu_time_total for e in events if e.key == "step")
        rows.append({"checkpoint": checkpoint, "B": batch, "step_ms": step_us / steps / 1e3,
                     "selection_ms": select_us / steps / 1e3, "share": select_us / step_us if step_us else 0.0})
        print(f"{checkpoint} B={batch}: step {rows[-1]['step_ms']:.2f} ms, selection {rows[-1]['selection_ms']:.3f} ms "
              f"({rows[-1]['share']:.1%})", flush=True)
    torch._dynamo.reset()
    return rows


VARIANTS = (*POLICIES, "affinity_binning:body")


def markdown(result, info) -> str:
    lines = [machine_line(info), "", "**(a) per site: selection against the compiled plain top-k** (microseconds per "
             "call, median; ratio = selection / plain; the selection kernel, and AffinityBinning's traced body)", "",
             "| T | E | k | plain us | " + " | ".join(f"{v} us (ratio)" for v in VARIANTS) + " |",
             "|" + " --- |" * (4 + len(VARIANTS))]
    for r in result["per_site"]:
        lines.append(f"| {r['T']} | {r['E']} | {r['k']} | {r['plain_us']:.1f} | " +
                     " | ".join(f"{r[f'{v}_us']:.1f} ({r[f'{v}_ratio']:.2f}x)" for v in VARIANTS) + " |")
    lines += ["", "**(b) calls per site in Inductor's generated code** (beyond policy none's graph)", "",
              "| path | " + " | ".join(r["policy"] for r in result["calls"] if r["path"] == "kernel") + " |",
              "|" + " --- |" * (1 + sum(r["path"] == "kernel" for r in result["calls"]))]
    for path in ("kernel", "body"):
        lines.append(f"| {path} | " + " | ".join(f"{r['calls']} (+{r['beyond_none']})" for r in result["calls"]
                                                  if r["path"] == path) + " |")
    lines += ["", "**(c) selection's share of a decode step** (shipped checkpoints, float32, default options)", "",
              "| checkpoint | B | step ms | selection ms | share |", "| --- | --- | --- | --- | --- |"]
    for r in result["decode"]:
        lines.append(f"| {r['checkpoint']} | {r['B']} | {r['step_ms']:.2f} | {r['selection_ms']:.3f} | {r['share']:.1%} |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    plt = pyplot()
    fig, axis = plt.subplots(figsize=(7, 4.5))
    for policy in POLICIES:
        for num_experts in sorted({r["E"] for r in rows}):
            subset = [r for r in rows if r["E"] == num_experts and r["k"] == min(r2["k"] for r2 in rows)]
            axis.plot([r["T"] for r in subset], [r[f"{policy}_ratio"] for r in subset], marker="o",
                      label=f"{policy}, E={num_experts}")
    axis.axhline(1.5, color="k", linestyle="--", label="target 1.5x")
    axis.set(xscale="log", xlabel="tokens per call T", ylabel="selection / plain top-k (time)",
             title="per-site selection cost (smallest k)")
    axis.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def arguments(parser):
    parser.add_argument("--from-json", action="store_true", help="redraw the table and plot from the last run")


def main():
    args, info = start(__doc__, arguments)
    if args.from_json:
        saved = json.loads((RESULTS / "bench_selection.json").read_text())
        plot(saved["per_site"], RESULTS / "bench_selection.png")
        (RESULTS / "bench_selection.md").write_text(markdown(saved, saved["machine"]))
        return
    tokens = (4, 64) if args.quick else (1, 4, 16, 64, 256)
    experts = (8, 64) if args.quick else (8, 64, 128, 256)
    ks = (2,) if args.quick else (2, 8)
    shapes = [(t, e, k) for e in experts for k in ks if k < e for t in tokens]
    result = {"per_site": per_site(shapes, repeats=50), "calls": calls_per_site(),
              "decode": [row for name in ("coarse", "fine") for row in decode_share(name, (1, 16, 64))]}
    save_results("bench_selection", info, result["per_site"], plot)
    (RESULTS / "bench_selection.json").write_text(json.dumps({"machine": info, **result}, indent=1))
    (RESULTS / "bench_selection.md").write_text(markdown(result, info))
    print(markdown(result, info))


if __name__ == "__main__":
    main()
