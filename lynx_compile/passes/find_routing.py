"""Find the MoE routing sites of a post-grad graph: router linear -> scores -> top-k -> dispatch.

Detection is structural, so it covers any MoE written with these pieces, whatever the model is
called. A top-k is a routing site when all three hold:

  scores   the (T, E) top-k input is computed from a router linear `x @ W.T (+ b)` with W of
           shape (E, H), through only: dtype casts, softmax over E, increasing elementwise
           functions (sigmoid, softplus, sqrt, exp, log1p, tanh: DeepSeek-V4's sqrt(softplus)),
           adding a per-expert bias ((E,) or (1, E)), and masking to -inf (group-limited routing).
  top-k    over the last dim, largest, k < E <= config.max_experts.
  dispatch the top-k indices (through views) pick experts, proven one of two ways:
           - in the graph: they gather rows of a stacked (E, ., .) expert parameter, or are
             sorted and histogrammed into E bins (a grouped dispatch);
           - by the module that owns the router (`frame.py`): its parent module directly holds E
             stacked experts (a 3-D parameter of leading dim E, or E modules of one class). This
             is what a graph that ends at the top-k needs (transformers' `eager` experts loop
             graph-breaks right after routing: the indices leave the graph), and what a one-hot
             over E classes or a custom op taking the indices needs to count as a dispatch.
           - under expert parallelism, through a proven global -> local id mapping
             (`expert_parallel.py`) to a dispatch over this rank's E/R experts.
           - with zero-compute experts (columns that do no work), through a proven split
             (`zero_experts.py`) whose real ids reach a dispatch over the E real experts.
           Indices that only leave the graph, are one-hot encoded or feed a custom op, with no
           expert-holding module next to the router, are what a vocabulary or candidate top-k
           (draft trees, candidate lists) does too: not routing.

Anything else — a top-k for sampling, beam search, group selection inside DeepSeek's router,
or a score computation we do not understand — is reported with the reason and left untouched.
Sites are named by their full module path when the compiled frame's place in its model is known
(`FrameFacts.full_name`), else relative to the frame.

The phase of the batch is read from the (batch, seq, hidden) tensor the router's input was
flattened from; see `phase.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch.fx import Graph, Node

from ..config import LynxConfig
from ..policies import SiteSetting
from . import fx_match as fm
from .expert_parallel import ExpertParallelMapping, match_expert_parallel
from .frame import FrameFacts
from .fx_match import aten, prims
from .phase import PhaseDecision, decide_phase
from .zero_experts import ZeroExpertMapping, match_zero_experts


@dataclasses.dataclass
class RoutingSite:
    """One top-k found in a graph, routing or not, with what lynx decided about it."""

    topk: Node
    module_path: str | None
    reason: str  # why it is (or is not) rewritten, one line
    is_routing: bool = False
    router_form: str | None = None  # e.g. "softmax(linear)", "sigmoid(linear)+bias, masked"
    num_experts: int | None = None
    top_k: int | None = None
    dispatch: str | None = None  # how the indices are consumed
    floor_mask: Node | None = None  # the top-k input, when it masks with a constant floor, not -inf
    parallel: ExpertParallelMapping | None = None  # the proven expert-parallel id mapping, if any
    zero_experts: ZeroExpertMapping | None = None  # the proven split into real and zero-compute experts
    logits: Node | None = None  # router linear output (affinity, logit space)
    router_weight: Node | None = None  # the (E, H) parameter, as a graph input
    phase: PhaseDecision | None = None
    rewritten: bool = False
    experts: str | None = None  # what happened to the expert dispatch after it (fused / kept, why)
    setting: SiteSetting | None = None  # what it runs (resolved once, with the phase, for selectable sites)
    dynamo_node: str | None = None

    @property
    def label(self) -> str:
        return self.module_path or self.topk.name

    @property
    def routed_experts(self) -> int | None:
        """The columns that are real experts (E without the zero-compute ones)."""
        return self.zero_experts.num_experts if self.zero_experts is not None else self.num_experts

    @property
    def fusable(self) -> bool:
        """A routing top-k whose expert dispatch `fuse_experts` may replace: a selectable site, or a
        lone token's (T=1: nothing to select, but its k experts still computed by the fused op)."""
        return (self.is_routing and self.phase is not None and self.phase.fuses
                and fm.is_call(self.topk, aten.topk.default))

    @property
    def selectable(self) -> bool:
        """A routing top-k whose batches are (or may be) decode: what the later stages act on.
        Max-rounds routers left as written (`max_routing.py`) are reported, never acted on."""
        return (self.is_routing and self.phase is not None and self.phase.selects
                and fm.is_call(self.topk, aten.topk.default))


def find_routing_sites(graph: Graph, config: LynxConfig, frame: FrameFacts = FrameFacts()) -> list[RoutingSite]:
    return [classify_topk(node, config, frame) for node in graph.nodes if fm.is_call(node, aten.topk.default)]


