"""The post-grad pass lynx installs into Inductor, and how it joins passes already configured.

Order, fixed (each stage reads what the previous one left):
  0. max_routing     routers choosing experts by k rounds of max + mask -> aten.topk, where the
                     site will be rewritten; the others are reported as they are
  1. find_routing    classify every aten.topk (routing site or not, and why); flat_topk turns a
                     selected (batch, seq, E) top-k into a (T, E) one
  2. fuse_experts    the expert dispatch after a decode site -> lynx.moe_experts
                     (experts="inductor": -> two aten._grouped_mm, fuse_experts_inductor.py)
                     (config.experts; it reads the top-k's outputs, so it runs before 3)
  3. rewrite_routing routing top-k -> lynx.batch_select (decode sites, policy != none)
  4. lower_selection lynx.batch_select -> its aten body, for Inductor to generate code from

The pass runs as Inductor's `post_grad_custom_pre_pass`, i.e. on the functionalized aten graph
right after dead-code elimination and before Inductor's own pattern passes, so those still see
(and fuse) what we emit. With `torch._inductor.config.freezing` on, it runs as
`joint_custom_pre_pass` instead: freezing prepacks weights (the router's `mm` becomes
`_mkl_linear` / `mkldnn._linear_pointwise`, parameters become constants) before any post-grad
pass, and the joint passes run on the same functional aten graph before that. It never replaces
a pass someone else configured: `inductor_patches` returns the hook's current value with ours
appended.

`uuid()` hashes this package's source and the config, so Inductor's FX graph cache stays on
and an edit to lynx or a different config never reuses a stale compiled graph.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import pathlib
from collections.abc import Callable

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx import Graph

from .. import logs
from ..compat import CUSTOM_PASS_LISTS
from ..config import LynxConfig
from ..lowering.kernels.choice import decision_key
from ..lowering.kernels.select_experts_cpu import selection_path
from .find_routing import RoutingSite, find_routing_sites
from .flat_topk import flatten_routing_topks
from .frame import FrameFacts
from .fuse_experts import fuse_expert_dispatches
from .lower_selection import lower_selection
from .max_routing import canonicalize_max_routing
from .rewrite_routing import observe_plain_sites, rewrite_routing_sites

HOOK = "post_grad_custom_pre_pass"
FREEZING_HOOK = "joint_custom_pre_pass"  # before freezing's weight prepacking


@dataclasses.dataclass
class GraphReport:
    """What one run of the pass saw and did to one graph."""

    sites: list[RoutingSite]
    graph_before: str
    graph_after_rewrite: str
    graph_after_lowering: str


class LynxPostGradPass(CustomGraphPass):
    """frame: what the compiled frame tells about the graph (`frame.py`): site names, expert
    ownership; computed by the backend while Dynamo compiles."""

    def __init__(self, config: LynxConfig, record: bool = False,
                 on_report: Callable[[GraphReport], None] | None = None, switchable: bool = False,
                 frame: FrameFacts | None = None) -> None:
        self.config = config
        self.record = record
        self.on_report = on_report
        self.switchable = switchable  # calibration: sites' settings chosen at run time
        self.frame = frame or FrameFacts()

    def __call__(self, graph: Graph) -> None:
        keep_text = self.on_report is not None or logs.wants_graphs()
        before = str(graph) if keep_text else ""
        left_alone = canonicalize_max_routing(graph, self.config, self.frame)
        sites = left_alone + find_routing_sites(graph, self.config, self.frame)
        warn_unknown_phase(sites)
        flatten_routing_topks(graph, sites)
        fuse_expert_dispatches(graph, sites, self.config)
        rewrite_routing_sites(graph, sites, self.config, switchable=self.switchable)
        if self.record:
            observe_plain_sites(graph, sites)
        after_rewrite = str(graph) if keep_text else ""
        lower_selection(graph, record=self.record)
        graph.eliminate_dead_code()
        graph.lint()
        lowered = str(graph) if keep_text else ""
        logs.emit(sites, before, after_rewrite, lowered, describe_site)
        if self.on_report:
            self.on_report(GraphReport(sites, before, after_rewrite, lowered))

    def uuid(self) -> str:
        # The CPU's features (or LYNX_EXPERTS_AUTO) decide experts="auto" (lowering/kernels/choice.py).
        return hashlib.sha256(
            f"{_source_hash()}|{self.config!r}|record={self.record}|switchable={self.switchable}|{decision_key()}"
            f"|{self.frame!r}|selection={selection_path()}".encode()).hexdigest()


def warn_unknown_phase(sites: list[RoutingSite]) -> None:
    """A routing site whose graph cannot tell decode from prefill is left alone; say so at compile
    time, with the option that fixes it (a gate compiled on its own, a graph break before it).
    Once per site and process, when the pass runs: a graph Inductor serves from its cache was
    warned about when it was compiled."""
    for site in sites:
        if site.is_routing and site.phase is not None and site.phase.mode == "unknown":
            logs.warn_once(("phase", site.label), (
                f"lynx: routing site {site.label!r} is left as written: its graph has no (batch, seq, hidden) "
                "flatten to tell decode from prefill (a router compiled on its own, or a graph break before it); "
                "set options={'max_decode_tokens': N} to select on batches of at most N tokens"))


def describe_site(site: RoutingSite) -> dict[str, object]:
    """One site's decision, for the "lynx" log and TORCH_TRACE (`logs.py`)."""
    return {"site": site.label, "routing": site.is_routing, "router": site.router_form, "E": site.num_experts,
            "k": site.top_k, "phase": site.phase.mode if site.phase else None,
            "policy": site.setting.describe() if site.setting is not None else None,
            "rewritten": site.rewritten, "reason": site.reason, "experts": site.experts,
            "dispatch": site.dispatch}


