"""Learning curves of the shipped checkpoints, over every run and leg that trained them.

    python bench/plot_training.py

Reads each checkpoint's runs in training order: the first run's report (kept in
bench/results/training/<name>_first_run_report.json once a later run replaced the shipped one),
then the shipped ``lynx_compile/checkpoints/<name>/training_report.json``, whose legs continued
from those weights (``--init-from``, then ``--resume``). Draws, against optimizer steps (every
run used 20 sequences of 256 tokens per step, 5120 tokens):

- training cross entropy (nats, code and arithmetic tokens mixed, mean over 25 steps; a dotted
  line where a later run starts, with its own data mix: arithmetic tokens have a lower loss);
- held-out arithmetic exact match (greedy, 500 problems) at the end of each run or leg;
- held-out code-token accuracy (greedy next token, teacher-forced) where the report has it.

Writes bench/results/training/learning_curves.png and prints one row per leg.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "training"
CHECKPOINTS = ROOT / "lynx_compile" / "checkpoints"
NAMES = ("coarse", "fine")


def runs_of(name: str) -> list[dict]:
    """The reports that trained checkpoint ``name``, earliest first."""
    first = RESULTS / f"{name}_first_run_report.json"
    shipped = json.loads((CHECKPOINTS / name / "training_report.json").read_text())
    return ([json.loads(first.read_text())] if first.is_file() else []) + [shipped]


def points(runs: list[dict]) -> tuple[list, list, list]:
    """(training-CE curve, end-of-leg results, steps where a later run starts), all at steps counted
    from the first run's start."""
    curve, ends, run_starts, offset = [], [], [], 0
    for run in runs:
        if offset:
            run_starts.append(offset)
        curve += [(offset + step, ce) for step, ce in run["train_ce_curve"]]
        legs = run.get("legs") or [{"first_step": 0, "steps": run["steps"], "results": {
            "arith_exact_match": run["arith"]["exact_match"], "arith_by_op": run["arith"]["by_op"],
            "heldout_code_ce": run["heldout_code_ce"],
            "code_token_accuracy": run.get("heldout_code_token_accuracy")}}]
        for leg in legs:
            if "results" in leg and not leg["results"].get("quick_eval"):
                ends.append({"step": offset + leg["first_step"] + leg["steps"], **leg["results"]})
        offset += run["steps"]
    return curve, ends, run_starts


def main() -> None:
    fig, (ce_ax, arith_ax, token_ax) = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, color in zip(NAMES, ("tab:blue", "tab:orange")):
        curve, ends, run_starts = points(runs_of(name))
        ce_ax.plot(*zip(*curve), color=color, label=name)
        for step in run_starts:  # a new run: new data mix and schedule, so the curve may jump
            ce_ax.axvline(step, color=color, ls=":", lw=1)
        arith_ax.plot([e["step"] for e in ends], [100 * e["arith_exact_match"] for e in ends], "o-",
                      color=color, label=name)
        with_token = [e for e in ends if e.get("code_token_accuracy") is not None]
        token_ax.plot([e["step"] for e in with_token], [100 * e["code_token_accuracy"] for e in with_token],
                      "o-", color=color, label=name)
        for e in ends:
            token = e.get("code_token_accuracy")
            print(f"{name:6s} step {e['step']:5d}  arith {100 * e['arith_exact_match']:5.1f}%  "
                  f"by op {e['arith_by_op']}  code CE {e['heldout_code_ce']:.3f}  "
                  f"code-token {'-' if token is None else f'{100 * token:.1f}%'}")
    arith_ax.axhline(60, color="gray", ls="--", lw=1, label="target 60%")
    token_ax.axhline(35, color="gray", ls="--", lw=1, label="target 35%")
    for ax, title in ((ce_ax, "training cross entropy (nats)"), (arith_ax, "held-out arith exact match (%)"),
                      (token_ax, "held-out code-token accuracy (%)")):
        ax.set_xlabel("optimizer step (5120 tokens each)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = RESULTS / "learning_curves.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
