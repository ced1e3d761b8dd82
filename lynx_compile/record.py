"""`with lynx_compile.record() as rec:` — what selection did, per routing site and call.

Inside the block, graphs compiled by the lynx backend run a recording variant of themselves
(compiled once, on first use) in which every routing site reports the experts the batch's plain
top-k would have used and the experts it uses after selection. Outside the block the normal
compiled graph runs and nothing is recorded: recording costs a device-to-host copy per site
and call, which is why it is off by default.

    with lynx_compile.record(model) as rec:
        compiled_model(**decode_inputs)
    print(rec.table())           # per site: calls, mean distinct experts before -> after
    rec.calls["model.layers.0.mlp.gate"][0].experts_after

Passing the (uncompiled) model lets sites be named by the module owning the router weight.
This matters when one compiled graph serves every layer (transformers' `eager` experts graph-break
inside each block, so Dynamo compiles the block once and reuses it); without it, a site is named
by its path inside the compiled frame (e.g. "gate").
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections import defaultdict
from collections.abc import Iterator

import torch

from .shards import experts_per_shard


@dataclasses.dataclass(frozen=True)
class SelectionCall:
    """One routing-site call inside a `record()` block."""

    site: str
    num_tokens: int
    experts_before: int  # distinct experts of the batch's plain top-k
    experts_after: int  # distinct experts after selection (== before when not rewritten)
    num_experts: int
    decode: bool  # a decode batch by the site's phase rule (only these are ever remapped)
    expert_budget: int | None = None  # the site's gate-mass budget (policy gate_mass_budget), else None
    over_budget: int = 0  # experts the voting rows use beyond expert_budget (0: within it, or no budget)
    top_k: int | None = None  # experts per token at the site
    choices: int = 0  # (token, slot) expert choices of the live rows: live tokens * top_k
    remapped: int = 0  # of those, choices of an expert outside the token's own plain top-k
    ids_before: tuple[int, ...] = ()  # the distinct expert ids of the plain top-k, ascending
    ids_after: tuple[int, ...] = ()  # the distinct expert ids after selection, ascending


def experts_per_rank(ids: tuple[int, ...], num_experts: int, ranks: int) -> list[int]:
    """Distinct experts each of `ranks` expert-parallel ranks reads, in the contiguous layout of
    `shards.py` (transformers' and vLLM's EP layout).

    Raises ValueError when E is not a multiple of R (no even layout to count against)."""
    per_rank = experts_per_shard(num_experts, ranks)
    counts = [0] * ranks
    for expert in ids:
        counts[expert // per_rank] += 1
    return counts


def site_names_by_storage(model: torch.nn.Module | None) -> dict[int, str]:
    """Parameter storage address -> the name of the module owning it ("model.layers.0.mlp.gate"):
    how a router weight seen at run time names its routing site, whichever graph it runs in."""
    if model is None:
        return {}
    return {param.data_ptr(): name.rsplit(".", 1)[0] if "." in name else name
            for name, param in model.named_parameters()}


class Recorder:
    def __init__(self, model: torch.nn.Module | None = None) -> None:
        self.calls: dict[str, list[SelectionCall]] = defaultdict(list)
        self._names_by_storage = site_names_by_storage(model)

    def site_name(self, fallback: str, router_weight: torch.Tensor) -> str:
        return self._names_by_storage.get(router_weight.data_ptr(), fallback)

    def add(self, call: SelectionCall) -> None:
        self.calls[call.site].append(call)

    def summary(self, decode_only: bool = True) -> dict[str, dict[str, float]]:
        """Per site: number of calls and mean distinct experts before/after (decode calls only)."""
        out = {}
        for site, all_calls in self.calls.items():
            calls = [c for c in all_calls if c.decode or not decode_only]
            if not calls:
                continue
            out[site] = {
                "calls": len(calls),
                "experts_before": sum(c.experts_before for c in calls) / len(calls),
                "experts_after": sum(c.experts_after for c in calls) / len(calls),
                "num_experts": calls[0].num_experts,
                "top_k": calls[0].top_k,
                # share of the (token, slot) choices selection sent to an expert the token did not pick
                "remapped_fraction": sum(c.remapped for c in calls) / max(1, sum(c.choices for c in calls)),
            }
            if calls[0].expert_budget is not None:
                out[site]["expert_budget"] = calls[0].expert_budget
                out[site]["over_budget_calls"] = sum(c.over_budget > 0 for c in calls)
        return out

    def per_rank(self, ranks: int, decode_only: bool = True) -> dict[str, dict[str, object]]:
        """Per site, under expert parallelism over `ranks` ranks (contiguous expert ranges): the
        mean over calls of the most experts any one rank reads (a step waits for that rank),
        before and after selection, and each rank's mean count after selection.

        Raises ValueError when a site's E is not a multiple of `ranks`."""
        out: dict[str, dict[str, object]] = {}
        for site, all_calls in self.calls.items():
            calls = [c for c in all_calls if c.decode or not decode_only]
            if not calls:
                continue
            before = [experts_per_rank(c.ids_before, c.num_experts, ranks) for c in calls]
            after = [experts_per_rank(c.ids_after, c.num_experts, ranks) for c in calls]
            out[site] = {
                "calls": len(calls),
                "ranks": ranks,
                "max_per_rank_before": sum(max(c) for c in before) / len(calls),
                "max_per_rank_after": sum(max(c) for c in after) / len(calls),
                "idle_ranks_after": sum(c.count(0) for c in after) / len(calls),
                "per_rank_after": [sum(c[r] for c in after) / len(calls) for r in range(ranks)],
            }
        return out

    def table(self, decode_only: bool = True) -> str:
        summary = self.summary(decode_only)
        budgets = any("expert_budget" in s for s in summary.values())
        rows = [("site", "decode calls" if decode_only else "calls", "E", "experts before", "experts after")
                + (("budget", "calls over budget") if budgets else ())]
        for site, s in summary.items():
            rows.append((site, str(s["calls"]), str(s["num_experts"]),
                         f"{s['experts_before']:.2f}", f"{s['experts_after']:.2f}")
                        + ((str(s.get("expert_budget", "-")), str(s.get("over_budget_calls", "-"))) if budgets else ()))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)

    def __repr__(self) -> str:
        return f"Recorder({sum(len(c) for c in self.calls.values())} calls at {len(self.calls)} sites)"


