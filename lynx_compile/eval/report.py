"""Tables and plots of an evaluation result (see :mod:`lynx_compile.eval.harness`)."""

from __future__ import annotations

from pathlib import Path


def table(result: dict) -> str:
    """One line per (task, variant, B): accuracy, changes vs Inductor, step time, experts per step."""
    header = ("task", "variant", "B", "accuracy", "d points", "changed", "step ms", "speedup", "experts/step")
    lines = [header]
    for row in sorted(result["rows"], key=lambda r: (r["task"], r["batch"], r["variant"])):
        experts = (f"{row['experts_before']:.1f} -> {row['experts_after']:.1f}"
                   if "experts_before" in row else "")
        lines.append((row["task"], row["variant"], str(row["batch"]), f"{100 * row['accuracy']:.1f}%",
                      _signed(row.get("accuracy_delta_points_vs_inductor")),
                      str(row.get("changed_vs_inductor", "")),
                      f"{row['step_ms']:.2f}" if row["step_ms"] else "",
                      f"{row['speedup_vs_inductor']:.2f}x" if "speedup_vs_inductor" in row else "", experts))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) if i >= 2 else cell.ljust(w) for i, (cell, w) in
                               enumerate(zip(line, widths))) for line in lines)


def _signed(value) -> str:
    return "" if value is None else f"{value:+.1f}"


def _percent(fraction) -> str:
    return "" if fraction is None else f"{100 * fraction:.1f}%"


