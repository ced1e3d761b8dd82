"""Routing forms real MoE models use beyond the five tested everywhere: each is found, selected
(fewer distinct experts per decode step at B=32) and left bit-identical to default Inductor under
policy none; `explain` names the router form and the dispatch evidence.

  sqrt(softplus(linear)) + bias     DeepSeek-V4's router (transformers' DeepseekV4SparseMoeBlock)
  a (1, E) correction bias          LongCat-Flash's router (LongcatFlashMoE, no zero experts)
  a group mask filled with 0.0      DeepSeek-V2's group_limited_greedy router (DeepseekV2Moe)
  a sparse mixer                    PhiMoE's router (PhimoeSparseMoeBlock): 2 rounds of max(keepdim)
                                    + scatter(-inf); each weight a softmax over the scores within a
                                    threshold of the round's max, gathered at its expert
  a (batch, seq, E) top-k           hand-written (gpt-fast style): the top-k before the flatten
  a dense (T, E) dispatch           hand-written: top-k weights scattered, every expert weighted
  a norm before the router          hand-written: RMSNorm between the flatten and the router
"""

from __future__ import annotations

import pytest
import torch
import transformers

import lynx_compile
from moe_models import GptFastMoE

BATCH = 32


class ThreeDTopKMoE(GptFastMoE):
    """The router's top-k over (B, S, E) scores; the tokens are flattened only for the dispatch."""

    def forward(self, x):  # (B, S, D)
        batch, seq, dim = x.shape
        scores = torch.softmax(self.gate(x), dim=-1)  # (B, S, E)
        weights, indices = torch.topk(scores, self.activated, dim=-1)  # (B, S, A)
        weights = (weights / weights.sum(-1, keepdim=True)).view(-1, self.activated)  # (T, A)
        indices = indices.view(-1, self.activated)  # (T, A)
        flat = x.view(-1, dim)  # (T, D)
        x1 = torch.nn.functional.silu(torch.einsum("td,taid->tai", flat, self.w1[indices]))  # (T, A, I)
        x3 = torch.einsum("td,taid->tai", flat, self.w3[indices])  # (T, A, I)
        out = torch.einsum("tai,tadi->tad", x1 * x3, self.w2[indices])  # (T, A, D)
        return torch.einsum("tad,ta->td", out, weights).view(batch, seq, dim)


class DenseDispatchMoE(GptFastMoE):
    """Top-k weights scattered into a dense (T, E) matrix; every expert computed and weighted."""

    def experts_for_tokens(self, x):  # (T, D)
        scores = torch.softmax(self.gate(x), dim=-1)  # (T, E)
        weights, indices = torch.topk(scores, self.activated, dim=-1)  # (T, A)
        dense = torch.zeros_like(scores).scatter(1, indices, weights / weights.sum(-1, keepdim=True))  # (T, E)
        x1 = torch.nn.functional.silu(torch.einsum("td,eid->tei", x, self.w1))  # (T, E, I)
        x3 = torch.einsum("td,eid->tei", x, self.w3)  # (T, E, I)
        out = torch.einsum("tei,edi->ted", x1 * x3, self.w2)  # (T, E, D)
        return torch.einsum("ted,te->td", out, dense)  # (T, D)


