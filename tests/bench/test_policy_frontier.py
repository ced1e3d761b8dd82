"""bench/policy_frontier.py's bookkeeping: settings per site (plans included), the Pareto front and
the table. (Its measurement compiles a shipped checkpoint, minutes on two cores: `make frontier`.)"""

import json

import pytest

from lynx_compile import LynxOptionsError

@pytest.fixture(scope="module")
def frontier(load_bench):
    return load_bench("policy_frontier")


SITES = {"model.layers.0.mlp.gate": (8, 2), "model.layers.1.mlp.gate": (8, 2)}


def test_a_setting_applies_at_every_site_and_a_plan_only_where_it_names_one(frontier, tmp_path):
    settings = frontier.site_settings("moved_mass:max_moved=0.04", SITES)
    assert {s.describe() for s in settings.values()} == {"moved_mass(max_moved=0.04, ranks=1) [frontier]"}
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"sites": {"model.layers.1.mlp.gate": {"policy": "opportunistic",
                                                                      "params": {"keep_top": 1}}}}))
    settings = frontier.site_settings(f"plan:{plan}", SITES)
    assert settings["model.layers.0.mlp.gate"].policy == "none"
    assert settings["model.layers.1.mlp.gate"].params_dict() == {"keep_top": 1}
    with pytest.raises(LynxOptionsError, match="max_moved"):
        frontier.site_settings("moved_mass:max_moved=2", SITES)


def row(batch, setting, experts, agreement):
    return {"batch": batch, "setting": setting, "experts_before": 8.0, "experts_after": experts, "cut": 1 - experts / 8,
            "top1_agreement": agreement, "kl": 0.01, "kl_p99": 0.1, "arith_points": -0.4, "wrong_to_right": 3,
            "right_to_wrong": 5}


def test_the_front_holds_the_settings_nothing_beats(frontier):
    rows = [row(16, "none", 8.0, 1.0), row(16, "a", 5.0, 0.94), row(16, "b", 5.5, 0.93), row(32, "b", 6.0, 0.9)]
    assert [frontier.on_front(r, rows) for r in rows] == [True, True, False, True]  # b at 16: a reads fewer, agrees more
    table = frontier.markdown({"checkpoint": "coarse", "code_tokens": 1024, "arith_problems": 500, "rows": rows})
    assert "| 16 | a | 5.00 of 8.00 | 37.5% | 94.0% | 0.0100 | 0.100 | -0.4 (+3/-5) | yes |" in table
    assert "| 16 | b | 5.50 of 8.00 | 31.2% | 93.0% | 0.0100 | 0.100 | -0.4 (+3/-5) |  |" in table
