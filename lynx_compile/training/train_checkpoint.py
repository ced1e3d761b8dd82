"""Train one of the small Mixture-of-Experts checkpoints shipped in ``lynx_compile/checkpoints``.

    python -m lynx_compile.training.train_checkpoint --preset coarse --out lynx_compile/checkpoints/coarse
    python -m lynx_compile.training.train_checkpoint --preset fine --out lynx_compile/checkpoints/fine

Everything is offline (see :mod:`lynx_compile.eval.corpora`): the training split of the running
interpreter's stdlib ``.py`` files and generated arithmetic lines. The script

1. trains a byte-level BPE tokenizer on the training split only (digits are always split into
   single-digit tokens and every newline is its own token, so prompts that end at a newline or
   at ``=`` tokenize exactly as they did in training);
2. trains a transformers MoE causal LM (``coarse``: Mixtral, 8 experts, top-2; ``fine``:
   Qwen3-MoE, 32 experts, top-4) in fp32 with the router load-balancing loss (per layer), AdamW, linear
   warmup and a cosine schedule, for a wall-clock budget (``--minutes``; ``--steps`` fixes the
   step count instead, for an exactly repeatable schedule);
3. saves model (bfloat16 weights) and tokenizer with ``save_pretrained``, reloads them, and
   writes ``training_report.json``: held-out losses, arithmetic and next-line exact match with
   greedy decoding, router statistics (expert load balance, experts touched by decode-like
   batches of 16 tokens), the learning curve and every leg so far.

Training runs in legs (:mod:`lynx_compile.training.state`): the fp32 model and optimizer are saved
to ``--state`` (default ``build/training/PRESET``) every ``--save-minutes``, on SIGINT/SIGTERM
(the leg stops after its current step) and at the end of the leg. A later leg continues it::

    python -m lynx_compile.training.train_checkpoint --preset coarse --out lynx_compile/checkpoints/coarse \
        --minutes 60 --resume

The pieces: `data.py` (tokenizer, batches), `model.py` (presets), `loop.py` (one leg),
`evaluation.py` (the report's measurements), `state.py` (saving and resuming); this module is the
command line, the leg bookkeeping and the export.

Each leg is one cosine cycle from ``--peak-lr`` (a warm restart). ``--init-from CHECKPOINT`` starts a
new run from saved weights (e.g. a shipped checkpoint) with a fresh optimizer and schedule. An
interrupted leg exports nothing; a finished one exports and evaluates.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import random
import signal
import time
from pathlib import Path

import torch
import transformers

from lynx_compile.lowering.kernels.choice import cpu_features
from lynx_compile.training import state
from lynx_compile.training.data import ARITH_SEQS_PER_BATCH, CODE_SEQS_PER_BATCH, CONTEXT, TrainBatches, train_tokenizer
from lynx_compile.training.evaluation import QUICK_EVAL, EvalSizes, evaluate
from lynx_compile.training.loop import (FINAL_LR_FRACTION, GRAD_CLIP, PEAK_LR, RESUME_WARMUP_STEPS, WARMUP_STEPS,
                                        WEIGHT_DECAY, LegPlan, make_optimizer, train)
from lynx_compile.training.model import PRESETS, TRAIN_EXPERTS_IMPLEMENTATION, build_config


def config_summary(config) -> dict:
    keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "num_local_experts", "num_experts", "num_experts_per_tok",
            "intermediate_size", "moe_intermediate_size", "norm_topk_prob", "router_aux_loss_coef",
            "tie_word_embeddings", "max_position_embeddings")
    summary = {key: getattr(config, key) for key in keys if hasattr(config, key)}
    if config.model_type == "mixtral":
        summary.pop("num_experts")  # an alias of num_local_experts
    if config.model_type == "qwen3_moe":
        summary.pop("intermediate_size")  # only used by dense layers, and every layer is sparse here
    return summary


class StopOnSignal:
    """While active, SIGINT/SIGTERM ask the training loop to stop at the next step (and save)."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._request)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _request(self, signum, frame):
        print(f"{signal.Signals(signum).name}: stopping after this step and saving the state", flush=True)
        self.requested = True


def _shown(path: Path, placeholder: str) -> str:
    """A path as a report may show it: relative paths as given, never this machine's absolute ones."""
    return placeholder if path.is_absolute() else path.as_posix()


