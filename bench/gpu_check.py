"""One prepared check of lynx's CUDA path, for a lent GPU: correctness, CUDA graphs, decode latency.

    python bench/gpu_check.py --out bench/results/gpu          # on the GPU machine (H200: < 8 min)
    python bench/gpu_check.py --out /tmp/gpu-dry --dry-run     # every step on CPU, tiny shapes

Three independent steps; a step (or one case inside it) that fails is recorded with its traceback
and the rest still runs. `<out>/gpu_check.json` is rewritten after every step, so a run cut short
keeps what it measured; `<out>/gpu_check.md` holds the short tables.

  a. correctness   the fused Triton op (torch.ops.lynx.fused_moe_triton, eager and inside
                   torch.compile) and the experts="inductor" computation (grouped_mm_experts,
                   eager and compiled) against fused_moe_reference: fp32 and bf16; T=1, experts
                   with no tokens, one expert taking every token, GPT-OSS's biased clamped SwiGLU.
  b. cudagraphs    a tiny Mixtral-style model compiled with backend lynx and mode
                   "reduce-overhead" (CUDA graphs), AffinityBinning with either expert lowering:
                   decode steps replay with no recompile (backend call count) and no host sync
                   (torch.cuda.set_sync_debug_mode("error") around the replays).
  c. latency       decode step of a Mixtral-shaped MoE block (H=4096, I=14336, E=8, k=2) and a
                   Qwen3-30B-A3B-shaped one (H=2048, I=768, E=128, k=8), bf16, B in 1..64:
                     inductor               default Inductor, transformers' grouped_mm experts
                     lynx:none+triton       policy none, dispatch -> lynx Triton op
                     lynx:binning+triton    AffinityBinning + lynx Triton op (backend default)
                     lynx:binning+inductor  AffinityBinning + experts="inductor", max-autotune
                                            (Inductor's Triton grouped-GEMM template on sm90+)
                   all under CUDA graphs (reduce-overhead; max-autotune includes them); CUDA-event
                   timing after warm-up, median of repeats; distinct experts per step before and
                   after selection (lynx_compile.record); HBM share = bytes of the distinct experts
                   read / step time / 4.8 TB/s (H200 peak).

  d. selection     one routing site compiled alone (router linear, softmax, top-k; its module holds
                   E stacked experts), T in 4, 16, 64, E in 8, 128: the compiled plain top-k (policy
                   none) against AffinityBinning (on CUDA its traced body, which Inductor compiles
                   to Triton kernels), under CUDA graphs; the per-site ratio bench_selection.py
                   measures on CPU.

Random weights, routers with trained-like spread (router logit std ~1.5, as bench_moe.py does).
The batch dimension is marked dynamic, so each variant compiles twice (B=1, then B>=2), not once
per B. Autotuning is bounded to the decode-sized grouped-GEMM configs (--full-autotune: all).
--dry-run: CPU, tiny shapes, Triton in its interpreter (TRITON_INTERPRET=1, set before Triton is
imported), plain compiled replays instead of CUDA graphs; it checks that every step runs, not speed.
"""

from __future__ import annotations

import os
import sys

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:  # must precede every import of Triton (torch._inductor imports it)
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # a checkout without install
import lynx_compile  # noqa: E402
from lynx_compile import machine  # noqa: E402
from lynx_compile.backend import lynx_backend  # noqa: E402
from lynx_compile.lowering import grouped_mm_experts as gmm  # noqa: E402

from lynx_compile.lowering.moe_experts_reference import ExpertWeights, fused_moe_reference  # noqa: E402

HBM_PEAK_BYTES_S = 4.8e12  # H200
ROUTER_LOGIT_STD = 1.5
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # relative to the output's largest value


@dataclasses.dataclass(frozen=True)
class Settings:
    device: str
    blocks: dict  # name -> (H, I, E, k)
    batch_sizes: tuple
    correctness_shape: tuple  # (H, I, E)
    model_shape: dict
    warmup: int
    repeats: int
    compiled_cases: tuple | None  # correctness cases run through torch.compile too (None: all)
    cudagraph_mode: str | None  # mode for the CUDA-graph variants (None: plain compile)
    autotune_mode: str | None
    budget_s: float


