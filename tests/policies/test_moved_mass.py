"""Moved mass: the experts of least routing weight are dropped while the weight that moves stays
within max_moved of the batch's; the default policy."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lynx_compile import LynxConfig, LynxOptionsError, policies


def logits_of(rows) -> torch.Tensor:
    return torch.log(torch.tensor(rows, dtype=torch.float32))


def top_k_weights(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, k) plain top-k indices and their weights renormalized over the top-k, float64."""
    top = torch.topk(logits.double(), k, dim=-1)
    return top.indices, torch.softmax(top.values, dim=-1)


def test_the_lightest_expert_goes_only_when_its_weight_fits_the_budget():
    # E = 4, k = 2, three tokens. Expert 2 is only token 2's second choice, 0.34 / (0.60 + 0.34)
    # of its weight: 12% of the batch's, the least of any routed expert.
    probs = [[0.50, 0.40, 0.05, 0.05], [0.45, 0.05, 0.05, 0.45], [0.60, 0.02, 0.34, 0.04]]
    logits = logits_of(probs)
    scores = torch.softmax(logits, -1)
    plain = torch.topk(scores, 2).indices
    load = {e: 0.0 for e in range(4)}
    indices, weights = top_k_weights(logits, 2)
    for row, w in zip(indices.tolist(), weights.tolist()):
        for e, x in zip(row, w):
            load[e] += x / 3
    lightest = min((e for e in load if load[e] > 0), key=load.get)
    assert lightest == 2
    for max_moved, dropped in [(0.0, False), (load[lightest] * 0.99, False), (load[lightest] * 1.01, True)]:
        _, chosen = policies.select("moved_mass", scores, logits, 2, max_moved=max_moved)
        assert (lightest not in chosen.flatten().tolist()) == dropped, max_moved
        if not dropped:
            assert torch.equal(chosen.sort(-1).values, plain.sort(-1).values)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(tokens=st.integers(1, 64), experts=st.sampled_from([4, 8, 16, 32]), k=st.integers(1, 4),
       spread=st.sampled_from([0.5, 1.5, 4.0]), max_moved=st.sampled_from([0.0, 0.02, 0.05, 0.2, 0.6]),
       seed=st.integers(0, 2**31 - 1))
def test_the_weight_on_dropped_experts_stays_within_the_budget(tokens, experts, k, spread, max_moved, seed):
    k = min(k, experts)
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed)) * spread
    scores = torch.softmax(logits, -1)
    _, chosen = policies.select("moved_mass", scores, logits, k, max_moved=max_moved)
    indices, weights = top_k_weights(logits, k)
    kept = torch.zeros(experts, dtype=torch.bool)
    kept[chosen.flatten()] = True
    moved = weights[~kept[indices]].sum()  # the plain top-k's weight on experts no token keeps
    assert moved <= max_moved * tokens + 1e-6
    assert len(torch.unique(chosen)) <= len(torch.unique(indices))


def test_the_option_is_validated_and_defaulted():
    assert LynxConfig().policy == "moved_mass"
    assert LynxConfig().site_setting("g", 8, 2).params_dict() == {"max_moved": 0.06}
    for bad in (-0.1, 1.0, "some", True):
        with pytest.raises(LynxOptionsError, match="max_moved"):
            LynxConfig(policy="moved_mass", max_moved=bad)
    with pytest.raises(LynxOptionsError, match="max_moved"):
        LynxConfig(policy="protected_mass", max_moved=0.1)  # another policy's parameter
