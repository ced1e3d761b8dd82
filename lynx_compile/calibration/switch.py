"""One compiled graph, every setting: the run-time policy switch calibration measures through.

Calibration tries several policies and parameters at every routing site. Compiling the model
once per (site, setting) would cost minutes per compile on a CPU; instead the graph is compiled
once with `lynx::switch_select` at every decode routing site (`compile_switchable`), and the
setting each site runs is read at run time from the table installed by `use_settings`:

    compiled = torch.compile(model, backend=switchable_backend(config))
    with use_settings(model, {"model.layers.0.mlp.gate": SiteSetting(...)}):
        compiled(**decode_inputs)        # layer 0 runs that setting; the others plain top-k

Sites are named like `record()` names them (the module owning the router weight). The op is
opaque to Inductor, so its selection runs eagerly (the same Python body that Inductor compiles
for a deployed plan: `tests/lowering/test_selection_properties.py` checks they agree).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..config import LynxConfig, SiteSetting
from ..lowering import selection
from ..record import active_recorder, report_selection

_state = threading.local()


class SettingsTable:
    """Site name -> the setting it runs now; sites named by their router weight's storage."""

    def __init__(self, model: torch.nn.Module, settings: dict[str, SiteSetting]) -> None:
        self.settings = dict(settings)
        self._names_by_storage = {param.data_ptr(): name.rsplit(".", 1)[0]
                                  for name, param in model.named_parameters()}

    def site_name(self, fallback: str, router_weight: torch.Tensor) -> str:
        return self._names_by_storage.get(router_weight.data_ptr(), fallback)


def active_table() -> SettingsTable | None:
    return getattr(_state, "table", None)


@contextlib.contextmanager
def use_settings(model: torch.nn.Module, settings: dict[str, SiteSetting]) -> Iterator[SettingsTable]:
    """Inside the block, switchable graphs run `settings` (site name -> setting); sites not named,
    and any call outside a block, run plain top-k."""
    previous = active_table()
    _state.table = table = SettingsTable(model, settings)
    try:
        yield table
    finally:
        _state.table = previous


def switch_select(scores: torch.Tensor, logits: torch.Tensor, k: int, decode_token_bound: int,
                  live: torch.Tensor | None, router_weight: torch.Tensor,
                  site: str) -> tuple[torch.Tensor, torch.Tensor]:
    """lynx::switch_select's body: the active setting of this site on decode batches, plain top-k
    otherwise; reports to an active record() like a recording graph would."""
    table = active_table()
    name = table.site_name(site, router_weight) if table is not None else site
    setting = table.settings.get(name) if table is not None else None
    plain_values, plain_indices = selection.plain_topk(scores, k)
    is_decode = decode_token_bound == selection.NO_DECODE_BOUND or scores.shape[0] <= decode_token_bound
    values, indices = plain_values, plain_indices
    if is_decode and setting is not None and setting.selects:
        op = setting.op_arguments()
        values, indices = selection.batch_select(scores, logits, k, op["alpha"], op["beta"], op["confidence_gap"],
                                                 selection.NO_DECODE_BOUND, live, op["policy"],
                                                 op["expert_budget"], op["keep_top"])
    if active_recorder() is not None:
        budget = setting.op_arguments()["expert_budget"] if setting and setting.policy == "gate_mass_budget" else None
        report_selection(name, plain_indices, indices, router_weight, scores.shape[1], is_decode,
                         selection.voting_rows(scores, logits, k, live), budget)
    return values, indices


def switchable_backend(config: LynxConfig) -> Callable[..., Any]:
    """A torch.compile backend: lynx's pass with every decode routing site made switchable."""
    from ..backend import compile_with_lynx

    def backend(gm: torch.fx.GraphModule, example_inputs):
        return compile_with_lynx(gm, example_inputs, config, switchable=True)

    return backend
