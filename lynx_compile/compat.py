"""What differs between the torch versions lynx runs on, guarded in one place.

CI runs torch 2.13; the GPU machine this project is lent has torch 2.11 (installed with
`pip install --no-deps`, so pyproject's `torch>=2.13` is not enforced there). Each entry names
the torch change it bridges and is detected by the feature itself, not by version number. Read
from torch's history, not run on 2.11 here (no 2.11 available offline): see docs/cuda.md.

optimization_hint(size)     a SymInt's hint without adding a guard. torch.fx.experimental.
                            symbolic_shapes.optimization_hint arrived in 2026 (pytorch #175497,
                            relanded as #177570) and replaced `hint_int`, which 2.13 no longer has.
CUSTOM_PASS_LISTS           whether Inductor's custom-pass hooks take a list of passes
                            (pytorch #184108, May 2026: `get_custom_graph_passes`). Before it a
                            hook holds one pass; `pass_manager.inductor_patches` then chains ours
                            after the configured one inside a single CustomGraphPass.
"""

from __future__ import annotations

import torch



def example_size(size, fallback=None):
    """A size's example value (a backed SymInt's hint), or `fallback` when it has none; no guard."""
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        return int(hint) if hint is not None else fallback
    return int(size)


try:
    from torch.fx.experimental.symbolic_shapes import optimization_hint
except ImportError:  # torch before pytorch #177570 (2.11 likely; not reached on CI's 2.13)
    try:
        from torch.fx.experimental.symbolic_shapes import hint_int as optimization_hint  # type: ignore[no-redef]
    except ImportError:
        optimization_hint = example_size  # type: ignore[assignment]

try:
    from torch._inductor.custom_graph_pass import get_custom_graph_passes as _get_custom_graph_passes  # noqa: F401

    CUSTOM_PASS_LISTS = True
except ImportError:  # torch before pytorch #184108 (2.11 surely: merged May 2026)
    CUSTOM_PASS_LISTS = False
