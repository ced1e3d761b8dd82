"""lynx in PyTorch's logging: graphs before/after the pass and each routing site's decision.

Registered with `torch._logging` when lynx_compile is imported:

    log "lynx"               -> the `lynx_compile` loggers; INFO: one line per routing site
                                (what it is, the policy it runs, rewritten or why not)
    artifact "lynx_graphs"   -> the post-grad graph as Inductor hands it to lynx, after the
                                routing rewrite (lynx.batch_select visible) and after lowering

How to turn them on:

    TORCH_LOGS="+lynx_compile" python ...          # both (the module form TORCH_LOGS accepts)
    TORCH_LOGS="lynx_compile" python ...           # the per-site lines only (INFO)
    torch._logging.set_logs(modules={"lynx": logging.INFO, "lynx_graphs": True})  # in code
    TORCH_TRACE=/tmp/trace python ...; tlparse /tmp/trace/...   # graphs and decisions as
                                                   # "lynx_*" artifacts of each compile

`TORCH_LOGS="+lynx"` or `TORCH_LOGS="lynx_graphs"` cannot work: torch validates TORCH_LOGS
when `import torch` runs, before any package can register a name, and an unknown name makes the
import itself raise. The module form above needs no registration; the registered names work
with `set_logs` once lynx_compile is imported.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable

import torch

LOG = "lynx"
GRAPHS = "lynx_graphs"
PACKAGE = "lynx_compile"
_warned: set[tuple] = set()  # keys already warned about in this process


def warn_once(key: tuple, message: str, stacklevel: int = 4) -> None:
    """A compile-time problem the user must hear of: a Python warning and a WARNING line in the
    `lynx` log, once per key and process."""
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, stacklevel=stacklevel)
    logging.getLogger(PACKAGE).warning(message)


def register() -> None:
    """Register "lynx" and "lynx_graphs" with torch._logging (idempotent)."""
    from torch._logging import _internal

    if GRAPHS in _internal.log_registry.artifact_names:
        return
    _internal.register_log(LOG, PACKAGE)
    _internal.register_artifact(GRAPHS, "lynx: post-grad graphs before and after its routing rewrite and lowering",
                                visible=True)


register()
decisions_log = logging.getLogger(f"{PACKAGE}.passes")
graphs_log = torch._logging.getArtifactLogger(f"{PACKAGE}.passes", GRAPHS)


def wants_graphs() -> bool:
    """Whether some log or trace will show graphs (so the pass should keep their text)."""
    return graphs_log.isEnabledFor(logging.DEBUG) or _tracing()


def _tracing() -> bool:
    """A structured trace (TORCH_TRACE) is being written: torch's lazy trace handler has a
    directory or an open stream. Other handlers on the trace logger do not count: pytest's log
    capture attaches its own to every logger, and they would make every compile keep graph text."""
    from torch._logging import _internal

    lazy = getattr(_internal, "LOG_TRACE_HANDLER", None)
    return lazy is not None and lazy in _internal.trace_log.handlers and (
        getattr(lazy, "root_dir", None) is not None or getattr(lazy, "stream", None) is not None)


def emit(sites: list, before: str, after_rewrite: str, lowered: str, describe: Callable[[object], dict]) -> None:
    """Log one graph's decisions and graphs; add them to a TORCH_TRACE as artifacts."""
    decisions = [describe(site) for site in sites]
    if decisions_log.isEnabledFor(logging.INFO):
        for d in decisions:
            decisions_log.info("lynx site %s: %s", d["site"], "; ".join(f"{k}={v}" for k, v in d.items() if k != "site"))
    if graphs_log.isEnabledFor(logging.DEBUG):
        graphs_log.debug("lynx graph before its pass:\n%s", before)
        graphs_log.debug("lynx graph after the routing rewrite:\n%s", after_rewrite)
        graphs_log.debug("lynx graph after lowering:\n%s", lowered)
    if not _tracing():
        return
    for name, payload in (("lynx_decisions", lambda: json.dumps(decisions)), ("lynx_graph_before", lambda: before),
                          ("lynx_graph_after_rewrite", lambda: after_rewrite),
                          ("lynx_graph_after_lowering", lambda: lowered)):
        torch._logging.trace_structured(
            "artifact", metadata_fn=lambda name=name: {"name": name, "encoding": "json" if name == "lynx_decisions"
                                                       else "string"}, payload_fn=payload)
