"""Lower `lynx::batch_select` into the aten ops of its body, so Inductor generates its kernels.

Before (after the routing rewrite):

    batch_select = lynx.batch_select(div, mm, 2, 0.7, 1, 1.43, -1)
    getitem      = batch_select[0]                     # (T, k) values
    getitem_1    = batch_select[1]                     # (T, k) indices

After:

    convert_element_type = prims.convert_element_type(mm, float32)
    amax = aten.amax(...); sub = aten.sub(...); floor = aten.floor(...); ...
    sort = aten.sort(...); topk = aten.topk(sort_key, 2, largest=False); ...
    gather_1 = aten.gather(div, 1, gather)             # (T, k) values
    gather   = aten.gather(token_order, 1, slots)      # (T, k) indices

The body (`selection.batch_select`) is traced with make_fx under the graph's fake mode, with
Inductor's decomposition table, exactly as Inductor's pattern matcher traces replacements; the
traced nodes carry valid `meta["val"]`, and symbolic sizes stay symbolic (no guards). Inductor then
fuses the elementwise/reduction parts into generated C++ (CPU) or Triton (CUDA) kernels; the
sorts and small top-ks stay library calls.
"""

from __future__ import annotations

import contextlib
import operator

import torch
from torch._inductor.pattern_matcher import fwd_only
from torch.fx import Graph, Node

from . import selection
from .ops import batch_select, observe_selection


def expand_batch_select(graph: Graph, record: bool = False) -> int:
    """Replace every lynx.batch_select node by its traced body; return how many were expanded.

    record: also route the chosen indices through lynx.observe_selection (recording variant).
    """
    count = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is batch_select:
            _expand_one(graph, node, record)
            count += 1
    return count


def _expand_one(graph: Graph, node: Node, record: bool) -> None:
    names = ("live", "policy", "expert_budget", "keep_top")
    defaults = (None, selection.DEFAULT_POLICY, 0, 0)
    scores, logits, k, alpha, beta, confidence_gap, bound, *rest = node.args
    live, policy, expert_budget, keep_top = (
        rest[i] if i < len(rest) else node.kwargs.get(name, default) for i, (name, default) in
        enumerate(zip(names, defaults)))
    site_label, router_weight = node.meta["lynx_site"]
    # Inputs that are graph nodes become placeholders of the traced body; constants are baked in.
    optional = {"bound": bound, "live": live}
    traced_inputs = [name for name, value in optional.items() if isinstance(value, Node)]

    def body(scores_value, logits_value, weight_value, *node_values):
        given = dict(zip(traced_inputs, node_values))
        token_bound = given.get("bound", bound)
        values, indices = selection.batch_select(
            scores_value, logits_value, k, alpha, beta, confidence_gap, token_bound, given.get("live"),
            policy, expert_budget, keep_top)
        if record:
            plain = torch.topk(scores_value, k, dim=-1).indices
            voters = selection.voting_rows(scores_value, logits_value, k, given.get("live"))
            budget = expert_budget if policy == "gate_mass_budget" else -1
            indices = observe_selection(plain, indices, weight_value, scores_value.shape[1],
                                        token_bound, site_label, voters, budget)
        return values, indices

    inputs = [scores, logits, router_weight] + [optional[name] for name in traced_inputs]
    example_values = [_val(x) for x in inputs]
    fake_mode = torch._guards.detect_fake_mode(example_values)
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        traced = fwd_only(body, example_values)

    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    with graph.inserting_before(node):
        outputs = graph.graph_copy(traced.graph, dict(zip(placeholders, inputs)))
    for user in list(node.users):
        assert user.target is operator.getitem, f"unexpected user of batch_select: {user}"
        user.replace_all_uses_with(outputs[user.args[1]])
        graph.erase_node(user)
    graph.erase_node(node)


def _val(node: Node):
    return node.meta["val"]


