"""Evaluation data for the shipped checkpoints (offline corpora: stdlib code, arithmetic)."""
