"""Zero-compute experts (passes/zero_experts.py): LongCat-Flash's router ranks E real experts plus
Z columns that do no work. The split is proven, selection treats the Z as free (never dropped,
never counted as loaded), and the fused dispatch reads no expert for their pairs."""

import pytest
import torch
import transformers

import lynx_compile
from lynx_compile import policies
from lynx_compile.lowering import selection

EXPERTS, ZERO, K, BATCH = 16, 4, 4, 32


def longcat_zero_block():
    from transformers.models.longcat_flash import modeling_longcat_flash

    config = transformers.LongcatFlashConfig(hidden_size=32, expert_ffn_hidden_size=16, n_routed_experts=EXPERTS,
                                             moe_topk=K, zero_expert_num=ZERO, num_hidden_layers=1, vocab_size=96)
    config._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    block = modeling_longcat_flash.LongcatFlashMoE(config)
    for param in block.parameters():  # a spread router (E + Z rows), small experts
        torch.nn.init.normal_(param, std=0.5 if param.dim() == 2 and param.shape[0] == EXPERTS + ZERO else 0.05)
    return block.eval()


def test_the_split_is_proven_and_the_parked_pairs_read_no_expert():
    report = lynx_compile.explain(longcat_zero_block(), torch.randn(BATCH, 1, 32))
    [site] = report.routing_sites
    assert site.rewritten and site.num_experts == EXPERTS + ZERO, site.reason
    assert site.dispatch == f"zero-compute experts: {EXPERTS} experts + {ZERO} that do no work (ids >= {EXPERTS}); " \
                            "real ids: sorted by expert"
    assert site.experts.endswith("; zero-compute pairs read no expert)"), site.experts


def test_policy_none_is_inductor_and_the_fused_op_computes_the_same():
    block, hidden = longcat_zero_block(), torch.randn(BATCH, 1, 32)
    with torch.no_grad():
        expected = torch.compile(block)(hidden)
        torch._dynamo.reset()
        assert torch.equal(torch.compile(block, backend="lynx", options={"policy": "none"})(hidden), expected)
        torch._dynamo.reset()
        fused = torch.compile(block, backend="lynx", options={"policy": "none", "experts": "fused"})(hidden)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)


def test_zero_compute_experts_are_never_counted_as_loaded():
    block = longcat_zero_block()
    with torch.no_grad(), lynx_compile.record(block) as recorder:
        torch.compile(block, backend="lynx")(torch.randn(BATCH, 1, 32))
    [calls] = recorder.calls.values()
    assert calls[0].num_experts == EXPERTS
    assert all(e < EXPERTS for e in calls[0].ids_before + calls[0].ids_after)
    assert calls[0].experts_after < calls[0].experts_before


@pytest.mark.parametrize("policy", [p for p in policies.POLICIES if p != "none"])
def test_every_policy_keeps_each_token_s_zero_compute_experts_and_reads_no_more_real_ones(policy):
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(BATCH, EXPERTS + ZERO, generator=generator) * 2
    logits[:, EXPERTS:] += 1.0  # zero-compute experts popular, as a trained router makes them
    scores = logits.softmax(-1)
    plain = scores.topk(K).indices
    params = policies.resolve_parameters(policy, {}, EXPERTS + ZERO, K)
    _, chosen = selection.batch_select(scores, logits, K, policy, params, num_routed=EXPERTS)
    for own, picked in zip(plain.tolist(), chosen.tolist()):
        assert {e for e in own if e >= EXPERTS} <= set(picked)  # a free expert a token chose stays
        assert len(set(picked)) == K
    real_before = {e for e in plain.flatten().tolist() if e < EXPERTS}
    real_after = {e for e in chosen.flatten().tolist() if e < EXPERTS}
    assert len(real_after) <= len(real_before)


class UnprovenSplit(torch.nn.Module):
    """Ids >= E are parked through a lookup table, not arithmetic on the ids: not proven."""

    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Linear(16, EXPERTS + ZERO, bias=False)
        self.w = torch.nn.Parameter(torch.randn(EXPERTS, 16, 16) / 4)
        self.register_buffer("park", torch.arange(EXPERTS + ZERO) % EXPERTS)

    def forward(self, x):  # (B, 1, H)
        flat = x.view(-1, 16)
        weights, ids = torch.topk(self.gate(flat).softmax(-1), K)
        zero = ids >= EXPERTS
        real = torch.where(zero, self.park[ids], ids)
        out = torch.einsum("th,tkhg,tk->tg", flat, self.w[real], weights.masked_fill(zero, 0.0))
        return out.view_as(x)


def test_an_unproven_split_is_left_as_written():
    report = lynx_compile.explain(UnprovenSplit(), torch.randn(8, 1, 16))
    [site] = report.sites
    assert not site.is_routing and not site.rewritten
    assert "zero-compute expert split lynx cannot prove" in site.reason, site.reason


def test_the_site_runs_the_one_call_cpu_selection_kernel():
    from moe_models import PassOnlyBackend, selection_kernel

    backend = PassOnlyBackend()
    with torch.no_grad():
        torch.compile(longcat_zero_block(), backend=backend)(torch.randn(BATCH, 1, 32))
    expected = 1 if selection_kernel() else 0
    assert backend.total("after", "lynx.select_experts_cpu.default") == expected
