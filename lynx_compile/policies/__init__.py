"""Selection policies: which experts a decode batch may do without. One module per policy.

    affinity_binning   Lynx (arXiv 2411.08982): experts ranked by binned affinity votes;
                       shortest prefix that serves every token            (alpha, beta, confidence_gap)
    gate_mass_budget   XShare (arXiv 2602.07265): the expert_budget experts of largest batch
                       router mass, grown where the batch needs more      (expert_budget, confidence_gap)
    opportunistic      OEA (arXiv 2511.02237): each token's top keep_top, the rest from
                       experts the batch loads anyway                     (keep_top)
    none               plain top-k (a site with policy none is not rewritten at all)

Every policy only states its preferences (`base.py`); `lowering/selection.py:select_experts`
turns them into indices under one contract (k distinct eligible experts per usable token, never
more distinct experts than plain top-k, dead and NaN rows never change a voter's experts), so
the invariants hold for every policy by construction, and every policy is lowered the same way:
traced into the graph, Inductor generates its kernels.
"""

from __future__ import annotations

import torch

from . import affinity_binning, gate_mass_budget, none, opportunistic
from .base import PreferenceFn, Tiers

_MODULES = {m.NAME: m for m in (affinity_binning, gate_mass_budget, opportunistic, none)}
POLICIES: tuple[str, ...] = tuple(_MODULES)
# policy -> the parameters it takes, as they appear in options and plans
PARAMETERS: dict[str, tuple[str, ...]] = {name: m.PARAMETERS for name, m in _MODULES.items()}
ALL_PARAMETERS: tuple[str, ...] = tuple(dict.fromkeys(p for params in PARAMETERS.values() for p in params))


def preferences(policy: str, scores: torch.Tensor, logits: torch.Tensor, k: int, **params) -> PreferenceFn:
    """The policy's preference function for one batch; params: exactly the policy's PARAMETERS,
    resolved (numbers, not None). Raises ValueError for an unknown policy or parameter."""
    if policy not in _MODULES:
        raise ValueError(f"unknown selection policy {policy!r}; policies: {', '.join(POLICIES)}")
    expected = set(PARAMETERS[policy])
    if set(params) != expected:
        raise ValueError(f"policy {policy!r} takes parameters {sorted(expected)}, got {sorted(params)}")
    return _MODULES[policy].preferences(scores, logits, k, **params)


def select(policy: str, scores: torch.Tensor, logits: torch.Tensor, k: int, live: torch.Tensor | None = None,
           **params) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `policy` on one batch's router outputs under the shared contract (no compilation).

    scores, logits: (T, E); live: (T,) bool or None; params: the policy's resolved parameters.
    Returns values (T, k) in scores' dtype and indices (T, k) int64, like `torch.topk(scores, k)`."""
    from ..lowering.selection import select_experts

    return select_experts(scores, logits, k, preferences(policy, scores, logits, k, **params), live)


__all__ = ["ALL_PARAMETERS", "PARAMETERS", "POLICIES", "PreferenceFn", "Tiers", "preferences", "select"]