def _leg_command(args, state_dir: Path) -> str:
    parts = [f"python -m lynx_compile.training.train_checkpoint --preset {args.preset} "
             f"--out {_shown(args.out, 'OUT')} --state {_shown(state_dir, 'STATE')}"]
    parts.append(f"--steps {args.steps}" if args.steps else f"--minutes {args.minutes:g}")
    if args.resume:
        parts.append("--resume")
    if args.init_from:
        parts.append(f"--init-from {_shown(args.init_from, 'CHECKPOINT')}")
    if args.tokenizer:
        parts.append(f"--tokenizer {_shown(args.tokenizer, 'TOKENIZER')}")
    parts.append(f"--seed {args.seed} --peak-lr {args.peak_lr:g} --code-seqs {args.code_seqs} "
                 f"--arith-seqs {args.arith_seqs}")
    if args.quick_eval:
        parts.append("--quick-eval")
    return " ".join(parts)


def _start(args, parser) -> tuple:
    """Model, tokenizer, optimizer and progress for this leg: resumed, from a checkpoint, or new."""
    if args.resume:
        if not state.exists(args.state):
            parser.error(f"--resume: no training state in --state {args.state}; start a first leg without "
                         "--resume, or pass the --state of an earlier run")
        model, tokenizer, optimizer_state, progress = state.load(args.state, TRAIN_EXPERTS_IMPLEMENTATION)
        if progress.preset != args.preset:
            parser.error(f"--state {args.state} holds a {progress.preset!r} run, not --preset {args.preset!r}")
        optimizer = make_optimizer(model)
        optimizer.load_state_dict(optimizer_state)
        return model, tokenizer, optimizer, progress, f"resumed at step {progress.step}", RESUME_WARMUP_STEPS
    if state.exists(args.state):
        parser.error(f"--state {args.state} already holds a training run: pass --resume to continue it, "
                     "or another --state to start a new one (nothing was overwritten)")
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.init_from:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.init_from)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            args.init_from, dtype=torch.float32, experts_implementation=TRAIN_EXPERTS_IMPLEMENTATION)
        expected = PRESETS[args.preset].config_class.model_type
        if model.config.model_type != expected:
            parser.error(f"--init-from {args.init_from} is a {model.config.model_type!r} model; "
                         f"--preset {args.preset} trains {expected!r}")
        model.config.output_router_logits = True
        init = f"weights of {_shown(args.init_from, 'CHECKPOINT')} (schedule restarted)"
    else:
        tokenizer = (transformers.AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer
                     else train_tokenizer(args.seed))
        model = transformers.AutoModelForCausalLM.from_config(build_config(args.preset, tokenizer))
        init = "random"
    progress = state.Progress(preset=args.preset, seed=args.seed)
    return model, tokenizer, make_optimizer(model), progress, init, WARMUP_STEPS


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--out", type=Path, required=True, help="where the bf16 checkpoint is exported")
    parser.add_argument("--state", type=Path, default=None,
                        help="resumable training state (default: build/training/PRESET, outside git)")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --state as a new leg")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="start from a saved checkpoint's weights and tokenizer (new optimizer and schedule)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="use this saved tokenizer instead of training one (new runs only)")
    parser.add_argument("--minutes", type=float, default=50.0, help="this leg's training-loop wall-clock budget")
    parser.add_argument("--steps", type=int, default=None, help="this leg's fixed step count (overrides --minutes)")
    parser.add_argument("--peak-lr", type=float, default=PEAK_LR, help="this leg's peak learning rate")
    parser.add_argument("--code-seqs", type=int, default=CODE_SEQS_PER_BATCH, help="code windows per step")
    parser.add_argument("--arith-seqs", type=int, default=ARITH_SEQS_PER_BATCH,
                        help="packed arithmetic sequences per step")
    parser.add_argument("--save-minutes", type=float, default=10.0, help="save the state this often")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="most intra-op threads (see ThreadTuner)")
    parser.add_argument("--quick-eval", action="store_true", help="a small end-of-leg evaluation (smoke runs)")
    args = parser.parse_args(argv)
    if args.resume and (args.init_from or args.tokenizer):
        parser.error("--resume continues the saved model and tokenizer; --init-from/--tokenizer start new runs")
    for key in ("minutes", "peak_lr", "save_minutes"):
        if getattr(args, key) <= 0:
            parser.error(f"--{key.replace('_', '-')} must be > 0, got {getattr(args, key)}")
    for key, lowest in (("steps", 1), ("code_seqs", 0), ("arith_seqs", 0), ("threads", 1)):
        value = getattr(args, key)
        if value is not None and value < lowest:
            parser.error(f"--{key.replace('_', '-')} must be >= {lowest}, got {value}")
    if args.code_seqs + args.arith_seqs == 0:
        parser.error("--code-seqs and --arith-seqs are both 0: a step needs at least one sequence")
    args.state = args.state or Path("build/training") / args.preset
    return parser, args