GPU = Settings(
    device="cuda",
    blocks={"mixtral-8x7b": (4096, 14336, 8, 2), "qwen3-30b-a3b": (2048, 768, 128, 8)},
    batch_sizes=(1, 4, 8, 16, 32, 64), correctness_shape=(512, 256, 8),
    model_shape=dict(hidden=256, intermediate=512, layers=2, experts=8, top_k=2, batch=8),
    warmup=5, repeats=30, compiled_cases=None, cudagraph_mode="reduce-overhead", autotune_mode="max-autotune", budget_s=420.0)
DRY = Settings(
    device="cpu",
    blocks={"mixtral-8x7b": (64, 64, 8, 2), "qwen3-30b-a3b": (64, 32, 16, 4)},
    batch_sizes=(1, 4), correctness_shape=(32, 16, 8),
    model_shape=dict(hidden=64, intermediate=64, layers=1, experts=8, top_k=2, batch=4),
    warmup=1, repeats=3, compiled_cases=("empty experts",), cudagraph_mode=None, autotune_mode=None, budget_s=600.0)


# --- results ------------------------------------------------------------------------------------

class Results:
    """The JSON document, rewritten after every step so a run cut short keeps what it measured."""

    def __init__(self, out: pathlib.Path, settings: Settings) -> None:
        self.out = out
        self.start = time.monotonic()
        self.doc = {"dry_run": DRY_RUN, "settings": dataclasses.asdict(settings), "machine": describe_machine(),
                    "fused_expert_kernel": ("lynx.fused_moe_triton (Triton)" if settings.device == "cuda"
                                            else "lynx.moe_experts (CPU C++): the dry run has no Triton variant"),
                    "steps": {}}
        self.save()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def run_step(self, name: str, fn, *args) -> None:
        started = time.monotonic()
        step = {"status": "running", "records": []}
        self.doc["steps"][name] = step
        print(f"== {name}", flush=True)
        try:
            fn(step["records"], *args)
            failed = [r for r in step["records"] if r.get("status") == "failed"]
            print(f"   {len(step['records'])} records, {len(failed)} failed", flush=True)
            step["status"] = "failed" if failed else "ok"
        except Exception:  # noqa: BLE001 - record and go on with the next step
            step["status"] = "failed"
            step["error"] = traceback.format_exc()
            print(step["error"], flush=True)
        step["seconds"] = round(time.monotonic() - started, 1)
        self.save()

    def save(self) -> None:
        self.doc["elapsed_s"] = round(self.elapsed(), 1)
        (self.out / "gpu_check.json").write_text(json.dumps(self.doc, indent=1, default=str))


def guarded(records: list, record: dict, fn) -> dict:
    """Run one case; its outcome (or traceback) goes into `record`, which joins `records`."""
    records.append(record)
    try:
        record.update(fn())
        record.setdefault("status", "ok")
    except Exception:  # noqa: BLE001
        record["status"] = "failed"
        record["error"] = traceback.format_exc(limit=6)
        print(f"   failed: {record}", flush=True)
    return record


