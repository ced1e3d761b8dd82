"""Batch-aware expert selection (Lynx AffinityBinning), written in plain torch ops.

This is the body of `lynx::batch_select`. It is traced into the post-grad graph (see
`expand_batch_select.py`), so every line here becomes an aten op that Inductor generates code
for; sorts and top-k over the tiny (tokens x experts) matrices stay library calls.

Legend: T tokens in the batch, E routed experts, k experts per token.

Two layers, so that every policy keeps the same promises:

`select_experts` (the contract, any policy):
  - a token is *usable* when at least k experts are eligible for it (score > -inf; DeepSeek's
    group limit masks the rest) and its eligible scores and logits are finite. Rows that are not
    usable (NaN, +inf, too few eligible experts) get exactly the plain top-k and never vote.
  - a *voter* is a usable token that is live (`live`: rows the caller marks dead, e.g. finished
    or padding rows of a decode batch, never vote and never change a live row's choice).
  - the policy names the experts the batch may use (the surviving set), from the voters alone;
    each voter takes its k best eligible survivors (by its own scores, sorted like top-k).
  - invariant: if the voters would then use more distinct experts than their plain top-k, they
    take their plain top-k instead (a selection never reads more experts than routing would).
  - dead usable rows take their k best experts among those the voters already load, topped up
    with their own next-best eligible ones (which are then in their own top-k), so they add no
    expert a live row or their own top-k does not already need.
  Values are `scores` gathered at the chosen indices, so whatever the model does after its top-k
  (renormalize, softmax over the k values, scale) recomputes the routing weights unchanged.

`affinity_binning_survivors` (Lynx v3, arXiv 2411.08982, section 4 "AffinityBinning"):
  1. gap[t, e]    = z[t, e] - max_e' z[t, e']            router-logit gap, <= 0
  2. bin[t, e]    = -min(floor(alpha * |gap|), beta)    0 = within 1/alpha of the top-1
  3. score[e]     = sum_t V ** bin[t, e]                V voters; a bin-0 vote counts 1, each
     bin down 1/V; rank experts by score, ties by summed per-token rank (router evidence).
     Computed exactly, as a lexicographic order on integer vote counts per bin.
  4. keep the shortest prefix of that ranking such that, for every voter,
       - it holds k of the voter's eligible experts (so no voter needs an expert outside it;
         with group-limited routers this is what makes the set shrink at all),
       - it holds one of the voter's bin-0 experts (as good as its top-1, within one bin),
       - it holds the voter's top-1 if the voter is confident (second choice trails by more
         than confidence_gap logits).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

NO_DECODE_BOUND = -1  # decode_token_bound value meaning "every batch at this site is decode"

# (eligible (T, E) bool, voters (T,) bool, token_order (T, E): each token's experts, best first)
#   -> surviving experts (E,) bool
SurvivorsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def plain_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, indices = torch.topk(scores, k, dim=-1)
    return values, indices


def usable_rows(scores: torch.Tensor, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(eligible (T, E), usable (T,)): which experts a token may use; which tokens can be remapped."""
    eligible = scores > float("-inf")  # NaN compares False
    finite_scores = (torch.isfinite(scores) | (scores == float("-inf"))).all(dim=-1)
    finite_logits = (torch.isfinite(logits) | ~eligible).all(dim=-1)
    usable = (eligible.sum(dim=-1) >= k) & finite_scores & finite_logits
    return eligible, usable


