"""Fused Mixture-of-Experts expert compute in Triton (the CUDA path), vLLM fused_moe style.

Dimension letters used in every shape comment:
  T tokens, k experts per token (top-k), E experts, H hidden size, I expert intermediate size,
  P = T*k (token, slot) pairs, M = padded pair slots (a multiple of BLOCK_M, <= M_max).

Pipeline (no host synchronisation anywhere, so it is CUDA-graph capturable for any T):
  1. `moe_align_block_size` (torch ops): sort the P pairs by expert, pad each expert's run to a
     multiple of BLOCK_M, record each M-block's expert and the padded total as a device scalar.
     Buffers are sized by a static bound, so blocks past the real total exist in the grid and
     exit at once; experts without tokens get no block, so their weights are never read.
  2. `_moe_gate_up_kernel`, grid (M-blocks, I-tiles): x @ w_gate[e].T and x @ w_up[e].T for the
     block's rows, bias, activation; writes the intermediate row of each pair, (P, I).
  3. `_moe_down_kernel`, grid (M-blocks, H-tiles): intermediate @ w_down[e].T, bias, times the
     routing weight; writes one fp32 row per pair, (P, H).
  4. torch: `.view(T, k, H).sum(1)` in fp32, cast to hidden's dtype. Deterministic, no atomics.

Every weight and bias is addressed through its own strides, so concatenated gate_up weights
(`w[:, :I]`), interleaved ones (`w[:, 0::2]`, GPT-OSS) and transposed storage ((E, H, I)
tensors viewed as (E, I, H)) are plain views: nothing is copied.

Public:
  fused_moe_triton(...)          plain Python launcher (eager; works in the CPU interpreter)
  fused_moe_triton_wrapped(...)  the same with `wrap_triton` launches: the body of the triton_op
                                 torch.ops.lynx.fused_moe_triton (registered in ../ops.py), so
                                 Inductor sees and schedules the kernels
  moe_align_block_size(...)      step 1 above
  select_block_config(...)       block sizes from the (untuned) table below
The torch definition the kernels are held to is `fused_moe_reference` (../moe_experts_reference.py).

Triton is imported lazily and the kernels are built on first use, once per TRITON_INTERPRET
mode, so importing this module never needs CUDA and the interpreter setting in force at the
first launch (not at import) decides how they run.
"""

import math
import os
from typing import Any, Optional

import torch

from ..moe_experts_reference import ACTIVATIONS, ExpertWeights, check_inputs

# Filled by `_import_triton()`. The kernel functions below name `tl` as a module global: Triton
# resolves a kernel's globals through `fn.__globals__`, i.e. this module's namespace.
triton: Any = None
tl: Any = None



def _import_triton():
    global triton, tl
    if tl is None:
        import triton as _triton
        import triton.language as _tl

        triton, tl = _triton, _tl
    return triton


def _interpret_mode() -> bool:
    _import_triton()
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------------------------------------
# Block sizes
# --------------------------------------------------------------------------------------------

# Block-size table, keyed by the average number of (token, slot) pairs per expert, T*k/E.
# NOT GPU-TUNED: written without a GPU in reach. The reasoning behind it:
#   - At decode an active expert holds ~1 real row, so BLOCK_M is the smallest tl.dot M (16):
#     a bigger block only multiplies padding work. The op is weight-bandwidth bound there, so
#     BLOCK_K is wide (long contiguous reads along the weights' inner dimension) and BLOCK_N
#     moderate (more programs in flight for the few experts that are read).
#   - As rows per expert grow, BLOCK_M grows so each weight tile read serves more rows.
# To tune: on the target GPU, for each model's (E, H, I, k) and T in {1, 2, 4, ..., 4096},
# time `fused_moe_triton(..., config=...)` over BLOCK_M in {16, 32, 64, 128}, BLOCK_N in
# {32, 64, 128, 256}, BLOCK_K in {32, 64, 128, 256}, num_warps in {4, 8}, num_stages in
# {2, 3, 4, 5} (torch.cuda.Event timing, CUDA-graph replay for small T), and replace the rows
# (or key a per-model table by (E, H, I) the way vLLM's JSON configs do).
#   max avg pairs/expert   BLOCK_M  BLOCK_N  BLOCK_K  num_warps  num_stages
_BLOCK_TABLE = (
    (2.0, 16, 64, 128, 4, 3),  # decode: most experts hold 0-2 rows
    (16.0, 32, 64, 64, 4, 3),  # small batches
    (64.0, 64, 64, 64, 4, 3),  # medium
    (math.inf, 128, 128, 64, 8, 3),  # prefill
)

_CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")


def _pow2_at_least_16(n: int) -> int:
    return max(16, 1 << max(0, int(n) - 1).bit_length())


def select_block_config(
    num_experts: int, hidden_size: int, intermediate_size: int, num_tokens: int, top_k: int,
    config: Optional[dict] = None,
) -> dict:
    """Block sizes for the two kernels: the table row for T*k/E, narrowed to the problem
    (BLOCK_N/BLOCK_K never above the next power of two of the dimensions they tile), then
    `config`'s entries on top. BLOCK_M is shared by the align step and both kernels."""
    avg = num_tokens * top_k / max(1, num_experts)
    for bound, bm, bn, bk, warps, stages in _BLOCK_TABLE:
        if avg <= bound:
            break
    # Kernel 1 tiles N over I and K over H; kernel 2 the other way round.
    both = min(hidden_size, intermediate_size)
    chosen = {
        "BLOCK_M": bm,
        "BLOCK_N": min(bn, _pow2_at_least_16(both)),
        "BLOCK_K": min(bk, _pow2_at_least_16(both)),
        "num_warps": warps,
        "num_stages": stages,
    }
    if config:
        unknown = set(config) - set(_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; expected some of {_CONFIG_KEYS}")
        chosen.update({key: int(value) for key, value in config.items()})
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        value = chosen[key]
        # tl.dot needs every dimension >= 16, and tl.arange a power of two.
        if value < 16 or value & (value - 1):
            raise ValueError(f"{key}={value}: must be a power of two >= 16")
    return chosen


# --------------------------------------------------------------------------------------------
# Align: sort pairs by expert, pad each expert's run to BLOCK_M (torch ops, no host sync)
# --------------------------------------------------------------------------------------------


def max_padded_pairs(num_pairs, num_experts: int, block_m: int):
    """Static upper bound M_max on the padded length, a multiple of BLOCK_M.

    At most min(P, E) experts are non-empty and each pads by at most BLOCK_M - 1 slots. Works
    with SymInt P (torch.sym_min instead of a Python comparison, so no guard on T)."""
    bound = num_pairs + torch.sym_min(num_pairs, num_experts) * (block_m - 1)
    return (bound + block_m - 1) // block_m * block_m


def moe_align_block_size(
    topk_ids: torch.Tensor,  # (T, k) int, in [0, E]; E = no expert (the pair gets no slot)
    block_m: int,
    num_experts: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns
      sorted_pair_ids  (M_max,) int32   pair index t*k + j per padded slot; P marks padding
      block_expert     (M_max / BLOCK_M,) int32   expert of each M-block (clamped past the end)
      num_padded       (1,) int32       M, the slots in use: blocks at or past M / BLOCK_M exit
    Pairs of one expert are contiguous, in ascending pair order, starting at a multiple of
    BLOCK_M; an expert with c pairs owns ceil(c / BLOCK_M) blocks, so 0 blocks when c == 0.
    Pairs with the id E (an expert-parallel rank's "served elsewhere") get no slot at all.
    Only fixed-size torch ops: no .item(), nonzero or data-dependent shapes (graph capturable).
    """
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)  # (P,)
    num_pairs = flat.shape[0]
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # (E + 1,) pairs per expert, fixed size
    counts = counts[:num_experts]  # (E,) the sentinel's count dropped
    padded = (counts + block_m - 1) // block_m * block_m  # (E,) 0 stays 0: no block
    padded_end = torch.cumsum(padded, 0)  # (E,)
    padded_start = padded_end - padded  # (E,)
    start = torch.cumsum(counts, 0) - counts  # (E,) unpadded run starts

    order = torch.argsort(flat, stable=True)  # (P,) pair ids grouped by expert, stable; sentinels last
    expert_of_sorted = flat[order]  # (P,)
    in_range = expert_of_sorted.clamp(max=num_experts - 1)  # (P,) a valid index for the sentinels too
    rank = torch.arange(num_pairs, device=device) - start[in_range]  # position in run
    m_max = max_padded_pairs(num_pairs, num_experts, block_m)
    # (P,) padded slot of each sorted pair; sentinel pairs go to one spare slot, cut off below
    dest = torch.where(expert_of_sorted < num_experts, padded_start[in_range] + rank, m_max)

    sorted_pair_ids = torch.full((m_max + 1,), num_pairs, dtype=torch.int32, device=device)
    sorted_pair_ids.scatter_(0, dest, order.to(torch.int32))
    sorted_pair_ids = sorted_pair_ids[:m_max]

    # Expert of block b = the run containing slot b*BLOCK_M. Empty experts have zero-length
    # runs (equal ends), which right=True skips. Blocks past the total would get E: clamp so
    # the value is a valid index, although the kernels exit before reading it.
    block_starts = torch.arange(0, m_max, block_m, device=device, dtype=torch.int64)
    block_expert = torch.searchsorted(padded_end, block_starts, right=True)
    block_expert = block_expert.clamp(max=num_experts - 1).to(torch.int32)
    num_padded = padded_end[-1:].to(torch.int32)  # (1,) device scalar
    return sorted_pair_ids, block_expert, num_padded


# --------------------------------------------------------------------------------------------
# Kernels (defined on first use, then wrapped with triton.jit by `_get_kernels()`)
# --------------------------------------------------------------------------------------------


def _define_kernels():
    """Defines the two kernels as plain functions, for `_get_kernels` to wrap with triton.jit.

    They live in a function so that Triton is imported only when they are first needed; `tl`
    is a module global here (set by `_import_triton`), which is how Triton resolves it.
    Only Triton builtins are called, no @triton.jit library helpers (tl.zeros, tl.sigmoid are
    spelled tl.full, 1 / (1 + exp(-x))): those are built when Triton is imported, and the CPU
    interpreter cannot call them if that happened before TRITON_INTERPRET was set, which is the
    usual order in a test session (torch._inductor imports Triton).
    """
    _import_triton()

    def _moe_gate_up_kernel(
        hidden_ptr,  # (T, H)
        w_gate_ptr,  # (E, I, H)
        w_up_ptr,  # (E, I, H)
        b_gate_ptr,  # (E, I); any tensor when HAS_BIAS_GATE is False (never read)
        b_up_ptr,  # (E, I); any tensor when HAS_BIAS_UP is False
        inter_ptr,  # (P, I) out: activation of each pair, hidden's dtype
        sorted_pair_ids_ptr,  # (M_max,) int32 pair per padded slot, P = padding
        block_expert_ptr,  # (M_max / BLOCK_M,) int32
        num_padded_ptr,  # (1,) int32 M
        num_pairs,  # P
        top_k,  # k
        H,  # hidden size (kernel 1: reduction; kernel 2: columns)
        I,  # intermediate size (kernel 1: columns; kernel 2: reduction)
        stride_xt, stride_xh,  # hidden (T, H)
        stride_ge, stride_gi, stride_gh,  # w_gate (E, I, H)
        stride_ue, stride_ui, stride_uh,  # w_up (E, I, H)
        stride_bge, stride_bgi,  # b_gate (E, I)
        stride_bue, stride_bui,  # b_up (E, I)
        stride_ap, stride_ai,  # inter (P, I)
        alpha,  # gpt_oss sigmoid scale
        limit,  # gpt_oss clamp
        ACTIVATION: tl.constexpr,  # 0 silu, 1 gpt_oss
        HAS_BIAS_GATE: tl.constexpr,
        HAS_BIAS_UP: tl.constexpr,
        FP32_DOT: tl.constexpr,  # multiply in fp32, ieee precision (see _fused_moe)
        BLOCK_M: tl.constexpr,  # pair rows per program (one expert per M-block)
        BLOCK_N: tl.constexpr,  # I columns per program
        BLOCK_K: tl.constexpr,  # H reduction step
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        # The grid is sized by the static bound M_max; blocks past the real padded total exit here.
        if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
            return

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) padded slots
        pair = tl.load(sorted_pair_ids_ptr + offs_m).to(tl.int64)  # (BLOCK_M,)
        row_ok = pair < num_pairs  # padding rows load zeros and store nothing
        token = pair // top_k
        # int64: expert * stride_e overflows int32 for large expert weights.
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) columns of I
        n_ok = offs_n < I
        x_ptrs = hidden_ptr + token[:, None] * stride_xt  # (BLOCK_M, 1)
        # Weight tiles are read as (BLOCK_K, BLOCK_N) = w[e, n, k] transposed, so x @ tile = x @ w[e].T.
        g_ptrs = w_gate_ptr + expert * stride_ge + offs_n[None, :] * stride_gi  # (1, BLOCK_N)
        u_ptrs = w_up_ptr + expert * stride_ue + offs_n[None, :] * stride_ui

        acc_g = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
        acc_u = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < H
            x = tl.load(x_ptrs + offs_k[None, :] * stride_xh, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & n_ok[None, :]
            wg = tl.load(g_ptrs + offs_k[:, None] * stride_gh, mask=w_mask, other=0.0)  # (BLOCK_K, BLOCK_N)
            wu = tl.load(u_ptrs + offs_k[:, None] * stride_uh, mask=w_mask, other=0.0)
            if FP32_DOT:
                x, wg, wu = x.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)  # no-op for fp32
                acc_g = tl.dot(x, wg, acc_g, input_precision="ieee")
                acc_u = tl.dot(x, wu, acc_u, input_precision="ieee")
            else:
                acc_g = tl.dot(x, wg, acc_g)
                acc_u = tl.dot(x, wu, acc_u)

        if HAS_BIAS_GATE:
            b = tl.load(b_gate_ptr + expert * stride_bge + offs_n * stride_bgi, mask=n_ok, other=0.0)
            acc_g += b.to(tl.float32)[None, :]
        if HAS_BIAS_UP:
            b = tl.load(b_up_ptr + expert * stride_bue + offs_n * stride_bui, mask=n_ok, other=0.0)
            acc_u += b.to(tl.float32)[None, :]

        # Round gate/up to the activation dtype first, as the reference (and transformers) does.
        out_dtype = inter_ptr.dtype.element_ty
        g = acc_g.to(out_dtype).to(tl.float32)
        u = acc_u.to(out_dtype).to(tl.float32)
        if ACTIVATION == 0:  # silu(g) * u
            a = g / (1.0 + tl.exp(-g)) * u
        else:  # gpt_oss: clamped gate and up, (u + 1) * g * sigmoid(alpha * g)
            g = tl.minimum(g, limit)
            u = tl.minimum(tl.maximum(u, -limit), limit)
            a = (u + 1.0) * (g / (1.0 + tl.exp(-alpha * g)))

        a_ptrs = inter_ptr + pair[:, None] * stride_ap + offs_n[None, :] * stride_ai
        tl.store(a_ptrs, a.to(out_dtype), mask=row_ok[:, None] & n_ok[None, :])


    def _moe_down_kernel(
        inter_ptr,  # (P, I) activations from _moe_gate_up_kernel
        w_down_ptr,  # (E, H, I)
        b_down_ptr,  # (E, H); any tensor when HAS_BIAS is False (never read)
        topk_weights_ptr,  # (T, k) routing weights, any float dtype
        out_ptr,  # (P, H) fp32 out: routing-weighted expert output of each pair
        sorted_pair_ids_ptr,  # (M_max,) int32 pair per padded slot, P = padding
        block_expert_ptr,  # (M_max / BLOCK_M,) int32
        num_padded_ptr,  # (1,) int32 M
        num_pairs,  # P
        top_k,  # k
        H,  # hidden size (kernel 1: reduction; kernel 2: columns)
        I,  # intermediate size (kernel 1: columns; kernel 2: reduction)
        stride_ap, stride_ai,  # inter (P, I)
        stride_de, stride_dh, stride_di,  # w_down (E, H, I)
        stride_be, stride_bh,  # b_down (E, H)
        stride_wt, stride_wk,  # topk_weights (T, k)
        stride_op, stride_oh,  # out (P, H)
        HAS_BIAS: tl.constexpr,
        FP32_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr,  # pair rows per program
        BLOCK_N: tl.constexpr,  # H columns per program
        BLOCK_K: tl.constexpr,  # I reduction step
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        if pid_m * BLOCK_M >= tl.load(num_padded_ptr):  # past the padded total: nothing to do
            return

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_pair_ids_ptr + offs_m).to(tl.int64)  # (BLOCK_M,)
        row_ok = pair < num_pairs
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) columns of H
        n_ok = offs_n < H
        a_ptrs = inter_ptr + pair[:, None] * stride_ap  # (BLOCK_M, 1)
        w_ptrs = w_down_ptr + expert * stride_de + offs_n[None, :] * stride_dh  # (1, BLOCK_N)

        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < I
            a = tl.load(a_ptrs + offs_k[None, :] * stride_ai, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs + offs_k[:, None] * stride_di, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if FP32_DOT:
                a, w = a.to(tl.float32), w.to(tl.float32)
                acc = tl.dot(a, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)

        if HAS_BIAS:
            b = tl.load(b_down_ptr + expert * stride_be + offs_n * stride_bh, mask=n_ok, other=0.0)
            acc += b.to(tl.float32)[None, :]

        # Routing weight of pair t*k + j is topk_weights[t, j]; weighted here so the k-sum is a
        # plain reduction over a (T, k, H) view.
        token = pair // top_k
        slot = pair - token * top_k
        route = tl.load(topk_weights_ptr + token * stride_wt + slot * stride_wk, mask=row_ok, other=0.0)
        acc = acc * route.to(tl.float32)[:, None]

        o_ptrs = out_ptr + pair[:, None] * stride_op + offs_n[None, :] * stride_oh
        tl.store(o_ptrs, acc, mask=row_ok[:, None] & n_ok[None, :])

    return _moe_gate_up_kernel, _moe_down_kernel


_KERNELS: dict = {}  # interpret mode (bool) -> (gate_up kernel, down kernel)


def _get_kernels():
    """triton.jit-wrapped kernels for the current TRITON_INTERPRET mode (built once per mode)."""
    interpret = _interpret_mode()
    kernels = _KERNELS.get(interpret)
    if kernels is None:
        kernels = tuple(triton.jit(fn) for fn in _define_kernels())
        _KERNELS[interpret] = kernels
        if not interpret:
            announce_kernels_to_triton_op(kernels)
    return kernels


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def _no_wrap(kernel):
    return kernel


def _fused_moe(hidden, topk_weights, topk_ids, experts: ExpertWeights, config, launch):
    """Shared body of the plain launcher (launch = identity) and the triton_op (wrap_triton)."""
    check_inputs(hidden, topk_weights, topk_ids, experts)
    w_gate, w_up, w_down, b_gate, b_up, b_down, activation, alpha, limit = experts
    num_tokens, hidden_size = hidden.shape
    top_k = topk_ids.shape[1]
    num_experts, inter_size, _ = w_gate.shape
    num_pairs = num_tokens * top_k
    if num_pairs == 0:  # no tokens (or k == 0): nothing to launch
        return hidden.new_zeros((num_tokens, hidden_size))

    cfg = select_block_config(num_experts, hidden_size, inter_size, num_tokens, top_k, config)
    block_m, block_n, block_k = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    launch_options = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    gate_up_kernel, down_kernel = _get_kernels()

    sorted_pair_ids, block_expert, num_padded = moe_align_block_size(topk_ids, block_m, num_experts)
    num_m_blocks = sorted_pair_ids.shape[0] // block_m  # >= 1 since P >= 1: no empty grid
    # fp32 inputs: full-precision (ieee) dots, torch's default for fp32 matmuls, not tf32. The
    # CPU interpreter also needs it for 16-bit inputs: Triton 3.9's interpreted tl.dot multiplies
    # bf16 tiles as their raw uint16 bit patterns, so they are upcast first (exact products, as
    # on the GPU's bf16 MMA with fp32 accumulation). Compiled GPU kernels never take that path.
    fp32_dot = hidden.dtype == torch.float32 or _interpret_mode()

    inter = torch.empty((num_pairs, inter_size), dtype=hidden.dtype, device=hidden.device)  # (P, I)
    # Absent biases: pass a tensor that is never read (HAS_BIAS_* False) and zero strides.
    bg = b_gate if b_gate is not None else w_gate
    bu = b_up if b_up is not None else w_up
    bg_strides = (bg.stride(0), bg.stride(1)) if b_gate is not None else (0, 0)
    bu_strides = (bu.stride(0), bu.stride(1)) if b_up is not None else (0, 0)
    launch(gate_up_kernel)[(num_m_blocks, triton.cdiv(inter_size, block_n))](
        hidden, w_gate, w_up, bg, bu, inter,
        sorted_pair_ids, block_expert, num_padded,
        num_pairs, top_k, hidden_size, inter_size,
        hidden.stride(0), hidden.stride(1),
        w_gate.stride(0), w_gate.stride(1), w_gate.stride(2),
        w_up.stride(0), w_up.stride(1), w_up.stride(2),
        bg_strides[0], bg_strides[1],
        bu_strides[0], bu_strides[1],
        inter.stride(0), inter.stride(1),
        float(alpha), float(limit),
        ACTIVATION=ACTIVATIONS[activation],
        HAS_BIAS_GATE=b_gate is not None,
        HAS_BIAS_UP=b_up is not None,
        FP32_DOT=fp32_dot,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        **launch_options,
    )

    per_pair = torch.empty((num_pairs, hidden_size), dtype=torch.float32, device=hidden.device)  # (P, H)
    bd = b_down if b_down is not None else w_down
    bd_strides = (bd.stride(0), bd.stride(1)) if b_down is not None else (0, 0)
    launch(down_kernel)[(num_m_blocks, triton.cdiv(hidden_size, block_n))](
        inter, w_down, bd, topk_weights, per_pair,
        sorted_pair_ids, block_expert, num_padded,
        num_pairs, top_k, hidden_size, inter_size,
        inter.stride(0), inter.stride(1),
        w_down.stride(0), w_down.stride(1), w_down.stride(2),
        bd_strides[0], bd_strides[1],
        topk_weights.stride(0), topk_weights.stride(1),
        per_pair.stride(0), per_pair.stride(1),
        HAS_BIAS=b_down is not None,
        FP32_DOT=fp32_dot,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        **launch_options,
    )
    # Pair t*k + j sits at row t, slot j of this view; summing slots in a fixed order keeps the
    # result deterministic (no atomics). Sentinel pairs (id E) were never written: they add 0.
    per_pair = torch.where((topk_ids < num_experts).unsqueeze(-1), per_pair.view(num_tokens, top_k, hidden_size), 0.0)
    return per_pair.sum(dim=1).to(hidden.dtype)


def fused_moe_triton(
    hidden: torch.Tensor,  # (T, H) bf16/fp16/fp32
    topk_weights: torch.Tensor,  # (T, k) any float dtype
    topk_ids: torch.Tensor,  # (T, k) int64/int32 in [0, E]; E = no expert
    experts: ExpertWeights,  # any strides
    config: Optional[dict] = None,  # overrides of select_block_config's choice
) -> torch.Tensor:  # (T, H) hidden.dtype
    """Fused MoE expert compute (see the module docstring); `fused_moe_reference` semantics.

    Plain Python launcher: launches the Triton kernels directly (eager, CUDA tensors, or CPU
    tensors under TRITON_INTERPRET=1). Inside torch.compile use torch.ops.lynx.fused_moe_triton.
    """
    return _fused_moe(hidden, topk_weights, topk_ids, experts, config, _no_wrap)


def fused_moe_triton_wrapped(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                             experts: ExpertWeights, config: Optional[dict] = None) -> torch.Tensor:
    """`fused_moe_triton` with each launch through `wrap_triton`: under torch.compile the launches
    become triton_kernel_wrapper HOPs Inductor schedules as user kernels; in eager (and in the
    interpreter) they are plain launches. The body of the triton_op lynx::fused_moe_triton."""
    from torch.library import wrap_triton

    return _fused_moe(hidden, topk_weights, topk_ids, experts, config, wrap_triton)


def block_config_from_ints(block_m: int, block_n: int, block_k: int) -> Optional[dict]:
    """The op schemas' three block-size ints -> a `config` (schemas have no dict; 0: from the table)."""
    chosen = {key: value for key, value in (("BLOCK_M", block_m), ("BLOCK_N", block_n), ("BLOCK_K", block_k))
              if value}
    return chosen or None


TRITON_OP_NAME = "lynx::fused_moe_triton"


def announce_kernels_to_triton_op(kernels) -> None:
    """The kernels are built lazily, so triton_op's registration-time source scan cannot find
    them; record them where AOTAutograd's cache key looks (kernel source changes then
    invalidate cached graphs). Best effort: a private table."""
    try:
        from torch._library import triton as library_triton

        library_triton.triton_ops_to_kernels[TRITON_OP_NAME] = list(kernels)
    except Exception:
        pass