def describe_machine() -> dict:
    info = {"lynx_machine": machine.describe(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": sys.version.split()[0]}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


# --- a. correctness -----------------------------------------------------------------------------

def correctness_cases(settings: Settings, dtype: torch.dtype) -> dict:
    """name -> (hidden, weights, ids, w_gate_up (E, 2I, H), w_down, b_gate_up, b_down, activation, order)."""
    hidden_size, inter, experts = settings.correctness_shape
    generator = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731

    def case(num_tokens, ids, activation="silu", order="halves", biased=False):
        top_k = ids.shape[1]
        tensors = [rand(num_tokens, hidden_size), torch.softmax(rand(num_tokens, top_k), -1), ids,
                   rand(experts, 2 * inter, hidden_size) / hidden_size ** 0.5,
                   rand(experts, hidden_size, inter) / inter ** 0.5,
                   rand(experts, 2 * inter) if biased else None, rand(experts, hidden_size) if biased else None]
        moved = [t.to(settings.device, dtype if t.is_floating_point() and i != 1 else t.dtype)
                 if t is not None else None for i, t in enumerate(tensors)]
        return (*moved, activation, order)

    def distinct(num_tokens, pool, k=2):
        pool = torch.tensor(pool)
        return torch.stack([pool[torch.randperm(len(pool), generator=generator)[:k]] for _ in range(num_tokens)])

    all_on_zero = torch.stack([torch.zeros(16, dtype=torch.long), 1 + torch.randint(experts - 1, (16,), generator=generator)], 1)
    return {
        "T=1": case(1, distinct(1, range(experts))),
        "empty experts": case(12, distinct(12, [1, 3, 4])),  # 5 of 8 experts get no token
        "one expert takes every token": case(16, all_on_zero),
        "gpt_oss (interleaved, biased)": case(5, distinct(5, range(experts)), "gpt_oss", "interleaved", True),
    }


def split_gate_up(w_gate_up, b_gate_up, order):
    inter = w_gate_up.shape[1] // 2
    cut = (lambda t: (t[:, :inter], t[:, inter:])) if order == "halves" else (lambda t: (t[:, 0::2], t[:, 1::2]))
    return (*cut(w_gate_up), *(cut(b_gate_up) if b_gate_up is not None else (None, None)))


def triton_op_call(hidden, weights, ids, w_gate_up, w_down, b_gate_up, b_down, activation, order):
    w_gate, w_up, b_gate, b_up = split_gate_up(w_gate_up, b_gate_up, order)
    return torch.ops.lynx.fused_moe_triton(hidden, weights, ids, w_gate, w_up, w_down, b_gate, b_up, b_down, activation, 1.702, 7.0)


def inductor_experts_call(hidden, weights, ids, w_gate_up, w_down, b_gate_up, b_down, activation, order):
    return gmm.grouped_mm_experts_fused_gate_up(hidden, weights, ids, w_gate_up, w_down, b_gate_up, b_down,
                                                activation, 1.702, 7.0, order)


def check_correctness(records: list, settings: Settings) -> None:
    # Dynamo's default: static first, then the token count dynamic (as a model's decode graphs are).
    compiled_triton_op = torch.compile(triton_op_call)
    compiled_inductor_experts = torch.compile(inductor_experts_call)
    variants = {
        "triton_op eager": (triton_op_call, None),
        "triton_op compiled": (compiled_triton_op, "a triton_op's fake implementation runs its kernels: "
                                                   "under torch.compile it needs a GPU" if DRY_RUN else None),
        "inductor eager": (inductor_experts_call, None),
        "inductor compiled": (compiled_inductor_experts, None),
    }
    for dtype in (torch.float32, torch.bfloat16):
        for case_name, case in correctness_cases(settings, dtype).items():
            hidden, weights, ids, w_gate_up, w_down, b_gate_up, b_down, activation, order = case
            w_gate, w_up, b_gate, b_up = split_gate_up(w_gate_up, b_gate_up, order)
            expected = fused_moe_reference(hidden, weights, ids, ExpertWeights(w_gate, w_up, w_down, b_gate, b_up, b_down, activation))
            for variant, (fn, skip) in variants.items():
                record = {"variant": variant, "dtype": str(dtype).removeprefix("torch."), "case": case_name}
                if skip is None and "compiled" in variant and settings.compiled_cases \
                        and case_name not in settings.compiled_cases:
                    skip = "dry run: compiled for one case only (CPU compile time)"
                unsupported = gmm.unsupported_reason(hidden, w_down, w_gate_up) if "inductor" in variant else None
                if variant == "inductor compiled" and unsupported:
                    skip = unsupported  # float32: aten._grouped_mm's meta function refuses it
                if skip:
                    records.append({**record, "status": "skipped", "reason": skip})
                    continue
                guarded(records, record, functools.partial(_compare, fn, case, expected, dtype))
                if unsupported and records[-1]["status"] == "failed":
                    # Outside what experts="inductor" ever emits (the pass keeps such dispatches).
                    records[-1].update(status="unsupported", reason=unsupported)
            print(f"   {dtype} {case_name}: " + ", ".join(
                f"{r['variant']} {r['status']}" + (f" {r['relative_error']:.1e}" if "relative_error" in r else "")
                for r in records[-len(variants):]), flush=True)


def _compare(fn, case, expected, dtype) -> dict:
    got = fn(*case)
    if got.shape != expected.shape or got.dtype != expected.dtype:
        return {"status": "failed", "error": f"got {tuple(got.shape)} {got.dtype}, expected "
                                             f"{tuple(expected.shape)} {expected.dtype}"}
    scale = expected.float().abs().max().clamp_min(1e-6)
    error = float((got.float() - expected.float()).abs().max() / scale)
    return {"relative_error": error, "tolerance": TOLERANCE[dtype],
            "status": "ok" if error <= TOLERANCE[dtype] else "failed"}


# --- b. CUDA graphs -----------------------------------------------------------------------------

def tiny_mixtral(settings: Settings) -> torch.nn.Module:
    shape = settings.model_shape
    config = transformers.MixtralConfig(
        vocab_size=512, hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=shape["experts"], num_experts_per_tok=shape["top_k"], max_position_embeddings=128)
    config._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    spread_routers(model, shape["hidden"])
    return model.to(settings.device, torch.bfloat16).eval()


def spread_routers(module: torch.nn.Module, hidden_size: int) -> None:
    """Trained-like router spread instead of transformers' near-zero init (every expert tied)."""
    for name, param in module.named_parameters():
        if name.endswith(("gate.weight", "router.weight")) and param.dim() == 2:
            torch.nn.init.normal_(param, std=ROUTER_LOGIT_STD / hidden_size ** 0.5)


class CountingBackend:
    """lynx_backend with fixed options and mode, counting how often Dynamo compiles a graph."""

    def __init__(self, options: dict, mode: str | None) -> None:
        self.options, self.mode, self.compiles = options, mode, 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        return lynx_backend(gm, example_inputs, options=self.options, mode=self.mode)


CUDAGRAPH_VARIANTS = {"lynx:binning+triton": {}, "lynx:binning+inductor": {"experts": "inductor"}}


def check_cudagraphs(records: list, settings: Settings, selected: tuple) -> None:
    model = tiny_mixtral(settings)
    batch = settings.model_shape["batch"]
    generator = torch.Generator().manual_seed(1)
    steps = [torch.randint(3, 512, (batch, 1), generator=generator).to(settings.device) for _ in range(11)]
    outputs = {}
    for variant, options in CUDAGRAPH_VARIANTS.items():
        if variant not in selected:
            continue
        record = {"variant": variant, "mode": settings.cudagraph_mode or "default (dry run: no CUDA graphs)"}
        outputs[variant] = guarded(records, record, functools.partial(
            _replay, model, steps, CountingBackend(options, settings.cudagraph_mode), settings)).pop("logits", None)
        print(f"   {record}", flush=True)
    if len(outputs) == 2 and all(v is not None for v in outputs.values()):
        first, second = outputs.values()
        scale = first.float().abs().max().clamp_min(1e-6)
        records.append({"variant": "triton vs inductor experts, same selection", "status": "ok",
                        "relative_difference": float((first.float() - second.float()).abs().max() / scale)})


def _replay(model, steps, backend: CountingBackend, settings: Settings) -> dict:
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = torch.compile(model, backend=backend)

    def step(ids):
        if settings.device == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(input_ids=ids, use_cache=False).logits.clone()

    with torch.no_grad():
        for ids in steps[:3]:  # compile, CUDA-graph warm-up, recording
            step(ids)
        compiles_after_warmup = backend.compiles
        sync_mode = torch.cuda.get_sync_debug_mode() if settings.device == "cuda" else None
        if settings.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")  # any host sync inside a replay raises
        try:
            logits = [step(ids) for ids in steps[3:]]
        finally:
            if settings.device == "cuda":
                torch.cuda.set_sync_debug_mode(sync_mode)
                torch.cuda.synchronize()
    recompiles = backend.compiles - compiles_after_warmup
    finite = all(bool(torch.isfinite(x).all()) for x in logits)
    skips = dict(counters["inductor"]).get("cudagraph_skips", 0)
    ok = recompiles == 0 and finite and (settings.device != "cuda" or skips == 0)
    return {"status": "ok" if ok else "failed", "graphs_compiled": compiles_after_warmup,
            "replayed_steps": len(logits), "recompiles_during_replay": recompiles, "host_sync": "none raised",
            "cudagraph_skips": skips, "finite": finite, "logits": logits[-1]}


# --- c. decode latency --------------------------------------------------------------------------

def moe_block(name: str, shape: tuple, settings: Settings) -> torch.nn.Module:
    hidden, inter, experts, top_k = shape
    if name.startswith("mixtral"):
        config = transformers.MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts,
                                            num_experts_per_tok=top_k)
        block_class = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock
    else:
        config = transformers.Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts,
                                             num_experts_per_tok=top_k, norm_topk_prob=True)
        block_class = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock
    config._experts_implementation = "grouped_mm"  # transformers' default, set by from_pretrained
    torch.manual_seed(0)
    with torch.device(settings.device):  # built in place: the Mixtral block is 2.8 GB in bf16
        block = block_class(config).to(torch.bfloat16)
        torch.nn.init.normal_(block.experts.gate_up_proj, std=0.02)
        torch.nn.init.normal_(block.experts.down_proj, std=0.02)
        spread_routers(block, hidden)
    return block.eval()


