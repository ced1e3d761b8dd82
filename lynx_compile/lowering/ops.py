"""Every `lynx::` operator the passes put into graphs: schema, implementations, fake, in one place.

lynx::batch_select(scores, logits, k, policy, params, decode_token_bound, live?, num_routed=-1)
    -> (values, indices)
    Drop-in for `torch.topk(scores, k)` at a routing site: same shapes, dtypes and meaning, with
    the indices chosen batch-aware by `policy` on decode batches (`selection.py`). `params` are the
    policy's parameters as floats in its `PARAMETERS` order (`encode_params` / `decode_params`,
    the one codec between a `SiteSetting` and the op). `live` (T,) bool marks the rows allowed to
    vote (None: all). `num_routed` >= 0: columns from it on are zero-compute experts, free to
    use and never counted as loaded (-1: every column is a real expert). Inside torch.compile it never reaches Inductor as an opaque call:
    `passes/lower_selection.py` replaces it by its aten body.

lynx::select_experts_cpu(scores, logits, plain_indices, k, policy, params, decode_token_bound, live?,
                         num_routed=-1) -> (values, indices)
    batch_select's computation in one C++ call on CPU (kernels/select_experts_cpu.cpp, registered
    from C++ when it is built): the same results, given the plain top-k's indices (computed by
    aten.topk beside it, so ties are torch's). What `passes/lower_selection.py` emits on CPU.

lynx::observe_selection(plain_indices, chosen_indices, router_weight, num_experts,
                        decode_token_bound, site, voters?, expert_budget=-1) -> chosen_indices
    Identity on `chosen_indices` that reports both index sets to an active `lynx_compile.record()`;
    the router weight identifies the layer when one compiled graph serves several. `voters`
    (T,) bool and `expert_budget` (-1: none) let it report calls whose voters use more experts
    than a budget. Only compiled in by the recording variant of a graph.

lynx::switch_select(scores, logits, k, decode_token_bound, live?, router_weight, site, num_routed=-1)
    -> (values, indices)
    Calibration only: batch_select whose setting is looked up at run time, per site, in the
    active `switch_select.use_settings` table (plain top-k where it names none), so one compiled
    graph serves every setting calibration tries. Opaque to Inductor (its Python body runs eagerly).

lynx::moe_experts(hidden, topk_weights, topk_ids, <expert operands>) -> (T, H)
    The expert computation after routing, for the experts present in `topk_ids` only, each
    expert's weights read once (`moe_experts_reference.py`: semantics; the operands are
    `ExpertWeights`' fields, flat). CPU: kernels/moe_experts_cpu.cpp; CUDA: the Triton kernels.
    Opaque to Inductor: a library call.

lynx::fused_moe_triton(hidden, topk_weights, topk_ids, <expert operands>, block_m, block_n, block_k)
    The Triton kernels as a `triton_op` (the fusion pass emits it on CUDA, so Inductor schedules
    them); lynx::fused_moe_triton_opaque the same as an opaque custom op (any device, also the CPU
    interpreter). Block sizes 0: from the kernel's table.

Every fake implementation checks its inputs the way the kernel would (shapes, dtypes), so a bad
call fails when the graph is traced, not when it first runs.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import policies
from ..record import report_selection
from . import selection, switch_select as switching
from .kernels import fused_moe_triton as triton_kernels
from .kernels.moe_experts_cpu import moe_experts_cpu
from .moe_experts_reference import ExpertWeights, check_inputs

_lib = torch.library.Library("lynx", "FRAGMENT")  # noqa: TOR901 - kept alive for the process

EXPERT_OPERANDS = ("Tensor w_gate, Tensor w_up, Tensor w_down, Tensor? b_gate, Tensor? b_up, Tensor? b_down, "
                   "str activation, float alpha=1.702, float limit=7.0")  # ExpertWeights' fields, flat
_lib.define("batch_select(Tensor scores, Tensor logits, int k, str policy, float[] params, "
            "SymInt decode_token_bound, Tensor? live=None, int num_routed=-1) -> (Tensor, Tensor)")
_lib.define("select_experts_cpu(Tensor scores, Tensor logits, Tensor plain_indices, int k, str policy, float[] params, "
            "SymInt decode_token_bound, Tensor? live=None, int num_routed=-1) -> (Tensor, Tensor)")
_lib.define("observe_selection(Tensor plain_indices, Tensor chosen_indices, Tensor router_weight, int num_experts, "
            "SymInt decode_token_bound, str site, Tensor? voters=None, int expert_budget=-1) -> Tensor")
_lib.define("switch_select(Tensor scores, Tensor logits, int k, SymInt decode_token_bound, Tensor? live, "
            "Tensor router_weight, str site, int num_routed=-1) -> (Tensor, Tensor)")
_lib.define(f"moe_experts(Tensor hidden, Tensor topk_weights, Tensor topk_ids, {EXPERT_OPERANDS}) -> Tensor")


# --- batch_select's parameters: the one codec between a SiteSetting and the op -------------------

def encode_params(policy: str, params: dict[str, int | float]) -> list[float]:
    """A policy's resolved parameters -> the op's `params` (floats, in the policy's order)."""
    return [float(params[name]) for name in policies.parameter_types(policy)]


def decode_params(policy: str, values) -> dict[str, int | float]:
    """The op's `params` -> the policy's keyword arguments, each in its own type (int or float).

    Raises ValueError for an unknown policy or the wrong number of parameters."""
    types = policies.parameter_types(policy)
    if len(values) != len(types):
        raise ValueError(f"policy {policy!r} takes {len(types)} parameters {list(types)}, got {len(values)}: "
                         f"{list(values)}")
    return {name: kind(value) for (name, kind), value in zip(types.items(), values)}


def routed_columns(num_routed: int) -> int | None:
    """The ops' `num_routed` (-1: every column is a real expert) -> selection's (None)."""
    return None if num_routed < 0 else num_routed


def _batch_select_impl(scores, logits, k, policy, params, decode_token_bound, live=None, num_routed=-1):
    return selection.batch_select(scores, logits, k, policy, decode_params(policy, params), decode_token_bound, live,
                                  routed_columns(num_routed))


def _check_select_inputs(scores, logits, k, live, num_routed=-1):
    if not -1 <= num_routed <= scores.shape[-1]:
        raise ValueError(f"batch_select: num_routed={num_routed} outside [-1, E={scores.shape[-1]}]")
    if scores.dim() != 2 or logits.shape != scores.shape:
        raise ValueError(f"batch_select: expected scores and logits of one (T, E) shape, got "
                         f"{tuple(scores.shape)} and {tuple(logits.shape)}")
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"batch_select: k={k} outside [1, E={scores.shape[1]}]")
    if live is not None and (live.shape != scores.shape[:1] or live.dtype != torch.bool):
        raise ValueError(f"batch_select: live must be a (T,) bool mask, got {live.dtype} {tuple(live.shape)}")


