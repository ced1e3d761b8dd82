"""Stage 3: the lynx:: operators, their bodies, and the kernels behind them.

ops.py                    every lynx:: operator: schema, implementations, fakes that check inputs,
                          and the codec for batch_select's policy parameters
selection.py              lynx::batch_select's body: the decode rule, the policy, the contract
switch_select.py          lynx::switch_select's body and its run-time settings table (calibration)
moe_experts_reference.py  what lynx::moe_experts computes (torch reference, ExpertWeights,
                          argument checks, which dtypes each kernel takes)
grouped_mm_experts.py     the expert compute as sort + offsets + aten._grouped_mm (experts="inductor")
kernels/                  the expert-compute kernels: CPU (C++) and CUDA (Triton); experts="auto"
"""
