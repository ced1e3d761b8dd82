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

POLICIES = ("affinity_binning", "none")
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
        policy: "affinity_binning" remaps decode batches onto fewer experts (Lynx, v3);
            "none" leaves routing untouched (outputs bit-identical to default Inductor).
        alpha: bin sharpness; a bin spans 1/alpha logit units of router affinity gap.
            None: chosen from the layer's sparsity k/E (see `default_alpha_beta`).
        beta: number of bins below bin 0; weaker preferences all land in bin -beta.
            None: chosen from k/E.
        confidence_gap: a token is confident when its second-best expert trails its best by more
            than this many logit units; confident tokens always keep their top-1.
            None: 1/alpha, i.e. the top-1 is alone in bin 0.
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

    def __post_init__(self) -> None:
        _check_choice("policy", self.policy, POLICIES)
        _check_choice("phase", self.phase, PHASES)
        _check_choice("experts", self.experts, EXPERTS_MODES)
        _check_number("alpha", self.alpha, positive=True, allow_none=True)
        _check_number("confidence_gap", self.confidence_gap, positive=False, allow_none=True)
        _check_int("beta", self.beta, minimum=1, allow_none=True)
        _check_int("max_decode_tokens", self.max_decode_tokens, minimum=1, allow_none=True)
        _check_int("max_experts", self.max_experts, minimum=2, allow_none=False)
        _check_int("pad_token_id", self.pad_token_id, minimum=0, allow_none=True)

    @property
    def selects(self) -> bool:
        """True when routing sites are rewritten into a selection op."""
        return self.policy != "none"

    @property
    def fuses_experts(self) -> bool:
        return self.experts in ("fused", "inductor") or (self.experts == "auto" and self.selects)

    def resolved_alpha_beta(self, num_experts: int, top_k: int) -> tuple[float, int]:
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
