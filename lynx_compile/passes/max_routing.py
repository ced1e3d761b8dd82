"""Routers that pick their k experts by repeated max + mask instead of a top-k.

Before (k = 2, post-grad):

    div     = aten.div(exp, sum_1)                                   # (T, E) softmax scores
    max_1   = aten.max.dim(div, -1)                                  # round 0
    w0 = max_1[0]; i0 = max_1[1]                                     # (T,), (T,)
    scatter = aten.scatter.value(div, 1, unsqueeze(i0, 1), -inf)     # mask the chosen expert
    max_2   = aten.max.dim(scatter, -1)                              # round 1
    w1 = max_2[0]; i1 = max_2[1]
    cat     = aten.cat([unsqueeze(w0, 1), unsqueeze(w1, 1)], -1)     # (T, k) routing weights
    cat_1   = aten.cat([unsqueeze(i0, 1), unsqueeze(i1, 1)], -1)     # (T, k) expert ids -> dispatch

After (only where the site will be rewritten: a decode routing site under a selecting policy):

    topk = aten.topk(div, 2)                                         # meta lynx_max_rounds = 2
    cat -> topk[0]; cat_1 -> topk[1]                                 # the stacks of all rounds
    w0 -> select(topk[0], 1, 0); i1 -> select(topk[1], 1, 1); ...    # any other use of a round

and the top-k is then found, fused and rewritten like any other routing site; the rounds die.
A round is `max.dim` (value and index; with keepdim, PhiMoE's (T, 1) form) or `argmax` (its
value, if used, gathered from the scores); a mask is `scatter(-inf)` at the index, or `where` /
`masked_fill` with -inf on `index == iota(E)` (one_hot). Detection is structural, by these shapes,
never by model name. The rounds' values and the scores left after a round may also feed the
model's routing weights (PhiMoE's sparse mixer: a threshold relative to the round's max, a
softmax over what survives it, gathered at the round's expert); after the rewrite they are the
chosen experts' scores and the scores left after the chosen experts, so the model's own weight
formula is evaluated at the new choice.

Why it is valid: k rounds of "take the max, mask it to -inf" give the k largest scores in
descending order with their experts, which is `topk(scores, k)` (sorted); only exact ties may come
in another order, and a selecting policy re-chooses the experts anyway. A chain that will not be
rewritten (policy none, prefill, masked scores used for anything else, no expert dispatch) stays
exactly as it was, and is listed in `explain` with the reason.
"""

from __future__ import annotations

import dataclasses
import operator

from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..config import LynxConfig
from . import fx_match as fm
from .dispatch_evidence import dispatch_of, router_facts
from .find_routing import RoutingSite, parallel_ranks
from .frame import FrameFacts
from .fx_match import aten, prims
from .phase import decide_phase
from .router_scores import trace_router

NEG_INF = float("-inf")


@dataclasses.dataclass
class Round:
    """One round: the (T, E) scores it takes the max of, and what it produces."""

    source: Node  # (T, E)
    op: Node  # aten.max.dim or aten.argmax
    index: Node  # (T,) the chosen expert ((T, 1) with keepdim)
    value: Node | None  # (T,) its score, where the model uses it ((T, 1) with keepdim)
    mask: Node | None = None  # (T, E) the source with the chosen expert masked to -inf
    keepdim: bool = False  # max.dim(..., keepdim=True): index and value keep a (T, 1) shape


@dataclasses.dataclass
class MaxChain:
    rounds: list[Round]
    index_stack: Node | None  # (T, k) cat of the rounds' indices, in order
    value_stack: Node | None  # (T, k) cat of the rounds' values, in order

    @property
    def scores(self) -> Node:
        return self.rounds[0].source


def canonicalize_max_routing(graph: Graph, config: LynxConfig, frame: FrameFacts = FrameFacts()) -> list[RoutingSite]:
    """Turn every max-rounds router that will be rewritten into a top-k; report the others.

    Returns the sites left alone (for `explain`); rewritten ones reappear as top-k sites.
    """
    left_alone = []
    for chain in find_max_chains(graph, config):
        site = _classify(chain, config, frame)
        if site is None:
            _to_topk(graph, chain)
        elif site.is_routing or len(chain.rounds) > 1:  # a lone argmax that routes nothing is no news
            left_alone.append(site)
    return left_alone


# --- finding the chains --------------------------------------------------------------------------

def find_max_chains(graph: Graph, config: LynxConfig) -> list[MaxChain]:
    masks = set()
    chains = []
    for node in list(graph.nodes):
        if node in masks or not _is_score_matrix(node, config):
            continue
        first = _round_at(node)
        if first is None:
            continue
        rounds = [first]
        while True:
            rounds[-1].mask = _mask_of(rounds[-1])
            following = _round_at(rounds[-1].mask) if rounds[-1].mask is not None else None
            if following is None:
                break
            masks.add(rounds[-1].mask)
            rounds.append(following)
        num_experts = fm.shape_of(node)[1]
        if len(rounds) >= num_experts:  # a full sort, not a routing choice
            continue
        if len({r.keepdim for r in rounds}) > 1:  # mixed shapes: not one routing choice
            continue
        keepdim = rounds[0].keepdim
        chains.append(MaxChain(rounds, _stack_of([r.index for r in rounds], keepdim),
                               _stack_of([r.value for r in rounds], keepdim)))
    return chains


