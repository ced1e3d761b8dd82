"""Recognize an expert-parallel id mapping after a routing top-k: global ids -> this rank's local ids.

Under expert parallelism (EP) each of R ranks owns L = E / R whole experts, a contiguous range.
A rank that sees the whole batch (transformers' `AllReduceEP`, every EP rank holding the same
tokens) maps the router's global expert ids to its own experts and masks the rest:

    before (post-grad graph, rank r, L experts per rank)
        values, ids = topk(scores, k)                      # ids: (T, k) global, in [0, E)
        owner    = div(ids, L, rounding_mode="floor")      # which rank holds each chosen expert
        off_rank = ne(owner, r)
        local    = where(off_rank, L, remainder(ids, L))   # L is the "not here" sentinel
        ... local ids -> a dispatch over this rank's L experts (sort + histc(L bins), ...)
        ... all_reduce(sum) of the partial outputs

Nothing here rewrites the graph. lynx selects on the *global* scores, before this mapping, so
every rank (same router input after the TP all-reduce, integer rankings) computes the same
selection, and each rank's experts then run exactly the selected pairs that fall on it. The
mapping is accepted only when all of it is proven: every use of the ids is the floor division
or the remainder by one L with E % L == 0 and R = E / L >= 2, the rank's comparison uses one
constant rank in [0, R), the local ids carry the sentinel L where the rank mask says "not here",
and those local ids reach a dispatch over L experts (`dispatch_evidence.dispatch_of`). Anything else
is left exactly as written, with the reason.

Source of the layout: transformers' `distributed/expert_parallel.py` (`AllReduceEP`).
"""

from __future__ import annotations

import dataclasses

from torch.fx import Node

from . import fx_match as fm
from .fx_match import aten


@dataclasses.dataclass(frozen=True)
class ExpertParallelMapping:
    """A proven global -> local expert-id mapping: this rank `rank` of `ranks` owns experts
    [rank * local_experts, (rank + 1) * local_experts)."""

    num_experts: int
    local_experts: int
    rank: int
    local_ids: Node  # (T, k) int64 in [0, local_experts]; local_experts = not on this rank

    @property
    def ranks(self) -> int:
        return self.num_experts // self.local_experts

    def describe(self) -> str:
        return (f"expert parallel: {self.num_experts} experts, {self.local_experts} per rank "
                f"(rank {self.rank} of {self.ranks})")


def _divisor(node: Node) -> int | None:
    """L if node is a floor division of its first argument by the integer constant L."""
    if fm.is_call(node, aten.div.Tensor_mode) and node.kwargs.get("rounding_mode") == "floor" \
            and isinstance(node.args[1], int):
        return node.args[1]
    if fm.is_call(node, aten.floor_divide.default) and isinstance(node.args[1], int):
        return node.args[1]
    return None


def _modulus(node: Node) -> int | None:
    if fm.is_call(node, aten.remainder.Scalar) and isinstance(node.args[1], int):
        return node.args[1]
    return None


def _is_constant(node: object, value: int) -> bool:
    if node == value and isinstance(node, int):
        return True
    return fm.is_call(node, aten.full.default) and node.args[0] in ([], ()) and node.args[1] == value


def match_expert_parallel(indices: list[Node], num_experts: int) -> ExpertParallelMapping | str | None:
    """The EP mapping these top-k index tensors go through, the reason a mapping-like use is not
    proven (a string), or None when the ids are not divided or reduced modulo anything."""
    users = [user for node in indices for user in fm.layout_users(node)]
    divisions = [u for u in users if _divisor(u) is not None]
    remainders = [u for u in users if _modulus(u) is not None]
    if not divisions and not remainders:
        return None
    # Only ids whose owning rank is compared with a constant claim to be an EP mapping; any other
    # division or remainder (beam search's beam // V, token % V) is not one, and find_routing
    # reports it as arithmetic on the indices.
    if len(divisions) != 1:
        return None
    comparisons = list(divisions[0].users)
    if len(comparisons) != 1 or not fm.is_call(comparisons[0], aten.ne.Scalar, aten.eq.Scalar) \
            or comparisons[0].args[0] is not divisions[0] or not isinstance(comparisons[0].args[1], int):
        return None
    mask, rank = comparisons[0], comparisons[0].args[1]

    unproven = "not routing: an expert-parallel id mapping lynx cannot prove, left as written"
    others = [u for u in users if u not in divisions and u not in remainders]
    if others or len(remainders) != 1:
        names = ", ".join(sorted({fm.op_name(u) for u in others})) or f"{len(remainders)} remainders"
        return f"{unproven} (the ids are also used by {names})"
    local_experts = _divisor(divisions[0])
    if _modulus(remainders[0]) != local_experts:
        return f"{unproven} (divided by {local_experts} but reduced modulo {_modulus(remainders[0])})"
    if local_experts < 1 or num_experts % local_experts or num_experts // local_experts < 2:
        return f"{unproven} ({num_experts} experts do not split evenly into ranks of {local_experts})"
    ranks = num_experts // local_experts
    if not 0 <= rank < ranks:
        return f"{unproven} (rank {rank} outside 0..{ranks - 1})"
    off_rank = mask.target is aten.ne.Scalar

    # remainder -> where(mask, sentinel, local) (or where(mask, local, sentinel) for an eq mask)
    wheres = list(remainders[0].users)
    if len(wheres) != 1 or not fm.is_call(wheres[0], aten.where.self) or wheres[0].args[0] is not mask:
        return f"{unproven} (the local ids are not masked by the rank test)"
    _, if_true, if_false = wheres[0].args
    local, sentinel = (if_false, if_true) if off_rank else (if_true, if_false)
    if local is not remainders[0] or not _is_constant(sentinel, local_experts):
        return f"{unproven} (off-rank experts do not get the sentinel id {local_experts})"
    return ExpertParallelMapping(num_experts, local_experts, rank, wheres[0])
