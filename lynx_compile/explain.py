"""`lynx_compile.explain(model, *args, **kwargs)`: what the lynx backend finds and does.

Compiles `model` with the lynx backend (graph caches off, so every pass really runs), runs it once on
the example inputs under `torch.no_grad()`, and returns an `ExplainReport`:

    report = lynx_compile.explain(model, input_ids)
    print(report)                  # one row per top-k found: routing or not, the policy it runs
                                   # (and whether from the config or a plan), rewritten or why not
    report.sites[0].router_form    # "softmax(linear)"
    print(report.graphs[0].before) # post-grad FX graph as Inductor handed it to lynx
    print(report.graphs[0].after)  # the same graph after the routing rewrite (lynx.batch_select)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .backend import compile_with_lynx
from .config import LynxConfig
from .passes.pass_manager import GraphReport


@dataclasses.dataclass(frozen=True)
class SiteSummary:
    """One top-k as lynx saw it."""

    graph: int  # index into ExplainReport.graphs
    module_path: str | None
    node: str  # the aten.topk node's name in that graph
    is_routing: bool
    router_form: str | None
    num_experts: int | None
    top_k: int | None
    dispatch: str | None
    phase: str | None  # decode | prefill | runtime | unknown
    rewritten: bool
    reason: str
    experts: str | None = None  # the expert dispatch after the site: "fused: ..." or "kept: why"
    policy: str | None = None  # the setting it runs, e.g. "opportunistic(keep_top=1) [plan plan.json]"


@dataclasses.dataclass(frozen=True)
class GraphSummary:
    before: str  # post-grad graph handed to lynx
    after: str  # after the routing rewrite, with lynx.batch_select visible
    lowered: str  # after lowering batch_select into aten ops (what Inductor compiles)


@dataclasses.dataclass(frozen=True)
class ExplainReport:
    config: LynxConfig
    graphs: list[GraphSummary]
    sites: list[SiteSummary]

    @property
    def routing_sites(self) -> list[SiteSummary]:
        return [s for s in self.sites if s.is_routing]

    @property
    def rewritten_sites(self) -> list[SiteSummary]:
        return [s for s in self.sites if s.rewritten]

    def table(self) -> str:
        header = ("graph", "site", "router", "E", "k", "dispatch", "policy", "rewritten", "reason", "experts")
        rows = [header]
        for s in self.sites:
            rows.append((str(s.graph), s.module_path or s.node, s.router_form or "-",
                         str(s.num_experts or "-"), str(s.top_k or "-"), s.dispatch or "-", s.policy or "-",
                         "yes" if s.rewritten else "no", s.reason, s.experts or "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        plan = f", plan={self.config.plan.source}" if self.config.plan is not None else ""
        head = (f"lynx explain (policy={self.config.policy}{plan}): {len(self.graphs)} graph(s), "
                f"{len(self.sites)} top-k, {len(self.routing_sites)} routing site(s), "
                f"{len(self.rewritten_sites)} rewritten")
        text = head + "\n" + self.table()
        if self.config.plan is not None:
            found = {s.module_path for s in self.routing_sites}
            unmatched = [name for name in self.config.plan.site_names() if name not in found]
            if unmatched:
                text += f"\nplan entries matching no routing site: {', '.join(unmatched)}"
        return text


def explain(model: torch.nn.Module, *example_args: Any, config: LynxConfig | None = None,
            **example_kwargs: Any) -> ExplainReport:
    """Compile `model` with lynx, run it on the example inputs, and report every top-k found."""
    config = config or LynxConfig()
    graph_reports: list[GraphReport] = []

    def backend(gm, example_inputs):
        return compile_with_lynx(gm, example_inputs, config, on_report=graph_reports.append)

    compiled = torch.compile(model, backend=backend)
    # The FX graph and AOTAutograd caches would skip the pass on a hit; compiled kernels stay cached.
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        compiled(*example_args, **example_kwargs)

    graphs, sites = [], []
    for index, report in enumerate(graph_reports):
        graphs.append(GraphSummary(report.graph_before, report.graph_after_rewrite,
                                   report.graph_after_lowering))
        for site in report.sites:
            sites.append(SiteSummary(
                graph=index, module_path=site.module_path, node=site.topk.name,
                is_routing=site.is_routing, router_form=site.router_form,
                num_experts=site.num_experts, top_k=site.top_k, dispatch=site.dispatch,
                phase=site.phase.mode if site.phase else None, rewritten=site.rewritten,
                reason=site.reason, experts=site.experts,
                policy=site.setting.describe() if site.setting is not None else None))
    return ExplainReport(config, graphs, sites)
