"""lynx's selection where a serving engine owns the routing: vllm.py (vLLM's fused MoE layers)."""
