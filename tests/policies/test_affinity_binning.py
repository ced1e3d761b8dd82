"""AffinityBinning (policies/affinity_binning.py) on hand-built router outputs (no compilation)."""

import torch

from lynx_compile import policies
from moe_models import skewed_logits


def distinct(indices: torch.Tensor) -> int:
    return int(torch.unique(indices).numel())


def test_skewed_batch_uses_fewer_experts_and_keeps_k_distinct():
    logits = skewed_logits()
    scores = torch.softmax(logits, dim=-1)
    plain = torch.topk(scores, 2).indices
    values, indices = policies.select("affinity_binning", scores, logits, k=2, alpha=0.7, beta=1, confidence_gap=1 / 0.7)

    assert distinct(indices) < distinct(plain)
    assert set(torch.unique(indices).tolist()) <= {0, 1, 2}
    assert indices.shape == plain.shape and indices.dtype == torch.int64
    assert all(len(set(row.tolist())) == 2 for row in indices)
    torch.testing.assert_close(values, scores.gather(1, indices), rtol=0, atol=0)


def test_confident_tokens_keep_their_top1():
    logits = skewed_logits(num_tokens=16, num_experts=8, favoured=(0, 1))
    logits[3] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0])  # sure of expert 7, alone
    scores = torch.softmax(logits, dim=-1)
    _, indices = policies.select("affinity_binning", scores, logits, k=2, alpha=0.7, beta=1, confidence_gap=1 / 0.7)
    assert indices[3, 0].item() == 7
    # every confident token (second choice > gap behind) keeps its own top-1 in slot 0
    top2 = torch.topk(logits, 2).values
    confident = (top2[:, 0] - top2[:, 1]) > 1 / 0.7
    assert confident.any()
    assert torch.equal(indices[confident, 0], scores.argmax(-1)[confident])


def test_every_token_keeps_an_expert_from_its_bin0():
    logits = skewed_logits(num_tokens=32, num_experts=16, favoured=(3, 5, 9, 12), strength=1.0, seed=1)
    scores = torch.softmax(logits, dim=-1)
    alpha = 3.0
    _, indices = policies.select("affinity_binning", scores, logits, k=4, alpha=alpha, beta=2, confidence_gap=1 / alpha)
    gap = logits - logits.amax(-1, keepdim=True)
    chosen_best_gap = gap.gather(1, indices).amax(-1)
    assert (chosen_best_gap > -1 / alpha).all()


def test_single_token_batch_is_plain_topk():
    logits = torch.randn(1, 16)
    scores = torch.softmax(logits, dim=-1)
    values, indices = policies.select("affinity_binning", scores, logits, k=4, alpha=3.0, beta=2, confidence_gap=1 / 3)
    plain_values, plain_indices = torch.topk(scores, 4)
    assert torch.equal(indices, plain_indices)
    assert torch.equal(values, plain_values)


def test_masked_experts_are_never_chosen_and_tokens_fall_back_to_eligible_ones():
    # DeepSeek-style group limit: each token may only use its own half of the experts.
    logits = torch.randn(8, 16)
    scores = torch.sigmoid(logits)
    allowed = torch.zeros(8, 16, dtype=torch.bool)
    allowed[:4, :8] = True
    allowed[4:, 8:] = True
    masked_scores = scores.masked_fill(~allowed, float("-inf"))
    _, indices = policies.select("affinity_binning", masked_scores, logits, k=4, alpha=3.0, beta=2, confidence_gap=1 / 3)
    assert allowed.gather(1, indices).all()
    assert all(len(set(row.tolist())) == 4 for row in indices)
