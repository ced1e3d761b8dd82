"""Rewrite each routing top-k into `lynx::batch_select`, which returns what top-k returned.

Before (Mixtral router, post-grad):

    mm      = aten.mm(view, permute)                       # (T, E) router logits
    amax = aten.amax(mm, [-1]); sub = aten.sub(mm, amax); exp = aten.exp(sub)
    sum_1   = aten.sum(exp, [-1]); div = aten.div(exp, sum_1)   # (T, E) softmax
    topk    = aten.topk(div, 2)
    getitem = topk[0]; getitem_1 = topk[1]                 # (T, k) values, indices

After:

    batch_select = lynx.batch_select(div, mm, 2, "affinity_binning", [0.7, 1.0, 1.4286],   # policy, params
                                     -1, None)                       # decode bound, live mask (or None)
    getitem = batch_select[0]; getitem_1 = batch_select[1]

Each site runs its own setting (`site.setting`, resolved once by `find_routing`: the plan's entry
for the site, else the config's policy), encoded by the op's own codec (`ops.encode_params`); a
site whose setting is "none" is left exactly as it was.

Why this is valid: the new op returns values and indices of the same shapes and dtypes, values
are the scores at the chosen indices, and every token still gets k distinct experts, so all
downstream consumers — renormalization, the softmax over the k values, the expert dispatch —
compute exactly what they would for a top-k that had chosen those experts. `mm` (the router
logits) is passed as the affinity the bins are computed from.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Graph, Node

from ..config import LynxConfig
from ..lowering import selection
from ..lowering.ops import batch_select, encode_params, observe_selection, switch_select
from . import fx_match as fm
from .fx_match import aten
from .find_routing import RoutingSite
from .live_rows import find_token_ids, live_tokens
from .phase import batch_size_node
from .router_scores import neg_inf_mask


def rewrite_routing_sites(graph: Graph, sites: list[RoutingSite], config: LynxConfig,
                          switchable: bool = False) -> int:
    """Rewrite every selectable site in place; return the number rewritten.

    switchable: (calibration) every selectable site becomes lynx.switch_select, whose setting is
    chosen at run time (`calibration/switch.py`), whatever the config's policy or plan says."""
    rewritten = 0
    live_masks: dict[Node, Node] = {}  # token ids -> their live mask, shared by the graph's sites
    for site in sites:
        if not site.selectable:
            continue
        if switchable:
            _rewrite_switchable(graph, site, _live_mask(graph, site, config, live_masks))
            site.rewritten = True
            rewritten += 1
            continue
        if not site.setting.selects:
            site.reason = "not rewritten: policy 'none'" + (" (plan)" if site.setting.source.startswith("plan") else "")
            continue
        live = _live_mask(graph, site, config, live_masks)
        _rewrite(graph, site, live)
        site.rewritten = True
        rewritten += 1
    return rewritten


def _live_mask(graph: Graph, site: RoutingSite, config: LynxConfig, cache: dict[Node, Node]) -> Node | None:
    """The (T,) live-token mask for this site (see live_rows.py), noting the outcome in its reason."""
    if config.pad_token_id is None:
        return None
    ids = find_token_ids(graph, site.phase.tokens_from) if site.phase.tokens_from is not None else None
    if ids is None:
        site.reason += f"; every row votes (pad_token_id={config.pad_token_id}, but no token ids of this batch " \
                       "are embedded in this graph)"
        return None
    if ids not in cache:
        cache[ids] = live_tokens(graph, ids, config.pad_token_id)
    site.reason += f"; rows fed token {config.pad_token_id} do not vote"
    return cache[ids]


def _scores(graph: Graph, site: RoutingSite) -> Node:
    """What selection ranks: the top-k's input, with a constant-floor mask (DeepSeek-V2's 0.0)
    turned into the -inf mask it ranks like, so masked experts stay ineligible. The values the
    site returns are then read from the model's own scores (`_values_from_model_scores`)."""
    if site.floor_mask is None:
        return site.topk.args[0]
    return neg_inf_mask(graph, site.floor_mask)


def _num_routed(site: RoutingSite) -> int:
    """The op's num_routed: the real experts when the site has zero-compute ones, else -1."""
    return site.zero_experts.num_experts if site.zero_experts is not None else -1


