"""The CPU fused-MoE kernel against the torch reference: layouts, activations, dtypes, edge cases,
on every kernel path (LYNX_CPU_KERNEL), whatever the CPU running the tests."""

import pytest
import torch

from lynx_compile.lowering import ops  # noqa: F401  (registers lynx::moe_experts)
from lynx_compile.lowering.moe_experts_reference import ExpertWeights, fused_moe_reference
from lynx_compile.lowering.kernels.moe_experts_cpu import KERNEL_PATHS, describe_path, moe_experts_cpu

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # relative to the output's largest value


@pytest.fixture(autouse=True, params=list(KERNEL_PATHS))
def kernel_path(request, monkeypatch):
    """Each test once per path: 16 and 8 fp32 lanes, no intrinsics, and what auto picks here."""
    monkeypatch.setenv("LYNX_CPU_KERNEL", request.param)
    return describe_path(request.param)


def make_case(T, k, E, H, I, dtype, layout, biased, seed=0, ids=None):
    generator = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    hidden = rand(T, H).to(dtype)
    gate_up = (rand(E, 2 * I, H) / H ** 0.5).to(dtype)  # transformers' (E, 2I, H)
    down = (rand(E, H, I) / I ** 0.5).to(dtype)
    if layout == "concatenated":
        w_gate, w_up, w_down = gate_up[:, :I], gate_up[:, I:], down
    elif layout == "interleaved":
        w_gate, w_up, w_down = gate_up[:, 0::2], gate_up[:, 1::2], down
    else:  # transposed storage, as GPT-OSS keeps it: (E, H, 2I) and (E, I, H)
        stored_gate_up, stored_down = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
        w_gate, w_up = stored_gate_up.transpose(1, 2)[:, 0::2], stored_gate_up.transpose(1, 2)[:, 1::2]
        w_down = stored_down.transpose(1, 2)
    biases = (rand(E, I).to(dtype), rand(E, I).to(dtype), rand(E, H).to(dtype)) if biased else (None,) * 3
    if ids is None:
        ids = torch.stack([torch.randperm(E, generator=generator)[:k] for _ in range(T)]) if T else \
            torch.empty(0, k, dtype=torch.long)
    weights = torch.rand(T, k, generator=generator)
    return (hidden, weights, ids, w_gate, w_up, w_down, *biases)


def run(kernel, case, activation):
    """kernel(hidden, weights, ids, ExpertWeights(...)) for a make_case tuple."""
    return kernel(*case[:3], ExpertWeights(*case[3:], activation))


def assert_matches_reference(case, activation):
    expected = run(fused_moe_reference, case, activation)
    got = run(moe_experts_cpu, case, activation)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    scale = expected.float().abs().max().clamp_min(1e-6)
    error = (got.float() - expected.float()).abs().max() / scale
    assert error <= TOLERANCE[expected.dtype], f"relative error {error:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["concatenated", "interleaved", "transposed"])
@pytest.mark.parametrize("activation", ["silu", "gpt_oss"])
def test_matches_reference(dtype, layout, activation):
    case = make_case(T=11, k=2, E=8, H=64, I=48, dtype=dtype, layout=layout, biased=activation == "gpt_oss")
    assert_matches_reference(case, activation)


@pytest.mark.parametrize("shape", [
    dict(T=1, k=2, E=8, H=64, I=96),  # one token: two experts read, six never touched
    dict(T=7, k=1, E=4, H=13, I=7),  # k = 1, sizes that are not a multiple of the vector width
    dict(T=33, k=4, E=16, H=40, I=24),  # more tokens than one register block
    dict(T=12, k=2, E=2, H=1100, I=1030),  # 12 tokens per expert: widened tiles, K past one tile
])
def test_edge_shapes(shape):
    for dtype in (torch.float32, torch.bfloat16):
        assert_matches_reference(make_case(**shape, dtype=dtype, layout="concatenated", biased=False), "silu")


