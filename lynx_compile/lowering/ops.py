"""The `lynx::` operators the passes put into graphs.

lynx::batch_select(scores, logits, k, alpha, beta, confidence_gap, decode_token_bound)
    -> (values, indices)
    Drop-in for `torch.topk(scores, k)` at a routing site: same shapes, dtypes and meaning,
    with the indices chosen batch-aware (see `selection.py`). Inside torch.compile it never
    reaches Inductor as an opaque call: `expand_batch_select.py` replaces it by its aten body.

lynx::observe_selection(plain_indices, chosen_indices, router_weight, num_experts,
                        decode_token_bound, site) -> chosen_indices
    Identity on `chosen_indices` that reports both index sets to an active `lynx_compile.record()`;
    the router weight identifies the layer when one compiled graph serves several.
    Only compiled in by the recording variant of a graph.
"""

from __future__ import annotations

import torch

from . import selection

_lib = torch.library.Library("lynx", "FRAGMENT")  # noqa: TOR901 - kept alive for the process

_lib.define(
    "batch_select(Tensor scores, Tensor logits, int k, float alpha, int beta, "
    "float confidence_gap, SymInt decode_token_bound) -> (Tensor, Tensor)")
_lib.define(
    "observe_selection(Tensor plain_indices, Tensor chosen_indices, Tensor router_weight, int num_experts, "
    "SymInt decode_token_bound, str site) -> Tensor")


def _batch_select_impl(scores, logits, k, alpha, beta, confidence_gap, decode_token_bound):
    return selection.batch_select(scores, logits, k, alpha, beta, confidence_gap, decode_token_bound)


def _batch_select_fake(scores, logits, k, alpha, beta, confidence_gap, decode_token_bound):
    num_tokens = scores.shape[0]
    return (scores.new_empty((num_tokens, k)),
            scores.new_empty((num_tokens, k), dtype=torch.int64))


def _observe_impl(plain_indices, chosen_indices, router_weight, num_experts, decode_token_bound, site):
    from ..record import report_selection

    is_decode = decode_token_bound == selection.NO_DECODE_BOUND or plain_indices.shape[0] <= decode_token_bound
    report_selection(site, plain_indices, chosen_indices, router_weight, num_experts, is_decode)
    return chosen_indices.clone()


def _observe_fake(plain_indices, chosen_indices, router_weight, num_experts, decode_token_bound, site):
    return torch.empty_like(chosen_indices)


for _key in ("CPU", "CUDA"):
    _lib.impl("batch_select", _batch_select_impl, _key)
    _lib.impl("observe_selection", _observe_impl, _key)
torch.library.register_fake("lynx::batch_select", _batch_select_fake, lib=_lib)
torch.library.register_fake("lynx::observe_selection", _observe_fake, lib=_lib)

batch_select = torch.ops.lynx.batch_select.default
observe_selection = torch.ops.lynx.observe_selection.default
