"""What `lynx::moe_experts` computes, in plain torch: the one definition every kernel is held to.

Letters: T tokens, k experts per token, E experts, H hidden size, I expert intermediate size.

    out[t] = sum_j topk_weights[t, j] * down_e(act(gate_e(x_t), up_e(x_t)))     e = topk_ids[t, j]

with gate/up/down the expert's (optionally biased) linears. An id equal to E means "no expert
here": the slot adds nothing, whatever its weight, and no expert is read for it. That is how an
expert-parallel rank sees the pairs other ranks serve (transformers' AllReduceEP gives them the
local id E, `passes/expert_parallel.py`), so a rank's fused op reads only its own experts that
the batch selected. Numerics, shared by the CPU and the
Triton kernels: products accumulate in fp32; the gate and up projections and the activation's
output are rounded to the hidden state's dtype (where a bf16 model rounds them); the down
projection and the routing-weighted sum over the k slots stay fp32 until the final rounding.

`ExpertWeights` is the one type every kernel takes the experts' parameters in; `check_inputs`
is the kernels' common argument check (it works on fake tensors: the op's fake runs it);
`unsupported_reason` says, from shapes and dtypes alone, why no kernel can run a call, so the
fusion pass can leave such a dispatch as the model wrote it instead of failing at run time.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

ACTIVATIONS = {"silu": 0, "gpt_oss": 1}

# Hidden-state (and weight) dtypes each kernel takes, by device type.
KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16),  # kernels/moe_experts_cpu.cpp
    "cuda": (torch.float32, torch.bfloat16, torch.float16),  # kernels/fused_moe_triton.py
}


class ExpertWeights(NamedTuple):
    """The experts' parameters and activation, as every lynx::moe_experts kernel takes them.

    Views of the model's parameters (any layout with a unit stride along one of the last two
    dims; nothing is copied). In the op's schema they are the flat arguments after topk_ids, in
    this order."""

    w_gate: torch.Tensor  # (E, I, H)
    w_up: torch.Tensor  # (E, I, H)
    w_down: torch.Tensor  # (E, H, I)
    b_gate: Optional[torch.Tensor] = None  # (E, I)
    b_up: Optional[torch.Tensor] = None  # (E, I)
    b_down: Optional[torch.Tensor] = None  # (E, H)
    activation: str = "silu"  # "silu" (SwiGLU) or "gpt_oss" (GPT-OSS's clamped SwiGLU)
    alpha: float = 1.702  # gpt_oss: sigmoid(alpha * gate)
    limit: float = 7.0  # gpt_oss: gate clamped at limit, up at +-limit


def activate(g: torch.Tensor, u: torch.Tensor, activation: str, alpha: float, limit: float) -> torch.Tensor:
    if activation == "silu":
        return torch.nn.functional.silu(g) * u
    if activation == "gpt_oss":  # GPT-OSS's clamped SwiGLU
        g = g.clamp(max=limit)
        u = u.clamp(min=-limit, max=limit)
        return (u + 1) * (g * torch.sigmoid(alpha * g))
    raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")


def fused_moe_reference(
    hidden: torch.Tensor,  # (T, H)
    topk_weights: torch.Tensor,  # (T, k)
    topk_ids: torch.Tensor,  # (T, k) in [0, E]; E = no expert
    experts: ExpertWeights,
) -> torch.Tensor:  # (T, H), hidden.dtype
    """The expert computation, looping over the experts present (syncs; for tests and checks)."""
    w_gate, w_up, w_down, b_gate, b_up, b_down, activation, alpha, limit = experts
    dtype = hidden.dtype
    x32 = hidden.float()
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)  # (T, H)
    num_experts = w_gate.shape[0]
    for e in torch.unique(topk_ids).tolist():
        if e == num_experts:  # "no expert here": adds nothing
            continue
        tok, slot = torch.where(topk_ids == e)  # the (token, slot) pairs routed to e
        x = x32[tok]  # (n, H)
        g = x @ w_gate[e].float().T  # (n, I) fp32 accumulate
        u = x @ w_up[e].float().T
        if b_gate is not None:
            g = g + b_gate[e].float()
        if b_up is not None:
            u = u + b_up[e].float()
        a = activate(g.to(dtype), u.to(dtype), activation, alpha, limit).to(dtype)  # (n, I)
        y = a.float() @ w_down[e].float().T  # (n, H) fp32 accumulate
        if b_down is not None:
            y = y + b_down[e].float()
        out.index_add_(0, tok, y * topk_weights[tok, slot].float()[:, None])
    return out.to(dtype)


def check_inputs(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                 experts: ExpertWeights) -> None:
    """Raise ValueError naming the first argument whose shape, dtype or value is not valid.

    Reads shapes and dtypes only, so fake tensors work (the op's fake implementation runs it)."""
    w_gate, w_up, w_down, b_gate, b_up, b_down, activation, _, _ = experts
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
    if hidden.dim() != 2 or topk_ids.dim() != 2 or topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"expected hidden (T, H) and topk_weights/topk_ids (T, k); got {tuple(hidden.shape)}, "
            f"{tuple(topk_weights.shape)}, {tuple(topk_ids.shape)}")
    if topk_ids.is_floating_point() or topk_ids.is_complex():
        raise ValueError(f"topk_ids dtype {topk_ids.dtype}: expected an integer dtype")
    if w_gate.dim() != 3:
        raise ValueError(f"w_gate: expected (E, I, H), got shape {tuple(w_gate.shape)}")
    num_tokens, hidden_size = hidden.shape
    num_experts, inter_size, _ = w_gate.shape
    expected = {
        "topk_ids": (topk_ids.shape[0], num_tokens),
        "w_gate": (tuple(w_gate.shape), (num_experts, inter_size, hidden_size)),
        "w_up": (tuple(w_up.shape), (num_experts, inter_size, hidden_size)),
        "w_down": (tuple(w_down.shape), (num_experts, hidden_size, inter_size)),
    }
    for name, bias, shape in (("b_gate", b_gate, (num_experts, inter_size)),
                              ("b_up", b_up, (num_experts, inter_size)),
                              ("b_down", b_down, (num_experts, hidden_size))):
        if bias is not None:
            expected[name] = (tuple(bias.shape), shape)
    for name, (got, want) in expected.items():
        if got != want:
            raise ValueError(f"{name}: shape {got}, expected {want}")
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if w.dtype != hidden.dtype:
            raise ValueError(f"{name} dtype {w.dtype} differs from hidden's {hidden.dtype}")


def unsupported_reason(hidden: torch.Tensor, *tensors: Optional[torch.Tensor]) -> Optional[str]:
    """Why no lynx kernel can run on these operands (device, dtype), or None when one can.

    hidden: (T, H); tensors: the expert weights and biases. Works on fake tensors.
    """
    device = hidden.device.type
    dtypes = KERNEL_DTYPES.get(device)
    if dtypes is None:
        return f"no lynx.moe_experts kernel for device {device!r} (kernels: {', '.join(KERNEL_DTYPES)})"
    names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
    if hidden.dtype not in dtypes:
        return f"hidden dtype {str(hidden.dtype).removeprefix('torch.')}: the {device} kernel takes {names}"
    for tensor in tensors:
        if tensor is None:
            continue
        if tensor.device.type != device:
            return f"expert weights on {tensor.device.type}, hidden state on {device}"
        if tensor.dim() == 3 and tensor.dtype != hidden.dtype:
            return (f"expert weights in {str(tensor.dtype).removeprefix('torch.')}, hidden state in "
                    f"{str(hidden.dtype).removeprefix('torch.')}: the kernels take one dtype for both")
    return None
