"""The grouped-GEMM expert computation (experts="inductor") against the torch reference, on CPU."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from lynx_compile.lowering.grouped_mm_experts import (
    grouped_mm_experts, grouped_mm_experts_fused_gate_up, unsupported_reason)
from lynx_compile.lowering.moe_experts_reference import ExpertWeights, fused_moe_reference

# Relative to the output's largest value. bf16: each projection is rounded before its bias and
# the down projection before the weighted sum (aten._grouped_mm returns bf16), the reference
# keeps them fp32, so a few bf16 ulps apart.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def make_case(T, k, E, H, I, dtype, order="halves", biased=False, ids=None, seed=0):
    """Inputs in transformers' storage: gate_up (E, 2I, H), down (E, H, I); ids k distinct per token."""
    generator = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    hidden = rand(T, H).to(dtype)
    gate_up = (rand(E, 2 * I, H) / H ** 0.5).to(dtype)
    down = (rand(E, H, I) / I ** 0.5).to(dtype)
    b_gate_up, b_down = (rand(E, 2 * I).to(dtype), rand(E, H).to(dtype)) if biased else (None, None)
    if ids is None:
        ids = torch.stack([torch.randperm(E, generator=generator)[:k] for _ in range(T)])
    weights = torch.rand(T, k, generator=generator)
    return dict(hidden=hidden, weights=weights, ids=ids, gate_up=gate_up, down=down, b_gate_up=b_gate_up,
                b_down=b_down, order=order)


def halves(case):
    """(w_gate, w_up, b_gate, b_up): views of the fused tensors, as the reference takes them."""
    gate_up, bias = case["gate_up"], case["b_gate_up"]
    if case["order"] == "halves":
        inter = gate_up.shape[1] // 2
        cut = lambda t: (t[:, :inter], t[:, inter:])  # noqa: E731
    else:
        cut = lambda t: (t[:, 0::2], t[:, 1::2])  # noqa: E731
    return (*cut(gate_up), *(cut(bias) if bias is not None else (None, None)))


def reference(case, activation):
    w_gate, w_up, b_gate, b_up = halves(case)
    return fused_moe_reference(case["hidden"], case["weights"], case["ids"], ExpertWeights(w_gate, w_up, case["down"], b_gate, b_up, case["b_down"], activation))


def fused(case, activation):
    return grouped_mm_experts_fused_gate_up(case["hidden"], case["weights"], case["ids"], case["gate_up"],
                                            case["down"], case["b_gate_up"], case["b_down"], activation,
                                            gate_up_order=case["order"])


def separate(case, activation):
    w_gate, w_up, b_gate, b_up = halves(case)
    return grouped_mm_experts(case["hidden"], case["weights"], case["ids"], ExpertWeights(w_gate, w_up, case["down"], b_gate, b_up, case["b_down"], activation))


def assert_close_to_reference(got, expected):
    assert got.shape == expected.shape and got.dtype == expected.dtype
    scale = expected.float().abs().max().clamp_min(1e-6)
    error = (got.float() - expected.float()).abs().max() / scale
    assert error <= TOLERANCE[expected.dtype], f"relative error {error:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation, order, biased", [
    ("silu", "halves", False),  # Mixtral, Qwen3-MoE, OLMoE, DeepSeek
    ("gpt_oss", "interleaved", True),  # GPT-OSS
])
@pytest.mark.parametrize("variant", [fused, separate], ids=["gate_up_fused", "gate_up_separate"])
def test_matches_reference(dtype, activation, order, biased, variant):
    case = make_case(T=11, k=2, E=8, H=64, I=48, dtype=dtype, order=order, biased=biased)
    assert_close_to_reference(variant(case, activation), reference(case, activation))


