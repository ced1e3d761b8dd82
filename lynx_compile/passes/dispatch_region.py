"""Find the expert dispatch after a routing site: the region of the graph that computes it.

For each decode routing site, the region is every node downstream of the top-k's indices up to the
first (T, H) tensor computed from at least two reads of stacked expert weights, whatever wrote
it: transformers' `grouped_mm` (sort + offsets + grouped GEMMs, `transformers::grouped_mm_fallback`
on CPU) or `batched_mm` (a per-pair weight gather + bmm), gpt-fast's gather + einsum, GPT-OSS's
biased interleaved experts. Its inputs, followed up through single-input reshapes, must be
exactly: the ids, one (T, H) hidden state, one (T, k) routing weight, parameters with E rows
(weights (E, ., .), biases (E, .)) and sizes. Float tensors computed from those before the ids are
used (a dense dispatch computes every expert for every token, then weighs them by a (T, E) matrix
scattered from the top-k) are part of the region. Anything else is reported, with the node it
reads, and the dispatch is left as written.

Under expert parallelism (a proven id mapping, `expert_parallel.py`) the region starts at this
rank's local ids, whose value L marks a pair another rank serves, and reads the rank's L experts:

    before: local = where(off_rank, L, ids % L); w = masked_fill(weights, off_rank, 0.0)
            sort(local) ... histc(L bins) ... masks of local >= L ... grouped GEMMs -> (T, H)
    after:  lynx.moe_experts(hidden, w, local, <views of the rank's L experts>)   # id L adds nothing

What the region computes is proven separately (`expert_layout.py`); replacing it is
`fuse_experts.py`'s job.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import fx_match as fm
from .find_routing import RoutingSite

aten = torch.ops.aten
# Ops the region's inputs may be followed up through: one tensor in, same values rearranged.
_FOLLOW_UP = fm.LAYOUT_OPS | {aten.repeat_interleave.self_int, aten.repeat.default}
_MAX_REGION = 400


@dataclasses.dataclass
class Dispatch:
    """The expert dispatch of one routing site, as a region of the graph."""

    output: Node  # (T, H): the combined expert outputs
    hidden: Node  # (T, H)
    weights: Node  # (T, k)
    ids: Node  # (T, k)
    params: list[Node]
    inputs: list[Node]  # every region input, in the order the region module takes them
    nodes: list[Node]  # the region, in graph order
    kind: str  # which dispatch it reads like (for explain)
    sentinel: bool = False  # ids may hold E (the params' rows): "served by another rank", adds nothing
    parked: bool = False  # zero-compute pairs parked, weight 0, on a real id (maybe one their token also uses)


def find_dispatch_region(graph: Graph, site: RoutingSite) -> Dispatch | str:
    if site.parallel is not None:  # this rank's local ids and experts
        ids, num_experts = site.parallel.local_ids, site.parallel.local_experts
    elif site.zero_experts is not None:  # the ids the real experts run (zero-compute pairs parked)
        ids, num_experts = site.zero_experts.real_ids, site.zero_experts.num_experts
    else:
        ids, num_experts = fm.getitem_users(site.topk).get(1), site.num_experts
    if ids is None:
        return "the top-k indices are unused"
    ids_shape = fm.shape_of(ids)
    if ids_shape is None or len(ids_shape) != 2:
        return ("the top-k's ids are not (tokens, k) (a (batch, seq, E) top-k is flattened only where the site "
                "selects)")
    router_input = site.logits.args[1] if site.logits.target is aten.addmm.default else site.logits.args[0]
    hidden_size = fm.shape_of(router_input)[-1]
    order = {node: i for i, node in enumerate(graph.nodes)}
    downstream = _downstream(ids)
    for candidate in sorted(downstream, key=order.__getitem__):
        if candidate.op != "call_function" or not _is_tokens_by_hidden(candidate, ids_shape[0], hidden_size):
            continue
        region = _region(candidate, ids, downstream, ids_shape, hidden_size, num_experts, order)
        if isinstance(region, Dispatch):
            region.sentinel = site.parallel is not None
            region.parked = site.zero_experts is not None
            return region
        if region != "skip":
            return region
    return "no (tokens, hidden) output computed from the expert weights after the top-k"


def _downstream(start: Node) -> set[Node]:
    seen, stack = set(), [start]
    while stack and len(seen) < 50 * _MAX_REGION:
        for user in stack.pop().users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return seen


def _is_routing_weights(node: Node, num_tokens, top_k: int) -> bool:
    value = fm.fake_value(node)
    return (isinstance(value, torch.Tensor) and value.dim() == 2 and value.is_floating_point()
            and statically_known_true(value.shape[0] == num_tokens) and value.shape[1] == top_k)


def _is_tokens_by_hidden(node: Node, num_tokens, hidden_size) -> bool:
    value = fm.fake_value(node)
    return (isinstance(value, torch.Tensor) and value.dim() == 2 and value.is_floating_point()
            and statically_known_true(value.shape[0] == num_tokens)
            and statically_known_true(value.shape[1] == hidden_size))


def _region(output: Node, ids: Node, downstream: set[Node], ids_shape, hidden_size, num_experts: int,
            order: dict) -> Dispatch | str:
    """The dispatch ending at `output`, "skip" when `output` is not a dispatch's end."""
    num_tokens, top_k = ids_shape
    nodes: set[Node] = set()
    stack = [output]
    while stack:  # everything between the ids (and routing weights) and the output
        node = stack.pop()
        if node in nodes or node is ids:
            continue
        if node is not output and _is_routing_weights(node, num_tokens, top_k):
            continue  # computed from the ids (DeepSeek gathers scores by them): an input here
        nodes.add(node)
        if len(nodes) > _MAX_REGION:
            return "skip"
        stack.extend(arg for arg in node.all_input_nodes if arg in downstream)

    roles: dict[str, list[Node]] = {"hidden": [], "weights": [], "params": [], "sizes": []}
    pending = [arg for node in nodes for arg in node.all_input_nodes if arg not in nodes]
    while pending:
        node = pending.pop()
        if node in nodes or node is ids or any(node in found for found in roles.values()):
            continue
        role = _input_role(node, num_tokens, top_k, hidden_size, num_experts)
        if role == "follow":
            nodes.add(node)
            pending.extend(node.all_input_nodes)
        elif role is None:
            value = fm.fake_value(node)
            if node.op == "placeholder" and isinstance(value, torch.Tensor) and value.dim() == 0 \
                    and value.is_floating_point():
                return (f"the dispatch reads {node.name}, a Python float the graph takes as a run-time input "
                        "(torch.compile(dynamic=True) leaves floats unspecialized; set "
                        "torch._dynamo.config.specialize_float = True, or let Dynamo mark shapes dynamic itself)")
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            return f"the dispatch also reads {node.name} ({fm.op_name(node)}, {shape})"
        else:
            roles[role].append(node)
    weight_reads = [p for p in roles["params"] if len(fm.shape_of(p)) == 3]
    if len(weight_reads) < 2:
        return "skip"  # e.g. the hidden rows gathered per pair (T*k == T when k == 1)
    if len(roles["hidden"]) != 1 or len(roles["weights"]) != 1:
        return (f"expected one (T, H) hidden state and one (T, k) routing weight into the dispatch, "
                f"found {len(roles['hidden'])} and {len(roles['weights'])}")
    params = sorted(roles["params"], key=order.__getitem__)
    inputs = [roles["hidden"][0], roles["weights"][0], ids, *params, *roles["sizes"]]
    return Dispatch(output=output, hidden=roles["hidden"][0], weights=roles["weights"][0], ids=ids,
                    params=params, inputs=inputs, nodes=sorted(nodes, key=order.__getitem__),
                    kind=_kind(nodes))