class NormedRouterMoE(GptFastMoE):
    """An RMSNorm of the flattened tokens feeds the router (the phase rule looks through it)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.router_norm = torch.nn.RMSNorm(32)

    def experts_for_tokens(self, x):  # (T, D)
        scores = torch.softmax(self.gate(self.router_norm(x)), dim=-1)  # (T, E)
        weights, indices = torch.topk(scores, self.activated, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        x1 = torch.nn.functional.silu(torch.einsum("td,taid->tai", x, self.w1[indices]))
        x3 = torch.einsum("td,taid->tai", x, self.w3[indices])
        out = torch.einsum("tai,tadi->tad", x1 * x3, self.w2[indices])
        return torch.einsum("tad,ta->td", out, weights)


def deepseek_v4_block():
    from transformers.models.deepseek_v4 import modeling_deepseek_v4

    config = transformers.DeepseekV4Config(hidden_size=32, moe_intermediate_size=16, n_routed_experts=16,
                                           num_experts_per_tok=4, num_hidden_layers=1, vocab_size=96,
                                           mlp_layer_types=["moe"])
    config._experts_implementation = "grouped_mm"
    return _spread(modeling_deepseek_v4.DeepseekV4SparseMoeBlock(config, 0))


def deepseek_v2_block():
    from transformers.models.deepseek_v2 import modeling_deepseek_v2

    config = transformers.DeepseekV2Config(hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                           n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                                           topk_method="group_limited_greedy", n_shared_experts=1,
                                           first_k_dense_replace=0, num_hidden_layers=1, vocab_size=96)
    config._experts_implementation = "grouped_mm"
    return _spread(modeling_deepseek_v2.DeepseekV2Moe(config))


def phimoe_block():
    from transformers.models.phimoe import modeling_phimoe

    config = transformers.PhimoeConfig(hidden_size=32, intermediate_size=16, num_local_experts=16,
                                       num_experts_per_tok=2, num_hidden_layers=1, vocab_size=96)
    config._experts_implementation = "grouped_mm"
    return _spread(modeling_phimoe.PhimoeSparseMoeBlock(config))


def longcat_block():
    from transformers.models.longcat_flash import modeling_longcat_flash

    config = transformers.LongcatFlashConfig(hidden_size=32, expert_ffn_hidden_size=16, n_routed_experts=16,
                                             moe_topk=4, zero_expert_num=0, num_hidden_layers=1, vocab_size=96)
    return _spread(modeling_longcat_flash.LongcatFlashMoE(config))


def _spread(block):
    """Learned-looking router spread (random routers are near-uniform), small expert weights."""
    for name, param in block.named_parameters():
        torch.nn.init.normal_(param, std=0.5 if param.dim() == 2 and param.shape[0] == 16 else 0.05)
    return block.eval()


FORMS = {
    "deepseek_v4": (deepseek_v4_block, "sqrt(softplus(linear))+bias"),
    "longcat_flash": (longcat_block, "softmax(linear)+bias"),
    "deepseek_v2": (deepseek_v2_block, "softmax(linear), masked with 0"),
    "phimoe": (phimoe_block, "linear, top-k as 2 rounds of max + mask"),
    "topk_3d": (lambda: ThreeDTopKMoE(num_experts=16, activated=4).eval(), "softmax(linear)"),
    "dense_dispatch": (lambda: DenseDispatchMoE(num_experts=16, activated=4).eval(), "softmax(linear)"),
    "normed_router": (lambda: NormedRouterMoE(num_experts=16, activated=4).eval(), "softmax(linear)"),
}


@pytest.mark.parametrize("form", FORMS)
def test_each_form_is_found_selected_and_untouched_under_policy_none(form):
    make, router_form = FORMS[form]
    torch.manual_seed(0)
    block = make()
    hidden = torch.randn(BATCH, 1, 32)
    report = lynx_compile.explain(block, hidden)
    [site] = report.routing_sites
    assert site.router_form == router_form and site.rewritten, (site.router_form, site.reason)
    assert site.dispatch  # the evidence, named
    with torch.no_grad(), lynx_compile.record(block) as recorder:
        torch.compile(block, backend="lynx")(hidden)
    [calls] = recorder.summary().values()
    assert calls["experts_after"] < calls["experts_before"]

    torch._dynamo.reset()
    with torch.no_grad():
        expected = torch.compile(block)(hidden)
        torch._dynamo.reset()
        got = torch.compile(block, backend="lynx", options={"policy": "none"})(hidden)
    assert torch.equal(got, expected)


def test_a_zero_filled_group_mask_is_handed_to_selection_as_minus_infinity():
    """Masked experts stay ineligible: selection ranks where(mask, -inf, scores), not the 0.0 fill."""
    from moe_models import PassOnlyBackend

    backend = PassOnlyBackend()
    with torch.no_grad():
        torch.compile(deepseek_v2_block(), backend=backend)(torch.randn(BATCH, 1, 32))
    [select] = [n for g in backend.graphs for n in g.graph.nodes  # batch_select, lowered to one call on CPU
                if str(n.target).startswith(("lynx.batch_select", "lynx.select_experts_cpu"))]
    scores = select.args[0]
    assert scores.target is torch.ops.aten.where.self and scores.args[1].args[0] == float("-inf"), scores.format_node()
    assert scores.args[2].target is torch.ops.aten.div.Tensor  # the softmax, unmasked where the mask is off


def test_the_sparse_mixer_s_weights_are_its_own_formula_at_the_chosen_experts():
    """A policy that keeps every token's own top-k (opportunistic, keep_top = k) must reproduce
    eager exactly in meaning: the rounds became one top-k, and the weights (thresholds at the
    round's max, softmax over what survives, gather) are recomputed from its columns."""
    block, hidden = phimoe_block(), torch.randn(BATCH, 1, 32)
    with torch.no_grad():
        expected = block(hidden)
        got = torch.compile(block, backend="lynx", options={"policy": "opportunistic", "keep_top": 2})(hidden)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


FUSED = {"deepseek_v2": "grouped_mm", "phimoe": "grouped_mm", "topk_3d": "gather + bmm",
         "dense_dispatch": "dense (T, E)", "normed_router": "gather + bmm"}


@pytest.mark.parametrize("form", FUSED)
def test_each_form_s_dispatch_is_fused_and_computes_what_the_model_does(form):
    """Policy none with the fused op; where the site is rewritten only when it selects (max-rounds
    routers, a (batch, seq, E) top-k), opportunistic keeping each token's own k, which chooses
    exactly what the model did."""
    make, _ = FORMS[form]
    torch.manual_seed(0)
    block, hidden = make(), torch.randn(BATCH, 1, 32)
    keep_own = {"phimoe": 2, "topk_3d": 4}
    options = {"policy": "opportunistic", "keep_top": keep_own[form]} if form in keep_own else {"policy": "none"}
    report = lynx_compile.explain(block, hidden, config=lynx_compile.LynxConfig(experts="fused", **options))
    [site] = report.routing_sites
    assert site.experts.startswith(f"fused: {FUSED[form]} dispatch -> lynx.moe_experts"), site.experts
    torch._dynamo.reset()
    with torch.no_grad():
        expected = block(hidden)
        got = torch.compile(block, backend="lynx", options={"experts": "fused", **options})(hidden)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_dense_dispatch_no_longer_computes_every_expert():
    """The dense form runs all E experts for every token; fused, only the k each token uses."""
    from moe_models import PassOnlyBackend

    backend = PassOnlyBackend(lynx_compile.LynxConfig(experts="fused"))
    with torch.no_grad():
        torch.compile(FORMS["dense_dispatch"][0](), backend=backend)(torch.randn(BATCH, 1, 32))
    assert backend.total("before", "aten.bmm.default") >= 3 and backend.total("after", "aten.bmm.default") == 0
    assert backend.total("after", "lynx.moe_experts.default") == 1


@pytest.mark.parametrize("policy", ["moved_mass", "none"])
def test_the_sparse_mixer_compiles_with_a_symbolic_batch(policy):
    """dynamic=True gives T symbolic (so does the recompile Dynamo makes when the batch size
    changes): the rewrite must not hash or guard on it."""
    block = phimoe_block()
    compiled = torch.compile(block, backend="lynx", options={"policy": policy}, dynamic=True)
    with torch.no_grad():
        for batch in (8, 3):
            hidden = torch.randn(batch, 1, 32)
            got = compiled(hidden)
            assert torch.isfinite(got).all()
            if policy == "none":
                torch.testing.assert_close(got, block(hidden), rtol=1e-5, atol=1e-6)


class FewGroupsMoE(GptFastMoE):
    """DeepSeek-V2's 0.0-filled group mask where one group of 2 experts is kept and k = 3: every
    token's third pick is a masked expert, weight 0 in the model (not -inf)."""

    def experts_for_tokens(self, x):  # (T, D)
        scores = self.gate(x).softmax(-1)  # (T, E)
        groups = scores.view(x.shape[0], 8, -1).max(-1).values  # (T, 8)
        kept = torch.zeros_like(groups).scatter_(1, torch.topk(groups, 1, dim=-1)[1], 1)  # (T, 8)
        mask = kept.unsqueeze(-1).expand(-1, 8, 2).reshape(x.shape[0], -1)  # (T, E)
        weights, indices = torch.topk(scores.masked_fill(~mask.bool(), 0.0), self.activated, dim=-1)
        x1 = torch.nn.functional.silu(torch.einsum("td,taid->tai", x, self.w1[indices]))
        x3 = torch.einsum("td,taid->tai", x, self.w3[indices])
        out = torch.einsum("tai,tadi->tad", x1 * x3, self.w2[indices])
        return torch.einsum("tad,ta->td", out, weights)


@pytest.mark.parametrize("options", [{}, {"policy": "opportunistic", "keep_top": 3}])
def test_a_zero_filled_mask_with_fewer_than_k_unmasked_experts_keeps_the_model_s_zero_weights(options):
    torch.manual_seed(0)
    block, hidden = FewGroupsMoE(num_experts=16, activated=3).eval(), torch.randn(BATCH, 1, 32)
    with torch.no_grad():
        expected = block(hidden)
        got = torch.compile(block, backend="lynx", options=options)(hidden)
    assert torch.isfinite(got).all()
    if options:  # every token keeps its own top-k: the model's output
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