@pytest.mark.parametrize("shape", [
    dict(T=1, k=2, E=8, H=64, I=96),  # one decode token: two groups with rows, six empty
    dict(T=7, k=1, E=4, H=32, I=16),  # k = 1
    dict(T=33, k=4, E=16, H=40, I=24),  # most experts used, several rows each
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_edge_shapes(shape, dtype):
    case = make_case(**shape, dtype=dtype)
    assert_close_to_reference(fused(case, "silu"), reference(case, "silu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_expert_takes_every_token_and_unused_experts_are_never_read(dtype):
    T, E = 16, 8
    ids = torch.stack([torch.zeros(T, dtype=torch.long), torch.full((T,), 5)], dim=1)  # experts 0 and 5 only
    case = make_case(T=T, k=2, E=E, H=32, I=24, dtype=dtype, ids=ids)
    expected = reference(case, "silu")
    got = fused(case, "silu")
    assert_close_to_reference(got, expected)
    # Empty groups are skipped: NaN in the six unused experts' weights changes nothing.
    unused = [1, 2, 3, 4, 6, 7]
    for name in ("gate_up", "down"):
        case[name] = case[name].clone()
        case[name][unused] = float("nan")
    torch.testing.assert_close(fused(case, "silu"), got, rtol=0, atol=0)


def test_every_token_on_one_expert_with_k_1():
    case = make_case(T=9, k=1, E=4, H=32, I=16, dtype=torch.bfloat16, ids=torch.full((9, 1), 3))
    assert_close_to_reference(fused(case, "silu"), reference(case, "silu"))


def test_the_traced_graph_has_two_grouped_gemms_fixed_shapes_and_no_host_sync():
    case = make_case(T=5, k=2, E=8, H=32, I=16, dtype=torch.bfloat16)
    args = (case["hidden"], case["weights"], case["ids"], case["gate_up"], case["down"])

    def body(hidden, weights, ids, gate_up, down):
        return grouped_mm_experts_fused_gate_up(hidden, weights, ids, gate_up, down, None, None, "silu")

    traced = make_fx(body, tracing_mode="symbolic")(*args)  # T symbolic: nothing may depend on values
    targets = [str(node.target) for node in traced.graph.nodes if node.op == "call_function"]
    assert targets.count("aten._grouped_mm.default") == 2
    for sync in ("aten._local_scalar_dense.default", "aten.nonzero.default", "aten.item.default",
                 "aten.unique.default", "aten.bincount.default"):
        assert sync not in targets, sync
    torch.testing.assert_close(traced(*args), body(*args), rtol=0, atol=0)


def test_unsupported_operands_are_named():
    with FakeTensorMode():
        hidden = torch.empty(4, 64, dtype=torch.bfloat16)
        gate_up, down = torch.empty(8, 96, 64, dtype=torch.bfloat16), torch.empty(8, 64, 48, dtype=torch.bfloat16)
        assert unsupported_reason(hidden, down, gate_up) is None
        assert unsupported_reason(hidden, down.transpose(1, 2).contiguous().transpose(1, 2), gate_up) is None
        assert "bfloat16 only" in unsupported_reason(hidden.float(), down.float(), gate_up.float())
        odd = torch.empty(8, 64, 36, dtype=torch.bfloat16)  # I=36: 72-byte rows
        assert "expert intermediate size 36" in unsupported_reason(hidden, odd, torch.empty(8, 72, 64, dtype=torch.bfloat16))
        assert "hidden size 12" in unsupported_reason(torch.empty(4, 12, dtype=torch.bfloat16), down, gate_up)
        sliced = torch.empty(8, 97, 64, dtype=torch.bfloat16)[:, 1:]  # starts 128 bytes in: aligned
        assert unsupported_reason(hidden, down, sliced) is None
        shifted = torch.empty(8, 96 * 64 + 1, dtype=torch.bfloat16)[:, 1:].view(8, 96, 64)  # 2 bytes in
        assert "not 16-byte aligned" in unsupported_reason(hidden, down, shifted)


def test_bad_arguments_raise_value_error():
    case = make_case(T=2, k=2, E=4, H=16, I=8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="'gelu'"):
        fused(case, "gelu")
    with pytest.raises(ValueError, match="gate_up_order 'zigzag'"):
        case["order"] = "zigzag"
        fused(case, "silu")