def experts_used(indices: torch.Tensor, rows: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E,) bool: the experts that `indices` (T, k) uses in the rows where `rows` (T,) is True."""
    weight = rows.unsqueeze(1).expand(indices.shape).reshape(-1).to(torch.float32)  # (T*k,)
    hits = torch.zeros(num_experts, dtype=torch.float32, device=indices.device)
    return hits.scatter_add(0, indices.reshape(-1), weight) > 0


def _pick(scores: torch.Tensor, token_order: torch.Tensor, tiers: list[torch.Tensor], k: int) -> torch.Tensor:
    """(T, k) each token's k best experts, taking tier 0 first, then tier 1, ...; sorted by score.

    token_order: (T, E) each token's experts, best first; tiers: (T, E) bool masks; an expert in
    none of them comes last.
    """
    num_experts = scores.shape[1]
    tier = torch.full_like(token_order, len(tiers))  # (T, E), by expert
    for level in reversed(range(len(tiers))):
        tier = torch.where(tiers[level], level, tier)
    positions = torch.arange(num_experts, device=scores.device)
    sort_key = tier.gather(1, token_order) * num_experts + positions  # (T, E) distinct per row
    slots = torch.topk(sort_key, k, dim=-1, largest=False, sorted=True).indices  # (T, k)
    indices = token_order.gather(1, slots)  # (T, k)
    by_score = torch.sort(scores.gather(1, indices), dim=-1, descending=True, stable=True).indices
    return indices.gather(1, by_score)


def select_experts(scores: torch.Tensor, logits: torch.Tensor, k: int, survivors: SurvivorsFn,
                   live: torch.Tensor | None = None,
                   plain_indices: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Remap a decode batch onto the experts `survivors` keeps, under the contract above.

    scores: (T, E) what the model's top-k ranks (-inf: ineligible); logits: (T, E) router logits;
    live: (T,) bool or None (every row live); plain_indices: `torch.topk(scores, k).indices` if
    the caller has it. Returns values (T, k) in scores' dtype and indices (T, k) int64, like
    `torch.topk(scores, k)`.
    """
    num_experts = scores.shape[1]
    eligible, usable = usable_rows(scores, logits, k)
    voters = usable if live is None else usable & live.to(torch.bool)
    if plain_indices is None:
        plain_indices = torch.topk(scores, k, dim=-1).indices  # (T, k)
    token_order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # (T, E)

    surviving = survivors(eligible, voters, token_order)  # (E,)
    picked = _pick(scores, token_order, [surviving & eligible, eligible], k)  # (T, k)
    grows = experts_used(picked, voters, num_experts).sum() > experts_used(plain_indices, voters, num_experts).sum()
    voter_indices = torch.where(grows, plain_indices, picked)

    loaded = experts_used(voter_indices, voters, num_experts)  # (E,)
    dead_indices = _pick(scores, token_order, [loaded & eligible, eligible], k)
    indices = torch.where(voters.unsqueeze(1), voter_indices,
                          torch.where(usable.unsqueeze(1), dead_indices, plain_indices))
    return scores.gather(1, indices), indices


