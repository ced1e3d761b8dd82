"""The small Mixtral-style model the demo and the benchmark decode with (random weights).

8 experts, top-2, 4 layers, hidden 512: small enough to compile in seconds on a laptop CPU,
shaped like Mixtral so every expert is a real GEMM. Routers get a trained-like spread (logit std
~1.5) instead of the near-zero init, under which all experts tie.
"""

import torch
import transformers

ROUTER_LOGIT_STD = 1.5


def small_mixtral(seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> transformers.MixtralForCausalLM:
    torch.manual_seed(seed)
    config = transformers.MixtralConfig(
        vocab_size=2048, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=512)
    model = transformers.MixtralForCausalLM(config)
    for name, param in model.named_parameters():
        if name.endswith("mlp.gate.weight"):
            torch.nn.init.normal_(param, std=ROUTER_LOGIT_STD / config.hidden_size ** 0.5)
    return model.to(dtype).eval()