def classify_topk(topk: Node, config: LynxConfig, frame: FrameFacts = FrameFacts()) -> RoutingSite:
    site = RoutingSite(topk=topk, module_path=frame.full_name(fm.module_path(topk)), reason="",
                       dynamo_node=fm.dynamo_origin(topk))
    scores, k = topk.args[0], topk.args[1]
    dim = _arg(topk, 2, "dim", -1)
    largest = _arg(topk, 3, "largest", True)
    shape = fm.shape_of(scores)

    if shape is None or len(shape) not in (2, 3) or dim not in (-1, len(shape) - 1):
        site.reason = f"top-k over a {len(shape) if shape else '?'}-D tensor along dim {dim}: " \
                      "not a (tokens, experts) or (batch, seq, experts) score matrix"
        return site
    num_experts = shape[-1]
    if not isinstance(num_experts, int):
        site.reason = "number of columns is symbolic: not a fixed set of experts"
        return site
    site.num_experts, site.top_k = num_experts, k
    rounds = topk.meta.get("lynx_max_rounds")  # a top-k lynx made from k rounds of max + mask
    if not largest:
        site.reason = "top-k picks the smallest values: not routing"
        return site
    if not isinstance(k, int) or not 1 <= k < num_experts:
        site.reason = f"k={k} of {num_experts}: nothing to select"
        return site
    if num_experts > config.max_experts:
        site.reason = f"{num_experts} columns > max_experts={config.max_experts}: a vocabulary, not experts"
        return site

    floored = floor_masked_input(scores)
    router = trace_router(scores if floored is None else floored, num_experts)
    if isinstance(router, str):
        site.reason = router
        return site
    site.logits, site.router_form = router
    if floored is not None:
        site.floor_mask = scores
        site.router_form += f", masked with {_fill_of(scores)}"
    if rounds:
        site.router_form += f", top-k as {rounds} rounds of max + mask"
    site.router_weight = router_weight(site.logits)

    dispatch = find_dispatch(topk, num_experts, lambda n: router_holds_experts(site.logits, n, frame))
    if not dispatch.routes:
        site.reason = dispatch.description
        return site
    site.dispatch, site.parallel, site.zero_experts = dispatch.description, dispatch.parallel, dispatch.zero_experts
    site.is_routing = True

    site.phase = decide_phase(site.logits, config)
    site.reason = site.phase.reason
    if site.phase.fuses:  # a lone token's setting too: it decides whether its dispatch is fused
        site.setting = config.site_setting(site.label, num_experts, k, parallel_ranks(site.parallel))
    return site


def parallel_ranks(parallel: ExpertParallelMapping | None) -> int | None:
    """The expert-parallel ranks a site's proven mapping shards its experts over (None: no EP)."""
    return parallel.ranks if parallel is not None else None


def _arg(node: Node, index: int, name: str, default: object) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


# --- scores: from the top-k input back to the router linear ------------------------------------

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


def _fill_of(where: Node) -> str:
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


# --- indices: are they used to pick experts? ------------------------------------------------------

def router_holds_experts(logits: Node, num_experts: int, frame: FrameFacts) -> bool:
    """Whether the module owning the router linear sits in a module that directly holds E
    stacked experts (`FrameFacts.expert_stacks`; paths relative to the frame)."""
    router = fm.module_path(logits)
    if router is None:  # the frame's owner is the router (compiled on its own): its parent is outside
        return frame.holds_experts(None, num_experts) or frame.holds_experts("", num_experts)
    parent = router.rsplit(".", 1)[0] if "." in router else ""
    return frame.holds_experts(parent, num_experts) or frame.holds_experts(router, num_experts)


def _no_expert_module(num_experts: int) -> bool:
    return False


@dataclasses.dataclass(frozen=True)
class DispatchEvidence:
    """How a top-k's indices reach an expert dispatch ("sorted by expert", ...), or why they do
    not ("not routing: ..."), and the expert-parallel mapping they go through on the way."""

    description: str
    parallel: ExpertParallelMapping | None = None
    zero_experts: ZeroExpertMapping | None = None

    @property
    def routes(self) -> bool:
        return not self.description.startswith("not routing")


def find_dispatch(topk: Node, num_experts: int,
                  holds_experts: Callable[[int], bool] = _no_expert_module) -> DispatchEvidence:
    """How the top-k indices reach an expert dispatch, or why they do not."""
    indices = fm.getitem_users(topk).get(1)
    if indices is None or not indices.users:
        return DispatchEvidence("not routing: the indices are unused (e.g. a top-k sampling threshold)")
    return dispatch_of([indices], num_experts, holds_experts)


# Evidence that needs the router's module to hold E stacked experts too (a candidate top-k over a
# vocabulary can leave the graph, be one-hot encoded or feed a custom op just the same).
_NEEDS_EXPERT_MODULE = ("deferred to the next graph", "one-hot over experts", "custom op", "scattered into")


