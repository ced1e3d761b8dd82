"""Training of the small MoE checkpoints shipped in ``lynx_compile/checkpoints``."""
