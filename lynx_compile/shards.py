"""The expert-parallel layout lynx counts against: R ranks, rank r owning the contiguous experts
[r E/R, (r + 1) E/R) (transformers' `ep_size` / AllReduceEP and vLLM's layout).

One home for that fact: `record()`'s per-rank view and moved_mass's rank balancing read it here;
the C++ selection kernel restates it (`e / (E / ranks)`), held to moved_mass's torch body bit for
bit by the property tests.
"""

from __future__ import annotations

import torch


def experts_per_shard(num_experts: int, ranks: int) -> int:
    """E / R. Raises ValueError when R < 1 or E is not a multiple of R (no even layout)."""
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1 or num_experts % ranks:
        raise ValueError(f"{num_experts} experts do not split evenly over ranks={ranks}")
    return num_experts // ranks


def shard_of(num_experts: int, ranks: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(E,) int64: the rank that owns each expert. Raises ValueError as `experts_per_shard`."""
    return torch.arange(num_experts, device=device) // experts_per_shard(num_experts, ranks)