def _batch_select_fake(scores, logits, k, policy, params, decode_token_bound, live=None, num_routed=-1):
    _check_select_inputs(scores, logits, k, live, num_routed)
    decode_params(policy, params)
    num_tokens = scores.shape[0]
    return scores.new_empty((num_tokens, k)), scores.new_empty((num_tokens, k), dtype=torch.int64)


def _select_experts_cpu_fake(scores, logits, plain_indices, k, policy, params, decode_token_bound, live=None,
                             num_routed=-1):
    _check_select_inputs(scores, logits, k, live, num_routed)
    decode_params(policy, params)
    if tuple(plain_indices.shape) != (scores.shape[0], k):
        raise ValueError(f"select_experts_cpu: plain_indices must be (T, k), got {tuple(plain_indices.shape)}")
    return scores.new_empty((scores.shape[0], k)), scores.new_empty((scores.shape[0], k), dtype=torch.int64)


# --- observe_selection, switch_select --------------------------------------------------------------

def _observe_impl(plain_indices, chosen_indices, router_weight, num_experts, decode_token_bound, site,
                  voters=None, expert_budget=-1):
    report_selection(site, plain_indices, chosen_indices, router_weight, num_experts,
                     selection.is_decode(plain_indices.shape[0], decode_token_bound), voters,
                     expert_budget if expert_budget >= 0 else None)
    return chosen_indices.clone()


def _observe_fake(plain_indices, chosen_indices, router_weight, num_experts, decode_token_bound, site,
                  voters=None, expert_budget=-1):
    if plain_indices.shape != chosen_indices.shape:
        raise ValueError(f"observe_selection: plain {tuple(plain_indices.shape)} and chosen "
                         f"{tuple(chosen_indices.shape)} indices differ in shape")
    return torch.empty_like(chosen_indices)


def _switch_select_fake(scores, logits, k, decode_token_bound, live, router_weight, site, num_routed=-1):
    _check_select_inputs(scores, logits, k, live, num_routed)
    num_tokens = scores.shape[0]
    return scores.new_empty((num_tokens, k)), scores.new_empty((num_tokens, k), dtype=torch.int64)


# --- moe_experts and the Triton ops ----------------------------------------------------------------

def _moe_experts_cpu_impl(hidden, topk_weights, topk_ids, *operands):
    return moe_experts_cpu(hidden, topk_weights, topk_ids, ExpertWeights(*operands))


