"""The expert computation as plain aten ops around two grouped GEMMs, for Inductor to compile.

Letters: T tokens, k experts per token (top-k), E experts, H hidden size, I expert intermediate
size, P = T*k (token, slot) pairs.

    ids (T, k) -> sort pairs by expert (stable)      sorted_ids (P,), order (P,)
               -> offsets = searchsorted(sorted_ids, 0..E-1, right)   (E,) int32 group ends
    hidden[order // k]                                (P, H) rows in expert order
    aten._grouped_mm(rows, w_gate_up^T, offsets)      (P, 2I) gate and up, one grouped GEMM
    + biases, activation (SiLU-gated or GPT-OSS)      (P, I)  elementwise: Inductor fuses it
    aten._grouped_mm(act, w_down^T, offsets)          (P, H)
    + bias, back to pair order, * routing weight,
    sum over the k slots in fp32                      (T, H)

Every shape is fixed by T, k, E, H, I: no `.item()`, no `nonzero`, no data-dependent size, so
the graph is CUDA-graph capturable and one compile serves every routing. A grouped GEMM reads an
expert's weights only when its group has rows (aten's kernels and Inductor's Triton template for
`_grouped_mm` both skip empty groups), so the experts no token uses are never read.

Numerics follow `fused_moe_reference` (moe_experts_reference.py) with one difference forced by
the op: `aten._grouped_mm` returns its input dtype (its `out_dtype` takes only bf16), so each
projection is rounded to hidden's dtype before the bias is added (the reference adds biases in
fp32 first) and the down projection is rounded before the fp32 weighted sum. For fp32 inputs the
two agree to fp32 rounding; for bf16 to about one bf16 ulp of the projections.

What `aten._grouped_mm` accepts limits where this runs; `unsupported_reason` says why a call
cannot run inside a compiled graph (see its docstring), so the fusion pass keeps such a dispatch.
"""

from __future__ import annotations

from typing import Optional

import torch

from .moe_experts_reference import ACTIVATIONS, ExpertWeights, activate

GATE_UP_ORDERS = ("halves", "interleaved")


def grouped_mm_experts(
    hidden: torch.Tensor,  # (T, H)
    topk_weights: torch.Tensor,  # (T, k) any float dtype
    topk_ids: torch.Tensor,  # (T, k) int, in [0, E)
    experts: ExpertWeights,
) -> torch.Tensor:  # (T, H), hidden.dtype
    """`fused_moe_reference`'s computation with gate, up and down as three grouped GEMMs.

    For gate and up stored as separate tensors (gpt-fast's w1/w3). When they are the two halves
    of one tensor use `grouped_mm_experts_fused_gate_up` (one GEMM fewer). Weights may be any
    views `aten._grouped_mm` takes (see `unsupported_reason`); nothing is copied.

    Raises ValueError for an unknown activation. Ids outside [0, E) are not checked (that would
    need a host sync); rows of such pairs fall outside every group and are left undefined.
    """
    w_gate, w_up, w_down, b_gate, b_up, b_down, activation, alpha, limit = experts
    _check_activation(activation)
    pairs = _sort_pairs(topk_ids, w_gate.shape[0])
    rows = _rows_by_expert(hidden, pairs)  # (P, H)
    gate = _project(rows, w_gate, b_gate, pairs)  # (P, I)
    up = _project(rows, w_up, b_up, pairs)  # (P, I)
    return _down_and_combine(gate, up, w_down, b_down, topk_weights, pairs, hidden, activation, alpha, limit)


