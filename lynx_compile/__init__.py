"""lynx-compile: a torch.compile backend that makes MoE decode read fewer experts.

    model = torch.compile(model, backend="lynx")

finds every MoE routing site (router -> scores -> top-k -> expert dispatch) in the graphs
Dynamo captures and rewrites decode-batch routing into batch-aware expert selection
(Lynx AffinityBinning), lowered through Inductor into generated kernels.

`calibrate` is loaded on first use: `backend="lynx"` (which imports this package) never pays for
the calibration and evaluation code.
"""

from typing import Any

from .config import LynxConfig
from .errors import LynxOptionsError
from .explain import ExplainReport, explain
from .policies.affinity_binning import default_alpha_beta
from .record import Recorder, record

__all__ = [
    "ExplainReport",
    "LynxConfig",
    "LynxOptionsError",
    "Recorder",
    "calibrate",
    "default_alpha_beta",
    "explain",
    "record",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "calibrate":
        from .calibration.procedure import calibrate

        return calibrate
    raise AttributeError(f"module 'lynx_compile' has no attribute {name!r}")
