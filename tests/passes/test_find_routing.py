"""Detection: every routing site in real transformers MoE models, nothing else.

Compiled with the pass-only backend (AOTAutograd + Inductor decompositions + the lynx pass, run
eagerly), so the graphs are the aten graphs Inductor hands to its post-grad passes.
"""

import pytest
import torch

from lynx_compile.config import LynxConfig
from moe_models import (
    ARCHS,
    BATCH_SELECT,
    EXPERTS_IMPLS,
    TOPK,
    topks_in_selection,
    BeamSearchStep,
    GptFastMoE,
    PassOnlyBackend,
    SquaredScoresMoE,
    TopKSampler,
    VocabRouterLookalike,
    decode_hidden,
    decode_step,
    moe_block,
    tiny_model,
)

ROUTER_FORMS = {
    "mixtral": "softmax(linear)",
    "qwen3_moe": "softmax(linear)",
    "olmoe": "softmax(linear)",
    "gpt_oss": "linear",
    "deepseek_v3": "sigmoid(linear)+bias, masked",
}
DISPATCH = {  # the evidence explain names ({E}: the site's experts)
    "eager": "deferred to the next graph (experts loop), the router's module holds {E} stacked experts",
    "batched_mm": "gathers stacked expert weights",
    "grouped_mm": "sorted by expert",
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("experts_impl", EXPERTS_IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_finds_and_rewrites_the_routing_site_of_every_architecture(arch, experts_impl, dtype):
    block = moe_block(arch, experts_impl=experts_impl, dtype=dtype)
    backend = PassOnlyBackend()
    with torch.no_grad():
        torch.compile(block, backend=backend)(decode_hidden(8, dtype))

    [site] = backend.routing_sites
    assert site.router_form == ROUTER_FORMS[arch]
    assert (site.num_experts, site.top_k) == {"mixtral": (8, 2), "gpt_oss": (8, 2)}.get(arch, (16, 4))
    assert site.dispatch == DISPATCH[experts_impl].format(E=site.num_experts)
    assert site.rewritten and site.reason == "rewritten: decode graph (seq len 1)"
    # op counts: the routing top-k is gone, its lowered body brings its own small top-ks, and no
    # opaque op is left.
    assert backend.total("before", TOPK) - backend.total("after", TOPK) == 1 - topks_in_selection()
    assert backend.total("after", BATCH_SELECT) == 0
    if arch == "deepseek_v3":  # its group-limited router has two more top-ks that are not routing
        others = [s for s in backend.sites if not s.is_routing]
        assert len(others) == 2 and not any(s.rewritten for s in others)
        assert {s.reason for s in others} == {
            "scores are reshaped across the expert dim: not a router output",  # (T, groups, E / groups)
            "scores come from aten.sum.dim_IntList, not from a router linear over the experts"}


def test_module_path_is_recovered_from_dynamo_metadata():
    model = tiny_model("qwen3_moe", num_layers=2)
    backend = PassOnlyBackend()
    with torch.no_grad():
        torch.compile(model, backend=backend)(**decode_step(model, 4))
    assert [s.module_path for s in backend.routing_sites] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]


def test_gpt_fast_style_gather_einsum_moe():
    torch.manual_seed(0)
    moe = GptFastMoE().eval()
    backend = PassOnlyBackend()
    with torch.no_grad():
        torch.compile(moe, backend=backend)(torch.randn(8, 1, 32))
    [site] = backend.routing_sites
    assert (site.router_form, site.dispatch, site.rewritten) == (
        "softmax(linear)", "gathers stacked expert weights", True)
    assert backend.after[0][TOPK] == backend.before[0][TOPK] - 1 + topks_in_selection()


@pytest.mark.parametrize("module, inputs, reason", [
    (TopKSampler(), (torch.randn(4, 1, 32),),
     "not routing: the indices are unused (e.g. a top-k sampling threshold)"),
    (BeamSearchStep(), (torch.randn(8, 32), torch.randn(2, 4)),
     "scores are reshaped across the expert dim: not a router output"),
    (VocabRouterLookalike(), (torch.randn(4, 1, 32),),
     "2048 columns > max_experts=1024: a vocabulary, not experts"),
    (SquaredScoresMoE(), (torch.randn(4, 1, 32),),
     "scores come from aten.pow.Tensor_Scalar, not from a router linear over the experts"),
], ids=["sampling", "beam-search", "vocabulary", "unknown-router-form"])
def test_other_topks_are_left_exactly_as_they_were(module, inputs, reason):
    backend = PassOnlyBackend()
    with torch.no_grad():
        expected = module(*inputs)
        actual = torch.compile(module, backend=backend)(*inputs)
    [site] = backend.sites
    assert not site.is_routing and not site.rewritten
    assert site.reason == reason
    assert backend.before == backend.after  # graph untouched: same ops, same counts
    torch.testing.assert_close(actual, expected)


def test_beam_search_indices_used_as_numbers_are_not_routing():
    # Same as beam search but over a (B, V) matrix straight from a linear: the // and % give it away.
    class FlatBeam(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(32, 64, bias=False)

        def forward(self, hidden):
            batch, seq, dim = hidden.shape
            scores, flat = torch.topk(self.lm_head(hidden.view(-1, dim)), 4, dim=-1)
            return scores, flat // 16, flat % 16

    backend = PassOnlyBackend()
    with torch.no_grad():
        torch.compile(FlatBeam(), backend=backend)(torch.randn(4, 1, 32))
    [site] = backend.sites
    assert site.reason.startswith("not routing: the indices are used as numbers")


def test_max_experts_is_configurable():
    backend = PassOnlyBackend(LynxConfig(max_experts=4))
    with torch.no_grad():
        torch.compile(GptFastMoE(), backend=backend)(torch.randn(4, 1, 32))
    [site] = backend.sites
    assert site.reason == "8 columns > max_experts=4: a vocabulary, not experts"
    assert backend.before == backend.after