def grouped_mm_experts_fused_gate_up(
    hidden: torch.Tensor,  # (T, H)
    topk_weights: torch.Tensor,  # (T, k)
    topk_ids: torch.Tensor,  # (T, k) int, in [0, E)
    w_gate_up: torch.Tensor,  # (E, 2I, H): each expert's gate rows and up rows in one tensor
    w_down: torch.Tensor,  # (E, H, I)
    b_gate_up: Optional[torch.Tensor],  # (E, 2I), same row order as w_gate_up
    b_down: Optional[torch.Tensor],  # (E, H)
    activation: str,
    alpha: float = 1.702,
    limit: float = 7.0,
    gate_up_order: str = "halves",  # "halves": rows [0, I) gate, [I, 2I) up; "interleaved": even gate, odd up
) -> torch.Tensor:  # (T, H), hidden.dtype
    """The same computation with gate and up in one grouped GEMM (two grouped GEMMs in all).

    transformers' fused `gate_up_proj` (Mixtral, Qwen3-MoE, OLMoE, DeepSeek: halves; GPT-OSS:
    interleaved). Raises ValueError for an unknown activation or gate_up_order.
    """
    _check_activation(activation)
    if gate_up_order not in GATE_UP_ORDERS:
        raise ValueError(f"unknown gate_up_order {gate_up_order!r}; expected one of {GATE_UP_ORDERS}")
    pairs = _sort_pairs(topk_ids, w_gate_up.shape[0])
    rows = _rows_by_expert(hidden, pairs)  # (P, H)
    gate_up = _project(rows, w_gate_up, b_gate_up, pairs)  # (P, 2I)
    if gate_up_order == "halves":
        inter = w_gate_up.shape[1] // 2
        gate, up = gate_up[:, :inter], gate_up[:, inter:]  # (P, I) each
    else:
        gate, up = gate_up[:, 0::2], gate_up[:, 1::2]
    return _down_and_combine(gate, up, w_down, b_down, topk_weights, pairs, hidden, activation, alpha, limit)


class _Pairs:
    """The (token, slot) pairs sorted by expert, and each expert's group end."""

    def __init__(self, sorted_ids: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, top_k: int) -> None:
        self.sorted_ids = sorted_ids  # (P,) expert of each sorted pair
        self.order = order  # (P,) pair index t*k + j of each sorted pair
        self.offsets = offsets  # (E,) int32: rows [offsets[e-1], offsets[e]) belong to expert e
        self.top_k = top_k


def _sort_pairs(topk_ids: torch.Tensor, num_experts: int) -> _Pairs:
    flat = topk_ids.reshape(-1)  # (P,)
    # Stable, so each expert's rows keep token order (deterministic, like transformers' sort).
    sorted_ids, order = torch.sort(flat, stable=True)  # (P,), (P,)
    experts = torch.arange(num_experts, device=flat.device, dtype=sorted_ids.dtype)  # (E,)
    # End of expert e's group = pairs with id <= e: fixed length E, no histogram, no atomics.
    offsets = torch.searchsorted(sorted_ids, experts, right=True, out_int32=True)  # (E,)
    return _Pairs(sorted_ids, order, offsets, topk_ids.shape[1])


def _rows_by_expert(hidden: torch.Tensor, pairs: _Pairs) -> torch.Tensor:
    return hidden[torch.div(pairs.order, pairs.top_k, rounding_mode="floor")]  # (P, H)


def _project(rows: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], pairs: _Pairs) -> torch.Tensor:
    """rows @ weight[e].T (+ bias[e]) per expert group: (P, K) x (E, N, K) -> (P, N), rows' dtype."""
    out = torch._grouped_mm(rows, weight.transpose(-2, -1), offs=pairs.offsets)  # (P, N) fp32 accumulate
    if bias is not None:
        out = (out.float() + bias[pairs.sorted_ids].float()).to(rows.dtype)  # (P, N)
    return out


def _down_and_combine(gate, up, w_down, b_down, topk_weights, pairs: _Pairs, hidden, activation, alpha, limit):
    dtype = hidden.dtype
    act = activate(gate, up, activation, alpha, limit).to(dtype)  # (P, I)
    down = torch._grouped_mm(act, w_down.transpose(-2, -1), offs=pairs.offsets).float()  # (P, H)
    if b_down is not None:
        down = down + b_down[pairs.sorted_ids].float()
    # Back to pair order t*k + j: a gather by the inverse permutation (deterministic, no atomics).
    num_pairs = pairs.order.shape[0]
    positions = torch.arange(num_pairs, device=pairs.order.device, dtype=pairs.order.dtype)  # (P,)
    inverse = torch.scatter(torch.empty_like(pairs.order), 0, pairs.order, positions)  # (P,)
    per_pair = down[inverse]  # (P, H) fp32
    num_tokens, hidden_size = hidden.shape
    per_pair = per_pair.view(num_tokens, pairs.top_k, hidden_size)  # (T, k, H)
    out = (per_pair * topk_weights.float().unsqueeze(-1)).sum(dim=1)  # (T, H) fp32, fixed slot order
    return out.to(dtype)


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")


