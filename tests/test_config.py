"""Options: validated, named in errors, accepted whole or as fields."""

import pytest
import torch

from lynx_compile import LynxConfig, LynxOptionsError, default_alpha_beta
from moe_models import moe_block


def test_defaults():
    config = LynxConfig.from_options(None)
    assert (config.policy, config.phase, config.experts) == ("moved_mass", "decode", "auto")
    assert config.site_setting("gate", 8, 2).selects


def test_fields_and_config_object_are_both_accepted_and_merge():
    assert LynxConfig.from_options({"policy": "none"}) == LynxConfig(policy="none")
    base = LynxConfig(policy="affinity_binning", alpha=2.0)
    assert LynxConfig.from_options({"config": base}) == base
    assert LynxConfig.from_options({"config": base, "beta": 3}) == LynxConfig(policy="affinity_binning", alpha=2.0,
                                                                              beta=3)


def test_unknown_key_names_it_and_lists_the_valid_ones():
    with pytest.raises(ValueError) as error:
        LynxConfig.from_options({"polcy": "none"})
    message = str(error.value)
    assert "'polcy'" in message
    for key in ("config", "policy", "alpha", "beta", "phase", "max_decode_tokens"):
        assert key in message


@pytest.mark.parametrize("key, value, expected", [
    ("policy", "greedy", "one of 'affinity_binning', 'gate_mass_budget', 'opportunistic', 'protected_mass', "
                         "'moved_mass', 'none'"),
    ("max_moved", 0.5j, "a number in [0, 1)"),
    ("alpha", -1.0, "a number > 0"),
    ("alpha", "wide", "a finite number or None"),
    ("beta", 0, "an integer >= 1 or None"),
    ("phase", "prefill", "one of 'decode', 'all'"),
    ("max_decode_tokens", 2.5, "an integer >= 1 or None"),
    ("experts", "fast", "one of 'auto', 'fused', 'inductor', 'keep'"),
    ("pad_token_id", -1, "an integer >= 0 or None"),
    ("pad_token_id", "<pad>", "an integer >= 0 or None"),
    ("config", {"policy": "none"}, "must be a lynx_compile.LynxConfig"),
    ("plan", 3, "expected a path to a plan JSON file, a plan dict, or None"),
])
def test_bad_values_name_the_key_and_what_is_expected(key, value, expected):
    options = {key: value, **({"policy": "affinity_binning"} if key in ("alpha", "beta") else {})}
    with pytest.raises(LynxOptionsError, match=key) as error:
        LynxConfig.from_options(options)
    assert expected in str(error.value)
    assert isinstance(error.value, ValueError)


def test_bad_option_surfaces_from_torch_compile_as_value_error():
    compiled = torch.compile(moe_block("mixtral"), backend="lynx", options={"alpah": 1.0})
    with pytest.raises(ValueError, match="unknown option 'alpah'"):
        compiled(torch.randn(2, 1, 64))


def test_default_alpha_beta_follow_sparsity():
    assert default_alpha_beta(8, 2) == (0.7, 1)  # Mixtral: coarse
    assert default_alpha_beta(128, 8) == (3.0, 2)  # Qwen3-30B-A3B: fine-grained
    assert LynxConfig(policy="affinity_binning", beta=4).site_setting("gate", 64, 8).params_dict() == {
        "alpha": 3.0, "beta": 4, "confidence_gap": pytest.approx(1 / 3)}


@pytest.mark.parametrize("options, expected", [
    ({"policy": "gate_mass_budget", "expert_budget": 0}, "an integer >= 1 (experts) or a fraction of E in (0, 1]"),
    ({"policy": "gate_mass_budget", "expert_budget": 1.5}, "an integer >= 1 (experts) or a fraction of E in (0, 1]"),
    ({"policy": "gate_mass_budget", "expert_budget": "half"}, "an integer >= 1 (experts) or a fraction of E"),
    ({"policy": "opportunistic", "keep_top": 0}, "an integer >= 1 or None"),
    ({"policy": "opportunistic", "keep_top": 1.0}, "an integer >= 1 or None"),
])
def test_policy_parameters_are_validated_like_every_option(options, expected):
    [key] = set(options) - {"policy"}
    with pytest.raises(LynxOptionsError, match=key) as error:
        LynxConfig.from_options(options)
    assert expected in str(error.value)


@pytest.mark.parametrize("options, parameter, owner", [
    ({"expert_budget": 4}, "expert_budget", "gate_mass_budget"),  # the default policy: moved_mass
    ({"alpha": 1.0}, "alpha", "affinity_binning"),
    ({"policy": "opportunistic", "alpha": 1.0}, "alpha", "affinity_binning"),
    ({"policy": "none", "keep_top": 1}, "keep_top", "opportunistic"),
    ({"policy": "gate_mass_budget", "beta": 2}, "beta", "affinity_binning"),
])
def test_a_parameter_of_another_policy_is_an_error_naming_both(options, parameter, owner):
    policy = options.get("policy", "moved_mass")
    with pytest.raises(LynxOptionsError) as error:
        LynxConfig.from_options(options)
    message = str(error.value)
    assert f"option {parameter!r} is a parameter of policy {owner!r}" in message
    assert f"not of policy {policy!r}" in message


def test_site_settings_resolve_defaults_from_the_sites_experts():
    assert LynxConfig().site_setting("gate", 8, 2).params_dict() == {"max_moved": 0.06, "ranks": 1}
    assert LynxConfig(policy="affinity_binning").site_setting("gate", 8, 2).params_dict() == {
        "alpha": 0.7, "beta": 1, "confidence_gap": pytest.approx(1 / 0.7)}
    budget = LynxConfig(policy="gate_mass_budget", expert_budget=0.3)
    assert budget.site_setting("gate", 10, 2).params_dict()["expert_budget"] == 3  # 0.3 * 10, not 4
    assert budget.site_setting("gate", 32, 4).params_dict()["expert_budget"] == 10  # ceil(9.6)
    assert LynxConfig(policy="gate_mass_budget", expert_budget=5).site_setting("g", 8, 2).params_dict() == {
        "expert_budget": 5, "confidence_gap": pytest.approx(1 / 0.7)}
    assert LynxConfig(policy="opportunistic").site_setting("g", 32, 4).params_dict() == {"keep_top": 2}
    assert LynxConfig(policy="none").site_setting("g", 8, 2).params == ()
    with pytest.raises(LynxOptionsError, match=r"'keep_top' got 3 at routing site 'layer.gate'.*\[1, k=2\]"):
        LynxConfig(policy="opportunistic", keep_top=3).site_setting("layer.gate", 8, 2)
