"""CPU fused MoE expert compute: `moe_experts_cpu.cpp`, built the way Inductor builds its kernels.

The C++ source ships with the package and is compiled on first use by Inductor's own
`CppCodeCache` (same compiler, OpenMP and vector-ISA flags as Inductor's generated C++ for the CPU
this process runs on, and its on-disk cache, so a process pays the ~5 s build once per machine).
Calls go through ctypes with raw pointers; this module checks every shape, dtype and stride
first, so the C++ side trusts them.

Kernel paths (`LYNX_CPU_KERNEL`, read at each call; default "auto"):
  auto      what this CPU runs best, for bf16 weights stored along K in a bf16 model:
              AMX:          experts with 2+ tokens (4+ for products with K > 1024): oneDNN's
                            brgemm through ATen (AMX tiles); fewer: bf16 dot products (vdpbf16ps,
                            measured faster there)
              AVX512_BF16:  bf16 dot products (vdpbf16ps)
              otherwise:    the widest fp32 vectors the build flags allow (16 lanes on AVX-512,
                            else 8), bf16 widened as it is read
            fp32 models and other layouts take the fp32-vector path on every CPU
  brgemm    every expert through the brgemm call (oneDNN where ATen runs it, i.e. AMX; elsewhere
            its exact software form on the same packed operands: slow, for testing the path)
  brgemm-emulated   the software form even on an AMX CPU (tests the packing on any machine)
  bf16dot   bf16 x bf16 dot products along K (vdpbf16ps: two products per fp32 lane and
            instruction, nothing widened) for bf16 weights stored along K; on a CPU without
            AVX512_BF16, the instruction's exact software form (slow: for testing the path)
  lanes16   16-lane vectors (on a CPU without AVX-512 the compiler splits them: correct, slower)
  lanes8    8-lane vectors with AVX2 intrinsics where available (the AVX2 path on any x86 CPU)
  generic   8-lane vectors, no intrinsics (what any other ISA compiles)
Numerics: the brgemm and bf16dot paths multiply bf16 by bf16 (the weights, the hidden state and
the bf16-rounded activations: all already bf16 values) with fp32 accumulation; the fp32-vector
paths widen bf16 exactly and accumulate in fp32. Only the order of the fp32 sums differs.
Tests run every path on whatever machine they find, so each is tested on any machine.

Same semantics as `moe_experts_reference.fused_moe_reference`: gate/up projections, the activation
and its output rounded to hidden's dtype, down projection and routing-weighted sum in fp32.
"""

from __future__ import annotations

import ctypes
import functools
import os
import pathlib
from typing import Optional

import torch

from ..moe_experts_reference import ACTIVATIONS, ExpertWeights, check_inputs, fused_moe_reference

SOURCE = pathlib.Path(__file__).with_name("moe_experts_cpu.cpp")
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
_ARGTYPES = (
    [_ptr, ctypes.c_int, _ptr, _ptr]  # hidden, hidden dtype, pair weights, ids
    + [_i64] * 5  # T, k, E, H, I
    + [ctypes.c_int]  # weight dtype
    + [_ptr, _i64, _i64, _i64] * 3  # w_gate, w_up, w_down with (e, n, k) strides
    + [_ptr] * 3  # b_gate, b_up, b_down
    + [ctypes.c_int, ctypes.c_float, ctypes.c_float]  # activation, alpha, limit
    + [_ptr, ctypes.c_int]  # out, threads
)


KERNEL_PATHS = {  # path -> defines prepended to the source (see moe_experts_cpu.cpp)
    "auto": "",
    "bf16dot": "#define LYNX_BF16DOT 1\n#define LYNX_BRGEMM 0\n",
    "brgemm": "#define LYNX_BRGEMM 2\n#define LYNX_BRGEMM_MIN_ROWS 1\n#define LYNX_BRGEMM_LONG_K_MIN_ROWS 1\n"
               "#define LYNX_BF16DOT 1\n",
    "brgemm-emulated": "#define LYNX_BRGEMM 2\n#define LYNX_BRGEMM_EMULATE 1\n#define LYNX_BRGEMM_MIN_ROWS 1\n"
                       "#define LYNX_BRGEMM_LONG_K_MIN_ROWS 1\n#define LYNX_BF16DOT 1\n",
    "lanes16": "#define LYNX_LANES 16\n#define LYNX_BF16DOT 0\n#define LYNX_BRGEMM 0\n",
    "lanes8": "#define LYNX_LANES 8\n#define LYNX_BF16DOT 0\n#define LYNX_BRGEMM 0\n",
    "generic": "#define LYNX_LANES 8\n#define LYNX_GENERIC 1\n#define LYNX_BF16DOT 0\n",
}


def kernel_path() -> str:
    """The kernel path this process uses now (env LYNX_CPU_KERNEL, default "auto")."""
    path = os.environ.get("LYNX_CPU_KERNEL", "auto")
    if path not in KERNEL_PATHS:
        raise ValueError(f"LYNX_CPU_KERNEL={path!r}; expected one of {', '.join(KERNEL_PATHS)}")
    return path