@pytest.mark.parametrize("shape", [
    dict(T=0, k=2, E=4, H=16, I=8),  # an empty batch: no pair reaches any expert
    dict(T=3, k=0, E=4, H=16, I=8),  # no slots
    dict(T=3, k=2, E=4, H=16, I=0),  # no intermediate features
    dict(T=3, k=2, E=4, H=0, I=8),  # no hidden features
])
def test_empty_sizes_give_the_reference_s_result_instead_of_crashing(shape):
    for dtype in (torch.float32, torch.bfloat16):
        case = make_case(**shape, dtype=dtype, layout="concatenated", biased=False)
        expected = run(fused_moe_reference, case, "silu")
        got = run(moe_experts_cpu, case, "silu")
        assert got.shape == expected.shape and torch.equal(got, expected)


def test_one_expert_takes_every_token_and_the_rest_are_empty():
    T, k, E = 16, 2, 8
    ids = torch.stack([torch.zeros(T, dtype=torch.long), torch.full((T,), 5)], dim=1)  # experts 0 and 5 only
    case = make_case(T=T, k=k, E=E, H=32, I=24, dtype=torch.float32, layout="concatenated", biased=False, ids=ids)
    assert_matches_reference(case, "silu")
    # Experts never routed to are never read: NaN weights there change nothing.
    hidden, weights, ids, w_gate, w_up, w_down = case[:6]
    poisoned = [w.clone() for w in (w_gate, w_up, w_down)]
    for w in poisoned:
        w[[1, 2, 3, 4, 6, 7]] = float("nan")
    torch.testing.assert_close(moe_experts_cpu(hidden, weights, ids, ExpertWeights(*poisoned)),
                               run(moe_experts_cpu, case, "silu"), rtol=0, atol=0)


def test_registered_op_runs_the_kernel():
    case = make_case(T=5, k=2, E=8, H=32, I=16, dtype=torch.bfloat16, layout="interleaved", biased=True)
    torch.testing.assert_close(torch.ops.lynx.moe_experts(*case, "gpt_oss", 1.702, 7.0),
                               run(moe_experts_cpu, case, "gpt_oss"), rtol=0, atol=0)


def test_out_of_range_expert_id_is_named():
    case = list(make_case(T=3, k=2, E=4, H=16, I=8, dtype=torch.float32, layout="concatenated", biased=False))
    case[2] = torch.tensor([[0, 1], [2, 9], [3, 0]])
    with pytest.raises(ValueError, match=r"outside \[0, 4\] \(4: no expert\).*max 9"):
        run(moe_experts_cpu, case, "silu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_sentinel_id_adds_nothing_and_reads_no_expert(dtype):
    """Id E: a pair an expert-parallel rank leaves to another rank (transformers' AllReduceEP)."""
    T, k, E = 9, 2, 4
    ids = torch.tensor([[0, 4], [4, 4], [2, 0], [4, 2], [0, 2], [2, 4], [4, 0], [0, 2], [4, 4]])  # experts 0, 2
    case = make_case(T=T, k=k, E=E, H=32, I=24, dtype=dtype, layout="concatenated", biased=False, ids=ids)
    assert_matches_reference(case, "silu")
    hidden, weights, _, w_gate, w_up, w_down = case[:6]
    # the same as sending those slots to expert 0 with weight 0 (finite weights: 0 * y = 0)
    expected = fused_moe_reference(hidden, torch.where(ids == E, 0, weights), torch.where(ids == E, 0, ids),
                                   ExpertWeights(w_gate, w_up, w_down))
    got = run(moe_experts_cpu, case, "silu")
    scale = expected.float().abs().max()
    assert ((got.float() - expected.float()).abs().max() / scale) <= TOLERANCE[dtype]
    assert torch.equal(got[1], torch.zeros_like(got[1]))  # a token served wholly elsewhere: zeros
    poisoned = [w.clone() for w in (w_gate, w_up, w_down)]
    for w in poisoned:
        w[[1, 3]] = float("nan")  # never routed, and the sentinel reads no expert
    torch.testing.assert_close(moe_experts_cpu(hidden, weights, ids, ExpertWeights(*poisoned)), got, rtol=0, atol=0)


def test_unknown_activation_is_named():
    case = make_case(T=3, k=2, E=4, H=16, I=8, dtype=torch.float32, layout="concatenated", biased=False)
    with pytest.raises(ValueError, match="'gelu'"):
        run(moe_experts_cpu, case, "gelu")
