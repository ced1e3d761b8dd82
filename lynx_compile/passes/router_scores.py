"""Scores: from a top-k's input back to the router linear, or why the scores are not a router's.

A routing top-k ranks (T, E) scores computed from a router linear `x @ W.T (+ b)`, W an (E, H)
parameter, through only steps that keep each token's order of experts or mask experts out:

  dtype casts, reshapes that keep the expert dim
  softmax over E (decomposed: exp(x - amax(x)) / sum(...))
  increasing elementwise functions: sigmoid, softplus, sqrt, exp, log1p, tanh
  adding a per-expert bias, (E,) or (1, E) (DeepSeek's and LongCat's e_score_correction_bias)
  masking to -inf (group-limited routing), or to a constant <= 0 over positive scores (a softmax
  or a sigmoid: DeepSeek-V2 fills 0.0), which ranks the same (`floor_masked_input`)

`trace_router` walks these back and returns the router's logits node and the form it read
("sqrt(softplus(linear))+bias", "softmax(linear), masked"); `find_routing.py` decides the rest.
"""

from __future__ import annotations

from torch.fx import Graph, Node

from . import fx_match as fm
from .fx_match import aten, prims


def trace_router(scores: Node, num_experts: int) -> tuple[Node, str] | str:
    """Return (router logits node, form) or the reason the scores are not understood."""
    steps: list[str] = []
    node = scores
    for _ in range(32):
        if fm.is_call(node, aten.mm.default, aten.addmm.default):
            problem = _check_router_linear(node, num_experts)
            if problem:
                return problem
            form = "linear"
            for step in reversed(steps):
                form = f"{step}({form})" if step.isidentifier() else f"{form}{step}"
            return node, form
        if fm.is_call(node, *fm.LAYOUT_OPS):
            source_shape = fm.shape_of(node.args[0])
            if not source_shape or source_shape[-1] != num_experts:
                return "scores are reshaped across the expert dim: not a router output"
            node = node.args[0]
            continue
        softmax_input = _softmax_input(node)
        if softmax_input is not None:
            steps.append("softmax")
            node = softmax_input
            continue
        if fm.is_call(node, *_INCREASING):
            steps.append(_INCREASING[node.target])
            node = node.args[0]
            continue
        softplus_input = _softplus_input(node)
        if softplus_input is not None:
            steps.append("softplus")
            node = softplus_input
            continue
        biased = _bias_input(node, num_experts)
        if biased is not None:
            steps.append("+bias")
            node = biased
            continue
        masked = _masked_input(node)
        if masked is not None:
            if ", masked" not in steps:
                steps.append(", masked")
            node = masked
            continue
        what = fm.op_name(node) if isinstance(node, Node) else type(node).__name__
        return f"scores come from {what}, not from a router linear over the experts"
    return "scores are too far from any router linear"


def router_weight(mm: Node) -> Node:
    weight = mm.args[2] if mm.target is aten.addmm.default else mm.args[1]
    return fm.through_layout(weight)


def _check_router_linear(mm: Node, num_experts: int) -> str | None:
    weight = mm.args[2] if mm.target is aten.addmm.default else mm.args[1]
    weight_source = router_weight(mm)
    weight_shape = fm.shape_of(weight)  # (H, E) as used by the mm
    if weight_shape is None or weight_shape[-1] != num_experts:
        return "router matmul output does not have one column per expert"
    if weight_source.op not in ("placeholder", "get_attr"):
        return f"router weight is computed ({fm.op_name(weight_source)}), not a parameter"
    return None


def _softmax_input(node: Node) -> Node | None:
    """x if node is the decomposed softmax exp(x - amax(x)) / sum(exp(x - amax(x))) over E."""
    if not fm.is_call(node, aten.div.Tensor):
        return None
    exp, denominator = node.args
    if not (fm.is_call(exp, aten.exp.default) and fm.is_call(denominator, aten.sum.dim_IntList)):
        return None
    last = len(fm.shape_of(node) or (0, 0)) - 1
    if denominator.args[0] is not exp or list(denominator.args[1]) not in ([-1], [last]):
        return None
    shifted = exp.args[0]
    if fm.is_call(shifted, aten.sub.Tensor) and fm.is_call(shifted.args[1], aten.amax.default):
        return shifted.args[0]
    return None


# Elementwise functions that keep each token's order of experts (strictly increasing).
_INCREASING = {aten.sigmoid.default: "sigmoid", aten.sqrt.default: "sqrt", aten.exp.default: "exp",
               aten.log1p.default: "log1p", aten.tanh.default: "tanh"}