def _is_score_matrix(node: Node, config: LynxConfig) -> bool:
    value = fm.fake_value(node)
    return (getattr(value, "dim", lambda: 0)() == 2 and value.is_floating_point()
            and isinstance(value.shape[1], int) and 2 <= value.shape[1] <= config.max_experts)


def _round_at(scores: Node) -> Round | None:
    for user in scores.users:
        if fm.is_call(user, aten.max.dim) and user.args[0] is scores and _last_dim(user):
            outputs = fm.getitem_users(user)
            if 1 in outputs:
                return Round(scores, user, outputs[1], outputs.get(0), keepdim=_keepdim(user))
        if fm.is_call(user, aten.argmax.default) and user.args[0] is scores and _last_dim(user) \
                and not _keepdim(user):
            return Round(scores, user, user, _gathered_value(scores, user))
    return None


def _last_dim(node: Node) -> bool:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return dim in (-1, 1)


def _keepdim(node: Node) -> bool:
    return bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))


def _gathered_value(scores: Node, index: Node) -> Node | None:
    """select(gather(scores, 1, unsqueeze(index, 1)), 1, 0): the argmax's score, if computed."""
    for user in scores.users:
        if fm.is_call(user, aten.gather.default) and user.args[1] in (1, -1) and _is_unsqueezed(user.args[2], index):
            for value in user.users:
                if fm.is_call(value, aten.select.int) and value.args[1:] in ((1, 0), (-1, 0)):
                    return value
                if fm.is_call(value, aten.squeeze.dim, aten.squeeze.dims, aten.view.default):
                    return value
    return None


def _is_unsqueezed(node: object, index: Node) -> bool:
    return fm.is_call(node, aten.unsqueeze.default) and node.args[0] is index and node.args[1] in (1, -1)


def _mask_of(round_: Round) -> Node | None:
    """The source with the round's expert set to -inf, if the model computes it."""
    source, index = round_.source, round_.index
    for user in source.users:
        if fm.is_call(user, aten.scatter.value) and user.args[0] is source and user.args[1] in (1, -1) \
                and (user.args[2] is index if round_.keepdim else _is_unsqueezed(user.args[2], index)) \
                and user.args[3] == NEG_INF:
            return user
        if round_.keepdim:  # the one-hot masks below compare an unsqueezed (T,) index
            continue
        if fm.is_call(user, aten.where.self) and user.args[2] is source and _is_neg_inf(user.args[1]) \
                and _is_one_hot(user.args[0], index):
            return user
        if fm.is_call(user, aten.masked_fill.Scalar) and user.args[0] is source and user.args[2] == NEG_INF \
                and _is_one_hot(user.args[1], index):
            return user
    return None


def _is_neg_inf(node: object) -> bool:
    if node == NEG_INF:
        return True
    return fm.is_call(node, aten.scalar_tensor.default, aten.full.default) and NEG_INF in node.args[:2]


def _is_one_hot(node: object, index: Node) -> bool:
    """node == (unsqueeze(index, -1) == iota(E)), through dtype casts."""
    node = fm.through_layout(node) if isinstance(node, Node) else node
    if not fm.is_call(node, aten.eq.Tensor):
        return False
    left, right = node.args
    for column, classes in ((left, right), (right, left)):
        if _is_unsqueezed(column, index) and fm.is_call(classes, prims.iota.default):
            return True
    return False


def _stack_of(parts: list[Node | None], keepdim: bool = False) -> Node | None:
    """cat([unsqueeze(p, 1) for p in parts], -1) (keepdim rounds: cat(parts, -1)), if the model
    builds it."""
    if not parts or any(p is None for p in parts):
        return None
    if keepdim:
        for cat in parts[0].users:
            if fm.is_call(cat, aten.cat.default) and _cat_dim(cat) in (1, -1) and list(cat.args[0]) == parts:
                return cat
        return None
    for user in parts[0].users:
        if not _is_unsqueezed(user, parts[0]):
            continue
        for cat in user.users:
            if fm.is_call(cat, aten.cat.default) and _cat_dim(cat) in (1, -1) and len(cat.args[0]) == len(parts) \
                    and all(_is_unsqueezed(item, part) for item, part in zip(cat.args[0], parts)):
                return cat
    return None


def _cat_dim(cat: Node) -> int:
    return cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)


# --- deciding ----------------------------------------------------------------------------------

