"""The contract every selection policy keeps, written in plain torch ops (`select_experts`).

Legend: T tokens in the batch, E routed experts, k experts per token.

`select_experts` (any policy):
  - a token is *usable* when at least k experts are eligible for it (score > -inf; DeepSeek's
    group limit masks the rest) and its eligible scores and logits are finite. Rows that are not
    usable (NaN, +inf, too few eligible experts) get exactly the plain top-k and never vote.
  - a *voter* is a usable token that is live (`live`: rows the caller marks dead, e.g. finished
    or padding rows of a decode batch, never vote and never change a live row's choice).
  - the policy states its preferences from the voters alone (`base.py`): a surviving set (E,)
    shared by every token, or tiers of (E,) / (T, E) masks, most preferred first; each voter
    takes its k best eligible experts tier by tier (by its own scores inside a tier), then any
    eligible expert; sorted like top-k.
  - invariant: if the voters would then use more distinct experts than their plain top-k, they
    take their plain top-k instead (a selection never reads more experts than routing would).
  - dead usable rows take their k best experts among those the voters already load, topped up
    with their own next-best eligible ones (which are then in their own top-k), so they add no
    expert a live row or their own top-k does not already need.
  Values are `scores` gathered at the chosen indices, so whatever the model does after its top-k
  (renormalize, softmax over the k values, scale) recomputes the routing weights unchanged.
  - zero-compute experts (`num_routed`: columns from num_routed on do no work, LongCat-Flash's
    identity experts) are free: the policy never sees them (`policy_view`: their scores -inf, so
    they are neither eligible to its vote nor in its token order), they join its most preferred
    tier (so a token keeps or takes them by its own scores), and they never count as experts the
    batch loads.

Every line is traced into the compiled graph (`lynx::batch_select`'s body, `lowering/selection.py`),
so it must stay free of data-dependent shapes and of Python control flow on tensor values.
"""

from __future__ import annotations

import torch

from .base import PreferenceFn


def plain_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, indices = torch.topk(scores, k, dim=-1)
    return values, indices


def policy_view(scores: torch.Tensor, num_routed: int | None) -> torch.Tensor:
    """(T, E) the scores a policy reads: the zero-compute columns (from num_routed on) at -inf;
    `scores` itself when there are none."""
    if num_routed is None:
        return scores
    return scores.masked_fill(torch.arange(scores.shape[1], device=scores.device) >= num_routed, float("-inf"))


def usable_rows(scores: torch.Tensor, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(eligible (T, E), usable (T,)): which experts a token may use; which tokens can be remapped."""
    eligible = scores > float("-inf")  # NaN compares False
    finite_scores = (torch.isfinite(scores) | (scores == float("-inf"))).all(dim=-1)
    finite_logits = (torch.isfinite(logits) | ~eligible).all(dim=-1)
    usable = (eligible.sum(dim=-1) >= k) & finite_scores & finite_logits
    return eligible, usable


def voting_rows(scores: torch.Tensor, logits: torch.Tensor, k: int, live: torch.Tensor | None) -> torch.Tensor:
    """(T,) bool: the rows that vote (usable and live)."""
    _, usable = usable_rows(scores, logits, k)
    return usable if live is None else usable & live.to(torch.bool)


def experts_used(indices: torch.Tensor, rows: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E,) bool: the experts that `indices` (T, k) uses in the rows where `rows` (T,) is True."""
    weight = rows.unsqueeze(1).expand(indices.shape).reshape(-1).to(torch.float32)  # (T*k,)
    hits = torch.zeros(num_experts, dtype=torch.float32, device=indices.device)
    return hits.scatter_add(0, indices.reshape(-1), weight) > 0


def _pick(scores: torch.Tensor, token_order: torch.Tensor, tiers: list[torch.Tensor], k: int) -> torch.Tensor:
    """(T, k) each token's k best experts, taking tier 0 first, then tier 1, ...; sorted by score.

    token_order: (T, E) each token's experts, best first; tiers: (T, E) or (E,) bool masks; an
    expert in none of them comes last.
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


def select_experts(scores: torch.Tensor, logits: torch.Tensor, k: int, preferences: PreferenceFn,
                   live: torch.Tensor | None = None, plain_indices: torch.Tensor | None = None,
                   num_routed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Remap a decode batch onto the experts a policy prefers, under the contract above.

    scores: (T, E) what the model's top-k ranks (-inf: ineligible); logits: (T, E) router logits;
    preferences: the policy's function (see `policies/base.py`): a surviving set (E,) bool, or
    tiers of (E,) / (T, E) bool masks; live: (T,) bool or None (every row live); plain_indices:
    `torch.topk(scores, k).indices` if the caller has it; num_routed: the columns that are real
    experts (the rest do no work), None: all E. Returns values (T, k) in scores' dtype and
    indices (T, k) int64, like `torch.topk(scores, k)`.
    """
    num_experts = scores.shape[1]
    eligible, usable = usable_rows(scores, logits, k)
    voters = usable if live is None else usable & live.to(torch.bool)
    if plain_indices is None:
        plain_indices = torch.topk(scores, k, dim=-1).indices  # (T, k)
    token_order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # (T, E)
    # (E,) zero-compute columns; None (no such columns: no op traced for them)
    free = None if num_routed is None else torch.arange(num_experts, device=scores.device) >= num_routed

    if free is None:
        tiers = preferences(eligible, voters, token_order)
    else:  # the policy's view: the zero-compute columns ineligible and last in every token's order
        policy_order = torch.sort(policy_view(scores, num_routed), dim=-1, descending=True, stable=True).indices
        tiers = preferences(eligible & ~free, voters, policy_order)
    tiers = [tiers] if isinstance(tiers, torch.Tensor) else list(tiers)
    if free is not None:
        tiers[0] = tiers[0] | free
    picked = _pick(scores, token_order, [tier & eligible for tier in tiers] + [eligible], k)  # (T, k)
    used_picked, used_plain = experts_used(picked, voters, num_experts), experts_used(plain_indices, voters, num_experts)
    if free is not None:
        used_picked, used_plain = used_picked & ~free, used_plain & ~free
    grows = used_picked.sum() > used_plain.sum()
    voter_indices = torch.where(grows, plain_indices, picked)

    if live is None:  # every usable row votes; the rest take their plain top-k
        indices = torch.where(voters.unsqueeze(1), voter_indices, plain_indices)
        return scores.gather(1, indices), indices
    loaded = experts_used(voter_indices, voters, num_experts)  # (E,)
    if free is not None:
        loaded = loaded | free
    dead_indices = _pick(scores, token_order, [loaded & eligible, eligible], k)
    indices = torch.where(voters.unsqueeze(1), voter_indices,
                          torch.where(usable.unsqueeze(1), dead_indices, plain_indices))
    return scores.gather(1, indices), indices
