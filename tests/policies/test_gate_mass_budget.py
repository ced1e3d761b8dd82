"""gate_mass_budget (XShare, policies/gate_mass_budget.py) on hand-built router outputs."""

import itertools

import pytest
import torch

import lynx_compile
from lynx_compile import LynxConfig, policies
from lynx_compile.policies.gate_mass_budget import MASS_GRID, batch_gate_mass
from moe_models import PassOnlyBackend, RoutingProbe, skewed_mixtral_block

NO_CONFIDENCE = 100.0  # a confidence gap no token reaches: the budget alone decides


def batch_logits(num_tokens=16, num_experts=8, seed=0, spread=1.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_tokens, num_experts, generator=generator) * spread


def mass_of(experts, probabilities):
    return float(probabilities[:, list(experts)].sum())


@pytest.mark.parametrize("budget", [2, 3, 5])
def test_the_budget_holds_and_its_experts_carry_the_most_gate_mass(budget):
    logits = batch_logits()
    scores = torch.softmax(logits, dim=-1)
    _, indices = policies.select("gate_mass_budget", scores, logits, 2, expert_budget=budget,
                                 confidence_gap=NO_CONFIDENCE)
    used = set(torch.unique(indices).tolist())
    assert len(used) <= budget
    assert all(len(set(row.tolist())) == 2 for row in indices)
    # the modular objective: no other set of `budget` experts holds more of the batch's router mass
    best = max(mass_of(subset, scores) for subset in itertools.combinations(range(8), budget))
    chosen = [int(e) for e in torch.topk(scores.sum(0), budget).indices]  # the experts kept
    assert mass_of(chosen, scores) == pytest.approx(best)
    assert used <= set(chosen)
    # and each token takes its best 2 of them
    for row, token_scores in zip(indices.tolist(), scores):
        ranked = sorted(chosen, key=lambda e: -float(token_scores[e]))
        assert set(row) == set(ranked[:2])


def test_confident_top1s_beyond_the_budget_grow_the_set():
    """Four tokens, each sure of a different expert: a budget of 2 cannot hold their top-1s."""
    logits = torch.zeros(4, 8)
    for token, expert in enumerate((1, 3, 5, 7)):
        logits[token, expert] = 5.0
    scores = torch.softmax(logits, dim=-1)
    _, indices = policies.select("gate_mass_budget", scores, logits, 2, expert_budget=2, confidence_gap=1.0)
    assert indices[:, 0].tolist() == [1, 3, 5, 7]  # every confident top-1 kept
    assert torch.unique(indices).numel() > 2  # over budget: the policy grew the set, as it must
    # below the confidence gap the same batch keeps to the budget
    _, relaxed = policies.select("gate_mass_budget", scores, logits, 2, expert_budget=2, confidence_gap=10.0)
    assert torch.unique(relaxed).numel() == 2


def test_a_token_short_of_k_eligible_experts_in_the_budget_adds_its_own():
    """Group-limited routing: token 0 may use experts 4-7 only; the batch's mass sits on 0-3."""
    logits = batch_logits(num_tokens=8, spread=0.1)
    logits[:, :2] += 3.0
    scores = torch.softmax(logits, dim=-1)
    scores[0, :4] = float("-inf")
    _, indices = policies.select("gate_mass_budget", scores, logits, 2, expert_budget=2,
                                 confidence_gap=NO_CONFIDENCE)
    assert set(indices[1:].flatten().tolist()) == {0, 1}
    assert set(indices[0].tolist()) <= {4, 5, 6, 7} and len(set(indices[0].tolist())) == 2
    expected = torch.topk(scores[0, 4:], 2).indices + 4  # its own best two eligible experts
    assert set(indices[0].tolist()) == set(expected.tolist())


def test_dead_rows_do_not_count_toward_the_mass():
    logits = batch_logits(num_tokens=8, spread=0.1)
    logits[:4, 6] += 4.0  # the dead rows all want expert 6
    logits[4:, :2] += 1.0
    scores = torch.softmax(logits, dim=-1)
    live = torch.arange(8) >= 4
    _, indices = policies.select("gate_mass_budget", scores, logits, 2, live=live, expert_budget=2,
                                 confidence_gap=NO_CONFIDENCE)
    assert set(indices[4:].flatten().tolist()) == {0, 1}


def test_the_mass_is_an_exact_integer_sum():
    logits = batch_logits(num_tokens=5)
    voting = torch.ones(5, 8, dtype=torch.bool)
    voting[2] = False  # a row that does not vote weighs nothing
    mass = batch_gate_mass(logits, voting)
    expected = torch.softmax(logits.double(), dim=-1)[voting.all(1)].sum(0)
    assert mass.dtype == torch.int64
    assert torch.equal(mass, torch.round(expected * MASS_GRID).to(torch.int64))
    # row order does not matter (an integer result of a float64 sum rounded to 2**-24)
    assert torch.equal(batch_gate_mass(logits.flip(0), voting.flip(0)), mass)


def test_record_reports_calls_over_budget():
    """A real MoE block compiled by lynx: record() says when the budget had to grow."""
    block, hidden = skewed_mixtral_block()  # 16 tokens, confident ones among them
    probe = RoutingProbe(block).eval()
    results = {}
    for budget, gap in ((1, 0.5), (4, 100.0)):
        torch._dynamo.reset()
        config = LynxConfig(policy="gate_mass_budget", expert_budget=budget, confidence_gap=gap, experts="keep")
        compiled = torch.compile(probe, backend=PassOnlyBackend(config, record=True))
        with torch.no_grad(), lynx_compile.record() as rec:
            _, indices, _ = compiled(hidden)
        [call] = rec.calls["gate"]
        results[budget] = (call, torch.unique(indices).numel())
    over, used = results[1]
    assert over.expert_budget == 1 and used > 1 and over.over_budget == used - 1
    within, used = results[4]
    assert within.expert_budget == 4 and used <= 4 and within.over_budget == 0
    assert "calls over budget" in rec.table()
