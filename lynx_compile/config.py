"""User-facing configuration of the lynx backend.

`LynxConfig` is what `torch.compile(model, backend="lynx", options=...)` accepts, either whole
(`options={"config": LynxConfig(...)}`) or as its fields (`options={"policy": "none"}`).
Every field is validated on construction; a bad key or value raises `LynxOptionsError`, a
`ValueError` that names the key and lists what is valid.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .errors import LynxOptionsError, check_choice, check_int
from .plan import load_plan
from .policies import ALL_PARAMETERS, DEFAULT_POLICY, PARAMETERS, POLICIES, SiteSetting, check_parameters, resolve_parameters

PHASES = ("decode", "all")
EXPERTS_MODES = ("auto", "fused", "inductor", "keep")


@dataclasses.dataclass(frozen=True)
class LynxConfig:
    """What the lynx backend does to each MoE routing site it finds.

    Attributes:
        policy: the selection policy of every routing site (`lynx_compile/policies/`):
            "moved_mass" (the default: a budget on the routing weight that moves),
            "affinity_binning" (Lynx v3), "gate_mass_budget" (XShare), "opportunistic" (OEA),
            "protected_mass", or "none", which leaves routing untouched (outputs bit-identical
            to default Inductor).
            A policy's parameters may only be given with that policy (an error otherwise).
        alpha: (affinity_binning) bin sharpness; a bin spans 1/alpha logit units of router
            affinity gap. None: chosen from the layer's sparsity k/E
            (`policies.affinity_binning.default_alpha_beta`).
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
        keep_mass: (protected_mass) the share of its top-k's router probability each token keeps
            on its own experts, in (0, 1]; its lighter slots go to experts the batch loads
            anyway. None: 0.8.
        max_moved: (moved_mass) the fraction of a decode batch's routing weight, per layer,
            that may move to other experts, in [0, 1); the experts whose weight matters least
            (summed squared weight) are dropped first. None: 0.06.
        ranks: (moved_mass) expert-parallel ranks, each owning E/ranks contiguous experts: the
            drop order takes from the rank that reads the most experts first, so the budget
            lowers the slowest rank's work (docs/policies.md, "Expert parallelism"). An int
            >= 1 that divides every site's E. None: the ranks of the site's proven
            expert-parallel layout where it has one (transformers' `ep_size`), else 1 (the drop
            order ignores placement).
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

    policy: str = DEFAULT_POLICY
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
    keep_mass: float | None = None
    max_moved: float | None = None
    ranks: int | None = None
    plan: Any = None  # str | os.PathLike | dict | plan.Plan | None; held as a plan.Plan

    def __post_init__(self) -> None:
        check_choice("policy", self.policy, POLICIES)
        check_choice("phase", self.phase, PHASES)
        check_choice("experts", self.experts, EXPERTS_MODES)
        check_parameters(self.policy, {name: getattr(self, name) for name in ALL_PARAMETERS
                                       if getattr(self, name) is not None})
        check_int("max_decode_tokens", self.max_decode_tokens, minimum=1, allow_none=True)
        check_int("max_experts", self.max_experts, minimum=2)
        check_int("pad_token_id", self.pad_token_id, minimum=0, allow_none=True)
        if self.plan is not None:
            object.__setattr__(self, "plan", load_plan(self.plan))

    def site_setting(self, site: str, num_experts: int, top_k: int, parallel_ranks: int | None = None) -> SiteSetting:
        """The policy and resolved parameters of one routing site: its plan entry if the plan
        names it, else the config's. Raises LynxOptionsError for parameters the site's k refuses.

        parallel_ranks: the ranks a proven expert-parallel id mapping shards the site's experts
        over (`passes/expert_parallel.py`); a policy that balances over ranks (`ranks`) takes it
        where neither the plan entry nor the config gives `ranks`."""
        entry = self.plan.entry(site) if self.plan is not None else None
        if entry is not None:
            policy, given, source = entry.policy, entry.params_dict(), f"plan {self.plan.source}"
        else:
            policy = self.policy
            given = {name: getattr(self, name) for name in PARAMETERS[policy] if getattr(self, name) is not None}
            source = "config" if self.plan is None else "config (site not in plan)"
        if parallel_ranks is not None and "ranks" in PARAMETERS[policy] and "ranks" not in given:
            given = {**given, "ranks": parallel_ranks}
            source += ", ranks from the expert-parallel layout"
        params = resolve_parameters(policy, given, num_experts, top_k, site)
        return SiteSetting(policy, tuple(params.items()), source)

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
