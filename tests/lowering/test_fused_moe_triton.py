"""The Triton fused-MoE kernels, run on CPU through the Triton interpreter, against the torch
reference (which is itself checked against a naive per-token loop)."""

import os

# Before anything imports Triton: if this module is the first to import it, Triton builds its
# library functions for the interpreter. The previous value is restored once the imports are
# done and the fixture below sets it again for these tests only, so the rest of the session
# (e.g. Inductor on a GPU machine) is unaffected. The kernels are built lazily per mode and use
# only Triton builtins, so they interpret correctly even when Triton was imported earlier.
_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from lynx_compile.lowering.kernels import fused_moe_triton as fmt  # noqa: E402
from lynx_compile.lowering.moe_experts_reference import ExpertWeights, fused_moe_reference  # noqa: E402

if _PREVIOUS_INTERPRET is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _PREVIOUS_INTERPRET

SMALL = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}  # the interpreter is slow: tiny tiles
TOLERANCES = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def assert_close(actual, expected):
    """Per-dtype tolerances. bf16: the absolute part scales with the output's magnitude, since
    the reference rounds after every activation op (as transformers does) and the kernel once,
    a difference of about one bf16 ulp of the intermediate, which can be large (gpt_oss: up to
    (limit + 1) * limit)."""
    tol = dict(TOLERANCES[expected.dtype])
    if expected.dtype != torch.float32:
        tol["atol"] *= max(1.0, float(expected.float().abs().max()))
    torch.testing.assert_close(actual, expected, **tol)


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not fmt._interpret_mode():
        pytest.skip("Triton's interpret knob is forced off in this session (triton.knobs.runtime.interpret "
                    "set explicitly); these tests need the CPU interpreter")


# --------------------------------------------------------------------------------------------
# Problem builders
# --------------------------------------------------------------------------------------------


def routing(num_tokens, num_experts, top_k, generator, experts=None):
    """topk_ids (T, k) with k distinct experts per token drawn from `experts` (all by default),
    and softmax routing weights."""
    pool = torch.tensor(experts if experts is not None else range(num_experts))
    ids = torch.stack([pool[torch.randperm(len(pool), generator=generator)[:top_k]] for _ in range(num_tokens)])
    weights = torch.softmax(torch.randn(num_tokens, top_k, generator=generator), dim=-1)
    return ids, weights


def weights(num_experts, hidden, inter, generator, layout="plain", bias=False, dtype=torch.float32):
    """(w_gate, w_up, w_down, b_gate, b_up, b_down) in one of the layouts models store them in."""
    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype)

    sh, si = hidden ** -0.5, inter ** -0.5
    if layout == "plain":  # separate contiguous (E, I, H), (E, I, H), (E, H, I)
        w_gate = randn(num_experts, inter, hidden, scale=sh)
        w_up = randn(num_experts, inter, hidden, scale=sh)
        w_down = randn(num_experts, hidden, inter, scale=si)
    elif layout == "concat":  # Mixtral/Qwen-style gate_up (E, 2I, H): gate rows first
        gate_up = randn(num_experts, 2 * inter, hidden, scale=sh)
        w_gate, w_up = gate_up[:, :inter], gate_up[:, inter:]
        w_down = randn(num_experts, hidden, inter, scale=si)
    elif layout == "interleaved":  # GPT-OSS: gate_up (E, H, 2I), gate columns 0::2, up 1::2
        gate_up = randn(num_experts, hidden, 2 * inter, scale=sh)
        w_gate, w_up = gate_up[:, :, 0::2].transpose(1, 2), gate_up[:, :, 1::2].transpose(1, 2)
        w_down = randn(num_experts, inter, hidden, scale=si).transpose(1, 2)  # stored (E, I, H)
    elif layout == "transposed":  # every weight stored the other way round
        w_gate = randn(num_experts, hidden, inter, scale=sh).transpose(1, 2)
        w_up = randn(num_experts, hidden, inter, scale=sh).transpose(1, 2)
        w_down = randn(num_experts, inter, hidden, scale=si).transpose(1, 2)
    else:
        raise ValueError(layout)
    b_gate = b_up = b_down = None
    if bias:
        if layout == "interleaved":
            gate_up_bias = randn(num_experts, 2 * inter, scale=0.5)
            b_gate, b_up = gate_up_bias[:, 0::2], gate_up_bias[:, 1::2]
        else:
            b_gate, b_up = randn(num_experts, inter, scale=0.5), randn(num_experts, inter, scale=0.5)
        b_down = randn(num_experts, hidden, scale=0.5)
    return w_gate, w_up, w_down, b_gate, b_up, b_down