def _classify(chain: MaxChain, config: LynxConfig, frame: FrameFacts) -> RoutingSite | None:
    """None when the chain is a routing site lynx will rewrite; otherwise the site, with why not."""
    first = chain.rounds[0].op
    num_experts, top_k = fm.shape_of(chain.scores)[1], len(chain.rounds)
    site = RoutingSite(topk=first, module_path=frame.full_name(fm.module_path(first)), reason="",
                       dynamo_node=fm.dynamo_origin(first),
                       num_experts=num_experts, top_k=top_k)
    rounds_form = f"{top_k} round{'s' if top_k > 1 else ''} of max + mask"
    router = trace_router(chain.scores, num_experts)
    if isinstance(router, str):
        site.reason = f"{rounds_form}, not routing: {router}"
        return site
    site.logits, form = router
    site.router_form = f"{form}, {rounds_form}"
    indices = [chain.index_stack] if chain.index_stack is not None else [r.index for r in chain.rounds]
    dispatch = dispatch_of(indices, num_experts, router_facts(site.logits, frame))
    if not dispatch.routes:
        site.reason = dispatch.description
        return site
    site.dispatch, site.parallel, site.is_routing = dispatch.description, dispatch.parallel, True
    site.zero_experts = dispatch.zero_experts
    site.phase = decide_phase(site.logits, config)
    if not site.phase.selects:
        site.reason = site.phase.reason
        return site
    site.setting = config.site_setting(site.label, num_experts, top_k, parallel_ranks(site.parallel))
    if not site.setting.selects:
        site.reason = "not rewritten: policy 'none' (max-rounds router left as written)"
        return site
    used_elsewhere = _masked_scores_used_elsewhere(chain)
    if used_elsewhere is not None:
        site.reason = f"not rewritten: the masked scores also feed {used_elsewhere.name} ({fm.op_name(used_elsewhere)})"
        return site
    return None


def _masked_scores_used_elsewhere(chain: MaxChain) -> Node | None:
    """A use of a round's masked scores other than the next round's max, value and mask, or a
    routing weight computed from them and gathered at a round's expert (`_weight_leak`)."""
    for before, after in zip(chain.rounds, chain.rounds[1:]):
        allowed = {after.op, after.mask}
        allowed |= {u for u in after.source.users if fm.is_call(u, aten.gather.default)}
        for user in before.mask.users:
            if user not in allowed:
                leak = _weight_leak(user, chain)
                if leak is not None:
                    return leak
    last_mask = chain.rounds[-1].mask
    if last_mask is not None and last_mask.users:
        return next(iter(last_mask.users))
    return None


def _weight_leak(start: Node, chain: MaxChain) -> Node | None:
    """None when everything computed from `start` stays per token, (T, E) or (T, 1), until it is
    gathered at one of the rounds' experts: a routing weight the model computes from the scores
    left after the earlier rounds (PhiMoE's sparse mixer: a threshold mask, a softmax, a gather
    at the next round's expert). After the rewrite those scores are the ones left after the
    *chosen* experts, and the gather reads the chosen expert: the model's own weight formula at
    the new choice. Else the first node that leaves that form."""
    num_tokens, num_experts = fm.shape_of(chain.scores)
    indices = {r.index for r in chain.rounds}
    seen, stack = set(), [start]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if fm.is_call(node, aten.gather.default) and node.args[1] in (1, -1) and node.args[2] in indices:
            continue  # a weight at a round's expert
        shape = fm.shape_of(node)
        per_token = shape is not None and len(shape) == 2 and shape[1] in (num_experts, 1) \
            and statically_known_true(shape[0] == num_tokens)  # T may be symbolic: no hashing, no guard
        if node.op != "call_function" or not per_token or len(seen) > 64:
            return node
        stack.extend(node.users)
    return None


# --- rewriting ---------------------------------------------------------------------------------

def _to_topk(graph: Graph, chain: MaxChain) -> None:
    first = chain.rounds[0].op
    scores_value = fm.fake_value(chain.scores)
    top_k = len(chain.rounds)
    with graph.inserting_before(first):
        topk = graph.call_function(aten.topk.default, (chain.scores, top_k))
        topk.meta.update({key: first.meta[key] for key in ("nn_module_stack", "stack_trace", "from_node")
                          if key in first.meta})
        topk.meta["val"] = tuple(scores_value.topk(top_k))
        topk.meta["lynx_max_rounds"] = top_k
        outputs = []
        for position in range(2):
            item = graph.call_function(operator.getitem, (topk, position))
            item.meta["val"] = topk.meta["val"][position]
            outputs.append(item)
    values, indices = outputs
    for stack, replacement in ((chain.value_stack, values), (chain.index_stack, indices)):
        if stack is not None:
            stack.replace_all_uses_with(replacement)
    for position, round_ in enumerate(chain.rounds):
        for old, source in ((round_.index, indices), (round_.value, values)):
            if old is None or not old.users:
                continue
            with graph.inserting_after(source):
                if round_.keepdim:  # (T, 1), as max.dim(keepdim=True) gave it
                    column = graph.call_function(aten.slice.Tensor, (source, 1, position, position + 1))
                    column.meta["val"] = fm.fake_value(source)[:, position:position + 1]
                else:
                    column = graph.call_function(aten.select.int, (source, 1, position))
                    column.meta["val"] = fm.fake_value(source).select(1, position)
            old.replace_all_uses_with(column)
