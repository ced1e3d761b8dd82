"""What a selection policy hands to the shared contract (`lowering/selection.py:select_experts`).

Legend: T tokens in the batch, E routed experts, k experts per token.

A policy is built per routing site and batch from the router outputs and its parameters, and
returns a `PreferenceFn`:

    preferences(eligible (T, E) bool, voters (T,) bool, token_order (T, E) int64) -> tiers

`token_order[t]` lists token t's experts best first (a stable descending sort of its scores).
`tiers` is either

  - one (E,) bool mask: the *surviving set*, shared by every token (AffinityBinning, the gate
    mass budget, none); or
  - a list of masks, each (E,) or (T, E) bool, most preferred first (per-token tiers:
    opportunistic keeps each token's own top experts in tier 0, the batch's loaded set in tier 1).

`select_experts` then gives each voter its k best eligible experts tier by tier (by the voter's
own scores inside a tier), then any eligible expert, and enforces the rest of the contract
(never more distinct experts than plain top-k, dead rows, unusable rows). A policy reads only
the voters' rows when it decides anything that concerns the batch as a whole; it may not look at
non-voting rows (that is what keeps dead rows from changing live rows' experts).

Rankings that decide which experts the batch keeps must not depend on the rounding order of a
float reduction (eager, Inductor's C++ and Triton reduce in different orders): rank on integer
counts, or on float sums rounded to a grid far coarser than their rounding error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import check_number

Tiers = torch.Tensor | list[torch.Tensor]
# (eligible (T, E) bool, voters (T,) bool, token_order (T, E) int64) -> tiers
PreferenceFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Tiers]


def check_confidence_gap(value: Any) -> None:
    """confidence_gap (AffinityBinning, the gate-mass budget): logits, >= 0, or None (the default)."""
    check_number("confidence_gap", value, positive=False, allow_none=True)


def token_ranks(token_order: torch.Tensor) -> torch.Tensor:
    """(T, E) int64: expert e's position in token t's own order (0 = its top-1)."""
    num_experts = token_order.shape[1]
    positions = torch.arange(num_experts, device=token_order.device).expand_as(token_order)
    return torch.empty_like(token_order).scatter_(1, token_order, positions)


def confident_voters(logits: torch.Tensor, eligible: torch.Tensor, voters: torch.Tensor,
                     confidence_gap: float) -> torch.Tensor:
    """(T,) bool: voters whose second-best eligible logit trails their best by more than the gap."""
    voting = eligible & voters.unsqueeze(1)  # (T, E)
    z = logits.float().masked_fill(~voting, float("-inf"))  # (T, E)
    top2 = torch.topk(z, 2, dim=-1).values  # (T, 2); E >= 2 at every routing site
    return voters & ((top2[:, 0] - top2[:, 1]) > confidence_gap)


def rank_experts(primary: torch.Tensor, token_order: torch.Tensor, voting: torch.Tensor) -> torch.Tensor:
    """(E,) int64 each expert's rank: by `primary` (E,) int64, larger first; ties by the voters'
    summed per-token rank (the router's own evidence, lower first); then by expert index.

    Integer keys and stable sorts only: the same order in eager, Inductor C++ and Triton."""
    num_experts = token_order.shape[1]
    summed_rank = torch.where(voting, token_ranks(token_order), 0).sum(dim=0)  # (E,)
    ranking = torch.sort(summed_rank, stable=True).indices  # (E,)
    ranking = ranking[torch.sort(primary[ranking], descending=True, stable=True).indices]
    positions = torch.arange(num_experts, device=token_order.device)
    return torch.empty_like(ranking).scatter_(0, ranking, positions)  # (E,)
