"""record(): distinct experts before/after selection, per site and call, only inside the block."""

import torch

import lynx_compile
from lynx_compile import LynxConfig
from lynx_compile.record import report_selection
from moe_models import PassOnlyBackend, RoutingProbe, decode_step, skewed_mixtral_block, tiny_model


def test_record_counts_experts_before_and_after_per_call():
    block, hidden = skewed_mixtral_block()
    probe = RoutingProbe(block).eval()
    compiled = torch.compile(probe, backend="lynx")
    with torch.no_grad():
        _, plain, _ = probe(hidden)
        compiled(hidden)  # outside record(): normal graph, nothing recorded
        with lynx_compile.record() as rec:
            _, chosen, _ = compiled(hidden)
            compiled(hidden[:8])
        compiled(hidden)
    [(site, calls)] = rec.calls.items()
    assert site == "gate"
    assert [c.num_tokens for c in calls] == [16, 8]
    assert calls[0].experts_before == torch.unique(plain).numel()
    assert calls[0].experts_after == torch.unique(chosen).numel() < calls[0].experts_before
    # choices moved off each token's own top-k, counted in the compiled recording variant
    assert calls[0].choices == chosen.numel()
    assert calls[0].remapped == (chosen.unsqueeze(-1) != plain.unsqueeze(-2)).all(-1).sum() > 0
    assert all(c.decode for c in calls)
    assert "gate" in rec.table()


def test_record_names_layers_and_marks_prefill_with_eager_experts():
    # transformers' `eager` experts graph-break inside the block, so one compiled graph serves both
    # layers; passing the model names each call after the router weight it used.
    # 4 experts and no Inductor codegen (the pass and its recording variant run eagerly): the
    # loop compiles a graph per expert it visits.
    model = tiny_model("mixtral", num_layers=2, experts_impl="eager", num_local_experts=4)
    compiled = torch.compile(model, backend=PassOnlyBackend(record=True))
    with torch.no_grad(), lynx_compile.record(model) as rec:
        compiled(**decode_step(model, 8))
        compiled(torch.randint(3, 90, (2, 5)))
    assert sorted(rec.calls) == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    for calls in rec.calls.values():
        assert [(c.num_tokens, c.decode) for c in calls] == [(8, True), (10, False)]
        prefill = calls[1]
        assert prefill.experts_after == prefill.experts_before
    summary = rec.summary()
    assert summary["model.layers.0.mlp.gate"]["calls"] == 1  # decode calls only


def test_group_limited_routing_is_reduced_like_any_other():
    """DeepSeek-V3's group limit (E=8, k=2, 2 groups, each token confined to 1): the surviving set
    must hold k eligible experts for every token, or tokens fall back to their own experts and
    refill the union (it stayed 8 of 8 before the fix)."""
    model = tiny_model("deepseek_v3", num_layers=1, router_std=0.05, n_routed_experts=8, num_experts_per_tok=2,
                       n_group=2, topk_group=1)
    compiled = torch.compile(model, backend="lynx", options={"policy": "affinity_binning"})
    with torch.no_grad(), lynx_compile.record(model) as rec:
        logits = compiled(**decode_step(model, 32)).logits
    assert torch.isfinite(logits).all() and rec.calls
    for site, calls in rec.calls.items():
        [call] = calls
        assert call.decode and call.experts_before == 8
        assert call.experts_after <= 6, (site, call)


def test_generate_over_many_batch_sizes_compiles_no_more_graphs_and_keeps_selecting():
    """generate() at B = 1..64: Dynamo makes the batch dynamic by the second size; lynx must add no
    guard of its own (same graph count as without selection), and the graph compiled from small
    batches must still select at B=48."""
    batch_sizes = (1, 2, 3, 5, 8, 16, 33, 48, 64)
    prompt = torch.randint(3, 90, (64, 4), generator=torch.Generator().manual_seed(0))
    graphs, recorders = {}, {}
    for policy in ("none", "affinity_binning"):
        torch._dynamo.reset()
        model = tiny_model("mixtral", num_layers=1, router_std=0.1)
        backend = PassOnlyBackend(LynxConfig(policy=policy), record=True)
        model.compile(backend=backend)
        with torch.no_grad(), lynx_compile.record(model) as recorders[policy]:
            for batch in batch_sizes:
                model.generate(prompt[:batch], attention_mask=torch.ones_like(prompt[:batch]), max_new_tokens=3,
                               do_sample=False, pad_token_id=0)
        graphs[policy] = len(backend.graphs)
    assert graphs["affinity_binning"] == graphs["none"]
    [calls] = recorders["affinity_binning"].calls.values()
    at_48 = [c for c in calls if c.num_tokens == 48 and c.decode]
    assert len(at_48) == 2  # two decode steps
    assert all(c.experts_after < c.experts_before for c in at_48)


def test_remapped_counts_live_choices_outside_the_tokens_own_top_k():
    plain = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    chosen = torch.tensor([[1, 0], [2, 1], [0, 1], [6, 7]])  # row 1: 3 -> 1; row 2: both moved
    weight = torch.zeros(8, 4)
    with lynx_compile.record() as rec:
        report_selection("gate", plain, chosen, weight, 8, decode=True)
        # row 2 is dead (padding): its choices are neither counted nor remapped
        report_selection("gate", plain, chosen, weight, 8, decode=True,
                         voters=torch.tensor([True, True, False, True]))
    full, live = rec.calls["gate"]
    assert (full.choices, full.remapped) == (8, 3)
    assert (live.choices, live.remapped) == (6, 1)
    assert rec.summary()["gate"]["remapped_fraction"] == (3 + 1) / (8 + 6)
