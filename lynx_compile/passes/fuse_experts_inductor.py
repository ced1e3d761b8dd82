"""`experts="inductor"`: replace a matched expert dispatch by grouped GEMMs Inductor compiles.

`fuse_experts.py` finds the dispatch region after a decode routing site and proves which
`ExpertLayout` computes it. With `experts="fused"` the region becomes one opaque
`lynx.moe_experts` call; with `experts="inductor"` it becomes the plain aten body of
`lowering/grouped_mm_experts.py`, traced with make_fx under the graph's fake mode (as
`expand_batch_select.py` traces lynx.batch_select's body), so Inductor sees every op: it fuses the
gathers, biases, activation and combine into generated kernels (C++ on CPU, Triton on CUDA) and
lowers the two `aten._grouped_mm` calls itself (aten's kernel, or on sm90+ under max-autotune its
Triton grouped-GEMM template, which skips experts with no rows).

Before (Mixtral, transformers' `grouped_mm` experts, bf16, post-grad; T=8, k=2, E=8):

    getitem_1 = topk[1]                                          # (T, k) expert ids
    sort = aten.sort(view(getitem_1, [-1])); index = aten.index(view, [div(sort[1], 2)])
    histc = aten.histc(...); cumsum = aten.cumsum(histc, 0, dtype=int32)
    _grouped_mm   = aten._grouped_mm(index, permute(arg2_1, [0, 2, 1]), cumsum)
    ... silu(gate) * up ...
    _grouped_mm_1 = aten._grouped_mm(mul, permute(arg3_1, [0, 2, 1]), cumsum)
    ... * routing weights, index_put / index back to pair order, sum over k ...   # (T, H)

After:

    permute  = aten.permute(arg2_1, [0, 2, 1])                  # (E, H, 2I) view, nothing copied
    sort     = aten.sort.stable(view(getitem_1, [-1]), stable=True)
    searchsorted = aten.searchsorted(sort[0], iota(E), out_int32=True, right=True)   # (E,) offsets
    index    = aten.index(view, [div(sort[1], 2)])               # (P, H)
    _grouped_mm   = aten._grouped_mm(index, permute, searchsorted)                   # (P, 2I)
    ... silu(slice(:I)) * slice(I:) ...                           # (P, I)
    _grouped_mm_1 = aten._grouped_mm(mul, permute(arg3_1), searchsorted)            # (P, H)
    scatter (inverse order); index; view (T, k, H); mul(routing weights); sum(1)   # (T, H)

Gate and up that are halves (or interleaved rows) of one parameter share one grouped GEMM; gate
and up stored apart (gpt-fast's w1/w3) take one each. Operands `aten._grouped_mm` cannot take in a
compiled graph (float32, misaligned rows, an old torch on CPU; see
`grouped_mm_experts.unsupported_reason`) leave the dispatch as the model wrote it, with the reason.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch.fx import Graph, Node

from ..lowering import grouped_mm_experts as gmm
from ..lowering.moe_experts_reference import ExpertWeights
from . import fx_match as fm
from .dispatch_region import Dispatch
from .expert_layout import ExpertLayout, View

_ORDER = {"first": "halves", "even": "interleaved"}  # View.part of the gate -> gate_up_order


@dataclasses.dataclass(frozen=True)
class GroupedMMPlan:
    """Which parameter views feed the grouped GEMMs. `gate_up_order` None: gate and up apart."""

    gate_up: View  # of the (E, 2I, H) fused tensor, or of the (E, I, H) gate
    up: Optional[View]  # (E, I, H), or None when fused
    down: View  # (E, H, I)
    b_gate_up: Optional[View]  # (E, 2I) or (E, I)
    b_up: Optional[View]
    b_down: Optional[View]
    gate_up_order: Optional[str]
    activation: str

    def operands(self) -> tuple:
        return (self.gate_up, self.up, self.down, self.b_gate_up, self.b_up, self.b_down)

    @property
    def num_grouped_mm(self) -> int:
        return 2 if self.gate_up_order else 3


def plan_grouped_mm(dispatch: Dispatch, layout: ExpertLayout) -> GroupedMMPlan | str:
    """The grouped-GEMM operands for a dispatch `layout` explains, or why aten cannot take them."""
    gate, up = layout.gate, layout.up
    fused = gate.param == up.param and gate.transposed == up.transposed and gate.part in _ORDER
    b_fused = layout.b_gate is not None and layout.b_up is not None and layout.b_gate.param == layout.b_up.param
    if fused and (layout.b_gate is None or b_fused):
        whole = dataclasses.replace(gate, part="all")
        b_whole = dataclasses.replace(layout.b_gate, part="all") if layout.b_gate is not None else None
        plan = GroupedMMPlan(whole, None, layout.down, b_whole, None, layout.b_down, _ORDER[gate.part],
                             layout.activation)
    else:
        plan = GroupedMMPlan(gate, up, layout.down, layout.b_gate, layout.b_up, layout.b_down, None,
                             layout.activation)
    params = [fm.fake_value(node) for node in dispatch.params]
    weights = [view.apply(params[view.param]) for view in (plan.gate_up, plan.up) if view is not None]
    reason = gmm.unsupported_reason(fm.fake_value(dispatch.hidden), plan.down.apply(params[plan.down.param]),
                                    *weights)
    return reason or plan


def emit_grouped_mm(graph: Graph, dispatch: Dispatch, plan: GroupedMMPlan, alpha: float, limit: float) -> Node:
    """Insert the grouped-GEMM body at the graph's insertion point; return its (T, H) output node."""
    operand_nodes = [view.emit(graph, dispatch.params[view.param]) if view is not None else None
                     for view in plan.operands()]
    present = [i for i, node in enumerate(operand_nodes) if node is not None]

    def body(hidden, topk_weights, topk_ids, *given):
        operands: list[Optional[torch.Tensor]] = [None] * len(operand_nodes)
        for i, value in zip(present, given):
            operands[i] = value
        w_gate_up, w_up, w_down, b_gate_up, b_up, b_down = operands
        if plan.gate_up_order:
            return gmm.grouped_mm_experts_fused_gate_up(
                hidden, topk_weights, topk_ids, w_gate_up, w_down, b_gate_up, b_down, plan.activation,
                alpha, limit, plan.gate_up_order)
        return gmm.grouped_mm_experts(hidden, topk_weights, topk_ids, ExpertWeights(
            w_gate_up, w_up, w_down, b_gate_up, b_up, b_down, plan.activation, alpha, limit))

    inputs = [dispatch.hidden, dispatch.weights, dispatch.ids, *(operand_nodes[i] for i in present)]
    return fm.insert_traced(graph, body, inputs)
