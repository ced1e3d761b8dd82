"""User-facing configuration of the lynx backend.

`LynxConfig` is what `torch.compile(model, backend="lynx", options=...)` accepts, either whole
(`options={"config": LynxConfig(...)}`) or as its fields (`options={"policy": "none"}`).
Every field is validated on construction; a bad key or value raises `LynxOptionsError`, a
`ValueError` that names the key and lists what is valid.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .policies import ALL_PARAMETERS, PARAMETERS, POLICIES
PHASES = ("decode", "all")
EXPERTS_MODES = ("auto", "fused", "inductor", "keep")


def _dynamo_passthrough_base() -> tuple[type, ...]:
    # Dynamo wraps any exception a backend raises in BackendCompilerFailed, except those deriving
    # from ShortenTraceback, which it re-raises untouched. Mixing it in lets a bad `options=` reach
    # the user as the ValueError it is. If a future torch drops the class, we degrade to the wrap.
    try:
        from torch._dynamo.exc import ShortenTraceback
    except ImportError:  # pragma: no cover - depends on the torch version
        return ()
    return (ShortenTraceback,)


class LynxOptionsError(ValueError, *_dynamo_passthrough_base()):
    """A bad `options=` key or value given to the lynx backend."""

    def __init__(self, message: str) -> None:
        ValueError.__init__(self, message)
        self.first_useful_frame = None

    def remove_dynamo_frames(self) -> LynxOptionsError:
        return self


@dataclasses.dataclass(frozen=True)
class LynxConfig:
    """What the lynx backend does to each MoE routing site it finds.

    Attributes:
        policy: the selection policy of every routing site (`lynx_compile/policies/`):
            "affinity_binning" (Lynx v3), "gate_mass_budget" (XShare), "opportunistic" (OEA), or
            "none", which leaves routing untouched (outputs bit-identical to default Inductor).
            A policy's parameters may only be given with that policy (an error otherwise).
        alpha: (affinity_binning) bin sharpness; a bin spans 1/alpha logit units of router
            affinity gap. None: chosen from the layer's sparsity k/E (see `default_alpha_beta`).
        beta: (affinity_binning) number of bins below bin 0; weaker preferences all land in bin
            -beta. None: chosen from k/E.
        confidence_gap: (affinity_binning, gate_mass_budget) a token is confident when its
            second-best expert trails its best by more than this many logit units; confident
            tokens always keep their top-1. None: 1/alpha (the top-1 is alone in bin 0), with
            AffinityBinning's default alpha for k/E under gate_mass_budget.
        expert_budget: (gate_mass_budget) the experts a batch may use per layer: an int >= 1, or
            a fraction of E in (0, 1] (rounded up). None: 0.5. Grown where the batch needs more
            (confident top-1s, k eligible experts per token); `record()` reports it.
        keep_top: (opportunistic) each token's own top experts it always keeps, an int in
            [1, k]; its other slots go to experts the batch loads anyway. None: max(1, k // 2).
        phase: "decode" remaps only decode batches (each sequence contributes one token);
            "all" remaps every batch, prefill included (for studies; hurts accuracy).
        max_decode_tokens: for sites whose (batch, seq, hidden) flatten is not visible in the
            graph, treat a batch of at most this many tokens as decode. None: leave such
            sites untouched (the reason shows in `explain`).
        experts: "fused" replaces the expert dispatch after a rewritten routing site with
            lynx's fused MoE op; "inductor" with sorted pairs + two aten._grouped_mm that
            Inductor compiles (bf16 only); "keep" leaves it; "auto" fuses (the lynx op) when a
            selection policy is on.
        max_experts: a top-k over more than this many columns is never taken for routing
            (vocabularies are larger; MoE layers have at most a few hundred experts).
        pad_token_id: rows of a decode batch whose current input token is this id are dead
            (finished sequences in `generate()`, padding rows of a serving batch): they do not
            vote and never change a live row's experts. The mask is computed in the graph from
            the token ids the model embeds. None: every row votes.
        plan: a per-site plan (`lynx_compile.calibrate` writes them; format in `plan.py`): a path
            to its JSON file or its dict. Sites it names take its policy and parameters; the
            others take `policy` and its parameters. Read and validated when the config is
            built (an error names the file and the problem); held as a `plan.Plan`.
    """

    policy: str = "affinity_binning"
    alpha: float | None = None
    beta: int | None = None
    confidence_gap: float | None = None
    phase: str = "decode"
    max_decode_tokens: int | None = None
    experts: str = "auto"
    max_experts: int = 1024
    pad_token_id: int | None = None
    expert_budget: int | float | None = None
    keep_top: int | None = None
    plan: Any = None  # str | os.PathLike | dict | plan.Plan | None; held as a plan.Plan

    def __post_init__(self) -> None:
        _check_choice("policy", self.policy, POLICIES)
        _check_choice("phase", self.phase, PHASES)
        _check_choice("experts", self.experts, EXPERTS_MODES)
        check_policy_parameters(self.policy, {name: getattr(self, name) for name in ALL_PARAMETERS
                                              if getattr(self, name) is not None})
        _check_int("max_decode_tokens", self.max_decode_tokens, minimum=1, allow_none=True)
        _check_int("max_experts", self.max_experts, minimum=2, allow_none=False)
        _check_int("pad_token_id", self.pad_token_id, minimum=0, allow_none=True)
        if self.plan is not None:
            from .plan import load_plan

            object.__setattr__(self, "plan", load_plan(self.plan))

    @property
    def selects(self) -> bool:
        """True when some routing site may be rewritten into a selection op."""
        return self.policy != "none" or (self.plan is not None and
                                         any(e.policy != "none" for _, e in self.plan.sites))

    @property
    def fuses_experts(self) -> bool:
        return self.experts in ("fused", "inductor") or (self.experts == "auto" and self.selects)

    def fuses_experts_at(self, site: str, num_experts: int, top_k: int) -> bool:
        """Whether the expert dispatch after this site is replaced ("auto": where the site selects)."""
        return self.experts in ("fused", "inductor") or (
            self.experts == "auto" and self.site_setting(site, num_experts, top_k).selects)

    def site_setting(self, site: str, num_experts: int, top_k: int) -> SiteSetting:
        """The policy and resolved parameters of one routing site: its plan entry if the plan
        names it, else the config's. Raises LynxOptionsError for parameters the site's k refuses."""
        entry = self.plan.entry(site) if self.plan is not None else None
        if entry is not None:
            policy, given, source = entry.policy, entry.params_dict(), f"plan {self.plan.source}"
        else:
            policy = self.policy
            given = {name: getattr(self, name) for name in PARAMETERS[policy] if getattr(self, name) is not None}
            source = "config" if self.plan is None else "config (site not in plan)"
        params = resolve_parameters(policy, given, num_experts, top_k, site)
        return SiteSetting(policy, tuple(params.items()), source)

    def resolved_alpha_beta(self, num_experts: int, top_k: int) -> tuple[float, int]:
        """AffinityBinning's (alpha, beta) for a site of E experts, top-k (the config's, or defaults)."""
        alpha, beta = default_alpha_beta(num_experts, top_k)
        return (self.alpha if self.alpha is not None else alpha,
                self.beta if self.beta is not None else beta)

    def resolved_confidence_gap(self, alpha: float) -> float:
        return self.confidence_gap if self.confidence_gap is not None else 1.0 / alpha

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> LynxConfig:
        """Build a config from `torch.compile(..., options=...)`.

        Accepts {"config": LynxConfig(...)} optionally plus field overrides, or fields alone.
        """
        if options is None:
            return cls()
        if not isinstance(options, dict):
            raise LynxOptionsError(
                f"lynx: options must be a dict, got {type(options).__name__}; "
                f"valid keys: {', '.join(('config',) + cls.field_names())}")
        options = dict(options)
        base = options.pop("config", None)
        if base is not None and not isinstance(base, LynxConfig):
            raise LynxOptionsError(
                f"lynx: option 'config' must be a lynx_compile.LynxConfig, got {type(base).__name__}")
        valid = cls.field_names()
        for key in options:
            if key not in valid:
                raise LynxOptionsError(
                    f"lynx: unknown option {key!r}; valid options: {', '.join(('config',) + valid)}")
        return dataclasses.replace(base or cls(), **options)


@dataclasses.dataclass(frozen=True)
class SiteSetting:
    """What one routing site runs: a policy, its resolved parameters, and where they came from."""

    policy: str
    params: tuple[tuple[str, int | float], ...]  # the policy's own parameters, resolved
    source: str  # "config", "config (site not in plan)" or "plan <file>"

    @property
    def selects(self) -> bool:
        return self.policy != "none"

    def params_dict(self) -> dict[str, int | float]:
        return dict(self.params)

    def op_arguments(self) -> dict[str, Any]:
        """The lynx::batch_select arguments (alpha, beta, confidence_gap, policy, expert_budget,
        keep_top); parameters the policy does not take are passed as 0."""
        params = self.params_dict()
        return {"alpha": float(params.get("alpha", 0.0)), "beta": int(params.get("beta", 0)),
                "confidence_gap": float(params.get("confidence_gap", 0.0)), "policy": self.policy,
                "expert_budget": int(params.get("expert_budget", 0)), "keep_top": int(params.get("keep_top", 0))}

    def describe(self) -> str:
        """e.g. "gate_mass_budget(expert_budget=4, confidence_gap=1.43) [plan plan.json]"."""
        params = ", ".join(f"{name}={_short(value)}" for name, value in self.params)
        return f"{self.policy}({params}) [{self.source}]" if params else f"{self.policy} [{self.source}]"


def _short(value: int | float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


DEFAULT_EXPERT_BUDGET = 0.5  # gate_mass_budget: half of E


def check_policy_parameters(policy: Any, params: dict[str, Any]) -> None:
    """Validate a policy name and the parameters given with it (values not None).

    Raises LynxOptionsError naming the key: an unknown policy, a parameter the policy does not
    take (naming both, and the policy the parameter belongs to), or a bad value."""
    _check_choice("policy", policy, POLICIES)
    for name, value in params.items():
        if name not in ALL_PARAMETERS:
            raise LynxOptionsError(f"lynx: unknown parameter {name!r} for policy {policy!r}; "
                                   f"its parameters: {', '.join(PARAMETERS[policy]) or 'none'}")
        if name not in PARAMETERS[policy]:
            owners = [p for p, names in PARAMETERS.items() if name in names]
            raise LynxOptionsError(
                f"lynx: option {name!r} is a parameter of policy {' and '.join(map(repr, owners))}, not of policy "
                f"{policy!r} (its parameters: {', '.join(PARAMETERS[policy]) or 'none'})")
        _check_parameter(name, value)


def _check_parameter(name: str, value: Any) -> None:
    if name == "alpha":
        _check_number("alpha", value, positive=True, allow_none=True)
    elif name == "confidence_gap":
        _check_number("confidence_gap", value, positive=False, allow_none=True)
    elif name == "beta":
        _check_int("beta", value, minimum=1, allow_none=True)
    elif name == "keep_top":
        _check_int("keep_top", value, minimum=1, allow_none=True)
    elif name == "expert_budget":
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            _fail("expert_budget", value, "an integer >= 1 (experts) or a fraction of E in (0, 1]")
        if isinstance(value, int) and value < 1:
            _fail("expert_budget", value, "an integer >= 1 (experts) or a fraction of E in (0, 1]")
        if isinstance(value, float) and not 0 < value <= 1:
            _fail("expert_budget", value, "an integer >= 1 (experts) or a fraction of E in (0, 1]")


def resolve_parameters(policy: str, given: dict[str, Any], num_experts: int, top_k: int,
                       site: str = "?") -> dict[str, int | float]:
    """The policy's parameters for a site of E experts and top-k: given values, else defaults
    (from k/E); expert_budget as a number of experts; keep_top checked against k."""
    params: dict[str, int | float] = {}
    default_alpha, default_beta = default_alpha_beta(num_experts, top_k)
    if policy == "affinity_binning":
        params["alpha"] = float(given.get("alpha", default_alpha))
        params["beta"] = int(given.get("beta", default_beta))
        params["confidence_gap"] = float(given.get("confidence_gap", 1.0 / params["alpha"]))
    elif policy == "gate_mass_budget":
        budget = given.get("expert_budget", DEFAULT_EXPERT_BUDGET)
        if isinstance(budget, float):
            budget = max(1, math.ceil(round(budget * num_experts, 9)))
        params["expert_budget"] = int(budget)
        params["confidence_gap"] = float(given.get("confidence_gap", 1.0 / default_alpha))
    elif policy == "opportunistic":
        keep_top = int(given.get("keep_top", max(1, top_k // 2)))
        if keep_top > top_k:
            raise LynxOptionsError(f"lynx: option 'keep_top' got {keep_top} at routing site {site!r}; expected an "
                                   f"integer in [1, k={top_k}] (k: that site's experts per token)")
        params["keep_top"] = keep_top
    return params


def default_alpha_beta(num_experts: int, top_k: int) -> tuple[float, int]:
    """Bin parameters from the layer's sparsity k/E, anchored on the values Lynx ran.

    Coarse layers (k/E >= 0.2: Mixtral 2/8) get wide bins (alpha 0.7, one bin below bin 0):
    with few experts every choice carries real affinity, so only near-ties should move.
    Fine-grained layers (k/E < 0.2: Qwen3-30B 8/128, OLMoE 8/64, DeepSeek 8/256) get narrow
    bins (alpha 3, two bins): many experts are near-interchangeable and the batch can be served
    by far fewer. These are the paper's Mixtral and Qwen3 settings; no task tuning.
    """
    if top_k / num_experts >= 0.2:
        return 0.7, 1
    return 3.0, 2


def _fail(key: str, value: Any, expected: str) -> None:
    raise LynxOptionsError(f"lynx: option {key!r} got {value!r}; expected {expected}")


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(key, value, "one of " + ", ".join(repr(c) for c in choices))


def _check_number(key: str, value: Any, *, positive: bool, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(key, value, "a finite number" + (" or None" if allow_none else ""))
    if positive and value <= 0:
        _fail(key, value, "a number > 0")
    if not positive and value < 0:
        _fail(key, value, "a number >= 0")


def _check_int(key: str, value: Any, *, minimum: int, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(key, value, f"an integer >= {minimum}" + (" or None" if allow_none else ""))
