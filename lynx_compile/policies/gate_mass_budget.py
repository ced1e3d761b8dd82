"""Gate-mass budget: at most `expert_budget` experts per layer, those holding the batch's most
router probability.

Source: Vankov et al., "XShare: Collaborative in-Batch Expert Sharing for Faster MoE Inference",
arXiv 2602.07265: batch-aware selection as a modular objective (maximize the total gating score
of the selected experts) under a per-layer budget, solved greedily, then each token routed to its
best k of the selected experts. We implement the standard-batching form of that method; its
speculative-decoding and expert-parallel variants, and its refinement step, are not implemented.
(The paper's text was not available offline; section numbers are not cited.)

Keeps (the surviving set, shared by every token):
  1. p[t, e]   = softmax over token t's eligible experts of its router logits, voters only
     (for softmax routers the model's own probabilities; for sigmoid routers the same per-token
     order, with each token weighing one unit, as a modular objective over tokens assumes);
  2. mass[e]   = sum over voters of p[t, e], summed in float64 and rounded to a grid of 2**-24
     (integer units): a float sum's rounding, which differs between eager and Inductor's
     reduction orders, is ~1e-15 and cannot reorder two experts unless their masses straddle a
     grid point that closely; ties of the rounded mass go to the voters' summed logit gap
     (`base.gap_evidence`, integers), then the expert index (stable sorts);
  3. the objective is modular (a set's mass is the sum of its experts' masses), so the greedy
     choice is exact: the `expert_budget` experts of largest mass;
  4. grown where the budget is below what the batch needs, never silently:
       - every confident voter's top-1 is added (second choice trails by more than
         confidence_gap logits: Lynx's observation that dropping a confident top-1 is what hurts),
       - a voter with fewer than k eligible experts in the set adds its own best eligible ones
         until it has k (group-limited routers, or a budget below k).
     `lynx_compile.record()` reports each call whose voters use more experts than the budget
     (`SelectionCall.over_budget`).

Parameters: expert_budget (an int >= 1 resolved per site, from an int or a fraction of E),
confidence_gap >= 0 (logits; default 1/alpha of AffinityBinning's default for k/E).

Invariants (beyond the shared contract): when the budget suffices (confident top-1s and every
voter's k eligible experts fit), the voters use at most `expert_budget` experts; confident voters
keep their top-1; the set never depends on non-voting rows.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import fail
from .affinity_binning import default_alpha_beta
from .base import PreferenceFn, check_confidence_gap, confident_voters, gap_evidence, logit_gaps, rank_experts

NAME = "gate_mass_budget"
PARAMETERS = {"expert_budget": int, "confidence_gap": float}  # name -> type (resolved), in the op's order
DEFAULT_EXPERT_BUDGET = 0.5  # half of E
MASS_GRID = 2.0 ** 24  # units per unit of probability mass
_BUDGET_EXPECTED = "an integer >= 1 (experts) or a fraction of E in (0, 1]"


def check_parameter(name: str, value: Any) -> None:
    """Raise LynxOptionsError naming `name` for a bad value (None: the default)."""
    if name == "confidence_gap":
        check_confidence_gap(value)
        return
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        fail("expert_budget", value, _BUDGET_EXPECTED)
    if (isinstance(value, int) and value < 1) or (isinstance(value, float) and not 0 < value <= 1):
        fail("expert_budget", value, _BUDGET_EXPECTED)


def resolve(given: dict[str, Any], num_experts: int, top_k: int, site: str) -> dict[str, int | float]:
    """The parameters of a site of E experts: the budget as a number of experts (a fraction of E
    rounded up), confidence_gap by default 1/alpha of AffinityBinning's default alpha for k/E."""
    budget = given.get("expert_budget", DEFAULT_EXPERT_BUDGET)
    if isinstance(budget, float):
        budget = max(1, math.ceil(round(budget * num_experts, 9)))
    default_alpha, _ = default_alpha_beta(num_experts, top_k)
    return {"expert_budget": int(budget), "confidence_gap": float(given.get("confidence_gap", 1.0 / default_alpha))}


def reported_budget(params: dict[str, int | float]) -> int:
    """The experts a batch may use: `record()` counts the calls whose voters use more."""
    return int(params["expert_budget"])


def batch_gate_mass(logits: torch.Tensor, voting: torch.Tensor) -> torch.Tensor:
    """(E,) int64: the voters' summed router probability per expert, in units of 2**-24.

    logits: (T, E); voting: (T, E) bool, the voters' eligible experts (other entries weigh 0)."""
    z = logits.to(torch.float64).masked_fill(~voting, float("-inf"))  # (T, E)
    z_max = z.amax(dim=-1, keepdim=True)  # (T, 1); -inf on rows that do not vote
    z_max = torch.where(torch.isfinite(z_max), z_max, 0.0)
    weights = torch.exp(z - z_max)  # (T, E) in [0, 1], 0 where not voting
    total = weights.sum(dim=-1, keepdim=True)  # (T, 1) >= 1 on voting rows, 0 elsewhere
    probability = weights / torch.where(total > 0, total, 1.0)  # (T, E)
    return torch.round(probability.sum(dim=0) * MASS_GRID).to(torch.int64)  # (E,)


def preferences(scores: torch.Tensor, logits: torch.Tensor, k: int, expert_budget: int,
                confidence_gap: float) -> PreferenceFn:
    """The budgeted surviving set (steps 1-4 above) for router outputs scores, logits (T, E)."""
    if isinstance(expert_budget, bool) or not isinstance(expert_budget, int) or expert_budget < 1:
        raise ValueError(f"gate_mass_budget: expert_budget must be an integer >= 1, got {expert_budget!r}")

    def survivors(eligible: torch.Tensor, voters: torch.Tensor, token_order: torch.Tensor) -> torch.Tensor:
        # (T, E) bool, (T,) bool, (T, E) int64 -> (E,) bool
        num_tokens, num_experts = scores.shape
        voting = eligible & voters.unsqueeze(1)  # (T, E)
        evidence = gap_evidence(logit_gaps(logits, voting), voting)  # (E,) ties: the voters' summed gaps
        rank_of = rank_experts(batch_gate_mass(logits, voting), evidence)  # (E,)
        kept = rank_of < expert_budget  # (E,) steps 1-3

        # Step 4: confident voters' top-1s, then each voter's own best experts up to k eligible.
        confident = confident_voters(logits, eligible, voters, confidence_gap)  # (T,)
        top1 = token_order[:, 0]  # (T,) each token's best expert
        hits = torch.zeros(num_experts, dtype=torch.int64, device=scores.device)
        kept = kept | (hits.scatter_add(0, top1, confident.to(torch.int64)) > 0)  # (E,)
        short = torch.where(voters, (k - (eligible & kept).sum(dim=-1)).clamp(min=0), 0)  # (T,)
        outside = (eligible & ~kept).gather(1, token_order)  # (T, E) in each token's order
        taken = outside & (torch.cumsum(outside.to(torch.int64), dim=1) <= short.unsqueeze(1))  # (T, E)
        added = torch.zeros_like(taken).scatter_(1, token_order, taken)  # (T, E) by expert
        return kept | added.any(dim=0)

    return survivors
