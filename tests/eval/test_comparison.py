"""`lynx-compile eval` comparing a plan with Inductor and the uncompiled model on a tiny slice of
the coarse checkpoint: fidelity to Inductor (KL, top-1 agreement), the Pareto plot and the docs'
table. Policy none is not run here (one compile less, ~1.5 min cold): that its logits are
Inductor's bit for bit is tests/test_backend.py's check, and that identical distributions score
KL 0 and agreement 1 is checked below on the function the eval uses; the arith run in
test_harness.py (`make test-all`) runs it end to end."""

import json

import pytest
import torch

from lynx_compile.eval import harness, report
from lynx_compile.eval.__main__ import main as eval_main

BATCH = 4
PROBLEMS = 4 * 16  # code-token: 4 windows of 16 decode steps, one decode batch of B=4

PLAN = {"sites": {"model.layers.0.mlp.gate": {"policy": "gate_mass_budget", "params": {"expert_budget": 2}},
                  "model.layers.1.mlp.gate": {"policy": "opportunistic", "params": {"keep_top": 1}},
                  "model.layers.2.mlp.gate": {"policy": "affinity_binning", "params": {"alpha": 0.35}}}}


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("comparison")
    plan = out / "plan.json"
    plan.write_text(json.dumps(PLAN))
    [result] = eval_main(["--checkpoint", "coarse", "--task", "code-token", "--batch-sizes", str(BATCH),
                          "--problems", str(PROBLEMS), "--policies", f"plan:{plan}", "--eager", "--record-batches", "1",
                          "--no-progress", "--out", str(out)])
    return result, out, plan


def rows_by_variant(result):
    return {row["variant"]: row for row in result["rows"]}


def test_identical_distributions_score_kl_zero_and_full_agreement():
    log_probs = torch.randn(64, 97, generator=torch.Generator().manual_seed(0)).log_softmax(-1)
    row = {}
    harness.add_fidelity(row, log_probs, log_probs.clone())
    assert row == {"kl_mean_vs_inductor": 0.0, "kl_p99_vs_inductor": 0.0, "top1_agreement_vs_inductor": 1.0}
    moved = log_probs.clone()
    moved[0] = moved[0].flip(-1)  # one token's distribution reversed: its top-1 changes
    harness.add_fidelity(row, log_probs, moved)
    assert row["kl_mean_vs_inductor"] > 0 and row["top1_agreement_vs_inductor"] == pytest.approx(63 / 64, abs=1e-6)


def test_the_uncompiled_model_is_a_baseline_and_neither_baseline_is_recorded(compared):
    result, out, plan = compared
    assert json.loads((out / "eval_coarse.json").read_text())["rows"] == result["rows"]
    assert (out / "eval_coarse.png").stat().st_size > 0
    rows = rows_by_variant(result)
    assert rows["eager"]["problems"] == rows["inductor"]["problems"] == rows[f"lynx:plan:{plan}"]["problems"] \
        == PROBLEMS
    assert "changed_vs_eager" in rows[f"lynx:plan:{plan}"]
    assert all("experts_by_layer" not in rows[name] for name in ("eager", "inductor"))
    # the run's wall time (compiling included), per variant and in all
    wall = result["wall_seconds"]
    assert set(wall["by_variant"]) == set(rows)
    assert 0 < sum(wall["by_variant"].values()) <= wall["total"] + 0.5


def test_the_plan_is_measured_like_any_variant(compared):
    result, _, plan = compared
    row = rows_by_variant(result)[f"lynx:plan:{plan}"]
    assert row["policy"] == "plan"
    assert row["kl_mean_vs_inductor"] >= 0.0 and row["kl_p99_vs_inductor"] >= 0.0
    assert 0.0 <= row["top1_agreement_vs_inductor"] <= 1.0
    # agreement and 'changed' count the same thing: predictions that differ from Inductor's
    assert row["top1_agreement_vs_inductor"] == pytest.approx(1 - row["changed_vs_inductor"] / row["problems"])
    layers = row["experts_by_layer"]
    assert layers["model.layers.3.mlp.gate"][0] == layers["model.layers.3.mlp.gate"][1]  # not in the plan: none
    assert any(after < before for before, after in layers.values())
    remapped = row["remapped_by_layer"]
    assert remapped["model.layers.3.mlp.gate"] == 0.0  # policy none moves no token
    assert all(0.0 < remapped[f"model.layers.{i}.mlp.gate"] < 1.0 for i in range(3))
    assert row["remapped_fraction"] == pytest.approx(sum(remapped.values()) / 4, abs=1e-4)


def test_the_pareto_plot_and_table(compared):
    result, out, plan = compared
    assert (out / "eval_coarse_pareto.png").stat().st_size > 0
    [points] = report.comparison_points(result).values()
    assert [p["variant"] for p in points] == ["inductor", f"lynx:plan:{plan}"]
    inductor, planned = points
    row = rows_by_variant(result)[f"lynx:plan:{plan}"]
    assert inductor["front"] and inductor["experts"] == row["experts_before"]  # the batch's plain top-k
    assert planned["experts"] == row["experts_after"] < inductor["experts"]
    table = report.comparison_markdown(result)
    assert table.count(f"| {BATCH} |") == 2 and f"| lynx:plan:{plan} |" in table
    assert inductor["remapped"] == 0.0 and planned["remapped"] == row["remapped_fraction"] > 0


def test_variant_specs_are_parsed_and_validated():
    variant = harness.parse_variant("gate_mass_budget:expert_budget=4")
    assert variant.options == {"policy": "gate_mass_budget", "expert_budget": 4}
    assert harness.parse_variant("gate_mass_budget:expert_budget=0.5").options["expert_budget"] == 0.5
    assert harness.parse_variant("opportunistic:keep_top=1").name == "lynx:opportunistic:keep_top=1"
    for bad, message in (("greedy", "option 'policy' got 'greedy'"), ("plan:", "expected plan:<path"),
                         ("opportunistic:alpha=1", "is a parameter of policy 'affinity_binning'"),
                         ("plan:/no/such/plan.json", "cannot read plan file")):
        with pytest.raises(ValueError, match=message):
            harness.parse_variant(bad)
    with pytest.raises(SystemExit):
        eval_main(["--policies", "opportunistic:keep_top=zero"])
