"""bench/bench_experts.py measures what its labels say: the fused variants really run the fused op.

Regression test for the 2026-11-29 run, whose 'binning + fused' Mixtral rows ran at the unfused
speed: the eager-loop variant (same backend, same options) compiled first, Dynamo split the MoE
block's frame at its call into the experts, and the fused variant reused that split.
"""

import torch


def test_fused_variants_run_the_fused_op_even_after_the_eager_loop_variant(load_bench):
    bench = load_bench("bench_experts")
    torch.manual_seed(0)
    block = bench.mixtral_block(64, 96, 8, 2)
    variants = ["inductor:grouped_mm", "inductor:batched_mm", "lynx:none+fused",
                "lynx:binning+eager-loop", "lynx:binning+fused", "lynx:binning+auto"]  # the order that used to break it
    [row] = bench.run_case("tiny-block", block, lambda b: torch.randn(b, 1, 64, dtype=torch.bfloat16), (4,),
                           repeats=1, variants=variants)
    assert row["lynx:none+fused_ran_fused_op"] and row["lynx:binning+fused_ran_fused_op"]
    # the default options' variant records what experts="auto" chose on this CPU (bf16 block)
    from lynx_compile.lowering.kernels.choice import auto_keeps_dispatch

    auto_fuses = auto_keeps_dispatch(torch.empty(4, 64, dtype=torch.bfloat16)) is None
    assert row["lynx:binning+auto_ran_fused_op"] == auto_fuses
    assert row["experts_after"] <= row["experts_before"]
