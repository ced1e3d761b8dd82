"""Tables and plots of an evaluation result (hand-made result; the harness test covers real ones)."""

from lynx_compile.eval import report


def row(variant, accuracy, step_ms, **extra):
    return {"task": "arith", "batch": 16, "variant": variant, "policy": variant.partition(":")[2] or None,
            "problems": 10, "correct": int(10 * accuracy), "accuracy": accuracy, "step_ms": step_ms, **extra}


RESULT = {"checkpoint": "coarse", "num_experts": 8, "rows": [
    row("inductor", 0.5, 10.0),
    row("lynx:none", 0.5, 10.5, changed_vs_inductor=0, accuracy_delta_points_vs_inductor=0.0,
        speedup_vs_inductor=0.952, experts_by_layer={"model.layers.0.mlp.gate": [7.5, 7.5]},
        experts_before=7.5, experts_after=7.5),
    row("lynx:affinity_binning", 0.4, 8.0, changed_vs_inductor=3, accuracy_delta_points_vs_inductor=-10.0,
        speedup_vs_inductor=1.25, experts_by_layer={"model.layers.0.mlp.gate": [7.5, 5.0]},
        experts_before=7.5, experts_after=5.0, remapped_fraction=0.2),
]}


def test_markdown_compares_lynx_with_inductor():
    header, rule, line = report.markdown(RESULT).splitlines()
    assert header.count("|") == rule.count("|") == line.count("|")
    # no top-1 agreement or KL on arith (generated, not teacher-forced); selection = 10.5 / 8.0 ms
    assert line == ("| arith | 16 | 50.0% | 40.0% | -10.0 | 3/10 |  |  | 20.0% | 7.5 -> 5.0 | 10.00 | 10.50 | "
                    "8.00 | 1.25x | 1.31x |")


def test_markdown_shows_fidelity_on_teacher_forced_tokens():
    rows = [dict(r, task="code-token") for r in RESULT["rows"]]
    rows[2].update(top1_agreement_vs_inductor=0.9, kl_mean_vs_inductor=0.0123, kl_p99_vs_inductor=0.456)
    _, _, line = report.markdown({**RESULT, "rows": rows}).splitlines()
    assert "| 3/10 | 90.0% | 0.0123 / 0.456 | 20.0% |" in line


def test_table_and_plot(tmp_path):
    table = report.table(RESULT).splitlines()
    [selected] = [line for line in table if "affinity_binning" in line]
    assert len(table) == 4 and "7.5 -> 5.0" in selected and "-10.0" in selected and "1.25x" in selected
    report.plot(RESULT, tmp_path / "eval.png")
    assert (tmp_path / "eval.png").stat().st_size > 0