def latency_variants(settings: Settings) -> dict:
    graphs, autotune = settings.cudagraph_mode, settings.autotune_mode
    return {
        "inductor": lambda block: torch.compile(block, mode=graphs),
        "lynx:none+triton": lambda block: torch.compile(block, backend=functools.partial(
            lynx_backend, options={"policy": "none", "experts": "fused"}, mode=graphs)),
        "lynx:binning+triton": lambda block: torch.compile(block, backend=functools.partial(
            lynx_backend, options={}, mode=graphs)),
        "lynx:binning+inductor": lambda block: torch.compile(block, backend=functools.partial(
            lynx_backend, options={"experts": "inductor"}, mode=autotune)),
    }


def time_ms(fn, x, settings: Settings) -> float:
    def call():
        if settings.device == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        fn(x)

    for _ in range(settings.warmup):
        call()
    samples = []
    for _ in range(settings.repeats):
        if settings.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            call()
            samples.append((time.perf_counter() - started) * 1e3)
    return statistics.median(samples)


def decode_inputs(shape: tuple, settings: Settings) -> dict:
    generator = torch.Generator().manual_seed(2)
    inputs = {}
    for batch in settings.batch_sizes:
        x = torch.randn(batch, 1, shape[0], generator=generator).to(settings.device, torch.bfloat16)
        if batch > 1 and len(settings.batch_sizes) > 1:
            torch._dynamo.mark_dynamic(x, 0)  # one graph for every B >= 2 (B = 1 is its own)
        inputs[batch] = x
    return inputs


