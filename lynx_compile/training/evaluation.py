"""What a training report measures: held-out losses, greedy arithmetic and next-line exact match,
code-token accuracy, and router statistics (load balance, experts touched by decode-like batches)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lynx_compile.eval import corpora, decode, tasks
from lynx_compile.training.data import (CONTEXT, EVAL_ARITH_SEQS, EVAL_CODE_WINDOWS, heldout_arith_sequences,
                                        heldout_code_windows)
from lynx_compile.training.loop import cross_entropy


ARITH_EVAL_PROBLEMS = 500
CODE_LINE_PROBLEMS = 200
CODE_LINE_MAX_NEW_TOKENS = 64
DECODE_BATCH = 16
DECODE_BATCH_SAMPLES = 500


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
