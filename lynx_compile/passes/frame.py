"""What the frame Dynamo compiled tells about its graph: where it sits in its model, and which of
its modules hold stacked experts.

A post-grad graph names modules relative to the compiled frame (`nn_module_stack`): "gate" when
Dynamo compiled an MoE block on its own (transformers' `eager` experts loop graph-breaks inside
it; regional compilation compiles one layer), "model.layers.0.mlp.gate" when it compiled the
whole model. Two facts need the module objects themselves, which only the frame has:

  prefix         the frame owner's dotted path in the model running it ("" for the root,
                 "model.layers.0" for a layer compiled alone), so a site is named by its full
                 path (what `calibrate` and `record()` write) however it was compiled. The model
                 is the outermost module among the callers on the Python stack (the frames of
                 the model's forward that called the compiled one); with none, the owner is
                 the root.
  expert_stacks  (module path relative to the frame, E) for every module that directly holds
                 E-row stacked expert parameters: two or more 3-D parameters of leading dim E in
                 it or its children (transformers' fused experts, gpt-fast's w1/w2/w3; not a
                 convolution's weight), or a ModuleList / ModuleDict of E modules of one class
                 (per-expert modules). A router whose parent module is such a module chooses
                 experts: that is the evidence a graph that ends at the top-k (its indices leave
                 the graph) cannot show itself.
  siblings       full paths of the other modules of the owner's class under the same root:
                 one compiled graph serves all of them (Dynamo reuses it for every instance),
                 so per-layer plan entries that differ between them cannot apply.
  outer_stacks   E for every E-row expert stack the owner's parent module directly holds (a
                 router compiled on its own, `mlp.gate.compile(...)`: its experts are its
                 siblings, outside the frame).
  parameter_shapes  the shapes of every 3-D parameter of the owner and its parent (a sharded
                 one's local shape too): a graph input gathered by the top-k's ids is evidence of
                 stacked experts only if it is one of them, not a buffer of retrieval memory.

The facts are computed once per graph by the backend, while Dynamo's translator is active, and
are part of the pass's cache key.
"""

from __future__ import annotations

import collections
import dataclasses
import sys

import torch

_WRAPPER_CHILD = "_orig_mod"  # torch.compile(module) wraps the module as this child: not a path step


@dataclasses.dataclass(frozen=True)
class FrameFacts:
    prefix: str | None = None
    expert_stacks: tuple[tuple[str, int], ...] = ()
    siblings: tuple[str, ...] = ()
    owner_class: str | None = None
    outer_stacks: tuple[int, ...] = ()
    parameter_shapes: frozenset[tuple[int, ...]] = frozenset()
    # every module path of the root model (to tell a plan entry that names no module); not part
    # of the facts' identity: it changes no compiled graph
    module_names: frozenset[str] = dataclasses.field(default=frozenset(), compare=False, repr=False)

    def full_name(self, relative: str | None) -> str | None:
        """A module path relative to the frame -> its full path in the model (unchanged when the
        frame's place is unknown). None (a node of the owner's own forward) is the owner."""
        if not self.prefix:
            return relative
        return self.prefix if relative is None else f"{self.prefix}.{relative}"

    def is_parameter_stack(self, shape) -> bool:
        """Whether a 3-D graph input of this shape is one of the frame's parameters (always, when
        the frame is unknown: a graph compiled outside Dynamo has no module to ask)."""
        return self.owner_class is None or tuple(shape) in self.parameter_shapes

    def holds_experts(self, module: str | None, num_experts: int) -> bool:
        """Whether the module at this frame-relative path directly holds E stacked experts; None:
        the owner's parent, outside the frame."""
        if module is None:
            return num_experts in self.outer_stacks
        return (module, num_experts) in self.expert_stacks


