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


@settings(max_examples=150, deadline=None, derandomize=True)
@given(tokens=st.integers(1, 64), experts=st.sampled_from([4, 8, 16, 32]), k=st.integers(1, 4),
       spread=st.sampled_from([0.5, 1.5, 4.0]), max_moved=st.sampled_from([0.0, 0.02, 0.05, 0.2, 0.6]),
       seed=st.integers(0, 2**31 - 1))
@pytest.mark.parametrize("ranks", [1, 4])
def test_the_weight_on_dropped_experts_stays_within_the_budget(tokens, experts, k, spread, max_moved, seed, ranks):
    k = min(k, experts)
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed)) * spread
    scores = torch.softmax(logits, -1)
    _, chosen = policies.select("moved_mass", scores, logits, k, max_moved=max_moved, ranks=ranks)
    indices, weights = top_k_weights(logits, k)
    kept = torch.zeros(experts, dtype=torch.bool)
    kept[chosen.flatten()] = True
    moved = weights[~kept[indices]].sum()  # the plain top-k's weight on experts no token keeps
    assert moved <= max_moved * tokens + 1e-6
    assert len(torch.unique(chosen)) <= len(torch.unique(indices))


def test_the_option_is_validated_and_defaulted():
    assert LynxConfig().policy == "moved_mass"
    assert LynxConfig().site_setting("g", 8, 2).params_dict() == {"max_moved": 0.06, "ranks": 1}
    for bad in (-0.1, 1.0, "some", True):
        with pytest.raises(LynxOptionsError, match="max_moved"):
            LynxConfig(policy="moved_mass", max_moved=bad)
    with pytest.raises(LynxOptionsError, match="max_moved"):
        LynxConfig(policy="protected_mass", max_moved=0.1)  # another policy's parameter


def per_shard(experts: set[int], num_experts: int, ranks: int) -> list[int]:
    return [sum(e // (num_experts // ranks) == r for e in experts) for r in range(ranks)]


def test_with_ranks_the_budget_goes_to_the_fullest_rank():
    # E = 8 over 2 ranks (experts 0-3 and 4-7), k = 2, 5 tokens, a budget of 0.35 token weights.
    # Expert 4 (rank 1) carries 0.25 of one token, expert 3 (rank 0) 0.3: by harm alone the budget
    # drops expert 4 (rank 1 idles, rank 0 still reads 4 experts); with ranks=2 it drops expert 3,
    # rank 0's least harmful, instead (rank 0 reads 3: the slowest rank's work falls).
    rows = [[0.5, 0.5, 0, 0, 0, 0, 0, 0], [0.5, 0, 0.5, 0, 0, 0, 0, 0], [0, 0.5, 0.5, 0, 0, 0, 0, 0],
            [0, 0.7, 0, 0.3, 0, 0, 0, 0], [0.75, 0, 0, 0, 0.25, 0, 0, 0]]
    logits = logits_of([[p + 1e-6 for p in row] for row in rows])
    scores = torch.softmax(logits, -1)
    plain = set(torch.topk(scores, 2).indices.flatten().tolist())
    assert per_shard(plain, 8, 2) == [4, 1]
    _, by_harm = policies.select("moved_mass", scores, logits, 2, max_moved=0.07)
    _, balanced = policies.select("moved_mass", scores, logits, 2, max_moved=0.07, ranks=2)
    assert per_shard(set(by_harm.flatten().tolist()), 8, 2) == [4, 0]
    assert per_shard(set(balanced.flatten().tolist()), 8, 2) == [3, 1]


@settings(max_examples=150, deadline=None, derandomize=True)
@given(tokens=st.integers(1, 64), experts_ranks=st.sampled_from([(8, 2), (8, 8), (16, 4), (32, 8), (32, 4)]),
       k=st.integers(1, 4), spread=st.sampled_from([0.5, 1.5, 4.0]), max_moved=st.sampled_from([0.02, 0.05, 0.2, 0.6]),
       seed=st.integers(0, 2**31 - 1))
def test_with_ranks_only_the_fullest_ranks_lose_experts(tokens, experts_ranks, k, spread, max_moved, seed):
    """A rank loses one of the experts its tokens routed to only while it reads at least as many
    as any other rank, less one: the drop order takes from the fullest rank first."""
    experts, ranks = experts_ranks
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed)) * spread
    scores = torch.softmax(logits, -1)
    routed = set(torch.topk(scores, k).indices.flatten().tolist())
    _, chosen = policies.select("moved_mass", scores, logits, k, max_moved=max_moved, ranks=ranks)
    kept = per_shard(routed & set(chosen.flatten().tolist()), experts, ranks)
    lost = [a - b for a, b in zip(per_shard(routed, experts, ranks), kept)]
    for rank in range(ranks):
        if lost[rank]:
            assert kept[rank] >= max(kept) - 1, (kept, lost)


def test_ranks_must_divide_every_sites_experts():
    assert LynxConfig(ranks=4).site_setting("g", 8, 2).params_dict() == {"max_moved": 0.06, "ranks": 4}
    with pytest.raises(LynxOptionsError, match="ranks=3 does not divide the 8 experts of routing site 'g'"):
        LynxConfig(ranks=3).site_setting("g", 8, 2)
    for bad in (0, 1.5, True):
        with pytest.raises(LynxOptionsError, match="ranks"):
            LynxConfig(ranks=bad)
    with pytest.raises(LynxOptionsError, match="ranks"):
        LynxConfig(policy="affinity_binning", ranks=2)  # moved_mass's parameter
