"""Teacher-forced decode passes (their fidelity against a reference pass: `eval/fidelity.py`).

A calibration batch is a (B, L) tensor of token windows: the first `prefix` tokens go in by
prefill (which lynx never remaps), then tokens prefix .. L-1 are fed one per decode step with
the KV cache, B windows stepping together (a decode batch of B). Every decode step's next-token
distribution is kept, so two passes over the same batches (the unmodified model and a setting)
are compared token by token: the inputs are the windows' own tokens in both, so the only
difference is the selection.
"""

from __future__ import annotations

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
