"""Plans reach every site, however the model was compiled, or lynx says why not (`passes/plan_reach.py`).

Sites are named by their full module path, also when Dynamo compiled a block or a layer on its
own; an entry naming no module warns at compile time; one graph serving several layers refuses
a plan that gives them different settings; an edited plan file takes effect on the next call.
"""

import json
import warnings

import pytest
import torch

import lynx_compile
from lynx_compile import LynxOptionsError
from moe_models import decode_step, tiny_model


def decode_experts(model, batch=8) -> dict[str, tuple[float, float]]:
    """Per site: distinct experts of the plain top-k and after selection, one decode step."""
    with torch.no_grad(), lynx_compile.record(model) as recorder:
        model(**decode_step(model, batch))
    return {site: (s["experts_before"], s["experts_after"]) for site, s in recorder.summary().items()}


def plan_of(settings: dict[str, str]) -> dict:
    return {"sites": {site: {"policy": policy} for site, policy in settings.items()}}


def test_regional_compilation_matches_the_plan_by_full_name():
    """One layer compiled on its own: the frame's owner is found in its model, so the plan's full
    name applies (the default policy used to run there: 7 -> 2 experts)."""
    model = tiny_model("mixtral", num_layers=2)
    plan = plan_of({"model.layers.0.mlp.gate": "none"})
    with pytest.warns(UserWarning, match="the other 1 MixtralDecoderLayer modules would run it too"):
        model.model.layers[0].compile(backend="lynx", options={"plan": plan})
        experts = decode_experts(model)
    before, after = experts["model.layers.0.mlp.gate"]
    assert after == before  # policy none, as the plan says


def test_one_graph_for_several_layers_refuses_a_plan_that_sets_them_apart():
    """transformers' eager experts loop graph-breaks inside each MoE block, so Dynamo compiles the
    block on its own and reuses that graph for every layer: per-layer settings cannot apply."""
    model = tiny_model("mixtral", num_layers=2, experts_impl="eager")
    plan = plan_of({"model.layers.0.mlp.gate": "none", "model.layers.1.mlp.gate": "affinity_binning"})
    model.compile(backend="lynx", options={"plan": plan})
    with pytest.raises(LynxOptionsError, match=r"one compiled graph serves the 2 MixtralSparseMoeBlock modules") \
            as error:
        decode_experts(model)
    assert "model.layers.0.mlp.gate: none; model.layers.1.mlp.gate: affinity_binning." in str(error.value)


def test_one_graph_for_several_layers_runs_a_plan_that_sets_them_alike():
    model = tiny_model("mixtral", num_layers=2, experts_impl="eager")
    plan = plan_of({f"model.layers.{i}.mlp.gate": "none" for i in range(2)})
    report = lynx_compile.explain(model, **decode_step(model, 8), config=lynx_compile.LynxConfig(plan=plan))
    [site] = report.routing_sites
    assert site.module_path == "model.layers.0.mlp.gate" and not site.rewritten
    assert site.policy == "none [plan <dict>]"


def test_a_plan_entry_naming_no_module_warns_at_compile_time():
    model = tiny_model("mixtral", num_layers=1)
    plan = plan_of({"model.layers.0.mlp.gate": "none", "model.layers.7.mlp.gate": "none"})
    model.compile(backend="lynx", options={"plan": plan})
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        model(**decode_step(model, 8))
    messages = [str(w.message) for w in caught if "lynx: plan" in str(w.message)]
    assert messages and "1 entry names no module of the compiled model: model.layers.7.mlp.gate" in messages[0]


def test_an_edited_plan_file_takes_effect_on_the_next_call(tmp_path):
    """Dynamo reuses a graph compiled for options that compare equal ({"plan": path}); the
    compiled graph compares the file's state on each call and recompiles when its content changed."""
    model = tiny_model("mixtral", num_layers=1)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan_of({"model.layers.0.mlp.gate": "none"})))
    model.compile(backend="lynx", options={"plan": str(path)})
    [(before, after)] = decode_experts(model).values()
    assert after == before
    path.write_text(json.dumps(plan_of({"model.layers.0.mlp.gate": "affinity_binning"})))
    [(before, after)] = decode_experts(model).values()
    assert after < before
    path.write_text("{not json")
    with pytest.raises(LynxOptionsError, match="is not valid JSON"):
        decode_experts(model)


def test_a_router_compiled_on_its_own_is_routing_and_warns_that_its_phase_is_unknown():
    """`mlp.gate.compile(...)`: the graph ends at the top-k and starts at the (T, H) tokens. The
    experts sit beside the router in its parent (outside the frame): that is the evidence. No
    (batch, seq, hidden) flatten is in the graph, so decode cannot be told from prefill: left as
    written, with a compile-time warning naming the option that fixes it (given where the pass
    runs: a graph served from Inductor's cache was warned about when it was compiled)."""
    model = tiny_model("mixtral", num_layers=1)
    model.model.layers[0].mlp.gate.compile(backend="lynx")
    with pytest.warns(UserWarning, match=r"routing site 'model.layers.0.mlp.gate' is left as written: .*"
                                         r"max_decode_tokens"), torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False), torch.no_grad(), \
            lynx_compile.record(model) as recorder:
        model(**decode_step(model, 32))
    call = recorder.calls["model.layers.0.mlp.gate"][-1]  # the decode step (the prompt ran through it first)
    assert not call.decode and call.experts_after == call.experts_before  # not known as decode: plain top-k


def test_a_router_compiled_on_its_own_selects_under_max_decode_tokens():
    """Batches of at most max_decode_tokens tokens are selected: the decode step (8 tokens), not the
    prompt that ran through the same compiled router first (16 tokens)."""
    model = tiny_model("mixtral", num_layers=1)
    model.model.layers[0].mlp.gate.compile(backend="lynx", options={"max_decode_tokens": 8})
    with torch.no_grad(), lynx_compile.record(model) as recorder:
        model(**decode_step(model, 8))
    prompt, step = recorder.calls["model.layers.0.mlp.gate"]
    assert (prompt.num_tokens, prompt.decode, step.num_tokens, step.decode) == (16, False, 8, True)
    assert prompt.experts_after == prompt.experts_before and step.experts_after < step.experts_before
