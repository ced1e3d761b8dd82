"""Options: validated, named in errors, accepted whole or as fields."""

import pytest
import torch

from lynx_compile import LynxConfig, LynxOptionsError, default_alpha_beta
from moe_models import moe_block


def test_defaults():
    config = LynxConfig.from_options(None)
    assert (config.policy, config.phase, config.experts) == ("affinity_binning", "decode", "auto")
    assert config.selects


def test_fields_and_config_object_are_both_accepted_and_merge():
    assert LynxConfig.from_options({"policy": "none"}) == LynxConfig(policy="none")
    base = LynxConfig(alpha=2.0)
    assert LynxConfig.from_options({"config": base}) == base
    assert LynxConfig.from_options({"config": base, "beta": 3}) == LynxConfig(alpha=2.0, beta=3)


def test_unknown_key_names_it_and_lists_the_valid_ones():
    with pytest.raises(ValueError) as error:
        LynxConfig.from_options({"polcy": "none"})
    message = str(error.value)
    assert "'polcy'" in message
    for key in ("config", "policy", "alpha", "beta", "phase", "max_decode_tokens"):
        assert key in message


@pytest.mark.parametrize("key, value, expected", [
    ("policy", "greedy", "one of 'affinity_binning', 'none'"),
    ("alpha", -1.0, "a number > 0"),
    ("alpha", "wide", "a finite number or None"),
    ("beta", 0, "an integer >= 1 or None"),
    ("phase", "prefill", "one of 'decode', 'all'"),
    ("max_decode_tokens", 2.5, "an integer >= 1 or None"),
    ("experts", "fast", "one of 'auto', 'fused', 'inductor', 'keep'"),
    ("pad_token_id", -1, "an integer >= 0 or None"),
    ("pad_token_id", "<pad>", "an integer >= 0 or None"),
    ("config", {"policy": "none"}, "must be a lynx_compile.LynxConfig"),
])
def test_bad_values_name_the_key_and_what_is_expected(key, value, expected):
    with pytest.raises(LynxOptionsError, match=key) as error:
        LynxConfig.from_options({key: value})
    assert expected in str(error.value)
    assert isinstance(error.value, ValueError)


def test_bad_option_surfaces_from_torch_compile_as_value_error():
    compiled = torch.compile(moe_block("mixtral"), backend="lynx", options={"alpah": 1.0})
    with pytest.raises(ValueError, match="unknown option 'alpah'"):
        compiled(torch.randn(2, 1, 64))


def test_default_alpha_beta_follow_sparsity():
    assert default_alpha_beta(8, 2) == (0.7, 1)  # Mixtral: coarse
    assert default_alpha_beta(128, 8) == (3.0, 2)  # Qwen3-30B-A3B: fine-grained
    config = LynxConfig(beta=4)
    assert config.resolved_alpha_beta(64, 8) == (3.0, 4)
    assert config.resolved_confidence_gap(3.0) == pytest.approx(1 / 3)
