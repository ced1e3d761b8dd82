"""Per-site selection plans: which policy, with which parameters, at each routing site.

A plan is what `lynx_compile.calibrate` writes and what `options={"plan": path_or_dict}` loads.
JSON, one entry per routing site, keyed by the site's name (the module owning the router
weight, as `explain` and `record` name it, e.g. "model.layers.0.mlp.gate"):

    {
      "format": "lynx-plan", "version": 1,
      "sites": {
        "model.layers.0.mlp.gate": {"policy": "gate_mass_budget", "params": {"expert_budget": 4},
                                    "measured": {"kl": 0.0021, "top1_agreement": 0.993,
                                                 "experts_before": 7.0, "experts_after": 4.1}},
        "model.layers.1.mlp.gate": {"policy": "none"}
      },
      ... any other keys: metadata (the budget, the calibration data, the combined check)
    }

Only "sites" and, per site, "policy" and "params" are read; "params" may be partial (missing
parameters take the policy's defaults for the site's E and k) and may hold only the policy's own
parameters. Sites a plan does not name fall back to the config's policy (`explain` says which).

A plan read from a file remembers the file's state (`file_stamp`); the backend compares it on
each call of a compiled graph (one `os.stat`) and, when the file's content changed, reloads it
and recompiles that graph, so an edited plan takes effect on the next call without
`torch._dynamo.reset()` (Dynamo reuses a compiled graph for options that compare equal, and
`{"plan": path}` compares equal whatever the file holds).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from .errors import LynxOptionsError
from .policies import check_parameters

FORMAT = "lynx-plan"
VERSION = 1


@dataclasses.dataclass(frozen=True)
class PlanEntry:
    policy: str
    params: tuple[tuple[str, Any], ...] = ()  # (name, value), the policy's own parameters

    def params_dict(self) -> dict[str, Any]:
        return dict(self.params)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A validated plan: where it came from, and its entries by site name."""

    source: str  # the file it was read from, or "<dict>"
    sites: tuple[tuple[str, PlanEntry], ...]

    def entry(self, site: str) -> PlanEntry | None:
        return dict(self.sites).get(site)

    def site_names(self) -> list[str]:
        return [name for name, _ in self.sites]


def file_stamp(source: str) -> tuple[int, int] | None:
    """(mtime in ns, size) of a plan's file, None for a dict plan or a file gone."""
    if source == "<dict>":
        return None
    try:
        status = os.stat(source)
    except OSError:
        return None
    return status.st_mtime_ns, status.st_size


def reloaded(plan: Plan) -> Plan | None:
    """The plan as its file holds it now, if that differs from `plan`; None when unchanged (or a
    dict plan). Raises LynxOptionsError when the edited file is no longer a valid plan."""
    if plan.source == "<dict>":
        return None
    fresh = load_plan(plan.source)
    return None if fresh == plan else fresh


def load_plan(value: str | os.PathLike | dict | Plan) -> Plan:
    """A path to a plan JSON file, or the plan's dict, or a Plan -> a validated Plan.

    Raises LynxOptionsError (a ValueError) naming the file and the problem."""
    if isinstance(value, Plan):
        return value
    if isinstance(value, dict):
        return _parse(value, "<dict>")
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        try:
            text = path.read_text()
        except OSError as error:
            raise LynxOptionsError(f"lynx: option 'plan': cannot read plan file {str(path)!r}: "
                                   f"{error.strerror or error}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise LynxOptionsError(f"lynx: option 'plan': plan file {str(path)!r} is not valid JSON: "
                                   f"{error}") from None
        return _parse(data, str(path))
    raise LynxOptionsError(f"lynx: option 'plan' got {type(value).__name__}; expected a path to a plan JSON "
                           "file, a plan dict, or None")


def _parse(data: Any, source: str) -> Plan:
    def fail(problem: str) -> None:
        where = f"plan file {source!r}" if source != "<dict>" else "the plan dict"
        raise LynxOptionsError(f"lynx: option 'plan': {where}: {problem}")

    if not isinstance(data, dict):
        fail(f"expected a JSON object with a 'sites' object, got {type(data).__name__}")
    if "format" in data and data["format"] != FORMAT:
        fail(f"'format' is {data['format']!r}, expected {FORMAT!r}")
    if "version" in data and data["version"] != VERSION:
        fail(f"'version' is {data['version']!r}; this lynx reads version {VERSION}")
    sites = data.get("sites")
    if not isinstance(sites, dict) or not sites:
        fail("expected a non-empty 'sites' object mapping site names to {\"policy\": ..., \"params\": {...}}")
    entries = []
    for name, entry in sites.items():
        if not isinstance(entry, dict) or "policy" not in entry:
            fail(f"site {name!r}: expected an object with a 'policy', got {entry!r}")
        params = entry.get("params", {})
        if not isinstance(params, dict):
            fail(f"site {name!r}: 'params' must be an object, got {params!r}")
        try:
            check_parameters(entry["policy"], params)
        except LynxOptionsError as error:
            fail(f"site {name!r}: {str(error).removeprefix('lynx: ')}")
        entries.append((name, PlanEntry(entry["policy"], tuple(sorted(params.items())))))
    return Plan(source, tuple(entries))


def write_plan(path: str | os.PathLike, data: dict) -> None:
    """Write a plan dict (validated first, so what is written loads back)."""
    _parse(data, str(path))
    Path(path).write_text(json.dumps({"format": FORMAT, "version": VERSION, **data}, indent=1) + "\n")
