"""Small helpers for reading post-grad (aten-level, functionalized) FX graphs, and for inserting
a torch function's traced body into one."""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator

import torch
from torch._inductor.pattern_matcher import fwd_only
from torch.fx import Graph, Node

aten = torch.ops.aten
prims = torch.ops.prims

# Ops that change how a tensor is laid out or typed but not which values it holds.
LAYOUT_OPS = frozenset({
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.clone.default,
    aten.alias.default,
    aten.contiguous.default,
    aten._to_copy.default,
    prims.convert_element_type.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.unsqueeze.default,
    aten.expand.default,
    aten.permute.default,
    aten.t.default,
})


def is_call(node: object, *targets: object) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def fake_value(node: object) -> object:
    """The fake tensor (or SymInt) a node produces, or None."""
    if not isinstance(node, Node):
        return None
    return node.meta.get("val", node.meta.get("example_value"))


def shape_of(node: object) -> tuple | None:
    value = fake_value(node)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def through_layout(node: Node) -> Node:
    """Walk up through layout-only ops to the node that computed the values."""
    while is_call(node, *LAYOUT_OPS) and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def layout_users(node: Node) -> Iterator[Node]:
    """Users of `node`, looking through layout-only ops (which are not yielded)."""
    for user in node.users:
        if is_call(user, *LAYOUT_OPS) and user.args[0] is node:
            yield from layout_users(user)
        else:
            yield user


def getitem_users(node: Node) -> dict[int, Node]:
    """For a multi-output node (e.g. topk), map output index -> its getitem node."""
    return {user.args[1]: user for user in node.users
            if user.op == "call_function" and user.target is operator.getitem}


def op_name(node: Node) -> str:
    if node.op == "output":
        return "graph output"
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target._schema.name}.{target._overloadname}".replace("::", ".")
    return getattr(target, "__name__", str(target))


def module_path(node: Node) -> str | None:
    """Dotted path of the innermost module that emitted `node`, from Dynamo's metadata."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, _cls = list(stack.values())[-1]
    for prefix in ("L['self'].", "L['self']", "L['mod'].", "self."):
        if path.startswith(prefix):
            path = path[len(prefix):]
            break
    return path.replace("._modules['", ".").replace("']", "") or None


def dynamo_origin(node: Node) -> str | None:
    """Name of the Dynamo-graph node this aten node was traced from."""
    sources = node.meta.get("from_node") or []
    if not sources:
        return None
    source = sources[0]
    while getattr(source, "from_node", None):
        source = source.from_node[0]
    return source.name


def insert_traced(graph: Graph, body: Callable, inputs: list[Node]):
    """Trace `body(*input values)` into aten ops and copy them in at the graph's insertion point.

    Traced with make_fx under the graph's fake mode and Inductor's decomposition table, exactly
    as Inductor's pattern matcher traces replacements: the copied nodes carry valid
    `meta["val"]`, and symbolic sizes stay symbolic (no guards). Returns what `graph_copy`
    returns for the body's output: the node, or the tuple of nodes, standing for it."""
    example_values = [fake_value(node) for node in inputs]
    fake_mode = torch._guards.detect_fake_mode(example_values)
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        traced = fwd_only(body, example_values)
    placeholders = [node for node in traced.graph.nodes if node.op == "placeholder"]
    env = dict(zip(placeholders, inputs))
    outputs = graph.graph_copy(traced.graph, env)
    # Tensors the body made from Python values (make_fx keeps them as attributes): the graph's
    # module must hold them too, under names of its own.
    for node in traced.graph.nodes:
        if node.op == "get_attr":
            owner = graph.owning_module
            name = f"_lynx_constant_{len([n for n in graph.nodes if n.op == 'get_attr'])}"
            while hasattr(owner, name):
                name += "_"
            setattr(owner, name, getattr(traced, node.target))
            env[node].target = name
    return outputs
