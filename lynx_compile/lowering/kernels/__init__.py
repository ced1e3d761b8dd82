"""The kernels behind lynx::moe_experts (semantics: ../moe_experts_reference.py).

moe_experts_cpu.py/.cpp  CPU: C++ built by Inductor's CppCodeCache, called through ctypes.
fused_moe_triton.py      CUDA: fused Mixture-of-Experts expert compute in Triton (gate/up +
                         activation, down, routing-weighted sum) and its torch.library ops.

Nothing here imports Triton at package import time: kernels are built on first use, so the
TRITON_INTERPRET setting in force at that moment decides whether they run on GPU or in the
CPU interpreter.
"""
