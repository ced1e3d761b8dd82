"""Tiny real transformers MoE models, MoE test modules, and a pass-only compile backend.

Models are the real transformers classes with tiny configs and random weights (no hub access).
`PassOnlyBackend` compiles through AOTAutograd with Inductor's decompositions, runs only the
lynx pass on the aten graph, and executes that graph with aten eagerly — the vLLM way of testing a
pass without paying Inductor's code generation; tests that need real Inductor use it explicitly.
"""

from __future__ import annotations

import collections

import torch
import transformers
from torch._dynamo.backends.common import aot_autograd
from torch._inductor.decomposition import select_decomp_table

from lynx_compile.config import LynxConfig
from lynx_compile.passes.frame import current_frame_facts
from lynx_compile.passes.pass_manager import LynxPostGradPass

ARCHS = ("mixtral", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3")
EXPERTS_IMPLS = ("eager", "batched_mm", "grouped_mm")
VOCAB = 96


def tiny_config(arch: str, num_layers: int = 1, experts_impl: str = "grouped_mm", **overrides):
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)
    if arch == "mixtral":
        config = transformers.MixtralConfig(intermediate_size=96, num_local_experts=8, num_experts_per_tok=2,
                                            **common)
    elif arch == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(moe_intermediate_size=32, num_experts=16, num_experts_per_tok=4,
                                             head_dim=16, norm_topk_prob=True, decoder_sparse_step=1,
                                             mlp_only_layers=[], **common)
    elif arch == "olmoe":
        config = transformers.OlmoeConfig(intermediate_size=32, num_experts=16, num_experts_per_tok=4,
                                          norm_topk_prob=False, **common)
    elif arch == "gpt_oss":
        config = transformers.GptOssConfig(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
                                           head_dim=16, layer_types=["full_attention"] * num_layers,
                                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                           **common)
    elif arch == "deepseek_v3":
        config = transformers.DeepseekV3Config(
            intermediate_size=96, moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=4,
            n_group=4, topk_group=2, first_k_dense_replace=0, n_shared_experts=1, q_lora_rank=None,
            kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, **common)
    else:
        raise ValueError(f"unknown arch {arch!r}; known: {ARCHS}")
    for name, value in overrides.items():
        if not hasattr(config, name):
            raise ValueError(f"{type(config).__name__} has no field {name!r}")
        setattr(config, name, value)
    config._experts_implementation = experts_impl
    return config


def tiny_model(arch: str, *, num_layers: int = 1, experts_impl: str = "grouped_mm",
               dtype: torch.dtype = torch.float32, seed: int = 0, router_std: float = 0.5, **overrides):
    """overrides: config fields (e.g. n_group=2) set after the tiny defaults."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, num_layers, experts_impl, **overrides))
    # Random routers are near-uniform; give them learned-looking spread so selection has work to do.
    for name, param in model.named_parameters():
        if name.endswith(("gate.weight", "router.weight")):
            torch.nn.init.normal_(param, std=router_std)
        if name.endswith("e_score_correction_bias"):
            torch.nn.init.zeros_(param)
    return model.to(dtype).eval()


def moe_block(arch: str, *, experts_impl: str = "grouped_mm", dtype: torch.dtype = torch.float32,
              seed: int = 0, **overrides) -> torch.nn.Module:
    """The MoE block (router + experts, plus shared experts for DeepSeek) of a tiny model."""
    return tiny_model(arch, experts_impl=experts_impl, dtype=dtype, seed=seed, **overrides).model.layers[0].mlp


def decode_hidden(batch: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """A decode batch as an MoE block sees it: (batch, seq=1, hidden)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, 64, generator=generator).to(dtype)


def decode_ids(batch: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, 1), generator=generator)


