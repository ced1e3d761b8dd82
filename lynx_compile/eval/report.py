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
    """The README's table: per task and B, Inductor vs lynx:affinity_binning (and lynx:none's step time)."""
    rows = {(r["task"], r["batch"], r["variant"]): r for r in result["rows"]}
    lines = ["| task | B | accuracy Inductor | accuracy lynx | d points | outputs changed | "
             "experts/step plain -> lynx | step ms Inductor | lynx:none | lynx | speedup |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for task, batch in sorted({(t, b) for t, b, _ in rows}):
        base, none, lynx = (rows.get((task, batch, v)) for v in ("inductor", "lynx:none", "lynx:affinity_binning"))
        if not (base and lynx):
            continue
        experts = (f"{lynx['experts_before']:.1f} -> {lynx['experts_after']:.1f}" if "experts_before" in lynx else "")
        lines.append(
            f"| {task} | {batch} | {100 * base['accuracy']:.1f}% | {100 * lynx['accuracy']:.1f}% | "
            f"{lynx['accuracy_delta_points_vs_inductor']:+.1f} | {lynx['changed_vs_inductor']}/{lynx['problems']} | "
            f"{experts} | {base['step_ms']:.2f} | {none['step_ms'] if none else float('nan'):.2f} | "
            f"{lynx['step_ms']:.2f} | {lynx['speedup_vs_inductor']:.2f}x |")
    return "\n".join(lines)
