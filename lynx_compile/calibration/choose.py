"""Pick one setting per site: the most experts saved whose summed measured cost fits the budget.

Each site's candidates were measured one site at a time (that site changed, every other at
policy none). The combined cost of a plan is approximated by the SUM of its sites' costs (KL
adds across layers to first order; so does the fraction of top-1s that change, when the changes
are rare). The budget then becomes a multiple-choice knapsack: maximize the summed experts saved
subject to sum(cost) <= budget. With two limits (KL and top-1 agreement) a candidate's cost is
the larger of its two costs as fractions of their limits, which keeps both sums within their
limits (conservative). Costs are rounded UP to 1/`resolution` of the budget and the knapsack is
solved exactly by dynamic programming over sites x cost units: O(sites x resolution x candidates).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

BUDGET_KEYS = ("kl", "top1_agreement")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One setting measured at one site."""

    policy: str
    params: tuple[tuple[str, Any], ...]
    kl: float  # mean KL per decode token, nats, with only this site changed
    top1_agreement: float
    experts_before: float  # distinct experts per decode step at this site, plain top-k
    experts_after: float  # ... with this setting

    @property
    def saved(self) -> float:
        return self.experts_before - self.experts_after


def check_budget(budget: dict[str, float]) -> dict[str, float]:
    """{"kl": nats per token > 0} and/or {"top1_agreement": floor in (0, 1)}; ValueError otherwise."""
    if not isinstance(budget, dict) or not budget or set(budget) - set(BUDGET_KEYS):
        raise ValueError(f"budget must be a dict with 'kl' (mean nats per token) and/or 'top1_agreement' (a floor), "
                         f"e.g. {{'kl': 0.01}}; got {budget!r}")
    if "kl" in budget and not (isinstance(budget["kl"], (int, float)) and 0 < budget["kl"] < math.inf):
        raise ValueError(f"budget 'kl' must be a number > 0, got {budget['kl']!r}")
    if "top1_agreement" in budget and not (isinstance(budget["top1_agreement"], (int, float))
                                           and 0 < budget["top1_agreement"] < 1):
        raise ValueError(f"budget 'top1_agreement' must be in (0, 1), got {budget['top1_agreement']!r}")
    return {key: float(value) for key, value in budget.items()}


def normalized_cost(kl: float, top1_agreement: float, budget: dict[str, float]) -> float:
    """The cost as a fraction of the budget (1.0 = all of it): the larger over the given limits."""
    parts = []
    if "kl" in budget:
        parts.append(max(kl, 0.0) / budget["kl"])
    if "top1_agreement" in budget:
        parts.append(max(1.0 - top1_agreement, 0.0) / (1.0 - budget["top1_agreement"]))
    return max(parts)


def within_budget(kl: float, top1_agreement: float, budget: dict[str, float]) -> bool:
    return normalized_cost(kl, top1_agreement, budget) <= 1.0


def choose(candidates: dict[str, list[Candidate]], budget: dict[str, float], scale: float = 1.0,
           resolution: int = 1000) -> dict[str, Candidate]:
    """One candidate per site maximizing the summed `saved`, with summed normalized cost <= scale.

    candidates: per site, its measured settings (a "none" candidate of cost 0 and saving 0 is
    always possible: a site may be left alone). Ties go to the lower total cost, then to the
    candidate listed first."""
    sites = list(candidates)
    capacity = int(math.floor(scale * resolution + 1e-9))
    none = Candidate("none", (), 0.0, 1.0, 0.0, 0.0)
    # best[c] = (saved, -cost units used, choices) using at most c units over the sites so far
    best: list[tuple[float, int, tuple[Candidate, ...]]] = [(0.0, 0, ())] * (capacity + 1)
    for site in sites:
        options = [none] + list(candidates[site])
        new = []
        for c in range(capacity + 1):
            top = None
            for option in options:
                units = math.ceil(normalized_cost(option.kl, option.top1_agreement, budget) * resolution - 1e-9)
                if units > c:
                    continue
                saved, used, chosen = best[c - units]
                value = (round(saved + option.saved, 9), used - units)
                if top is None or value > top[0]:
                    top = (value, chosen + (option,))
            new.append((top[0][0], top[0][1], top[1]))
        best = new
    return dict(zip(sites, best[capacity][2]))
