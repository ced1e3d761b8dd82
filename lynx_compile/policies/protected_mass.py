"""Protected mass: each token keeps the experts that hold most of its routing weight; only its
light slots ride on experts the batch loads anyway.

Source: a refinement of opportunistic expert activation (OEA, arXiv 2511.02237: keep each token's
top few experts, fill its other slots from experts the batch already loads) along two leads the
Lynx paper gives (arXiv 2411.08982, observations 2 and 3: remapping confident choices and rank-0
experts is what hurts accuracy): instead of a fixed number of experts per token, a token keeps,
in its own order, as many of its top-k experts as it takes to hold `keep_mass` of their routing
probability. A token whose top-1 dominates lends its other slots to the batch; a token torn
between two experts keeps both.

Keeps (per-token tiers, not one surviving set):
  p[t, e]  = softmax over token t's eligible experts of its router logits, voters only, in
             float64, in integer units of 2**-24 (as `gate_mass_budget.batch_gate_mass`), so the
             decision never depends on a float sum's rounding order;
  tier 0   token t's first j experts in its own order (its top-k order), j the smallest count
           whose probability reaches keep_mass of its top-k's (j >= 1: the top-1 always);
  tier 1   the batch's loaded set: every expert some voter keeps in its tier 0;
  then     the token's own next-best eligible experts (the contract's last tier).
Each token takes its k best experts tier by tier (by its own scores inside a tier).

Parameters: keep_mass in (0, 1]: 1 keeps every token's top-k (no remapping); near 0 keeps only
top-1s (OEA with keep_top=1).

Invariants (beyond the shared contract): every voter keeps its top-1, and every expert of its
top-k up to keep_mass of their probability; its other experts come from the loaded set whenever
that set holds enough of its eligible experts; the loaded set never depends on non-voting rows.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import fail
from .base import PreferenceFn
from .gate_mass_budget import MASS_GRID

NAME = "protected_mass"
PARAMETERS = {"keep_mass": float}  # name -> type
DEFAULT_KEEP_MASS = 0.8


def check_parameter(name: str, value: Any) -> None:
    """Raise LynxOptionsError naming `name` for a bad value (None: the default)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 < value <= 1:
        fail("keep_mass", value, "a number in (0, 1]")


def resolve(given: dict[str, Any], num_experts: int, top_k: int, site: str) -> dict[str, int | float]:
    return {"keep_mass": float(given.get("keep_mass", DEFAULT_KEEP_MASS))}


def token_probability_units(logits: torch.Tensor, voting: torch.Tensor) -> torch.Tensor:
    """(T, E) int64: each voter's router probability over its eligible experts, in units of
    2**-24 (0 elsewhere). logits: (T, E); voting: (T, E) bool."""
    z = logits.to(torch.float64).masked_fill(~voting, float("-inf"))  # (T, E)
    z_max = z.amax(dim=-1, keepdim=True)  # (T, 1)
    z_max = torch.where(torch.isfinite(z_max), z_max, 0.0)
    weights = torch.exp(z - z_max)  # (T, E), 0 where not voting
    total = weights.sum(dim=-1, keepdim=True)  # (T, 1)
    return torch.round(weights / torch.where(total > 0, total, 1.0) * MASS_GRID).to(torch.int64)


def preferences(scores: torch.Tensor, logits: torch.Tensor, k: int, keep_mass: float) -> PreferenceFn:
    """Tiers [own protected experts (T, E), loaded set (E,)] for router outputs scores (T, E)."""
    if isinstance(keep_mass, bool) or not isinstance(keep_mass, float) or not 0 < keep_mass <= 1:
        raise ValueError(f"protected_mass: keep_mass must be a float in (0, 1], got {keep_mass!r}")

    def tiers(eligible: torch.Tensor, voters: torch.Tensor, token_order: torch.Tensor) -> list[torch.Tensor]:
        # (T, E) bool, (T,) bool, (T, E) int64 -> [(T, E) bool, (E,) bool]
        voting = eligible & voters.unsqueeze(1)  # (T, E)
        own = token_order[:, :k]  # (T, k) the token's top-k, in its order
        mass = token_probability_units(logits, voting).gather(1, own)  # (T, k) int64
        before = mass.cumsum(dim=1) - mass  # (T, k) the probability of the slots ahead
        need = torch.ceil(mass.sum(dim=1, keepdim=True).to(torch.float64) * keep_mass)  # (T, 1) units
        top1 = torch.arange(k, device=scores.device) == 0  # (k,): the top-1 always (also with no probability)
        protected = (before.to(torch.float64) < need) | top1  # (T, k): keep slots until keep_mass is reached
        if keep_mass >= 1.0:  # every slot, also those whose probability rounds to 0 units
            protected = torch.ones_like(protected)
        kept = torch.zeros_like(eligible).scatter_(1, own, protected) & eligible  # (T, E) by expert
        loaded = (kept & voters.unsqueeze(1)).any(dim=0)  # (E,)
        return [kept, loaded]

    return tiers