def _softplus_input(node: Node) -> Node | None:
    """x if node is softplus(x) as Inductor decomposes it: where(x > threshold, x, log1p(exp(x)))."""
    if not fm.is_call(node, aten.where.self):
        return None
    condition, above, below = node.args
    if not (fm.is_call(condition, aten.gt.Scalar) and condition.args[0] is above and isinstance(condition.args[1], (int, float))):
        return None
    if fm.is_call(below, aten.log1p.default) and fm.is_call(below.args[0], aten.exp.default) \
            and below.args[0].args[0] is above:
        return above
    return None


def _bias_input(node: Node, num_experts: int) -> Node | None:
    """x if node is x + b with b a per-expert vector, (E,) or (1, E) (DeepSeek's and LongCat's
    e_score_correction_bias)."""
    if not fm.is_call(node, aten.add.Tensor):
        return None
    left, right = node.args[:2]
    for x, bias in ((left, right), (right, left)):
        if fm.shape_of(bias) in ((num_experts,), (1, num_experts)) and fm.shape_of(x) is not None \
                and len(fm.shape_of(x)) in (2, 3):
            return x
    return None


def _masked_input(node: Node) -> Node | None:
    """x if node is where(mask, -inf, x) / where(mask, x, -inf) / masked_fill(x, mask, -inf)."""
    if fm.is_call(node, aten.where.self):
        _cond, a, b = node.args
        if _is_neg_inf(a):
            return b
        if _is_neg_inf(b):
            return a
    if fm.is_call(node, aten.masked_fill.Scalar) and node.args[2] == float("-inf"):
        return node.args[0]
    return None


def floor_masked_input(node: Node) -> Node | None:
    """x if node is where(mask, c, x) / where(mask, x, c) with a constant c <= 0 and x scores that
    are positive wherever finite (a softmax or a sigmoid: DeepSeek-V2's group limit fills 0.0).

    Why such a mask is the -inf mask for a top-k: every unmasked score is > 0 >= c, so the masked
    experts rank below all others, exactly where -inf puts them (up to an unmasked score that
    underflows to exactly 0.0, whose slot then weighs 0 either way). The rewrite hands selection
    the -inf form (`neg_inf_mask`), so a masked expert is never eligible."""
    if not fm.is_call(node, aten.where.self):
        return None
    _cond, a, b = node.args
    for fill, x in ((a, b), (b, a)):
        if _constant(fill) is not None and _constant(fill) <= 0 and isinstance(x, Node) and _positive(x):
            return x
    return None


def neg_inf_mask(graph: Graph, floor_mask: Node) -> Node:
    """Insert (at the current insertion point) floor_mask's where with its constant fill replaced
    by -inf: the same scores where unmasked, ineligible where masked."""
    cond, a, b = floor_mask.args
    fill_first = _constant(a) is not None and isinstance(b, Node) and _positive(b)
    value = fm.fake_value(floor_mask)
    neg_inf = graph.call_function(aten.scalar_tensor.default, (float("-inf"),),
                                  {"dtype": value.dtype, "device": value.device})
    neg_inf.meta["val"] = value.new_empty(())
    masked = graph.call_function(aten.where.self, (cond, neg_inf, b) if fill_first else (cond, a, neg_inf))
    masked.meta["val"] = value.new_empty(value.shape)
    return masked


def _constant(node: object) -> float | None:
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return float(node)
    if fm.is_call(node, aten.scalar_tensor.default) and isinstance(node.args[0], (int, float)):
        return float(node.args[0])
    if fm.is_call(node, aten.full.default) and node.args[0] in ([], ()) and isinstance(node.args[1], (int, float)):
        return float(node.args[1])
    return None


def fill_of(where: Node) -> str:
    _cond, a, b = where.args
    fill = _constant(a) if _constant(a) is not None else _constant(b)
    return f"{fill:g}"


def _positive(node: Node) -> bool:
    """Scores > 0 wherever finite: a softmax over the last dim or a sigmoid (through dtype casts)."""
    while fm.is_call(node, prims.convert_element_type.default):
        node = node.args[0]
    return _softmax_input(node) is not None or fm.is_call(node, aten.sigmoid.default)


def _is_neg_inf(node: object) -> bool:
    if node == float("-inf"):
        return True
    if fm.is_call(node, aten.full.default):
        return node.args[1] == float("-inf")
    return fm.is_call(node, aten.scalar_tensor.default) and node.args[0] == float("-inf")
