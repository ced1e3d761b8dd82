"""Property tests of the selection op: the contract every policy keeps, on generated batches.

Batches are drawn by hypothesis as parameters (sizes, dtype, router form, ties, group or random
-inf masks, NaN/+inf rows, dead rows, the policy and its parameters) and built with torch from a
drawn seed, so thousands of cases stay fast. The policy is part of the case (every policy gets
about a quarter of the cases), so covering every policy does not multiply the run time.
`derandomize=True`: the same cases on every run (no flaky CI).
"""

from __future__ import annotations

import dataclasses
import os
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lynx_compile import policies
from lynx_compile.lowering import selection
from lynx_compile.policies import contract

SETTINGS = dict(derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# `make test` checks 2,500 generated batches; `make test-all` (LYNX_THOROUGH=1) checks 10,000.
THOROUGH = os.environ.get("LYNX_THOROUGH") == "1"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: waking a second thread per op costs more than the op (milliseconds when the
    other core is busy), and would make thousands of cases take minutes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclasses.dataclass
class Batch:
    scores: torch.Tensor  # (T, E)
    logits: torch.Tensor  # (T, E)
    k: int
    alpha: float
    beta: int
    confidence_gap: float
    live: torch.Tensor | None  # (T,) bool
    policy: str = "affinity_binning"
    expert_budget: int = 0
    keep_top: int = 0
    keep_mass: float = 0.8
    max_moved: float = 0.05
    ranks: int = 1
    num_routed: int | None = None  # columns from here on are zero-compute experts (free); None: none

    @property
    def params(self) -> dict:
        given = {"alpha": self.alpha, "beta": self.beta, "confidence_gap": self.confidence_gap,
                 "expert_budget": self.expert_budget, "keep_top": self.keep_top, "keep_mass": self.keep_mass,
                 "max_moved": self.max_moved, "ranks": self.ranks}
        return {name: given[name] for name in policies.PARAMETERS[self.policy]}

    def select(self, rows: torch.Tensor | None = None):
        keep = slice(None) if rows is None else rows
        live = None if self.live is None else self.live[keep]
        return selection.batch_select(self.scores[keep], self.logits[keep], self.k, self.policy, self.params,
                                      selection.NO_DECODE_BOUND, live, self.num_routed)


@st.composite
def batches(draw, max_tokens=128, nonfinite=True, dead=True, num_experts=None, k=None, dtype=None, policy=None,
            zero_compute=False):
    """Sizes and the policy are drawn by hypothesis; everything else from a drawn seed (fewer
    draws: fast cases). zero_compute: a third of the cases end with zero-compute columns."""
    num_tokens = draw(st.integers(0, max_tokens))
    num_experts = num_experts or draw(st.sampled_from([2, 3, 4, 8, 16, 32, 64]))
    k = k or draw(st.integers(1, num_experts))
    policy = policy or draw(st.sampled_from(policies.POLICIES))
    seed = draw(st.integers(0, 2**31 - 1))
    pick = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    dtype = dtype or pick.choice([torch.float32, torch.bfloat16])
    router = pick.choice(["softmax", "sigmoid", "logits"])

    logits = torch.randn(num_tokens, num_experts, generator=generator) * pick.choice([0.1, 1.0, 4.0])
    if pick.random() < 0.5:  # ties: a coarse grid, many equal logits within and across tokens
        logits = torch.round(logits * 2) / 2
    scores = {"softmax": lambda z: torch.softmax(z, -1), "sigmoid": torch.sigmoid, "logits": lambda z: z}[router](logits)
    mask = pick.choice(["none", "groups", "random"])
    if mask == "groups":  # DeepSeek-style: each token may use its chosen groups only
        groups = pick.choice([g for g in (1, 2, 4) if num_experts % g == 0])
        allowed_groups = torch.rand(num_tokens, groups, generator=generator) < 0.6
        allowed = allowed_groups.repeat_interleave(num_experts // groups, dim=1)
        scores = scores.masked_fill(~allowed, float("-inf"))
    elif mask == "random":
        scores = scores.masked_fill(torch.rand(num_tokens, num_experts, generator=generator) < 0.3, float("-inf"))
    if nonfinite and num_tokens:
        for row in pick.choices(range(num_tokens), k=pick.choice([0, 0, 1, 3])):
            scores[row], logits[row] = float("nan"), float("nan")
        for row in pick.choices(range(num_tokens), k=pick.choice([0, 0, 1, 2])):
            expert = pick.randrange(num_experts)
            logits[row, expert] = float("inf")
            if router == "logits":
                scores[row, expert] = float("inf")
    live = None
    if dead and pick.random() < 0.5:
        live = torch.rand(num_tokens, generator=generator) < pick.choice([0.3, 0.8])
    alpha = pick.choice([0.7, 1.0, 3.0])
    beta = pick.randint(1, 3)
    gap = pick.choice([0.0, 1 / alpha, 2.0])
    expert_budget = pick.choice([1, k, pick.randint(1, num_experts), num_experts])
    keep_top = pick.randint(1, k)
    keep_mass = pick.choice([0.3, 0.5, 0.8, 0.95, 1.0])
    max_moved = pick.choice([0.0, 0.02, 0.1, 0.5, 0.99])
    ranks = pick.choice([r for r in (1, 2, 4, 8) if num_experts % r == 0])  # moved_mass's expert-parallel order
    num_routed = None
    if zero_compute and num_experts > 1 and pick.random() < 0.35:  # LongCat-Flash's identity experts
        num_routed = pick.randint(1, num_experts - 1)
        ranks = 1  # ranks shard the real experts; none of the drawn layouts do with free columns
    return Batch(scores.to(dtype), logits.to(dtype), k, alpha, beta, gap, live, policy, expert_budget, keep_top,
                 keep_mass, max_moved, ranks, num_routed)


def eligible_and_usable(batch: Batch):
    return contract.usable_rows(batch.scores, batch.logits, batch.k)


def voters_of(batch: Batch) -> torch.Tensor:  # (T,) bool
    _, usable = eligible_and_usable(batch)
    return usable if batch.live is None else usable & batch.live


def distinct(indices: torch.Tensor, rows: torch.Tensor) -> int:
    return int(torch.unique(indices[rows]).numel())


@settings(max_examples=6000 if THOROUGH else 1500, **SETTINGS)
@given(batches())
def test_the_selection_contract_holds(batch):
    """For every policy: shapes, values, k distinct eligible experts, never more experts than
    top-k, and what each policy promises to keep (confident top-1s, own top keep_top, top-k)."""
    values, indices = batch.select()
    num_tokens = batch.scores.shape[0]
    assert indices.shape == values.shape == (num_tokens, batch.k)
    assert indices.dtype == torch.int64 and values.dtype == batch.scores.dtype
    # values are the model's own scores at the chosen experts
    assert torch.equal(values.nan_to_num(), batch.scores.gather(1, indices).nan_to_num())

    # k distinct eligible experts per usable token, sorted like top-k; the plain top-k otherwise
    eligible, usable = eligible_and_usable(batch)
    plain = torch.topk(batch.scores, batch.k, dim=-1).indices
    assert torch.equal(indices[~usable], plain[~usable])
    rows = indices[usable]
    in_order = rows.sort(dim=-1).values
    assert (in_order[:, 1:] != in_order[:, :-1]).all()
    assert eligible[usable].gather(1, rows).all()
    chosen = batch.scores[usable].gather(1, rows).float()
    assert (chosen[:, :-1] >= chosen[:, 1:]).all()

    # never more distinct experts than plain top-k over the voters (the whole batch when no row
    # is dead, NaN or short of eligible experts)
    voters = usable if batch.live is None else usable & batch.live
    assert distinct(indices, voters) <= distinct(plain, voters)

    if not num_tokens:
        return
    # confident voters keep their top-1 (binning, budget); every voter its own top keep_top
    # (opportunistic) or its whole top-k (none), compared by score (ties may swap indices)
    z = batch.logits.float().masked_fill(~eligible, float("-inf"))
    top2 = torch.topk(z, 2, dim=-1).values
    confident = voters & ((top2[:, 0] - top2[:, 1]) > batch.confidence_gap)
    kept = {"affinity_binning": (confident, 1), "gate_mass_budget": (confident, 1),
            "opportunistic": (voters, batch.keep_top), "protected_mass": (voters, 1),
            "moved_mass": (torch.zeros_like(voters), 1), "none": (voters, batch.k)}[batch.policy]
    rows, count = kept
    chosen_values = values.float().sort(dim=-1, descending=True).values[:, :count]  # (T, count)
    top_values = torch.topk(batch.scores.float(), count, dim=-1).values  # (T, count)
    assert torch.equal(chosen_values[rows], top_values[rows])


@settings(max_examples=4000 if THOROUGH else 1000, **SETTINGS)
@given(batches(max_tokens=64), st.integers(0, 2**31 - 1))
def test_rows_that_do_not_vote_change_no_other_row(batch, seed):
    """NaN, +inf, short and dead rows: whatever they hold, every voter's experts stay the same."""
    voters = voters_of(batch)
    _, indices = batch.select()
    generator = torch.Generator().manual_seed(seed)
    other = dataclasses.replace(batch, scores=batch.scores.clone(), logits=batch.logits.clone())
    dead = ~voters & (batch.live == False) if batch.live is not None else torch.zeros_like(voters)  # noqa: E712
    garbage = torch.randn(batch.scores.shape, generator=generator).to(batch.scores.dtype) * 5
    other.scores[dead], other.logits[dead] = garbage[dead], garbage[dead]  # still dead: other values
    unusable = ~voters & ~dead
    other.scores[unusable], other.logits[unusable] = float("nan"), float("nan")  # still not voting
    _, other_indices = other.select()
    assert torch.equal(voters_of(other), voters)
    assert torch.equal(indices[voters], other_indices[voters])


def test_an_empty_batch_returns_empty_tensors():
    for live in (None, torch.zeros(0, dtype=torch.bool)):
        values, indices = selection.batch_select(torch.empty(0, 8), torch.empty(0, 8), 2, "affinity_binning",
                                                 {"alpha": 0.7, "beta": 1, "confidence_gap": 1.0},
                                                 selection.NO_DECODE_BOUND, live)
        assert values.shape == indices.shape == (0, 2) and indices.dtype == torch.int64


@pytest.mark.parametrize("policy, expert_budget, keep_top, num_experts, k, dtype", [
    # one compile per case (~30 s cold): each policy once, both dtypes and both (E, k) shapes covered
    ("affinity_binning", 0, 0, 16, 4, torch.bfloat16),
    pytest.param("gate_mass_budget", 3, 0, 8, 2, torch.float32,  # float64 mass sums: the one float reduction
                 marks=pytest.mark.slow),
    pytest.param("opportunistic", 0, 2, 16, 4, torch.float32, marks=pytest.mark.slow),
    pytest.param("protected_mass", 0, 0, 16, 4, torch.float32, marks=pytest.mark.slow),
    ("moved_mass", 0, 0, 8, 2, torch.float32),  # the default: float64 weights, an integer budget; ranks=4
])
def test_inductor_generated_selection_equals_the_eager_op(policy, expert_budget, keep_top, num_experts, k, dtype):
    """One compiled function per (policy, E, k, dtype), dynamic in T, checked on many generated
    batches (their ties and -inf masks included)."""

    values = {"alpha": 3.0, "beta": 2, "confidence_gap": 1 / 3, "expert_budget": expert_budget, "keep_top": keep_top,
              "keep_mass": 0.8, "max_moved": 0.1, "ranks": 4}
    params = {name: values[name] for name in policies.PARAMETERS[policy]}

    def select(scores, logits, live):
        return selection.batch_select(scores, logits, k, policy, params, selection.NO_DECODE_BOUND, live)

    compiled = torch.compile(select, dynamic=True)

    @settings(max_examples=50, **SETTINGS)
    @given(batches(max_tokens=64, dead=False, num_experts=num_experts, k=k, dtype=dtype, policy=policy))
    def check(batch):
        scores, logits = batch.scores, batch.logits
        live = torch.arange(scores.shape[0]) % 3 != 0
        expected = select(scores, logits, live)
        got = compiled(scores, logits, live)
        assert torch.equal(got[1], expected[1])
        assert torch.equal(got[0].nan_to_num(), expected[0].nan_to_num())

    check()


@pytest.fixture(scope="module")
def cpu_kernel():
    from lynx_compile.lowering.kernels import select_experts_cpu

    if not select_experts_cpu.available():
        pytest.fail(f"the CPU selection kernel did not build: {select_experts_cpu.unavailable_reason()}")
    from lynx_compile.lowering import ops

    return ops


@settings(max_examples=6000 if THOROUGH else 1500, **SETTINGS)
@given(batch=batches(zero_compute=True), bound=st.sampled_from([selection.NO_DECODE_BOUND, 0, 64]))
def test_the_cpu_kernel_equals_the_reference_bit_for_bit(cpu_kernel, batch, bound):
    """lynx::select_experts_cpu (one C++ call) against the torch body it replaces on CPU: the same
    indices and values for every policy, ties, masks, NaN/+inf and dead rows included, and with
    zero-compute columns."""
    plain = torch.topk(batch.scores, batch.k, dim=-1).indices
    params = cpu_kernel.encode_params(batch.policy, batch.params)
    routed = -1 if batch.num_routed is None else batch.num_routed
    values, indices = cpu_kernel.select_experts_cpu(batch.scores, batch.logits, plain, batch.k, batch.policy, params,
                                                    bound, batch.live, routed)
    expected_values, expected_indices = selection.batch_select(batch.scores, batch.logits, batch.k, batch.policy,
                                                               batch.params, bound, batch.live, batch.num_routed)
    assert torch.equal(indices, expected_indices)
    assert torch.equal(values.nan_to_num(), expected_values.nan_to_num())


@settings(max_examples=1000 if THOROUGH else 300, **SETTINGS)
@given(batches(max_tokens=1, dead=False))
def test_a_lone_token_has_nothing_to_select_under_every_policy(batch):
    """Why a T=1 site is left as plain top-k (passes/phase.py, "single"): whatever a policy does
    with one token, it reads k experts, exactly as many as the token's own top-k."""
    _, indices = batch.select()
    plain = torch.topk(batch.scores, batch.k, dim=-1).indices
    assert torch.unique(indices).numel() == torch.unique(plain).numel()
