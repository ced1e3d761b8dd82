"""Recognize zero-compute ("identity") experts after a routing top-k.

Some routers rank E real experts plus Z columns that do no work (LongCat-Flash's
`zero_expert_num`): the top-k runs over E + Z columns, a pair that lands on a column >= E only
passes its token through (weight x hidden state), and the experts run the real pairs:

    before (post-grad, transformers' LongcatFlashMoE, E = 16, Z = 4, k = 4)
        values, ids = topk(scores, 4)                       # ids: (T, k) in [0, E + Z)
        zero    = ge(ids, 16)                               # (T, k) pairs on zero-compute experts
        passed  = sum(where(~zero, 0.0, weights), -1)       # their weight: the token passed through
        parking = div(mul(sub(ids, 16), 16), 4, floor)      # a real id to park those pairs on
        real    = where(zero, parking, ids)                 # (T, k) in [0, E): what the experts run
        w       = where(zero, 0.0, weights)                 # parked pairs weigh nothing
        ... real, w -> a dispatch over E experts

Nothing here rewrites the graph. A site proven this way is routing: lynx selects over all E + Z
columns, with the zero-compute ones free (`batch_select`'s `num_routed` = E: never dropped, never
counted as experts a batch loads, in `record()` too), and the fused dispatch gets the "no expert"
id E for parked pairs (`fuse_experts.py`), so they read no expert either.

The mapping is accepted only when all of it is proven: one threshold E with 1 <= E < E + Z, the
ids compared with it (`ids >= E` or `ids > E - 1`), exactly one `where(zero, parking, ids)` whose
parking ids are arithmetic on the ids and constants alone and used nowhere else, no other use of
the ids but gathers of the scores at them, and the real ids reaching a dispatch over E experts
(`dispatch_evidence.dispatch_of`). Anything else is left exactly as written, with the reason.
"""

from __future__ import annotations

import dataclasses

from torch.fx import Node

from . import fx_match as fm
from .fx_match import aten

# What the parking ids may be computed with (from the ids and constants only).
_ARITHMETIC = frozenset({
    aten.sub.Tensor, aten.sub.Scalar, aten.add.Tensor, aten.add.Scalar, aten.mul.Tensor, aten.mul.Scalar,
    aten.div.Tensor_mode, aten.floor_divide.default, aten.remainder.Scalar, aten.clamp.default,
    aten.clamp_min.default, aten.clamp_max.default,
})


@dataclasses.dataclass(frozen=True)
class ZeroExpertMapping:
    """A proven split of the top-k's columns into E real experts and the zero-compute rest."""

    num_columns: int  # E + Z, what the top-k ranks
    num_experts: int  # E, the real experts
    zero: Node  # (T, k) bool: pairs on a zero-compute expert
    real_ids: Node  # (T, k) in [0, E): the routed id, or a parking id where `zero`

    def describe(self) -> str:
        zero = self.num_columns - self.num_experts
        return (f"zero-compute experts: {self.num_experts} experts + {zero} that do no work "
                f"(ids >= {self.num_experts})")


def _threshold(node: Node, ids: set[Node]) -> int | None:
    """E if node is `ids >= E` or `ids > E - 1` (an integer constant)."""
    if node.op != "call_function" or not node.args or node.args[0] not in ids or not isinstance(node.args[1], int):
        return None
    if node.target is aten.ge.Scalar:
        return node.args[1]
    if node.target is aten.gt.Scalar:
        return node.args[1] + 1
    return None


def _computed_from(node: object, ids: set[Node], seen: set[Node]) -> bool:
    """Whether node is a constant, one of the ids, or arithmetic on those alone (collected in seen)."""
    if not isinstance(node, Node):
        return isinstance(node, (int, float)) and not isinstance(node, bool)
    if node in ids:
        return True
    if node.op != "call_function" or node.target not in _ARITHMETIC:
        return False
    seen.add(node)
    return all(_computed_from(arg, ids, seen) for arg in (*node.args, *node.kwargs.values())
               if not isinstance(arg, str))


def match_zero_experts(indices: list[Node], num_columns: int) -> ZeroExpertMapping | str | None:
    """The zero-compute split these top-k index tensors go through, the reason a split-like use
    is not proven (a string), or None when no id above a threshold is replaced by another."""
    ids = set(indices) | {u for node in indices for u in fm.layout_users(node) if fm.is_call(u, *fm.LAYOUT_OPS)}
    users = [user for node in ids for user in node.users if user not in ids]
    masks = [u for u in users if _threshold(u, ids) is not None]
    wheres = [u for u in users if fm.is_call(u, aten.where.self) and u.args[0] in masks and u.args[2] in ids]
    if not wheres:  # no id above a threshold replaced (a one-hot's ids >= 0, a vocabulary cut): no split claimed
        return None
    unproven = "not routing: a zero-compute expert split lynx cannot prove, left as written"
    thresholds = {_threshold(mask, ids) for mask in masks}
    if len(thresholds) != 1:
        return f"{unproven} (the ids are compared with {sorted(thresholds)})"
    (num_experts,) = thresholds
    if not 1 <= num_experts < num_columns:
        return f"{unproven} (threshold {num_experts} outside 1..{num_columns - 1})"
    if len(wheres) != 1:
        return f"{unproven} ({len(wheres)} places replace the ids where they are >= {num_experts}, expected one)"
    real_ids = wheres[0]
    parking: set[Node] = set()
    if not _computed_from(real_ids.args[1], ids, parking):
        return f"{unproven} (the parking ids are not arithmetic on the ids alone)"
    for node in parking:  # parking arithmetic feeds only itself and the where
        if any(user is not real_ids and user not in parking for user in node.users):
            return f"{unproven} (the parking arithmetic {node.name} is used elsewhere)"
    for user in users:
        if user in masks or user is real_ids or user in parking:
            continue
        if fm.is_call(user, aten.gather.default) and user.args[2] in ids:
            continue  # the scores at the chosen columns (routing weights)
        return f"{unproven} (the ids are also used by {fm.op_name(user)})"
    return ZeroExpertMapping(num_columns, num_experts, masks[0], real_ids)


def parked_weights_are_zero(weights: Node, zero: Node) -> bool:
    """Whether `weights` is where(zero, 0.0, w) / where(~zero, w, 0.0): the parked pairs weigh
    exactly nothing, so their expert outputs (0 * y) add nothing to the token's sum."""
    if not fm.is_call(weights, aten.where.self):
        return False
    condition, if_true, if_false = weights.args
    if condition is zero:
        return _is_zero(if_true)
    if fm.is_call(condition, aten.bitwise_not.default, aten.logical_not.default) and condition.args[0] is zero:
        return _is_zero(if_false)
    return False


def _is_zero(node: object) -> bool:
    if node == 0 and not isinstance(node, bool):
        return True
    return fm.is_call(node, aten.scalar_tensor.default, aten.full.default) and \
        (node.args[0] == 0.0 if node.target is aten.scalar_tensor.default else node.args[1] == 0.0)
