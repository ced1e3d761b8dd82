"""Do finished rows change what live rows generate? lynx with and without the dead-row mask.

    python bench/dead_rows.py            (~5 min; JSON in bench/results/dead_rows.json)

`generate()` feeds every finished sequence the pad token while the rest of the batch decodes.
Those rows still pass through the MoE layers, so without a mask they vote on the experts the live
rows get. The measurement: generate the same held-out code-line problems (the shipped coarse
checkpoint, B=16, greedy) twice, changing only the token finished rows are fed (the pad id
given to generate()), and count the live tokens (each row's tokens up to its first newline/EOS)
that differ between the two runs:

  lynx, pad_token_id option = the fed id   dead rows masked out of the vote   (target 0)
  lynx, no pad_token_id option             every row votes
  lynx policy none                         no selection at all                (0 by construction)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lynx_compile import machine
from lynx_compile.eval import decode, harness, tasks
from lynx_compile.eval.checkpoints import resolve_checkpoint

RESULTS = Path(__file__).parent / "results" / "dead_rows.json"


def live_tokens(out: torch.Tensor, prompt_width: int, stop_ids: list[int]) -> list[list[int]]:
    """Each row's generated tokens up to and including its first stop token."""
    rows = []
    for row in out[:, prompt_width:].tolist():
        cut = next((i + 1 for i, token in enumerate(row) if token in stop_ids), len(row))
        rows.append(row[:cut])
    return rows


def generate_all(model, tokenizer, problems, batch: int, fed_pad: int) -> list[list[int]]:
    stop_ids = [tasks.newline_id(tokenizer), tokenizer.eos_token_id]
    rows = []
    for chunk in decode.batches(problems, batch):
        # Prompts are left-padded with the tokenizer's own pad id; only finished rows get `fed_pad`.
        ids, mask = decode.left_pad([p.prompt_ids for p in chunk], tokenizer.pad_token_id)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tasks.max_new_tokens("code-line"),
                                 do_sample=False, eos_token_id=stop_ids, pad_token_id=fed_pad)
        rows += live_tokens(out, ids.shape[1], stop_ids)
    return rows


def changed(first: list[list[int]], second: list[list[int]]) -> dict:
    tokens = sum(len(a) for a in first)
    differing = sum(sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b)) for a, b in zip(first, second))
    return {"live_tokens": tokens, "live_tokens_changed": differing,
            "share_changed": round(differing / max(tokens, 1), 4),
            "rows_changed": sum(a != b for a, b in zip(first, second)), "rows": len(first)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = harness.DYNAMO_LIMITS["recompile_limit"]
    path = resolve_checkpoint("coarse")
    results = {"machine": machine.describe(), "problems": args.problems, "batch": args.batch, "cases": {}}

    setups = {"lynx, dead rows masked": ({}, True), "lynx, every row votes": ({}, False),
              "lynx policy none": ({"policy": "none"}, True)}
    for name, (options, masked) in setups.items():
        runs = []
        for fed in ("pad", "other"):
            torch._dynamo.reset()
            model, tokenizer = harness.load(path, torch.float32, harness.Variant("inductor", None))
            problems = tasks.code_line_problems(tokenizer, args.problems, model.config.max_position_embeddings)
            # The other id: a token that never starts a line of code, distinct from pad and EOS.
            fed_id = tokenizer.pad_token_id if fed == "pad" else tasks.newline_id(tokenizer) + 1
            model.compile(backend="lynx", options={**options, **({"pad_token_id": fed_id} if masked else {})})
            runs.append(generate_all(model, tokenizer, problems, args.batch, fed_id))
        results["cases"][name] = changed(*runs)
        print(f"{name:28} {results['cases'][name]}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"machine: {results['machine']}\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