@torch.no_grad()
def decode_step(model, batch: int, seed: int = 0, past: int = 2, ids: torch.Tensor | None = None) -> dict:
    """Keyword arguments for one decode step of `batch` sequences: a fresh KV cache holding `past`
    prompt tokens (filled by an uncompiled forward) and one new token per sequence.

    A (B, 1) call without a cache is the prefill of one-token prompts, which lynx leaves alone.
    """
    generator = torch.Generator().manual_seed(seed + 1)
    prompt = torch.randint(3, VOCAB, (batch, past), generator=generator)
    cache = transformers.DynamicCache(config=model.config)
    model(input_ids=prompt, past_key_values=cache, use_cache=True)
    return {"input_ids": decode_ids(batch, seed) if ids is None else ids, "past_key_values": cache,
            "use_cache": True}


def count_ops(graph: torch.fx.Graph) -> collections.Counter:
    return collections.Counter(
        str(node.target) for node in graph.nodes if node.op == "call_function")


class PassOnlyBackend:
    """AOTAutograd + Inductor decompositions + the lynx pass, executed eagerly (no codegen).

    Keeps op counts before and after the pass of every compiled graph, and lynx's reports.
    """

    def __init__(self, config: LynxConfig | None = None, record: bool = False, run_pass: bool = True) -> None:
        """run_pass=False: keep the aten graphs as Inductor would hand them to its post-grad passes."""
        self.run_pass = run_pass
        self.reports = []
        self.lynx_pass = LynxPostGradPass(config or LynxConfig(), record=record, on_report=self.reports.append)
        self.before: list[collections.Counter] = []
        self.after: list[collections.Counter] = []
        self.graphs: list[torch.fx.GraphModule] = []
        self._backend = aot_autograd(fw_compiler=self._compile, decompositions=select_decomp_table())

    def _compile(self, gm: torch.fx.GraphModule, example_inputs):
        self.before.append(count_ops(gm.graph))
        if not self.run_pass:
            self.graphs.append(gm)
            return gm
        self.lynx_pass(gm.graph)
        gm.recompile()
        self.after.append(count_ops(gm.graph))
        self.graphs.append(gm)
        return gm

    def __call__(self, gm, example_inputs):
        self.lynx_pass.frame = current_frame_facts()  # as the lynx backend reads it, per graph
        return self._backend(gm, example_inputs)

    def total(self, which: str, op: str) -> int:
        return sum(counter[op] for counter in getattr(self, which))

    @property
    def sites(self):
        return [site for report in self.reports for site in report.sites]

    @property
    def routing_sites(self):
        return [site for site in self.sites if site.is_routing]


TOPK = "aten.topk.default"
BATCH_SELECT = "lynx.batch_select.default"
SELECT_KERNEL = "lynx.select_experts_cpu.default"
# The lowered selection body's own small top-ks (AffinityBinning, no dead-row mask): the plain
# top-k, each token's k-th eligible rank, the top-2 logits (confidence), the k smallest sort keys
# of the remap. With pad_token_id set, the dead rows' remap adds one.
TOPKS_IN_BODY = 4


def selection_kernel() -> bool:
    """Whether CPU sites lower to the C++ selection kernel in this run (LYNX_SELECTION; where it
    builds), or to the traced body."""
    from lynx_compile.lowering.kernels import select_experts_cpu

    return select_experts_cpu.use_kernel()


def topks_in_selection() -> int:
    """aten.topk nodes a lowered AffinityBinning site holds: the plain top-k beside the kernel, or
    the body's own."""
    return 1 if selection_kernel() else TOPKS_IN_BODY


# --- hand-written modules ---------------------------------------------------------------------

