"""record(): distinct experts before/after selection, per site and call, only inside the block."""

import torch

import lynx_compile
from moe_models import RoutingProbe, decode_ids, skewed_mixtral_block, tiny_model


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
    assert all(c.decode for c in calls)
    assert "gate" in rec.table()


def test_record_names_layers_and_marks_prefill_with_eager_experts():
    # transformers' `eager` experts graph-break inside the block, so one compiled graph serves both
    # layers; passing the model names each call after the router weight it used.
    model = tiny_model("mixtral", num_layers=2, experts_impl="eager")
    compiled = torch.compile(model, backend="lynx")
    with torch.no_grad(), lynx_compile.record(model) as rec:
        compiled(decode_ids(8))
        compiled(torch.randint(3, 90, (2, 5)))
    assert sorted(rec.calls) == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    for calls in rec.calls.values():
        assert [(c.num_tokens, c.decode) for c in calls] == [(8, True), (10, False)]
        prefill = calls[1]
        assert prefill.experts_after == prefill.experts_before
    summary = rec.summary()
    assert summary["model.layers.0.mlp.gate"]["calls"] == 1  # decode calls only