def _moe_experts_cuda_impl(hidden, topk_weights, topk_ids, *operands):
    return triton_kernels.fused_moe_triton(hidden, topk_weights, topk_ids, ExpertWeights(*operands))


def _moe_experts_fake(hidden, topk_weights, topk_ids, *operands):
    check_inputs(hidden, topk_weights, topk_ids, ExpertWeights(*operands))
    return hidden.new_empty(hidden.shape)


for _key in ("CPU", "CUDA"):
    _lib.impl("batch_select", _batch_select_impl, _key)
    _lib.impl("observe_selection", _observe_impl, _key)
    _lib.impl("switch_select", switching.switch_select, _key)
_lib.impl("moe_experts", _moe_experts_cpu_impl, "CPU")
_lib.impl("moe_experts", _moe_experts_cuda_impl, "CUDA")
torch.library.register_fake("lynx::batch_select", _batch_select_fake, lib=_lib)
torch.library.register_fake("lynx::select_experts_cpu", _select_experts_cpu_fake, lib=_lib)
torch.library.register_fake("lynx::observe_selection", _observe_fake, lib=_lib)
torch.library.register_fake("lynx::switch_select", _switch_select_fake, lib=_lib)
torch.library.register_fake("lynx::moe_experts", _moe_experts_fake, lib=_lib)

_OPAQUE_SCHEMA = (f"(Tensor hidden, Tensor topk_weights, Tensor topk_ids, {EXPERT_OPERANDS}, int block_m=0, "
                  "int block_n=0, int block_k=0) -> Tensor")


def _split_block_sizes(operands):
    """(*ExpertWeights fields, block_m, block_n, block_k) -> (ExpertWeights, the kernel's config)."""
    *weights, block_m, block_n, block_k = operands
    return ExpertWeights(*weights), triton_kernels.block_config_from_ints(block_m, block_n, block_k)


def _fused_moe_triton_body(  # flat and annotated: triton_op infers its schema from this signature
    hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
    w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
    b_gate: Optional[torch.Tensor], b_up: Optional[torch.Tensor], b_down: Optional[torch.Tensor],
    activation: str, alpha: float = 1.702, limit: float = 7.0, block_m: int = 0, block_n: int = 0, block_k: int = 0,
) -> torch.Tensor:
    experts, config = _split_block_sizes((w_gate, w_up, w_down, b_gate, b_up, b_down, activation, alpha, limit,
                                          block_m, block_n, block_k))
    return triton_kernels.fused_moe_triton_wrapped(hidden, topk_weights, topk_ids, experts, config)


def _fused_moe_triton_opaque_impl(hidden, topk_weights, topk_ids, *operands):
    experts, config = _split_block_sizes(operands)
    return triton_kernels.fused_moe_triton(hidden, topk_weights, topk_ids, experts, config)


def _fused_moe_triton_opaque_fake(hidden, topk_weights, topk_ids, *operands):
    experts, _ = _split_block_sizes(operands)
    check_inputs(hidden, topk_weights, topk_ids, experts)
    return torch.empty_like(hidden, memory_format=torch.contiguous_format)


# The opaque op: torch.compile never looks inside, so it also runs in the CPU interpreter.
_lib.define(f"fused_moe_triton_opaque{_OPAQUE_SCHEMA}")
_lib.impl("fused_moe_triton_opaque", _fused_moe_triton_opaque_impl, "CompositeExplicitAutograd")
torch.library.register_fake("lynx::fused_moe_triton_opaque", _fused_moe_triton_opaque_fake, lib=_lib)

# The triton_op needs no CUDA to register (Triton only to find its kernels, best effort); a failure
# must not break importing lynx on a CPU-only machine: the fusion pass then emits moe_experts.
try:
    torch.library.triton_op(triton_kernels.TRITON_OP_NAME, _fused_moe_triton_body, mutates_args=())
    fused_moe_triton = torch.ops.lynx.fused_moe_triton.default
except Exception as _error:  # noqa: BLE001 - kept for diagnosis
    TRITON_OP_ERROR: Exception | None = _error
    fused_moe_triton = None
else:
    TRITON_OP_ERROR = None

batch_select = torch.ops.lynx.batch_select.default
select_experts_cpu = torch.ops.lynx.select_experts_cpu.default  # its CPU kernel: kernels/select_experts_cpu.py
observe_selection = torch.ops.lynx.observe_selection.default
switch_select = torch.ops.lynx.switch_select.default
moe_experts = torch.ops.lynx.moe_experts.default
fused_moe_triton_opaque = torch.ops.lynx.fused_moe_triton_opaque.default
