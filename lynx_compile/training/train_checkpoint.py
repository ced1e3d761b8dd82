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

Each leg is one cosine cycle from ``--peak-lr`` (a warm restart). ``--init-from CHECKPOINT`` starts a
new run from saved weights (e.g. a shipped checkpoint) with a fresh optimizer and schedule. An
interrupted leg exports nothing; a finished one exports and evaluates.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import random
import re
import signal
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from lynx_compile.eval import corpora, decode, tasks
from lynx_compile.eval.tasks import encode
from lynx_compile.lowering.kernels.choice import cpu_features
from lynx_compile.training import state

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
RESUME_WARMUP_STEPS = 25  # a resumed leg keeps Adam's moments: a short warmup is enough
TRAIN_EXPERTS_IMPLEMENTATION = "grouped_mm"
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
    backbone: dict = field(default_factory=dict)  # overrides of _BACKBONE


PRESETS = {
    "coarse": Preset("Mixtral-style MoE: 8 experts (intermediate 384), top-2",
                     transformers.MixtralConfig,
                     dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=384)),
    "fine": Preset("Qwen3-MoE fine-grained MoE: 32 experts (intermediate 96), top-4, norm_topk_prob=True",
                   transformers.Qwen3MoeConfig,
                   dict(num_experts=32, num_experts_per_tok=4, moe_intermediate_size=96,
                        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])),
    # Seconds per step: for tests and smoke runs of the training pipeline, not for shipping.
    "tiny": Preset("tiny Mixtral-style MoE for tests: 2 layers, hidden 64, 4 experts (intermediate 64), top-2",
                   transformers.MixtralConfig,
                   dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64),
                   dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16)),
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

    def __init__(self, tokenizer, seed: int, code_seqs: int = CODE_SEQS_PER_BATCH,
                 arith_seqs: int = ARITH_SEQS_PER_BATCH):
        self.tokenizer = tokenizer
        self.code_seqs, self.arith_seqs = code_seqs, arith_seqs
        self.code = code_stream(tokenizer, "train")
        self.generator = torch.Generator().manual_seed(seed)
        self.arith = corpora.arith_stream("train", seed)

    def __next__(self) -> torch.Tensor:
        starts = torch.randint(0, len(self.code) - CONTEXT, (self.code_seqs,), generator=self.generator)
        code = [self.code[s:s + CONTEXT] for s in starts.tolist()]
        arith = [torch.tensor(pack_arith(self.tokenizer, [next(self.arith) for _ in range(ARITH_PROBLEMS_PER_SEQ)])[0])
                 for _ in range(self.arith_seqs)]
        return torch.stack(code + arith)


