"""Moved mass: drop the experts whose routing weight in this batch matters least, as long as
the weight that has to move stays within `max_moved` of the batch's.

Source: the set objective of XShare (Vankov et al., arXiv 2602.07265: keep the experts of most
gate mass) with a fidelity budget in place of its expert budget, after the Lynx paper's
observation (arXiv 2411.08982) that how much an answer changes follows how much routing weight
is remapped, and how confidently. A fixed expert count cuts as much from a batch whose tokens
agree as from one whose tokens are spread over every expert; a budget on the weight that moves
cuts deeply where that is cheap and leaves a spread batch nearly alone, so the same setting
costs about the same fidelity at every batch size (bench/policy_frontier.py, docs/policies.md).

Keeps (the surviving set, shared by every token):
  w[t, e]  = the weight token t's top-k gives expert e: its router probability renormalized over
             its own top-k (0 outside its top-k; each voter's weights sum to 1), softmax of the
             logits over its eligible experts in float64, in integer units of 2**-24 (as
             `gate_mass_budget.batch_gate_mass`), so the decision never depends on a float
             sum's rounding order;
  load[e]  = sum over voters of w[t, e]: the weight that moves if e is dropped;
  harm[e]  = sum over voters of w[t, e]**2 (integers: floor(units**2 / 2**24)): what dropping e
             costs to first order. A remapped slot changes its token's output in proportion to
             its weight and the KL of the next-token distribution grows with the square of that
             change, so one heavy slot costs more than two light ones of the same total weight
             (measured: ~20% less KL than ranking by load at the same cut on both shipped
             checkpoints);
  drop     experts in increasing harm (ties: the voters' summed logit gap, `base.gap_evidence`,
           then the higher index), while the summed load of the dropped experts stays within
           max_moved x the voters' total weight, and at least k experts survive.
The tokens that lose an expert take their next best survivor (the contract).

Expert parallelism (ranks = R > 1): a step under EP waits for the rank that reads the most
experts, rank r owning the contiguous experts [r E/R, (r+1) E/R) (transformers' and vLLM's
layout, `shards.py`). The drop order then takes from the fullest rank first: each routed expert's depth is
its place, most harmful first, among the routed experts of its own rank; experts are dropped in
decreasing depth (ties: least harmful first), unrouted experts before any, under the same
moved-weight budget. So the budget is spent where it lowers the most experts one rank reads
rather than the total (docs/policies.md, "Expert parallelism"; not yet measured on the shipped
checkpoints).

Parameters: max_moved in [0, 1): the fraction of the batch's routing weight (per layer) that may
be remapped; 0 drops only experts no voter routes to (plain top-k). ranks >= 1, dividing E: the
expert-parallel ranks the drop order balances over; 1 (the default) orders by harm alone.

Invariants (beyond the shared contract): the voters' weight on dropped experts is at most
max_moved of theirs (so max_moved = 0 is plain top-k); the set never depends on non-voting rows.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import LynxOptionsError, check_int, fail
from ..shards import shard_of
from .base import PreferenceFn, gap_evidence, logit_gaps, rank_experts
from .gate_mass_budget import MASS_GRID

NAME = "moved_mass"
PARAMETERS = {"max_moved": float, "ranks": int}  # name -> type, in the op's order
DEFAULT_MAX_MOVED = 0.06
MASS_UNITS = 1 << 24  # MASS_GRID as an integer


def check_parameter(name: str, value: Any) -> None:
    """Raise LynxOptionsError naming `name` for a bad value (None: the default)."""
    if value is None:
        return
    if name == "ranks":
        check_int("ranks", value, minimum=1)
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value < 1:
        fail("max_moved", value, "a number in [0, 1)")


def resolve(given: dict[str, Any], num_experts: int, top_k: int, site: str) -> dict[str, int | float]:
    """The parameters of a site of E experts: those given, else the defaults. Raises
    LynxOptionsError when ranks does not divide E (no even expert-parallel layout)."""
    ranks = int(given.get("ranks", 1))
    if num_experts % ranks:
        raise LynxOptionsError(f"lynx: ranks={ranks} does not divide the {num_experts} experts of routing site "
                               f"{site!r}; expert parallelism shards E evenly over the ranks")
    return {"max_moved": float(given.get("max_moved", DEFAULT_MAX_MOVED)), "ranks": ranks}


def top_k_weight_units(logits: torch.Tensor, voting: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """(T, E) int64: each voter's router probability renormalized over its own top-k `own`
    (T, k), in units of 2**-24 (0 outside its top-k and on rows that do not vote).
    logits: (T, E); voting: (T, E) bool, the voters' eligible experts."""
    z = logits.to(torch.float64).masked_fill(~voting, float("-inf"))  # (T, E)
    z_max = z.amax(dim=-1, keepdim=True)  # (T, 1)
    z_max = torch.where(torch.isfinite(z_max), z_max, 0.0)
    weights = torch.exp(z - z_max).gather(1, own)  # (T, k), 0 where not voting
    total = weights.sum(dim=-1, keepdim=True)  # (T, 1)
    units = torch.round(weights / torch.where(total > 0, total, 1.0) * MASS_GRID).to(torch.int64)  # (T, k)
    return torch.zeros_like(z, dtype=torch.int64).scatter_(1, own, units)  # (T, E)


