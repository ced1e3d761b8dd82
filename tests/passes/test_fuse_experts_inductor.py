"""experts="inductor": the dispatch becomes grouped GEMMs Inductor compiles; op counts, numerics."""

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from lynx_compile.backend import compile_with_lynx
from lynx_compile.config import LynxConfig, LynxOptionsError
from moe_models import ARCHS, GptFastMoE, PassOnlyBackend, decode_hidden, moe_block, skewed_mixtral_block
from test_fuse_experts import assert_close_relative, run_pass_only, top_level_arguments

MOE_EXPERTS = "lynx.moe_experts.default"
GROUPED_MM = "aten._grouped_mm.default"
SEARCHSORTED = "aten.searchsorted.Tensor"
INDUCTOR = LynxConfig(policy="none", experts="inductor")


def unwrap(output):
    """The (B, S, H) hidden states of a block that may also return router scores (GPT-OSS)."""
    return output[0] if isinstance(output, tuple) else output


def test_option_is_validated():
    with pytest.raises(LynxOptionsError, match="'inductor'"):
        LynxConfig(experts="triton")


@pytest.mark.parametrize("arch, experts_impl", [*((arch, "grouped_mm") for arch in ARCHS),
                                                ("mixtral", "batched_mm")])
def test_every_architecture_becomes_two_grouped_gemms_and_matches_eager(arch, experts_impl):
    block = moe_block(arch, experts_impl=experts_impl, dtype=torch.bfloat16)
    hidden = decode_hidden(8, torch.bfloat16)
    with torch.no_grad():
        expected = unwrap(block(hidden))
    backend, got = run_pass_only(block, hidden, INDUCTOR)
    [site] = backend.routing_sites
    assert site.experts.startswith("fused:") and "2 aten._grouped_mm for Inductor" in site.experts, site.experts
    # transformers' own dispatch (grouped_mm: histc offsets + two _grouped_mm; batched_mm: two
    # bmm over gathered weights) is gone; ours has offsets from searchsorted and two _grouped_mm.
    before_matmuls = backend.total("before", GROUPED_MM) + backend.total("before", "aten.bmm.default")
    assert before_matmuls == 2 and backend.total("before", SEARCHSORTED) == 0
    assert backend.total("after", GROUPED_MM) == 2 and backend.total("after", SEARCHSORTED) == 1
    assert backend.total("after", MOE_EXPERTS) == 0
    for op in ("aten.histc.default", "aten.bmm.default", "aten.index_put.default"):
        assert backend.total("after", op) == 0, op
    assert_close_relative(got, expected, torch.bfloat16)


def test_gate_and_up_stored_apart_take_three_grouped_gemms():
    module = GptFastMoE().to(torch.bfloat16)
    hidden = torch.randn(4, 1, 32).to(torch.bfloat16)
    with torch.no_grad():
        expected = module(hidden)
    backend, got = run_pass_only(module, hidden, INDUCTOR)
    assert "3 aten._grouped_mm" in backend.routing_sites[0].experts
    assert backend.total("after", GROUPED_MM) == 3 and backend.total("after", "aten.bmm.default") == 0
    assert_close_relative(got, expected, torch.bfloat16)


@pytest.mark.parametrize("module, hidden, reason", [
    (moe_block("mixtral"), decode_hidden(4), "aten._grouped_mm takes bfloat16 only"),
    (GptFastMoE(dim=12).to(torch.bfloat16), torch.randn(4, 1, 12).to(torch.bfloat16), "hidden size 12"),
], ids=["float32", "unaligned_rows"])
def test_operands_aten_cannot_take_leave_the_dispatch_with_the_reason(module, hidden, reason):
    with torch.no_grad():
        expected = unwrap(module(hidden))
    backend, got = run_pass_only(module, hidden, INDUCTOR)
    [site] = backend.routing_sites
    assert site.experts.startswith("kept:") and reason in site.experts, site.experts
    assert backend.after == backend.before
    assert_close_relative(got, expected, hidden.dtype)


def test_dynamic_batch_size_one_graph_serves_every_batch():
    block = moe_block("qwen3_moe", dtype=torch.bfloat16)
    backend = PassOnlyBackend(INDUCTOR)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend=backend, dynamic=True)
    with torch.no_grad():
        for batch in (8, 5, 3):
            hidden = decode_hidden(batch, torch.bfloat16, seed=batch)
            assert_close_relative(unwrap(compiled(hidden)), unwrap(block(hidden)), torch.bfloat16)
    [site] = backend.routing_sites  # symbolic T: no guard on the batch size, no recompile
    assert site.experts.startswith("fused:"), site.experts


def test_inductor_compiles_it_with_weight_views_and_matches_eager():
    block = moe_block("gpt_oss", dtype=torch.bfloat16)
    hidden = decode_hidden(8, torch.bfloat16)
    with torch.no_grad():
        expected = unwrap(block(hidden))
        got, [code] = run_and_get_code(
            torch.compile(block, backend="lynx", options={"policy": "none", "experts": "inductor"}), hidden)
    assert_close_relative(unwrap(got), expected, torch.bfloat16)
    assert "torch.ops.lynx.moe_experts" not in code
    calls = [line.split("extern_kernels._grouped_mm(", 1)[1] for line in code.splitlines()
             if "extern_kernels._grouped_mm(" in line]
    assert len(calls) == 2
    # The expert weights reach the GEMMs as the parameters themselves or views, never as copies.
    for call in calls:
        weight = top_level_arguments(call)[1]
        assert re.fullmatch(r"(reinterpret_tensor\()?arg\d+_\d+(, .*\))?", weight), weight
    # Biases, the clamped SwiGLU and the gathers around the GEMMs are generated C++ kernels.
    assert any("sigmoid" in line and "cpp_fused" in line for line in code.splitlines())


def test_with_selection_it_computes_what_the_fused_op_computes():
    """Same routing (AffinityBinning), two expert-compute lowerings under real Inductor: they agree."""
    block, hidden = skewed_mixtral_block()
    block, hidden = block.to(torch.bfloat16), hidden.to(torch.bfloat16)
    reports = []

    def lynx_inductor_experts(gm, example_inputs):
        return compile_with_lynx(gm, example_inputs, LynxConfig(experts="inductor"), on_report=reports.append)

    # The site report comes from the pass itself, which a warm FX graph / AOTAutograd cache skips.
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        via_op = unwrap(torch.compile(block, backend="lynx")(hidden))
        torch._dynamo.reset()
        via_inductor = unwrap(torch.compile(block, backend=lynx_inductor_experts)(hidden))
    [site] = [site for report in reports for site in report.sites if site.is_routing]
    assert site.rewritten and "aten._grouped_mm for Inductor" in site.experts, site.experts
    assert_close_relative(via_inductor, via_op, torch.bfloat16)


def test_the_layout_check_builds_its_examples_on_the_graphs_device():
    """A CUDA graph's dispatch holds device=cuda constants (empty, iota): checking it on CPU
    examples would fail and keep every dispatch on a GPU. Shown with the meta device (no GPU here)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lynx_compile.passes.expert_layout import _example

    generator = torch.Generator().manual_seed(0)
    with FakeTensorMode():
        values = [torch.empty(4, 64, device="meta", dtype=torch.bfloat16), torch.empty(4, 2, device="meta"),
                  torch.empty(4, 2, device="meta", dtype=torch.long), torch.empty(8, 192, 64, device="meta")]
    examples = [_example(value, generator, 4, 8, 2) for value in values]
    assert [(e.device.type, e.dtype, tuple(e.shape)) for e in examples] == [
        (v.device.type, v.dtype, tuple(v.shape)) for v in values]