def main(argv: list[str] | None = None) -> dict | None:
    """Run one leg; export and evaluate the checkpoint when the leg finishes. Returns the report."""
    parser, args = parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()  # a bar per periodic save would bury the loss log
    wall = time.monotonic()
    model, tokenizer, optimizer, progress, init, warmup = _start(args, parser)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.preset}: {PRESETS[args.preset].description}; {params / 1e6:.2f}M parameters; {init}", flush=True)
    leg = {"leg": len(progress.legs) + 1, "date": datetime.date.today().isoformat(), "init": init,
           "command": _leg_command(args, args.state), "first_step": progress.step, "peak_lr": args.peak_lr,
           "warmup_steps": warmup, "batch": {"code_sequences": args.code_seqs, "arith_sequences": args.arith_seqs},
           "threads": args.threads, "cpu": cpu_features(), "status": "running", "steps": 0, "tokens": 0, "minutes": 0}
    progress.legs.append(leg)
    # Each leg draws a fresh data order: the batch generators' positions are not part of the state.
    batches = TrainBatches(tokenizer, args.seed + leg["leg"] - 1, args.code_seqs, args.arith_seqs)
    print(f"setup {time.monotonic() - wall:.0f} s; code train stream {len(batches.code)} tokens", flush=True)

    def save():
        state.save(args.state, model, tokenizer, optimizer, progress)

    plan = LegPlan(args.minutes, args.steps, args.peak_lr, warmup, args.threads, args.save_minutes)
    with StopOnSignal() as stop:
        train(model, optimizer, batches, plan, progress, leg, save, lambda: stop.requested)
    save()
    if leg["status"] == "interrupted":
        print(f"leg {leg['leg']} stopped at step {progress.step}; state saved in {args.state}. "
              "Continue with --resume.", flush=True)
        return None
    return export(args, model, tokenizer, progress, params, wall, save)


# A tokenizer loaded from a directory saves how it was loaded; a shipped checkpoint should not say.
LOADING_KEYS = ("is_local", "local_files_only")


def _drop_loading_keys(tokenizer_config: Path) -> None:
    config = json.loads(tokenizer_config.read_text())
    if any(key in config for key in LOADING_KEYS):
        tokenizer_config.write_text(json.dumps({k: v for k, v in config.items() if k not in LOADING_KEYS},
                                               indent=2, ensure_ascii=False) + "\n")


def export(args, model, tokenizer, progress: state.Progress, params: int, wall: float, save) -> dict:
    """Save the bf16 checkpoint to ``args.out``, evaluate what was saved, and write its report."""
    model.config.output_router_logits = False  # inference default; pass output_router_logits=True to get them
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    bf16.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    _drop_loading_keys(args.out / "tokenizer_config.json")
    model.config.output_router_logits = True
    # Evaluate what was shipped: the saved bf16 weights, computed in fp32 on the CPU.
    shipped = transformers.AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    shipped_tokenizer = transformers.AutoTokenizer.from_pretrained(args.out)
    results = evaluate(shipped, shipped_tokenizer, QUICK_EVAL if args.quick_eval else EvalSizes())
    leg = progress.legs[-1]
    leg["results"] = {"heldout_code_ce": results["heldout_code_ce"],
                      "code_token_accuracy": results["heldout_code_token_accuracy"],
                      "arith_exact_match": results["arith"]["exact_match"], "arith_by_op": results["arith"]["by_op"],
                      "code_line_exact_match": results["code_line"]["exact_match"], "quick_eval": args.quick_eval}
    save()  # the state's leg log carries the results too

    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    stride = max(1, len(progress.curve) // 40)
    report = {
        "preset": args.preset, "description": PRESETS[args.preset].description,
        "command": leg["command"],
        "config": config_summary(model.config), "parameters": params, "weights_dtype": "bfloat16",
        "context": CONTEXT, "batch": leg["batch"],
        "optimizer": {"name": "AdamW", "peak_lr": leg["peak_lr"], "final_lr": leg["peak_lr"] * FINAL_LR_FRACTION,
                      "schedule": "per leg: linear warmup, then cosine to final_lr (warm restarts)",
                      "warmup_steps": leg["warmup_steps"], "weight_decay": WEIGHT_DECAY, "grad_clip": GRAD_CLIP},
        "threads": args.threads,
        "minutes": round(sum(item["minutes"] for item in progress.legs), 2), "steps": progress.step,
        "tokens_seen": progress.tokens,
        "final_train_ce": progress.curve[-1][1] if progress.curve else None,
        "train_ce_curve": progress.curve[::stride],
        "legs": progress.legs,
        "total_wall_minutes_this_leg": round((time.monotonic() - wall) / 60, 2),
        "checkpoint_megabytes": round(size / 2**20, 2),
        **results,
    }
    (args.out / "training_report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("train_ce_curve", "router", "legs")}, indent=1))
    return report


if __name__ == "__main__":
    main()
