"""The CPU selection kernel (`select_experts_cpu.cpp`): built on first use, registered in C++.

The source is compiled with torch's C++ extension builder (`torch.utils.cpp_extension.load`,
against the installed torch's headers, with ninja) into a library that registers the CPU kernel
of `lynx::select_experts_cpu` (schema and fake in `lowering/ops.py`) from C++, so Inductor's
generated code calls it through the dispatcher without Python. The library is named after the
source's hash, so an edit never loads a stale build; a build takes ~30 s once per machine (torch
caches it under TORCH_EXTENSIONS_DIR), loading it afterwards well under a second.

`available()` builds and loads it once per process and says whether that worked. Where it
cannot (no C++ compiler, no ninja), selection falls back to its traced torch body, which Inductor
compiles (`passes/lower_selection.py`); `explain` says which ran. `LYNX_SELECTION=body` forces the
traced body on CPU too (tests run both paths on any machine); `=kernel` (the default, "auto"
where it builds) the kernel. The setting is part of the pass's cache key.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib

from .choice import cpu_features

SOURCE = pathlib.Path(__file__).with_name("select_experts_cpu.cpp")
KERNEL_POLICIES = ("affinity_binning", "gate_mass_budget", "opportunistic", "protected_mass", "moved_mass", "none")  # the C++ knows
SELECTION_ENV = "LYNX_SELECTION"
SELECTION_PATHS = ("auto", "kernel", "body")


def selection_path() -> str:
    """LYNX_SELECTION: "auto" (default: the kernel where it builds), "kernel" or "body"."""
    value = os.environ.get(SELECTION_ENV, "auto")
    if value not in SELECTION_PATHS:
        raise ValueError(f"{SELECTION_ENV}={value!r}; expected one of {', '.join(SELECTION_PATHS)}")
    return value


def use_kernel() -> bool:
    """Whether CPU sites run the kernel now. Raises RuntimeError when LYNX_SELECTION=kernel and
    the kernel cannot be built."""
    path = selection_path()
    if path == "body":
        return False
    if path == "kernel" and not available():
        raise RuntimeError(f"{SELECTION_ENV}=kernel, but the CPU selection kernel did not build: {unavailable_reason()}")
    return available()


@functools.cache
def _load() -> str | None:
    """None when the library is loaded; else why it could not be built or loaded."""
    try:
        from torch.utils.cpp_extension import load

        # Built for the CPU it runs on (-march=native: the rank counting vectorizes), so the CPU's
        # features are part of the name, like the source: a shared cache never serves another CPU.
        digest = hashlib.sha256(SOURCE.read_bytes() + cpu_features().encode()).hexdigest()[:12]
        load(name=f"lynx_select_experts_{digest}", sources=[str(SOURCE)], extra_cflags=["-O3", "-march=native"],
             is_python_module=False, verbose=False)
    except Exception as error:  # noqa: BLE001 - any build failure means: use the traced body
        return f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
    return None


def available() -> bool:
    """Whether lynx::select_experts_cpu has its C++ CPU kernel in this process (built now if needed)."""
    return _load() is None


def unavailable_reason() -> str | None:
    """Why the kernel is not available, or None when it is."""
    return _load()
