"""Routing forms real MoE models use beyond the five tested everywhere: each is found, selected
(fewer distinct experts per decode step at B=32) and left bit-identical to default Inductor under
policy none; `explain` names the router form and the dispatch evidence.

  sqrt(softplus(linear)) + bias     DeepSeek-V4's router (transformers' DeepseekV4SparseMoeBlock)
  a (1, E) correction bias          LongCat-Flash's router (LongcatFlashMoE, no zero experts)
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