def experts_per_step(block, inputs: dict) -> dict:
    """B -> distinct experts per step with plain top-k and after AffinityBinning (record())."""
    torch._dynamo.reset()
    # Selection alone decides the count: keep the dispatch (no expert kernel to build), no CUDA graphs
    # (recording copies to the host).
    compiled = torch.compile(block, backend=functools.partial(lynx_backend, options={"experts": "keep"}))
    found = {}
    with torch.no_grad():
        for batch, x in inputs.items():
            with lynx_compile.record() as rec:
                compiled(x)
            [summary] = rec.summary().values()
            found[batch] = (summary["experts_before"], summary["experts_after"])
    return found


def measure_latency(records: list, settings: Settings, budget: Results, autotune_configs: str,
                    blocks: tuple, selected: tuple) -> None:
    restore = bound_grouped_mm_autotuning(autotune_configs)
    try:
        for name in blocks:
            shape = settings.blocks[name]
            block = moe_block(name, shape, settings)
            inputs = decode_inputs(shape, settings)
            hidden, inter, experts, _top_k = shape
            expert_bytes = 3 * hidden * inter * 2  # gate, up, down in bf16
            counts = {}

            def count_experts():
                counts.update(experts_per_step(block, inputs))
                return {"experts_before_after": {batch: list(pair) for batch, pair in counts.items()}}

            guarded(records, {"block": name, "what": "experts per step"}, count_experts)
            print(f"   experts per step (before, after selection): {counts}", flush=True)
            for variant, make in latency_variants(settings).items():
                if variant not in selected:
                    continue
                if budget.elapsed() > settings.budget_s:
                    records.append({"block": name, "variant": variant, "status": "skipped",
                                    "reason": f"time budget of {settings.budget_s:.0f} s spent"})
                    continue
                torch._dynamo.reset()
                compiled = make(block)
                for batch, x in inputs.items():
                    record = {"block": name, "variant": variant, "batch": batch}

                    def one(x=x, batch=batch, variant=variant):
                        with torch.no_grad():
                            started = time.monotonic()
                            ms = time_ms(compiled, x, settings)
                        row = {"ms": round(ms, 4), "seconds_incl_compile": round(time.monotonic() - started, 1)}
                        if batch in counts:
                            before, after = counts[batch]
                            used = after if "binning" in variant else before
                            row.update(experts=used, hbm_share=round(used * expert_bytes / (ms * 1e-3) / HBM_PEAK_BYTES_S, 3))
                        return row

                    guarded(records, record, one)
                    print(f"   {record}", flush=True)
                budget.save()
            del block
            if settings.device == "cuda":
                torch.cuda.empty_cache()
    finally:
        restore()