def current_frame_facts() -> FrameFacts:
    """The facts of the frame Dynamo is compiling now; empty facts outside a Dynamo compile."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        translator = InstructionTranslator.current_tx()
    except Exception:  # noqa: BLE001 - no translator (a direct call, a future torch): no facts
        return FrameFacts()
    owner = (getattr(translator, "f_locals", None) or {}).get("self")
    if not isinstance(owner, torch.nn.Module):
        return FrameFacts()
    owner = getattr(owner, _WRAPPER_CHILD, owner)
    prefix, root = _place(owner)
    modules = dict(_named_modules(root))  # path -> module, every module of the model
    siblings = tuple(name for name, module in modules.items() if type(module) is type(owner) and module is not owner)
    parent = _parent(modules, prefix)
    return FrameFacts(prefix, _expert_stacks(owner), siblings, type(owner).__name__,
                      outer_stacks=_outer_stacks(parent), module_names=frozenset(modules),
                      parameter_shapes=_parameter_shapes(owner if parent is None else parent))


def _parent(modules: dict[str, torch.nn.Module], prefix: str) -> torch.nn.Module | None:
    """The module holding the owner (at `prefix` among the model's `modules`); None for the root."""
    if not prefix:
        return None
    return modules.get(prefix.rsplit(".", 1)[0] if "." in prefix else "")


def _parameter_shapes(module: torch.nn.Module) -> frozenset[tuple[int, ...]]:
    shapes = set()
    for param in module.parameters():
        if param.dim() == 3:
            shapes.add(tuple(int(s) for s in param.shape))
            local = param.to_local() if hasattr(param, "to_local") else None  # a DTensor's shard
            if local is not None:
                shapes.add(tuple(int(s) for s in local.shape))
    return frozenset(shapes)


def _outer_stacks(parent: torch.nn.Module | None) -> tuple[int, ...]:
    """E of each expert stack the module holding the owner holds itself."""
    if parent is None:
        return ()
    return tuple(sorted({experts for path, experts in _expert_stacks(parent) if path == ""}))


def _expert_stacks(owner: torch.nn.Module) -> tuple[tuple[str, int], ...]:
    """(path, E) for each module that holds E stacked experts: two or more 3-D parameters of
    leading dim E in it or its direct children (an expert needs at least an input and an output
    projection: transformers' gate_up_proj + down_proj, gpt-fast's w1, w2, w3), convolutions
    excluded (a Conv1d's weight is 3-D too), or a ModuleList / ModuleDict of E modules of one class.
    One 3-D parameter proves nothing (a classifier beside a convolution is not an MoE)."""
    stacks = set()
    for path, module in owner.named_modules():
        leading: collections.Counter[int] = collections.Counter()
        for holder in (module, *module.children()):
            if isinstance(holder, torch.nn.modules.conv._ConvNd):
                continue
            for param in holder.parameters(recurse=False):
                if param.dim() == 3:
                    leading[int(param.shape[0])] += 1
        stacks |= {(path, experts) for experts, count in leading.items() if count >= 2}
        for child in module.children():
            if isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict)) and len(child) >= 2:
                members = list(child.children())
                if len({type(m) for m in members}) == 1 and any(True for _ in members[0].parameters()):
                    stacks.add((path, len(members)))
    return tuple(sorted(stacks))


def _named_modules(module: torch.nn.Module):
    """named_modules() with torch.compile's wrapper step left out of the names."""
    for name, child in module.named_modules():
        parts = [part for part in name.split(".") if part != _WRAPPER_CHILD]
        yield ".".join(parts), child


def _place(owner: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """(the owner's path in the outermost calling module that holds it, that module).

    Reads the callers' frames (their `self`): the module whose forward is running the compiled
    frame, and its own callers up to the model the user called."""
    place, root = "", owner
    frame = sys._getframe(1)
    while frame is not None:
        caller = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
        if isinstance(caller, torch.nn.Module) and caller is not root:
            for name, module in _named_modules(caller):
                if module is owner and name:
                    place, root = name, caller
                    break
        frame = frame.f_back
    return place, root