def describe_path(path: str | None = None) -> str:
    """What a path runs on this machine, e.g. "auto: AVX2, 8 fp32 lanes, FMA"."""
    path = path or kernel_path()
    isa = torch.backends.cpu.get_cpu_capability()
    lanes = {"lanes16": 16, "lanes8": 8, "generic": 8}.get(path, 16 if isa.startswith("AVX512") else 8)
    style = "no intrinsics" if path == "generic" else "FMA"
    bf16_native = torch.cpu._is_avx512_bf16_supported()
    amx = torch.cpu._is_amx_tile_supported()
    if path.startswith("brgemm") or (path == "auto" and amx):
        call = "oneDNN brgemm (AMX)" if amx and path != "brgemm-emulated" else "brgemm's software form"
        tokens = ("every expert" if path.startswith("brgemm")
                  else "experts with 2+ tokens (4+ if K > 1024); vdpbf16ps below")
        return f"{path}: {isa}, bf16 models: {call} for {tokens}; fp32: {lanes} fp32 lanes, FMA"
    if path == "bf16dot" or (path == "auto" and bf16_native):
        pairs = "vdpbf16ps" if bf16_native else "vdpbf16ps emulated (no AVX512_BF16 here)"
        return f"{path}: {isa}, bf16 models: {pairs}; fp32: {lanes} fp32 lanes, FMA"
    return f"{path}: {isa}, {lanes} fp32 lanes, {style}"


@functools.cache
def _library(path: str = "auto") -> ctypes.CDLL:
    from torch._inductor.codecache import CppCodeCache

    library = CppCodeCache.load(KERNEL_PATHS[path] + SOURCE.read_text())
    function = library.lynx_moe_experts
    function.argtypes = _ARGTYPES
    function.restype = ctypes.c_int
    return library


def _weight_args(weight: torch.Tensor) -> list:
    return [weight.data_ptr(), *weight.stride()]


def _bias(bias: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], int]:
    if bias is None:
        return None, 0
    contiguous = bias.float().contiguous()
    return contiguous, contiguous.data_ptr()


def moe_experts_cpu(
    hidden: torch.Tensor,  # (T, H) fp32/bf16
    topk_weights: torch.Tensor,  # (T, k) any float dtype
    topk_ids: torch.Tensor,  # (T, k) integer, in [0, E]; E = no expert (adds nothing)
    experts: ExpertWeights,  # weights with a unit stride along H (gate/up) or I (down), or copied
) -> torch.Tensor:  # (T, H) hidden.dtype
    """`fused_moe_reference`'s computation on the CPU kernel. Raises ValueError naming a bad
    argument (shapes, dtypes, device, an expert id outside [0, E])."""
    check_inputs(hidden, topk_weights, topk_ids, experts)
    w_gate, w_up, w_down, b_gate, b_up, b_down, activation, alpha, limit = experts
    if hidden.dtype not in _DTYPES:
        raise ValueError(f"hidden dtype {hidden.dtype}: the CPU kernel takes {sorted(map(str, _DTYPES))}")
    for name, weight in (("hidden", hidden), ("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if weight.device.type != "cpu":
            raise ValueError(f"{name} is on {weight.device}; the CPU kernel takes CPU tensors")
    # The kernel streams weights along a unit stride; any other view is copied (correct, slow).
    w_gate, w_up, w_down = (w if 1 in w.stride()[1:] else w.contiguous() for w in (w_gate, w_up, w_down))
    num_tokens, hidden_size = hidden.shape
    top_k = topk_ids.shape[1]
    num_experts, inter_size, _ = w_gate.shape
    if hidden_size == 0 or inter_size == 0:  # nothing to multiply: the reference's trivial result
        return fused_moe_reference(hidden, topk_weights, topk_ids, experts)
    hidden = hidden.contiguous()
    pair_weights = topk_weights.float().contiguous()
    ids = topk_ids.to(torch.int64).contiguous()
    biases = [_bias(b) for b in (b_gate, b_up, b_down)]  # keeps the fp32 copies alive for the call
    out = torch.empty_like(hidden)
    status = _library(kernel_path()).lynx_moe_experts(
        hidden.data_ptr(), _DTYPES[hidden.dtype], pair_weights.data_ptr(), ids.data_ptr(),
        num_tokens, top_k, num_experts, hidden_size, inter_size,
        _DTYPES[hidden.dtype],
        *_weight_args(w_gate), *_weight_args(w_up), *_weight_args(w_down),
        *(pointer for _, pointer in biases),
        ACTIVATIONS[activation], alpha, limit,
        out.data_ptr(), torch.get_num_threads())
    if status != 0:
        raise ValueError(f"topk_ids holds an expert id outside [0, {num_experts}] ({num_experts}: no expert): "
                         f"min {int(ids.min())}, max {int(ids.max())}")
    return out
