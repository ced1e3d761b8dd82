"""Replace the expert dispatch after a routing site with `lynx::moe_experts`.

Before (Mixtral, transformers' `grouped_mm` experts on CPU, post-grad; T=4, k=2, E=8):

    getitem_1 = topk[1]                                      # (T, k) expert ids
    div_1     = aten.div(getitem, sum_2)                     # (T, k) routing weights
    sort      = aten.sort(view(getitem_1, [-1]))             # pairs sorted by expert
    index     = aten.index(view, [div(sort[1], 2)])          # (P, H) hidden row per pair
    histc = aten.histc(...); cumsum = aten.cumsum(histc)     # per-expert offsets
    grouped_mm_fallback   = transformers.grouped_mm_fallback(index, permute(arg2_1), cumsum)
    split = aten.split(grouped_mm_fallback, 96, -1); ... silu(gate) * up ...
    grouped_mm_fallback_1 = transformers.grouped_mm_fallback(mul, permute(arg3_1), cumsum)
    mul_1 = aten.mul(grouped_mm_fallback_1, unsqueeze(index(view(div_1), [sort[1]])))
    index_put = ...; index_2 = aten.index(mul_1, [index_put])    # back to pair order
    sum_3 = aten.sum(view(index_2, [4, 2, 64]), [1])          # (T, H)

After:

    slice_1 = aten.slice(arg2_1, 1, 0, 96); slice_2 = aten.slice(arg2_1, 1, 96, 192)   # views
    moe_experts = lynx.moe_experts(view, div_1, getitem_1, slice_1, slice_2, arg3_1,
                                   None, None, None, "silu", 1.702, 7.0)             # (T, H)

and every use of `sum_3` reads `moe_experts`; the dispatch nodes die. With `experts="inductor"`
the region is replaced by grouped GEMMs in plain aten ops instead (fuse_experts_inductor.py).

How a dispatch is found, for any way of writing it (batched_mm's per-pair weight gather,
grouped_mm's sort + offsets, gpt-fast's gather + einsum, GPT-OSS's biased interleaved SwiGLU):
  region   the nodes downstream of the routing ids up to the first (T, H) tensor computed from
           at least two reads of stacked expert weights; its inputs, followed up through
           single-input reshapes, must be exactly: the ids, one (T, H) hidden state, one (T, k)
           routing weight, parameters with E rows (weights (E, ., .), biases (E, .)), sizes.
  meaning  the region is run once on random inputs (real shapes, small values) and compared
           with `fused_moe_reference` for each way the parameters can be gate / up / down
           (fused or separate, concatenated or interleaved halves, transposed or not, biases,
           SiLU or GPT-OSS's clamped SwiGLU); the first that matches is used. A region that
           matches none stays exactly as it was, with the reason in `explain`. Isomorphic
           regions (the layers of one model) are checked once per process.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_arg
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..compat import optimization_hint
from ..config import LynxConfig
from ..lowering.kernels.choice import auto_keeps_dispatch
from ..lowering.moe_experts_reference import fused_moe_reference, unsupported_reason
from ..lowering.ops import moe_experts
from . import fx_match as fm
from .find_routing import RoutingSite
from .fuse_experts_inductor import emit_grouped_mm, plan_grouped_mm

aten = torch.ops.aten
GPT_OSS_ALPHA, GPT_OSS_LIMIT = 1.702, 7.0
# Ops the region's inputs may be followed up through: one tensor in, same values rearranged.
_FOLLOW_UP = fm.LAYOUT_OPS | {aten.repeat_interleave.self_int, aten.repeat.default}
_MAX_REGION = 400


@dataclasses.dataclass(frozen=True)
class View:
    """How one kernel operand is cut from a parameter: which one, transposed, which rows."""

    param: int
    transposed: bool = False
    part: str = "all"  # all | first | second (concatenated halves) | even | odd (interleaved)

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            tensor = tensor.transpose(-1, -2)
        rows = tensor.shape[1]
        start, stop, step = self._slice(rows)
        return tensor if self.part == "all" else tensor[:, start:stop:step]

    def emit(self, graph: Graph, param: Node) -> Node:
        node = param
        if self.transposed:
            node = graph.call_function(aten.permute.default, (node, [0, 2, 1]))
            node.meta["val"] = fm.fake_value(param).permute(0, 2, 1)
        if self.part != "all":
            source = fm.fake_value(node)
            start, stop, step = self._slice(source.shape[1])
            node = graph.call_function(aten.slice.Tensor, (node, 1, start, stop, step))
            node.meta["val"] = source[:, start:stop:step]
        return node

    def _slice(self, rows: int) -> tuple[int, int, int]:
        half = rows // 2
        return {"all": (0, rows, 1), "first": (0, half, 1), "second": (half, rows, 1),
                "even": (0, rows, 2), "odd": (1, rows, 2)}[self.part]


@dataclasses.dataclass(frozen=True)
class ExpertLayout:
    """Parameters -> (w_gate, w_up, w_down, b_gate, b_up, b_down) views, and the activation."""

    gate: View
    up: View
    down: View
    b_gate: View | None
    b_up: View | None
    b_down: View | None
    activation: str
    alpha: float = 1.702  # GPT-OSS SwiGLU: sigmoid(alpha * gate)
    limit: float = 7.0  # GPT-OSS SwiGLU: gate clamped at limit, up at +-limit

    def operands(self) -> tuple[View | None, ...]:
        return (self.gate, self.up, self.down, self.b_gate, self.b_up, self.b_down)

    def describe(self) -> str:
        fused = self.gate.param == self.up.param
        split = {"first": "concatenated", "even": "interleaved"}.get(self.gate.part, "")
        activation = self.activation if self.activation != "gpt_oss" else \
            f"gpt_oss (alpha {self.alpha:g}, limit {self.limit:g})"
        parts = [activation, f"gate/up {split + ' ' if fused else ''}{'fused' if fused else 'separate'}"]
        if self.gate.transposed:
            parts.append("transposed")
        if self.b_down is not None:
            parts.append("biased")
        return ", ".join(parts)


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


def fuse_expert_dispatches(graph: Graph, sites: list[RoutingSite], config: LynxConfig) -> int:
    """Replace the dispatch after each selected routing site; return how many were replaced."""
    fused = 0
    for site in sites:
        if not site.selectable:
            continue
        if not config.fuses_experts_at(site.label, site.num_experts, site.top_k):
            site.experts = f"kept: experts={config.experts!r}"
            continue
        found = find_dispatch_region(graph, site)
        if isinstance(found, str):
            site.experts = f"kept: {found}"
            continue
        inductor = config.experts == "inductor"  # grouped GEMMs Inductor compiles (fuse_experts_inductor.py)
        unsupported = None if inductor else unsupported_reason(
            *(fm.fake_value(node) for node in (found.hidden, *found.params)))
        if unsupported:
            site.experts = f"kept: {found.kind} dispatch, {unsupported}"
            continue
        if config.experts == "auto":  # both could run: which is faster on this CPU
            keeps = auto_keeps_dispatch(fm.fake_value(found.hidden))
            if keeps:
                site.experts = f"kept: {keeps}"
                continue
        layout = match_layout(found)
        if isinstance(layout, str):
            site.experts = f"kept: {found.kind} dispatch, {layout}"
            continue
        if inductor:
            plan = plan_grouped_mm(found, layout)
            if isinstance(plan, str):
                site.experts = f"kept: {found.kind} dispatch, {plan}"
                continue
            _replace(graph, found, layout, lambda: emit_grouped_mm(graph, found, plan, layout.alpha, layout.limit))
            site.experts = (f"fused: {found.kind} dispatch -> {plan.num_grouped_mm} aten._grouped_mm for Inductor "
                            f"({layout.describe()})")
        else:
            _replace(graph, found, layout)
            site.experts = f"fused: {found.kind} dispatch -> lynx.moe_experts ({layout.describe()})"
        fused += 1
    return fused


# --- finding the region -------------------------------------------------------------------------

def find_dispatch_region(graph: Graph, site: RoutingSite) -> Dispatch | str:
    ids = fm.getitem_users(site.topk).get(1)
    if ids is None:
        return "the top-k indices are unused"
    ids_shape = fm.shape_of(ids)
    router_input = site.logits.args[1] if site.logits.target is aten.addmm.default else site.logits.args[0]
    hidden_size = fm.shape_of(router_input)[-1]
    order = {node: i for i, node in enumerate(graph.nodes)}
    downstream = _downstream(ids)
    for candidate in sorted(downstream, key=order.__getitem__):
        if candidate.op != "call_function" or not _is_tokens_by_hidden(candidate, ids_shape[0], hidden_size):
            continue
        region = _region(candidate, ids, downstream, ids_shape, hidden_size, site.num_experts, order)
        if isinstance(region, Dispatch):
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
    return None


def _tensor_inputs(node: Node) -> list[Node]:
    return [arg for arg in node.all_input_nodes if isinstance(fm.fake_value(arg), torch.Tensor)]


def _kind(nodes: set[Node]) -> str:
    targets = {node.target for node in nodes}
    if any("grouped_mm" in str(t) for t in targets):  # aten._grouped_mm, transformers' fallback op
        return "grouped_mm"
    if aten.bmm.default in targets:
        return "gather + bmm"
    return "gather + matmul"


# --- what the region computes -------------------------------------------------------------------

_verified: dict[str, ExpertLayout | str] = {}


def match_layout(dispatch: Dispatch) -> ExpertLayout | str:
    """The layout under which `fused_moe_reference` computes what the region computes."""
    key = _signature(dispatch)
    if key not in _verified:
        _verified[key] = _verify(dispatch, _region_module(dispatch))
    return _verified[key]


def _region_module(dispatch: Dispatch) -> GraphModule:
    graph = Graph()
    env = {node: graph.placeholder(f"in_{i}") for i, node in enumerate(dispatch.inputs)}
    for node in dispatch.nodes:
        env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(env[dispatch.output])
    return GraphModule(torch.nn.Module(), graph)


def _signature(dispatch: Dispatch) -> str:
    """The region's computation with node names replaced by positions: equal for every layer."""
    position = {node: i for i, node in enumerate([*dispatch.inputs, *dispatch.nodes])}
    shapes = [(tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else "size"
              for v in map(fm.fake_value, dispatch.inputs)]

    def numbered(args):
        return repr(map_arg(args, lambda node: f"%{position[node]}"))

    steps = [f"{fm.op_name(n)}{numbered(n.args)}{numbered(n.kwargs)}" for n in dispatch.nodes]
    return "\n".join([repr(shapes), *steps])


def _candidates(params: list[torch.Tensor], hidden_size: int, constants: set[float] = frozenset()) -> list[ExpertLayout]:
    """Every way the parameters can be gate / up / down; GPT-OSS layouts once per (alpha, limit)
    drawn from the region's own float literals and the usual 1.702 / 7.0."""
    matrices = [i for i, p in enumerate(params) if p.dim() == 3]
    vectors = [i for i, p in enumerate(params) if p.dim() == 2]
    shape = [tuple(p.shape[1:]) for p in params]

    def views(i: int, rows_dim: int):  # (E, rows, hidden)-shaped views of matrix i
        for transposed in (False, True):
            rows, cols = shape[i][::-1] if transposed else shape[i]
            if cols == rows_dim:
                yield transposed, rows

    layouts = []
    for activation in ("silu", "gpt_oss"):
        if len(matrices) == 2:  # fused gate_up + down
            for gu, dn in itertools.permutations(matrices):
                for gu_t, two_inter in views(gu, hidden_size):
                    if two_inter % 2:
                        continue
                    inter = two_inter // 2
                    for dn_t, _ in (v for v in views(dn, inter) if v[1] == hidden_size):
                        for first, second in (("first", "second"), ("even", "odd")):
                            layouts += _with_biases(View(gu, gu_t, first), View(gu, gu_t, second),
                                                    View(dn, dn_t), vectors, shape, inter, hidden_size,
                                                    activation, first, second)
        elif len(matrices) == 3:  # separate gate, up, down
            for g, u, d in itertools.permutations(matrices):
                for g_t, inter in views(g, hidden_size):
                    for u_t, _ in (v for v in views(u, hidden_size) if v[1] == inter):
                        for d_t, _ in (v for v in views(d, inter) if v[1] == hidden_size):
                            if not vectors:
                                layouts.append(ExpertLayout(View(g, g_t), View(u, u_t), View(d, d_t),
                                                            None, None, None, activation))
    alphas = [GPT_OSS_ALPHA, *sorted(constants - {GPT_OSS_ALPHA})]
    limits = [GPT_OSS_LIMIT, *sorted(constants - {GPT_OSS_LIMIT})]
    return [dataclasses.replace(layout, alpha=alpha, limit=limit) if layout.activation == "gpt_oss" else layout
            for layout in layouts
            for alpha, limit in (itertools.product(alphas, limits) if layout.activation == "gpt_oss" else [(0, 0)])]


def _with_biases(gate, up, down, vectors, shape, inter, hidden_size, activation, first, second):
    if not vectors:
        return [ExpertLayout(gate, up, down, None, None, None, activation)]
    layouts = []
    for b_gu, b_dn in itertools.permutations(vectors, 2) if len(vectors) == 2 else ():
        if shape[b_gu] == (2 * inter,) and shape[b_dn] == (hidden_size,):
            layouts.append(ExpertLayout(gate, up, down, View(b_gu, part=first), View(b_gu, part=second),
                                        View(b_dn), activation))
    return layouts


def _verify(dispatch: Dispatch, region: GraphModule) -> ExpertLayout | str:
    values = [fm.fake_value(node) for node in dispatch.inputs]
    generator = torch.Generator().manual_seed(0)
    hidden_value, weights_value, ids_value = values[:3]
    num_tokens, hidden_size = (optimization_hint(s) for s in hidden_value.shape)
    top_k = ids_value.shape[1]
    num_experts = fm.fake_value(dispatch.params[0]).shape[0]
    # Passes run under the graph's fake mode; the check needs real tensors.
    with unset_fake_temporarily(), torch.no_grad():
        real = [_example(v, generator, num_tokens, num_experts, top_k) for v in values]
        try:
            expected = region(*real)
        except Exception as error:  # noqa: BLE001 - report, leave the graph as it was
            return f"running the dispatch on example inputs failed ({type(error).__name__}: {error})"
        hidden, weights, ids = real[:3]
        params = real[3:3 + len(dispatch.params)]
        # GPT-OSS's clamp only acts on large pre-activations: check a scaled-up input as well, or a
        # model with another swiglu_limit would pass as the fused op's 7.0.
        large = [real[0] * _CLAMP_PROBE_SCALE, *real[1:]]
        expected_large = None
        for layout in _candidates(params, hidden_size, _float_constants(dispatch.nodes)):
            operands = [view.apply(params[view.param]) if view else None for view in layout.operands()]
            try:
                got = fused_moe_reference(hidden, weights, ids, *operands, layout.activation, layout.alpha, layout.limit)
            except (ValueError, RuntimeError):
                continue
            if not (got.shape == expected.shape and _close(got, expected, hidden.dtype)):
                continue
            if layout.activation == "gpt_oss":
                expected_large = region(*large) if expected_large is None else expected_large
                got_large = fused_moe_reference(large[0], weights, ids, *operands, layout.activation,
                                                layout.alpha, layout.limit)
                if not _close(got_large, expected_large, hidden.dtype):
                    continue
            return layout
    return "no fused expert layout computes what it computes (checked on example inputs)"


def _float_constants(nodes: list[Node]) -> set[float]:
    """Finite non-zero float literals in the region (GPT-OSS's alpha and limit are among them)."""
    found = set()
    for node in nodes:
        for arg in (*node.args, *node.kwargs.values()):
            if isinstance(arg, float) and math.isfinite(arg) and arg not in (0.0, 1.0, -1.0):
                found.add(abs(arg))
    return found


_CLAMP_PROBE_SCALE = 40.0  # pre-activations ~N(0, 20): well past GPT-OSS's clamp at +-7


def _example(value, generator: torch.Generator, num_tokens: int, num_experts: int, top_k: int):
    """A real input like `value`, on its device: the region's own constants (empty, iota, arange)
    carry the graph's device, so a CUDA region checked on CPU inputs would fail on mixed devices."""
    if not isinstance(value, torch.Tensor):
        return optimization_hint(value)
    shape = [optimization_hint(s) for s in value.shape]
    if not value.is_floating_point():  # the ids: k distinct experts per token, expert 0 popular
        scores = torch.randn(num_tokens, num_experts, generator=generator)
        scores[: num_tokens // 2, 0] += 4.0
        return scores.topk(top_k, dim=-1).indices.to(value.device, value.dtype)
    scale = 1.0 / math.sqrt(shape[-1]) if len(shape) == 3 else 0.5
    if shape == [num_tokens, top_k]:  # routing weights: positive, like softmax outputs
        return torch.rand(shape, generator=generator).to(value.device, value.dtype)
    return (torch.randn(shape, generator=generator) * scale).to(value.device, value.dtype)


def _close(got: torch.Tensor, expected: torch.Tensor, compute_dtype: torch.dtype) -> bool:
    # Relative to the output's scale; a wrong layout or activation is off by O(1).
    tolerance = 1e-4 if compute_dtype == torch.float32 else 3e-2
    scale = expected.float().abs().max().clamp_min(1e-6)
    return bool(((got.float() - expected.float()).abs().max() / scale) <= tolerance)


# --- the replacement ----------------------------------------------------------------------------

def _replace(graph: Graph, dispatch: Dispatch, layout: ExpertLayout, emit=None) -> None:
    """Compute the dispatch with the fused op (or with what `emit()` inserts) and reroute its uses."""
    output = dispatch.output
    hidden_value = fm.fake_value(dispatch.hidden)
    with graph.inserting_before(output):
        if emit is not None:
            fused = emit()
        else:
            operands = [view.emit(graph, dispatch.params[view.param]) if view else None
                        for view in layout.operands()]
            fused = graph.call_function(
                _op_for(hidden_value), (dispatch.hidden, dispatch.weights, dispatch.ids, *operands,
                                        layout.activation, layout.alpha, layout.limit))
            fused.meta["val"] = hidden_value.new_empty(hidden_value.shape)
        replacement = fused
        output_dtype = fm.fake_value(output).dtype
        if output_dtype != hidden_value.dtype:
            replacement = graph.call_function(
                torch.ops.prims.convert_element_type.default, (fused, output_dtype))
            replacement.meta["val"] = fm.fake_value(output).new_empty(hidden_value.shape)
    for key in ("nn_module_stack", "stack_trace", "from_node"):
        if key in output.meta:
            fused.meta[key] = output.meta[key]
    output.replace_all_uses_with(replacement)


def _op_for(hidden_value: torch.Tensor):
    """CUDA: the Triton op, so Inductor schedules its kernels; elsewhere the library op."""
    if hidden_value.device.type == "cuda":
        from ..lowering.kernels import fused_moe_triton as triton_kernels

        if triton_kernels.fused_moe_triton_op is not None:
            return torch.ops.lynx.fused_moe_triton.default
    return moe_experts
