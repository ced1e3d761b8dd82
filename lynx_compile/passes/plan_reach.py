"""Whether a plan reaches the sites of a compiled frame: names that match nothing, layers that
share one graph. Run by the backend for every graph Dynamo hands it (before Inductor, whose
cache would skip a pass-time warning).

A plan (`plan.py`) names sites by their full module path, as `calibrate` and `record()` write
them. `find_routing` names a site the same way whenever the compiled frame's place in its model
is known (`frame.py`), also when Dynamo compiled one block or one layer on its own. Two things
can still keep a plan from applying, and neither may pass in silence:

  - an entry that names no module of the model (a plan for another model, a typo): a Python
    warning and a line in the `lynx` log, at compile time;
  - one compiled graph serving several layers (Dynamo reuses a frame's graph for every module of
    its class: transformers' `eager` experts loop, regional compilation): the graph can run only
    one setting per site, so when the plan has entries for two or more of the layers'
    corresponding sites and they differ, the compile is refused with an error naming them. When
    only this layer's entry exists (a layer compiled alone), it applies, with a warning that the
    other layers would run it too if they reused this graph.
"""

from __future__ import annotations


from torch.fx import Graph

from ..config import LynxConfig
from ..errors import LynxOptionsError
from ..logs import warn_once
from . import fx_match as fm
from .frame import FrameFacts



def _warn_once(key: tuple, message: str) -> None:
    warn_once(("plan", *key), message, stacklevel=5)


def check_plan_reach(config: LynxConfig, frame: FrameFacts, graph: Graph) -> None:
    """Warn about plan entries naming no module; refuse differing entries for layers that share
    this frame's graph (`graph`: Dynamo's, whose module metadata says which sites it holds).
    Raises LynxOptionsError for the latter."""
    plan = config.plan
    if plan is None:
        return
    if frame.module_names:
        missing = [name for name in plan.site_names() if name not in frame.module_names]
        if missing:
            _warn_once((plan, tuple(missing)), (
                f"lynx: plan {plan.source}: {len(missing)} {'entry names' if len(missing) == 1 else 'entries name'} "
                f"no module of the compiled model: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
                "(they match no routing site; sites are named like 'model.layers.0.mlp.gate')"))
    if not frame.siblings or not frame.prefix:
        return
    in_graph = {frame.full_name(fm.module_path(node)) for node in graph.nodes if node.op == "call_function"}
    for name in plan.site_names():
        if name not in in_graph:
            continue
        suffix = name[len(frame.prefix):]
        shared = [frame.prefix, *frame.siblings]
        entries = {owner + suffix: plan.entry(owner + suffix) for owner in shared}
        given = {site: entry for site, entry in entries.items() if entry is not None}
        if len(set(given.values())) > 1:
            listed = "; ".join(f"{site}: {_describe(entry)}" for site, entry in sorted(given.items()))
            raise LynxOptionsError(
                f"lynx: option 'plan': one compiled graph serves the {len(shared)} {frame.owner_class} modules "
                f"{frame.prefix}, {', '.join(frame.siblings[:3])}{' ...' if len(frame.siblings) > 3 else ''} "
                f"(Dynamo reuses a frame's graph for every module of its class), so it can run one setting at "
                f"{suffix.lstrip('.')}, but plan {plan.source} gives them different ones: {listed}. Compile the model "
                "as one graph (transformers' grouped_mm or batched_mm experts, model.compile() rather than "
                "regional compilation), or give these sites one setting.")
        if len(given) < len(entries):
            _warn_once((plan, name), (
                f"lynx: plan {plan.source}: {name} runs the plan's {plan.entry(name).policy}; the other "
                f"{len(shared) - 1} {frame.owner_class} modules would run it too if they reused this compiled graph "
                "(Dynamo shares one graph between modules of one class), not the setting the plan gives them"))


def _describe(entry) -> str:
    params = ", ".join(f"{name}={value}" for name, value in entry.params)
    return f"{entry.policy}({params})" if params else entry.policy