def plot(result: dict, path: Path) -> None:
    """Accuracy and step time vs B per variant (one column per task); experts per layer at the largest B."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    task_names = sorted({r["task"] for r in rows})
    variant_names = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(3, len(task_names), figsize=(5 * len(task_names), 11), squeeze=False)
    for column, task in enumerate(task_names):
        for variant in variant_names:
            cells = sorted((r for r in rows if r["task"] == task and r["variant"] == variant), key=lambda r: r["batch"])
            batches = [r["batch"] for r in cells]
            axes[0][column].plot(batches, [100 * r["accuracy"] for r in cells], marker="o", label=variant)
            axes[1][column].plot(batches, [r["step_ms"] for r in cells], marker="o", label=variant)
        axes[0][column].set(title=f"{result['checkpoint']}: {task}", xlabel="batch size B", ylabel="accuracy (%)",
                            xscale="log")
        axes[1][column].set(xlabel="batch size B", ylabel="ms per decode step", xscale="log")
        _plot_experts(axes[2][column], [r for r in rows if r["task"] == task], result["num_experts"])
        for axis in axes[:2, column]:
            axis.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_experts(axis, rows: list[dict], num_experts: int) -> None:
    recorded = [r for r in rows if r.get("experts_by_layer") and r["policy"] != "none"]
    if not recorded:
        axis.set_axis_off()
        return
    row = max(recorded, key=lambda r: r["batch"])
    layers = list(row["experts_by_layer"])
    positions = range(len(layers))
    axis.bar([p - 0.2 for p in positions], [row["experts_by_layer"][l][0] for l in layers], width=0.4,
             label="plain top-k")
    axis.bar([p + 0.2 for p in positions], [row["experts_by_layer"][l][1] for l in layers], width=0.4,
             label=f"{row['variant']}")
    axis.set_xticks(list(positions), [l.removeprefix("model.").removesuffix(".gate").removesuffix(".mlp")
                                      for l in layers], rotation=30, fontsize="small")
    axis.set(ylabel=f"distinct experts per step (of {num_experts})", title=f"B={row['batch']}", ylim=(0, num_experts))
    axis.legend(fontsize="small")


def markdown(result: dict) -> str:
    """The evaluation page's table (docs/evaluation.md): per task and B, Inductor vs lynx:affinity_binning (and lynx:none's step time).

    Top-1 agreement and KL (from Inductor's next-token distribution, nats per token) exist for
    teacher-forced code-token only; "remapped" is the share of live (token, slot) expert choices
    that selection moved off the token's own top-k; "selection" is lynx:none's step time over
    lynx's (the part of the speedup that selection adds on top of the fused expert op)."""
    rows = {(r["task"], r["batch"], r["variant"]): r for r in result["rows"]}
    lines = ["| task | B | accuracy Inductor | accuracy lynx | d points | outputs changed | top-1 agreement | "
             "KL mean / p99 | remapped | experts/step plain -> lynx | step ms Inductor | lynx:none | lynx | speedup | "
             "selection |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for task, batch in sorted({(t, b) for t, b, _ in rows}):
        base, none, lynx = (rows.get((task, batch, v)) for v in ("inductor", "lynx:none", "lynx:affinity_binning"))
        if not (base and lynx):
            continue
        experts = (f"{lynx['experts_before']:.1f} -> {lynx['experts_after']:.1f}" if "experts_before" in lynx else "")
        agreement = _percent(lynx.get("top1_agreement_vs_inductor"))
        kl = (f"{lynx['kl_mean_vs_inductor']:.4f} / {lynx['kl_p99_vs_inductor']:.3f}"
              if "kl_mean_vs_inductor" in lynx else "")
        remapped = _percent(lynx.get("remapped_fraction"))
        selection = (f"{none['step_ms'] / lynx['step_ms']:.2f}x" if none and none["step_ms"] and lynx["step_ms"]
                     else "")
        lines.append(
            f"| {task} | {batch} | {100 * base['accuracy']:.1f}% | {100 * lynx['accuracy']:.1f}% | "
            f"{lynx['accuracy_delta_points_vs_inductor']:+.1f} | {lynx['changed_vs_inductor']}/{lynx['problems']} | "
            f"{agreement} | {kl} | {remapped} | "
            f"{experts} | {base['step_ms']:.2f} | {none['step_ms'] if none else float('nan'):.2f} | "
            f"{lynx['step_ms']:.2f} | {lynx['speedup_vs_inductor']:.2f}x | {selection} |")
    return "\n".join(lines)


# --- the comparison of policies and plans (code-token: fidelity to Inductor vs experts per step) ---

FIDELITY_TASK = "code-token"


def has_fidelity(result: dict) -> bool:
    return any("top1_agreement_vs_inductor" in r for r in result["rows"])


def comparison_points(result: dict) -> dict[int, list[dict]]:
    """Per B: one point per variant with code-token fidelity, plus Inductor itself (experts of
    the batch's plain top-k, agreement 1, KL 0). Each point: variant, experts, top1_agreement,
    kl_mean, kl_p99, accuracy, d_points, front (not dominated on fewer experts / more agreement)."""
    out: dict[int, list[dict]] = {}
    rows = [r for r in result["rows"] if r["task"] == FIDELITY_TASK]
    for batch in sorted({r["batch"] for r in rows}):
        cells = [r for r in rows if r["batch"] == batch]
        base = next((r for r in cells if r["variant"] == "inductor"), None)
        measured = [r for r in cells if "top1_agreement_vs_inductor" in r and "experts_after" in r]
        if base is None or not measured:
            continue
        none = next((r for r in measured if r["policy"] == "none"), None)
        plain = none["experts_after"] if none else sum(r["experts_before"] for r in measured) / len(measured)
        points = [{"variant": "inductor", "experts": plain, "experts_plain": plain, "top1_agreement": 1.0,
                   "kl_mean": 0.0, "kl_p99": 0.0, "remapped": 0.0, "accuracy": base["accuracy"], "d_points": 0.0}]
        for r in measured:
            points.append({"variant": r["variant"], "experts": r["experts_after"], "experts_plain": r["experts_before"],
                           "top1_agreement": r["top1_agreement_vs_inductor"], "kl_mean": r["kl_mean_vs_inductor"],
                           "kl_p99": r["kl_p99_vs_inductor"], "remapped": r.get("remapped_fraction"),
                           "accuracy": r["accuracy"],
                           "d_points": r.get("accuracy_delta_points_vs_inductor", 0.0)})
        for p in points:
            p["front"] = not any(q is not p and q["experts"] <= p["experts"] and q["top1_agreement"] >= p["top1_agreement"]
                                 and (q["experts"] < p["experts"] or q["top1_agreement"] > p["top1_agreement"])
                                 for q in points)
        out[batch] = points
    return out


def comparison_markdown(result: dict) -> str:
    """The comparison table (docs/evaluation.md): per B and variant, experts per step against fidelity to
    Inductor (teacher-forced code-token) and accuracy; "front": no other point reads fewer
    experts at equal or better top-1 agreement."""
    lines = [f"**{result['checkpoint']}**, task {FIDELITY_TASK}, fidelity to default Inductor at the same B:", "",
             "| B | variant | experts/step | top-1 agreement | KL mean (nats) | KL p99 | remapped | accuracy | "
             "d points | front |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for batch, points in comparison_points(result).items():
        for p in sorted(points, key=lambda p: p["experts"]):
            lines.append(f"| {batch} | {p['variant']} | {p['experts']:.2f} of {p['experts_plain']:.2f} | "
                         f"{100 * p['top1_agreement']:.1f}% | {p['kl_mean']:.4f} | {p['kl_p99']:.3f} | "
                         f"{_percent(p['remapped'])} | "
                         f"{100 * p['accuracy']:.1f}% | {p['d_points']:+.1f} | {'yes' if p['front'] else ''} |")
    return "\n".join(lines)


def pareto_plot(result: dict, path: Path) -> None:
    """Per B (rows): top-1 agreement, mean KL and accuracy (columns) against experts per step,
    one point per variant; Pareto-optimal points (fewer experts, higher agreement) ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_batch = comparison_points(result)
    if not by_batch:
        return
    columns = (("top1_agreement", "top-1 agreement with Inductor", 100), ("kl_mean", "mean KL (nats/token)", 1),
               ("accuracy", f"{FIDELITY_TASK} accuracy (%)", 100),
               ("remapped", "expert choices remapped (%)", 100))
    fig, axes = plt.subplots(len(by_batch), len(columns), figsize=(21, 4.5 * len(by_batch)), squeeze=False)
    for row, (batch, points) in enumerate(by_batch.items()):
        for column, (key, label, scale) in enumerate(columns):
            axis = axes[row][column]
            for p in points:
                if p[key] is None:  # e.g. no remapped share from an older result
                    continue
                axis.scatter(p["experts"], scale * p[key], s=60 if p["front"] else 30,
                             edgecolors="black" if p["front"] else "none")
                axis.annotate(p["variant"].removeprefix("lynx:"), (p["experts"], scale * p[key]), fontsize="x-small",
                              xytext=(3, 3), textcoords="offset points")
            axis.set(xlabel=f"distinct experts per decode step (of {result['num_experts']})", ylabel=label,
                     title=f"{result['checkpoint']}, B={batch}")
            axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
