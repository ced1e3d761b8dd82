"""Dispatch evidence: whether a top-k's indices choose experts, and how (`explain`'s column).

The indices (through views) pick experts when, in the graph, they gather rows of a stacked
(E, ., .) expert parameter or are sorted and histogrammed into E bins (a grouped dispatch); or,
weaker evidence that needs the router's module to hold E stacked experts too (`frame.py`), they
leave the graph, are one-hot encoded, scattered into a dense (T, E) matrix or fed to a custom op.
Under expert parallelism (`expert_parallel.py`) or with zero-compute experts (`zero_experts.py`)
they reach such a dispatch through a proven id mapping. Indices used as numbers (beam search's
arithmetic) or only leaving the graph with no expert-holding module next to the router are what a
vocabulary or candidate top-k does: not routing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch.fx import Node

from . import fx_match as fm
from .expert_parallel import ExpertParallelMapping, match_expert_parallel
from .frame import FrameFacts
from .fx_match import aten, prims
from .zero_experts import ZeroExpertMapping, match_zero_experts


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What the compiled model's modules say about a router (`frame.py`), for evidence the graph
    alone cannot give: whether its module sits beside n stacked experts, and whether a 3-D graph
    input is one of the model's parameters (not a buffer). Without a frame: nothing held, every
    3-D input accepted."""

    holds_experts: Callable[[int], bool] = lambda num_experts: False
    is_parameter_stack: Callable[[tuple], bool] = lambda shape: True


def router_facts(logits: Node, frame: FrameFacts) -> ModelFacts:
    """The facts about the router whose linear output is `logits`."""
    return ModelFacts(lambda num_experts: router_holds_experts(logits, num_experts, frame), frame.is_parameter_stack)


def router_holds_experts(logits: Node, num_experts: int, frame: FrameFacts) -> bool:
    """Whether the module owning the router linear sits in a module that directly holds E
    stacked experts (`FrameFacts.expert_stacks`; paths relative to the frame)."""
    router = fm.module_path(logits)
    if router is None:  # the frame's owner is the router (compiled on its own): its parent is outside
        return frame.holds_experts(None, num_experts) or frame.holds_experts("", num_experts)
    parent = router.rsplit(".", 1)[0] if "." in router else ""
    return frame.holds_experts(parent, num_experts) or frame.holds_experts(router, num_experts)


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


def find_dispatch(topk: Node, num_experts: int, facts: ModelFacts = ModelFacts()) -> DispatchEvidence:
    """How the top-k indices reach an expert dispatch, or why they do not."""
    indices = fm.getitem_users(topk).get(1)
    if indices is None or not indices.users:
        return DispatchEvidence("not routing: the indices are unused (e.g. a top-k sampling threshold)")
    return dispatch_of([indices], num_experts, facts)


# Evidence that needs the router's module to hold E stacked experts too (a candidate top-k over a
# vocabulary can leave the graph, be one-hot encoded or feed a custom op just the same).
_NEEDS_EXPERT_MODULE = ("deferred to the next graph", "one-hot over experts", "custom op", "scattered into")


def dispatch_of(indices: list[Node], num_experts: int, facts: ModelFacts = ModelFacts()) -> DispatchEvidence:
    """How these expert-index tensors reach an expert dispatch, or why they do not.

    facts: what the model says about the router (`router_facts`): the weak kinds of evidence need
    its module to hold E stacked experts, a gather needs its table to be a parameter. Ids mapped
    to this rank's experts (`expert_parallel.py`) must reach a dispatch over the rank's L experts."""
    mapping = match_expert_parallel(indices, num_experts)
    if isinstance(mapping, str):
        return DispatchEvidence(mapping)
    if mapping is not None:
        # the experts' forward may clamp the sentinel into range before gathering (and mask its rows)
        clamped = [u for u in fm.layout_users(mapping.local_ids)
                   if fm.is_call(u, aten.clamp.default, aten.clamp_max.default)]
        local = _evidence([mapping.local_ids, *clamped], mapping.local_experts, facts)
        if local.startswith("not routing"):
            return DispatchEvidence(f"{local} (after the expert-parallel mapping: {mapping.describe()})")
        return DispatchEvidence(f"{mapping.describe()}; local ids: {local}", mapping)
    zero = match_zero_experts(indices, num_experts)
    if isinstance(zero, str):
        return DispatchEvidence(zero)
    if zero is not None:
        real = _evidence([zero.real_ids], zero.num_experts, facts)
        if real.startswith("not routing"):
            return DispatchEvidence(f"{real} (after the zero-compute split: {zero.describe()})")
        return DispatchEvidence(f"{zero.describe()}; real ids: {real}", zero_experts=zero)
    return DispatchEvidence(_evidence(indices, num_experts, facts))


def _evidence(indices: list[Node], num_experts: int, facts: ModelFacts) -> str:
    """The dispatch evidence of ids used directly (no expert-parallel mapping), or why they are
    not routing."""
    expert_module = facts.holds_experts(num_experts)
    evidence: list[str] = []
    for user in (user for node in indices for user in fm.layout_users(node)):
        found = _dispatch_kind(user, num_experts, facts)
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


def _dispatch_kind(user: Node, num_experts: int, facts: ModelFacts) -> str | None:
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
                and source.op in ("placeholder", "get_attr") and facts.is_parameter_stack(shape):
            return "gathers stacked expert weights"  # a parameter of the model, not a buffer (retrieval memory)
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
