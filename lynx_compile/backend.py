"""The `lynx` torch.compile backend: Inductor with lynx's post-grad pass appended.

    torch.compile(model, backend="lynx")                               # AffinityBinning, defaults
    torch.compile(model, backend="lynx", options={"policy": "none"})   # selection off
    torch.compile(model, backend="lynx", options={"config": LynxConfig(alpha=1.0)})

Registered by name through the `torch_dynamo_backends` entry point, so the string works in a
fresh interpreter without importing lynx_compile. Everything Inductor does stays on; lynx only
adds its pass to `post_grad_custom_pre_pass`, after any pass already there.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._inductor.compile_fx import compile_fx

from .config import LynxConfig
from .errors import LynxOptionsError
from .plan import file_stamp, reloaded
from .lowering import ops as _ops  # noqa: F401  (defines the lynx:: operators)
from .lowering.kernels import select_experts_cpu
from .passes.frame import FrameFacts, current_frame_facts
from .passes.pass_manager import GraphReport, LynxPostGradPass, inductor_patches
from .passes.plan_reach import check_plan_reach
from .record import active_recorder


def lynx_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                 options: dict[str, Any] | None = None, mode: str | None = None,
                 **unexpected: Any) -> Callable[..., Any]:
    """Dynamo backend entry point (`torch.compile(..., backend="lynx", options=..., mode=...)`)."""
    if unexpected:
        raise LynxOptionsError(f"lynx: unexpected backend argument(s) {sorted(unexpected)}; "
                               "pass lynx settings as options={...}")
    config = LynxConfig.from_options(options)
    return compile_with_lynx(gm, example_inputs, config, mode=mode)


def compile_with_lynx(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], config: LynxConfig,
                      *, mode: str | None = None, record: bool = False,
                      on_report: Callable[[GraphReport], None] | None = None,
                      switchable: bool = False, frame: FrameFacts | None = None) -> Callable[..., Any]:
    """Inductor with lynx's pass. record: the recording variant; switchable: calibration's graph
    whose sites' settings are chosen at run time (`lowering/switch_select.py`; it reports to
    record() itself, so it needs no recording variant); frame: the compiled frame's facts (read
    from Dynamo now when not given: `passes/frame.py`)."""
    frame = frame if frame is not None else current_frame_facts()
    check_plan_reach(config, frame, gm.graph)  # here, not in the pass: Inductor's cache may skip the pass
    if record or switchable or not any(_is_topk(node) for node in gm.graph.nodes):
        return _compile(gm, example_inputs, config, mode, frame, record=record, on_report=on_report,
                        switchable=switchable)
    pristine = _copy_graph_module(gm)  # compile_fx takes ownership of gm and may rewrite it
    compiled = _compile(gm, example_inputs, config, mode, frame, on_report=on_report)
    return _RecordSwitch(compiled, pristine, example_inputs, config, mode,
                         torch._guards.TracingContext.try_get(), frame)


def _compile(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], config: LynxConfig, mode: str | None,
             frame: FrameFacts, **pass_options: Any) -> Callable[..., Any]:
    """compile_fx with lynx's pass in the hook its freezing setting calls for."""
    if any(_is_topk(node) for node in gm.graph.nodes) and select_experts_cpu.selection_path() != "body":
        # A graph loaded from Inductor's cache runs without the pass: its selection kernel must be
        # registered all the same (built on first use, then loaded).
        select_experts_cpu.available()
    patches = _mode_patches(mode)
    freezing = bool(patches.get("freezing", torch._inductor.config.freezing))
    patches.update(inductor_patches(LynxPostGradPass(config, frame=frame, **pass_options), freezing))
    return compile_fx(gm, example_inputs, config_patches=patches)


class _RecordSwitch:
    """Runs the compiled graph, or inside `lynx_compile.record()` its recording variant; recompiles
    both when the config's plan file changed since they were compiled (`plan.reloaded`).

    The variant is the same Dynamo graph compiled with an observe op at every routing site. It is
    compiled on first use inside a record() block, from a copy of the graph taken before Inductor
    saw it and the same example inputs, so it accepts exactly the arguments `compiled` accepts.
    """

    def __init__(self, compiled: Callable[..., Any], gm: torch.fx.GraphModule,
                 example_inputs: Sequence[Any], config: LynxConfig, mode: str | None,
                 tracing_context: torch._guards.TracingContext | None, frame: FrameFacts) -> None:
        self.frame = frame
        self.compiled = compiled
        self.tracing_context = tracing_context
        self.gm = gm
        self.example_inputs = list(example_inputs)
        self.config = config
        self.mode = mode
        self._recording: Callable[..., Any] | None = None
        self._plan_stamp = file_stamp(config.plan.source) if config.plan is not None else None

    def __call__(self, *args: Any) -> Any:
        if self._plan_stamp is not None and file_stamp(self.config.plan.source) != self._plan_stamp:
            self._reload_plan()
        if active_recorder() is None:
            return self.compiled(*args)
        if self._recording is None:
            self._recording = self._recompile(record=True)
        return self._recording(*args)

    def _recompile(self, record: bool) -> Callable[..., Any]:
        # Same shape environment as the first compile, so symbolic sizes stay symbolic. The
        # guards already installed for this graph cover the copy: it is the same graph.
        with torch._guards.tracing(self.tracing_context):
            return _compile(_copy_graph_module(self.gm), _fake_inputs(self.gm, self.example_inputs), self.config,
                            self.mode, self.frame, record=record)

    def _reload_plan(self) -> None:
        self._plan_stamp = file_stamp(self.config.plan.source)
        fresh = reloaded(self.config.plan)
        if fresh is None:  # touched, same content
            return
        self.config = dataclasses.replace(self.config, plan=fresh)
        self.compiled = self._recompile(record=False)
        self._recording = None


def _fake_inputs(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> list[Any]:
    """Dynamo's own fake values for the graph inputs (symbolic sizes included), where recorded.

    Re-fakeifying real example inputs later would mint fresh symbols for every dim."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fakes = [n.meta.get("example_value") for n in placeholders]
    if len(fakes) != len(example_inputs) or any(f is None for f in fakes):
        return list(example_inputs)
    return fakes


def _copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    output, output_node = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph.output(output, type_expr=output_node.type)
    copied = torch.fx.GraphModule(gm, graph)
    copied.meta = dict(gm.meta)
    return copied


def _is_topk(node: torch.fx.Node) -> bool:
    """A top-k, or a max/argmax (routers choosing experts by rounds of max + mask)."""
    return (node.op == "call_function" and node.target in (torch.topk, torch.ops.aten.topk.default, torch.max,
                                                           torch.argmax)) or \
        (node.op == "call_method" and node.target in ("topk", "max", "argmax"))


def _mode_patches(mode: str | None) -> dict[str, Any]:
    if mode is None or mode == "default":
        return {}
    try:
        return dict(torch._inductor.list_mode_options(mode))
    except Exception as error:  # torch raises RuntimeError for unknown modes
        raise LynxOptionsError(f"lynx: unknown mode {mode!r}: {error}") from None
