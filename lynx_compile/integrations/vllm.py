"""lynx's selection inside vLLM: the routing function vLLM's fused MoE layers call, and a plugin.

vLLM runs routing inside its opaque `vllm::moe_forward`, so a compiler pass sees only the router
logits go in; its hook is the FusedMoE layer's routing function:

    custom_routing_function(hidden_states, gating_output, topk, renormalize) -> (topk_weights, topk_ids)

with `gating_output` the (T, E) router logits, `topk_weights` (T, k) float32 and `topk_ids` (T, k)
int32. `routing_function(...)` returns one that runs lynx's selection (`policies/`, under the
shared contract) on decode batches and plain softmax top-k otherwise, so every token still gets k
distinct experts and vLLM's fused_moe kernel, which skips experts no token uses, reads fewer.

    from lynx_compile.integrations.vllm import routing_function
    FusedMoE(..., custom_routing_function=routing_function("protected_mass", keep_mass=0.8))

The plugin (`register`, through the `vllm.general_plugins` entry point this package declares)
installs it for every fused MoE layer built after it runs, where the layer takes a custom routing
function (grouped top-k routers refuse one: they keep vLLM's own routing), when the environment
variable LYNX_VLLM_POLICY names a policy (LYNX_VLLM_PARAMS: its parameters as JSON).

What was verified here: the routing function, standalone on CPU, against the contract
(tests/integrations/test_vllm.py). What was not: anything inside vLLM. vLLM cannot be installed
on this project's machines (it needs a CUDA build of torch), so the plugin's hook into
`FusedMoE.__init__` follows vLLM's source as read, not as run. Nothing here imports vLLM at
module import time.

Decode batches: vLLM batches prefill and decode tokens together (chunked prefill), and only a
pure decode batch is remapped (prefill remapping hurts accuracy, as lynx's own phase rule says).
The routing function asks vLLM's forward context how many prefill tokens the batch holds when it
can; otherwise (and in tests) a batch of at most `max_decode_tokens` tokens counts as decode.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch

from .. import policies

POLICY_ENV, PARAMS_ENV = "LYNX_VLLM_POLICY", "LYNX_VLLM_PARAMS"


def routing_function(policy: str = "protected_mass", max_decode_tokens: int = 256,
                     **params) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """vLLM's `custom_routing_function` running `policy` on decode batches.

    params: the policy's parameters (defaults for the layer's E and k where not given);
    max_decode_tokens: without vLLM's forward context, batches of at most this many tokens are
    decode. Raises LynxOptionsError for an unknown policy or a bad parameter."""
    policies.check_parameters(policy, params)

    def route(hidden_states: torch.Tensor, gating_output: torch.Tensor, topk: int,
              renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # hidden_states (T, H) unused: selection reads only the router logits; gating_output (T, E)
        logits = gating_output.float()
        scores = torch.softmax(logits, dim=-1)  # what vLLM's fused_topk ranks
        num_tokens, num_experts = scores.shape
        if policy != "none" and num_tokens > 1 and _is_decode(num_tokens, max_decode_tokens):
            resolved = policies.resolve_parameters(policy, params, num_experts, topk)
            weights, ids = policies.select(policy, scores, logits, topk, **resolved)
        else:
            weights, ids = torch.topk(scores, topk, dim=-1)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.float(), ids.to(torch.int32)

    route.lynx_policy = policy
    return route


def _is_decode(num_tokens: int, max_decode_tokens: int) -> bool:
    """No prefill token in the batch, by vLLM's forward context where there is one."""
    try:
        from vllm.forward_context import get_forward_context  # only inside vLLM
    except ImportError:
        return num_tokens <= max_decode_tokens
    try:
        metadata = get_forward_context().attn_metadata
    except Exception:  # noqa: BLE001 - no context set (a profiling run, a test): the token bound
        return num_tokens <= max_decode_tokens
    prefills = getattr(metadata, "num_prefill_tokens", None) if metadata is not None else None
    if prefills is None and isinstance(metadata, dict):  # per-layer metadata
        first = next(iter(metadata.values()), None)
        prefills = getattr(first, "num_prefill_tokens", None)
    return prefills == 0 if prefills is not None else num_tokens <= max_decode_tokens


def register() -> None:
    """The `vllm.general_plugins` entry point: install the routing function on every fused MoE
    layer built afterwards, when LYNX_VLLM_POLICY names a policy. Not run here (no vLLM)."""
    policy = os.environ.get(POLICY_ENV)
    if not policy:
        return
    params = json.loads(os.environ.get(PARAMS_ENV, "{}"))
    route = routing_function(policy, **params)
    from vllm.model_executor.layers.fused_moe import layer as fused_moe_layer  # only inside vLLM

    original_init = fused_moe_layer.FusedMoE.__init__

    def init(self, *args, **kwargs):
        grouped = kwargs.get("use_grouped_topk") or kwargs.get("num_expert_group")
        if kwargs.get("custom_routing_function") is None and not grouped:
            kwargs["custom_routing_function"] = route
        original_init(self, *args, **kwargs)

    fused_moe_layer.FusedMoE.__init__ = init
