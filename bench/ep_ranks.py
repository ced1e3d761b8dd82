"""Expert parallelism, simulated: the most experts any one of R ranks reads per decode step, per
setting and batch size, on the shipped checkpoints' real routing (issue 21's per-rank table).

Under expert parallelism (EP) each of R ranks owns E/R contiguous experts, and a decode step waits
for the rank that reads the most. The per-rank counts follow from the expert ids each step
selects, so no R processes are needed: the checkpoint is compiled once with every decode routing
site switchable (`lowering/switch_select.py`), teacher-forced held-out code windows are decoded B at
a time under each setting inside `record()`, and `Recorder.per_rank(R)` splits each step's distinct
experts over the R shards. Per B and setting, averaged over the decode steps and the layers:

  experts/step   distinct experts the batch reads (every rank together)
  max per rank   the most experts one rank reads in a step (what the step waits for)
  idle ranks     ranks that read no expert in a step
  top-1, KL      next-token agreement and mean KL against policy none on the same tokens

    python bench/ep_ranks.py --checkpoint fine --ranks 8 --batch-sizes 16 32 64 \
        --settings none affinity_binning moved_mass moved_mass:ranks=8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import transformers

from common import RESULTS, pyplot
from lynx_compile import machine
from lynx_compile.calibration.measure import decode_log_probs
from lynx_compile.calibration.procedure import DYNAMO_LIMITS
from lynx_compile.eval import tasks
from lynx_compile.eval.fidelity import fidelity
from lynx_compile.lowering.switch_select import use_settings
from lynx_compile.record import record
from policy_frontier import site_settings, switchable_checkpoint

OUT = RESULTS / "ep_ranks"
SETTINGS = ("none", "affinity_binning", "moved_mass", "moved_mass:ranks=8", "moved_mass:max_moved=0.12",
            "moved_mass:max_moved=0.12,ranks=8")


def measure(checkpoint: str, ranks: int, batch_sizes: list[int], specs: list[str], code_tokens: int,
            log=print) -> dict:
    """Rows of (B, setting): experts per step, most per rank, idle ranks, fidelity vs none."""
    if specs[0] != "none":
        raise ValueError("the first setting must be none (it names the sites and is the reference)")
    model, _, windows, prefix = switchable_checkpoint(checkpoint, code_tokens)
    sites: dict[str, tuple[int, int]] = {}
    rows, started = [], time.perf_counter()
    for batch in batch_sizes:
        batches = list(windows.split(batch))
        reference = None
        for spec in specs:
            with torch._dynamo.config.patch(**DYNAMO_LIMITS), use_settings(model, site_settings(spec, sites)), \
                    record(model) as rec:
                log_probs = decode_log_probs(model, model.config, batches, prefix)
            summary, per_rank = rec.summary(decode_only=True), rec.per_rank(ranks, decode_only=True)
            if not sites:
                sites.update({s: (int(v["num_experts"]), int(v["top_k"])) for s, v in summary.items()})
            reference = log_probs if reference is None else reference
            fid = fidelity(reference, log_probs)

            def mean(values) -> float:
                values = list(values)
                return round(sum(values) / len(values), 3)

            row = {"batch": batch, "setting": spec, "ranks": ranks,
                   "num_experts": next(iter(summary.values()))["num_experts"],
                   "experts_before": mean(v["experts_before"] for v in summary.values()),
                   "experts_after": mean(v["experts_after"] for v in summary.values()),
                   "max_per_rank_before": mean(v["max_per_rank_before"] for v in per_rank.values()),
                   "max_per_rank_after": mean(v["max_per_rank_after"] for v in per_rank.values()),
                   "idle_ranks_after": mean(v["idle_ranks_after"] for v in per_rank.values()),
                   "top1_agreement": round(fid.top1_agreement, 4), "kl": round(fid.kl, 5)}
            rows.append(row)
            log(f"{checkpoint} R={ranks} B={batch:3d} {spec:36s} experts {row['experts_after']:6.2f}  "
                f"max/rank {row['max_per_rank_before']:5.2f} -> {row['max_per_rank_after']:5.2f}  "
                f"idle {row['idle_ranks_after']:4.2f}  top-1 {fid.top1_agreement:6.1%}  KL {fid.kl:.4f}  "
                f"[{time.perf_counter() - started:.0f} s]")
    return {"checkpoint": checkpoint, "ranks": ranks, "code_tokens": int(windows.shape[0] * tasks.CODE_TOKEN_STEPS),
            "rows": rows, "seconds": round(time.perf_counter() - started, 1)}


def markdown(result: dict) -> str:
    ranks, experts = result["ranks"], result["rows"][0]["num_experts"]
    lines = [f"**{result['checkpoint']}** ({experts} experts, simulated over {ranks} expert-parallel ranks of "
             f"{experts // ranks}): {result['code_tokens']} held-out code tokens per cell (teacher-forced); means "
             "over decode steps and layers; fidelity against policy none at the same B", "",
             "| B | setting | experts/step | max experts per rank | idle ranks | top-1 agreement | KL mean |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        lines.append(f"| {r['batch']} | {r['setting']} | {r['experts_after']:.2f} | {r['max_per_rank_after']:.2f} | "
                     f"{r['idle_ranks_after']:.2f} | {r['top1_agreement']:.1%} | {r['kl']:.4f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """Per checkpoint, one group of bars per B: the most experts one rank reads per step, or, where
    each rank holds one expert (that is always 1), the ranks left idle."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 4.8), squeeze=False)
    for axis, result in zip(axes[0], results):
        batches = sorted({r["batch"] for r in result["rows"]})
        settings = list(dict.fromkeys(r["setting"] for r in result["rows"]))
        one_each = result["rows"][0]["num_experts"] == result["ranks"]
        key, label = ("idle_ranks_after", "ranks that read no expert per step") if one_each else \
            ("max_per_rank_after", "most experts one rank reads per step")
        width = 0.8 / len(settings)
        for i, setting in enumerate(settings):
            values = [next(r[key] for r in result["rows"] if r["batch"] == b and r["setting"] == setting)
                      for b in batches]
            axis.bar([j + i * width for j in range(len(batches))], values, width, label=setting)
        axis.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"B={b}" for b in batches])
        axis.set(ylabel=label,
                 title=f"{result['checkpoint']}: {result['rows'][0]['num_experts']} experts over {result['ranks']} ranks")
        axis.grid(axis="y", alpha=0.3)
        axis.legend(fontsize="x-small", loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", nargs="+", default=["coarse", "fine"])
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 32, 64])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), help="the first must be none")
    p.add_argument("--code-tokens", type=int, default=1024, help="predicted code tokens per setting and B")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--report", action="store_true", help="only redraw the tables and the plot from the JSON files")
    args = p.parse_args(argv)
    if args.report:
        results = [json.loads((args.out / f"ep_ranks_{c}.json").read_text()) for c in args.checkpoints]
        for result in results:
            (args.out / f"ep_ranks_{result['checkpoint']}.md").write_text(markdown(result) + "\n")
        plot(results, args.out / "ep_ranks.png")
        return
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    args.out.mkdir(parents=True, exist_ok=True)
    info, results = machine.describe(), []
    for checkpoint in args.checkpoints:
        result = {"machine": info, **measure(checkpoint, args.ranks, args.batch_sizes, args.settings,
                                             args.code_tokens)}
        out = args.out / f"ep_ranks_{checkpoint}.json"
        out.write_text(json.dumps(result, indent=1) + "\n")
        out.with_suffix(".md").write_text(markdown(result) + "\n")
        results.append(result)
        print(f"wrote {out} and its .md")
    plot(results, args.out / "ep_ranks.png")
    print(f"wrote {args.out / 'ep_ranks.png'}")


if __name__ == "__main__":
    main()
