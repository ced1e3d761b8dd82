"""Opportunistic expert activation: keep each token's top few experts, fill the rest of its k
slots with experts the batch loads anyway.

Source: Oncescu et al., "Opportunistic Expert Activation: Batch-Aware Expert Routing for Faster
Decode Without Retraining", arXiv 2511.02237: a per-token quality baseline (each token's top
experts), then "piggybacking" on experts already loaded for other tokens of the same batch.
(The paper's text was not available offline; section numbers are not cited.)

Keeps (per-token tiers, not one surviving set):
  tier 0  token t's own top `keep_top` experts (by its scores), always;
  tier 1  the batch's loaded set: every expert some voter keeps in its tier 0;
  then    token t's own next-best eligible experts, where the loaded set holds fewer than
          k - keep_top of its eligible experts (the contract's last tier).
Each token takes its k best experts tier by tier (by its own scores inside a tier). A fallback
expert is one of the token's own top-k, so the voters never use an expert outside the union of
their plain top-k.

Parameters: keep_top, an int in [1, k] (k: no remapping, plain top-k).

Invariants (beyond the shared contract): every voter keeps its own top `keep_top` experts (its
top-1 always); its other experts come from the loaded set whenever that set holds enough of its
eligible experts; the loaded set never depends on non-voting rows.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import LynxOptionsError, check_int
from .base import PreferenceFn

NAME = "opportunistic"
PARAMETERS = {"keep_top": int}  # name -> type


def check_parameter(name: str, value: Any) -> None:
    """Raise LynxOptionsError naming `name` for a bad value (None: the default)."""
    check_int("keep_top", value, minimum=1, allow_none=True)


def resolve(given: dict[str, Any], num_experts: int, top_k: int, site: str) -> dict[str, int | float]:
    """keep_top given, else max(1, k // 2); raises LynxOptionsError naming the site if > k."""
    keep_top = int(given.get("keep_top", max(1, top_k // 2)))
    if keep_top > top_k:
        raise LynxOptionsError(f"lynx: option 'keep_top' got {keep_top} at routing site {site!r}; expected an "
                               f"integer in [1, k={top_k}] (k: that site's experts per token)")
    return {"keep_top": keep_top}


def preferences(scores: torch.Tensor, logits: torch.Tensor, k: int, keep_top: int) -> PreferenceFn:
    """Tiers [own top keep_top (T, E), loaded set (E,)] for router outputs scores (T, E)."""
    if isinstance(keep_top, bool) or not isinstance(keep_top, int) or not 1 <= keep_top <= k:
        raise ValueError(f"opportunistic: keep_top must be an integer in [1, k={k}], got {keep_top!r}")

    def tiers(eligible: torch.Tensor, voters: torch.Tensor, token_order: torch.Tensor) -> list[torch.Tensor]:
        # (T, E) bool, (T,) bool, (T, E) int64 -> [(T, E) bool, (E,) bool]
        num_experts = scores.shape[1]
        in_top = (torch.arange(num_experts, device=scores.device) < keep_top).expand(token_order.shape)  # (T, E)
        kept = torch.zeros_like(eligible).scatter_(1, token_order, in_top) & eligible  # (T, E) by expert
        loaded = (kept & voters.unsqueeze(1)).any(dim=0)  # (E,)
        return [kept, loaded]

    return tiers
