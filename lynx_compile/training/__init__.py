"""How the shipped checkpoints were trained (`python -m lynx_compile.training.train_checkpoint`)."""
