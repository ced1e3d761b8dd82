"""A routing top-k over (batch, seq, E) scores -> the same top-k over (T, E), viewed back.

Before (a router whose top-k runs before the tokens are flattened):

    view   = aten.view(mm, [B, S, E])                      # (B, S, E) router scores
    topk   = aten.topk(view, k)                            # values, indices (B, S, k)
    getitem_1 = topk[1] -> view(getitem_1, [-1, k]) -> dispatch

After (only for a site that will be rewritten: decode, a selecting setting):

    flat   = aten.view(view, [-1, E])                      # (T, E)
    topk_1 = aten.topk(flat, k)                            # (T, k): a site like any other
    values = aten.view(topk_1[0], [B, S, k]); indices = aten.view(topk_1[1], [B, S, k])

Why it is valid: a top-k along the last dim treats every (batch, seq) row on its own, so it is the
2-D top-k of the rows in row-major order, reshaped; the consumers get the same shapes and values.
Every later stage (fusion, rewrite, lowering) then sees the (T, E) form it knows.
"""

from __future__ import annotations

import operator

from torch.fx import Graph, Node

from . import fx_match as fm
from .find_routing import RoutingSite
from .fx_match import aten


def flatten_routing_topks(graph: Graph, sites: list[RoutingSite]) -> int:
    """Flatten every 3-D top-k of a site that will be rewritten; return how many."""
    count = 0
    for site in sites:
        shape = fm.shape_of(site.topk.args[0]) if fm.is_call(site.topk, aten.topk.default) else None
        if not (shape and len(shape) == 3 and site.selectable and site.setting is not None and site.setting.selects):
            continue
        site.topk = _flatten(graph, site.topk, site.top_k)
        count += 1
    return count


def _flatten(graph: Graph, topk: Node, k: int) -> Node:
    scores = topk.args[0]
    value = fm.fake_value(scores)
    with graph.inserting_before(topk):
        sizes = [dim if isinstance(dim, int) else _size(graph, scores, index) for index, dim in enumerate(value.shape[:2])]
        flat = graph.call_function(aten.view.default, (scores, [-1, value.shape[-1]]))
        flat.meta["val"] = value.view(-1, value.shape[-1])
        new = graph.call_function(aten.topk.default, (flat, k))
        new.meta.update({key: topk.meta[key] for key in ("nn_module_stack", "stack_trace", "from_node") if key in topk.meta})
        new.meta["val"] = tuple(flat.meta["val"].topk(k))
    for index, getitem in fm.getitem_users(topk).items():
        with graph.inserting_before(getitem):
            item = graph.call_function(operator.getitem, (new, index))
            item.meta["val"] = new.meta["val"][index]
            back = graph.call_function(aten.view.default, (item, [*sizes, k]))
            back.meta["val"] = item.meta["val"].view(*value.shape[:2], k)
        getitem.replace_all_uses_with(back)
        graph.erase_node(getitem)
    graph.erase_node(topk)
    return new


def _size(graph: Graph, tensor: Node, dim: int) -> Node:
    size = graph.call_function(aten.sym_size.int, (tensor, dim))
    size.meta["val"] = fm.fake_value(tensor).shape[dim]
    return size
