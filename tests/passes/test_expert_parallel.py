"""The expert-parallel id mapping (passes/expert_parallel.py) on a hand-written rank of an
AllReduceEP-style MoE: proven layouts are routing, anything else is left as written."""

import pytest
import torch

import lynx_compile
from lynx_compile.record import experts_per_rank


class OneRank(torch.nn.Module):
    """Rank `rank` of an E-expert MoE whose ranks own `local` experts each (global -> local ids)."""

    def __init__(self, experts=8, local=4, rank=1, hidden=16):
        super().__init__()
        self.gate = torch.nn.Linear(hidden, experts, bias=False)
        self.w = torch.nn.Parameter(torch.randn(local, hidden, hidden) / 4)
        self.local, self.rank = local, rank

    def forward(self, x):  # x: (B, 1, H), a decode step
        flat = x.view(-1, x.shape[-1])
        weights, ids = torch.topk(self.gate(flat).softmax(-1), 2)
        off_rank = (ids // self.local) != self.rank
        local = torch.where(off_rank, self.local, ids % self.local)
        weights = weights.masked_fill(off_rank, 0.0)
        rows = self.w[local.clamp(max=self.local - 1)]  # (T, k, H, H) this rank's experts
        out = torch.einsum("th,tkhg,tk->tg", flat, rows, weights)
        return out.view_as(x)


def site_of(module):
    torch._dynamo.reset()
    report = lynx_compile.explain(module, torch.randn(8, 1, 16))
    (site,) = report.sites
    return site


def test_a_proven_rank_mapping_is_routing_and_names_the_layout():
    site = site_of(OneRank())
    assert site.is_routing and site.rewritten, site.reason
    assert site.dispatch.startswith("expert parallel: 8 experts, 4 per rank (rank 1 of 2)"), site.dispatch
    assert "gathers stacked expert weights" in site.dispatch


@pytest.mark.parametrize("local, rank", [(3, 0), (4, 5)])
def test_an_uneven_layout_or_a_rank_outside_it_is_left_as_written(local, rank):
    site = site_of(OneRank(local=local, rank=rank))
    assert not site.is_routing and not site.rewritten
    assert "expert-parallel id mapping lynx cannot prove" in site.reason, site.reason


def test_experts_per_rank_counts_contiguous_ranges_and_rejects_an_uneven_split():
    assert experts_per_rank((0, 1, 5, 7), 8, 2) == [2, 2]
    assert experts_per_rank((0, 1, 2), 8, 4) == [2, 1, 0, 0]
    with pytest.raises(ValueError, match="8 experts do not split evenly over ranks=3"):
        experts_per_rank((0,), 8, 3)


def test_moved_mass_balances_over_the_proven_ranks_unless_told_otherwise():
    site = site_of(OneRank())
    assert site.policy == "moved_mass(max_moved=0.06, ranks=2) [config, ranks from the expert-parallel layout]"
    torch._dynamo.reset()
    report = lynx_compile.explain(OneRank(), torch.randn(8, 1, 16), config=lynx_compile.LynxConfig(ranks=1))
    assert report.sites[0].policy == "moved_mass(max_moved=0.06, ranks=1) [config]"
