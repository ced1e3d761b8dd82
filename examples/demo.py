"""Decode a batch of held-out problems with a shipped checkpoint: default Inductor, lynx's fused
expert op alone, and lynx with selection.

    make demo        (or: python examples/demo.py --task arith --batch 16 --problems 64)

Loads a shipped checkpoint (default: coarse, Mixtral-style, 8 experts, top-2, trained on this
project's offline corpora) three times, compiled as

* default Inductor: ``model.compile()``;
* lynx, policy none: ``model.compile(backend="lynx", options={"policy": "none"})``, the fused expert
  op with no selection (same answers as Inductor, bit for bit);
* lynx: ``model.compile(backend="lynx")``, the default selection (moved_mass) + the fused expert op,

lets transformers' ``generate()`` answer the problems ``--batch`` at a time, and prints per variant
the median decode-step time, how much of lynx's speedup the fused op and selection each bring,
distinct experts per decode step (``lynx_compile.record``), accuracy, the problems whose answer
changed, and a few problems with all three answers.
"""

import argparse
import statistics
from typing import NamedTuple

import torch
import transformers

import lynx_compile
from lynx_compile import machine
from lynx_compile.eval import decode, harness, tasks
from lynx_compile.eval.checkpoints import resolve_checkpoint

VARIANTS = (harness.Variant("default Inductor", "inductor"),
            harness.Variant("lynx policy none", "lynx", {"policy": "none"}),
            harness.Variant("lynx", "lynx", None))  # the default options


class Run(NamedTuple):
    """One variant's pass over the problems."""

    answers: list[str]
    step_ms: float  # median decode-step time
    experts: tuple[float, float] | None  # mean distinct experts per step (plain top-k, after selection); lynx only


def answer(path, variant, task, problems, batch) -> Run:
    """Answer the problems after a first, compiling, pass over them (each batch's prompt length may
    compile a graph)."""
    torch._dynamo.reset()
    model, tokenizer = harness.load(path, torch.float32, variant)
    new_tokens = tasks.max_new_tokens(task)
    decode.generate_lines(model, tokenizer, problems, batch, new_tokens)  # compiles
    timer = decode.DecodeStepTimer()
    answers = decode.generate_lines(model, tokenizer, problems, batch, new_tokens, timer)
    experts = None
    if variant.backend == "lynx":
        with lynx_compile.record(model) as recorder:
            decode.generate_lines(model, tokenizer, problems[:batch], batch, new_tokens)
        per_layer = recorder.summary().values()
        experts = (statistics.mean(s["experts_before"] for s in per_layer),
                   statistics.mean(s["experts_after"] for s in per_layer))
    return Run(answers, statistics.median(timer.step_ms), experts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="coarse", help="shipped name (coarse, fine) or a checkpoint directory")
    parser.add_argument("--task", default="arith", choices=("arith", "code-line"))
    parser.add_argument("--batch", type=int, default=16, help="problems decoded together (B)")
    parser.add_argument("--problems", type=int, default=64)
    args = parser.parse_args()
    if args.batch < 1 or args.problems < args.batch:
        parser.error(f"need 1 <= --batch <= --problems, got --batch {args.batch} --problems {args.problems}")
    transformers.utils.logging.disable_progress_bar()  # weight-loading bars, once per variant
    torch._dynamo.config.recompile_limit = harness.DYNAMO_LIMITS["recompile_limit"]

    path = resolve_checkpoint(args.checkpoint)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    config = transformers.AutoConfig.from_pretrained(path)
    problems = tasks.generation_problems(args.task, tokenizer, args.problems, config.max_position_embeddings)
    num_experts = getattr(config, "num_local_experts", None) or config.num_experts
    print(f"checkpoint {path.name}: {config.model_type}, {num_experts} experts, top-{config.num_experts_per_tok}; "
          f"{len(problems)} held-out {args.task} problems, {args.batch} decoded together (greedy generate()); "
          f"{torch.get_num_threads()} threads, CPU {machine.describe()['cpu_features']}\n", flush=True)

    runs = {variant.name: answer(path, variant, args.task, problems, args.batch) for variant in VARIANTS}
    names = [variant.name for variant in VARIANTS]
    base, fused_only, lynx = (runs[name] for name in names)
    plain_experts = fused_only.experts[0]  # policy none records the batch's plain top-k

    def correct(answers):
        return [tasks.is_correct(args.task, a, p.expected) for a, p in zip(answers, problems)]

    def row(label, cells):
        print(f"{label:34}" + "".join(f"{cell:>20}" for cell in cells))

    row("", names)
    row("decode step (median ms)", [f"{runs[n].step_ms:.2f}" for n in names])
    row("speedup vs default Inductor", [f"{base.step_ms / runs[n].step_ms:.2f}x" for n in names])
    fused, selection = base.step_ms / fused_only.step_ms, fused_only.step_ms / lynx.step_ms
    row("  from the fused expert op", ["", f"{fused:.2f}x", f"{fused:.2f}x"])
    row("  from selection", ["", "", f"{selection:.2f}x"])
    row(f"distinct experts per step (of {num_experts})",
        [f"{plain_experts:.1f}", f"{fused_only.experts[1]:.1f}", f"{lynx.experts[1]:.1f}"])
    row("accuracy", [f"{100 * statistics.mean(correct(runs[n].answers)):.1f}%" for n in names])
    base_correct = correct(base.answers)
    row("answers that differ from Inductor",
        ["", *(f"{sum(a != b for a, b in zip(runs[n].answers, base.answers))}/{len(problems)}" for n in names[1:])])
    row("  of which right <-> wrong",
        ["", *(f"{sum(a != b for a, b in zip(correct(runs[n].answers), base_correct))}" for n in names[1:])])

    changed = [i for i, a in enumerate(lynx.answers) if a != base.answers[i]]
    shown = (changed + [i for i in range(len(problems)) if i not in changed])[:4]
    print(f"\nexamples (the first problems whose lynx answer differs, then others): expected | "
          + " | ".join(names))
    for i in shown:
        prompt = tokenizer.decode(problems[i].prompt_ids, skip_special_tokens=True).rstrip("\n").rsplit("\n", 1)[-1]
        answers = " | ".join(repr(runs[n].answers[i]) for n in names)
        print(f"  {prompt!r:>16} -> {problems[i].expected!r} | {answers}")


if __name__ == "__main__":
    main()