def dispatch_of(indices: list[Node], num_experts: int,
                holds_experts: Callable[[int], bool] = _no_expert_module) -> DispatchEvidence:
    """How these expert-index tensors reach an expert dispatch, or why they do not.

    holds_experts(n): the router's module sits in one that holds n stacked experts
    (`router_holds_experts`), which the weak kinds of evidence need. Ids mapped to this rank's
    experts (`expert_parallel.py`) must reach a dispatch over the rank's L experts."""
    mapping = match_expert_parallel(indices, num_experts)
    if isinstance(mapping, str):
        return DispatchEvidence(mapping)
    if mapping is not None:
        # the experts' forward may clamp the sentinel into range before gathering (and mask its rows)
        clamped = [u for u in fm.layout_users(mapping.local_ids)
                   if fm.is_call(u, aten.clamp.default, aten.clamp_max.default)]
        local = _evidence([mapping.local_ids, *clamped], mapping.local_experts, holds_experts)
        if local.startswith("not routing"):
            return DispatchEvidence(f"{local} (after the expert-parallel mapping: {mapping.describe()})")
        return DispatchEvidence(f"{mapping.describe()}; local ids: {local}", mapping)
    zero = match_zero_experts(indices, num_experts)
    if isinstance(zero, str):
        return DispatchEvidence(zero)
    if zero is not None:
        real = _evidence([zero.real_ids], zero.num_experts, holds_experts)
        if real.startswith("not routing"):
            return DispatchEvidence(f"{real} (after the zero-compute split: {zero.describe()})")
        return DispatchEvidence(f"{zero.describe()}; real ids: {real}", zero_experts=zero)
    return DispatchEvidence(_evidence(indices, num_experts, holds_experts))


def _evidence(indices: list[Node], num_experts: int, holds_experts: Callable[[int], bool]) -> str:
    """The dispatch evidence of ids used directly (no expert-parallel mapping), or why they are
    not routing."""
    expert_module = holds_experts(num_experts)
    evidence: list[str] = []
    for user in (user for node in indices for user in fm.layout_users(node)):
        found = _dispatch_kind(user, num_experts)
        if found is None:
            continue
        if found.startswith("not routing"):
            return found
        evidence.append(found)
    if not evidence:
        return "not routing: the indices do not select experts"
    strong = [e for e in evidence if not e.startswith(_NEEDS_EXPERT_MODULE)]
    if not strong and not expert_module:
        return (f"not routing: the indices are only {', '.join(sorted(set(evidence)))}, and no module next to the "
                f"router holds {num_experts} stacked experts (a vocabulary or candidate top-k does the same)")
    if not strong:
        evidence.append(f"the router's module holds {num_experts} stacked experts")
    return ", ".join(sorted(set(evidence)))


_INDEX_ARITHMETIC = frozenset({
    aten.div.Tensor, aten.div.Tensor_mode, aten.div.Scalar, aten.div.Scalar_mode,
    aten.remainder.Scalar, aten.remainder.Tensor, aten.floor_divide.default,
    aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor,
})


def _dispatch_kind(user: Node, num_experts: int) -> str | None:
    if user.op == "output":
        return "deferred to the next graph (experts loop)"
    if user.op != "call_function":
        return None
    if user.target in _INDEX_ARITHMETIC:
        return f"not routing: the indices are used as numbers ({fm.op_name(user)}), e.g. beam search"
    if user.target in (aten.index.Tensor, aten.embedding.default, aten.index_select.default):
        table = user.args[0]  # the tensor being indexed (the weight, for embedding)
        source = fm.through_layout(table) if isinstance(table, Node) else None
        shape = fm.shape_of(table)
        if shape and len(shape) == 3 and shape[0] == num_experts and source is not None \
                and source.op in ("placeholder", "get_attr"):
            return "gathers stacked expert weights"
        return None
    if user.target is aten.eq.Tensor:
        other = [a for a in user.args if a is not None]
        for arg in other:
            if fm.is_call(arg, prims.iota.default) and arg.args[0] in (num_experts, num_experts + 1):
                return "one-hot over experts"
        return None
    if user.target is aten.one_hot.default:
        return "one-hot over experts"
    if user.target in (aten.scatter.src, aten.scatter.value, aten.scatter_add.default) and user.args[2] is not None \
            and len(user.args) > 2 and _is_index_of(user, 2):
        shape = fm.shape_of(user)
        if shape and shape[-1] == num_experts:
            return "scattered into a dense (T, E) routing matrix"
        return None
    if user.target is aten.sort.default:
        return "sorted by expert" if _histogrammed(user, num_experts) else None
    target = user.target
    if isinstance(target, torch._ops.OpOverload) and target.namespace not in ("aten", "prims"):
        return f"custom op {fm.op_name(user)}"
    return None


def _is_index_of(user: Node, position: int) -> bool:
    """Whether the indices (through layout ops) are `user`'s argument at `position`."""
    return isinstance(user.args[position], Node)


def _histogrammed(sort: Node, num_experts: int) -> bool:
    sorted_values = fm.getitem_users(sort).get(0)
    if sorted_values is None:
        return False
    for user in fm.layout_users(sorted_values):
        if fm.is_call(user, aten.histc.default) and user.args[1] == num_experts:
            return True
        if fm.is_call(user, aten.bincount.default):
            return True
    return False
