"""The expert-dispatch fusion: which dispatches become lynx.moe_experts, op counts, numerics."""

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import lynx_compile
from lynx_compile.config import LynxConfig
from lynx_compile.passes.find_routing import find_routing_sites
from lynx_compile.passes.fuse_experts import fuse_expert_dispatches
from moe_models import ARCHS, GptFastMoE, PassOnlyBackend, count_ops, decode_hidden, moe_block
from test_rewrite_routing import capture_aten_graph

MOE_EXPERTS = "lynx.moe_experts.default"
# The ops each experts implementation computes its expert matmuls with (post-grad, CPU).
EXPERT_MATMULS = ("transformers.grouped_mm_fallback.default", "aten._grouped_mm.default", "aten.bmm.default")
FUSED = LynxConfig(policy="none", experts="fused")
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def run_pass_only(module, inputs, config):
    backend = PassOnlyBackend(config)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(module, backend=backend)(inputs)
    return backend, out[0] if isinstance(out, tuple) else out


def assert_close_relative(got, expected, dtype):
    scale = expected.float().abs().max().clamp_min(1e-6)
    error = (got.float() - expected.float()).abs().max() / scale
    assert error <= TOLERANCE[dtype], f"relative error {error:.2e}"


def test_stage_replaces_the_dispatch_and_nothing_else():
    gm = capture_aten_graph(moe_block("mixtral"), decode_hidden(8))
    before = count_ops(gm.graph)
    assert before["transformers.grouped_mm_fallback.default"] == 2 and before[MOE_EXPERTS] == 0

    sites = find_routing_sites(gm.graph, FUSED)
    assert fuse_expert_dispatches(gm.graph, sites, FUSED) == 1
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    after = count_ops(gm.graph)
    assert after[MOE_EXPERTS] == 1
    for op in ("transformers.grouped_mm_fallback.default", "aten.sort.default", "aten.histc.default",
               "aten.index_put.default"):
        assert after[op] == 0, op
    # The router and the routing weights are untouched.
    for op in ("aten.mm.default", "aten.topk.default", "aten.amax.default"):
        assert after[op] == before[op], op
    assert sites[0].experts.startswith("fused: grouped_mm dispatch")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("experts_impl", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_architecture_and_implementation_fuses_and_matches_eager(arch, experts_impl, dtype):
    block = moe_block(arch, experts_impl=experts_impl, dtype=dtype)
    hidden = decode_hidden(8, dtype)
    with torch.no_grad():
        expected = block(hidden)
    expected = expected[0] if isinstance(expected, tuple) else expected
    backend, got = run_pass_only(block, hidden, FUSED)
    [site] = backend.routing_sites
    assert site.experts.startswith("fused:"), site.experts
    assert backend.total("after", MOE_EXPERTS) == 1
    assert sum(backend.total("before", op) for op in EXPERT_MATMULS) == 2
    assert sum(backend.total("after", op) for op in EXPERT_MATMULS) == 0
    assert_close_relative(got, expected, dtype)


def test_gpt_oss_layout_is_recognised():
    backend, _ = run_pass_only(moe_block("gpt_oss"), decode_hidden(4), FUSED)
    assert "gpt_oss (alpha 1.702, limit 7), gate/up interleaved fused, transposed, biased" in backend.routing_sites[0].experts


def test_gpt_fast_gather_einsum_fuses_with_separate_weights():
    module = GptFastMoE()
    hidden = torch.randn(4, 1, 32)
    with torch.no_grad():
        expected = module(hidden)
    backend, got = run_pass_only(module, hidden, FUSED)
    assert "silu, gate/up separate" in backend.routing_sites[0].experts
    assert backend.total("after", MOE_EXPERTS) == 1 and backend.total("after", "aten.bmm.default") == 0
    assert_close_relative(got, expected, torch.float32)


class GeluExpertsMoE(GptFastMoE):
    """Gated experts with GELU: a dispatch the fused op does not compute."""

    def experts_for_tokens(self, x):
        scores = torch.softmax(self.gate(x), dim=-1)
        weights, indices = torch.topk(scores, self.activated, dim=-1)
        x1 = torch.nn.functional.gelu(torch.einsum("td,taid->tai", x, self.w1[indices]))
        x3 = torch.einsum("td,taid->tai", x, self.w3[indices])
        out = torch.einsum("tai,tadi->tad", x1 * x3, self.w2[indices])
        return torch.einsum("tad,ta->td", out, weights)


def test_a_dispatch_no_layout_explains_stays_as_it_was():
    backend, _ = run_pass_only(GeluExpertsMoE(), torch.randn(4, 1, 32), FUSED)
    [site] = backend.routing_sites
    assert site.experts.startswith("kept:") and "no fused expert layout" in site.experts
    assert backend.after == backend.before


def test_eager_experts_keep_their_loop_with_the_reason():
    backend, _ = run_pass_only(moe_block("mixtral", experts_impl="eager"), decode_hidden(4), FUSED)
    [site] = backend.routing_sites
    assert site.experts.startswith("kept:") and "no (tokens, hidden) output" in site.experts
    assert backend.total("after", MOE_EXPERTS) == 0


@pytest.mark.parametrize("config, fused", [
    (LynxConfig(policy="none"), False),  # experts="auto" fuses only when selecting
    (LynxConfig(experts="keep"), False),
    (LynxConfig(), True),
])
def test_config_decides(config, fused, monkeypatch):
    monkeypatch.setenv("LYNX_EXPERTS_AUTO", "fused")  # "auto" where it fuses; the CPU's own choice is tested below
    backend, _ = run_pass_only(moe_block("qwen3_moe"), decode_hidden(4), config)
    assert backend.total("after", MOE_EXPERTS) == int(fused)


@pytest.mark.parametrize("arch, dtype", [("mixtral", torch.bfloat16), ("gpt_oss", torch.float32)])
def test_inductor_policy_none_fused_matches_default_inductor_and_passes_weight_views(arch, dtype):
    block = moe_block(arch, dtype=dtype)
    hidden = decode_hidden(8, dtype)
    torch._dynamo.reset()
    with torch.no_grad():
        expected = torch.compile(block)(hidden)
        torch._dynamo.reset()
        got, [code] = run_and_get_code(
            torch.compile(block, backend="lynx", options={"policy": "none", "experts": "fused"}), hidden)
    assert_close_relative(got[0], expected[0], dtype)
    [call] = [line for line in code.splitlines() if "torch.ops.lynx.moe_experts.default(" in line]
    # The expert weights (and GPT-OSS's biases) reach the kernel as the parameters themselves or
    # views of them, never as buffers Inductor filled with a copy.
    operands = top_level_arguments(call.split("torch.ops.lynx.moe_experts.default(", 1)[1])
    weights_and_biases = [a for a in operands[3:9] if a != "None"]
    assert len(weights_and_biases) == (6 if arch == "gpt_oss" else 3)
    for operand in weights_and_biases:
        assert re.fullmatch(r"(reinterpret_tensor\()?arg\d+_\d+(, .*\))?", operand), operand


def top_level_arguments(call_tail: str) -> list[str]:
    """The comma-separated arguments of a call, given the text after its opening parenthesis."""
    arguments, depth, current = [], 0, ""
    for char in call_tail:
        if char == ")" and depth == 0:
            break
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            arguments.append(current.strip())
            current = ""
        else:
            current += char
    return arguments + [current.strip()]


def test_explain_reports_the_experts_decision(monkeypatch):
    monkeypatch.setenv("LYNX_EXPERTS_AUTO", "fused")
    report = lynx_compile.explain(moe_block("mixtral"), decode_hidden(8))
    [site] = report.routing_sites
    assert site.experts.startswith("fused: grouped_mm dispatch")
    assert "experts" in report.table().splitlines()[0]


DISPATCH_FORMS = [("mixtral", "grouped_mm"), ("mixtral", "batched_mm"), ("gpt_oss", "grouped_mm"),
                  ("gpt_oss", "batched_mm"), ("deepseek_v3", "grouped_mm"), ("deepseek_v3", "batched_mm"),
                  ("gpt_fast", None)]


@pytest.mark.parametrize("arch, experts_impl", DISPATCH_FORMS)
def test_symbolic_batch_fuses_exactly_as_a_static_one(arch, experts_impl):
    """dynamic=True: T is a symbol and reshapes take SymInt sizes (they used to block the region).
    GPT-OSS's Python-float alpha/limit would become run-time inputs under dynamic=True, so floats are
    specialized as Dynamo does when it marks shapes dynamic by itself (generate()'s path)."""
    if arch == "gpt_fast":
        module, make = GptFastMoE(), (lambda batch: torch.randn(batch, 1, 32, generator=torch.Generator().manual_seed(batch)))
    else:
        module = moe_block(arch, experts_impl=experts_impl, dtype=torch.bfloat16)
        make = lambda batch: decode_hidden(batch, torch.bfloat16, seed=batch)  # noqa: E731
    backend = PassOnlyBackend(FUSED)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(specialize_float=True), torch.no_grad():
        compiled = torch.compile(module, backend=backend, dynamic=True)
        for batch in (8, 5):
            got, expected = compiled(make(batch)), module(make(batch))
            got, expected = (o[0] if isinstance(o, tuple) else o for o in (got, expected))
            assert_close_relative(got, expected, torch.bfloat16)
    [site] = backend.routing_sites  # one graph, symbolic T, serves both batch sizes
    assert not isinstance(site.phase.tokens_from.meta["val"].shape[0], int)  # the batch is a symbol
    assert site.experts.startswith("fused:"), site.experts
    assert backend.total("after", MOE_EXPERTS) == 1


def test_a_float_taken_as_a_run_time_input_is_named_in_the_reason():
    backend = PassOnlyBackend(FUSED)
    with torch.no_grad():
        torch.compile(moe_block("gpt_oss"), backend=backend, dynamic=True)(decode_hidden(4))
    [site] = backend.routing_sites
    assert site.experts.startswith("kept:") and "specialize_float" in site.experts, site.experts


def test_gpt_oss_with_its_own_alpha_and_limit_fuses_with_them():
    """The clamp acts only on large pre-activations; a limit other than 7.0 must be found, not assumed."""
    block = moe_block("gpt_oss", swiglu_limit=2.0, swiglu_alpha=1.25)
    hidden = decode_hidden(8) * 40  # large enough for the clamp to bite
    with torch.no_grad():
        expected = block(hidden)[0]
    backend, got = run_pass_only(block, hidden, FUSED)
    [site] = backend.routing_sites
    assert "gpt_oss (alpha 1.25, limit 2)" in site.experts, site.experts
    assert_close_relative(got, expected, torch.float32)


def test_the_layers_of_one_model_are_checked_once(monkeypatch):
    from lynx_compile.passes import expert_layout
    from moe_models import decode_step, tiny_model

    checks = []
    real_verify = expert_layout._verify
    monkeypatch.setattr(expert_layout, "_verified", {})
    monkeypatch.setattr(expert_layout, "_verify", lambda *a: checks.append(1) or real_verify(*a))
    model = tiny_model("qwen3_moe", num_layers=3)
    backend = PassOnlyBackend(FUSED)
    with torch.no_grad():
        torch.compile(model, backend=backend)(**decode_step(model, 4))
    assert [s.experts.startswith("fused:") for s in backend.routing_sites] == [True] * 3
    assert len(checks) == 1


@pytest.mark.parametrize("arch, experts_impl", [("mixtral", "grouped_mm"), ("qwen3_moe", "batched_mm")])
@pytest.mark.parametrize("options", [{}, {"policy": "none", "experts": "fused"}], ids=["binning", "none+fused"])
def test_a_dtype_no_kernel_takes_leaves_the_dispatch_and_runs(arch, experts_impl, options):
    """fp16 on CPU: the kernel takes bf16/fp32, so the dispatch must stay (it used to fuse and
    then raise ValueError at the first call)."""
    block = moe_block(arch, experts_impl=experts_impl, dtype=torch.float16)
    hidden = decode_hidden(4, torch.float16)
    with torch.no_grad():
        expected = block(hidden)[0]
        got = torch.compile(block, backend="lynx", options=options)(hidden)[0]
    assert torch.isfinite(got).all()
    if options:  # policy none: the same computation as eager, up to Inductor's fp16 rounding
        assert_close_relative(got, expected, torch.bfloat16)
    report = lynx_compile.explain(block, hidden, config=LynxConfig(**options))
    [site] = report.routing_sites
    assert site.experts.startswith("kept:") and "hidden dtype float16: the cpu kernel takes" in site.experts


@pytest.mark.parametrize("measured_isa, dtype, fused", [
    (True, torch.bfloat16, True),  # AVX2 / AVX-512 / AVX512_BF16 / AMX: measured faster than the model's GEMMs
    (True, torch.float32, True),
    (False, torch.bfloat16, False),  # an ISA the table never measured (ARM, no vector ISA)
    (False, torch.float32, False),
])
def test_auto_decides_from_the_cpu_it_runs_on(monkeypatch, measured_isa, dtype, fused):
    from lynx_compile.lowering.kernels import choice

    monkeypatch.delenv(choice.AUTO_ENV, raising=False)  # the CPU decides here, whatever the suite forces
    monkeypatch.setattr(choice, "kernel_measured_on_this_cpu", lambda: measured_isa)
    backend, _ = run_pass_only(moe_block("mixtral", dtype=dtype), decode_hidden(8, dtype), LynxConfig())
    [site] = backend.routing_sites
    assert site.rewritten  # selection applies either way
    assert backend.total("after", MOE_EXPERTS) == int(fused)
    if not fused:
        assert site.experts.startswith("kept: experts='auto' on a") and "experts='fused' forces" in site.experts
    forced, _ = run_pass_only(moe_block("mixtral", dtype=dtype), decode_hidden(8, dtype), LynxConfig(experts="fused"))
    assert forced.total("after", MOE_EXPERTS) == 1


@pytest.mark.parametrize("forced, fused", [("fused", True), ("keep", False)])
def test_lynx_experts_auto_forces_either_outcome_on_any_cpu(monkeypatch, forced, fused):
    """LYNX_EXPERTS_AUTO overrides the CPU's decision, so both outcomes are tested on any machine."""
    from lynx_compile.lowering.kernels import choice

    monkeypatch.setenv(choice.AUTO_ENV, forced)
    backend, _ = run_pass_only(moe_block("mixtral", dtype=torch.bfloat16), decode_hidden(8, torch.bfloat16),
                               LynxConfig())
    [site] = backend.routing_sites
    assert site.rewritten and backend.total("after", MOE_EXPERTS) == int(fused)
    if not fused:
        assert "LYNX_EXPERTS_AUTO=keep" in site.experts
    assert f"auto={forced}" in choice.decision_key()


def test_a_bad_lynx_experts_auto_names_the_variable(monkeypatch):
    from lynx_compile.lowering.kernels import choice

    monkeypatch.setenv(choice.AUTO_ENV, "fast")
    with pytest.raises(ValueError, match="LYNX_EXPERTS_AUTO='fast'; expected one of fused, keep"):
        choice.forced_auto()