def _input_role(node: Node, num_tokens, top_k: int, hidden_size, num_experts: int) -> str | None:
    value = fm.fake_value(node)
    if isinstance(value, torch.SymInt) or (node.op == "placeholder" and isinstance(value, int)):
        return "sizes"
    if not isinstance(value, torch.Tensor):
        return None
    shape = tuple(value.shape)
    if node.op in ("placeholder", "get_attr"):
        if len(shape) in (2, 3) and shape[0] == num_experts and value.is_floating_point():
            return "params"
        return None
    if node.op == "call_function" and all(isinstance(fm.fake_value(arg), (torch.SymInt, int))
                                          for arg in node.all_input_nodes):
        return "follow"  # a tensor made in the graph from sizes only (empty, iota, full)
    if _is_tokens_by_hidden(node, num_tokens, hidden_size):
        return "hidden"
    if _is_routing_weights(node, num_tokens, top_k):
        return "weights"
    if fm.is_call(node, *_FOLLOW_UP) and len(_tensor_inputs(node)) == 1:
        return "follow"  # a reshape of one tensor; its SymInt sizes (dynamic T) become "sizes" inputs
    if node.op == "call_function" and value.is_floating_point():
        # Expert outputs computed for every expert before the ids weigh them (a dense dispatch:
        # einsum over all E, then the (T, E) routing matrix): part of the region, back to the
        # hidden state and the weights; the layout proof then says whether it is the fused op.
        return "follow"
    return None


def _tensor_inputs(node: Node) -> list[Node]:
    return [arg for arg in node.all_input_nodes if isinstance(fm.fake_value(arg), torch.Tensor)]


def _kind(nodes: set[Node]) -> str:
    targets = {node.target for node in nodes}
    if any("grouped_mm" in str(t) for t in targets):  # aten._grouped_mm, transformers' fallback op
        return "grouped_mm"
    if targets & {aten.scatter.src, aten.scatter.value, aten.scatter_add.default}:
        return "dense (T, E)"  # every expert computed, weighed by a routing matrix scattered from the top-k
    if aten.bmm.default in targets:
        return "gather + bmm"
    return "gather + matmul"
