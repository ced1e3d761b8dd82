"""The run-time switch calibration measures through: one op, the active table's setting per site."""

import torch

import lynx_compile
from lynx_compile import policies
from lynx_compile.lowering import ops, selection
from lynx_compile.lowering.switch_select import use_settings
from lynx_compile.policies import SiteSetting
from moe_models import skewed_router_logits, tiny_model


def test_each_site_runs_the_setting_its_table_names_and_plain_top_k_otherwise():
    model = tiny_model("mixtral", num_layers=2)
    weights = [model.model.layers[i].mlp.gate.weight for i in (0, 1)]  # name the sites
    logits = skewed_router_logits()  # diverse second choices: opportunistic remaps them
    scores = torch.softmax(logits, dim=-1)
    plain = torch.topk(scores, 2).indices
    setting = SiteSetting("opportunistic", (("keep_top", 1),), "test")
    _, expected = policies.select("opportunistic", scores, logits, 2, keep_top=1)
    assert not torch.equal(expected, plain)

    def run(weight):
        return ops.switch_select(scores, logits, 2, selection.NO_DECODE_BOUND, None, weight, "gate")[1]

    assert torch.equal(run(weights[0]), plain)  # no table: plain top-k
    with use_settings(model, {"model.layers.0.mlp.gate": setting}), lynx_compile.record(model) as recorder:
        assert torch.equal(run(weights[0]), expected)
        assert torch.equal(run(weights[1]), plain)  # not named: plain top-k
        prefill = ops.switch_select(scores, logits, 2, 4, None, weights[0], "gate")[1]  # 16 tokens > 4 rows
        assert torch.equal(prefill, plain)
    calls = recorder.calls
    assert [c.experts_after for c in calls["model.layers.0.mlp.gate"]] == [torch.unique(expected).numel(),
                                                                           torch.unique(plain).numel()]
    assert [c.decode for c in calls["model.layers.0.mlp.gate"]] == [True, False]
    assert calls["model.layers.1.mlp.gate"][0].experts_after == torch.unique(plain).numel()