class RouterSite(torch.nn.Module):
    """One routing site, as bench/bench_selection.py times it on CPU."""

    def __init__(self, hidden: int, num_experts: int, top_k: int):
        super().__init__()
        self.gate = torch.nn.Linear(hidden, num_experts, bias=False)
        self.experts = torch.nn.Module()
        self.experts.w = torch.nn.Parameter(torch.zeros(num_experts, 1, 1))
        self.hidden, self.top_k = hidden, top_k
        torch.nn.init.normal_(self.gate.weight, std=1.5 / hidden ** 0.5)

    def forward(self, x):  # (B, 1, H)
        scores = torch.softmax(self.gate(x.view(-1, self.hidden)), dim=-1)  # (T, E)
        return torch.topk(scores, self.top_k, dim=-1)


def measure_selection(records: list, settings: Settings) -> None:
    hidden = 64 if settings.device == "cpu" else 2048
    for num_experts, top_k in ((8, 2), (128, 8)):
        for tokens in (4, 16, 64):
            record = {"E": num_experts, "k": top_k, "T": tokens}

            def one(num_experts=num_experts, top_k=top_k, tokens=tokens):
                torch.manual_seed(0)
                site = RouterSite(hidden, num_experts, top_k).to(settings.device).eval()
                x = torch.randn(tokens, 1, hidden, device=settings.device)
                out = {}
                with torch.no_grad():
                    for name, options in (("plain", {"policy": "none"}), ("affinity_binning", {"policy": "affinity_binning"})):
                        torch._dynamo.reset()
                        fn = torch.compile(site, backend="lynx", options=options, mode=settings.cudagraph_mode)
                        out[f"{name}_ms"] = time_ms(fn, x, settings)
                out["ratio"] = out["affinity_binning_ms"] / out["plain_ms"]
                return out

            guarded(records, record, one)


def bound_grouped_mm_autotuning(which: str):
    """Keep max-autotune's grouped-GEMM search to decode-sized tiles (BLOCK_M <= 32, N/K <= 128,
    3 stages): with the batch dimension dynamic Inductor cannot prune by rows per expert and would
    benchmark all its configs. Returns a function that undoes it. No-op when `which` is "all" or
    this torch has no such table."""
    try:
        from torch._inductor.kernel import mm_grouped
    except ImportError:
        return lambda: None
    original = getattr(mm_grouped, "grouped_mm_configs", None)
    if which == "all" or original is None:
        return lambda: None

    def decode_configs():
        return [c for c in original() if c.kwargs.get("BLOCK_M", 0) <= 32 and c.kwargs.get("BLOCK_N", 0) <= 128
                and c.kwargs.get("BLOCK_K", 0) <= 128 and c.num_stages == 3]

    mm_grouped.grouped_mm_configs = decode_configs
    return lambda: setattr(mm_grouped, "grouped_mm_configs", original)


# --- markdown -----------------------------------------------------------------------------------

