"""Hand-written Triton kernels for the lynx:: operators' CUDA paths.

fused_moe_triton.py   fused Mixture-of-Experts expert compute (gate/up + activation, down,
                      routing-weighted sum), its torch reference, and its torch.library ops.

Nothing here imports Triton at package import time: kernels are built on first use, so the
TRITON_INTERPRET setting in force at that moment decides whether they run on GPU or in the
CPU interpreter.
"""
