"""Stage 3: the lynx:: operators and how they become generated kernels.

ops.py                    operator definitions (schemas, eager and fake implementations)
selection.py              AffinityBinning in plain torch ops: the body of lynx::batch_select
expand_batch_select.py    replaces lynx.batch_select nodes by that body for Inductor to compile
moe_experts_reference.py  what lynx::moe_experts computes (torch reference, argument checks,
                          which dtypes each kernel takes)
kernels/                  the expert-compute kernels: CPU (C++) and CUDA (Triton)
"""
