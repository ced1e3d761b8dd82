"""Decode-step latency of an MoE block and a whole small MoE model: eager vs Inductor vs lynx.

    python bench/bench_moe.py                 # full table (B in 1, 8, 16, 32, 64), ~10 min on 2 cores
    python bench/bench_moe.py --quick         # B in 1, 16 and fewer repeats

Every variant runs in the same process, one batch size after another, and ratios are taken
between variants measured in this run. Random weights: the routers get a trained-like spread
(router logit std ~1.5, top-1 probability ~0.4 for 8 experts) instead of transformers' near-zero
init, under which every expert ties and selection would be trivially maximal. Writes
bench/results/bench_moe.json and bench/results/bench_moe.png.
"""

from __future__ import annotations

import pathlib
import statistics
import sys

import torch

import lynx_compile
from common import mixtral_block, pyplot, save_results, start, time_call

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))
from small_model import small_mixtral  # noqa: E402  (the demo's model)

def run_case(name, module, make_input, batches, repeats):
    variants = {
        "eager": module,
        "inductor": torch.compile(module),
        "lynx": torch.compile(module, backend="lynx"),
    }
    rows = []
    with torch.no_grad():
        for batch in batches:
            inputs = make_input(batch)
            row = {"case": name, "batch": batch}
            for variant, fn in variants.items():
                row[f"{variant}_ms"] = time_call(fn, inputs, repeats=repeats)
            with lynx_compile.record() as rec:
                variants["lynx"](inputs)
            summary = rec.summary().values()
            row["experts_before"] = statistics.mean(s["experts_before"] for s in summary)
            row["experts_after"] = statistics.mean(s["experts_after"] for s in summary)
            row["lynx_vs_inductor"] = row["inductor_ms"] / row["lynx_ms"]
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


HEADER = f"{'case':<14}{'B':>4}{'eager ms':>10}{'inductor ms':>13}{'lynx ms':>9}{'lynx speedup':>14}{'experts/step':>15}"


def format_row(row):
    return (f"{row['case']:<14}{row['batch']:>4}{row['eager_ms']:>10.2f}{row['inductor_ms']:>13.2f}"
            f"{row['lynx_ms']:>9.2f}{row['lynx_vs_inductor']:>13.2f}x"
            f"{row['experts_before']:>8.1f} -> {row['experts_after']:<4.1f}")


def plot(rows, path):
    plt = pyplot()
    cases = sorted({r["case"] for r in rows})
    fig, axes = plt.subplots(1, len(cases), figsize=(6 * len(cases), 4), squeeze=False)
    for axis, case in zip(axes[0], cases):
        case_rows = [r for r in rows if r["case"] == case]
        for variant in ("eager", "inductor", "lynx"):
            axis.plot([r["batch"] for r in case_rows], [r[f"{variant}_ms"] for r in case_rows], marker="o", label=variant)
        axis.set(title=case, xlabel="decode batch size B", ylabel="ms per decode step", xscale="log", yscale="log")
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    args, info = start(__doc__)
    batches = (1, 16) if args.quick else (1, 8, 16, 32, 64)
    repeats = 5 if args.quick else 15
    torch.manual_seed(0)
    print(HEADER)
    rows = run_case("mixtral-block", mixtral_block(), lambda b: torch.randn(b, 1, 1024, dtype=torch.bfloat16),
                    batches, repeats)
    model = small_mixtral()
    rows += run_case("small-model", model, lambda b: torch.randint(3, model.config.vocab_size, (b, 1)),
                     batches, repeats)
    save_results("bench_moe", info, rows, plot)


if __name__ == "__main__":
    main()