def write_markdown(doc: dict, path: pathlib.Path) -> None:
    info = doc["machine"]
    lines = [f"# lynx GPU check{' (DRY RUN on CPU: no GPU figures)' if doc['dry_run'] else ''}", "",
             f"Machine: {info.get('gpu', 'no GPU')} (sm {info.get('capability', '-')}), torch {info['torch']}, "
             f"triton {info['triton']}, transformers {info['transformers']}, Python {info['python']}; "
             f"{doc['elapsed_s']} s in all.", ""]
    steps = doc["steps"]
    lines += ["| step | status | seconds |", "| --- | --- | --- |"]
    lines += [f"| {name} | {step['status']} | {step.get('seconds', '-')} |" for name, step in steps.items()]
    correctness = steps.get("correctness", {}).get("records", [])
    if correctness:
        lines += ["", "## a. correctness (max error relative to the output's largest value)", "",
                  "| variant | dtype | case | result |", "| --- | --- | --- | --- |"]
        for r in correctness:
            result = (f"{r['relative_error']:.1e} ({r['status']})" if "relative_error" in r
                      else f"{r['status']}: {r.get('reason', r.get('error', '')).strip().splitlines()[-1][:90]}")
            lines.append(f"| {r['variant']} | {r['dtype']} | {r['case']} | {result} |")
    graphs = steps.get("cudagraphs", {}).get("records", [])
    if graphs:
        lines += ["", "## b. CUDA graphs", "", "| variant | status | graphs | recompiles in replay | cudagraph skips |",
                  "| --- | --- | --- | --- | --- |"]
        for r in graphs:
            lines.append(f"| {r['variant']} | {r['status']} | {r.get('graphs_compiled', '-')} | "
                         f"{r.get('recompiles_during_replay', '-')} | {r.get('cudagraph_skips', r.get('relative_difference', '-'))} |")
    latency = [r for r in steps.get("latency", {}).get("records", []) if "batch" in r]
    if latency:
        variants = list(dict.fromkeys(r["variant"] for r in latency))
        lines += ["", "## c. decode step latency", "",
                  "ms per step (median), then (experts read per step, share of 4.8 TB/s HBM peak, speedup over "
                  "default Inductor).", "",
                  "| block | B | " + " | ".join(variants) + " |", "| --- | --- | " + " | ".join("---" for _ in variants) + " |"]
        for block, batch in dict.fromkeys((r["block"], r["batch"]) for r in latency):
            cells = []
            row = {r["variant"]: r for r in latency if (r["block"], r["batch"]) == (block, batch)}
            baseline = row.get("inductor", {}).get("ms")
            for variant in variants:
                r = row.get(variant, {})
                speedup = f", {baseline / r['ms']:.2f}x" if baseline and "ms" in r and variant != "inductor" else ""
                cells.append(f"{r['ms']:.3f} ({r.get('experts', '-')}, {r.get('hbm_share', '-')}{speedup})" if "ms" in r
                             else r.get("status", "-"))
            lines.append(f"| {block} | {batch} | " + " | ".join(cells) + " |")
    selection = steps.get("selection", {}).get("records", [])
    if selection:
        lines += ["", "## d. selection per site (ms per call, median; ratio = AffinityBinning / plain top-k)", "",
                  "| E | k | T | plain ms | affinity_binning ms | ratio |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['E']} | {r['k']} | {r['T']} | {r['plain_ms']:.3f} | {r['affinity_binning_ms']:.3f} | "
                  f"{r['ratio']:.2f}x |" if r.get("status") == "ok" else f"| {r['E']} | {r['k']} | {r['T']} | "
                  f"{r.get('status')} | | |" for r in selection]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=pathlib.Path, help="folder for gpu_check.json / .md")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter")
    parser.add_argument("--steps", nargs="+", default=["correctness", "cudagraphs", "latency", "selection"],
                        choices=["correctness", "cudagraphs", "latency", "selection"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, help="override the decode batch sizes")
    parser.add_argument("--blocks", nargs="+", choices=list(GPU.blocks), default=list(GPU.blocks),
                        help="MoE block shapes for the latency step")
    parser.add_argument("--variants", nargs="+", choices=list(latency_variants(GPU)), default=list(latency_variants(GPU)),
                        help="variants for the CUDA-graph and latency steps")
    parser.add_argument("--budget-s", type=float, help="stop starting latency variants after this many seconds")
    parser.add_argument("--full-autotune", action="store_true", help="all of Inductor's grouped-GEMM configs")
    args = parser.parse_args(argv)
    settings = DRY if args.dry_run else GPU
    if args.batch_sizes:
        settings = dataclasses.replace(settings, batch_sizes=tuple(args.batch_sizes))
    if args.budget_s:
        settings = dataclasses.replace(settings, budget_s=args.budget_s)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry-run for the CPU rehearsal")
    for name, value in (("recompile_limit", 64), ("cache_size_limit", 64)):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, value)
    args.out.mkdir(parents=True, exist_ok=True)
    results = Results(args.out, settings)
    print(f"machine: {results.doc['machine']}", flush=True)
    steps = {"correctness": (check_correctness, settings),
             "cudagraphs": (check_cudagraphs, settings, tuple(args.variants)),
             "latency": (measure_latency, settings, results, "all" if args.full_autotune else "decode",
                         tuple(args.blocks), tuple(args.variants)),
             "selection": (measure_selection, settings)}
    for name in args.steps:
        fn, *fn_args = steps[name]
        results.run_step(name, fn, *fn_args)
    write_markdown(results.doc, args.out / "gpu_check.md")
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'} ({results.elapsed():.0f} s)")
    return 0 if all(s["status"] == "ok" for s in results.doc["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