def naive_moe(hidden, topk_weights, topk_ids, w_gate, w_up, w_down, b_gate, b_up, b_down, activation,
              alpha=1.702, limit=7.0):
    """Independent of the reference: token by token, slot by slot, activation by formula."""
    dtype = hidden.dtype
    out = torch.zeros(hidden.shape, dtype=torch.float32)
    for t in range(hidden.shape[0]):
        x = hidden[t].float()
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            g = w_gate[e].float().matmul(x) + (b_gate[e].float() if b_gate is not None else 0)
            u = w_up[e].float().matmul(x) + (b_up[e].float() if b_up is not None else 0)
            g, u = g.to(dtype).float(), u.to(dtype).float()
            if activation == "silu":
                a = g / (1 + torch.exp(-g)) * u
            else:
                g = torch.minimum(g, torch.tensor(limit))
                u = torch.maximum(torch.minimum(u, torch.tensor(limit)), torch.tensor(-limit))
                a = (u + 1) * g / (1 + torch.exp(-alpha * g))
            y = w_down[e].float().matmul(a.to(dtype).float()) + (b_down[e].float() if b_down is not None else 0)
            out[t] += float(topk_weights[t, j]) * y
    return out.to(dtype)


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["silu", "gpt_oss"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_naive_loop(activation, dtype):
    gen = torch.Generator().manual_seed(1)
    ids, route = routing(7, 6, 2, gen)
    ws = weights(6, 24, 20, gen, layout="concat", bias=True, dtype=dtype)
    hidden = (torch.randn(7, 24, generator=gen) * 3).to(dtype)  # large enough to hit gpt_oss clamps
    ref = fused_moe_reference(hidden, route, ids, ExpertWeights(*ws, activation))
    naive = naive_moe(hidden, route, ids, *ws, activation)
    assert ref.dtype == dtype and ref.shape == hidden.shape
    if dtype == torch.float32:
        torch.testing.assert_close(ref, naive, atol=1e-5, rtol=1e-5)
    else:
        assert_close(ref, naive)


# --------------------------------------------------------------------------------------------
# Kernels vs reference
# --------------------------------------------------------------------------------------------

CASES = {
    # name: (T, H, I, E, k, dtype, activation, layout, bias)
    "fp32-silu-plain": (5, 32, 32, 4, 2, torch.float32, "silu", "plain", False),
    "bf16-silu-concat-bias": (16, 64, 48, 8, 2, torch.bfloat16, "silu", "concat", True),
    "bf16-gptoss-interleaved-T1": (1, 32, 32, 8, 2, torch.bfloat16, "gpt_oss", "interleaved", True),
    "fp32-silu-transposed-ragged": (5, 48, 40, 4, 1, torch.float32, "silu", "transposed", False),
    "fp32-gptoss-clamped-bias": (5, 32, 32, 4, 2, torch.float32, "gpt_oss", "plain", True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernels_match_reference(case):
    num_tokens, hidden_size, inter, num_experts, top_k, dtype, activation, layout, bias = CASES[case]
    gen = torch.Generator().manual_seed(len(case))
    ids, route = routing(num_tokens, num_experts, top_k, gen)
    ws = weights(num_experts, hidden_size, inter, gen, layout=layout, bias=bias, dtype=dtype)
    scale = 4.0 if activation == "gpt_oss" else 1.0  # gpt_oss: push gate/up past +-limit
    hidden = (torch.randn(num_tokens, hidden_size, generator=gen) * scale).to(dtype)
    if case.startswith("bf16-gptoss"):  # also: int32 ids, bf16 routing weights
        ids, route = ids.to(torch.int32), route.to(torch.bfloat16)
    out = fmt.fused_moe_triton(hidden, route, ids, ExpertWeights(*ws, activation), config=SMALL)
    ref = fused_moe_reference(hidden, route, ids, ExpertWeights(*ws, activation))
    assert out.dtype == dtype and out.shape == (num_tokens, hidden_size)
    assert_close(out, ref)


def test_one_expert_takes_every_token_and_empty_experts_are_never_read():
    gen = torch.Generator().manual_seed(3)
    num_tokens, hidden_size, inter, num_experts = 20, 32, 32, 4  # 20 rows: two M-blocks of 16
    w_gate, w_up, w_down, _, _, _ = weights(num_experts, hidden_size, inter, gen)
    for e in (0, 1, 3):  # poison every expert but 2: reading any of them makes NaNs
        w_gate[e], w_up[e], w_down[e] = float("nan"), float("nan"), float("nan")
    ids = torch.full((num_tokens, 1), 2)
    route = torch.rand(num_tokens, 1, generator=gen)
    hidden = torch.randn(num_tokens, hidden_size, generator=gen)
    out = fmt.fused_moe_triton(hidden, route, ids, ExpertWeights(w_gate, w_up, w_down, None, None, None, "silu"), config=SMALL)
    ref = fused_moe_reference(hidden, route, ids, ExpertWeights(w_gate, w_up, w_down, None, None, None, "silu"))
    assert torch.isfinite(out).all()
    assert_close(out, ref)


def test_the_sentinel_id_adds_nothing_and_reads_no_expert():
    """Id E: a pair an expert-parallel rank leaves to another rank (transformers' AllReduceEP)."""
    gen = torch.Generator().manual_seed(7)
    num_tokens, hidden_size, inter, num_experts = 6, 32, 32, 4
    w_gate, w_up, w_down, _, _, _ = weights(num_experts, hidden_size, inter, gen)
    for e in (1, 3):  # never routed: reading them makes NaNs
        w_gate[e], w_up[e], w_down[e] = float("nan"), float("nan"), float("nan")
    ids = torch.tensor([[0, 4], [4, 4], [2, 0], [4, 2], [0, 2], [2, 4]])
    route = torch.rand(num_tokens, 2, generator=gen)
    hidden = torch.randn(num_tokens, hidden_size, generator=gen)
    experts = ExpertWeights(w_gate, w_up, w_down, None, None, None, "silu")
    out = fmt.fused_moe_triton(hidden, route, ids, experts, config=SMALL)
    ref = fused_moe_reference(hidden, route, ids, experts)
    assert torch.isfinite(out).all() and torch.equal(out[1], torch.zeros(hidden_size))
    assert_close(out, ref)


def test_default_block_table_and_strided_routing_weights():
    gen = torch.Generator().manual_seed(4)
    ids, _ = routing(5, 4, 2, gen)
    route = torch.rand(5, 4, generator=gen)[:, 1::2]  # non-contiguous (T, k)
    ws = weights(4, 32, 32, gen, bias=True)
    hidden = torch.randn(5, 32, generator=gen)
    out = fmt.fused_moe_triton(hidden, route, ids, ExpertWeights(*ws, "silu"))  # config=None: from the table
    assert_close(out, fused_moe_reference(hidden, route, ids, ExpertWeights(*ws, "silu")))


def test_no_tokens_launches_nothing():
    gen = torch.Generator().manual_seed(5)
    ws = weights(4, 32, 32, gen)
    hidden = torch.empty(0, 32)
    out = fmt.fused_moe_triton(hidden, torch.empty(0, 2), torch.empty(0, 2, dtype=torch.int64), ExpertWeights(*ws, "silu"))
    assert out.shape == (0, 32)


def test_rejects_bad_inputs():
    gen = torch.Generator().manual_seed(6)
    ws = weights(4, 32, 48, gen)
    ids, route = routing(2, 4, 2, gen)
    hidden = torch.randn(2, 32)
    with pytest.raises(ValueError, match="activation"):
        fmt.fused_moe_triton(hidden, route, ids, ExpertWeights(*ws, "gelu"))
    with pytest.raises(ValueError, match="w_down"):
        fmt.fused_moe_triton(hidden, route, ids, ExpertWeights(ws[0], ws[1], ws[0], None, None, None, "silu"))
    with pytest.raises(ValueError, match="power of two"):
        fmt.fused_moe_triton(hidden, route, ids, ExpertWeights(*ws, "silu"), config={"BLOCK_M": 8})


# --------------------------------------------------------------------------------------------
# Align
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_m", [4, 16])
@pytest.mark.parametrize("num_tokens,top_k,experts", [(13, 2, [1, 2, 5, 6]), (1, 2, None), (9, 1, [3])])
def test_align_block_size(block_m, num_tokens, top_k, experts):
    num_experts = 8
    gen = torch.Generator().manual_seed(num_tokens)
    ids, _ = routing(num_tokens, num_experts, top_k, gen, experts=experts)
    sorted_ids, block_expert, num_padded = fmt.moe_align_block_size(ids, block_m, num_experts)
    num_pairs = ids.numel()
    flat = ids.reshape(-1)

    m_max = fmt.max_padded_pairs(num_pairs, num_experts, block_m)
    assert sorted_ids.shape == (m_max,) and block_expert.shape == (m_max // block_m,)
    assert sorted_ids.dtype == block_expert.dtype == num_padded.dtype == torch.int32
    total = int(num_padded)
    assert total % block_m == 0 and total <= m_max

    used = sorted_ids[:total]
    assert (sorted_ids[total:] == num_pairs).all()  # past the total: padding only
    real = used[used < num_pairs]
    assert sorted(real.tolist()) == list(range(num_pairs))  # every pair exactly once

    counts = torch.bincount(flat, minlength=num_experts)
    expected_blocks = []
    for e in range(num_experts):
        expected_blocks += [e] * (-(-int(counts[e]) // block_m))  # ceil: 0 blocks when empty
    assert block_expert[: total // block_m].tolist() == expected_blocks  # ascending, no empty expert
    for b, e in enumerate(expected_blocks):
        block = used[b * block_m:(b + 1) * block_m]
        pairs = block[block < num_pairs]
        assert len(pairs) > 0 and (flat[pairs.long()] == e).all()  # one expert per block, no empty block
        assert pairs.tolist() == sorted(pairs.tolist())  # stable: pair order within the run
    assert (block_expert >= 0).all() and (block_expert < num_experts).all()  # valid even past the end


def test_align_gives_sentinel_pairs_no_slot():
    ids = torch.tensor([[0, 8], [8, 3], [3, 8]])  # 8 = E: served by another expert-parallel rank
    sorted_ids, block_expert, num_padded = fmt.moe_align_block_size(ids, 4, 8)
    used = sorted_ids[:int(num_padded)]
    assert sorted(used[used < ids.numel()].tolist()) == [0, 3, 4]  # the pairs of experts 0 and 3 only
    assert block_expert[:int(num_padded) // 4].tolist() == [0, 3]


def test_align_has_no_data_dependent_ops():
    """Fake tensors carry no data: .item(), nonzero, bincount without a fixed size, etc. raise.
    Passing means the align step (and so the launcher) never syncs with the host."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        ids = mode.from_tensor(torch.randint(0, 8, (5, 2)))
        sorted_ids, block_expert, num_padded = fmt.moe_align_block_size(ids, 16, 8)
    assert sorted_ids.shape == (fmt.max_padded_pairs(10, 8, 16),) and num_padded.shape == (1,)


# --------------------------------------------------------------------------------------------
# Block-size table
# --------------------------------------------------------------------------------------------


def test_block_table():
    decode = fmt.select_block_config(128, 2880, 2880, num_tokens=1, top_k=4)  # GPT-OSS-like
    prefill = fmt.select_block_config(8, 4096, 14336, num_tokens=4096, top_k=2)  # Mixtral-like
    assert decode["BLOCK_M"] == 16 and prefill["BLOCK_M"] > 16
    tiny = fmt.select_block_config(4, 32, 24, 5, 2)
    assert tiny["BLOCK_N"] <= 32 and tiny["BLOCK_K"] <= 32  # never wider than the padded dims
    assert fmt.select_block_config(4, 32, 24, 5, 2, {"BLOCK_M": 64})["BLOCK_M"] == 64
    with pytest.raises(ValueError, match="unknown config keys"):
        fmt.select_block_config(4, 32, 24, 5, 2, {"BLOCK_SIZE_M": 64})


# --------------------------------------------------------------------------------------------
# torch.library ops
# --------------------------------------------------------------------------------------------


def test_triton_op_runs_eagerly():
    """Eager calls go straight to the kernels (wrap_triton passes interpreted kernels through)."""
    gen = torch.Generator().manual_seed(7)
    ids, route = routing(3, 4, 2, gen)
    ws = weights(4, 32, 32, gen, layout="concat")
    hidden = torch.randn(3, 32, generator=gen)
    out = torch.ops.lynx.fused_moe_triton(hidden, route, ids, *ws, "silu", block_m=16, block_n=16, block_k=16)
    assert_close(out, fused_moe_reference(hidden, route, ids, ExpertWeights(*ws, "silu")))


def test_opaque_op_under_torch_compile():
    gen = torch.Generator().manual_seed(8)
    ids, route = routing(4, 4, 2, gen)
    w_gate, w_up, w_down, b_gate, b_up, b_down = weights(4, 32, 32, gen, layout="interleaved", bias=True)
    hidden = torch.randn(4, 32, generator=gen)

    def moe(hidden, route, ids):
        return torch.ops.lynx.fused_moe_triton_opaque(
            hidden, route, ids, w_gate, w_up, w_down, b_gate, b_up, b_down, "gpt_oss", 1.702, 7.0, 16, 16, 16)

    out = torch.compile(moe, backend="inductor", fullgraph=True)(hidden, route, ids)
    ref = fused_moe_reference(hidden, route, ids, ExpertWeights(w_gate, w_up, w_down, b_gate, b_up, b_down, "gpt_oss"))
    assert_close(out, ref)


_CUDA_TARGET_CHECK = textwrap.dedent("""
    import re
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from torch._functorch.aot_autograd import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode
    from lynx_compile.lowering.kernels import fused_moe_triton as fmt

    class Hopper:  # stands in for the CUDA driver: only the compile target is asked for
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(Hopper())
    gate_up, down = fmt._get_kernels()
    assert type(gate_up).__name__ == "JITFunction", type(gate_up)

    # 1. The triton_op decomposes into the two user kernels, writing only their outputs.
    graphs = []
    def capture(gm, _):
        graphs.append(gm)
        return gm
    def moe(x, w, ids, wg, wu, wd, bd):
        return torch.ops.lynx.fused_moe_triton(x, w, ids, wg, wu, wd, None, None, bd, "gpt_oss")
    T, H, I, E, k = 5, 32, 32, 4, 2
    with FakeTensorMode():
        gate_up_w = torch.empty(E, H, 2 * I, dtype=torch.bfloat16)
        args = (torch.empty(T, H, dtype=torch.bfloat16), torch.empty(T, k), torch.zeros(T, k, dtype=torch.long),
                gate_up_w[:, :, 0::2].transpose(1, 2), gate_up_w[:, :, 1::2].transpose(1, 2),
                torch.empty(E, I, H, dtype=torch.bfloat16).transpose(1, 2), torch.empty(E, H))
        aot_function(moe, fw_compiler=capture)(*args)
    code = graphs[0].code
    assert code.count("triton_kernel_wrapper_functional(") == 2, code
    assert re.findall(r"tensors_to_clone = (\\[[^\\]]*\\])", code) == ["['inter_ptr']", "['out_ptr']"], code

    # 2. Both kernels compile to PTX for sm_90 (bf16, decode block sizes).
    def signature(kernel, pointers, floats=()):
        return {name: pointers.get(name, "constexpr" if name.isupper() and len(name) > 1
                                   else "fp32" if name in floats else "i32") for name in kernel.arg_names}
    ids = {"sorted_pair_ids_ptr": "*i32", "block_expert_ptr": "*i32", "num_padded_ptr": "*i32"}
    blocks = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, FP32_DOT=False)
    for kernel, pointers, consts, floats in (
        (gate_up, {**{p: "*bf16" for p in ("hidden_ptr", "w_gate_ptr", "w_up_ptr", "b_gate_ptr", "b_up_ptr",
                                            "inter_ptr")}, **ids},
         dict(blocks, ACTIVATION=1, HAS_BIAS_GATE=True, HAS_BIAS_UP=True), ("alpha", "limit")),
        (down, {**{p: "*bf16" for p in ("inter_ptr", "w_down_ptr", "b_down_ptr")}, "topk_weights_ptr": "*fp32",
                "out_ptr": "*fp32", **ids}, dict(blocks, HAS_BIAS=True), ()),
    ):
        constexprs = {(kernel.arg_names.index(name),): value for name, value in consts.items()}
        compiled = triton.compile(ASTSource(kernel, signature(kernel, pointers, floats), constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32))
        assert ".entry" in compiled.asm["ptx"]
    print("OK")
""")


def test_cuda_path_traces_and_compiles_for_sm90_without_a_gpu():
    """In a fresh process without the interpreter: the triton_op's decomposition (what Inductor
    schedules) holds the two user kernels with exact mutation info, and they compile for sm_90.
    Needs Triton's NVIDIA backend (shipped in the wheel), not a GPU."""
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("Triton has no NVIDIA backend here")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run([sys.executable, "-c", _CUDA_TARGET_CHECK], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr[-4000:]
