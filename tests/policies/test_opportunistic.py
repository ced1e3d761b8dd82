"""opportunistic (OEA, policies/opportunistic.py) on hand-built router outputs."""

import pytest
import torch

from lynx_compile import policies


def batch_logits(num_tokens=16, num_experts=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=generator)
    logits[:, :4] += 1.5  # a few popular experts, so the loaded set overlaps tokens' choices
    return logits


def own_top(scores, count):
    return [set(row) for row in torch.topk(scores, count).indices.tolist()]


@pytest.mark.parametrize("keep_top", [1, 2, 3])
def test_each_token_keeps_its_top_and_fills_from_the_loaded_set(keep_top):
    logits = batch_logits()
    scores = torch.softmax(logits, dim=-1)
    _, indices = policies.select("opportunistic", scores, logits, 4, keep_top=keep_top)
    kept = own_top(scores, keep_top)
    loaded = set().union(*kept)
    for row, own in zip(indices.tolist(), kept):
        assert len(set(row)) == 4
        assert own <= set(row)  # its own top keep_top, always
        assert set(row) - own <= loaded  # the rest from experts the batch loads anyway
    assert set(indices.flatten().tolist()) == loaded  # so the batch loads nothing else
    # and each token's fill is its best experts of the loaded set
    for row, own, token_scores in zip(indices.tolist(), kept, scores):
        fill = sorted(loaded - own, key=lambda e: -float(token_scores[e]))[:4 - keep_top]
        assert set(row) == own | set(fill)


def test_a_small_loaded_set_falls_back_to_the_tokens_own_next_best():
    """Every token's top-1 is expert 0: the loaded set is {0}, too small for k=3."""
    logits = batch_logits(num_tokens=6)
    logits[:, 0] += 10.0
    scores = torch.softmax(logits, dim=-1)
    _, indices = policies.select("opportunistic", scores, logits, 3, keep_top=1)
    assert torch.equal(indices, torch.topk(scores, 3).indices)  # nothing to share: plain top-k


def test_keep_top_equal_to_k_is_plain_top_k():
    logits = batch_logits()
    scores = torch.softmax(logits, dim=-1)
    values, indices = policies.select("opportunistic", scores, logits, 4, keep_top=4)
    plain = torch.topk(scores, 4)
    assert torch.equal(indices, plain.indices) and torch.equal(values, plain.values)


def test_dead_rows_do_not_add_to_the_loaded_set():
    logits = batch_logits(num_tokens=8)
    logits[:2, 15] += 10.0  # dead rows' top-1 is expert 15, which no live row keeps
    scores = torch.softmax(logits, dim=-1)
    live = torch.arange(8) >= 2
    _, indices = policies.select("opportunistic", scores, logits, 4, live=live, keep_top=1)
    live_kept = set().union(*own_top(scores[2:], 1))
    assert 15 not in live_kept
    for row, own in zip(indices[2:].tolist(), own_top(scores[2:], 1)):
        assert set(row) - own <= live_kept


def test_keep_top_outside_one_to_k_is_refused():
    logits = batch_logits()
    with pytest.raises(ValueError, match=r"keep_top must be an integer in \[1, k=4\], got 0"):
        policies.select("opportunistic", logits, logits, 4, keep_top=0)