def affinity_binning_survivors(scores: torch.Tensor, logits: torch.Tensor, k: int, alpha: float, beta: int,
                               confidence_gap: float) -> SurvivorsFn:
    """The surviving-set rule of AffinityBinning (steps 1-4 of the module docstring)."""

    def survivors(eligible: torch.Tensor, voters: torch.Tensor, token_order: torch.Tensor) -> torch.Tensor:
        # (T, E) bool, (T,) bool, (T, E) int64 -> (E,) bool
        num_experts = scores.shape[1]
        voting = eligible & voters.unsqueeze(1)  # (T, E)
        z = logits.float().masked_fill(~voting, float("-inf"))  # (T, E); non-voters: all -inf
        gap = z - z.amax(dim=-1, keepdim=True)  # (T, E) <= 0 where voting
        bins = -torch.clamp(torch.floor(-alpha * gap), max=beta)
        bins = bins.masked_fill(~voting, -beta)  # (T, E) in [-beta, 0]

        # Step 3, exactly: rank experts lexicographically by their count of bin-0 votes, then of
        # bin -1 votes, ..., then by summed per-token rank (the router's own evidence, lower is
        # better). This is the order sum_t V ** bin[t, e] gives whenever one bin-0 vote outweighs
        # all V votes a bin lower, computed on integers: no float sum whose rounding (and so the
        # order of near-ties) would depend on the reduction order, eager or Inductor, CPU or GPU.
        level = (-bins).to(torch.int64)  # (T, E) in [0, beta]
        token_rank = torch.empty_like(token_order).scatter_(
            1, token_order, torch.arange(num_experts, device=scores.device).expand_as(token_order))  # (T, E)
        ranking = torch.sort(torch.where(voting, token_rank, 0).sum(dim=0), stable=True).indices  # (E,)
        for bin_level in reversed(range(beta + 1)):  # least significant key first; stable sorts
            votes = (voting & (level == bin_level)).sum(dim=0)  # (E,) int64
            ranking = ranking[torch.sort(votes[ranking], descending=True, stable=True).indices]
        positions = torch.arange(num_experts, device=scores.device)
        rank_of = torch.empty_like(ranking).scatter_(0, ranking, positions)  # (E,)

        # Step 4: the last rank each voter needs, then the shortest prefix covering all of them.
        eligible_ranks = torch.where(eligible, rank_of, num_experts)  # (T, E)
        kth_eligible_rank = torch.topk(eligible_ranks, k, dim=-1, largest=False, sorted=True).values[:, -1]
        best_bin0_rank = torch.where(voting & (bins == 0), rank_of, num_experts).amin(dim=-1)  # (T,)
        top2 = torch.topk(z, 2, dim=-1).values  # (T, 2)
        confident = voters & ((top2[:, 0] - top2[:, 1]) > confidence_gap)  # (T,)
        top1_rank = rank_of[scores.argmax(dim=-1)]  # (T,)
        needed = torch.maximum(torch.maximum(kth_eligible_rank, best_bin0_rank),
                               torch.where(confident, top1_rank, -1))  # (T,)
        needed = torch.where(voters, needed, -1)
        keep = torch.cat([needed, needed.new_full((1,), k - 1)]).amax() + 1  # () >= k; T = 0 safe
        return rank_of < keep

    return survivors


def affinity_binning(
    scores: torch.Tensor,  # (T, E) what the model's top-k ranks; -inf marks ineligible experts
    logits: torch.Tensor,  # (T, E) router logits (affinity in logit space)
    k: int,
    alpha: float,
    beta: int,
    confidence_gap: float,
    live: torch.Tensor | None = None,  # (T,) bool: rows allowed to vote; None = all
    plain_indices: torch.Tensor | None = None,  # (T, k) torch.topk(scores, k).indices, if at hand
) -> tuple[torch.Tensor, torch.Tensor]:
    survivors = affinity_binning_survivors(scores, logits, k, alpha, beta, confidence_gap)
    return select_experts(scores, logits, k, survivors, live, plain_indices)


def batch_select(
    scores: torch.Tensor,  # (T, E)
    logits: torch.Tensor,  # (T, E)
    k: int,
    alpha: float,
    beta: int,
    confidence_gap: float,
    decode_token_bound: int,
    live: torch.Tensor | None = None,  # (T,) bool or None
) -> tuple[torch.Tensor, torch.Tensor]:
    """AffinityBinning on decode batches, plain top-k otherwise.

    decode_token_bound: NO_DECODE_BOUND when the compiler proved this site only sees decode
    batches; otherwise a batch of T tokens is decode iff T <= decode_token_bound. The test is
    done on tensors so that a symbolic T never turns into a guard (and a recompile).
    """
    plain_values, plain_indices = plain_topk(scores, k)
    values, indices = affinity_binning(scores, logits, k, alpha, beta, confidence_gap, live, plain_indices)
    if isinstance(decode_token_bound, int) and decode_token_bound == NO_DECODE_BOUND:
        return values, indices
    num_tokens = scores.new_full((), scores.shape[0], dtype=torch.int64)
    is_decode = num_tokens <= decode_token_bound  # () bool tensor
    return (torch.where(is_decode, values, plain_values),
            torch.where(is_decode, indices, plain_indices))