def fullest_rank_first(rank: torch.Tensor, routed: torch.Tensor, ranks: int) -> torch.Tensor:
    """(E,) int64 the keep order balanced over `ranks` contiguous expert shards: by depth (an
    expert's place, 1 = most harmful, among the routed experts of its own shard; unrouted experts
    last), ties by `rank`. rank: (E,) int64 the harm order (0: the most harmful to drop), a
    permutation; routed: (E,) bool. Dropping a suffix of the result takes from the shard with the
    most routed experts first. Integer keys and stable sorts only."""
    num_experts = rank.shape[0]
    shard = shard_of(num_experts, ranks, rank.device)  # (E,) the rank owning each expert
    by_harm = torch.argsort(rank)  # (E,) experts, the most harmful first
    in_shard = (shard[by_harm].unsqueeze(1) == torch.arange(ranks, device=rank.device)) \
        & routed[by_harm].unsqueeze(1)  # (E, R)
    depth_by_harm = in_shard.cumsum(0).gather(1, shard[by_harm].unsqueeze(1)).squeeze(1)  # (E,)
    depth = torch.empty_like(depth_by_harm).scatter_(0, by_harm, depth_by_harm)  # (E,) >= 1 where routed
    depth = torch.where(routed, depth, num_experts + 1)
    return rank_experts(-depth, -rank)


def preferences(scores: torch.Tensor, logits: torch.Tensor, k: int, max_moved: float, ranks: int) -> PreferenceFn:
    """The surviving set (E,) for router outputs scores, logits (T, E)."""
    if isinstance(max_moved, bool) or not isinstance(max_moved, float) or not 0 <= max_moved < 1:
        raise ValueError(f"moved_mass: max_moved must be a float in [0, 1), got {max_moved!r}")
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1 or scores.shape[1] % ranks:
        raise ValueError(f"moved_mass: ranks must be an integer >= 1 dividing E = {scores.shape[1]}, got {ranks!r}")

    def survivors(eligible: torch.Tensor, voters: torch.Tensor, token_order: torch.Tensor) -> torch.Tensor:
        # (T, E) bool, (T,) bool, (T, E) int64 -> (E,) bool
        voting = eligible & voters.unsqueeze(1)  # (T, E)
        units = top_k_weight_units(logits, voting, token_order[:, :k])  # (T, E) int64
        load = units.sum(dim=0)  # (E,)
        harm = (units * units).div(MASS_UNITS, rounding_mode="floor").sum(dim=0)  # (E,) exact integers
        evidence = gap_evidence(logit_gaps(logits, voting), voting)  # (E,) ties: the router's preference
        rank = rank_experts(harm, evidence)  # (E,) 0: the most harmful to drop
        if ranks > 1:
            rank = fullest_rank_first(rank, load > 0, ranks)
        by_rank = torch.empty_like(load).scatter_(0, rank, load)  # (E,) loads, in rank order
        # The weight moved when every expert from rank r on is dropped (the least harmful go first).
        dropped_from = by_rank.flip(0).cumsum(0).flip(0)  # (E,)
        allowed = torch.floor(load.sum().to(torch.float64) * max_moved)  # units; exact: the sum < 2**53
        positions = torch.arange(load.shape[0], device=scores.device)
        drop_rank = (dropped_from <= allowed) & (positions >= k)  # (E,) by rank: a suffix
        return ~drop_rank[rank]

    return survivors
