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
   greedy decoding, and router statistics (expert load balance, experts touched by decode-like
   batches of 16 tokens).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from lynx_compile.eval import corpora, decode, tasks
from lynx_compile.eval.tasks import encode

CONTEXT = 256
VOCAB_SIZE = 4096
EOS = "<|endoftext|>"  # also the BOS token: it starts every document and arithmetic sequence
PAD = "<|pad|>"
CODE_SEQS_PER_BATCH = 12  # code windows per optimizer step
ARITH_SEQS_PER_BATCH = 8  # packed arithmetic sequences per optimizer step (60/40 by sequences)
TOKENIZER_ARITH_LINES = 50_000
ARITH_PROBLEMS_PER_SEQ = 48  # enough to fill CONTEXT: a line is at least 6 tokens ("1+2=3\n")

PEAK_LR = 2e-3
FINAL_LR_FRACTION = 0.1
WARMUP_STEPS = 100
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0
LOG_EVERY = 25

EVAL_CODE_WINDOWS = 200
EVAL_ARITH_SEQS = 48
ARITH_EVAL_PROBLEMS = 500
CODE_LINE_PROBLEMS = 200
CODE_LINE_MAX_NEW_TOKENS = 64
DECODE_BATCH = 16
DECODE_BATCH_SAMPLES = 500

# Shared backbone: 4 layers, hidden 256, 8 query heads of 32, 4 KV heads, tied embeddings.
_BACKBONE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                 head_dim=32, max_position_embeddings=CONTEXT, tie_word_embeddings=True,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                 output_router_logits=True, router_aux_loss_coef=0.02)


@dataclass(frozen=True)
class Preset:
    description: str
    config_class: type
    moe_args: dict


PRESETS = {
    "coarse": Preset("Mixtral-style MoE: 8 experts (intermediate 384), top-2",
                     transformers.MixtralConfig,
                     dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=384)),
    "fine": Preset("Qwen3-MoE fine-grained MoE: 32 experts (intermediate 96), top-4, norm_topk_prob=True",
                   transformers.Qwen3MoeConfig,
                   dict(num_experts=32, num_experts_per_tok=4, moe_intermediate_size=96,
                        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])),
}


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(seed: int) -> transformers.PreTrainedTokenizerFast:
    """Byte-level BPE over the training split; digits and newlines are always single tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = corpora.code_texts("train") + corpora.arith_lines("train", TOKENIZER_ARITH_LINES, seed)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, pad_token=PAD, add_bos_token=True,
        padding_side="left", model_max_length=CONTEXT)


# ----------------------------------------------------------------------------- data


def code_stream(tokenizer, split: str) -> torch.Tensor:
    """All files of a code split as one token stream, each file preceded by EOS."""
    ids = []
    for file_ids in encode(tokenizer, corpora.code_texts(split)):
        ids.append(tokenizer.eos_token_id)
        ids.extend(file_ids)
    return torch.tensor(ids, dtype=torch.long)


def pack_arith(tokenizer, problems: list[tuple[str, str]]) -> tuple[list[int], list[bool]]:
    """EOS followed by ``prompt answer \\n`` lines, cut to CONTEXT; also marks answer tokens.

    Prompt and answer are encoded separately, exactly as an evaluation prompt is.
    """
    encoded = encode(tokenizer, [text for prompt, answer in problems for text in (prompt, answer + "\n")])
    ids, is_answer = [tokenizer.eos_token_id], [False]
    for prompt_ids, answer_ids in zip(encoded[::2], encoded[1::2]):
        ids += prompt_ids + answer_ids
        is_answer += [False] * len(prompt_ids) + [True] * len(answer_ids)
    if len(ids) < CONTEXT:
        raise ValueError(f"{len(problems)} problems make only {len(ids)} tokens")
    return ids[:CONTEXT], is_answer[:CONTEXT]


class TrainBatches:
    """Seeded training batches: random code windows plus packed arithmetic sequences."""

    def __init__(self, tokenizer, seed: int):
        self.tokenizer = tokenizer
        self.code = code_stream(tokenizer, "train")
        self.generator = torch.Generator().manual_seed(seed)
        self.arith = corpora.arith_stream("train", seed)

    def __next__(self) -> torch.Tensor:
        starts = torch.randint(0, len(self.code) - CONTEXT, (CODE_SEQS_PER_BATCH,), generator=self.generator)
        code = [self.code[s:s + CONTEXT] for s in starts.tolist()]
        arith = [torch.tensor(pack_arith(self.tokenizer, [next(self.arith) for _ in range(ARITH_PROBLEMS_PER_SEQ)])[0])
                 for _ in range(ARITH_SEQS_PER_BATCH)]
        return torch.stack(code + arith)


def heldout_code_windows(tokenizer) -> torch.Tensor:
    """``EVAL_CODE_WINDOWS`` non-overlapping windows spread evenly over the held-out code stream."""
    stream = code_stream(tokenizer, "heldout")
    count = min(EVAL_CODE_WINDOWS, len(stream) // CONTEXT)
    stride = len(stream) // count
    return torch.stack([stream[i * stride:i * stride + CONTEXT] for i in range(count)])


def heldout_arith_sequences(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed held-out arithmetic sequences and their answer-token mask."""
    problems = corpora.arith_problems("heldout", EVAL_ARITH_SEQS * ARITH_PROBLEMS_PER_SEQ, seed=1)
    packed = [pack_arith(tokenizer, problems[i:i + ARITH_PROBLEMS_PER_SEQ])
              for i in range(0, len(problems), ARITH_PROBLEMS_PER_SEQ)]
    return torch.tensor([ids for ids, _ in packed]), torch.tensor([mask for _, mask in packed])