def _rewrite(graph: Graph, site: RoutingSite, live: Node | None) -> None:
    topk = site.topk
    setting = site.setting
    with graph.inserting_before(topk):
        new = graph.call_function(
            batch_select, (_scores(graph, site), site.logits, site.top_k, setting.policy,
                           encode_params(setting.policy, setting.params_dict()), _decode_bound(site), live,
                           _num_routed(site)))
    new.meta["lynx_site"] = (site.label, site.router_weight)
    _replace_topk(graph, topk, new, site.top_k)
    _values_from_model_scores(graph, site, new)


def _values_from_model_scores(graph: Graph, site: RoutingSite, new: Node) -> None:
    """A constant-floor mask's site: the values are the model's scores at the chosen experts (its
    0.0, not the -inf selection ranked), so a token with fewer than k unmasked experts gets what
    the model gave its masked picks: weight 0, not -inf."""
    if site.floor_mask is None:
        return
    outputs = {user.args[1]: user for user in new.users if user.target is operator.getitem}
    if 0 not in outputs or 1 not in outputs:
        return
    values, indices = outputs[0], outputs[1]
    with graph.inserting_after(indices):
        gathered = graph.call_function(aten.gather.default, (site.floor_mask, 1, indices))
    gathered.meta.update({key: value for key, value in values.meta.items()})
    values.replace_all_uses_with(gathered)


def _rewrite_switchable(graph: Graph, site: RoutingSite, live: Node | None) -> None:
    topk = site.topk
    with graph.inserting_before(topk):
        new = graph.call_function(switch_select, (_scores(graph, site), site.logits, site.top_k, _decode_bound(site),
                                                  live, site.router_weight, site.label, _num_routed(site)))
    site.reason += "; switchable (calibration)"
    _replace_topk(graph, topk, new, site.top_k)
    _values_from_model_scores(graph, site, new)


def _replace_topk(graph: Graph, topk: Node, new: Node, k: int) -> None:
    """Make `new` (a node returning (values, indices) like the top-k) take the top-k's place."""
    new.meta.update({key: value for key, value in topk.meta.items() if key != "val"})
    new.meta["val"] = _fake_outputs(topk.args[0], k)
    for index, getitem in fm.getitem_users(topk).items():
        with graph.inserting_before(getitem):
            replacement = graph.call_function(operator.getitem, (new, index))
        replacement.meta.update(getitem.meta)
        getitem.replace_all_uses_with(replacement)
        graph.erase_node(getitem)
    graph.erase_node(topk)


def _decode_bound(site: RoutingSite) -> int | Node:
    """The token-count bound `batch_select` tests at run time; NO_DECODE_BOUND when proven decode
    (a lone token counts as decode: a B=1 step), 0 (never decode) when proven prefill or unknown."""
    phase = site.phase
    if phase.mode in ("decode", "single"):
        return selection.NO_DECODE_BOUND
    if phase.mode in ("prefill", "unknown"):
        return 0
    if phase.token_bound is not None:
        return phase.token_bound
    batch = fm.shape_of(phase.tokens_from)[0]
    if isinstance(batch, int):
        return batch
    return batch_size_node(phase.tokens_from)


def _fake_outputs(scores: Node, k: int):
    value = fm.fake_value(scores)
    num_tokens = value.shape[0]
    return (value.new_empty((num_tokens, k)), value.new_empty((num_tokens, k), dtype=torch.int64))


def observe_plain_sites(graph: Graph, sites: list[RoutingSite]) -> None:
    """Recording variant only: report routing sites left as plain top-k (before == after)."""
    for site in sites:
        if not site.is_routing or site.rewritten or not fm.is_call(site.topk, aten.topk.default):
            continue
        indices = fm.getitem_users(site.topk).get(1)
        if indices is None:
            continue
        with graph.inserting_after(indices):
            bound = _decode_bound(site)
            observed = graph.call_function(
                observe_selection,
                (indices, indices, site.router_weight, site.routed_experts, bound, site.label))
        observed.meta["val"] = fm.fake_value(indices).clone()
        indices.replace_all_uses_with(observed, delete_user_cb=lambda user: user is not observed)
