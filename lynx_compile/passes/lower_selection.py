"""Lower `lynx::batch_select` into what Inductor compiles: one C++ call on CPU, its aten body elsewhere.

On CPU (the kernel built: `lowering/kernels/select_experts_cpu.py`), a site becomes the plain
top-k and one call of `lynx::select_experts_cpu`, whose C++ kernel computes the whole selection:

    topk   = aten.topk(div, 2)                                   # the plain top-k (torch's ties)
    select = lynx.select_experts_cpu(div, mm, topk[1], 2, "affinity_binning", [0.7, 1.0, 1.43], -1, None)
    getitem = select[0]; getitem_1 = select[1]                   # (T, k) values, indices

Elsewhere (CUDA; the recording variant, which observes inside the body; a CPU without a C++
compiler), its aten body, for Inductor to generate kernels from. Before (after the routing rewrite):

    batch_select = lynx.batch_select(div, mm, 2, "affinity_binning", [0.7, 1.0, 1.43], -1, None)
    getitem      = batch_select[0]                     # (T, k) values
    getitem_1    = batch_select[1]                     # (T, k) indices

After:

    convert_element_type = prims.convert_element_type(mm, float32)
    amax = aten.amax(...); sub = aten.sub(...); floor = aten.floor(...); ...
    sort = aten.sort(...); topk = aten.topk(sort_key, 2, largest=False); ...
    gather_1 = aten.gather(div, 1, gather)             # (T, k) values
    gather   = aten.gather(token_order, 1, slots)      # (T, k) indices

The body (`lowering/selection.py:batch_select`) is traced with make_fx under the graph's fake
mode (`fx_match.insert_traced`); its arguments are read back with the op's own codec
(`lowering/ops.py:decode_params`), so no default is restated here. Inductor then fuses the
elementwise and reduction parts into generated C++ (CPU) or Triton (CUDA) kernels. The kernel and
the body give the same indices and values, bit for bit (`tests/lowering/test_selection_properties.py`).
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Graph, Node

from .. import policies
from ..lowering import selection
from ..lowering.kernels import select_experts_cpu as cpu_kernel
from ..lowering.ops import batch_select, decode_params, observe_selection, routed_columns, select_experts_cpu
from ..policies.contract import voting_rows
from . import fx_match as fm
from .fx_match import aten


def lower_selection(graph: Graph, record: bool = False) -> int:
    """Replace every lynx.batch_select node by its traced body; return how many were lowered.

    record: also route the chosen indices through lynx.observe_selection (recording variant).
    """
    count = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is batch_select:
            if not record and _kernel_takes(node):
                _call_kernel(graph, node)
            else:
                _lower_one(graph, node, record)
            count += 1
    return count


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _kernel_takes(node: Node) -> bool:
    """Whether the CPU kernel runs this site: CPU tensors of a dtype it reads exactly, and built."""
    scores, logits = (fm.fake_value(arg) for arg in node.args[:2])
    policy = _arguments(node)[3]
    return (scores.device.type == "cpu" and scores.dtype in _KERNEL_DTYPES and logits.dtype in _KERNEL_DTYPES
            and policy in cpu_kernel.KERNEL_POLICIES and cpu_kernel.use_kernel())


def _call_kernel(graph: Graph, node: Node) -> None:
    scores, logits, k, policy, encoded, bound, live, num_routed = _arguments(node)
    scores_value = fm.fake_value(scores)
    with graph.inserting_before(node):
        plain = graph.call_function(aten.topk.default, (scores, k))
        plain.meta["val"] = tuple(scores_value.topk(k))
        plain_indices = graph.call_function(operator.getitem, (plain, 1))
        plain_indices.meta["val"] = plain.meta["val"][1]
        call = graph.call_function(select_experts_cpu,
                                   (scores, logits, plain_indices, k, policy, encoded, bound, live, num_routed))
        call.meta["val"] = (scores_value.new_empty(plain.meta["val"][0].shape), plain.meta["val"][1].new_empty(
            plain.meta["val"][1].shape))
    call.meta.update({key: node.meta[key] for key in ("nn_module_stack", "stack_trace", "from_node") if key in node.meta})
    node.replace_all_uses_with(call)
    graph.erase_node(node)


def _lower_one(graph: Graph, node: Node, record: bool) -> None:
    scores, logits, k, policy, encoded, bound, live, num_routed = _arguments(node)
    routed = routed_columns(num_routed)
    params = decode_params(policy, encoded)
    site_label, router_weight = node.meta["lynx_site"]
    budget = policies.reported_budget(policy, params)
    # Inputs that are graph nodes become inputs of the traced body; constants are baked in.
    optional = {"bound": bound, "live": live}
    traced_inputs = [name for name, value in optional.items() if isinstance(value, Node)]

    def body(scores_value, logits_value, weight_value, *node_values):
        given = dict(zip(traced_inputs, node_values))
        token_bound, live_value = given.get("bound", bound), given.get("live")
        values, indices = selection.batch_select(scores_value, logits_value, k, policy, params, token_bound,
                                                 live_value, routed)
        if record:
            plain = torch.topk(scores_value, k, dim=-1).indices
            voters = voting_rows(scores_value, logits_value, k, live_value)
            indices = observe_selection(plain, indices, weight_value, routed or scores_value.shape[1], token_bound,
                                        site_label, voters, -1 if budget is None else budget)
        return values, indices

    with graph.inserting_before(node):
        outputs = fm.insert_traced(graph, body, [scores, logits, router_weight,
                                                 *(optional[name] for name in traced_inputs)])
    for user in list(node.users):
        assert user.target is operator.getitem, f"unexpected user of batch_select: {user}"
        user.replace_all_uses_with(outputs[user.args[1]])
        graph.erase_node(user)
    graph.erase_node(node)


def _arguments(node: Node) -> tuple:
    """The node's (scores, logits, k, policy, params, decode_token_bound, live, num_routed),
    defaults filled in from the op's schema."""
    schema = node.target._schema
    values = list(node.args)
    for argument in schema.arguments[len(values):]:
        values.append(node.kwargs.get(argument.name, argument.default_value))
    return tuple(values)