# ----------------------------------------------------------------------------- model and training


def build_config(preset: str, tokenizer) -> transformers.PreTrainedConfig:
    spec = PRESETS[preset]
    config = spec.config_class(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                               **_BACKBONE, **spec.moe_args)
    # Measured on a 2-core CPU (fp32, training): grouped_mm ~1.1 s/step, eager ~2x slower,
    # batched_mm runs out of memory (it gathers one weight copy per token).
    config._experts_implementation = "grouped_mm"
    return config


def make_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=PEAK_LR, betas=(0.9, 0.95))


def cross_entropy(logits: torch.Tensor, input_ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross entropy; with ``reduction="none"`` shaped (B, T-1)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:],
                                             reduction=reduction)


def balance_loss(router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int) -> torch.Tensor:
    """The Switch-Transformer load-balancing loss of each MoE layer, averaged over layers.

    Uses transformers' own ``load_balancing_loss_func`` one layer at a time: given all layers at
    once it pools their statistics before taking the product, which does not balance each layer.
    Equals ``top_k`` when a layer's routing is perfectly balanced.
    """
    losses = [load_balancing_loss_func((logits,), num_experts, top_k) for logits in router_logits]
    return torch.stack(losses).mean()


def learning_rate(step: int, progress: float) -> float:
    """Linear warmup over steps, then cosine from PEAK_LR to FINAL_LR_FRACTION * PEAK_LR over progress."""
    warmup = min(1.0, (step + 1) / WARMUP_STEPS)
    cosine = FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return PEAK_LR * warmup * cosine


class ThreadTuner:
    """Chooses 1 or ``max_threads`` intra-op threads by measured step time.

    With other work on a 2-core machine, 2 threads can be twice as slow as 1 (each parallel op
    waits for its descheduled half). Every ``period`` steps the other setting runs for ``probe``
    steps, and the faster of the two (median step time over ``probe`` steps) is kept.
    """

    def __init__(self, max_threads: int, period: int = 50, probe: int = 5):
        self.choices = sorted({1, max_threads})
        self.period, self.probe = period, probe
        self.times: dict[int, list[float]] = {n: [] for n in self.choices}
        self.steps = {n: 0 for n in self.choices}
        torch.set_num_threads(max_threads)

    def record(self, seconds: float) -> None:
        threads = torch.get_num_threads()
        self.times[threads] = (self.times[threads] + [seconds])[-self.probe:]
        self.steps[threads] += 1
        if len(self.choices) == 1:
            return
        phase = sum(self.steps.values()) % self.period
        if phase == self.period - self.probe:
            torch.set_num_threads(next(n for n in self.choices if n != threads))
        elif phase == 0:
            torch.set_num_threads(min(self.choices, key=lambda n: statistics.median(self.times[n])))


