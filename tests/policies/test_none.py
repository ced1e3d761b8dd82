"""none (policies/none.py): every voter keeps its plain top-k; a site with policy none is not
rewritten at all (bit-identical to default Inductor: tests/test_backend.py)."""

import torch

from lynx_compile import policies


def test_every_token_keeps_its_plain_top_k():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 16, generator=generator)
    scores = torch.softmax(logits, dim=-1)
    live = torch.arange(32) % 3 != 0
    values, indices = policies.select("none", scores, logits, 4, live=live)
    plain = torch.topk(scores, 4)
    assert torch.equal(indices, plain.indices) and torch.equal(values, plain.values)
