"""One compiled graph, every setting: the run-time policy switch calibration measures through.

Calibration tries several policies and parameters at every routing site. Compiling the model
once per (site, setting) would cost minutes per compile on a CPU; instead the graph is compiled
once with `lynx::switch_select` at every decode routing site (`LynxPostGradPass(switchable=True)`),
and the setting each site runs is read at run time from the table `use_settings` installs:

    with use_settings(model, {"model.layers.0.mlp.gate": SiteSetting(...)}):
        compiled(**decode_inputs)        # layer 0 runs that setting; the others plain top-k

Sites are named like `record()` names them (the module owning the router weight). The op is
opaque to Inductor, so its selection runs eagerly: the same Python body (`selection.batch_select`)
Inductor compiles for a deployed plan (`tests/lowering/test_selection_properties.py` checks they
agree).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from ..policies import SiteSetting
from ..policies.contract import plain_topk, voting_rows
from ..record import active_recorder, report_selection, site_names_by_storage
from . import selection

_state = threading.local()


class SettingsTable:
    """Site name -> the setting it runs now; sites named by their router weight's storage."""

    def __init__(self, model: torch.nn.Module, settings: dict[str, SiteSetting]) -> None:
        self.settings = dict(settings)
        self._names_by_storage = site_names_by_storage(model)

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
                  site: str, num_routed: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """lynx::switch_select's body: the active setting of this site on decode batches, plain top-k
    otherwise; reports to an active record() like a recording graph would.

    scores, logits: (T, E); live: (T,) bool or None; router_weight: (E, H), names the site;
    num_routed: columns from it on are zero-compute experts (-1: none)."""
    routed = None if num_routed < 0 else num_routed
    table = active_table()
    name = table.site_name(site, router_weight) if table is not None else site
    setting = table.settings.get(name) if table is not None else None
    plain_values, plain_indices = plain_topk(scores, k)
    decode = selection.is_decode(scores.shape[0], decode_token_bound)
    values, indices = plain_values, plain_indices
    if decode and setting is not None and setting.selects:
        values, indices = selection.batch_select(scores, logits, k, setting.policy, setting.params_dict(),
                                                 selection.NO_DECODE_BOUND, live, routed)
    if active_recorder() is not None:
        report_selection(name, plain_indices, indices, router_weight, routed or scores.shape[1], decode,
                         voting_rows(scores, logits, k, live), setting.reported_budget if setting else None)
    return values, indices
