"""``lynx-compile explain``: the explain table for any local checkpoint, on a real decode step.

    lynx-compile explain --checkpoint coarse
    lynx-compile explain --checkpoint path/to/hf/moe --batch 8 --policy gate_mass_budget
    lynx-compile explain --checkpoint fine --plan plan_fine.json

A decode step, as `generate()` runs it: `--past` prompt tokens go in by an uncompiled prefill
into a DynamicCache, then one new token per sequence (B of them) runs through `explain` (a
(B, 1) call without a cache would be the prefill of one-token prompts, which lynx leaves
alone). Token ids are drawn at random (seeded), never the pad id.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lynx_compile import policies
from lynx_compile.config import LynxConfig
from lynx_compile.explain import explain
from lynx_compile.eval import checkpoints


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lynx-compile explain", description=__doc__.split("\n\n")[0])
    checkpoints.add_arguments(p)
    p.add_argument("--batch", type=int, default=16, help="sequences in the decode step (default 16)")
    p.add_argument("--past", type=int, default=8, help="tokens already in the KV cache (default 8)")
    p.add_argument("--policy", choices=policies.POLICIES, default=None, help="default: affinity_binning")
    p.add_argument("--plan", type=Path, default=None, help="a plan JSON (lynx-compile calibrate --out)")
    p.add_argument("--graphs", action="store_true", help="also print the graph before and after lynx's rewrite")
    return p


@torch.no_grad()
def decode_inputs(model, batch: int, past: int, seed: int = 0) -> dict:
    """Keyword arguments of one decode step with a filled DynamicCache (prefill run uncompiled)."""
    import transformers

    vocab = model.config.vocab_size
    pad = model.config.pad_token_id
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, past + 1), generator=generator)
    if pad is not None:
        ids = torch.where(ids == pad, (ids + 1) % vocab, ids)
    cache = transformers.DynamicCache(config=model.config)
    model(input_ids=ids[:, :past], past_key_values=cache, use_cache=True)
    return {"input_ids": ids[:, past:], "past_key_values": cache, "use_cache": True}


def main(argv: list[str] | None = None):
    cli = parser()
    args = cli.parse_args(argv)
    if args.batch < 1 or args.past < 1:
        cli.error(f"--batch and --past must be positive, got {args.batch} and {args.past}")
    path, model = checkpoints.load_from_args(cli, args)
    options = {"pad_token_id": model.config.pad_token_id}  # as eval and generate() run lynx
    if args.policy:
        options["policy"] = args.policy
    if args.plan:
        options["plan"] = str(args.plan)
    try:
        config = LynxConfig.from_options(options)
    except ValueError as error:
        cli.error(str(error))
    report = explain(model, **decode_inputs(model, args.batch, args.past), config=config)
    print(f"{path.name}: one decode step, B={args.batch}, {args.past} tokens cached")
    print(report)
    if args.graphs:
        for index, graph in enumerate(report.graphs):
            print(f"\n--- graph {index} before lynx ---\n{graph.before}\n--- graph {index} after the routing rewrite "
                  f"---\n{graph.after}")
    return report
