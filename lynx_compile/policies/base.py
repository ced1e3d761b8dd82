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


def confident_voters(logits: torch.Tensor, eligible: torch.Tensor, voters: torch.Tensor,
                     confidence_gap: float) -> torch.Tensor:
    """(T,) bool: voters whose second-best eligible logit trails their best by more than the gap."""
    voting = eligible & voters.unsqueeze(1)  # (T, E)
    z = logits.float().masked_fill(~voting, float("-inf"))  # (T, E)
    top2 = torch.topk(z, 2, dim=-1).values  # (T, 2); E >= 2 at every routing site
    return voters & ((top2[:, 0] - top2[:, 1]) > confidence_gap)


GAP_UNITS = 2.0 ** 16  # units of logit gap per logit: exact in fp32 (a power of two)
GAP_FLOOR = -1e6  # gaps below this count as this: keeps every unit count a modest integer


def logit_gaps(logits: torch.Tensor, voting: torch.Tensor) -> torch.Tensor:
    """(T, E) fp32: each voting expert's logit minus its token's best voting logit (<= 0); other
    entries are not finite (-inf, or NaN on rows with no voting expert). logits: (T, E);
    voting: (T, E) bool, the voters' eligible experts."""
    z = logits.float().masked_fill(~voting, float("-inf"))  # (T, E)
    return z - z.amax(dim=-1, keepdim=True)


def gap_evidence(gaps: torch.Tensor, voting: torch.Tensor) -> torch.Tensor:
    """(E,) int64: the voters' summed logit gaps per expert, in units of 2**-16 logits, floored
    per entry (larger: closer to the voters' own best). Integers summed exactly: the same in
    eager, Inductor's C++ and Triton, and the C++ selection kernel, whatever the order."""
    units = torch.floor(gaps.clamp(min=GAP_FLOOR) * GAP_UNITS)  # (T, E) fp32, exact integers
    return torch.where(voting, units, 0.0).to(torch.int64).sum(dim=0)  # (E,)


def rank_experts(primary: torch.Tensor, evidence: torch.Tensor) -> torch.Tensor:
    """(E,) int64 each expert's rank: by `primary` (E,) int64, larger first; ties by `evidence`
    (E,) int64 (`gap_evidence`: the router's own preference), larger first; then by expert index.

    Integer keys and stable sorts only: the same order in eager, Inductor C++ and Triton."""
    num_experts = primary.shape[0]
    ranking = torch.sort(evidence, descending=True, stable=True).indices  # (E,)
    ranking = ranking[torch.sort(primary[ranking], descending=True, stable=True).indices]
    positions = torch.arange(num_experts, device=primary.device)
    return torch.empty_like(ranking).scatter_(0, ranking, positions)  # (E,)
