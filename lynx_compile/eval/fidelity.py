"""How far a variant's next-token distributions are from a reference's: mean and p99 KL per
token, and top-1 agreement (the figures llama.cpp reports for quantized models, and calibration's
budget and the eval's tables are written in).
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Fidelity:
    """How far a pass's next-token distributions are from the reference's, per decode token."""

    kl: float  # mean KL(reference || variant), nats per token
    kl_p99: float  # its 99th percentile
    top1_agreement: float  # fraction of tokens whose argmax is the reference's
    tokens: int

    def as_dict(self) -> dict[str, float]:
        return {"kl": round(self.kl, 6), "kl_p99": round(self.kl_p99, 6),
                "top1_agreement": round(self.top1_agreement, 6), "tokens": self.tokens}


def fidelity(reference: torch.Tensor, variant: torch.Tensor) -> Fidelity:
    """reference, variant: (N, V) log-probabilities of the same N tokens."""
    if reference.shape != variant.shape:
        raise ValueError(f"reference {tuple(reference.shape)} and variant {tuple(variant.shape)} differ in shape")
    kl = per_token_kl(reference, variant)  # (N,)
    agree = (reference.argmax(-1) == variant.argmax(-1)).double().mean()
    return Fidelity(float(kl.mean()), float(torch.quantile(kl, 0.99)) if kl.numel() else 0.0,
                    float(agree) if kl.numel() else 1.0, int(kl.numel()))


def per_token_kl(reference: torch.Tensor, variant: torch.Tensor) -> torch.Tensor:
    """(N,) float64 KL(reference || variant) in nats; 0 where the two are identical."""
    reference, variant = reference.double(), variant.double()
    kl = (reference.exp() * (reference - variant)).nan_to_num(0.0).sum(-1)  # -inf - -inf terms weigh 0
    return kl.clamp(min=0.0)
