"""`lynx_compile.calibrate(model, batches, budget=...)`: a per-site plan under an accuracy budget.

Method (costs and approximation, also in docs/calibration.md):

 1. Compile the model once with every decode routing site switchable (`switchable_backend`,
    `lowering/switch_select.py`): one graph
    serves every setting, chosen at run time; no recompilation per setting.
 2. Reference pass: the calibration batches decoded teacher-forced with every site at plain
    top-k; keep every decode step's next-token distribution and, from `record()`, each site's
    distinct experts per decode step.
 3. Per site, per candidate setting (each policy over a small grid of its parameters,
    `candidate_settings`): one pass with only that site changed, every other at plain top-k.
    Its cost is the mean KL per token from the reference distributions (and the top-1 agreement
    with them); its saving is that site's distinct experts per step, before minus after.
 4. Choose per site the setting that saves the most experts within the budget, treating the
    combined cost as the SUM of the per-site costs (`choose.py`: an exact knapsack over that
    approximation).
 5. Check the combined plan once: one pass with every site at its chosen setting, measured the
    same way. If it exceeds the budget (per-site costs need not add up exactly), solve again
    with the budget scaled down by what the check measured and check again, at most
    `max_checks` times; if no checked plan fits, every site gets "none" (cost 0).

Cost: 1 + (sum over sites of the candidates tried) + (1 to max_checks) forward passes over the
batches, each pass one prefill plus L - prefix decode steps per batch; one compile.
Shipped coarse checkpoint at the defaults (4 batches of 16, 16 steps, 4 sites x 12 candidates):
1 + 48 + 1..3 passes of 64 decode steps each (about 2 minutes on two quiet cores).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..record import record
from ..backend import compile_with_lynx
from ..config import LynxConfig
from ..eval import tasks
from ..eval.fidelity import fidelity
from ..lowering.switch_select import use_settings
from ..policies import SiteSetting, resolve_parameters
from ..policies.affinity_binning import default_alpha_beta
from . import choose as choosing
from .choose import Candidate, check_budget, normalized_cost, within_budget
from .measure import decode_log_probs

METHOD = ("per-site costs measured one site at a time (the others at policy none), summed as the combined "
          "cost (knapsack), then the combined plan checked once (tightened and re-checked if over budget)")
DYNAMO_LIMITS = dict(recompile_limit=64, fail_on_recompile_limit_hit=True)


def switchable_backend(config: LynxConfig) -> Callable[..., Any]:
    """A torch.compile backend: lynx's pass with every decode routing site made switchable
    (`lynx::switch_select`: its setting read at run time from `use_settings`'s table)."""

    def backend(gm: torch.fx.GraphModule, example_inputs):
        return compile_with_lynx(gm, example_inputs, config, switchable=True)

    return backend


def candidate_settings(num_experts: int, top_k: int) -> list[tuple[str, dict[str, Any]]]:
    """The default grid per site: moved_mass at max_moved 0.02, 0.04, 0.06, 0.1; protected_mass
    at keep_mass 0.6; AffinityBinning at 0.5x, 1x, 2x its default alpha; the
    gate mass budget at 1/4, 1/2, 3/4 of E (distinct, below E); opportunistic at keep_top 1 .. k-1."""
    alpha, _ = default_alpha_beta(num_experts, top_k)
    out: list[tuple[str, dict[str, Any]]] = [("moved_mass", {"max_moved": m}) for m in (0.02, 0.04, 0.06, 0.1)]
    out += [("protected_mass", {"keep_mass": 0.6})]
    out += [("affinity_binning", {"alpha": alpha * f}) for f in (0.5, 1.0, 2.0)]
    budgets = sorted({max(1, math.ceil(num_experts * f)) for f in (0.25, 0.5, 0.75)} - {num_experts})
    out += [("gate_mass_budget", {"expert_budget": b}) for b in budgets]
    out += [("opportunistic", {"keep_top": t}) for t in range(1, top_k)]
    return out


def calibrate(model: torch.nn.Module, batches: list[torch.Tensor] | None = None,
              budget: dict[str, float] | None = None, *, prefix: int | None = None,
              settings: list[tuple[str, dict[str, Any]]] | None = None, config: LynxConfig | None = None,
              num_batches: int = 4, batch_size: int = 16, max_checks: int = 3,
              out: str | None = None, log=None) -> dict[str, Any]:
    """Measure every candidate setting at every routing site and return a plan (a dict, the JSON
    `options={"plan": ...}` loads; written to `out` too when given).

    model: a transformers causal LM (not compiled; left as it was). batches: (B, L) int64 token
    windows; the first `prefix` tokens are prefill, the rest are fed one per decode step. None:
    `num_batches` x `batch_size` windows of the training split's code (`data.py`), prefix 32,
    16 steps, tokenized with the tokenizer saved beside the model (`model.name_or_path`).
    budget: {"kl": nats per token} and/or {"top1_agreement": floor}; default {"kl": 0.01}.
    settings: candidate (policy, params) pairs tried at every site (default `candidate_settings`).
    config: options kept while calibrating (e.g. pad_token_id); its policy and plan are ignored.
    Raises ValueError for a bad budget or batches."""
    budget = check_budget({"kl": 0.01} if budget is None else budget)
    say = log or (lambda message: None)
    if batches is None:
        batches, prefix = _default_batches(model, num_batches, batch_size), tasks.CODE_TOKEN_PREFIX
    prefix = tasks.CODE_TOKEN_PREFIX if prefix is None else prefix
    _check_batches(batches, prefix)
    started = time.perf_counter()
    compiled = torch.compile(model, backend=switchable_backend(_calibration_config(config)))
    passes = 0

    def run(site_settings: dict[str, SiteSetting]):
        nonlocal passes
        passes += 1
        with torch._dynamo.config.patch(**DYNAMO_LIMITS), use_settings(model, site_settings), \
                record(model) as recorder:
            log_probs = decode_log_probs(compiled, model.config, batches, prefix)
        return log_probs, recorder.summary(decode_only=True)

    reference, summary = run({})
    sites = {name: (int(s["num_experts"]), int(s["top_k"])) for name, s in summary.items()}
    if not sites:
        raise ValueError("calibrate: no routing site selected any decode step of the batches; is the model an MoE "
                         "with a top-k router (see lynx_compile.explain)?")
    say(f"reference pass: {len(sites)} routing site(s), {reference.shape[0]} decode tokens")

    candidates: dict[str, list[Candidate]] = {}
    for site, (num_experts, top_k) in sites.items():
        candidates[site] = []
        for policy, params in (settings if settings is not None else candidate_settings(num_experts, top_k)):
            setting = _setting(policy, params, num_experts, top_k, site)
            log_probs, measured = run({site: setting})
            fid = fidelity(reference, log_probs)
            candidates[site].append(Candidate(policy, setting.params, fid.kl, fid.top1_agreement,
                                              measured[site]["experts_before"], measured[site]["experts_after"]))
            say(f"{site}: {setting.describe()}: KL {fid.kl:.3g}, top-1 {fid.top1_agreement:.3f}, experts "
                f"{measured[site]['experts_before']:.2f} -> {measured[site]['experts_after']:.2f}")

    scale, checks, chosen, combined = 1.0, [], None, None
    for _ in range(max_checks):
        proposal = choosing.choose(candidates, budget, scale)
        selecting = {site: _setting(c.policy, dict(c.params), *sites[site], site)
                     for site, c in proposal.items() if c.policy != "none"}
        if not selecting:
            break
        log_probs, measured = run(selecting)
        fid = fidelity(reference, log_probs)
        check = {"scale": round(scale, 6), **fid.as_dict(), **_experts(measured),
                 "experts_by_site": {site: [round(m["experts_before"], 4), round(m["experts_after"], 4)]
                                     for site, m in measured.items()},
                 "within_budget": within_budget(fid.kl, fid.top1_agreement, budget)}
        checks.append(check)
        say(f"combined check at budget x{scale:.3f}: KL {fid.kl:.3g}, top-1 {fid.top1_agreement:.3f}, "
            f"experts {check['experts_before']:.2f} -> {check['experts_after']:.2f}, within budget: "
            f"{check['within_budget']}")
        if check["within_budget"]:
            chosen, combined = proposal, check
            break
        scale *= min(0.8, 1.0 / normalized_cost(fid.kl, fid.top1_agreement, budget))
    if chosen is None:  # nothing fits (or nothing saves): leave every site alone, cost 0 by construction
        chosen = {site: Candidate("none", (), 0.0, 1.0, 0.0, 0.0) for site in sites}
        combined = {"kl": 0.0, "kl_p99": 0.0, "top1_agreement": 1.0, "tokens": int(reference.shape[0]),
                    **_experts(summary), "within_budget": True}
        combined["experts_after"] = combined["experts_before"]
        combined["experts_by_site"] = {site: [round(m["experts_before"], 4)] * 2 for site, m in summary.items()}

    plan = _plan_dict(model, budget, sites, candidates, chosen, combined, checks, summary, batches, prefix,
                      passes, time.perf_counter() - started)
    if out is not None:
        from ..plan import write_plan

        write_plan(out, plan)
    return plan


def _setting(policy: str, params: dict[str, Any], num_experts: int, top_k: int, site: str) -> SiteSetting:
    return SiteSetting(policy, tuple(resolve_parameters(policy, params, num_experts, top_k, site).items()),
                       "calibration")


def _calibration_config(config: LynxConfig | None) -> LynxConfig:
    """The user's options with a selecting policy and no plan: every site switchable, max-rounds
    routers canonicalized, and the expert dispatch treated as at a deployed selecting site
    (experts="auto" decides as it does for a site whose policy selects)."""
    config = config or LynxConfig()
    return LynxConfig(phase=config.phase, max_decode_tokens=config.max_decode_tokens, experts=config.experts,
                      max_experts=config.max_experts, pad_token_id=config.pad_token_id)


def _default_batches(model, num_batches: int, batch_size: int) -> list[torch.Tensor]:
    import transformers

    from .data import default_batches

    path = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except Exception as error:  # noqa: BLE001 - any failure means: no tokenizer beside the model
        raise ValueError(f"calibrate: no batches given and no tokenizer found beside the model ({path!r}: "
                         f"{type(error).__name__}); pass batches=[(B, L) token windows]") from None
    return default_batches(tokenizer, num_batches, batch_size)


def _check_batches(batches: list[torch.Tensor], prefix: int) -> None:
    if not batches:
        raise ValueError("calibrate: batches is empty")
    for index, windows in enumerate(batches):
        if not (isinstance(windows, torch.Tensor) and windows.dim() == 2 and not windows.is_floating_point()):
            raise ValueError(f"calibrate: batch {index} must be a (B, L) integer tensor of token ids")
        if windows.shape[1] <= prefix or prefix < 1:
            raise ValueError(f"calibrate: batch {index} has {windows.shape[1]} tokens per row; it needs more than "
                             f"prefix={prefix} (prefill) to have decode steps")


def _experts(summary: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean over sites of distinct experts per decode step, before (plain top-k) and after."""
    if not summary:
        return {"experts_before": 0.0, "experts_after": 0.0}
    return {"experts_before": round(sum(s["experts_before"] for s in summary.values()) / len(summary), 4),
            "experts_after": round(sum(s["experts_after"] for s in summary.values()) / len(summary), 4)}


def _model_name(model) -> str:
    """The model's name for a plan: the hub id or the checkpoint directory's name, never a local path
    (plans are shared and committed; where the model lies on one machine means nothing elsewhere)."""
    name_or_path = str(getattr(model, "name_or_path", "") or "")
    return Path(name_or_path).name if Path(name_or_path).is_absolute() else name_or_path


def _plan_dict(model, budget, sites, candidates, chosen, combined, checks, summary, batches, prefix, passes,
               seconds) -> dict[str, Any]:
    def measured(c: Candidate, site: str) -> dict[str, float]:
        if c.policy == "none":
            before = summary[site]["experts_before"]
            return {"kl": 0.0, "top1_agreement": 1.0, "experts_before": round(before, 4),
                    "experts_after": round(before, 4), "saved": 0.0}
        return {"kl": round(c.kl, 6), "top1_agreement": round(c.top1_agreement, 6),
                "experts_before": round(c.experts_before, 4), "experts_after": round(c.experts_after, 4),
                "saved": round(c.saved, 4)}

    config = model.config
    return {
        "model": {"name": _model_name(model), "model_type": config.model_type},
        "budget": budget,
        "sites": {site: {"policy": c.policy, "params": dict(c.params), "measured": measured(c, site)}
                  for site, c in chosen.items()},
        "combined": combined,
        "checks": checks,
        "calibration": {
            "method": METHOD,
            "batches": len(batches), "batch_size": int(batches[0].shape[0]), "prefix": prefix,
            "decode_tokens": int(sum(b.shape[0] * (b.shape[1] - prefix) for b in batches)),
            "forward_passes": passes, "seconds": round(seconds, 1),
            "candidates": {site: [{"policy": c.policy, "params": dict(c.params), **measured(c, site)}
                                  for c in cands] for site, cands in candidates.items()},
        },
    }


def plan_table(plan: dict[str, Any]) -> str:
    """The plan as a text table: per site its setting, measured cost and experts before -> after."""
    rows = [("site", "policy", "params", "KL", "top-1", "experts")]
    for site, entry in plan["sites"].items():
        m = entry.get("measured", {})
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry["params"].items())
        rows.append((site, entry["policy"], params or "-", f"{m.get('kl', 0):.3g}", f"{m.get('top1_agreement', 1):.3f}",
                     f"{m.get('experts_before', 0):.2f} -> {m.get('experts_after', 0):.2f}"))
    c = plan["combined"]
    rows.append(("combined (measured)", "", "", f"{c['kl']:.3g}", f"{c['top1_agreement']:.3f}",
                 f"{c['experts_before']:.2f} -> {c['experts_after']:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
