"""The selection op (`lowering/selection.py:batch_select`): decode bound, policy dispatch, and the
registered op against its Python body, for every policy."""

import pytest
import torch

from lynx_compile import policies
from lynx_compile.lowering import selection
from lynx_compile.lowering.ops import batch_select
from moe_models import skewed_logits

POLICY_ARGS = {  # policy -> (policy, expert_budget, keep_top) as the op takes them
    "affinity_binning": ("affinity_binning", 0, 0),
    "gate_mass_budget": ("gate_mass_budget", 3, 0),
    "opportunistic": ("opportunistic", 0, 1),
    "none": ("none", 0, 0),
}


def test_decode_bound_switches_between_selection_and_plain_topk():
    logits = skewed_logits()
    scores = torch.softmax(logits, dim=-1)
    args = (scores, logits, 2, 0.7, 1, 1 / 0.7)
    selected = selection.batch_select(*args, selection.NO_DECODE_BOUND)
    as_decode = selection.batch_select(*args, 16)  # 16 tokens <= 16 sequences
    as_prefill = selection.batch_select(*args, 4)  # 16 tokens > 4 sequences
    plain = torch.topk(scores, 2)
    assert torch.equal(as_decode[1], selected[1])
    assert torch.equal(as_prefill[1], plain.indices)
    assert torch.equal(as_prefill[0], plain.values)


@pytest.mark.parametrize("policy", POLICY_ARGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_registered_op_matches_python_body(dtype, policy):
    logits = skewed_logits().to(dtype)
    scores = torch.softmax(logits.float(), dim=-1).to(dtype)
    args = (scores, logits, 2, 0.7, 1, 1 / 0.7, selection.NO_DECODE_BOUND, None, *POLICY_ARGS[policy])
    values, indices = batch_select(*args)
    expected_values, expected_indices = selection.batch_select(*args)
    assert values.dtype == dtype
    assert torch.equal(indices, expected_indices) and torch.equal(values, expected_values)


def test_the_op_runs_the_named_policy_with_its_own_parameters():
    logits = skewed_logits()
    scores = torch.softmax(logits, dim=-1)
    _, indices = selection.batch_select(scores, logits, 2, 0.7, 1, 1 / 0.7, selection.NO_DECODE_BOUND, None,
                                        "opportunistic", 0, 1)
    _, expected = policies.select("opportunistic", scores, logits, 2, keep_top=1)
    assert torch.equal(indices, expected)
    with pytest.raises(ValueError, match="unknown selection policy 'greedy'"):
        selection.batch_select(scores, logits, 2, 0.7, 1, 1.0, selection.NO_DECODE_BOUND, None, "greedy")
    with pytest.raises(ValueError, match=r"keep_top must be an integer in \[1, k=2\], got 3"):
        selection.batch_select(scores, logits, 2, 0.7, 1, 1.0, selection.NO_DECODE_BOUND, None, "opportunistic", 0, 3)


def test_a_call_without_policy_arguments_is_affinity_binning():
    """Backward compatibility of the op's schema: graphs written before policies existed."""
    logits = skewed_logits()
    scores = torch.softmax(logits, dim=-1)
    old = batch_select(scores, logits, 2, 0.7, 1, 1 / 0.7, selection.NO_DECODE_BOUND)
    _, expected = policies.select("affinity_binning", scores, logits, 2, alpha=0.7, beta=1, confidence_gap=1 / 0.7)
    assert torch.equal(old[1], expected)
