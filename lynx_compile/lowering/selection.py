"""Batch-aware expert selection (Lynx AffinityBinning), written in plain torch ops.

This is the body of `lynx::batch_select`. It is traced into the post-grad graph (see
`expand_batch_select.py`), so every line here becomes an aten op that Inductor generates code
for; sorts and top-k over the tiny (tokens x experts) matrices stay library calls.

Legend: T tokens in the batch, E routed experts, k experts per token.

The algorithm, per routing site and decode batch:
  1. gap[t, e]    = z[t, e] - max_e' z[t, e']            router-logit gap, <= 0
  2. bin[t, e]    = -min(floor(alpha * |gap|), beta)    0 = within 1/alpha of the top-1
  3. score[e]     = sum_t T ** bin[t, e]                a bin-0 vote counts 1, each bin down 1/T
     rank experts by score (ties: by summed router probability, the router's own evidence)
  4. keep the shortest prefix of that ranking such that
       - it holds at least k experts (every token needs k distinct experts),
       - every token still has one of its bin-0 experts (an expert as good as its top-1,
         within one bin), and
       - every confident token (second choice trails by > confidence_gap) keeps its top-1.
  5. each token takes its k best experts by its own scores from the surviving set; if masking
     (e.g. DeepSeek's group limit) leaves it fewer than k eligible survivors, its remaining
     slots fall back to its own next-best eligible experts.
Values are `scores` gathered at the new indices, so whatever the model does after its top-k
(renormalize, softmax over the k values, scale) recomputes the routing weights unchanged.
"""

from __future__ import annotations

import torch

NO_DECODE_BOUND = -1  # decode_token_bound value meaning "every batch at this site is decode"


def plain_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, indices = torch.topk(scores, k, dim=-1)
    return values, indices


def affinity_binning(
    scores: torch.Tensor,  # (T, E) what the model's top-k ranks; -inf marks ineligible experts
    logits: torch.Tensor,  # (T, E) router logits (affinity in logit space)
    k: int,
    alpha: float,
    beta: int,
    confidence_gap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, num_experts = scores.shape
    eligible = scores > float("-inf")  # (T, E)

    # 1-2. affinity gap and its bin. Ineligible experts get no vote at all.
    z = logits.float().masked_fill(~eligible, float("-inf"))  # (T, E)
    gap = z - z.amax(dim=-1, keepdim=True)  # (T, E) <= 0
    bins = -torch.clamp(torch.floor(-alpha * gap), max=beta)  # (T, E) in [-beta, 0]
    bins = bins.masked_fill(~eligible, -beta)

    # 3. batch score: base T, so one token's bin-0 vote outweighs all T tokens' votes a bin lower.
    base = scores.new_full((), num_tokens, dtype=torch.float32)  # T, a tensor: no guard on T
    votes = torch.exp(bins * torch.log(base)).masked_fill(~eligible, 0.0)  # (T, E)
    batch_score = votes.sum(dim=0)  # (E,)
    router_mass = torch.softmax(z, dim=-1).nan_to_num(0.0).sum(dim=0)  # (E,)

    # Rank experts by (batch_score, router_mass), both descending: two stable sorts.
    by_mass = torch.sort(router_mass, descending=True, stable=True).indices  # (E,)
    by_score = torch.sort(batch_score[by_mass], descending=True, stable=True).indices  # (E,)
    ranking = by_mass[by_score]  # (E,) experts, best first
    positions = torch.arange(num_experts, device=scores.device)
    rank_of = torch.empty_like(ranking).scatter_(0, ranking, positions)  # (E,)

    # 4. shortest prefix satisfying the three constraints.
    in_bin0 = eligible & (bins == 0)  # (T, E)
    best_bin0_rank = torch.where(in_bin0, rank_of, num_experts).amin(dim=-1)  # (T,)
    top2 = torch.topk(z, 2, dim=-1).values  # (T, 2)
    confident = (top2[:, 0] - top2[:, 1]) > confidence_gap  # (T,)
    top1 = scores.argmax(dim=-1)  # (T,)
    confident_top1_rank = torch.where(confident, rank_of[top1], -1)  # (T,)
    keep = torch.maximum(best_bin0_rank.amax(), confident_top1_rank.amax()) + 1
    keep = torch.clamp(keep, min=k)
    surviving = rank_of < keep  # (E,)

    # 5. remap: walk each token's own preference order, survivors first.
    token_order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # (T, E)
    usable = surviving[token_order] & eligible.gather(1, token_order)  # (T, E)
    sort_key = torch.where(usable, positions, positions + num_experts)  # (T, E) distinct per row
    slots = torch.topk(sort_key, k, dim=-1, largest=False, sorted=True).indices  # (T, k)
    indices = token_order.gather(1, slots)  # (T, k)
    values = scores.gather(1, indices)  # (T, k)
    return values, indices


def batch_select(
    scores: torch.Tensor,  # (T, E)
    logits: torch.Tensor,  # (T, E)
    k: int,
    alpha: float,
    beta: int,
    confidence_gap: float,
    decode_token_bound: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AffinityBinning on decode batches, plain top-k otherwise.

    decode_token_bound: NO_DECODE_BOUND when the compiler proved this site only sees decode
    batches; otherwise a batch of T tokens is decode iff T <= decode_token_bound. The test is
    done on tensors so that a symbolic T never turns into a guard (and a recompile).
    """
    values, indices = affinity_binning(scores, logits, k, alpha, beta, confidence_gap)
    if isinstance(decode_token_bound, int) and decode_token_bound == NO_DECODE_BOUND:
        return values, indices
    plain_values, plain_indices = plain_topk(scores, k)
    num_tokens = scores.new_full((), scores.shape[0], dtype=torch.int64)
    is_decode = num_tokens <= decode_token_bound  # () bool tensor
    return (torch.where(is_decode, values, plain_values),
            torch.where(is_decode, indices, plain_indices))
