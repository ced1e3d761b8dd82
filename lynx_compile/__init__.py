"""lynx-compile: a torch.compile backend that makes MoE decode read fewer experts.

    model = torch.compile(model, backend="lynx")

finds every MoE routing site (router -> scores -> top-k -> expert dispatch) in the graphs
Dynamo captures and rewrites decode-batch routing into batch-aware expert selection
(Lynx AffinityBinning), lowered through Inductor into generated kernels.
"""

from .calibration import calibrate
from .config import LynxConfig, LynxOptionsError, default_alpha_beta
from .explain import ExplainReport, explain
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
