"""Find the MoE routing sites of a post-grad graph: router linear -> scores -> top-k -> dispatch.

Detection is structural, so it covers any MoE written with these pieces, whatever the model is
called. A top-k is a routing site when all three hold:

  scores   its (T, E) input comes from a router linear over E experts through steps that keep
           each token's order of experts or mask experts out (`router_scores.py`).
  top-k    over the last dim, largest, k < E <= config.max_experts.
  dispatch its indices pick experts, proven in the graph, by the module owning the router, or
           through a proven expert-parallel or zero-compute id mapping (`dispatch_evidence.py`).

Anything else — a top-k for sampling, beam search, group selection inside DeepSeek's router,
or a score computation we do not understand — is reported with the reason and left untouched.
Sites are named by their full module path when the compiled frame's place in its model is known
(`FrameFacts.full_name`), else relative to the frame. Each routing site's phase (`phase.py`) and
setting (`LynxConfig.site_setting`) are decided here, once, for every later stage.

    before   topk = aten.topk(div, 2)          # div: softmax(mm), mm = the router linear
    after    the same graph; a RoutingSite(topk, router_form="softmax(linear)", E=8, k=2,
             dispatch="sorted by expert", phase=decode, setting=moved_mass(...)) per top-k
"""
from __future__ import annotations

import dataclasses

from torch.fx import Graph, Node

from ..config import LynxConfig
from ..policies import SiteSetting
from . import fx_match as fm
from .dispatch_evidence import find_dispatch, router_facts
from .expert_parallel import ExpertParallelMapping
from .frame import FrameFacts
from .fx_match import aten
from .phase import PhaseDecision, decide_phase
from .router_scores import fill_of, floor_masked_input, trace_router, router_weight
from .zero_experts import ZeroExpertMapping


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
        site.router_form += f", masked with {fill_of(scores)}"
    if rounds:
        site.router_form += f", top-k as {rounds} rounds of max + mask"
    site.router_weight = router_weight(site.logits)

    dispatch = find_dispatch(topk, num_experts, router_facts(site.logits, frame))
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
