"""Prove what an expert-dispatch region computes: which `ExpertLayout` of its parameters makes
`fused_moe_reference` compute the same thing.

The region (`dispatch_region.py`) is run once on random inputs (real shapes, small values, routing
weights signed and past 1; under expert parallelism with a third of the ids set to the "another
rank" sentinel E; with zero-compute experts with a third of the pairs parked, weight 0, on an
expert their token also uses) and compared
with `fused_moe_reference` for each way the parameters can be gate / up / down (fused or
separate, concatenated or interleaved halves, transposed or not, biases, SiLU or GPT-OSS's
clamped SwiGLU, whose alpha and limit are drawn from the region's own float literals); the first
that matches is used. A region that matches none stays exactly as it was, with the reason in
`explain`. Isomorphic regions (the layers of one model) are checked once per process.

A layout is views of the parameters (`View`: which one, transposed, which rows), so the fused op
reads the model's own weights: nothing is copied.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_arg

from ..compat import optimization_hint
from ..lowering.moe_experts_reference import ExpertWeights, fused_moe_reference
from . import fx_match as fm
from .dispatch_region import Dispatch

aten = torch.ops.aten
GPT_OSS_ALPHA, GPT_OSS_LIMIT = 1.702, 7.0


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

    def weights(self, params: list[torch.Tensor]) -> ExpertWeights:
        """The fused op's operands cut from (real or fake) parameter tensors by this layout."""
        views = [view.apply(params[view.param]) if view else None for view in self.operands()]
        return ExpertWeights(*views, self.activation, self.alpha, self.limit)

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
    return "\n".join([repr(shapes), f"sentinel={dispatch.sentinel} parked={dispatch.parked}", *steps])


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
        if dispatch.sentinel:  # about a third of the pairs served by another rank (id E), one token wholly
            served_elsewhere = torch.rand(real[2].shape, generator=generator) < 0.35
            served_elsewhere[0] = True
            real[2] = real[2].masked_fill(served_elsewhere.to(real[2].device), num_experts)
        if dispatch.parked and top_k > 1:  # zero-compute pairs parked on an expert the token also uses, weight 0
            parked = (torch.rand(real[2].shape, generator=generator) < 0.35).to(real[2].device)
            parked[:, 0] = False  # slot 0 keeps a real expert to collide with
            real[2] = torch.where(parked, real[2][:, :1], real[2])
            real[1] = real[1].masked_fill(parked, 0.0)
        try:
            expected = region(*real)
        except Exception as error:  # noqa: BLE001 - report, leave the graph as it was
            return f"running the dispatch on example inputs failed ({type(error).__name__}: {error})"
        hidden, weights, ids = real[:3]
        params = real[3:3 + len(dispatch.params)]
        # A clamp only acts on large pre-activations: check scaled-up inputs as well, or a model
        # with another swiglu_limit would pass as the fused op's 7.0, and a clamped SiLU
        # (DeepSeek-V4's at 10, or one at hundreds) as a plain one.
        expected_large: dict[float, torch.Tensor] = {}
        for layout in _candidates(params, hidden_size, _float_constants(dispatch.nodes)):
            experts = layout.weights(params)
            try:
                got = fused_moe_reference(hidden, weights, ids, experts)
            except (ValueError, RuntimeError):
                continue
            if not (got.shape == expected.shape and _close(got, expected, hidden.dtype)):
                continue
            for scale in _CLAMP_PROBE_SCALES:
                if scale not in expected_large:
                    expected_large[scale] = region(hidden * scale, *real[1:])
                if not _close(fused_moe_reference(hidden * scale, weights, ids, experts), expected_large[scale],
                              hidden.dtype):
                    break
            else:
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


# pre-activations ~N(0, 20) and ~N(0, 500): past GPT-OSS's clamp at +-7, V4's at 10, and clamps in the hundreds
_CLAMP_PROBE_SCALES = (40.0, 1000.0)


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
    if shape == [num_tokens, top_k]:  # routing weights: signed and past 1 (raw logits, scaled weights), so
        # a relu or clamp the dispatch applies to them shows (the fused op is linear in them)
        return (torch.randn(shape, generator=generator) * 2).to(value.device, value.dtype)
    return (torch.randn(shape, generator=generator) * scale).to(value.device, value.dtype)


def _close(got: torch.Tensor, expected: torch.Tensor, compute_dtype: torch.dtype) -> bool:
    # Relative to the output's scale; a wrong layout or activation is off by O(1).
    tolerance = 1e-5 if compute_dtype == torch.float32 else 3e-2
    scale = expected.float().abs().max().clamp_min(1e-6)
    return bool(((got.float() - expected.float()).abs().max() / scale) <= tolerance)