class GptFastMoE(torch.nn.Module):
    """gpt-fast's MoE: gather each token's expert weights, then einsum.

    Legend: B batch, S seq, T tokens, D hidden, I intermediate, E experts, A activated (k).
    """

    def __init__(self, dim=32, intermediate=48, num_experts=8, activated=2):
        super().__init__()
        self.gate = torch.nn.Linear(dim, num_experts, bias=False)
        self.w1 = torch.nn.Parameter(torch.randn(num_experts, intermediate, dim) * 0.1)  # (E, I, D)
        self.w2 = torch.nn.Parameter(torch.randn(num_experts, dim, intermediate) * 0.1)  # (E, D, I)
        self.w3 = torch.nn.Parameter(torch.randn(num_experts, intermediate, dim) * 0.1)  # (E, I, D)
        self.activated = activated
        torch.nn.init.normal_(self.gate.weight, std=0.5)

    def forward(self, x):  # (B, S, D)
        batch, seq, dim = x.shape
        return self.experts_for_tokens(x.view(-1, dim)).view(batch, seq, dim)

    def experts_for_tokens(self, x):  # (T, D)
        scores = torch.softmax(self.gate(x), dim=-1)  # (T, E)
        weights, indices = torch.topk(scores, self.activated, dim=-1)  # (T, A), (T, A)
        weights = weights / weights.sum(dim=-1, keepdim=True)  # (T, A)
        x1 = torch.nn.functional.silu(torch.einsum("td,taid->tai", x, self.w1[indices]))  # (T, A, I)
        x3 = torch.einsum("td,taid->tai", x, self.w3[indices])  # (T, A, I)
        out = torch.einsum("tai,tadi->tad", x1 * x3, self.w2[indices])  # (T, A, D)
        return torch.einsum("tad,ta->td", out, weights)  # (T, D)


class FlatTokensMoE(GptFastMoE):
    """The same MoE fed (T, D) tokens directly: no (batch, seq) flatten visible to lynx."""

    def forward(self, x):  # (T, D)
        return self.experts_for_tokens(x)


class TopKSampler(torch.nn.Module):
    """lm_head + top-k filtering as in sampling: the top-k's values set a threshold."""

    def __init__(self, dim=32, vocab=64, top_k=8):
        super().__init__()
        self.lm_head = torch.nn.Linear(dim, vocab, bias=False)
        self.top_k = top_k

    def forward(self, hidden):  # (B, 1, D)
        logits = self.lm_head(hidden[:, -1])  # (B, V)
        pivot = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < pivot, float("-inf"))
        return torch.softmax(logits, dim=-1)


class BeamSearchStep(torch.nn.Module):
    """One beam-search step: top-k over (batch, beams * vocab) log-probs, indices split by //, %."""

    def __init__(self, dim=32, vocab=64, beams=4):
        super().__init__()
        self.lm_head = torch.nn.Linear(dim, vocab, bias=False)
        self.beams, self.vocab = beams, vocab

    def forward(self, hidden, beam_scores):  # (B*beams, D), (B, beams)
        log_probs = torch.log_softmax(self.lm_head(hidden), dim=-1)  # (B*beams, V)
        total = log_probs.view(-1, self.beams, self.vocab) + beam_scores.unsqueeze(-1)
        scores, flat = torch.topk(total.view(-1, self.beams * self.vocab), self.beams, dim=-1)
        return scores, flat // self.vocab, flat % self.vocab


class VocabRouterLookalike(torch.nn.Module):
    """A linear over a vocabulary, top-k, then the indices are returned: not routing (too many columns)."""

    def __init__(self, dim=32, vocab=2048, top_k=4):
        super().__init__()
        self.lm_head = torch.nn.Linear(dim, vocab, bias=False)
        self.top_k = top_k

    def forward(self, hidden):  # (B, 1, D)
        batch, seq, dim = hidden.shape
        return torch.topk(torch.softmax(self.lm_head(hidden.view(-1, dim)), -1), self.top_k, dim=-1)


class SquaredScoresMoE(GptFastMoE):
    """A routing form lynx does not understand (scores squared): must be left as it was."""

    def forward(self, x):
        batch, seq, dim = x.shape
        x = x.view(-1, dim)
        scores = torch.softmax(self.gate(x), dim=-1) ** 2
        weights, indices = torch.topk(scores, self.activated, dim=-1)
        out = torch.einsum("td,taid->tai", x, self.w1[indices])
        return torch.einsum("tai,ta->ti", out, weights)


