"""Routers that choose experts by k rounds of max + mask: rewritten like top-k, or listed with why not."""

import pytest
import torch

import lynx_compile
from lynx_compile.config import LynxConfig
from moe_models import BATCH_SELECT, PassOnlyBackend, RepeatedMaxMoE, selection_kernel

FORMS = [("max", "scatter"), ("argmax", "one_hot"), ("max", "one_hot")]
ROUNDS = ("aten.max.dim", "aten.argmax.default")


def compile_and_run(module, hidden, config):
    backend = PassOnlyBackend(config)
    with torch.no_grad():
        out = torch.compile(module, backend=backend)(hidden)
    return backend, out


@pytest.mark.parametrize("form, mask", FORMS)
def test_decode_site_becomes_a_topk_site_and_is_rewritten_and_fused(form, mask):
    torch.manual_seed(0)
    module = RepeatedMaxMoE(form, mask, activated=3).eval()
    backend, _ = compile_and_run(module, torch.randn(8, 1, 32), LynxConfig(experts="fused"))
    [site] = backend.routing_sites
    assert site.router_form == "softmax(linear), top-k as 3 rounds of max + mask"
    assert site.rewritten and site.experts.startswith("fused:"), site.experts
    assert sum(backend.total("before", op) for op in ROUNDS) == 3
    # none left: the kernel's C++, or the selection body's own argmax
    assert sum(backend.total("after", op) for op in ROUNDS) == (0 if selection_kernel() else 1)
    assert backend.total("after", "lynx.moe_experts.default") == 1 and backend.total("after", BATCH_SELECT) == 0


@pytest.mark.parametrize("form, mask", FORMS)
def test_the_canonical_topk_computes_what_the_rounds_did(form, mask):
    """Opportunistic with keep_top = k keeps every token's own top-k, so the rewritten graph, whose
    rounds became one top-k, must reproduce eager."""
    torch.manual_seed(1)
    module = RepeatedMaxMoE(form, mask, activated=2).eval()
    hidden = torch.randn(4, 1, 32)
    with torch.no_grad():
        expected = module(hidden)
    backend, got = compile_and_run(module, hidden, LynxConfig(policy="opportunistic", keep_top=2))
    assert backend.routing_sites[0].rewritten
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_policy_none_leaves_the_rounds_exactly_as_written_and_explain_lists_them():
    module = RepeatedMaxMoE().eval()
    backend, _ = compile_and_run(module, torch.randn(4, 1, 32), LynxConfig(policy="none", experts="fused"))
    assert backend.before == backend.after
    report = lynx_compile.explain(module, torch.randn(4, 1, 32), config=LynxConfig(policy="none"))
    [site] = report.sites
    assert site.is_routing and not site.rewritten
    assert site.router_form == "softmax(linear), 2 rounds of max + mask"
    assert site.reason == "not rewritten: policy 'none' (max-rounds router left as written)"


def test_prefill_is_left_alone_with_the_phase_reason():
    backend, _ = compile_and_run(RepeatedMaxMoE().eval(), torch.randn(2, 5, 32), LynxConfig())
    [site] = backend.sites
    assert not site.rewritten and site.reason == "not rewritten: prefill graph (seq len 5)"
    assert backend.before == backend.after


class MaskedScoresReused(RepeatedMaxMoE):
    """The scores left after masking feed something else too: not a plain routing choice."""

    def experts_for_tokens(self, x):
        scores = torch.softmax(self.gate(x), dim=-1)
        w0, i0 = scores.max(dim=-1)
        rest = scores.scatter(1, i0[:, None], float("-inf"))
        w1, i1 = rest.max(dim=-1)
        indices = torch.stack([i0, i1], dim=-1)
        spread = torch.nan_to_num(rest, neginf=0.0).sum(dim=-1, keepdim=True)  # uses the masked scores
        out = torch.einsum("td,taid->tai", x, self.w1[indices])
        return torch.einsum("tai,ta->ti", out, torch.stack([w0, w1], -1))[:, :32] * spread


def test_masked_scores_used_elsewhere_are_left_alone_with_the_reason():
    backend, _ = compile_and_run(MaskedScoresReused().eval(), torch.randn(4, 1, 32), LynxConfig())
    [site] = backend.sites
    assert not site.rewritten and site.reason.startswith("not rewritten: the masked scores also feed")
    assert backend.before == backend.after


def test_a_full_sort_by_max_rounds_is_not_a_routing_choice():
    """k == E rounds pick every expert: not selection, and not reported as a routing site."""
    module = RepeatedMaxMoE(activated=8).eval()
    backend, _ = compile_and_run(module, torch.randn(4, 1, 32), LynxConfig())
    assert backend.sites == [] and backend.before == backend.after
