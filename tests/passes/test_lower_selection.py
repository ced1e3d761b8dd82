"""Lowering: what Inductor compiles for a selection site, on both paths, against the eager op.

kernel  (CPU default) the plain top-k + one call of lynx::select_experts_cpu (C++): at most 3 calls
        more than policy none's graph in Inductor's generated code, for every policy family
body    (LYNX_SELECTION=body; CUDA) the traced torch body, fused into generated kernels
"""

import pathlib
import re
import sys

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from lynx_compile.lowering import selection
from moe_models import RoutingProbe, skewed_mixtral_block

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "bench"))
from common import calls_in  # noqa: E402  (how bench_selection.py counts calls per site)

POLICIES = {  # one per family: binned votes, a budget of gate mass, per-token tiers
    "affinity_binning": {},
    "gate_mass_budget": {"expert_budget": 3},
    "opportunistic": {"keep_top": 1},
}


def compiled_code(options: dict) -> tuple[tuple, str]:
    block, hidden = skewed_mixtral_block()
    probe = RoutingProbe(block).eval()
    torch._dynamo.reset()
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        outputs, [code] = run_and_get_code(torch.compile(probe, backend="lynx", options=options), hidden)
    return outputs, code


@pytest.mark.parametrize("policy", POLICIES)
def test_a_site_costs_at_most_three_calls_more_than_policy_none(policy, monkeypatch):
    monkeypatch.setenv("LYNX_SELECTION", "kernel")
    _, none_code = compiled_code({"policy": "none", "experts": "fused"})
    (_, indices, _), code = compiled_code({"policy": policy, "experts": "fused", **POLICIES[policy]})
    assert "torch.ops.lynx.select_experts_cpu.default(" in code and "aten.sort" not in code
    assert calls_in(code) - calls_in(none_code) <= 3, (calls_in(code), calls_in(none_code))


def test_the_traced_body_costs_more_and_the_count_sees_it(monkeypatch):
    """The body's sorts and top-ks are separate library calls: the count exceeds the bound."""
    monkeypatch.setenv("LYNX_SELECTION", "body")
    _, none_code = compiled_code({"policy": "none", "experts": "fused"})
    _, code = compiled_code({"experts": "fused"})
    assert calls_in(code) - calls_in(none_code) > 3


@pytest.mark.parametrize("path", ["kernel", "body"])
def test_inductor_compiled_selection_matches_the_eager_op(path, monkeypatch):
    monkeypatch.setenv("LYNX_SELECTION", path)
    block, hidden = skewed_mixtral_block()
    (output, indices, weights), code = compiled_code({"experts": "fused", "policy": "affinity_binning"})
    with torch.no_grad():
        logits = block.gate.weight.new_tensor(0) + hidden.view(16, -1) @ block.gate.weight.T
        scores = torch.softmax(logits, dim=-1)
        expected_values, expected_indices = selection.batch_select(
            scores, logits, 2, "affinity_binning", {"alpha": 0.7, "beta": 1, "confidence_gap": 1 / 0.7})
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(weights, expected_values / expected_values.sum(-1, keepdim=True))
    assert "lynx.batch_select" not in code
    if path == "body":
        # The binning and scoring are fused into generated C++ kernels; the only lynx call left is
        # the fused expert op (passes/fuse_experts.py), never the selection op.
        assert set(re.findall(r"torch\.ops\.lynx\.(\w+)\.default\(", code)) == {"moe_experts"}
        kernels = [line for line in code.splitlines() if "cpp_fused" in line and "async_compile.cpp" in line]
        assert any("floor" in line for line in kernels), kernels  # the binning, fused into generated C++
        assert "torch.ops.aten.sort.stable" in code  # sorts over the (tokens x experts) matrix stay library calls
    else:
        assert set(re.findall(r"torch\.ops\.lynx\.(\w+)\.default\(", code)) == {"moe_experts", "select_experts_cpu"}
