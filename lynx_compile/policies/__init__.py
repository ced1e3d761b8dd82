"""Selection policies: which experts a decode batch may do without. One module per policy.

    affinity_binning   Lynx (arXiv 2411.08982): experts ranked by binned affinity votes;
                       shortest prefix that serves every token            (alpha, beta, confidence_gap)
    gate_mass_budget   XShare (arXiv 2602.07265): the expert_budget experts of largest batch
                       router mass, grown where the batch needs more      (expert_budget, confidence_gap)
    opportunistic      OEA (arXiv 2511.02237): each token's top keep_top, the rest from
                       experts the batch loads anyway                     (keep_top)
    protected_mass     each token keeps its top experts up to keep_mass of their routing
                       probability; its light slots ride on the batch's   (keep_mass)
    moved_mass         drop the experts of least routing weight while the weight that
                       moves stays within max_moved of the batch's; with   (max_moved, ranks)
                       ranks > 1, from the fullest expert-parallel rank first
    none               plain top-k (a site with policy none is not rewritten at all)

Every policy only states its preferences (`base.py`); `contract.py:select_experts` turns them
into indices under one contract (k distinct eligible experts per usable token, never more
distinct experts than plain top-k, dead and NaN rows never change a voter's experts), so the
invariants hold for every policy by construction, and every policy is lowered the same way.

Each policy module owns its parameters: `PARAMETERS` (name -> int or float, in the order the
`lynx::batch_select` op carries them), `check_parameter` (the value check, naming the key),
`resolve` (defaults for a site's E and k), `preferences` (the rule). This module is the registry
the rest of lynx reads them through, and `SiteSetting`, what one routing site runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..errors import LynxOptionsError, check_choice
from . import affinity_binning, gate_mass_budget, moved_mass, none, opportunistic, protected_mass
from .base import PreferenceFn, Tiers
from .contract import select_experts

_MODULES = {m.NAME: m for m in (affinity_binning, gate_mass_budget, opportunistic, protected_mass, moved_mass, none)}
POLICIES: tuple[str, ...] = tuple(_MODULES)
# What a plain backend="lynx" runs: the best fidelity found at a >= 25% cut on both shipped
# checkpoints at B = 16..64 (docs/policies.md, "The default"; bench/policy_frontier.py).
DEFAULT_POLICY = "moved_mass"
# policy -> the parameters it takes, as they appear in options and plans (and the op's order)
PARAMETERS: dict[str, tuple[str, ...]] = {name: tuple(m.PARAMETERS) for name, m in _MODULES.items()}
ALL_PARAMETERS: tuple[str, ...] = tuple(dict.fromkeys(p for params in PARAMETERS.values() for p in params))


def parameter_types(policy: str) -> dict[str, type]:
    """name -> int or float, for each parameter `policy` takes, in the op's order."""
    return dict(_module(policy).PARAMETERS)


def check_parameters(policy: Any, params: dict[str, Any]) -> None:
    """Validate a policy name and the parameters given with it.

    Raises LynxOptionsError naming the key: an unknown policy, a parameter the policy does not
    take (naming both, and the policy the parameter belongs to), or a bad value."""
    check_choice("policy", policy, POLICIES)
    for name, value in params.items():
        if name not in ALL_PARAMETERS:
            raise LynxOptionsError(f"lynx: unknown parameter {name!r} for policy {policy!r}; "
                                   f"its parameters: {', '.join(PARAMETERS[policy]) or 'none'}")
        if name not in PARAMETERS[policy]:
            owners = [p for p, names in PARAMETERS.items() if name in names]
            raise LynxOptionsError(
                f"lynx: option {name!r} is a parameter of policy {' and '.join(map(repr, owners))}, not of policy "
                f"{policy!r} (its parameters: {', '.join(PARAMETERS[policy]) or 'none'})")
        _MODULES[policy].check_parameter(name, value)


def resolve_parameters(policy: str, given: dict[str, Any], num_experts: int, top_k: int,
                       site: str = "?") -> dict[str, int | float]:
    """The policy's parameters at a site of E experts and top-k: given values, else its defaults.
    Raises LynxOptionsError for a value the site's k refuses."""
    return _MODULES[policy].resolve(given, num_experts, top_k, site)


def reported_budget(policy: str, params: dict[str, int | float]) -> int | None:
    """The experts a batch may use under this setting, for `record()`'s over-budget count; None
    for policies without a budget."""
    report = getattr(_module(policy), "reported_budget", None)
    return report(params) if report is not None else None


def preferences(policy: str, scores: torch.Tensor, logits: torch.Tensor, k: int, **params) -> PreferenceFn:
    """The policy's preference function for one batch; params: exactly the policy's PARAMETERS,
    resolved (numbers, not None). Raises ValueError for an unknown policy or parameter."""
    expected = set(PARAMETERS[_module(policy).NAME])
    if set(params) != expected:
        raise ValueError(f"policy {policy!r} takes parameters {sorted(expected)}, got {sorted(params)}")
    return _MODULES[policy].preferences(scores, logits, k, **params)


def select(policy: str, scores: torch.Tensor, logits: torch.Tensor, k: int, live: torch.Tensor | None = None,
           **params) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `policy` on one batch's router outputs under the shared contract (no compilation).

    scores, logits: (T, E); live: (T,) bool or None; params: some of the policy's parameters,
    the rest take their defaults for this E and k (`resolve_parameters`).
    Returns values (T, k) in scores' dtype and indices (T, k) int64, like `torch.topk(scores, k)`.
    Raises ValueError for a parameter the policy does not take or a bad value."""
    unknown = sorted(set(params) - set(PARAMETERS[_module(policy).NAME]))
    if unknown:
        raise ValueError(f"policy {policy!r} takes parameters {list(PARAMETERS[policy])}, not {unknown}")
    params = resolve_parameters(policy, params, scores.shape[1], k)
    return select_experts(scores, logits, k, preferences(policy, scores, logits, k, **params), live)


def _module(policy: str):
    if policy not in _MODULES:
        raise ValueError(f"unknown selection policy {policy!r}; policies: {', '.join(POLICIES)}")
    return _MODULES[policy]


@dataclasses.dataclass(frozen=True)
class SiteSetting:
    """What one routing site runs: a policy, its resolved parameters, and where they came from."""

    policy: str
    params: tuple[tuple[str, int | float], ...]  # the policy's own parameters, resolved
    source: str  # "config", "config (site not in plan)" or "plan <file>"

    @property
    def selects(self) -> bool:
        return self.policy != "none"

    def params_dict(self) -> dict[str, int | float]:
        return dict(self.params)

    @property
    def reported_budget(self) -> int | None:
        return reported_budget(self.policy, self.params_dict())

    def describe(self) -> str:
        """e.g. "gate_mass_budget(expert_budget=4, confidence_gap=1.43) [plan plan.json]"."""
        params = ", ".join(f"{name}={_short(value)}" for name, value in self.params)
        return f"{self.policy}({params}) [{self.source}]" if params else f"{self.policy} [{self.source}]"


def _short(value: int | float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


__all__ = ["ALL_PARAMETERS", "DEFAULT_POLICY", "PARAMETERS", "POLICIES", "PreferenceFn", "SiteSetting", "Tiers", "check_parameters",
           "parameter_types", "preferences", "reported_budget", "resolve_parameters", "select"]
