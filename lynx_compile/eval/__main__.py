"""``lynx-compile eval`` / ``python -m lynx_compile.eval``: accuracy and decode time, Inductor vs lynx.

    lynx-compile eval                                   # both shipped checkpoints, all tasks
    lynx-compile eval --checkpoint coarse --task arith --batch-sizes 1 16 --problems 100
    lynx-compile eval --checkpoint coarse --task arith code-token --problems arith=100 code-token=512
    lynx-compile eval --checkpoint path/to/hf/moe/checkpoint
    lynx-compile eval --task code-token --batch-sizes 16 32 --policies none affinity_binning \
        gate_mass_budget:expert_budget=4 opportunistic:keep_top=1 plan:plan_coarse.json

Writes ``<out>/eval_<checkpoint>.json`` and ``.png`` and prints one table per checkpoint; with
``code-token`` also the comparison of every variant's experts per step against its fidelity to
Inductor (``eval_<checkpoint>_pareto.png`` and a markdown table).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers

from lynx_compile import machine
from lynx_compile.eval import harness, report, tasks
from lynx_compile.eval.checkpoints import DTYPES, SHIPPED, resolve_checkpoint
from lynx_compile.policies import DEFAULT_POLICY, POLICIES



def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lynx-compile eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", nargs="+", default=list(SHIPPED),
                   help="shipped checkpoint names (coarse, fine) or local HF MoE checkpoint directories")
    p.add_argument("--task", nargs="+", default=list(tasks.TASKS), choices=tasks.TASKS)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16, 32, 64])
    p.add_argument("--policies", nargs="+", default=["none", DEFAULT_POLICY], metavar="SPEC",
                   help=f"lynx variants: POLICY ({', '.join(POLICIES)}), "
                        "POLICY:key=value[,key=value] (e.g. gate_mass_budget:expert_budget=4, "
                        "opportunistic:keep_top=1) or plan:PATH (a calibrated plan)")
    p.add_argument("--problems", nargs="+", default=["500"], metavar="N|TASK=N",
                   help="problems per task (code-token: predicted tokens); N for every task or TASK=N per task "
                        "(e.g. arith=100 code-token=512; a task not named takes 500)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="compute dtype (float32 default: the shipped tables are measured in it)")
    p.add_argument("--eager", action="store_true", help="also run the uncompiled model")
    p.add_argument("--record-batches", type=int, default=2,
                   help="batches per cell re-run under lynx_compile.record to count experts")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    p.add_argument("--out", type=Path, default=Path("bench/results/eval"))
    p.add_argument("--no-progress", action="store_true", help="no progress bars (per cell, and loading weights)")
    return p


def problems_per_task(items: list[str], task_names: list[str], default: int = 500) -> dict[str, int]:
    """["64"] -> 64 for every task; ["arith=4", "code-token=64"] -> per task. Raises ValueError
    naming the item that is not a positive count or names a task not being run."""
    counts = dict.fromkeys(task_names, default)
    for item in items:
        task, _, number = item.rpartition("=")
        if task and task not in task_names:
            raise ValueError(f"{item!r} names task {task!r}, which is not among --task {' '.join(task_names)}")
        if not number.isdigit() or int(number) < 1:
            raise ValueError(f"{item!r}: expected a positive count, N or TASK=N")
        counts.update({task: int(number)} if task else dict.fromkeys(task_names, int(number)))
    return counts


def main(argv: list[str] | None = None) -> list[dict]:
    cli = parser()
    args = cli.parse_args(argv)
    try:
        args.problems = problems_per_task(args.problems, args.task)
    except ValueError as error:
        cli.error(f"--problems: {error}")
    if min(args.batch_sizes) < 1:
        cli.error(f"--batch-sizes must be positive, got {args.batch_sizes}")
    for checkpoint in args.checkpoint:
        try:
            resolve_checkpoint(checkpoint)
        except FileNotFoundError as error:
            cli.error(str(error))
    for spec in args.policies:
        try:
            harness.parse_variant(spec)
        except ValueError as error:
            cli.error(f"--policies {spec}: {error}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_progress:
        transformers.utils.logging.disable_progress_bar()  # the weight-loading bar of every variant
    info = machine.describe()
    print(f"machine: {info}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for checkpoint in args.checkpoint:
        result = harness.evaluate(checkpoint, args.task, args.batch_sizes, args.policies, args.problems,
                                  DTYPES[args.dtype], args.eager, args.record_batches, not args.no_progress)
        result["machine"] = info
        stem = args.out / f"eval_{result['checkpoint']}"
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        report.plot(result, stem.with_suffix(".png"))
        print(f"\n{result['checkpoint']} ({result['model_type']}, {result['num_experts']} experts, "
              f"top-{result['top_k']}, {result['dtype']}; {result['wall_seconds']['total'] / 60:.1f} min, "
              f"compiling included):")
        print(report.table(result))
        written = f"{stem}.json and {stem}.png"
        if report.has_fidelity(result):
            pareto = stem.with_name(stem.name + "_pareto.png")
            report.pareto_plot(result, pareto)
            print("\n" + report.comparison_markdown(result))
            written += f" and {pareto}"
        print(f"wrote {written}", flush=True)
        results.append(result)
    return results


if __name__ == "__main__":
    main()