def train(model, batches: TrainBatches, minutes: float, steps: int | None, max_threads: int) -> dict:
    """Train until the time budget (or the fixed step count) is used; return a summary."""
    optimizer = make_optimizer(model)
    threads = ThreadTuner(max_threads)
    config = model.config
    num_experts = getattr(config, "num_local_experts", None) or config.num_experts
    model.train()
    start, step, tokens, curve, recent = time.monotonic(), 0, 0, [], []
    while True:
        elapsed = time.monotonic() - start
        progress = step / steps if steps else elapsed / (60 * minutes)
        if progress >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, progress)
        step_start = time.monotonic()
        input_ids = next(batches)
        out = model(input_ids=input_ids, output_router_logits=True)
        ce = cross_entropy(out.logits, input_ids)
        aux = balance_loss(out.router_logits, num_experts, config.num_experts_per_tok)
        (ce + config.router_aux_loss_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step, tokens = step + 1, tokens + input_ids.numel()
        threads.record(time.monotonic() - step_start)
        recent.append(ce.item())
        if step % LOG_EVERY == 0:
            mean_ce = sum(recent) / len(recent)
            curve.append([step, round(mean_ce, 4)])
            recent = []
            print(f"step {step:5d}  {elapsed / 60:5.1f} min  lr {optimizer.param_groups[0]['lr']:.2e}  "
                  f"ce {mean_ce:.4f}  balance {aux.item():.3f}  {tokens / max(elapsed, 1e-9):.0f} tok/s  "
                  f"{torch.get_num_threads()} threads", flush=True)
    stride = max(1, len(curve) // 20)
    return {"minutes": round((time.monotonic() - start) / 60, 2), "steps": step, "tokens_seen": tokens,
            "final_train_ce": curve[-1][1] if curve else None, "train_ce_curve": curve[::stride],
            "steps_by_threads": {str(n): count for n, count in threads.steps.items()}}


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def token_losses(model, input_ids: torch.Tensor, batch: int = 16) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per-target cross entropy (B, T-1) and each layer's router logits (B*T, E) for ``input_ids``."""
    losses, router = [], []
    for chunk in input_ids.split(batch):
        out = model(input_ids=chunk, output_router_logits=True)
        losses.append(cross_entropy(out.logits, chunk, reduction="none"))
        router.append([layer.float() for layer in out.router_logits])
    return torch.cat(losses), [torch.cat(layers) for layers in zip(*router)]


def router_stats(code_logits: list[torch.Tensor], arith_logits: list[torch.Tensor], top_k: int) -> dict:
    """Expert load balance and distinct experts per decode-like batch, per layer, on held-out tokens."""
    generator = torch.Generator().manual_seed(0)
    layers = []
    for code, arith in zip(code_logits, arith_logits):
        num_experts = code.shape[-1]
        logits = torch.cat([code, arith])
        chosen = logits.topk(top_k, dim=-1).indices
        load = torch.bincount(chosen.flatten(), minlength=num_experts).float() / chosen.numel()
        code_load = torch.bincount(code.topk(top_k, dim=-1).indices.flatten(), minlength=num_experts).float()
        arith_load = torch.bincount(arith.topk(top_k, dim=-1).indices.flatten(), minlength=num_experts).float()
        rows = torch.stack([torch.randperm(len(chosen), generator=generator)[:DECODE_BATCH]
                            for _ in range(DECODE_BATCH_SAMPLES)])
        distinct = [len(torch.unique(chosen[r])) for r in rows]
        top_mass = logits.softmax(-1).topk(top_k, dim=-1).values.sum(-1).mean()
        layers.append({
            "expert_load": [round(x, 4) for x in load.tolist()],
            "load_max_over_min": round((load.max() / load.min().clamp_min(1e-9)).item(), 3),
            "load_cv": round((load.std(unbiased=False) / load.mean()).item(), 3),
            "code_vs_arith_load_tv_distance": round(
                0.5 * (code_load / code_load.sum() - arith_load / arith_load.sum()).abs().sum().item(), 3),
            "mean_top_k_prob_mass": round(top_mass.item(), 3),
            "decode16_mean_distinct_experts": round(sum(distinct) / len(distinct), 2),
        })
    num_experts = code_logits[0].shape[-1]
    return {"tokens": len(code_logits[0]) + len(arith_logits[0]), "num_experts": num_experts, "top_k": top_k,
            "uniform_top_k_prob_mass": round(top_k / num_experts, 3),
            "decode16_uniform_expectation": round(num_experts * (1 - (1 - top_k / num_experts) ** DECODE_BATCH), 2),
            "layers": layers}


def arith_exact_match(model, tokenizer) -> dict:
    problems = tasks.arith_problems(tokenizer, ARITH_EVAL_PROBLEMS)
    outputs = decode.generate_lines(model, tokenizer, problems, batch=100, max_new_tokens=tasks.ARITH_MAX_NEW_TOKENS)
    by_op: dict[str, list[bool]] = {op: [] for op in corpora.ARITH_OPS}
    for problem, output in zip(problems, outputs):
        op = re.fullmatch(r"\d+(\D)\d+=", tokenizer.decode(problem.prompt_ids, skip_special_tokens=True)).group(1)
        by_op[op].append(tasks.is_correct("arith", output, problem.expected))
    hits = [hit for results in by_op.values() for hit in results]
    return {"problems": len(hits), "exact_match": round(sum(hits) / len(hits), 4),
            "by_op": {op: round(sum(r) / len(r), 4) for op, r in by_op.items() if r}}


def code_line_exact_match(model, tokenizer) -> dict:
    problems = tasks.code_line_problems(tokenizer, CODE_LINE_PROBLEMS, CONTEXT, CODE_LINE_MAX_NEW_TOKENS)
    outputs = decode.generate_lines(model, tokenizer, problems, batch=50, max_new_tokens=CODE_LINE_MAX_NEW_TOKENS)
    hits = sum(tasks.is_correct("code-line", output, problem.expected) for output, problem in zip(outputs, problems))
    return {"problems": len(problems), "exact_match": round(hits / len(problems), 4),
            "prompt_tokens_max": CONTEXT - CODE_LINE_MAX_NEW_TOKENS}


def evaluate(model, tokenizer) -> dict:
    model.eval()
    code_losses, code_router = token_losses(model, heldout_code_windows(tokenizer))
    arith_ids, answer_mask = heldout_arith_sequences(tokenizer)
    arith_losses, arith_router = token_losses(model, arith_ids)
    answer_losses = arith_losses[answer_mask[:, 1:]]
    return {
        "heldout_code_ce": round(code_losses.mean().item(), 4),
        "heldout_arith_ce_all_tokens": round(arith_losses.mean().item(), 4),
        "heldout_arith_ce_answer_tokens": round(answer_losses.mean().item(), 4),
        "arith": arith_exact_match(model, tokenizer),
        "code_line": code_line_exact_match(model, tokenizer),
        "router": router_stats(code_router, arith_router, model.config.num_experts_per_tok),
    }


# ----------------------------------------------------------------------------- main


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=50.0, help="training-loop wall-clock budget")
    parser.add_argument("--steps", type=int, default=None, help="fixed step count (overrides --minutes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="most intra-op threads (see ThreadTuner)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    wall = time.monotonic()

    tokenizer = train_tokenizer(args.seed)
    config = build_config(args.preset, tokenizer)
    model = transformers.AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.preset}: {PRESETS[args.preset].description}; {params / 1e6:.2f}M parameters", flush=True)
    batches = TrainBatches(tokenizer, args.seed)
    print(f"setup {time.monotonic() - wall:.0f} s; code train stream {len(batches.code)} tokens", flush=True)
    summary = train(model, batches, args.minutes, args.steps, args.threads)

    model.config.output_router_logits = False  # inference default; pass output_router_logits=True to get them
    model.to(torch.bfloat16).save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    # Evaluate what was shipped: the saved bf16 weights, computed in fp32 on the CPU.
    shipped = transformers.AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    shipped_tokenizer = transformers.AutoTokenizer.from_pretrained(args.out)
    results = evaluate(shipped, shipped_tokenizer)

    shown_out = "OUT" if args.out.is_absolute() else args.out.as_posix()  # never record this machine's paths
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    report = {
        "preset": args.preset, "description": PRESETS[args.preset].description,
        "command": f"python -m lynx_compile.training.train_checkpoint --preset {args.preset} --out {shown_out}"
                   + (f" --steps {args.steps}" if args.steps else f" --minutes {args.minutes:g}")
                   + f" --seed {args.seed}",
        "config": config_summary(config), "parameters": params, "weights_dtype": "bfloat16",
        "context": CONTEXT, "batch": {"code_sequences": CODE_SEQS_PER_BATCH, "arith_sequences": ARITH_SEQS_PER_BATCH},
        "optimizer": {"name": "AdamW", "peak_lr": PEAK_LR, "final_lr": PEAK_LR * FINAL_LR_FRACTION,
                      "warmup_steps": WARMUP_STEPS, "weight_decay": WEIGHT_DECAY, "grad_clip": GRAD_CLIP},
        "threads": args.threads, **summary,
        "total_wall_minutes": round((time.monotonic() - wall) / 60, 2),
        "checkpoint_megabytes": round(size / 2**20, 2),
        **results,
    }
    (args.out / "training_report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("train_ce_curve", "router")}, indent=1))


if __name__ == "__main__":
    main()
