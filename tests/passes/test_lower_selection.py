"""Lowering: Inductor generates the selection's kernels; results match the op's eager body."""

import re

import torch
from torch._inductor.utils import run_and_get_code

from lynx_compile.lowering import selection
from moe_models import RoutingProbe, skewed_mixtral_block


def test_inductor_generates_the_selection_kernels_and_matches_the_eager_op():
    block, hidden = skewed_mixtral_block()
    probe = RoutingProbe(block).eval()
    with torch.no_grad():
        (output, indices, weights), [code] = run_and_get_code(
            torch.compile(probe, backend="lynx", options={"experts": "fused"}), hidden)
        logits = block.gate.weight.new_tensor(0) + hidden.view(16, -1) @ block.gate.weight.T
        scores = torch.softmax(logits, dim=-1)
        expected_values, expected_indices = selection.batch_select(
            scores, logits, 2, "affinity_binning", {"alpha": 0.7, "beta": 1, "confidence_gap": 1 / 0.7})

    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(weights, expected_values / expected_values.sum(-1, keepdim=True))
    # The binning and scoring are fused into generated C++ kernels; the only lynx call left is
    # the fused expert op (passes/fuse_experts.py), never the selection op.
    assert "lynx.batch_select" not in code
    assert set(re.findall(r"torch\.ops\.lynx\.(\w+)\.default\(", code)) == {"moe_experts"}
    kernels = [line for line in code.splitlines() if "cpp_fused" in line and "async_compile.cpp" in line]
    assert any("floor" in line for line in kernels), kernels  # the binning, fused into generated C++
    # Sorting and top-k over the (tokens x experts) matrix may stay library calls.
    assert "torch.ops.aten.sort.stable" in code
