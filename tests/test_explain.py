"""explain(): one entry per top-k, printable, with the graph before and after the rewrite."""

import torch

from lynx_compile import LynxConfig, explain
from moe_models import decode_ids, decode_step, moe_block, tiny_model


def test_explain_reports_sites_and_graphs():
    model = tiny_model("qwen3_moe", num_layers=2)
    report = explain(model, **decode_step(model, 4))
    assert [s.module_path for s in report.routing_sites] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    site = report.sites[0]
    assert (site.router_form, site.num_experts, site.top_k, site.dispatch, site.phase, site.rewritten) == (
        "softmax(linear)", 16, 4, "sorted by expert", "decode", True)
    [graph] = report.graphs
    assert graph.before.count("aten.topk.default") == 2 and "lynx.batch_select" not in graph.before
    assert graph.after.count("lynx.batch_select.default") == 2 and "aten.topk.default" not in graph.after
    assert "lynx.batch_select" not in graph.lowered
    text = str(report)
    assert text.splitlines()[0] == ("lynx explain (policy=moved_mass): 1 graph(s), 2 top-k, "
                                    "2 routing site(s), 2 rewritten")
    assert "model.layers.1.mlp.gate" in text and "rewritten: decode graph (seq len 1)" in text


def test_explain_shows_why_a_topk_is_left_alone():
    block = moe_block("deepseek_v3")
    report = explain(block, torch.randn(4, 1, 64), config=LynxConfig(policy="none"))
    reasons = [s.reason for s in report.sites]
    assert reasons == [
        "scores are reshaped across the expert dim: not a router output",  # the group top-k
        "scores come from aten.sum.dim_IntList, not from a router linear over the experts",
        "not rewritten: policy 'none'",
    ]
    assert report.sites[2].router_form == "sigmoid(linear)+bias, masked"
    assert report.graphs[0].before == report.graphs[0].after


def test_a_one_token_prompt_is_prefill_and_left_alone():
    """(B, 1) ids with nothing cached are the prompts' prefill: the attention's keys are the new
    tokens alone. The (batch, seq, hidden) shape is the same as a decode step's."""
    model = tiny_model("qwen3_moe", num_layers=1)
    report = explain(model, decode_ids(4))
    [site] = report.routing_sites
    assert (site.phase, site.rewritten) == ("prefill", False)
    assert site.reason.startswith("not rewritten: prefill of one-token prompts")
    assert "lynx.batch_select" not in report.graphs[0].after
