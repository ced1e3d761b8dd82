"""The `lynx` backend with real Inductor: registration, composition, caching, every model."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass

import lynx_compile
from lynx_compile import LynxConfig
from lynx_compile.passes.pass_manager import LynxPostGradPass
from moe_models import ARCHS, decode_step, moe_block, tiny_model


def test_backend_name_works_in_a_fresh_interpreter_without_importing_the_package():
    script = textwrap.dedent("""
        import sys, torch
        assert "lynx" in torch._dynamo.list_backends()
        assert "lynx_compile" not in sys.modules
        f = torch.compile(lambda x: torch.topk(x, 2).values.sum(), backend="lynx")
        print(float(f(torch.arange(8.0).view(2, 4))))
        assert "lynx_compile" in sys.modules  # loaded by Dynamo through the entry point
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "18.0"


class CountingPass(CustomGraphPass):
    """Stands in for a pass a user or another framework configured."""

    def __init__(self):
        self.calls = 0

    def __call__(self, graph):
        self.calls += 1

    def uuid(self):
        return "counting-pass"


SLOW = pytest.mark.slow  # `make test-all` only


@pytest.mark.parametrize("as_list", [False, pytest.param(True, marks=SLOW)], ids=["single", "list"])
def test_user_post_grad_passes_are_kept_and_lynx_appended(as_list):
    user_pass = CountingPass()
    existing = [user_pass] if as_list else user_pass
    block = moe_block("mixtral")
    with torch._inductor.config.patch(post_grad_custom_pre_pass=existing, force_disable_caches=True), \
            torch.no_grad():
        torch.compile(block, backend="lynx")(torch.randn(4, 1, 64))
        assert torch._inductor.config.post_grad_custom_pre_pass is existing  # not overwritten
    assert user_pass.calls == 1


def test_pass_uuid_is_stable_and_tracks_the_config():
    assert LynxPostGradPass(LynxConfig()).uuid() == LynxPostGradPass(LynxConfig()).uuid()
    assert LynxPostGradPass(LynxConfig()).uuid() != LynxPostGradPass(LynxConfig(max_moved=0.1)).uuid()
    assert LynxPostGradPass(LynxConfig()).uuid() != LynxPostGradPass(LynxConfig(), record=True).uuid()


def test_fx_graph_cache_stays_on():
    block = moe_block("qwen3_moe")
    with torch.no_grad():
        torch.compile(block, backend="lynx")(torch.randn(4, 1, 64))
        torch._dynamo.reset()
        counters.clear()
        torch.compile(block, backend="lynx")(torch.randn(4, 1, 64))
    assert counters["inductor"]["fxgraph_cache_hit"] == 1
    assert counters["inductor"]["fxgraph_cache_bypass"] == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_policy_none_is_bit_identical_to_default_inductor(arch):
    block = moe_block(arch)
    hidden = torch.randn(8, 1, 64)
    with torch.no_grad():
        reference = torch.compile(block)(hidden)
        torch._dynamo.reset()
        none = torch.compile(block, backend="lynx", options={"policy": "none"})(hidden)
    for expected, actual in zip(torch.utils._pytree.tree_leaves(reference), torch.utils._pytree.tree_leaves(none)):
        assert torch.equal(actual, expected)


def test_policy_none_is_bit_identical_on_a_whole_bf16_model():
    model = tiny_model("mixtral", num_layers=2, dtype=torch.bfloat16)
    with torch.no_grad():
        reference = torch.compile(model)(**decode_step(model, 8)).logits
        torch._dynamo.reset()
        none = torch.compile(model, backend="lynx", options={"policy": "none"})(**decode_step(model, 8)).logits
    assert torch.equal(none, reference)


@pytest.mark.parametrize("arch, experts_impl", [
    pytest.param(arch, "grouped_mm", marks=() if arch in ("mixtral", "deepseek_v3") else SLOW) for arch in ARCHS]
    + [pytest.param("mixtral", "eager", marks=SLOW), ("qwen3_moe", "batched_mm")])
