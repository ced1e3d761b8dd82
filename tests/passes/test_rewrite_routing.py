"""The routing rewrite, stage by stage (op counts) and end to end (what selection does)."""

import pytest
import torch

from lynx_compile.config import LynxConfig
from lynx_compile.passes.find_routing import find_routing_sites
from lynx_compile.passes.lower_selection import lower_selection
from lynx_compile.passes.rewrite_routing import rewrite_routing_sites
from moe_models import (
    BATCH_SELECT,
    SELECT_KERNEL,
    TOPK,
    topks_in_selection,
    PassOnlyBackend,
    RoutingProbe,
    count_ops,
    decode_hidden,
    moe_block,
    skewed_mixtral_block,
)


def capture_aten_graph(module, *inputs):
    """The aten graph Inductor would hand to its post-grad passes (decomposed, functional)."""
    backend = PassOnlyBackend(run_pass=False)
    with torch.no_grad():
        torch.compile(module, backend=backend)(*inputs)
    [gm] = backend.graphs
    return gm


@pytest.mark.parametrize("path", ["kernel", "body"])
def test_each_stage_changes_exactly_the_ops_it_should(path, monkeypatch):
    monkeypatch.setenv("LYNX_SELECTION", path)
    gm = capture_aten_graph(moe_block("mixtral"), decode_hidden(8))
    before = count_ops(gm.graph)
    assert (before[TOPK], before[BATCH_SELECT]) == (1, 0)

    config = LynxConfig(policy="affinity_binning")  # the op counts below are AffinityBinning's body
    sites = find_routing_sites(gm.graph, config)
    assert rewrite_routing_sites(gm.graph, sites, config) == 1
    rewritten = count_ops(gm.graph)
    assert (rewritten[TOPK], rewritten[BATCH_SELECT]) == (0, 1)
    # nothing else moved: every other op count is unchanged
    assert {op: n for op, n in rewritten.items() if op not in (TOPK, BATCH_SELECT)} == \
        {op: n for op, n in before.items() if op not in (TOPK, BATCH_SELECT)}

    assert lower_selection(gm.graph) == 1
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    lowered = count_ops(gm.graph)
    assert (lowered[TOPK], lowered[BATCH_SELECT]) == (topks_in_selection(), 0)
    if path == "kernel":  # the plain top-k and one C++ call
        assert lowered[SELECT_KERNEL] == 1 and lowered["aten.sort.stable"] == 0
        return
    # experts by gap evidence, then by vote count per bin (beta + 1 = 2 sorts); tokens' own order;
    # the remap's k choices by score
    assert lowered["aten.sort.stable"] == 5
    assert lowered["aten.floor.default"] == 2  # the binning, and the gap evidence in integer units


def test_policy_none_changes_nothing():
    gm = capture_aten_graph(moe_block("qwen3_moe"), decode_hidden(8))
    graph_text = str(gm.graph)
    config = LynxConfig(policy="none")
    sites = find_routing_sites(gm.graph, config)
    assert rewrite_routing_sites(gm.graph, sites, config) == 0
    assert sites[0].is_routing and sites[0].reason == "not rewritten: policy 'none'"
    assert str(gm.graph) == graph_text


def test_skewed_batch_is_served_by_fewer_experts_with_k_distinct_each_and_confident_top1_kept():
    block, hidden = skewed_mixtral_block()
    probe = RoutingProbe(block).eval()
    with torch.no_grad():
        _, plain_indices, _ = probe(hidden)
        output, indices, weights = torch.compile(
            probe, backend=PassOnlyBackend(LynxConfig(policy="affinity_binning")))(hidden)
        logits = block.gate(hidden.view(-1, hidden.shape[-1]))[0]

    assert torch.unique(indices).numel() < torch.unique(plain_indices).numel()
    assert torch.unique(indices).numel() <= 3
    assert all(len(set(row.tolist())) == 2 for row in indices)  # k distinct experts per token
    top2 = torch.topk(logits, 2).values
    confident = (top2[:, 0] - top2[:, 1]) > 1 / 0.7  # Mixtral's default alpha = 0.7
    assert confident.sum() == 4
    assert torch.equal(indices[confident, 0], plain_indices[confident, 0])

    # downstream is unchanged: weights are the model's renormalized softmax at the new experts,
    # and the experts ran exactly those experts with those weights
    probs = torch.softmax(logits.float(), dim=-1).gather(1, indices)
    torch.testing.assert_close(weights, probs / probs.sum(-1, keepdim=True))
    with torch.no_grad():
        expected = block.experts(hidden.view(-1, hidden.shape[-1]), indices, weights).view_as(hidden)
    torch.testing.assert_close(output, expected)
