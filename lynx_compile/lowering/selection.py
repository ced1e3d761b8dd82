"""The body of `lynx::batch_select`: a policy's selection on decode batches, plain top-k otherwise.

Legend: T tokens in the batch, E routed experts, k experts per token.

    values, indices = batch_select(scores, logits, k, policy, params, decode_token_bound, live)

is a drop-in for `torch.topk(scores, k)` at a routing site (same shapes, dtypes and meaning):
the policy (`lynx_compile/policies/`) states which experts it prefers from the voting rows, and the
shared contract (`policies/contract.py:select_experts`) turns that into k distinct experts per
token. This body is traced into the post-grad graph (`passes/lower_selection.py`), so every line
becomes aten ops Inductor generates code for.

The decode rule lives here, once (`is_decode`): a site the compiler proved decode-only carries
`NO_DECODE_BOUND`; any other site carries a bound, and a batch of T tokens is decode iff T <= bound
(the bound is the batch size when seq is symbolic, or `max_decode_tokens`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .. import policies
from ..policies.contract import plain_topk, policy_view, select_experts

NO_DECODE_BOUND = -1  # decode_token_bound value meaning "every batch at this site is decode"


def is_decode(num_tokens, decode_token_bound):
    """Whether a batch of `num_tokens` is a decode batch at a site with this bound.

    num_tokens: an int, or a () int64 tensor inside compiled bodies (so a symbolic T never turns
    into a guard); the result is then a () bool tensor. decode_token_bound: NO_DECODE_BOUND, an int
    or a SymInt."""
    if isinstance(decode_token_bound, int) and decode_token_bound == NO_DECODE_BOUND:
        return True
    return num_tokens <= decode_token_bound


def batch_select(
    scores: torch.Tensor,  # (T, E) what the model's top-k ranks
    logits: torch.Tensor,  # (T, E) router logits
    k: int,
    policy: str,
    params: Mapping[str, int | float],  # the policy's parameters, resolved (policies.PARAMETERS)
    decode_token_bound: int = NO_DECODE_BOUND,
    live: torch.Tensor | None = None,  # (T,) bool or None (every row votes)
    num_routed: int | None = None,  # columns from here on are zero-compute experts (free); None: none
) -> tuple[torch.Tensor, torch.Tensor]:  # values (T, k) scores.dtype, indices (T, k) int64
    """`policy`'s selection on decode batches (`is_decode`), plain top-k otherwise.

    Raises ValueError for an unknown policy or parameters the policy does not take."""
    plain_values, plain_indices = plain_topk(scores, k)
    preferences = policies.preferences(policy, policy_view(scores, num_routed), logits, k, **params)
    values, indices = select_experts(scores, logits, k, preferences, live, plain_indices, num_routed)
    if isinstance(decode_token_bound, int) and decode_token_bound == NO_DECODE_BOUND:
        return values, indices
    decode = is_decode(scores.new_full((), scores.shape[0], dtype=torch.int64), decode_token_bound)  # () bool
    return torch.where(decode, values, plain_values), torch.where(decode, indices, plain_indices)