_state = threading.local()


def active_recorder() -> Recorder | None:
    return getattr(_state, "recorder", None)


@contextlib.contextmanager
def record(model: torch.nn.Module | None = None) -> Iterator[Recorder]:
    """Record, per routing site and call, distinct experts before and after selection.

    model: optional; names sites after the module that owns each router weight.
    """
    previous = active_recorder()
    recorder = Recorder(model)
    _state.recorder = recorder
    try:
        yield recorder
    finally:
        _state.recorder = previous


def report_selection(site: str, plain_indices: torch.Tensor, chosen_indices: torch.Tensor,
                     router_weight: torch.Tensor, num_experts: int, decode: bool,
                     voters: torch.Tensor | None = None, expert_budget: int | None = None) -> None:
    """Called by lynx::observe_selection inside recording variants of compiled graphs.

    voters: (T,) bool rows that voted (None: all); expert_budget: the site's gate-mass budget;
    num_experts: the real experts, ids from it on are zero-compute ones, which no batch loads."""
    recorder = active_recorder()
    if recorder is None:
        return
    live = slice(None) if voters is None else voters.to(torch.bool)
    ids_before = tuple(e for e in torch.unique(plain_indices).tolist() if e < num_experts)
    ids_after = tuple(e for e in torch.unique(chosen_indices).tolist() if e < num_experts)
    over_budget = 0
    if expert_budget is not None and decode:
        used = torch.unique(chosen_indices[live])
        over_budget = max(0, int((used < num_experts).sum()) - expert_budget)
    # (T, k, 1) vs (T, 1, k): a chosen expert is remapped when none of the token's plain top-k is it
    outside_own = (chosen_indices[live].unsqueeze(-1) != plain_indices[live].unsqueeze(-2)).all(-1)
    recorder.add(SelectionCall(
        site=recorder.site_name(site, router_weight),
        num_tokens=int(plain_indices.shape[0]),
        experts_before=len(ids_before),
        experts_after=len(ids_after),
        num_experts=int(num_experts),
        decode=bool(decode),
        expert_budget=expert_budget,
        over_budget=over_budget,
        top_k=int(plain_indices.shape[1]),
        choices=int(outside_own.numel()),
        remapped=int(outside_own.sum()),
        ids_before=ids_before,
        ids_after=ids_after,
    ))
