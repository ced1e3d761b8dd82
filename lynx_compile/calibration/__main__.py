"""``lynx-compile calibrate``: a per-site plan for a checkpoint under an accuracy budget.

    lynx-compile calibrate --checkpoint coarse --budget kl=0.01 --out plan_coarse.json
    lynx-compile calibrate --checkpoint path/to/hf/moe --budget top1_agreement=0.95 --batches 8

Loads the checkpoint (float32), cuts calibration windows from the training split of the code
corpus with its tokenizer, runs `lynx_compile.calibrate` and writes the plan JSON
(`options={"plan": path}` loads it). See `calibration/procedure.py` for the method and its cost.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lynx_compile.calibration.choose import check_budget
from lynx_compile.calibration.data import default_batches
from lynx_compile.calibration.procedure import calibrate, plan_table
from lynx_compile.config import LynxConfig
from lynx_compile.eval import checkpoints, tasks


def parse_budget(text: str) -> dict[str, float]:
    """"kl=0.01", "top1_agreement=0.95" or both, comma-separated."""
    budget = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        try:
            budget[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise argparse.ArgumentTypeError(f"budget {text!r}: expected kl=<nats per token> and/or "
                                             f"top1_agreement=<floor>, comma-separated")
    try:
        return check_budget(budget)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lynx-compile calibrate", description=__doc__.split("\n\n")[0])
    checkpoints.add_arguments(p)
    p.add_argument("--budget", type=parse_budget, default={"kl": 0.01},
                   help="kl=<mean nats per decode token> and/or top1_agreement=<floor>, e.g. kl=0.01 (default)")
    p.add_argument("--batches", type=int, default=4, help="calibration decode batches (default 4)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per batch = decode batch size (default 16)")
    p.add_argument("--prefix", type=int, default=tasks.CODE_TOKEN_PREFIX, help="prefill tokens per window")
    p.add_argument("--steps", type=int, default=tasks.CODE_TOKEN_STEPS, help="decode steps per window")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help="plan JSON path (default: plan_<checkpoint>.json)")
    p.add_argument("--quiet", action="store_true", help="print only the plan table")
    return p


def main(argv: list[str] | None = None) -> dict:
    import transformers

    cli = parser()
    args = cli.parse_args(argv)
    for name in ("batches", "batch_size", "prefix", "steps"):
        if getattr(args, name) < 1:
            cli.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    path, model = checkpoints.load_from_args(cli, args)
    out = args.out or Path(f"plan_{path.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    batches = default_batches(tokenizer, args.batches, args.batch_size, args.prefix, args.steps)
    config = LynxConfig(pad_token_id=tokenizer.pad_token_id)
    plan = calibrate(model, batches, args.budget, prefix=args.prefix, config=config, out=str(out),
                                  log=None if args.quiet else lambda line: print(line, flush=True))
    plan_info = plan["calibration"]
    print(f"\n{path.name}: budget {args.budget}, {plan_info['decode_tokens']} decode tokens, "
          f"{plan_info['forward_passes']} passes, {plan_info['seconds']:.0f} s")
    print(plan_table(plan))
    print(f"wrote {out}", flush=True)
    return plan


if __name__ == "__main__":
    main()