# The code that decides what the compiled graph contains. Other modules (eval, training, explain)
# can change without invalidating every cached lynx compile.
_COMPILE_SOURCES = ("passes", "lowering", "policies", "backend.py", "compat.py", "config.py", "errors.py", "plan.py",
                    "record.py")


@functools.cache
def _source_hash() -> str:
    package = pathlib.Path(__file__).resolve().parent.parent
    digest = hashlib.sha256(torch.__version__.encode())
    files = [path for name in _COMPILE_SOURCES
             for path in ([package / name] if name.endswith(".py") else
                          [*(package / name).rglob("*.py"), *(package / name).rglob("*.cpp")])]
    for path in sorted(files):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def inductor_patches(lynx_pass: LynxPostGradPass, freezing: bool | None = None) -> dict[str, object]:
    """Inductor config patches that add `lynx_pass` after whatever its hook already holds.

    freezing: whether the compile freezes weights (None: Inductor's config now); the hook is
    `joint_custom_pre_pass` then, `post_grad_custom_pre_pass` otherwise. A list where Inductor
    takes one (torch 2.13); where a hook holds a single pass (torch 2.11), one `ChainedPasses`
    running the configured passes, then lynx's (see compat.py)."""
    freezing = torch._inductor.config.freezing if freezing is None else freezing
    hook = FREEZING_HOOK if freezing else HOOK
    existing = getattr(torch._inductor.config, hook)
    if existing is None:
        passes = []
    elif isinstance(existing, (list, tuple)):
        passes = list(existing)
    else:
        passes = [existing]
    if CUSTOM_PASS_LISTS:
        return {hook: passes + [lynx_pass]}
    return {hook: ChainedPasses(passes + [lynx_pass]) if passes else lynx_pass}


class ChainedPasses(CustomGraphPass):
    """Several post-grad passes as the one pass an older torch's hook holds, run in order.

    uuid: the passes' uuids together, or None (no FX graph caching, as Inductor itself decides
    for such a pass) when one of them is a plain callable or has no uuid."""

    def __init__(self, passes: list[Callable[[Graph], None]]) -> None:
        self.passes = list(passes)

    def __call__(self, graph: Graph) -> None:
        for graph_pass in self.passes:
            graph_pass(graph)

    def uuid(self) -> tuple | None:
        uuids = tuple(p.uuid() if isinstance(p, CustomGraphPass) else None for p in self.passes)
        return None if any(u is None for u in uuids) else uuids
