"""The `lynx::` operators the passes put into graphs.

lynx::batch_select(scores, logits, k, alpha, beta, confidence_gap, decode_token_bound, live?,
                   policy="affinity_binning", expert_budget=0, keep_top=0) -> (values, indices)
    Drop-in for `torch.topk(scores, k)` at a routing site: same shapes, dtypes and meaning,
    with the indices chosen batch-aware by `policy` (see `selection.py`, `policies/`), which
    reads its own parameters: alpha, beta, confidence_gap (affinity_binning), expert_budget,
    confidence_gap (gate_mass_budget), keep_top (opportunistic). The last three arguments
    have defaults, so graphs and calls written before they existed still mean AffinityBinning.
    `live` (T,) bool marks the rows
    allowed to vote (None: all); dead rows never change a live row's experts. Inside torch.compile it never
    reaches Inductor as an opaque call: `expand_batch_select.py` replaces it by its aten body.

lynx::observe_selection(plain_indices, chosen_indices, router_weight, num_experts,
                        decode_token_bound, site, voters?, expert_budget=-1) -> chosen_indices
    Identity on `chosen_indices` that reports both index sets to an active `lynx_compile.record()`;
    the router weight identifies the layer when one compiled graph serves several. `voters`
    (T,) bool and `expert_budget` (-1: none) let it report calls whose voters use more experts
    than a gate-mass budget (the policy grows the set where the batch needs it).
    Only compiled in by the recording variant of a graph.

lynx::switch_select(scores, logits, k, decode_token_bound, live?, router_weight, site) -> (values, indices)
    Calibration only (`lynx_compile.calibrate`): batch_select whose policy is looked up at run
    time, per site, in the active `calibration.switch.settings()` table (plain top-k where it
    names none), so one compiled graph serves every setting calibration tries. Opaque to
    Inductor (its Python body runs eagerly); reports to an active `record()` itself.

lynx::moe_experts(hidden, topk_weights, topk_ids, w_gate, w_up, w_down, b_gate?, b_up?, b_down?,
                  activation, alpha, limit) -> (T, H)
    The expert computation after routing, for the experts present in `topk_ids` only, each
    expert's weights read once: sum_j topk_weights[t, j] * down(act(gate(x_t), up(x_t))) with
    expert topk_ids[t, j]. Weights are (E, I, H), (E, I, H), (E, H, I) views of the model's
    parameters (any layout with a unit stride, so nothing is copied). CPU: the C++ kernel in
    kernels/moe_experts_cpu.cpp; CUDA: the Triton kernels (the pass emits lynx.fused_moe_triton
    directly there, so Inductor schedules them). Opaque to Inductor: a library call.
"""

from __future__ import annotations

import torch

from . import selection
from .kernels.fused_moe_triton import fused_moe_triton
from .kernels.moe_experts_cpu import moe_experts_cpu

_lib = torch.library.Library("lynx", "FRAGMENT")  # noqa: TOR901 - kept alive for the process

_lib.define(
    "batch_select(Tensor scores, Tensor logits, int k, float alpha, int beta, "
    "float confidence_gap, SymInt decode_token_bound, Tensor? live=None, str policy=\"affinity_binning\", "
    "int expert_budget=0, int keep_top=0) -> (Tensor, Tensor)")
_lib.define(
    "observe_selection(Tensor plain_indices, Tensor chosen_indices, Tensor router_weight, int num_experts, "
    "SymInt decode_token_bound, str site, Tensor? voters=None, int expert_budget=-1) -> Tensor")
_lib.define(
    "switch_select(Tensor scores, Tensor logits, int k, SymInt decode_token_bound, Tensor? live, "
    "Tensor router_weight, str site) -> (Tensor, Tensor)")
_lib.define(
    "moe_experts(Tensor hidden, Tensor topk_weights, Tensor topk_ids, Tensor w_gate, Tensor w_up, "
    "Tensor w_down, Tensor? b_gate, Tensor? b_up, Tensor? b_down, str activation, float alpha, "
    "float limit) -> Tensor")


def _batch_select_impl(scores, logits, k, alpha, beta, confidence_gap, decode_token_bound, live=None,
                       policy=selection.DEFAULT_POLICY, expert_budget=0, keep_top=0):
    return selection.batch_select(scores, logits, k, alpha, beta, confidence_gap, decode_token_bound, live,
                                  policy, expert_budget, keep_top)


def _batch_select_fake(scores, logits, k, alpha, beta, confidence_gap, decode_token_bound, live=None,
                       policy=selection.DEFAULT_POLICY, expert_budget=0, keep_top=0):
    num_tokens = scores.shape[0]
    return (scores.new_empty((num_tokens, k)),
            scores.new_empty((num_tokens, k), dtype=torch.int64))


def _observe_impl(plain_indices, chosen_indices, router_weight, num_experts, decode_token_bound, site,
                  voters=None, expert_budget=-1):
    from ..record import report_selection

    is_decode = decode_token_bound == selection.NO_DECODE_BOUND or plain_indices.shape[0] <= decode_token_bound
    report_selection(site, plain_indices, chosen_indices, router_weight, num_experts, is_decode, voters,
                     expert_budget if expert_budget >= 0 else None)
    return chosen_indices.clone()


def _observe_fake(plain_indices, chosen_indices, router_weight, num_experts, decode_token_bound, site,
                  voters=None, expert_budget=-1):
    return torch.empty_like(chosen_indices)


def _switch_select_impl(scores, logits, k, decode_token_bound, live, router_weight, site):
    from ..calibration.switch import switch_select

    return switch_select(scores, logits, k, decode_token_bound, live, router_weight, site)


def _moe_experts_fake(hidden, topk_weights, topk_ids, w_gate, w_up, w_down, b_gate, b_up, b_down,
                      activation, alpha, limit):
    return hidden.new_empty(hidden.shape)


for _key in ("CPU", "CUDA"):
    _lib.impl("batch_select", _batch_select_impl, _key)
    _lib.impl("observe_selection", _observe_impl, _key)
    _lib.impl("switch_select", _switch_select_impl, _key)
_lib.impl("moe_experts", moe_experts_cpu, "CPU")
_lib.impl("moe_experts", fused_moe_triton, "CUDA")
torch.library.register_fake("lynx::batch_select", _batch_select_fake, lib=_lib)
torch.library.register_fake("lynx::observe_selection", _observe_fake, lib=_lib)
torch.library.register_fake("lynx::moe_experts", _moe_experts_fake, lib=_lib)
torch.library.register_fake("lynx::switch_select", lambda scores, logits, k, decode_token_bound, live, router_weight,
                            site: _batch_select_fake(scores, logits, k, 0.0, 0, 0.0, decode_token_bound), lib=_lib)

batch_select = torch.ops.lynx.batch_select.default
observe_selection = torch.ops.lynx.observe_selection.default
switch_select = torch.ops.lynx.switch_select.default
moe_experts = torch.ops.lynx.moe_experts.default
