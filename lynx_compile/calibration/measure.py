"""Teacher-forced decode passes and the fidelity of one pass against a reference pass.

A calibration batch is a (B, L) tensor of token windows: the first `prefix` tokens go in by
prefill (which lynx never remaps), then tokens prefix .. L-1 are fed one per decode step with
the KV cache, B windows stepping together (a decode batch of B). Every decode step's next-token
distribution is kept, so two passes over the same batches (the unmodified model and a setting)
are compared token by token: the inputs are the windows' own tokens in both, so the only
difference is the selection.
"""

from __future__ import annotations

import dataclasses

import torch
import transformers


@torch.no_grad()
def decode_log_probs(compiled_model, model_config, batches: list[torch.Tensor], prefix: int) -> torch.Tensor:
    """(N, V) float32 next-token log-probabilities of every decode step of every batch.

    compiled_model: the (compiled) causal LM, called as model(input_ids=, past_key_values=,
    use_cache=True); batches: (B, L) int64 windows, L > prefix; N = sum over batches of
    B * (L - prefix)."""
    out = []
    for windows in batches:
        cache = transformers.DynamicCache(config=model_config)
        compiled_model(input_ids=windows[:, :prefix], past_key_values=cache, use_cache=True)
        for position in range(prefix, windows.shape[1]):
            logits = compiled_model(input_ids=windows[:, position:position + 1], past_key_values=cache,
                                    use_cache=True).logits  # (B, 1, V)
            out.append(torch.log_softmax(logits[:, -1].float(), dim=-1))  # (B, V)
    return torch.cat(out)


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