class RoutingProbe(torch.nn.Module):
    """A transformers MoE block's own router and experts, returning the routing it used."""

    def __init__(self, block):
        super().__init__()
        self.gate, self.experts = block.gate, block.experts

    def forward(self, hidden):  # (B, S, H)
        batch, seq, dim = hidden.shape
        flat = hidden.view(-1, dim)
        _, weights, indices = self.gate(flat)
        return self.experts(flat, indices, weights).view(batch, seq, dim), indices, weights


def skewed_logits(num_tokens=16, num_experts=8, favoured=(0, 1, 2), seed=0, strength=3.0):
    """Router logits where every token strongly prefers some of `favoured`, weakly the rest."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=generator) * 0.3
    logits[:, list(favoured)] += strength
    return logits


def skewed_router_logits(num_tokens=16, num_experts=8, favoured=(0, 1, 2), seed=0):
    """Logits shaped like a trained router's inside one decode batch (Lynx observation 4).

    Each token's top-1 is one of a few `favoured` experts; its second choice is a token-specific
    other expert one logit lower (inside bin 0 for Mixtral's alpha): the diverse, weak leftovers
    load balancing produces. Every fourth token is confident (second choice 3 logits lower).
    """
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=generator) * 0.1
    others = [e for e in range(num_experts) if e not in favoured]
    for token in range(num_tokens):
        logits[token, favoured[token % len(favoured)]] += 3.0
        second = others[torch.randint(len(others), (1,), generator=generator).item()]
        logits[token, second] += 0.0 if token % 4 == 3 else 2.0
    return logits


def skewed_mixtral_block(seed=0):
    """A real MixtralSparseMoeBlock plus a decode batch (B=16, S=1) whose router logits are
    `skewed_router_logits`: the router weight reads them off the first E hidden dims."""
    torch.manual_seed(seed)
    config = tiny_config("mixtral")
    block = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(config)
    torch.nn.init.normal_(block.experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(block.experts.down_proj, std=0.1)
    num_experts, dim = config.num_local_experts, config.hidden_size
    with torch.no_grad():
        block.gate.weight.copy_(torch.eye(num_experts, dim))
    hidden = torch.randn(16, 1, dim)
    hidden[:, 0, :num_experts] = skewed_router_logits(16, num_experts, seed=seed)
    return block.eval(), hidden


class RepeatedMaxMoE(GptFastMoE):
    """Routing without top-k: k rounds of "take the max, mask it out" over the router output,
    routing weights gathered around those choices, gpt-fast's gather + einsum dispatch.

    form: "max" (torch.max(dim) gives value and index), "argmax" (argmax, then gather the value);
    mask: "scatter" (scatter -inf at the index) or "one_hot" (where(one_hot(index), -inf, x)).
    """

    def __init__(self, form="max", mask="scatter", **kwargs):
        super().__init__(**kwargs)
        self.form, self.mask = form, mask

    def experts_for_tokens(self, x):  # (T, D)
        scores = torch.softmax(self.gate(x), dim=-1)  # (T, E)
        remaining, weights, indices = scores, [], []
        for _ in range(self.activated):
            if self.form == "max":
                weight, index = remaining.max(dim=-1)  # (T,), (T,)
            else:
                index = remaining.argmax(dim=-1)  # (T,)
                weight = remaining.gather(1, index[:, None])[:, 0]
            weights.append(weight)
            indices.append(index)
            if self.mask == "scatter":
                remaining = remaining.scatter(1, index[:, None], float("-inf"))
            else:
                hit = torch.nn.functional.one_hot(index, remaining.shape[-1]).bool()
                remaining = remaining.masked_fill(hit, float("-inf"))
        weights, indices = torch.stack(weights, dim=-1), torch.stack(indices, dim=-1)  # (T, A)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        x1 = torch.nn.functional.silu(torch.einsum("td,taid->tai", x, self.w1[indices]))  # (T, A, I)
        x3 = torch.einsum("td,taid->tai", x, self.w3[indices])  # (T, A, I)
        out = torch.einsum("tai,tadi->tad", x1 * x3, self.w2[indices])  # (T, A, D)
        return torch.einsum("tad,ta->td", out, weights)  # (T, D)
