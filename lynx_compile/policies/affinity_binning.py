"""AffinityBinning: keep the experts the batch's tokens prefer, binned by affinity gap.

Source: Gupta et al., "Lynx: Enabling Efficient MoE Inference through Dynamic Batch-Aware
Expert Selection", arXiv 2411.08982 (v3), section 4 "AffinityBinning".

Keeps (the surviving set, shared by every token):
  1. gap[t, e]    = z[t, e] - max_e' z[t, e']            router-logit gap, <= 0
  2. bin[t, e]    = -min(floor(alpha * |gap|), beta)    0 = within 1/alpha of the top-1
  3. score[e]     = sum_t V ** bin[t, e]                V voters; a bin-0 vote counts 1, each
     bin down 1/V; rank experts by score, ties by the voters' summed logit gap (router
     evidence, `base.gap_evidence`), then by index. Computed exactly, as a lexicographic order
     on integer vote counts per bin and an integer evidence.
  4. the shortest prefix of that ranking such that, for every voter,
       - it holds k of the voter's eligible experts (so no voter needs an expert outside it;
         with group-limited routers this is what makes the set shrink at all),
       - it holds one of the voter's bin-0 experts (as good as its top-1, within one bin),
       - it holds the voter's top-1 if the voter is confident (second choice trails by more
         than confidence_gap logits).

Parameters: alpha > 0 (bin sharpness), beta >= 1 (bins below bin 0), confidence_gap >= 0
(logits). Defaults from the layer's sparsity k/E (`default_alpha_beta`); confidence_gap 1/alpha.

Invariants (beyond the shared contract): every voter keeps an expert of its bin 0; confident
voters keep their top-1; the set never depends on non-voting rows or on float rounding order.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import check_int, check_number
from .base import PreferenceFn, check_confidence_gap, confident_voters, gap_evidence, logit_gaps

NAME = "affinity_binning"
PARAMETERS = {"alpha": float, "beta": int, "confidence_gap": float}  # name -> type, in the op's order


def default_alpha_beta(num_experts: int, top_k: int) -> tuple[float, int]:
    """Bin parameters from the layer's sparsity k/E, anchored on the values Lynx ran.

    Coarse layers (k/E >= 0.2: Mixtral 2/8) get wide bins (alpha 0.7, one bin below bin 0):
    with few experts every choice carries real affinity, so only near-ties should move.
    Fine-grained layers (k/E < 0.2: Qwen3-30B 8/128, OLMoE 8/64, DeepSeek 8/256) get narrow
    bins (alpha 3, two bins): many experts are near-interchangeable and the batch can be served
    by far fewer. These are the paper's Mixtral and Qwen3 settings; no task tuning.
    """
    if top_k / num_experts >= 0.2:
        return 0.7, 1
    return 3.0, 2


def check_parameter(name: str, value: Any) -> None:
    """Raise LynxOptionsError naming `name` for a bad value (None: the default)."""
    if name == "alpha":
        check_number("alpha", value, positive=True, allow_none=True)
    elif name == "beta":
        check_int("beta", value, minimum=1, allow_none=True)
    else:
        check_confidence_gap(value)


def resolve(given: dict[str, Any], num_experts: int, top_k: int, site: str) -> dict[str, int | float]:
    """The parameters of a site of E experts and top-k: those given, else the defaults."""
    default_alpha, default_beta = default_alpha_beta(num_experts, top_k)
    alpha = float(given.get("alpha", default_alpha))
    return {"alpha": alpha, "beta": int(given.get("beta", default_beta)),
            "confidence_gap": float(given.get("confidence_gap", 1.0 / alpha))}


def preferences(scores: torch.Tensor, logits: torch.Tensor, k: int, alpha: float, beta: int,
                confidence_gap: float) -> PreferenceFn:
    """The surviving-set rule (steps 1-4 above) for router outputs scores, logits (T, E)."""

    def survivors(eligible: torch.Tensor, voters: torch.Tensor, token_order: torch.Tensor) -> torch.Tensor:
        # (T, E) bool, (T,) bool, (T, E) int64 -> (E,) bool
        num_experts = scores.shape[1]
        voting = eligible & voters.unsqueeze(1)  # (T, E)
        gap = logit_gaps(logits, voting)  # (T, E) <= 0 where voting
        bins = -torch.clamp(torch.floor(-alpha * gap), max=beta)
        bins = bins.masked_fill(~voting, -beta)  # (T, E) in [-beta, 0]

        # Step 3, exactly: rank experts lexicographically by their count of bin-0 votes, then of
        # bin -1 votes, ..., then by the voters' summed logit gap (the router's own evidence),
        # then by index. This is the order sum_t V ** bin[t, e] gives whenever one bin-0 vote
        # outweighs all V votes a bin lower, computed on integers: no float sum whose rounding
        # (and so the order of near-ties) would depend on the reduction order.
        level = (-bins).to(torch.int64)  # (T, E) in [0, beta]
        ranking = torch.sort(gap_evidence(gap, voting), descending=True, stable=True).indices  # (E,)
        for bin_level in reversed(range(beta + 1)):  # least significant key first; stable sorts
            votes = (voting & (level == bin_level)).sum(dim=0)  # (E,) int64
            ranking = ranking[torch.sort(votes[ranking], descending=True, stable=True).indices]
        positions = torch.arange(num_experts, device=scores.device)
        rank_of = torch.empty_like(ranking).scatter_(0, ranking, positions)  # (E,)

        # Step 4: the last rank each voter needs, then the shortest prefix covering all of them.
        eligible_ranks = torch.where(eligible, rank_of, num_experts)  # (T, E)
        kth_eligible_rank = torch.topk(eligible_ranks, k, dim=-1, largest=False, sorted=True).values[:, -1]
        best_bin0_rank = torch.where(voting & (bins == 0), rank_of, num_experts).amin(dim=-1)  # (T,)
        confident = confident_voters(logits, eligible, voters, confidence_gap)  # (T,)
        top1_rank = rank_of[scores.argmax(dim=-1)]  # (T,)
        needed = torch.maximum(torch.maximum(kth_eligible_rank, best_bin0_rank),
                               torch.where(confident, top1_rank, -1))  # (T,)
        needed = torch.where(voters, needed, -1)
        keep = torch.cat([needed, needed.new_full((1,), k - 1)]).amax() + 1  # () >= k; T = 0 safe
        return rank_of < keep

    return survivors
