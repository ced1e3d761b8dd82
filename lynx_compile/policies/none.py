"""No selection: every token keeps its plain top-k.

In the backend, a site whose policy is "none" is never rewritten: its graph is exactly what
default Inductor compiles (outputs bit-identical). The surviving-set form below exists so the
shared contract and its property tests cover "none" like every other policy, and so a runtime
switch between policies (calibration) has a plain reference: every eligible expert survives,
so each token takes its k best experts (ties in the order of a stable sort by score, which
`torch.topk` may break differently).

Parameters: none. Invariant: each voter's experts are k of its highest-scored eligible experts.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import PreferenceFn

NAME = "none"
PARAMETERS: dict[str, type] = {}


def check_parameter(name: str, value: Any) -> None:  # no parameters: the registry refuses any name
    raise AssertionError(name)


def resolve(given: dict[str, Any], num_experts: int, top_k: int, site: str) -> dict[str, int | float]:
    return {}


def preferences(scores: torch.Tensor, logits: torch.Tensor, k: int) -> PreferenceFn:
    def survivors(eligible: torch.Tensor, voters: torch.Tensor, token_order: torch.Tensor) -> torch.Tensor:
        return torch.ones(scores.shape[1], dtype=torch.bool, device=scores.device)  # (E,)

    return survivors