def heldout_code_windows(tokenizer, count: int = EVAL_CODE_WINDOWS) -> torch.Tensor:
    """``count`` non-overlapping windows spread evenly over the held-out code stream."""
    stream = code_stream(tokenizer, "heldout")
    count = min(count, len(stream) // CONTEXT)
    stride = len(stream) // count
    return torch.stack([stream[i * stride:i * stride + CONTEXT] for i in range(count)])


def heldout_arith_sequences(tokenizer, count: int = EVAL_ARITH_SEQS) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` packed held-out arithmetic sequences and their answer-token mask."""
    problems = corpora.arith_problems("heldout", count * ARITH_PROBLEMS_PER_SEQ, seed=1)
    packed = [pack_arith(tokenizer, problems[i:i + ARITH_PROBLEMS_PER_SEQ])
              for i in range(0, len(problems), ARITH_PROBLEMS_PER_SEQ)]
    return torch.tensor([ids for ids, _ in packed]), torch.tensor([mask for _, mask in packed])


# ----------------------------------------------------------------------------- model and training


def build_config(preset: str, tokenizer) -> transformers.PreTrainedConfig:
    spec = PRESETS[preset]
    config = spec.config_class(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                               **{**_BACKBONE, **spec.backbone}, **spec.moe_args)
    # Measured on a 2-core CPU (fp32, training): grouped_mm ~1.1 s/step, eager ~2x slower,
    # batched_mm runs out of memory (it gathers one weight copy per token).
    config._experts_implementation = TRAIN_EXPERTS_IMPLEMENTATION
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


def learning_rate(step: int, progress: float, peak_lr: float = PEAK_LR, warmup_steps: int = WARMUP_STEPS) -> float:
    """Linear warmup over steps, then cosine from ``peak_lr`` to FINAL_LR_FRACTION * peak_lr over progress.

    ``step`` and ``progress`` count within one leg: each leg is one warm restart (SGDR, Loshchilov &
    Hutter 2017), so a leg's budget need not be known when the first leg starts.
    """
    warmup = min(1.0, (step + 1) / warmup_steps)
    cosine = FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return peak_lr * warmup * cosine


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


@dataclass(frozen=True)
class LegPlan:
    """What one leg of training runs: its budget and its learning-rate cycle."""

    minutes: float  # wall-clock budget of the training loop
    steps: int | None  # a fixed step count instead (exactly repeatable), or None
    peak_lr: float
    warmup_steps: int
    max_threads: int
    save_every_minutes: float  # periodic saves, so a killed leg loses at most this much


def train(model, optimizer, batches: TrainBatches, plan: LegPlan, progress: state.Progress, leg: dict,
          save=lambda: None, should_stop=lambda: False) -> None:
    """Run one leg: until its budget is used or ``should_stop()``; updates ``progress`` and ``leg``.

    ``save()`` is called every ``plan.save_every_minutes``; the caller saves once more at the end.
    """
    threads = ThreadTuner(plan.max_threads)
    config = model.config
    num_experts = getattr(config, "num_local_experts", None) or config.num_experts
    model.train()
    start = last_save = time.monotonic()
    leg_steps, leg_tokens, recent = 0, 0, []
    while True:
        elapsed = time.monotonic() - start
        fraction = leg_steps / plan.steps if plan.steps else elapsed / (60 * plan.minutes)
        if fraction >= 1.0:
            leg["status"] = "finished"
            break
        if should_stop():
            leg["status"] = "interrupted"
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(leg_steps, fraction, plan.peak_lr, plan.warmup_steps)
        step_start = time.monotonic()
        input_ids = next(batches)
        out = model(input_ids=input_ids, output_router_logits=True)
        ce = cross_entropy(out.logits, input_ids)
        aux = balance_loss(out.router_logits, num_experts, config.num_experts_per_tok)
        (ce + config.router_aux_loss_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        leg_steps, leg_tokens = leg_steps + 1, leg_tokens + input_ids.numel()
        progress.step, progress.tokens = progress.step + 1, progress.tokens + input_ids.numel()
        threads.record(time.monotonic() - step_start)
        recent.append(ce.item())
        leg.update(steps=leg_steps, tokens=leg_tokens, minutes=round((time.monotonic() - start) / 60, 2),
                   steps_by_threads={str(n): count for n, count in threads.steps.items()})
        if progress.step % LOG_EVERY == 0:
            mean_ce = sum(recent) / len(recent)
            progress.curve.append([progress.step, round(mean_ce, 4)])
            recent = []
            print(f"step {progress.step:6d}  leg {leg['leg']} {elapsed / 60:5.1f} min  "
                  f"lr {optimizer.param_groups[0]['lr']:.2e}  ce {mean_ce:.4f}  balance {aux.item():.3f}  "
                  f"{leg_tokens / max(elapsed, 1e-9):.0f} tok/s  {torch.get_num_threads()} threads", flush=True)
        if time.monotonic() - last_save >= 60 * plan.save_every_minutes:
            save()
            last_save = time.monotonic()


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def token_losses(model, input_ids: torch.Tensor,
                 batch: int = 16) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Teacher-forced next-token results for ``input_ids`` (B, T).

    Returns per-target cross entropy (B, T-1) in nats, whether the greedy (argmax) prediction is the
    target (B, T-1) bool, and each layer's router logits (B*T, E).
    """
    losses, hits, router = [], [], []
    for chunk in input_ids.split(batch):
        out = model(input_ids=chunk, output_router_logits=True)
        losses.append(cross_entropy(out.logits, chunk, reduction="none"))
        hits.append(out.logits[:, :-1].argmax(-1) == chunk[:, 1:])
        router.append([layer.float() for layer in out.router_logits])
    return torch.cat(losses), torch.cat(hits), [torch.cat(layers) for layers in zip(*router)]


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


def arith_exact_match(model, tokenizer, count: int = ARITH_EVAL_PROBLEMS) -> dict:
    problems = tasks.arith_problems(tokenizer, count)
    outputs = decode.generate_lines(model, tokenizer, problems, batch=100, max_new_tokens=tasks.ARITH_MAX_NEW_TOKENS)
    by_op: dict[str, list[bool]] = {op: [] for op in corpora.ARITH_OPS}
    for problem, output in zip(problems, outputs):
        op = re.fullmatch(r"\d+(\D)\d+=", tokenizer.decode(problem.prompt_ids, skip_special_tokens=True)).group(1)
        by_op[op].append(tasks.is_correct("arith", output, problem.expected))
    hits = [hit for results in by_op.values() for hit in results]
    return {"problems": len(hits), "exact_match": round(sum(hits) / len(hits), 4),
            "by_op": {op: round(sum(r) / len(r), 4) for op, r in by_op.items() if r}}


def code_line_exact_match(model, tokenizer, count: int = CODE_LINE_PROBLEMS) -> dict:
    problems = tasks.code_line_problems(tokenizer, count, CONTEXT, CODE_LINE_MAX_NEW_TOKENS)
    outputs = decode.generate_lines(model, tokenizer, problems, batch=50, max_new_tokens=CODE_LINE_MAX_NEW_TOKENS)
    hits = sum(tasks.is_correct("code-line", output, problem.expected) for output, problem in zip(outputs, problems))
    return {"problems": len(problems), "exact_match": round(hits / len(problems), 4),
            "prompt_tokens_max": CONTEXT - CODE_LINE_MAX_NEW_TOKENS}


@dataclass(frozen=True)
class EvalSizes:
    """How much held-out data the end-of-leg evaluation reads."""

    code_windows: int = EVAL_CODE_WINDOWS
    arith_sequences: int = EVAL_ARITH_SEQS
    arith_problems: int = ARITH_EVAL_PROBLEMS
    code_line_problems: int = CODE_LINE_PROBLEMS


QUICK_EVAL = EvalSizes(code_windows=16, arith_sequences=4, arith_problems=60, code_line_problems=20)


def evaluate(model, tokenizer, sizes: EvalSizes = EvalSizes()) -> dict:
    model.eval()
    code_losses, code_hits, code_router = token_losses(model, heldout_code_windows(tokenizer, sizes.code_windows))
    arith_ids, answer_mask = heldout_arith_sequences(tokenizer, sizes.arith_sequences)
    arith_losses, _, arith_router = token_losses(model, arith_ids)
    answer_losses = arith_losses[answer_mask[:, 1:]]
    return {
        "heldout_code_ce": round(code_losses.mean().item(), 4),
        # the code-token metric: greedy next-token accuracy, teacher-forced, on held-out code
        "heldout_code_token_accuracy": round(code_hits.float().mean().item(), 4),
        "heldout_arith_ce_all_tokens": round(arith_losses.mean().item(), 4),
        "heldout_arith_ce_answer_tokens": round(answer_losses.mean().item(), 4),
        "arith": arith_exact_match(model, tokenizer, sizes.arith_problems),
        "code_line": code_line_exact_match(model, tokenizer, sizes.code_line_problems),
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
