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

How: `dispatch_region.py` finds the region between the top-k's indices and the first (T, H)
tensor computed from the stacked expert weights and checks its inputs; `expert_layout.py` proves,
by running it once on example inputs, which views of the parameters make `fused_moe_reference`
compute the same thing; this module replaces the region (or reports why it stays). A lone
token's site (T=1, a B=1 decode step: nothing to select) is fused too, since the fused op reads its
k experts faster than the model's dispatch on the CPUs measured. Under expert parallelism the
rank's own dispatch (its local ids, the sentinel for pairs other ranks serve, its L experts) is
fused the same way: the op reads only this rank's experts that the batch selected. A site whose
setting does not select keeps its dispatch under `experts="auto"`; so does a dispatch no
lynx kernel takes (dtype, device), and one `experts="auto"` finds faster as the model wrote it on
this CPU (`lowering/kernels/choice.py`).
"""

from __future__ import annotations

import torch
from torch.fx import Graph

from ..config import LynxConfig
from ..lowering.kernels.choice import auto_keeps_dispatch
from ..lowering.moe_experts_reference import unsupported_reason
from ..lowering.ops import fused_moe_triton, moe_experts
from . import fx_match as fm
from .dispatch_region import Dispatch, find_dispatch_region
from .expert_layout import ExpertLayout, match_layout
from .find_routing import RoutingSite
from .fx_match import aten
from .zero_experts import parked_weights_are_zero
from .fuse_experts_inductor import emit_grouped_mm, plan_grouped_mm


def fuse_expert_dispatches(graph: Graph, sites: list[RoutingSite], config: LynxConfig) -> int:
    """Replace the dispatch after each fusable routing site (selectable, or T=1); return how many were replaced."""
    fused = 0
    for site in sites:
        if not site.fusable:
            continue
        if config.experts == "keep" or (config.experts == "auto" and not site.setting.selects):
            site.experts = f"kept: experts={config.experts!r}"
            continue
        found = find_dispatch_region(graph, site)
        if isinstance(found, str):
            site.experts = f"kept: {found}"
            continue
        inductor = config.experts == "inductor"  # grouped GEMMs Inductor compiles (fuse_experts_inductor.py)
        if inductor and found.sentinel:
            site.experts = ("kept: expert parallel, experts='inductor' has no 'another rank' id; "
                            "experts='fused' fuses this rank's dispatch")
            continue
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
            parked = _park_on_no_expert(graph, site, found)
            _replace(graph, found, layout)
            rank = f", this rank's {site.parallel.local_experts} experts" if found.sentinel else ""
            site.experts = f"fused: {found.kind} dispatch -> lynx.moe_experts ({layout.describe()}{rank}{parked})"
        fused += 1
    return fused


def _park_on_no_expert(graph: Graph, site: RoutingSite, dispatch: Dispatch) -> str:
    """Zero-compute pairs: give the fused op the "no expert" id E instead of the model's parking
    id, so they read no expert. Valid where the parked pairs' weights are exactly 0 (the model's
    where(zero, 0.0, w)): the model adds 0 * y for them, the op adds nothing; the two differ only
    if the parking expert's output is inf or NaN. Returns what to say in `explain`."""
    zero = site.zero_experts
    if zero is None:
        return ""
    if not parked_weights_are_zero(dispatch.weights, zero.zero):
        return "; zero-compute pairs run on their parking experts (their weights are not proven 0)"
    ids_value = fm.fake_value(dispatch.ids)
    with graph.inserting_before(dispatch.output):
        no_expert = graph.call_function(aten.scalar_tensor.default, (zero.num_experts,), {"dtype": ids_value.dtype})
        no_expert.meta["val"] = ids_value.new_empty(())
        ids = graph.call_function(aten.where.self, (zero.zero, no_expert, dispatch.ids))
        ids.meta["val"] = ids_value.new_empty(ids_value.shape)
    dispatch.ids = ids
    return "; zero-compute pairs read no expert"


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
    if hidden_value.device.type == "cuda" and fused_moe_triton is not None:
        return fused_moe_triton
    return moe_experts