# --- what aten._grouped_mm takes ----------------------------------------------------------------

_ALIGN_BYTES = 16


def unsupported_reason(
    hidden: torch.Tensor,  # (T, H)
    w_down: torch.Tensor,  # (E, H, I)
    *gate_up_weights: torch.Tensor,  # (E, 2I, H) fused, or (E, I, H) gate and up
) -> Optional[str]:
    """Why these operands cannot run as `aten._grouped_mm` inside a compiled graph, or None.

    Works on fake tensors (the fusion pass asks before it rewrites). The rules, as torch's own
    meta function for `_grouped_mm` states them (torch/_meta_registrations.py) plus what the
    kernels need beyond it:
      - bfloat16 only: the meta function refuses every other dtype, so a float32 graph cannot
        even be traced (aten's CPU kernel would take float32 in eager; compiled, it cannot).
      - each operand's last two dims: one contiguous, the other's stride a multiple of 16 bytes;
        so H and I (the row lengths of the gathered rows and of the activation) must be multiples
        of 8 bf16 elements, and weight views must start 16-byte aligned.
      - CPU: torch >= 2.11 (no CPU kernel before 2.9; 2.9-2.10 also need 16-byte aligned data
        pointers, which a parameter loaded from a memory-mapped file need not have: transformers
        guards the same way). CUDA: compute capability >= 8.0 (torch >= 2.9; 9.x before).
    """
    if not hasattr(torch.ops.aten, "_grouped_mm"):
        return f"torch {torch.__version__} has no aten._grouped_mm"
    weights = (*gate_up_weights, w_down)
    for tensor in (hidden, *weights):
        if tensor.dtype != torch.bfloat16:
            return (f"aten._grouped_mm takes bfloat16 only under torch.compile, got "
                    f"{str(tensor.dtype).removeprefix('torch.')}")
        if tensor.device != hidden.device:
            return f"expert weights on {tensor.device}, hidden state on {hidden.device}"
    device_reason = _device_reason(hidden.device)
    if device_reason:
        return device_reason
    itemsize = hidden.element_size()
    # The grouped GEMMs' left operands are fresh (P, H) and (P, I) tensors: rows of H and I.
    for name, length in (("hidden size", hidden.shape[1]), ("expert intermediate size", w_down.shape[-1])):
        if (length * itemsize) % _ALIGN_BYTES:
            return f"{name} {length}: aten._grouped_mm needs rows of a multiple of {_ALIGN_BYTES} bytes"
    for weight in weights:
        operand = weight.transpose(-2, -1)  # what _grouped_mm receives: (E, K, N)
        reason = _layout_reason(operand)
        if reason:
            return reason
    return None


def _layout_reason(operand: torch.Tensor) -> Optional[str]:
    size, stride = tuple(operand.shape[-2:]), tuple(operand.stride()[-2:])
    align = _ALIGN_BYTES // operand.element_size()
    if stride[0] == 1 and stride[1] >= max(1, size[0]):
        leading = stride[1]
    elif stride[1] == 1 and stride[0] >= max(1, size[1]):
        leading = stride[0]
    else:
        return f"expert weight view with strides {tuple(operand.stride())}: aten._grouped_mm needs one unit stride"
    if leading % align:
        return f"expert weight view with row stride {leading}: aten._grouped_mm needs a multiple of 16 bytes"
    if (operand.storage_offset() * operand.element_size()) % _ALIGN_BYTES:
        return "expert weight view not 16-byte aligned (a slice at an odd offset)"
    return None


def _device_reason(device: torch.device) -> Optional[str]:
    version = torch.torch_version.TorchVersion(torch.__version__)
    if device.type == "cpu":
        if version < (2, 11):
            return (f"aten._grouped_mm on CPU needs torch >= 2.11 (found {torch.__version__}: no kernel "
                    f"before 2.9, 16-byte aligned parameters required before 2.11)")
        return None
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        needed = (8, 0) if version >= (2, 9) else (9, 0)
        if (major, minor) < needed:
            return f"aten._grouped_mm needs CUDA compute capability >= {needed[0]}.{needed[1]}, this GPU is {major}.{minor}"
        return None
    return f"no aten._grouped_mm kernel known for device {device.type!r}"
