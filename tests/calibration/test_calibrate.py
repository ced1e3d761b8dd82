"""calibrate() on a tiny real model (2 MoE layers): the plan keeps its budget on its own
calibration data, and loading it reproduces its choices."""

import json

import pytest
import torch

import lynx_compile
from lynx_compile import LynxConfig, LynxOptionsError
from lynx_compile.calibration.measure import decode_log_probs
from lynx_compile.eval.fidelity import fidelity
from moe_models import VOCAB, decode_step, tiny_model

BUDGET = {"top1_agreement": 0.95}
PREFIX = 4


def calibration_batches():
    """Two decode batches of 8 windows: 4 tokens of prefill, then 6 decode steps."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, VOCAB, (8, PREFIX + 6), generator=generator) for _ in range(2)]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    model = tiny_model("mixtral", num_layers=2)
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    plan = lynx_compile.calibrate(model, calibration_batches(), BUDGET, prefix=PREFIX, out=str(path))
    return model, plan, path


@pytest.fixture(scope="module")
def with_plan(calibrated):
    """The model compiled by lynx with the plan (experts fused, as calibration ran them)."""
    model, _, path = calibrated
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="lynx", options={"plan": str(path), "experts": "fused"})
    with lynx_compile.record(model) as recorder:
        log_probs = decode_log_probs(compiled, model.config, calibration_batches(), PREFIX)
    return log_probs, recorder


def test_the_plan_file_holds_the_choice_and_its_measurements(calibrated):
    model, plan, path = calibrated
    assert json.loads(path.read_text())["sites"] == plan["sites"]
    assert list(plan["sites"]) == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    candidates = plan["calibration"]["candidates"]
    # 1 reference + 12 candidates per site + 1..3 combined checks
    assert 1 + 2 * 12 + 1 <= plan["calibration"]["forward_passes"] <= 1 + 2 * 12 + 3
    assert all(len(c) == 12 for c in candidates.values())
    summed = sum(1 - entry["measured"]["top1_agreement"] for entry in plan["sites"].values())
    assert summed <= 1 - BUDGET["top1_agreement"] + 1e-9  # the per-site costs, summed, fit
    # it saves experts: some site selects, and the check measured fewer experts per step
    assert any(entry["policy"] != "none" for entry in plan["sites"].values())
    combined = plan["combined"]
    assert combined["within_budget"] and combined["top1_agreement"] >= BUDGET["top1_agreement"]
    assert combined["experts_after"] < combined["experts_before"]


def test_the_plan_keeps_its_budget_on_its_calibration_data(calibrated, with_plan):
    """Measured again, independently of calibration's run-time switch: the compiled plan against
    the same model compiled with every site at policy none."""
    model, plan, _ = calibrated
    log_probs, _ = with_plan
    torch._dynamo.reset()
    reference_model = torch.compile(model, backend="lynx", options={"policy": "none", "experts": "fused"})
    reference = decode_log_probs(reference_model, model.config, calibration_batches(), PREFIX)
    measured = fidelity(reference, log_probs)
    assert measured.top1_agreement >= BUDGET["top1_agreement"]
    assert measured.top1_agreement == pytest.approx(plan["combined"]["top1_agreement"], abs=1e-6)
    assert measured.kl == pytest.approx(plan["combined"]["kl"], abs=1e-5)


def test_loading_the_plan_reproduces_its_choices(calibrated, with_plan):
    model, plan, path = calibrated
    report = lynx_compile.explain(model, **decode_step(model, 8), config=LynxConfig(plan=str(path)))
    for site in report.routing_sites:
        entry = plan["sites"][site.module_path]
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry["params"].items())
        expected = f"{entry['policy']}({params})" if params else entry["policy"]
        assert site.policy == f"{expected} [plan {path}]"
        assert site.rewritten == (entry["policy"] != "none")
    # record() shows the experts the calibration's combined check measured, site by site
    _, recorder = with_plan
    summary = recorder.summary()
    for site, (before, after) in plan["combined"]["experts_by_site"].items():
        assert round(summary[site]["experts_before"], 4) == before
        assert round(summary[site]["experts_after"], 4) == after


def test_sites_missing_from_a_plan_take_the_config_policy(calibrated):
    model, plan, _ = calibrated
    partial = {"sites": {"model.layers.1.mlp.gate": {"policy": "opportunistic", "params": {"keep_top": 1}}}}
    report = lynx_compile.explain(model, **decode_step(model, 8), config=LynxConfig(policy="none", plan=partial))
    first, second = report.routing_sites
    assert first.policy == "none [config (site not in plan)]" and not first.rewritten
    assert second.policy == "opportunistic(keep_top=1) [plan <dict>]" and second.rewritten


@pytest.mark.parametrize("content, problem", [
    (None, "cannot read plan file"),
    ("{not json", "is not valid JSON"),
    ('{"sites": {}}', "expected a non-empty 'sites' object"),
    ('{"sites": {"gate": {"policy": "greedy"}}}', "site 'gate': option 'policy' got 'greedy'"),
    ('{"sites": {"gate": {"policy": "opportunistic", "params": {"alpha": 1.0}}}}',
     "site 'gate': option 'alpha' is a parameter of policy 'affinity_binning', not of policy 'opportunistic'"),
    ('{"sites": {"gate": {"policy": "gate_mass_budget", "params": {"expert_budget": -2}}}}',
     "site 'gate': option 'expert_budget' got -2"),
    ('{"format": "other", "sites": {"gate": {"policy": "none"}}}', "'format' is 'other'"),
])
def test_a_bad_plan_file_is_an_error_naming_the_file_and_the_problem(tmp_path, content, problem):
    path = tmp_path / "bad_plan.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(LynxOptionsError) as error:
        LynxConfig.from_options({"plan": str(path)})
    message = str(error.value)
    assert str(path) in message and problem in message and "option 'plan'" in message


def test_bad_calibration_input_is_refused():
    model = tiny_model("mixtral", num_layers=1)
    with pytest.raises(ValueError, match="budget"):
        lynx_compile.calibrate(model, calibration_batches(), {"kl": -1.0}, prefix=PREFIX)
    with pytest.raises(ValueError, match="needs more than prefix=10"):
        lynx_compile.calibrate(model, calibration_batches(), prefix=10)
    with pytest.raises(ValueError, match="no tokenizer found beside the model"):
        lynx_compile.calibrate(model)


def test_the_plan_names_the_model_without_a_local_path(calibrated):
    from types import SimpleNamespace

    from lynx_compile.calibration.procedure import _model_name

    _, plan, _ = calibrated
    assert set(plan["model"]) == {"name", "model_type"} and plan["model"]["model_type"] == "mixtral"
    assert _model_name(SimpleNamespace(name_or_path="/home/someone/checkpoints/coarse")) == "coarse"
    assert _model_name(SimpleNamespace(name_or_path="mistralai/Mixtral-8x7B-v0.1")) == "mistralai/Mixtral-8x7B-v0.1"
