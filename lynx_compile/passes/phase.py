"""Decide, per routing site, whether its batches are decode batches.

Lynx only remaps decode batches: remapping prefill tokens costs accuracy, and prefill is
compute-bound anyway. A decode batch is one where each sequence contributes one new token. MoE
blocks flatten (batch, seq, hidden) into (T, hidden) tokens before the router, so we find that
3-D tensor and read seq off its shape:

  T == 1 (one token per call)  -> "single": left alone. A lone token's own top-k already uses the
                                 fewest experts any policy could (k), so selection would only move
                                 its choices; Dynamo specializes size 1, so a B=1 decode step gets
                                 a graph of its own, which stays exactly default Inductor's
  seq == 1 provably           -> "decode": always select (no runtime test at all), unless the
                                 graph's attention proves nothing is cached (keys of length 1):
                                 then it is the prefill of one-token prompts -> "prefill"
  seq != 1 provably           -> "prefill": leave the top-k untouched
  seq symbolic, not decidable -> "runtime": select iff T <= batch (i.e. seq == 1), tested on
                                 tensors inside the kernel, so no guard and no recompile

Sizes are sympy expressions in the graph's ShapeEnv; `statically_known_true` answers from the
facts it already holds (Dynamo specializes 0/1 sizes, and gives symbolic sizes the range [2, inf))
without adding a guard. When no flatten is visible, `max_decode_tokens` says how many tokens a
decode batch can hold (T <= bound), decided the same three ways; without it we leave the site.
"""

from __future__ import annotations

import dataclasses

from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..config import LynxConfig
from . import fx_match as fm
from .fx_match import aten


@dataclasses.dataclass
class PhaseDecision:
    mode: str  # "decode" | "prefill" | "runtime" | "unknown" | "single"
    reason: str
    tokens_from: Node | None = None  # the (batch, seq, hidden) tensor, when visible
    token_bound: int | None = None  # runtime bound from max_decode_tokens

    @property
    def selects(self) -> bool:
        return self.mode in ("decode", "runtime")

    @property
    def fuses(self) -> bool:
        """Batches that may be decode steps, a lone token's (T=1) included: its experts' dispatch
        is fused although there is nothing to select."""
        return self.selects or self.mode == "single"


def decide_phase(router_logits: Node, config: LynxConfig) -> PhaseDecision:
    router_input = router_logits.args[1] if router_logits.target is aten.addmm.default else router_logits.args[0]
    num_tokens = fm.shape_of(router_input)[0]
    batched = find_token_flatten(router_input)
    if isinstance(num_tokens, int) and num_tokens == 1:
        return PhaseDecision("single", "not rewritten: one token per call (T=1): its own top-k already uses the "
                                       "fewest experts any policy could", batched)
    if config.phase == "all":
        return PhaseDecision("decode", "rewritten: phase='all' remaps every batch", batched)

    if batched is not None:
        seq = fm.shape_of(batched)[1]
        if statically_known_true(seq == 1):
            fresh = first_forward_attention(router_logits.graph)
            if fresh is not None:
                return PhaseDecision("prefill", "not rewritten: prefill of one-token prompts (seq len 1, "
                                                f"but {fresh.name}'s keys hold only the new tokens: nothing cached)",
                                     batched)
            return PhaseDecision("decode", "rewritten: decode graph (seq len 1)", batched)
        if statically_known_true(seq != 1):
            return PhaseDecision("prefill", f"not rewritten: prefill graph (seq len {seq})", batched)
        return PhaseDecision("runtime", f"rewritten: seq len {seq} decided at run time", batched)

    bound = config.max_decode_tokens
    if bound is None:
        return PhaseDecision("unknown", "not rewritten: phase unknown (no (batch, seq, hidden) "
                                        "flatten before the router); set max_decode_tokens")
    if statically_known_true(num_tokens <= bound):
        return PhaseDecision("decode", f"rewritten: {num_tokens} tokens <= max_decode_tokens={bound}")
    if statically_known_true(num_tokens > bound):
        return PhaseDecision("prefill", f"not rewritten: {num_tokens} tokens > max_decode_tokens={bound}")
    return PhaseDecision("runtime", f"rewritten: {num_tokens} tokens <= {bound} decided at run time",
                         token_bound=bound)


