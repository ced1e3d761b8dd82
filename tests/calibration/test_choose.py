"""choose(): one setting per site, most experts saved, summed measured cost within the budget."""

import itertools

import pytest

from lynx_compile.calibration.choose import Candidate, check_budget, choose, normalized_cost


def candidate(name, kl, agreement, saved):
    return Candidate(name, (), kl, agreement, 8.0, 8.0 - saved)


SITES = {
    "layer0": [candidate("a", 0.004, 0.99, 3.0), candidate("b", 0.001, 0.995, 1.0), candidate("c", 0.02, 0.9, 5.0)],
    "layer1": [candidate("a", 0.006, 0.98, 2.5), candidate("b", 0.002, 0.99, 2.0)],
    "layer2": [candidate("a", 0.009, 0.97, 4.0), candidate("b", 0.003, 0.999, 0.5)],
}


def brute_force(sites, budget):
    none = Candidate("none", (), 0.0, 1.0, 0.0, 0.0)
    best = None
    for combo in itertools.product(*[[none] + options for options in sites.values()]):
        if sum(normalized_cost(c.kl, c.top1_agreement, budget) for c in combo) <= 1 + 1e-9:
            saved = sum(c.saved for c in combo)
            if best is None or saved > best:
                best = saved
    return best


@pytest.mark.parametrize("budget", [{"kl": 0.01}, {"kl": 0.005}, {"top1_agreement": 0.95},
                                    {"kl": 0.012, "top1_agreement": 0.97}, {"kl": 1.0}])
def test_the_choice_is_the_best_within_the_summed_budget(budget):
    chosen = choose(SITES, budget)
    assert set(chosen) == set(SITES)
    assert sum(normalized_cost(c.kl, c.top1_agreement, budget) for c in chosen.values()) <= 1 + 1e-9
    assert sum(c.saved for c in chosen.values()) == pytest.approx(brute_force(SITES, budget))


def test_a_budget_nothing_fits_leaves_every_site_alone():
    chosen = choose(SITES, {"kl": 1e-6})
    assert {c.policy for c in chosen.values()} == {"none"}


def test_a_smaller_scale_tightens_the_budget():
    assert sum(c.kl for c in choose(SITES, {"kl": 0.01}, scale=0.5).values()) <= 0.005


@pytest.mark.parametrize("budget", [{}, {"loss": 0.1}, {"kl": 0}, {"kl": "small"}, {"top1_agreement": 1.0},
                                    {"top1_agreement": 95}, None])
def test_a_bad_budget_is_refused(budget):
    with pytest.raises(ValueError, match="budget"):
        check_budget(budget)
