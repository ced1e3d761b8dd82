"""Decode a batch of held-out code prompts with the shipped checkpoint: default Inductor vs lynx.

    make demo        (or: python examples/demo.py --batch 16)

Loads the shipped coarse checkpoint (Mixtral-style, 8 experts, top-2, trained on this
project's offline corpora), compiles it with default Inductor and with backend="lynx", and
lets transformers' generate() complete the next line of each held-out prompt. Prints side by
side: decode step time and ratio, distinct experts per decode step (lynx_compile.record),
next-line exact match on the batch, and example completions.
"""

import argparse
import statistics

import torch
import transformers

import lynx_compile
from lynx_compile.eval import decode, harness, tasks


def complete(path, variant, problems, batch):
    """(completions, median decode-step ms, lynx's record or None) after a first, compiling, pass."""
    torch._dynamo.reset()
    model, tokenizer = harness.load(path, torch.float32, variant)
    new_tokens = tasks.max_new_tokens("code-line")
    decode.generate_lines(model, tokenizer, problems, batch, new_tokens)  # compiles
    timer = decode.DecodeStepTimer()
    lines = decode.generate_lines(model, tokenizer, problems, batch, new_tokens, timer)
    recorder = None
    if variant.backend == "lynx":
        with lynx_compile.record(model) as recorder:
            decode.generate_lines(model, tokenizer, problems, batch, new_tokens)
    return lines, statistics.median(timer.step_ms), recorder


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = harness.DYNAMO_LIMITS["recompile_limit"]

    path = harness.resolve_checkpoint("coarse")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    context = transformers.AutoConfig.from_pretrained(path).max_position_embeddings
    problems = tasks.code_line_problems(tokenizer, args.batch, context)
    print(f"checkpoint {path.name}: Mixtral-style, 8 experts, top-2; {args.batch} held-out code prompts "
          f"decoded together (greedy, generate()), {torch.get_num_threads()} threads\n")

    inductor_lines, inductor_ms, _ = complete(path, harness.Variant("inductor", "inductor"), problems, args.batch)
    lynx_lines, lynx_ms, recorder = complete(path, harness.Variant("lynx", "lynx"), problems, args.batch)

    def exact(lines):
        return sum(tasks.is_correct("code-line", line, p.expected) for line, p in zip(lines, problems))

    print(f"{'':28}{'default Inductor':>18}{'lynx':>12}")
    print(f"{'decode step (median ms)':28}{inductor_ms:>18.2f}{lynx_ms:>12.2f}   ({inductor_ms / lynx_ms:.2f}x)")
    print(f"{'next line exact match':28}{exact(inductor_lines):>15}/{args.batch}{exact(lynx_lines):>9}/{args.batch}")
    print(f"{'completions that differ':28}{'':>18}{sum(a != b for a, b in zip(inductor_lines, lynx_lines)):>12}")
    print("\ndistinct experts per decode step, plain top-k -> lynx (lynx_compile.record):")
    print(recorder.table())
    print("\nexample completions (prompt's last line | expected | Inductor | lynx):")
    for problem, base, mine in list(zip(problems, inductor_lines, lynx_lines))[:2]:
        last_line = tokenizer.decode(problem.prompt_ids).rstrip("\n").rsplit("\n", 1)[-1]
        print(f"  prompt ...{last_line!r}\n    expected {problem.expected!r}")
        print(f"    inductor {base!r}\n    lynx     {mine!r}")


if __name__ == "__main__":
    main()
