"""The model presets of the shipped checkpoints: one backbone, two MoE layouts (and a tiny one
for tests), built from transformers' own config classes."""

from __future__ import annotations

from dataclasses import dataclass, field

import transformers

from lynx_compile.training.data import CONTEXT


TRAIN_EXPERTS_IMPLEMENTATION = "grouped_mm"

# Shared backbone: 4 layers, hidden 256, 8 query heads of 32, 4 KV heads, tied embeddings.
_BACKBONE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                 head_dim=32, max_position_embeddings=CONTEXT, tie_word_embeddings=True,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                 output_router_logits=True, router_aux_loss_coef=0.02)


@dataclass(frozen=True)
class Preset:
    description: str
    config_class: type
    moe_args: dict
    backbone: dict = field(default_factory=dict)  # overrides of _BACKBONE


PRESETS = {
    "coarse": Preset("Mixtral-style MoE: 8 experts (intermediate 384), top-2",
                     transformers.MixtralConfig,
                     dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=384)),
    "fine": Preset("Qwen3-MoE fine-grained MoE: 32 experts (intermediate 96), top-4, norm_topk_prob=True",
                   transformers.Qwen3MoeConfig,
                   dict(num_experts=32, num_experts_per_tok=4, moe_intermediate_size=96,
                        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])),
    # Seconds per step: for tests and smoke runs of the training pipeline, not for shipping.
    "tiny": Preset("tiny Mixtral-style MoE for tests: 2 layers, hidden 64, 4 experts (intermediate 64), top-2",
                   transformers.MixtralConfig,
                   dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64),
                   dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16)),
}


def build_config(preset: str, tokenizer) -> transformers.PreTrainedConfig:
    spec = PRESETS[preset]
    config = spec.config_class(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                               **{**_BACKBONE, **spec.backbone}, **spec.moe_args)
    # Measured on a 2-core CPU (fp32, training): grouped_mm ~1.1 s/step, eager ~2x slower,
    # batched_mm runs out of memory (it gathers one weight copy per token).
    config._experts_implementation = TRAIN_EXPERTS_IMPLEMENTATION
    return config