# Fused attention ops as they appear in post-grad graphs: (query, key, value, ...), (B, heads, seq, d).
_ATTENTION_OPS = tuple(op for op in (
    getattr(aten, name, None) for name in (
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
        "scaled_dot_product_attention"))
    if op is not None)


def first_forward_attention(graph: Graph) -> Node | None:
    """An attention node proving this one-token-per-sequence graph is a prefill, or None.

    A decode step attends to cached keys: its keys are longer than its one new token. When every
    fused attention in the graph has queries of length 1 and keys provably of length 1, nothing
    was cached: this is the first forward of one-token prompts, i.e. their prefill. Graphs without
    fused attention (an MoE block compiled alone, eager attention) and static caches (keys always
    max_cache_len long) cannot tell the two apart and keep the seq-len-1 rule.
    """
    attention = [node for node in graph.nodes
                 if node.op == "call_function" and getattr(node.target, "overloadpacket", None) in _ATTENTION_OPS]
    if not attention:
        return None
    for node in attention:
        query, key = (fm.shape_of(arg) for arg in node.args[:2])
        if not (query and key and len(query) == 4 and len(key) == 4):
            return None
        if not (statically_known_true(query[2] == 1) and statically_known_true(key[2] == 1)):
            return None
    return attention[0]


def find_token_flatten(router_input: Node) -> Node | None:
    """The (batch, seq, hidden) tensor that was flattened into the router's (T, hidden) input.

    Walks up through layout ops and through per-token ops (a normalization, a scale: ops whose
    output is (T, hidden) again), which never mix tokens, so the T rows still are the batch's
    B * S positions in order; through a (seq, batch) swap back to the (batch, seq) tensor
    (`_before_seq_first`). A model whose own activations are seq-first has its batch read as seq."""
    tokens = fm.shape_of(router_input)
    if tokens is None or len(tokens) != 2:
        return None
    seen: set[Node] = set()
    stack = [router_input]
    while stack and len(seen) < 64:
        node = stack.pop()
        if node in seen or not isinstance(node, Node):
            continue
        seen.add(node)
        shape = fm.shape_of(node)
        if shape is not None and len(shape) == 3 and shape[2] == tokens[1] \
                and statically_known_true(shape[0] * shape[1] == tokens[0]):
            return _before_seq_first(node)
        if fm.is_call(node, *fm.LAYOUT_OPS) and isinstance(node.args[0], Node):
            stack.append(node.args[0])
        elif node.op == "call_function" and shape == tokens:
            stack.extend(arg for arg in node.all_input_nodes if _per_token_input(arg, tokens))
    return None


def _before_seq_first(flattened: Node) -> Node:
    """The (batch, seq, hidden) tensor itself when the block turned it seq-first before flattening
    (a permute swapping dims 0 and 1, Megatron's [s, b, h] inside): reading seq from the swapped
    tensor would take a B=1 prefill of S tokens for a decode step of S sequences."""
    node = flattened
    for _ in range(8):
        if fm.is_call(node, aten.permute.default) and list(node.args[1]) in ([1, 0, 2], [1, 0, -1]):
            source = node.args[0]
            return source if len(fm.shape_of(source) or ()) == 3 else flattened
        if not (fm.is_call(node, *fm.LAYOUT_OPS) and isinstance(node.args[0], Node)
                and len(fm.shape_of(node.args[0]) or ()) == 3):
            break
        node = node.args[0]
    return flattened


def _per_token_input(node: Node, tokens: tuple) -> bool:
    """An input a per-token op reads row by row: the (T, hidden) rows, or their (T, 1) statistics."""
    shape = fm.shape_of(node)
    return shape is not None and len(shape) == 2 and shape[1] in (tokens[1], 1) \
        and statically_known_true(shape[0] == tokens[0])


def batch_size_node(graph_node: Node) -> Node:
    """Insert (before the current insertion point) a node computing the batch dim as a SymInt."""
    graph = graph_node.graph
    size = graph.call_function(aten.sym_size.int, (graph_node, 0))
    size.meta["val"] = fm.fake_value(graph_node).shape[0]
    return size