def test_decode_step_runs_with_no_extra_graph_breaks(arch, experts_impl):
    """Graph breaks are Dynamo's decision, made before any backend runs, so the eager backend's
    count is default torch.compile's. With the `eager` experts loop, selection can only lower the
    number of graphs (the loop visits fewer experts). `examples/check_architectures.py` runs the
    full architecture x experts-implementation x dtype matrix against default Inductor."""
    # the eager experts loop compiles a graph per expert it visits: 4 experts keep it short
    model = tiny_model(arch, experts_impl=experts_impl, **({"num_local_experts": 4} if experts_impl == "eager" else {}))
    stats = {}
    with torch.no_grad():
        for backend in ("eager", "lynx"):
            torch._dynamo.reset()
            counters.clear()
            logits = torch.compile(model, backend=backend)(**decode_step(model, 8)).logits
            stats[backend] = (counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()))
            assert torch.isfinite(logits).all()
    assert stats["lynx"][1] == stats["eager"][1]
    assert stats["lynx"][0] <= stats["eager"][0]


def test_transformers_compile_config_path_with_a_static_cache():
    """generate()'s own compile path: generation_config.compile_config naming backend="lynx".
    torch.compile takes mode or options, not both, so mode=None; transformers compiles only on
    GPUs unless told otherwise (_compile_all_devices)."""
    import lynx_compile
    from transformers import CompileConfig

    model = tiny_model("mixtral", num_layers=1, router_std=0.1)
    prompt = torch.randint(3, 90, (8, 4), generator=torch.Generator().manual_seed(0))
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False, pad_token_id=0,
                  cache_implementation="static")
    with torch.no_grad():
        expected = model.generate(prompt, **kwargs, disable_compile=True)
        for options in ({"policy": "none"}, {"pad_token_id": 0}):
            torch._dynamo.reset()
            compile_config = CompileConfig(backend="lynx", mode=None, options=options)
            compile_config._compile_all_devices = True
            model.generation_config.compile_config = compile_config
            with lynx_compile.record(model) as rec:
                out = model.generate(prompt, **kwargs)
            [calls] = rec.calls.values()  # recorded: the compiled forward ran lynx's pass
            decode = [c for c in calls if c.decode]
            assert decode
            if options.get("policy") == "none":
                assert torch.equal(out, expected)
                assert all(c.experts_after == c.experts_before for c in decode)
            else:
                assert any(c.experts_after < c.experts_before for c in decode)
    model.generation_config.compile_config = None


def test_a_one_token_step_keeps_its_top_k_and_fuses_its_experts(monkeypatch):
    """B=1 (Dynamo specializes it: T is statically 1): nothing to select, so the top-k stays as
    written and explain says why; the k experts are still computed by the fused op (faster than the
    model's dispatch on the CPUs measured), and with policy none the graph is default Inductor's."""
    from lynx_compile.lowering.kernels import choice

    monkeypatch.setenv(choice.AUTO_ENV, "fused")  # what auto decides on every CPU the table measured
    model = tiny_model("mixtral", num_layers=2)
    with torch.no_grad():
        expected = torch.compile(model)(**decode_step(model, 1)).logits
        torch._dynamo.reset()
        got = torch.compile(model, backend="lynx")(**decode_step(model, 1)).logits
        torch._dynamo.reset()
        untouched = torch.compile(model, backend="lynx", options={"policy": "none"})(**decode_step(model, 1)).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    assert torch.equal(untouched, expected)
    report = lynx_compile.explain(model, **decode_step(model, 1))
    assert [s.rewritten for s in report.routing_sites] == [False, False]
    assert all("one token per call (T=1)" in s.reason for s in report.routing_sites)
    assert all(s.experts.startswith("fused:") for s in report.routing_sites)
    [graph] = report.graphs
    assert graph.before.count("aten.topk.default") == graph.after.count("aten.topk.default") == 2
    assert graph.before.count("lynx.moe_experts") == 0 and graph.after.count("lynx.moe_experts") == 2
